"""The warden: one thread that ends terms whose deadline passes, whatever the crown's loop is doing.

A crown's loop thread may be stuck in an oracle call that should have renewed the term. The
warden does not care: when a term's deadline passes it calls the crown's expiry callback, which
kills the term's child processes at once and ends the term. One thread serves every crown in the
process (a heap of deadlines), so a thousand crowns cost one extra thread, not a thousand.

Deadlines only move forward while a term lives; the warden re-reads a term's deadline when the
old one comes due and sleeps again if it moved.
"""

import heapq
import itertools
import logging
import threading
from typing import Callable, List, Optional, Tuple

from . import _forksafe
from .clock import monotonic as _monotonic

__all__ = ["watch", "start"]

logger = logging.getLogger("crown_sync.warden")


class _Warden:
    def __init__(self):
        self._cond = threading.Condition()
        self._heap: List[Tuple[float, int, object, Callable]] = []
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None

    def watch(self, term, on_expiry: Callable[[object], None]) -> None:
        deadline = term.deadline
        if deadline is None:
            return
        with self._cond:
            entry = (deadline, next(self._seq), term, on_expiry)
            heapq.heappush(self._heap, entry)
            self._ensure_thread()
            if self._heap[0] is entry:  # else the thread already sleeps until an earlier deadline
                self._cond.notify()

    def start(self) -> None:
        with self._cond:
            self._ensure_thread()

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="crown-sync-warden", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                deadline, _, term, on_expiry = self._heap[0]
                now = _monotonic()
                if deadline > now:
                    self._cond.wait(deadline - now)
                    continue
                heapq.heappop(self._heap)
                if term._ended:
                    continue
                current = term.deadline
                if current is None:
                    continue
                if current > now:  # refreshed since: sleep until the new deadline
                    heapq.heappush(self._heap, (current, next(self._seq), term, on_expiry))
                    continue
            try:  # outside the lock: the callback takes the crown's lock and kills processes
                on_expiry(term)
            except Exception:
                logger.exception("expiring %r failed", term)


_warden = _Warden()


def watch(term, on_expiry: Callable[[object], None]) -> None:
    """Call ``on_expiry(term)`` once the term's deadline has passed, unless it ended first."""
    _warden.watch(term, on_expiry)


def start() -> None:
    """Start the warden's thread now (a crown starting), so that the first term does not pay for
    starting a thread between winning and starting its child."""
    _warden.start()


def _after_fork_in_child() -> None:
    global _warden
    _warden = _Warden()  # the old thread does not exist in the child


_forksafe.at_fork(after_in_child=_after_fork_in_child)
