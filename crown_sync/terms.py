"""Terms: one continuous holding of leadership, and the deadline that bounds it.

A :class:`Term` is what a leader's child sees. Its ``stop_event`` is set when the term ends, and
also *reads* as set once the term's deadline has passed, even if no crown thread has run since
(the process was paused by SIGSTOP, swap or a long GC): ``is_set()`` and ``wait()`` compare the
deadline with :func:`crown_sync.clock.monotonic` themselves. That closes the window between "the
oracle may have given the crown to someone else" and "our thread noticed", for work that checks
the event before it acts. It cannot stop work that is already under way: the fencing token is the last line
of defence for that.
"""

import dataclasses
import math
import threading
from typing import Optional, Tuple

from .clock import monotonic as _monotonic

__all__ = ["Term", "TermInfo", "DeadlineEvent"]



class DeadlineEvent(threading.Event):
    """A threading.Event that also counts as set once ``deadline()`` has passed."""

    def __init__(self, deadline_source):
        super().__init__()
        self._deadline_source = deadline_source

    def _expired(self) -> bool:
        deadline = self._deadline_source()
        return deadline is not None and _monotonic() >= deadline

    def is_set(self) -> bool:
        return super().is_set() or self._expired()

    isSet = is_set

    def wait(self, timeout: Optional[float] = None) -> bool:
        end = None if timeout is None else _monotonic() + timeout
        while True:
            if self.is_set():
                return True
            deadline = self._deadline_source()
            now = _monotonic()
            slices = [t - now for t in (deadline, end) if t is not None]
            if slices and min(slices) <= 0:
                # Either the deadline (re-read: it may have moved) or the caller's timeout passed.
                return self.is_set()
            if super().wait(min(slices) if slices else None):
                return True


@dataclasses.dataclass(frozen=True)
class TermInfo:
    """The picklable part of a term, given to ProcessChild targets."""

    name: str
    token: Optional[int]
    identity: str


class Term:
    """One term of leadership (or, for a follower child, one spell of following).

    ``deadline`` is a :func:`crown_sync.clock.monotonic` value or None (no local expiry); refreshes move it
    forward. ``fds`` are descriptors the oracle wants the term's child processes to inherit.
    """

    def __init__(
        self,
        name: str,
        identity: str,
        token: Optional[int],
        deadline: Optional[float],
        leading: bool = True,
        fds: Tuple[int, ...] = (),
    ):
        self.name = name
        self.identity = identity
        self.token = token
        self.leading = leading
        self.fds = tuple(fds)
        self._deadline = deadline
        self._ended = False
        self.stop_event = DeadlineEvent(self._deadline_for_event)
        self.started_at = _monotonic()

    def _deadline_for_event(self) -> Optional[float]:
        return self._deadline

    @property
    def deadline(self) -> Optional[float]:
        return self._deadline

    def extend(self, deadline: Optional[float]) -> bool:
        """Move the deadline (after a successful refresh); False, and no effect, once the term
        has ended or its deadline has passed: a renewal that comes back late never revives a
        term that ``is_leader()`` and ``stop_event`` have already reported over."""
        if self.ended:
            return False
        self._deadline = deadline
        return True

    @property
    def expired(self) -> bool:
        deadline = self._deadline
        return deadline is not None and _monotonic() >= deadline

    @property
    def ended(self) -> bool:
        return self._ended or self.expired

    def end(self) -> None:
        """Mark the term over and wake everything waiting on ``stop_event``."""
        self._ended = True
        self.stop_event.set()

    def is_leader(self) -> bool:
        """True while this term leads: not ended and its deadline not passed. No I/O."""
        if not self.leading or self._ended:
            return False
        deadline = self._deadline
        return deadline is None or _monotonic() < deadline

    def remaining(self) -> float:
        """Seconds until the deadline (math.inf if none)."""
        deadline = self._deadline
        return math.inf if deadline is None else deadline - _monotonic()

    def info(self) -> TermInfo:
        return TermInfo(self.name, self.token, self.identity)

    def __repr__(self) -> str:
        return f"<Term {self.name} token={self.token} identity={self.identity} leading={self.leading}>"


_fork_local = threading.local()


class keeping_fds_across_fork:
    """Within this block, a fork() from this thread hands ``fds`` to the child on purpose.

    Oracles that close inherited descriptors in forked children (so a stray fork can't keep a
    lock alive) leave these open: a term's child process must hold the lock until it exits.
    """

    def __init__(self, fds):
        self.fds = tuple(fds)

    def __enter__(self):
        self._saved = getattr(_fork_local, "fds", ())
        _fork_local.fds = self.fds
        return self

    def __exit__(self, *exc):
        _fork_local.fds = self._saved


def fds_kept_across_fork() -> Tuple[int, ...]:
    """The descriptors the forking thread asked to keep (see :class:`keeping_fds_across_fork`)."""
    return getattr(_fork_local, "fds", ())
