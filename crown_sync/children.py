"""Children: the work a crown runs while it holds a term, and how that work is stopped.

Three kinds, all started by the crown's loop thread with ``child.start(term, on_exit)``:

:class:`ThreadChild`
    ``target(term, *args, **kwargs)`` in a daemon thread. Stopping is cooperative: the term's
    ``stop_event`` is set when the term ends and *reads* as set once the deadline has passed, even
    if no crown thread has run since (see :mod:`crown_sync.terms`). A thread cannot be killed:
    if the target ignores the event, ``stop()`` gives up after ``grace``, logs a warning and the
    thread keeps running.
:class:`ProcessChild`
    ``target(term_info, *args, **kwargs)`` in a :mod:`multiprocessing` process. Stopped by
    SIGTERM, then SIGKILL after ``grace``, then reaped.
:class:`CommandChild`
    A command run under a small single-threaded supervisor process (:mod:`crown_sync._supervise`)
    that signals the command's whole process group: SIGTERM, then SIGKILL after ``grace``.

What is guaranteed (Linux):

* **Parent death.** Process and command children never outlive the crown's process, even if it
  is SIGKILLed: each arms the kernel's parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGKILL)``)
  as the first thing it does, then checks that its parent is still the expected process (the
  parent may have died before the signal was armed). The kernel sends that signal when the parent
  *thread* that forked the child exits, which is why the crown always starts children from its
  long-lived loop thread; a caller of ``start()`` must do the same.
* **Deadline.** The term's deadline (a :func:`crown_sync.clock.monotonic` value, moved forward by
  ``extend()``) lives in shared memory that the parent writes and the child side reads, so a
  process or command child stops acting by the deadline even while the crown's process is paused
  (SIGSTOP, swap, a long GC) and cannot tell it to stop. A ProcessChild has a watchdog thread that
  re-reads the deadline (every 50 ms at most, and again just before it falls) and re-arms a POSIX
  timer (``timer_create(CLOCK_MONOTONIC)`` delivering SIGKILL at the absolute deadline), so the
  kernel kills it on time even if the target holds the GIL in a long C call. A CommandChild's
  supervisor, in a session of its own (a stop of the crown's whole process group leaves it
  running), polls the deadline and SIGKILLs the command's process group when it passes, within a
  scheduling delay of it; if the supervisor is stopped itself, its own kernel timer SIGKILLs it at
  the deadline and the command dies with it (parent-death signal).
* **Stop.** ``stop()`` returns once the child is really gone (reaped), after at most ``grace``
  plus a small margin; then SIGKILL. It is idempotent and callable from any thread.
* **on_exit** is called exactly once per started child, from a background thread (a thread
  child's own thread), after the child ended for any reason and its ``exitcode`` is set.

What is NOT guaranteed:

* A thread child that ignores ``term.stop_event`` keeps running after its term (threads cannot be
  killed). Check the event before every action that needs leadership.
* A paused *child* cannot act on anything, and work already under way (a request in flight, a
  write the kernel has queued) can land after the deadline: the **fencing token**
  (``term.token``, strictly rising between terms) is the last line of defence. Pass it to the
  systems you write to and have them reject lower tokens.
* A deadline extension that reaches the child in the last few milliseconds before the old
  deadline may come too late: the child is killed (the safe side).
* Processes that a ProcessChild target starts are not signalled by the crown; processes a command
  starts outside its process group escape the group signals; if the supervisor is SIGKILLed (its
  timer included), the kernel kills the command itself, and the rest of its group is killed
  only when the crown's reaper thread runs (it finds the supervisor dead without a report).
* With ``start_method="forkserver"`` the child's parent is the fork server, so the parent-death
  signal fires when the fork server exits (which it does when the crown's process dies, unless
  some other process still holds its "alive" pipe): weaker than with "fork" or "spawn".
* Timing is bounded by the scheduler: on a badly overloaded host the supervisor may act a few
  milliseconds after the deadline.

Lock descriptors (``term.fds``, e.g. the file oracle's flock) are inherited by process and
command children with every start method, so a lock held by descriptor stays held until the
last child holding it is gone.
"""

import ctypes
import logging
import math
import mmap
import multiprocessing
import multiprocessing.process
import numbers
import os
import select
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Callable, Optional

from .terms import keeping_fds_across_fork

from crown_sync._supervise import KillTimer, set_parent_death_signal
from crown_sync.clock import monotonic

