"""Process children: ``target(term_info, ...)`` in a :mod:`multiprocessing` process that keeps
the term's deadline with its own watchdog thread and kernel timer."""

import math
import multiprocessing
import multiprocessing.process
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

from crown_sync import registry
from crown_sync._supervise import KillTimer, set_parent_death_signal
from crown_sync.clock import monotonic
from crown_sync.terms import keeping_fds_across_fork

from ._kernel import _encode_deadline, _PidHandle
from .base import (KILL_WAIT, Child, RunningChild, _callable_name, _check_args, _check_kwargs,
                   _check_target, logger)

#: How often children re-read a deadline that the parent may move (seconds).
DEADLINE_POLL = 0.05
#: ProcessChild's start method when none is given. A crown's process always has threads, and
#: Python 3.12+ deprecates fork() there (it warns; a lock that another thread held at the fork
#: stays held in the child), so there a child is a fresh interpreter: "spawn", whose parent is
#: still the crown's process (the parent-death signal holds, unlike with "forkserver"). Before
#: 3.12, "fork" as ever: no pickling and no second import of the main module, which existing
#: programs may not be ready for.
DEFAULT_START_METHOD = "spawn" if sys.version_info >= (3, 12) else "fork"


def _check_start_method(start_method: Optional[str]) -> str:
    if start_method is None:
        return DEFAULT_START_METHOD
    methods = multiprocessing.get_all_start_methods()
    if not isinstance(start_method, str):
        raise TypeError(f"start_method must be a str or None, not {type(start_method).__name__}")
    if start_method not in methods:
        raise ValueError(f"start_method must be one of {methods} or None, got {start_method!r}")
    return start_method


def _check_picklable(target, args, kwargs, start_method: str, by_default: bool) -> None:
    from multiprocessing.reduction import ForkingPickler

    try:
        ForkingPickler.dumps((target, args, kwargs))
    except Exception as exc:
        default = " (the default on this Python)" if by_default else ""
        raise TypeError(
            f"target, args and kwargs must be picklable with start_method={start_method!r}{default}: "
            f"{exc}; define the target at module level, or pass start_method='fork'"
        ) from None


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    os._exit(137)  # not reached


def _watch_deadline(read_deadline: Callable[[], float], parent: int, timer) -> None:
    """The ProcessChild's watchdog loop: kill this process at the deadline or when orphaned."""
    while True:
        deadline = read_deadline()
        now = monotonic()
        if now >= deadline or os.getppid() != parent:
            _die()
        if timer is not None and timer.armed != deadline:
            timer.arm(deadline)
        remaining = deadline - now
        # Wake a little before the deadline to pick up a late extension before the timer fires.
        pause = min(remaining - 0.005, DEADLINE_POLL) if remaining > 0.01 else remaining
        time.sleep(pause)


class _InheritedFds:
    """The term's lock descriptors, passed to a ProcessChild under every start method.

    With "fork" they are simply inherited. With "spawn"/"forkserver", pickling happens while
    multiprocessing is spawning, and ``reduction.DupFd`` hands the descriptors to the new process.
    """

    def __init__(self, fds):
        self.fds = tuple(fds)

    def __reduce__(self):
        from multiprocessing import reduction

        return (_rebuild_fds, (tuple(reduction.DupFd(fd) for fd in self.fds),))


def _rebuild_fds(dups) -> _InheritedFds:
    return _InheritedFds(dup.detach() for dup in dups)


class _TermLeads:
    """A leadership provider for a leader's ProcessChild: ``crown_sync.is_leader(name)`` there is
    True until the term's deadline (a spawned child has no crown; a forked one's copy never leads)."""

    def __init__(self, name: str, read_deadline: Callable[[], float]):
        self.name = name
        self.read_deadline = read_deadline

    def __call__(self, name: str) -> bool:
        return name == self.name and monotonic() < self.read_deadline()


def _process_main(expected_parent, deadline_value, fds, target, info, leading, args, kwargs):
    """Runs first in a ProcessChild: parent-death signal, parent check, watchdog, target."""
    set_parent_death_signal(signal.SIGKILL)
    parent = os.getppid()
    if expected_parent is not None and parent != expected_parent:
        os._exit(1)  # the crown's process died before the parent-death signal was armed
    _process_main.fds = fds  # keep the lock descriptors referenced for the child's lifetime
    # A forked child inherits the crown's Python signal handlers: make SIGTERM stop it (unless
    # the target installs its own), and leave Ctrl-C to the crown, which will stop us.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def read_deadline():
        return deadline_value.value

    if monotonic() >= read_deadline():
        _die()  # the term was over before the target could run: never run it
    timer = KillTimer.create()
    if timer is not None:
        timer.arm(read_deadline())
    watchdog = threading.Thread(
        target=_watch_deadline,
        args=(read_deadline, parent, timer),
        name="crown-sync-deadline-watchdog",
        daemon=True,
    )
    watchdog.start()
    if leading:
        registry.add_provider(_TermLeads(info.name, read_deadline))
    target(info, *args, **kwargs)


