"""Shared by the memcached tests: a fleet of contender processes, journal reading, a fault proxy.

Whom to kill is found from the journal (the child's own record of its work), never from the
oracle, since a crashed leader's record stays in memcached until someone takes it over.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

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


class Fleet:
    """Contender processes (``python -m crown_sync.testing.contender``), one identity each."""

    def __init__(self, url: str, directory: str, name: str, child: str = "thread", grace: float = 2.0,
                 stop_delay: float = 0.0):
        self.url = url
        self.name = name
        self.child = child
        self.grace = grace
        self.stop_delay = stop_delay  # the child works on this long after SIGTERM (a slow daemon)
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
             "--stop-delay", str(self.stop_delay)],
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
        now = clock.monotonic()
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


class FaultProxy:
    """A TCP relay in front of a real memcached that cuts a connection at a chosen command.

    A real network fault at an exact point of the protocol (in the spirit of toxiproxy), so a test
    can make one call fail after the read before it succeeded: ``cut_next(predicate)`` arms it, and
    the next client-to-server chunk for which ``predicate(chunk)`` is true is dropped, never
    reaching memcached, and both ends of that connection are closed. pymemcache sends a command
    (line and data) with one ``sendall``, which loopback delivers in one piece; ``cuts`` counts the
    faults that fired, so a test can check that its fault really happened.
    """

    def __init__(self, upstream: Tuple[str, int]):
        self.upstream = tuple(upstream)
        self.cuts = 0
        self._rule: Optional[Callable[[bytes], bool]] = None
        self._lock = threading.Lock()
        self._sockets: List[socket.socket] = []
        self._closed = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.address = self._listener.getsockname()
        threading.Thread(target=self._accept, name="fault-proxy", daemon=True).start()

    def cut_next(self, predicate: Callable[[bytes], bool]) -> None:
        with self._lock:
            self._rule = predicate

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
            for source, sink, outbound in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(source, sink, outbound), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, outbound: bool) -> None:
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    break
                if outbound:
                    with self._lock:
                        cut = self._rule is not None and self._rule(chunk)
                        if cut:
                            self._rule = None
                            self.cuts += 1
                    if cut:
                        break  # dropped: memcached never sees it
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() in progress (Linux)
        except OSError:
            pass
        self._listener.close()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