__all__ = [
    "Child",
    "RunningChild",
    "ThreadChild",
    "ProcessChild",
    "CommandChild",
    "as_child",
]

logger = logging.getLogger("crown_sync.children")

#: Extra time, on top of ``grace``, that ``stop()`` waits after SIGKILL for the reap.
KILL_WAIT = 5.0
#: Extra time the parent gives a command's supervisor beyond ``grace`` before SIGKILLing it.
SUPERVISOR_MARGIN = 1.0
#: How often children re-read a deadline that the parent may move (seconds).
DEADLINE_POLL = 0.05

_SUPERVISOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_supervise.py")


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


def _encode_deadline(deadline: Optional[float]) -> float:
    return math.inf if deadline is None else float(deadline)


class _PidHandle:
    """Signals one child process, never a stranger that inherited its pid.

    Where the kernel has pidfds (Linux 5.3+), the pidfd keeps naming that process after it is
    reaped, so a late signal fails instead of reaching a recycled pid. Without them, kill() is
    used until ``close()`` (called right after the reap; a zombie keeps its pid until then).
    """

    def __init__(self, pid: int):
        self.pid = pid
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._fd = None

    def send(self, signum: int) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                if self._fd is not None:
                    signal.pidfd_send_signal(self._fd, signum)
                else:
                    os.kill(self.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def fileno(self) -> Optional[int]:
        """The pidfd (readable once the process has exited), or None."""
        return self._fd

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


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


def _process_main(expected_parent, deadline_value, fds, target, info, args, kwargs):
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
    target(info, *args, **kwargs)


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


# -- threads ---------------------------------------------------------------------------------


class ThreadChild(Child):
    """Run ``target(term, *args, **kwargs)`` in a daemon thread while the term lasts.

    The target must return soon after ``term.stop_event`` is set (``wait()`` on it, or check
    ``is_set()`` before each action): the event is set when the term ends and reads as set once
    the term's deadline has passed. ``stop()`` waits up to ``grace`` seconds for the thread; a
    thread cannot be killed, so one that does not return is logged and left running. An
    exception in the target is logged with its traceback and gives exit code 1.
    """

    kind = "thread"

    def __init__(self, target, args=(), kwargs=None, grace: float = 5.0):
        super().__init__(grace)
        self.target = _check_target(target)
        self.args = _check_args(args)
        self.kwargs = _check_kwargs(kwargs)

    def start(self, term, on_exit) -> "RunningChild":
        running = _RunningThread(self, term, on_exit)
        running._thread.start()
        return running

    def __repr__(self) -> str:
        return f"ThreadChild({_callable_name(self.target)}, grace={self.grace})"


class _RunningThread(RunningChild):
    kind = "thread"

    def __init__(self, child: ThreadChild, term, on_exit):
        super().__init__(child, term, on_exit)
        self._thread = threading.Thread(
            target=self._run, name=f"crown-sync-child:{term.name}", daemon=True
        )

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def _run(self) -> None:
        code = 0
        try:
            self.child.target(self.term, *self.child.args, **self.child.kwargs)
        except SystemExit as exc:
            code = 0 if exc.code in (None, 0) else 1
        except BaseException:
            logger.exception(
                "thread child %s of %r raised", _callable_name(self.child.target), self.term.name
            )
            code = 1
        self._finish(code)

    def stop(self, timeout: Optional[float] = None) -> None:
        """End the term (sets ``stop_event``) and wait up to ``grace`` for the thread.

        If the thread does not return in time, log a warning and return: it keeps running.
        """
        self.term.end()
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self.reason = "stopped"
        if threading.current_thread() is self._thread:
            return  # called from the target (or its on_exit): waiting for ourselves would hang
        if not self._finished.wait(self._graceful_wait(timeout)):
            logger.warning(
                "thread child %s of %r did not return within %.1f s of the end of its term; "
                "a thread cannot be killed, it keeps running (only the fencing token protects "
                "what it does now)",
                _callable_name(self.child.target),
                self.term.name,
                self._graceful_wait(timeout),
            )

    def kill(self) -> None:
        # Nothing more is possible for a thread: its stop_event already reads as set.
        self.term.end()
        self.reason = self.reason or "killed"


# -- processes -------------------------------------------------------------------------------


class ProcessChild(Child):
    """Run ``target(term_info, *args, **kwargs)`` in a separate process while the term lasts.

    ``term_info`` is a picklable :class:`crown_sync.terms.TermInfo` (name, token, identity). At
    the end of the term the process gets SIGTERM (its default action ends it, unless the target
    installs a handler), then SIGKILL after ``grace`` seconds. It is SIGKILLed by a watchdog at
    the term's deadline even if the crown's process is paused, and by the kernel if the crown's
    process dies. SIGINT is ignored in the child (the crown decides when it stops).

    ``start_method`` is a :mod:`multiprocessing` start method. "fork" (the default) runs the
    target in a copy of the crown's process: nothing needs to be picklable, but only the forking
    thread exists in the copy, and Python 3.12+ warns about forking a multi-threaded process.
    "spawn" starts a fresh interpreter: the target and arguments must be picklable (checked at
    construction). The term's lock descriptors reach the child either way. "forkserver" makes the
    parent-death guarantee weaker (see the module docstring).
    """

    kind = "process"

    def __init__(self, target, args=(), kwargs=None, grace: float = 5.0, start_method: str = "fork"):
        super().__init__(grace)
        self.target = _check_target(target)
        self.args = _check_args(args)
        self.kwargs = _check_kwargs(kwargs)
        methods = multiprocessing.get_all_start_methods()
        if not isinstance(start_method, str):
            raise TypeError(f"start_method must be a str, not {type(start_method).__name__}")
        if start_method not in methods:
            raise ValueError(f"start_method must be one of {methods}, got {start_method!r}")
        self.start_method = start_method
        if start_method != "fork":
            from multiprocessing.reduction import ForkingPickler

            try:
                ForkingPickler.dumps((self.target, self.args, self.kwargs))
            except Exception as exc:
                raise TypeError(
                    f"target, args and kwargs must be picklable with start_method="
                    f"{start_method!r}: {exc}"
                ) from None

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
        self.term.end()
        with self._lock:
            first = not self._stopping
            self._stopping = True
            if first:
                self.reason = self.reason or "stopped"
                self._signal(signal.SIGTERM)
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


# -- commands --------------------------------------------------------------------------------


class CommandChild(Child):
    """Run a command (``argv``, no shell) while the term lasts.

    The command runs in its own session, under a single-threaded supervisor process
    (:mod:`crown_sync._supervise`) that holds the term's deadline in shared memory and signals the
    command's whole process group: SIGTERM at the end of the term, SIGKILL after ``grace``, and
    SIGKILL at once when the deadline passes, even while the crown's process is paused. Both die
    with the crown's process (parent-death signal).

    Environment: the crown's ``os.environ``, updated with ``env`` (a value of None removes a
    variable), plus ``CROWN_SYNC_NAME``, ``CROWN_SYNC_TOKEN`` (empty if the term has no token)
    and ``CROWN_SYNC_IDENTITY``. stdin, stdout and stderr are the crown's.

    Exit code: the command's; -N if it died of signal N; 127 if it could not be found, 126 if it
    could not be executed (both logged as errors, with ``argv[0]`` only: arguments may be secret).
    """

    kind = "command"

    def __init__(self, argv, grace: float = 5.0, env=None):
        super().__init__(grace)
        if isinstance(argv, (str, bytes)):
            raise TypeError("argv must be a list of strings (no shell); split a command line with shlex.split()")
        if not isinstance(argv, (list, tuple)):
            raise TypeError(f"argv must be a list of strings, not {type(argv).__name__}")
        if not argv:
            raise ValueError("argv must not be empty")
        for item in argv:
            if not isinstance(item, str):
                raise TypeError(f"argv must contain only str, got {item!r}")
            if "\0" in item:
                raise ValueError("argv items must not contain NUL characters")
        if not argv[0]:
            raise ValueError("argv[0] (the program) must not be empty")
        self.argv = list(argv)
        if env is None:
            self.env = {}
        elif not isinstance(env, Mapping):
            raise TypeError(f"env must be a dict or None, not {type(env).__name__}")
        else:
            for key, value in env.items():
                if not isinstance(key, str) or not key or "=" in key or "\0" in key:
                    raise ValueError(f"env keys must be non-empty str without '=', got {key!r}")
                if value is not None and not isinstance(value, str):
                    raise TypeError(f"env values must be str or None, got {value!r} for {key!r}")
            self.env = dict(env)

    def environment(self, term) -> dict:
        """The command's environment for ``term``."""
        environ = dict(os.environ)
        for key, value in self.env.items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        environ["CROWN_SYNC_NAME"] = term.name
        environ["CROWN_SYNC_TOKEN"] = "" if term.token is None else str(term.token)
        environ["CROWN_SYNC_IDENTITY"] = term.identity
        return environ

    def start(self, term, on_exit) -> "RunningChild":
        import subprocess

        if not sys.executable:
            raise RuntimeError("CommandChild needs sys.executable to run its supervisor")
        deadline = _SharedDeadline(term.deadline)
        status_r, status_w = os.pipe()
        try:
            if os.path.isfile(_SUPERVISOR):
                # -I: the supervisor uses only the standard library; ignore PYTHON* variables
                # meant for the command and do not depend on how crown_sync was found.
                launcher = [sys.executable, "-I", _SUPERVISOR]
            else:  # pragma: no cover - e.g. installed as a zip
                launcher = [sys.executable, "-m", "crown_sync._supervise"]
            fds = tuple(term.fds)
            command = launcher + [
                "--parent", str(os.getpid()),
                "--deadline-fd", str(deadline.fd),
                "--status-fd", str(status_w),
                "--grace", repr(self.grace),
                "--keep-fds", ",".join(str(fd) for fd in fds),
                "--",
            ] + self.argv
            supervisor = subprocess.Popen(
                command,
                env=self.environment(term),
                pass_fds=(deadline.fd, status_w) + fds,
                close_fds=True,
                # Out of the crown's process group: a stop of the whole group (Ctrl-Z, kill -STOP
                # -PGID) must leave the supervisor enforcing the deadline.
                start_new_session=True,
            )
        except BaseException:
            os.close(status_r)
            deadline.close()
            raise
        finally:
            os.close(status_w)
            deadline.close_fd()
        running = _RunningCommand(self, term, on_exit, supervisor, deadline, status_r)
        running._reaper.start()
        return running

    def __repr__(self) -> str:
        return f"CommandChild([{self.argv[0]!r}, ...], grace={self.grace})"


class _SharedDeadline:
    """8 bytes of shared memory (memfd) holding a ``clock.monotonic()`` deadline; inf = none.

    Written by the crown (one aligned 8-byte store: never torn), read by the supervisor.
    """

    def __init__(self, deadline: Optional[float]):
        try:
            fd = os.memfd_create("crown-sync-deadline", os.MFD_CLOEXEC)
        except (AttributeError, OSError):
            with tempfile.TemporaryFile() as handle:  # unlinked file: same effect
                fd = os.dup(handle.fileno())
        self.fd = fd
        self._lock = threading.Lock()
        try:
            os.ftruncate(fd, 8)
            self._map = mmap.mmap(fd, 8)
        except BaseException:
            os.close(fd)
            raise
        self._value = ctypes.c_double.from_buffer(self._map)
        self.set(deadline)

    def set(self, deadline: Optional[float]) -> None:
        with self._lock:
            if self._value is not None:
                self._value.value = _encode_deadline(deadline)

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self.close_fd()
        with self._lock:
            if self._value is not None:
                self._value = None  # release the buffer export before unmapping
                self._map.close()


class _RunningCommand(RunningChild):
    kind = "command"

    def __init__(self, child: CommandChild, term, on_exit, supervisor, deadline, status_fd):
        super().__init__(child, term, on_exit)
        self.supervisor = supervisor
        self._handle = _PidHandle(supervisor.pid)
        self._deadline = deadline
        self._status_fd = status_fd
        self._buffer = b""
        self.command_pid = None  # the command's pid (and process group), once it runs
        self.error = None  # why the command could not be started, if it could not
        self._reported = None  # (code, reason) from the supervisor's "exit" line
        self._reaper = threading.Thread(
            target=self._reap, name=f"crown-sync-reaper:{term.name}", daemon=True
        )

    @property
    def pid(self) -> Optional[int]:
        """The supervisor's pid (the command's is ``command_pid``)."""
        return self.supervisor.pid

    # -- reading the supervisor's status lines -----------------------------------------------
    def _consume(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            words = line.decode("utf-8", "replace").split(" ", 2)
            try:
                if words[0] == "pid":
                    self.command_pid = int(words[1])
                elif words[0] == "exit":
                    self._reported = (int(words[1]), words[2] if len(words) > 2 else "")
                elif words[0] == "error":
                    self.error = words[2] if len(words) > 2 else "error"
                    self._reported = (int(words[1]), "error")
            except (IndexError, ValueError):
                logger.warning("unexpected line from the supervisor of %r: %r", self.term.name, line)

    def _drain(self) -> bool:
        """Read what is available; False at end of file."""
        while True:
            try:
                data = os.read(self._status_fd, 4096)
            except BlockingIOError:
                return True
            except InterruptedError:  # pragma: no cover
                continue
            if not data:
                return False
            self._consume(data)

    def _reap(self) -> None:
        os.set_blocking(self._status_fd, False)
        # Wait for the supervisor's exit itself (its pidfd turns readable), not for end of file
        # on the status pipe: a process forked meanwhile by another thread may hold the pipe's
        # write end. Without pidfds, poll.
        exited = self._handle.fileno()
        # poll(), not select(): select() refuses descriptors above 1023 (a process with many crowns)
        poller = select.poll()
        for fd in [self._status_fd] + ([exited] if exited is not None else []):
            poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
        open_pipe = True
        while True:
            readable = {fd for fd, _ in poller.poll(None if exited is not None else 100)}
            if self._status_fd in readable:
                open_pipe = self._drain()
                if not open_pipe:
                    poller.unregister(self._status_fd)
            if (exited is not None and exited in readable) or self.supervisor.poll() is not None:
                break
        returncode = self.supervisor.wait()
        self._handle.close()
        if open_pipe:
            self._drain()
        os.close(self._status_fd)
        self._deadline.close()
        if self.error is not None:
            logger.error("command child of %r could not start: %s", self.term.name, self.error)
        if self._reported is not None:
            code = self._reported[0]
        else:
            # The supervisor died without reporting (SIGKILLed by someone or by its own timer
            # while stopped, or crashed): the command died with it, by its parent-death signal,
            # but not what it started in its group. Do what the supervisor could not.
            self._kill_command_group()
            code = returncode
            if returncode >= 0 or self.reason is None:
                logger.warning(
                    "supervisor of command child of %r ended with %s without reporting",
                    self.term.name,
                    returncode,
                )
        self._finish(code)

    # -- control -----------------------------------------------------------------------------
    def extend(self, deadline: Optional[float]) -> None:
        # Once stopping, the deadline only bounds the grace: never move it again.
        if not self._stopping and self.reason is None:
            self._deadline.set(deadline)

    def _kill_command_group(self) -> None:
        # pgid = command_pid. Linux hands out no pid that is still some group's id, so while any
        # member lives the number is theirs; once none does, killpg finds no one.
        if self.command_pid is not None:
            try:
                os.killpg(self.command_pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _kill_everything(self) -> None:
        if not self._finished.is_set():
            self._kill_command_group()
        self._handle.send(signal.SIGKILL)

    def stop(self, timeout: Optional[float] = None) -> None:
        """SIGTERM the supervisor (which stops the group with the same grace), wait up to
        ``grace`` + 1 s, then SIGKILL the command's group and the supervisor. Idempotent."""
        self.term.end()
        with self._lock:
            first = not self._stopping
            self._stopping = True
            if first:
                self.reason = self.reason or "stopped"
                self._handle.send(signal.SIGTERM)
        wait = self.grace + SUPERVISOR_MARGIN
        if timeout is not None:
            wait = max(0.0, min(wait, float(timeout)))
        if self._finished.wait(wait):
            return
        logger.warning(
            "command child of %r did not stop within %.1f s; sending SIGKILL", self.term.name, wait
        )
        self._kill_everything()
        if not self._finished.wait(KILL_WAIT):
            logger.error("command child of %r survives SIGKILL (uninterruptible?)", self.term.name)

    def kill(self) -> None:
        """SIGKILL the command's group and the supervisor at once."""
        self.term.end()
        with self._lock:
            self.reason = self.reason or "killed"
            self._deadline.set(-math.inf)
        self._kill_everything()


# --------------------------------------------------------------------------------------------


def _callable_name(target) -> str:
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)


def as_child(spec, argument: str = "child") -> Optional[Child]:
    """Turn the ``child=`` argument of a crown into a :class:`Child` (or None).

    None stays None, a :class:`Child` is returned as is, a plain callable becomes
    ``ThreadChild(callable)``; anything else is a TypeError naming ``argument``.
    """
    if spec is None:
        return None
    if isinstance(spec, Child):
        return spec
    if isinstance(spec, type) and issubclass(spec, Child):
        raise TypeError(f"{argument} must be a Child instance, not the class {spec.__name__}")
    if callable(spec):
        return ThreadChild(spec)
    raise TypeError(
        f"{argument} must be None, a callable taking the term, or a ThreadChild/ProcessChild/"
        f"CommandChild, not {type(spec).__name__}"
    )
