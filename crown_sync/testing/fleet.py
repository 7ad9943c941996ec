"""Contender processes for tests and benchmarks, and the one polling helper they wait with.

A :class:`Fleet` runs ``python -m crown_sync.testing.contender`` processes for one election, one
identity each, all journaling into one file. Whom to kill, pause or wait for is found from that
journal (the children's own record of their work), never from the oracle's word::

    fleet = Fleet(url, tmp_path, "billing")
    fleet.spawn("a"); fleet.spawn("b")
    try:
        first = fleet.wait_for_term()               # a running term, 5 beats in
        fleet.signal(first.identity, signal.SIGKILL)
        fleet.wait_for_term(other_than={first.identity})
    finally:
        fleet.stop_all()
    fleet.assert_safe(min_terms=2)                  # no overlap, tokens rising
"""

import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, TypeVar

from crown_sync import clock
from crown_sync.testing import journal

__all__ = ["ROOT", "Fleet", "poll", "wait_until", "process_state", "terms", "assert_safe",
           "contender_command", "contender_environment"]

#: The repository (or site-packages) directory holding ``crown_sync``: the contenders' cwd.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

T = TypeVar("T")


def poll(predicate: Callable[[], T], timeout: float, interval: float = 0.01) -> T:
    """``predicate()``'s first true value within ``timeout`` seconds, else its last (false) one."""
    end = clock.monotonic() + timeout
    while True:
        value = predicate()
        if value or clock.monotonic() > end:
            return value
        time.sleep(interval)


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.01,
               message: str = "condition") -> T:
    """Poll until ``predicate()`` returns something true and return it; fail (never hang) after a
    generous ``timeout`` with an AssertionError naming ``message``."""
    value = poll(predicate, timeout, interval)
    if not value:
        raise AssertionError(f"{message} not met within {timeout}s")
    return value


def process_state(pid: int) -> Optional[str]:
    """The one-letter state of ``pid`` from /proc (``T``: stopped), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def contender_command(name: str, url: str, journal_path: str, identity: str, child: str = "thread",
                      events: Optional[str] = None, grace: float = 2.0, interval: float = 0.005,
                      stop_delay: float = 0.0, monitor_delay: Optional[float] = None) -> List[str]:
    """The argv of one ``python -m crown_sync.testing.contender`` process."""
    argv = [sys.executable, "-m", "crown_sync.testing.contender", "--name", name, "--oracle", url,
            "--journal", journal_path, "--identity", identity, "--child", child, "--grace", str(grace),
            "--interval", str(interval), "--stop-delay", str(stop_delay)]
    if events is not None:
        argv += ["--events", events]
    if monitor_delay is not None:
        argv += ["--monitor-delay", str(monitor_delay)]
    return argv


def contender_environment() -> Dict[str, str]:
    """This process's environment, with ``ROOT`` first on PYTHONPATH (a contender imports the same
    crown_sync as the test, checkout or not)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def terms(path: str, name: str) -> List[journal.Term]:
    """The terms of ``name`` in the journal at ``path`` (none while it does not exist yet)."""
    if not os.path.exists(path):
        return []
    return journal._terms(journal.read(path), name)


def assert_safe(path: str, name: str, min_terms: int = 1, all_worked: bool = False) -> journal.Report:
    """The journal's verdict: no two terms overlap, tokens rise; at least ``min_terms`` terms that
    worked (with ``all_worked``, every term: one begun during teardown may not have beaten yet)."""
    report = journal.check(path, name)
    assert report.ok, report.summary()
    assert sum(1 for t in report.terms if t.beats > 0) >= min_terms, report.summary()
    if all_worked:
        assert all(t.beats > 0 for t in report.terms), report.summary()
    return report


