"""Command children: a program run under the single-threaded supervisor of
:mod:`crown_sync._supervise`, which signals the command's whole process group."""

import contextlib
import math
import os
import select
import signal
import sys
import threading
from collections.abc import Mapping
from typing import Optional

from .. import _forksafe
from ._kernel import _PidHandle, _SharedDeadline
from .base import KILL_WAIT, Child, RunningChild, logger

#: Extra time the parent gives a command's supervisor beyond ``grace`` before SIGKILLing it.
SUPERVISOR_MARGIN = 1.0

# The supervisor's script, run by path (see CommandChild.start): one directory up, in crown_sync/.
_SUPERVISOR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_supervise.py")


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
        if os.path.isfile(_SUPERVISOR):
            # -I: the supervisor uses only the standard library; ignore PYTHON* variables
            # meant for the command and do not depend on how crown_sync was found.
            launcher = [sys.executable, "-I", _SUPERVISOR]
        else:  # pragma: no cover - e.g. installed as a zip
            launcher = [sys.executable, "-m", "crown_sync._supervise"]
        # No fork() by another thread while our pipes' write ends are open here (a Gunicorn master
        # forking workers as its crown starts the job): a worker would keep a copy of Popen's
        # exec-status pipe, and Popen would wait for that worker's exit (seen: a crown stuck in
        # start() for minutes). Popen's own fork runs no at-fork handlers (no preexec_fn); gevent's
        # forks with os.fork(), which would wait for our own hold: none then (no threads there).
        gevent = subprocess.Popen.__module__.startswith("gevent")
        with contextlib.nullcontext() if gevent else _forksafe.opening():
            deadline = _SharedDeadline(term.deadline)
            try:
                status_r, status_w = os.pipe()
            except BaseException:
                deadline.close()
                raise
            try:
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
                    # Out of the crown's process group: a stop of the whole group (Ctrl-Z, kill
                    # -STOP -PGID) must leave the supervisor enforcing the deadline.
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
        self._begin_stop(lambda: self._handle.send(signal.SIGTERM))
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

