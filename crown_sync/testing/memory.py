"""An in-process oracle for unit tests of the engine (never for testing oracle behaviour).

Leases live in a dict guarded by a lock; a term lasts ``lease`` seconds from the start of the
claim or refresh that granted it. Faults are injected by the test: make calls raise
(``fail_with``), hang (``hang``), revoke a lease behind the leader's back (``revoke``), or signal
loss the way a connection-state oracle would (``signal_lost``).
"""

import threading
import time
from typing import Any, Dict, List, Optional

from .. import clock
from ..oracle import Claim, Contender, Leader, OnChange, Oracle


class MemoryOracle(Oracle):
    def __init__(self, lease: Optional[float] = 5.0, refresh_in: Optional[float] = 1.0):
        self.lease = lease
        self.refresh_in = refresh_in
        self.description = "memory://test"
        self._lock = threading.RLock()
        self._holders: Dict[str, "MemoryContender"] = {}
        self._records: Dict[str, Leader] = {}
        self._tokens: Dict[str, int] = {}
        self.contenders: List["MemoryContender"] = []
        self.fail_with: Optional[BaseException] = None
        self.hang = threading.Event()  # while set... see _call
        self.hang.set()
        self.calls: List[str] = []
        self.closed = False

    def _call(self, operation: str) -> None:
        self.calls.append(operation)
        self.hang.wait()  # clear() the event to make every call block until set() again
        if self.fail_with is not None:
            raise self.fail_with

    def contender(self, name: str, identity: str, metadata: Dict[str, Any], on_change: OnChange) -> "MemoryContender":
        contender = MemoryContender(self, name, identity, metadata, on_change)
        with self._lock:
            self.contenders.append(contender)
        return contender

    def _current(self, name: str) -> Optional["MemoryContender"]:
        holder = self._holders.get(name)
        if holder is not None and holder._expires is not None and clock.monotonic() >= holder._expires:
            del self._holders[name]
            holder = None
        return holder

    def find_leader(self, name: str) -> Optional[Leader]:
        self._call("find_leader")
        with self._lock:
            holder = self._current(name)
            return self._records.get(name) if holder is not None else None

    def dismiss(self, name: str) -> bool:
        self._call("dismiss")
        with self._lock:
            holder = self._current(name)
            if holder is None:
                return False
            del self._holders[name]
        holder._on_change()
        self._notify_watchers(name)
        return True

    def revoke(self, name: str) -> None:
        """The lease disappears without telling the holder (like a server restart)."""
        with self._lock:
            self._holders.pop(name, None)
        self._notify_watchers(name)

    def signal_lost(self, name: str) -> None:
        """Tell the holder its leadership is gone, as a connection-state oracle would."""
        with self._lock:
            holder = self._holders.pop(name, None)
        if holder is not None:
            holder._on_change(lost=True)
        self._notify_watchers(name)

    def _notify_watchers(self, name: str) -> None:
        with self._lock:
            watchers = [c for c in self.contenders if c.name == name and c._watching]
        for contender in watchers:
            contender._watching = False
            contender._on_change()

    def close(self) -> None:
        self.closed = True


class MemoryContender(Contender):
    def __init__(self, oracle: MemoryOracle, name: str, identity: str, metadata: Dict[str, Any], on_change: OnChange):
        self.oracle = oracle
        self.name = name
        self.identity = identity
        self.metadata = metadata
        self._on_change = on_change
        self._expires: Optional[float] = None
        self._watching = False
        self.closed = False

    def _grant(self, started: float, token: int) -> Claim:
        lease = self.oracle.lease
        self._expires = None if lease is None else started + lease
        leader = self.oracle._records[self.name]
        return Claim(True, leader, token, self._expires, self.oracle.refresh_in)

    def claim(self) -> Claim:
        started = clock.monotonic()
        self.oracle._call("claim")
        with self.oracle._lock:
            holder = self.oracle._current(self.name)
            if holder is not None and holder is not self:
                return Claim(False, leader=self.oracle._records.get(self.name))
            token = self.oracle._tokens.get(self.name, 0) + 1
            self.oracle._tokens[self.name] = token
            self.oracle._holders[self.name] = self
            self.oracle._records[self.name] = Leader(self.identity, dict(self.metadata), token, time.time())
            return self._grant(started, token)

    def refresh(self) -> Claim:
        started = clock.monotonic()
        self.oracle._call("refresh")
        with self.oracle._lock:
            if self.oracle._current(self.name) is not self:
                return Claim(False)
            return self._grant(started, self.oracle._records[self.name].token)

    def watch(self, leader: Optional[Leader]) -> bool:
        self.oracle._call("watch")
        with self.oracle._lock:
            if self.oracle._current(self.name) is None:
                return False
            self._watching = True
            return True

    def abdicate(self) -> None:
        self.oracle.calls.append("abdicate")
        with self.oracle._lock:
            if self.oracle._holders.get(self.name) is self:
                del self.oracle._holders[self.name]
        self.oracle._notify_watchers(self.name)

    def close(self) -> None:
        self.oracle.calls.append("close")
        self.abdicate()
        self.closed = True
