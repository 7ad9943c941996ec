"""Shared by the memcached tests and benchmark: a fleet of contender processes and journal reading.

Whom to kill is found from the journal (the child's own record of its work), never from the
oracle, since a crashed leader's record stays in memcached until someone takes it over.
"""

import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

from crown_sync.testing import journal

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wait_until(predicate, timeout=30.0, interval=0.01, message="condition"):
    """Poll until predicate() returns something true; fail (never hang) after a generous timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{message} not met within {timeout}s")


def terms(path: str, name: str) -> List[journal.Term]:
    if not os.path.exists(path):
        return []
    return journal._terms(journal.read(path), name)


class Fleet:
    """Contender processes (``python -m crown_sync.testing.contender``), one identity each."""

    def __init__(self, url: str, directory: str, name: str, child: str = "thread", grace: float = 2.0):
        self.url = url
        self.name = name
        self.child = child
        self.grace = grace
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
             "--child", self.child, "--events", self.events, "--grace", str(self.grace)],
            cwd=ROOT,
            env=env,
            start_new_session=True,  # its own process group: cleanup can reach its children
        )
        self.processes[identity] = process
        return process

    def terms(self) -> List[journal.Term]:
        return terms(self.journal, self.name)

    def running_term(self, fresh: float = 0.25) -> Optional[journal.Term]:
        """The term whose child journaled within ``fresh`` seconds and has not stopped."""
        now = time.monotonic()
        running = [t for t in self.terms() if not t.stopped and now - t.end < fresh and t.beats > 0]
        return running[-1] if running else None

    def wait_for_term(self, other_than=(), min_beats: int = 5, timeout: float = 30.0) -> journal.Term:
        """A running term of an identity not in ``other_than``, with some work done."""
        def found():
            term = self.running_term()
            if term is not None and term.identity not in other_than and term.beats >= min_beats:
                return term
            return None
        return wait_until(found, timeout=timeout, message=f"a running term not of {sorted(other_than)}")

    def wait_for_new_term(self, after: float, timeout: float = 30.0, min_beats: int = 5) -> journal.Term:
        """A running term that started after monotonic time ``after``."""
        def found():
            term = self.running_term()
            return term if term is not None and term.start > after and term.beats >= min_beats else None
        return wait_until(found, timeout=timeout, message="a new running term")

    def signal(self, identity: str, signum: int) -> None:
        self.processes[identity].send_signal(signum)

    def stop_all(self, timeout: float = 30.0) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                try:
                    os.kill(process.pid, signal.SIGCONT)  # in case a test left one stopped
                    process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for process in self.processes.values():
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill_all()

    def kill_all(self) -> None:
        """Last resort: SIGKILL each contender's process group (its children too), by pid."""
        for process in self.processes.values():
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                pass