class ProcessChild(Child):
    """Run ``target(term_info, *args, **kwargs)`` in a separate process while the term lasts.

    ``term_info`` is a picklable :class:`crown_sync.terms.TermInfo` (name, token, identity). At
    the end of the term the process gets SIGTERM (its default action ends it, unless the target
    installs a handler), then SIGKILL after ``grace`` seconds. It is SIGKILLed by a watchdog at
    the term's deadline even if the crown's process is paused, and by the kernel if the crown's
    process dies. SIGINT is ignored in the child (the crown decides when it stops).

    ``start_method`` is a :mod:`multiprocessing` start method; None (the default) is "spawn" on
    Python 3.12+ and "fork" before. "fork" runs the target in a copy of the crown's process:
    nothing needs to be picklable, but only the forking thread exists in the copy, and Python
    3.12+ warns about forking a multi-threaded process (a crown's always is). "spawn" starts a
    fresh interpreter, which imports the main module again (as ``__mp_main__``): the target and
    arguments must be picklable (checked at construction) and the crown must be started under
    ``if __name__ == "__main__":``. The term's lock descriptors reach the child either way.
    "forkserver" makes the parent-death guarantee weaker (see the module docstring). The
    ``start_method`` attribute holds the method in use.
    """

    kind = "process"

    def __init__(self, target, args=(), kwargs=None, grace: float = 5.0,
                 start_method: Optional[str] = None):
        super().__init__(grace)
        self.target = _check_target(target)
        self.args = _check_args(args)
        self.kwargs = _check_kwargs(kwargs)
        self.start_method = _check_start_method(start_method)
        if self.start_method != "fork":
            _check_picklable(self.target, self.args, self.kwargs, self.start_method, start_method is None)

    def start(self, term, on_exit) -> "RunningChild":
        context = multiprocessing.get_context(self.start_method)
        deadline = context.RawValue("d", _encode_deadline(term.deadline))
        # With forkserver the child's parent is the fork server, not us: it checks against
        # whatever parent it finds (see the module docstring).
        expected_parent = None if self.start_method == "forkserver" else os.getpid()
        process = context.Process(
            target=_process_main,
            name=f"crown-sync-child:{term.name}",
            args=(
                expected_parent,
                deadline,
                _InheritedFds(term.fds),
                self.target,
                term.info(),
                term.leading,
                self.args,
                self.kwargs,
            ),
            daemon=False,  # daemonic processes may not start their own children
        )
        # Oracles close inherited lock descriptors in forked processes; this one must keep the
        # term's, so that the lock is not free while the child still runs.
        with keeping_fds_across_fork(term.fds):
            process.start()
        # We reap it ourselves, in one thread: keep multiprocessing's bookkeeping (which polls
        # and reaps from whatever thread next starts a process, and joins at exit) away from it.
        multiprocessing.process._children.discard(process)
        running = _RunningProcess(self, term, on_exit, process, deadline, _PidHandle(process.pid))
        running._reaper.start()
        return running

    def __repr__(self) -> str:
        return (
            f"ProcessChild({_callable_name(self.target)}, grace={self.grace}, "
            f"start_method={self.start_method!r})"
        )


class _RunningProcess(RunningChild):
    kind = "process"

    def __init__(self, child: ProcessChild, term, on_exit, process, deadline_value, handle):
        super().__init__(child, term, on_exit)
        self.process = process
        self._handle = handle
        self._deadline = deadline_value
        self._pid = process.pid
        self._reaper = threading.Thread(
            target=self._reap, name=f"crown-sync-reaper:{term.name}", daemon=True
        )

    @property
    def pid(self) -> Optional[int]:
        return self._pid

    def _reap(self) -> None:
        self.process.join()  # a blocking waitpid: nobody else reaps this process
        code = self.process.exitcode
        self._handle.close()
        try:
            self.process.close()  # release multiprocessing's descriptors now, not at GC
        except ValueError:  # pragma: no cover
            pass
        if code is None:
            logger.warning("exit status of process child %s was collected elsewhere", self._pid)
            code = 255
        self._finish(code)

    def _signal(self, signum: int) -> None:
        self._handle.send(signum)

    def extend(self, deadline: Optional[float]) -> None:
        # Once stopping, the deadline only bounds the grace: never move it again.
        if not self._stopping and self.reason is None:
            self._deadline.value = _encode_deadline(deadline)

    def stop(self, timeout: Optional[float] = None) -> None:
        """SIGTERM, wait up to ``grace``, SIGKILL, wait for the reap. Idempotent."""
        self._begin_stop(lambda: self._signal(signal.SIGTERM))
        if self._finished.wait(self._graceful_wait(timeout)):
            return
        logger.warning(
            "process child %s of %r did not exit within %.1f s of SIGTERM; sending SIGKILL",
            self._pid,
            self.term.name,
            self._graceful_wait(timeout),
        )
        self._signal(signal.SIGKILL)
        if not self._finished.wait(KILL_WAIT):
            logger.error("process child %s of %r survives SIGKILL (uninterruptible?)", self._pid, self.term.name)

    def kill(self) -> None:
        """SIGKILL at once (its own watchdog does the same at the deadline)."""
        self.term.end()
        with self._lock:
            self.reason = self.reason or "killed"
            self._deadline.value = -math.inf
        self._signal(signal.SIGKILL)