class Fleet:
    """Contender processes (``python -m crown_sync.testing.contender``), one identity each.

    Each runs in its own session (process group), so :meth:`stop_all` can reach the children it
    started. The journal and the telemetry events go to files in ``directory``.
    """

    def __init__(self, url: str, directory, name: str = "crown-sync-test", child: str = "thread",
                 grace: float = 2.0, interval: float = 0.005, stop_delay: float = 0.0,
                 monitor_delay: Optional[float] = None):
        self.url = url
        self.name = name
        self.child = child
        self.grace = grace
        self.interval = interval
        self.stop_delay = stop_delay  # the child works on this long after SIGTERM / its stop
        self.monitor_delay = monitor_delay
        self.directory = str(directory)
        # Named after the election: two fleets may share a directory.
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        self.journal = os.path.join(self.directory, f"{safe}.journal.jsonl")
        self.events = os.path.join(self.directory, f"{safe}.events.jsonl")
        self.processes: Dict[str, subprocess.Popen] = {}

    def command(self, identity: str) -> List[str]:
        return contender_command(self.name, self.url, self.journal, identity, self.child, self.events,
                                 self.grace, self.interval, self.stop_delay, self.monitor_delay)

    def spawn(self, identity: str, prefix: Sequence[str] = ()) -> subprocess.Popen:
        """Start contender ``identity`` (its command run through ``prefix``, e.g. ``unshare``)."""
        process = subprocess.Popen(
            list(prefix) + self.command(identity),
            cwd=ROOT,
            env=contender_environment(),
            start_new_session=True,  # its own process group: cleanup can reach its children
        )
        self.processes[identity] = process
        return process

    def spawn_many(self, count: int, prefix: str) -> None:
        """Start contenders ``prefix0`` ... ``prefix{count-1}``."""
        for i in range(count):
            self.spawn(f"{prefix}{i}")

    def terms(self) -> List[journal.Term]:
        return terms(self.journal, self.name)

    def running_term(self, fresh: float = 0.3) -> Optional[journal.Term]:
        """The newest term whose child journaled within ``fresh`` seconds and has not stopped."""
        now = clock.monotonic()
        running = [t for t in self.terms() if not t.stopped and now - t.end < fresh and t.beats > 0]
        return running[-1] if running else None

    def wait_for_term(self, other_than: Iterable[str] = (), after: float = float("-inf"),
                      min_beats: int = 5, timeout: float = 30.0) -> journal.Term:
        """A running term, started after monotonic time ``after``, of an identity not in
        ``other_than``, whose child has beaten ``min_beats`` times."""
        other_than = set(other_than)

        def found():
            term = self.running_term()
            if (term is not None and term.identity not in other_than and term.start > after
                    and term.beats >= min_beats):
                return term
            return None
        return wait_until(found, timeout=timeout, message=f"a running term not of {sorted(other_than)}")

    def wait_for_new_term(self, after: float, timeout: float = 30.0, min_beats: int = 5) -> journal.Term:
        """A running term that started after monotonic time ``after``."""
        return self.wait_for_term(after=after, min_beats=min_beats, timeout=timeout)

    def term_across(self, fault: Callable[[], object],
                    timeout: float = 40.0) -> Tuple[journal.Term, journal.Term]:
        """(the running term, the running term begun after ``fault()`` was called)."""
        before = self.wait_for_term()
        at = clock.monotonic()
        fault()
        return before, self.wait_for_term(after=at, timeout=timeout)

    def assert_succeeded(self, before: journal.Term, after: journal.Term,
                         stopped: bool = False) -> journal.Report:
        """From the journal: safe, and the term ``before`` (which ``stopped`` by itself, if asked)
        did its last act before its successor ``after`` began, with a higher token."""
        report = self.assert_safe(min_terms=2)
        old = [t for t in report.terms if t.token == before.token][0]
        assert old.end < after.start and after.token > before.token, report.summary()
        assert old.stopped or not stopped, report.summary()
        return report

    def signal(self, identity: str, signum: int) -> None:
        self.processes[identity].send_signal(signum)

    def wait_exit(self, identity: str, timeout: float = 30.0) -> int:
        return self.processes[identity].wait(timeout)

    def events_of(self, identity: Optional[str] = None) -> List[dict]:
        """The telemetry events the contenders recorded (of ``identity``, or all)."""
        if not os.path.exists(self.events):
            return []
        with open(self.events) as handle:
            lines = [json.loads(line) for line in handle if line.strip()]
        return [e for e in lines if identity is None or e.get("identity") == identity]

    def assert_safe(self, min_terms: int = 1, all_worked: bool = False) -> journal.Report:
        return assert_safe(self.journal, self.name, min_terms, all_worked)

    def stop_all(self, timeout: float = 30.0, strict: bool = False) -> None:
        """SIGTERM every contender (each stops its crown and child cleanly) and wait; then SIGKILL
        what is left, process groups and all. With ``strict``, a contender still running after
        ``timeout`` is an AssertionError (after SIGABRT, which dumps its threads' stacks)."""
        for process in self.processes.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGCONT)  # in case a test left it stopped
                    process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        stuck = []
        for identity, process in self.processes.items():
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                stuck.append(identity)
                if strict:
                    process.send_signal(signal.SIGABRT)  # tox sets PYTHONFAULTHANDLER: the stacks
        self.kill_all()
        assert not (strict and stuck), f"contenders {stuck} did not exit within {timeout}s of SIGTERM"

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
