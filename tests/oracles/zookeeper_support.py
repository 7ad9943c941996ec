"""Shared by the ZooKeeper tests: contender processes, journal reading, and ZooKeeper-side lookups.

Whom to kill is found from the journal (the child's own record of its work), never from the
oracle. Which ensemble member a leader is connected to is found from the servers themselves
(the leader node's ``ephemeralOwner`` and each member's ``cons`` listing).
"""

import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

from kazoo.client import KazooClient

from crown_sync import clock
from crown_sync.testing import journal

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wait_until(predicate, timeout=30.0, interval=0.01, message="condition"):
    """Poll until predicate() returns something true; fail (never hang) after a generous timeout."""
    end = clock.monotonic() + timeout
    while clock.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{message} not met within {timeout}s")


def terms(path: str, name: str) -> List[journal.Term]:
    if not os.path.exists(path):
        return []
    return journal._terms(journal.read(path), name)


def assert_safe(path: str, name: str, min_terms: int = 1) -> journal.Report:
    report = journal.check(path, name)
    assert report.ok, report.summary()
    # Terms that really worked (a term begun during teardown may not have beaten yet).
    assert sum(1 for t in report.terms if t.beats > 0) >= min_terms, report.summary()
    return report


class Fleet:
    """Contender processes (``python -m crown_sync.testing.contender``), one identity each."""

    def __init__(self, url: str, directory: str, name: str, child: str = "thread", grace: float = 1.0,
                 stop_delay: float = 0.0):
        self.url = url
        self.name = name
        self.child = child
        self.grace = grace
        self.stop_delay = stop_delay  # the child works on this long after SIGTERM
        self.directory = str(directory)
        self.journal = os.path.join(self.directory, "journal.jsonl")
        self.events = os.path.join(self.directory, "events.jsonl")
        self.processes: Dict[str, subprocess.Popen] = {}

    def spawn(self, identity: str) -> subprocess.Popen:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        process = subprocess.Popen(
            [sys.executable, "-m", "crown_sync.testing.contender", "--name", self.name,
             "--oracle", self.url, "--journal", self.journal, "--identity", identity,
             "--child", self.child, "--events", self.events, "--grace", str(self.grace),
             "--monitor-delay", "0.5", "--stop-delay", str(self.stop_delay)],
            cwd=ROOT,
            env=env,
            start_new_session=True,  # its own process group: cleanup reaches its children too
        )
        self.processes[identity] = process
        return process

    def terms(self) -> List[journal.Term]:
        return terms(self.journal, self.name)

    def running_term(self, fresh: float = 0.3) -> Optional[journal.Term]:
        """The newest term whose child journaled within ``fresh`` seconds and has not stopped."""
        now = clock.monotonic()
        running = [t for t in self.terms() if not t.stopped and now - t.end < fresh and t.beats > 0]
        return running[-1] if running else None

    def wait_for_term(self, other_than=(), after: float = 0.0, min_beats: int = 5,
                      timeout: float = 30.0) -> journal.Term:
        """A running term (started after ``after``) of an identity not in ``other_than``."""
        def found():
            term = self.running_term()
            if (term is not None and term.identity not in other_than and term.start > after
                    and term.beats >= min_beats):
                return term
            return None
        return wait_until(found, timeout=timeout, message=f"a running term not of {sorted(other_than)}")

    def signal(self, identity: str, signum: int) -> None:
        os.kill(self.processes[identity].pid, signum)

    def wait_exit(self, identity: str, timeout: float = 30.0) -> int:
        return self.processes[identity].wait(timeout)

    def cleanup(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGCONT)
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()


def plain_client(hosts: str, **kwargs) -> KazooClient:
    client = KazooClient(hosts=hosts, **kwargs)
    client.start(timeout=30)
    return client


def leader_node(client: KazooClient, election: str):
    """(node name, stat) of the lowest node of ``election``, or (None, None)."""
    try:
        children = client.get_children(election)
    except Exception:
        return None, None
    queue = [c for c in children if c[-10:].isdigit()]  # not the contenders' guard nodes
    for child in sorted(queue, key=lambda c: int(c[-10:])):
        stat = client.exists(f"{election}/{child}")
        if stat is not None:
            return child, stat
    return None, None
