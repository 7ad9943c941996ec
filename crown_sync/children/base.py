"""The child interface: a :class:`Child` specification starts a :class:`RunningChild` per term.

Also the argument checks the three kinds share. See :mod:`crown_sync.children` for the guarantees.
"""

import logging
import math
import numbers
import threading
from collections.abc import Mapping
from typing import Callable, Optional

# One logger for every kind: its name is documented (docs/children.rst).
logger = logging.getLogger("crown_sync.children")

#: Extra time, on top of ``grace``, that ``stop()`` waits after SIGKILL for the reap.
KILL_WAIT = 5.0


# --------------------------------------------------------------------------------------------
# Validation helpers


def _check_grace(grace) -> float:
    if isinstance(grace, bool) or not isinstance(grace, numbers.Real):
        raise TypeError(f"grace must be a number of seconds, not {type(grace).__name__}")
    grace = float(grace)
    if not math.isfinite(grace) or grace < 0:
        raise ValueError(f"grace must be a finite number of seconds >= 0, got {grace!r}")
    return grace


def _check_target(target) -> Callable:
    if not callable(target):
        raise TypeError(f"target must be callable, not {type(target).__name__}")
    return target


def _check_args(args) -> tuple:
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"args must be a tuple, not {type(args).__name__}")
    return tuple(args)


def _check_kwargs(kwargs) -> dict:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a dict or None, not {type(kwargs).__name__}")
    for key in kwargs:
        if not isinstance(key, str):
            raise TypeError(f"kwargs keys must be str, got {key!r}")
    return dict(kwargs)


def _callable_name(target) -> str:
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)


# --------------------------------------------------------------------------------------------
# Child specifications


class Child:
    """Base class of child specifications. ``start()`` returns a :class:`RunningChild`."""

    kind = "child"

    def __init__(self, grace: float = 5.0):
        self.grace = _check_grace(grace)

    def start(self, term, on_exit: Callable[["RunningChild"], None]) -> "RunningChild":
        raise NotImplementedError


class RunningChild:
    """One started child: the engine's handle to it (see the module docstring for guarantees).

    * ``alive()``: False once the child has ended and, for processes, been reaped.
    * ``exitcode``: None while running; 0 for success; 1 if a thread child's target raised; -N
      if a process or command died of signal N (a command is reported by its supervisor); 127
      if a command could not be found, 126 if it could not be executed.
    * ``pid``: the process's pid (a command's supervisor; the command's own is ``command_pid``),
      None for threads.
    * ``extend(deadline)``: move the deadline the child side enforces (``clock.monotonic()``
      value, None for none). Ignored once stopping: a stop's grace never outlives the deadline.
    * ``stop(timeout=None)``: end the term and wait until the child is gone, escalating after
      ``grace`` (or ``timeout`` if smaller). Idempotent; any thread; safe from ``on_exit`` and
      from inside a thread child.
    * ``kill()``: the deadline passed: SIGKILL processes now. Threads can only be told.
    * ``reason``: None, or "stopped"/"killed" once the crown asked the child to end.
    * ``on_exit(running)`` runs once, in a background thread, just after ``exitcode`` is set, so
      ``stop()`` can return while ``on_exit`` is still running: ``on_exit`` must not wait for
      whoever calls ``stop()``.
    """

    kind = "child"

    def __init__(self, child: Child, term, on_exit):
        self.child = child
        self.term = term
        self.grace = child.grace
        self._on_exit = on_exit
        self._exitcode = None
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._stopping = False
        self.reason = None  # why it ended, when the crown asked: "stopped" or "killed"

    # -- the engine's interface --------------------------------------------------------------
    @property
    def exitcode(self) -> Optional[int]:
        return self._exitcode

    @property
    def pid(self) -> Optional[int]:
        return None

    def alive(self) -> bool:
        return not self._finished.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until the child has ended (and been reaped). True if it has."""
        return self._finished.wait(timeout)

    def extend(self, deadline: Optional[float]) -> None:
        """Move the child's deadline (a ``clock.monotonic()`` value; None: no deadline)."""

    def stop(self, timeout: Optional[float] = None) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        """The deadline passed: stop acting now (processes: SIGKILL at once)."""

    # -- helpers -----------------------------------------------------------------------------
    def _begin_stop(self, first_signal: Callable[[], None]) -> None:
        """End the term, mark the child stopping and, on the first call only, send its first
        signal (under the lock: a concurrent stop() neither repeats nor overtakes it)."""
        self.term.end()
        with self._lock:
            first = not self._stopping
            self._stopping = True
            if first:
                self.reason = self.reason or "stopped"
                first_signal()

    def _graceful_wait(self, timeout: Optional[float]) -> float:
        return self.grace if timeout is None else max(0.0, min(self.grace, float(timeout)))

    def _finish(self, exitcode: int) -> None:
        """Record the exit and call on_exit (exactly once: only the reaper/thread calls this)."""
        self._exitcode = exitcode
        self._finished.set()
        if exitcode != 0 and self.reason is None:
            logger.info("%s child of %r exited with code %s", self.kind, self.term.name, exitcode)
        try:
            self._on_exit(self)
        except Exception:
            logger.exception("on_exit callback of %s child of %r failed", self.kind, self.term.name)

    def __repr__(self) -> str:
        state = "alive" if self.alive() else f"exitcode={self.exitcode}"
        pid = f" pid={self.pid}" if self.pid is not None else ""
        return f"<{type(self).__name__} {self.term.name!r}{pid} {state}>"

