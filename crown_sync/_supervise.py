"""The supervisor process that stands between a crown and a CommandChild's command.

Run by :class:`crown_sync.children.CommandChild` as ``python -I .../_supervise.py OPTIONS -- ARGV``
(``python -m crown_sync._supervise`` works too). It imports only the standard library, so that
it starts fast and does not depend on how the crown's process found ``crown_sync``.

Why a supervisor at all: the crown's process is multi-threaded, where ``preexec_fn`` is unsafe,
and it may be paused (SIGSTOP, swap) exactly when a command must be stopped. This process is
single-threaded and does nothing but watch, so it can:

1. arm the kernel's parent-death signal (``PR_SET_PDEATHSIG``) on itself and, through
   ``preexec_fn``, on the command (SIGKILL), then check that its parent is still the crown's
   process (the crown may have died before the signal was armed). Its own is SIGKILL until its
   handlers are in place, then SIGUSR1, so that the crown's death lets it SIGKILL the command's
   whole process group rather than die first and leave all but the command running;
2. start the command in a new session (its own process group, so the whole group can be
   signalled and a terminal's Ctrl-C reaches the crown, not the command);
3. loop: when the command exits, exit with its code; when the deadline in the shared memory
   (written by the crown, a ``crown_sync.clock.monotonic()`` value, ``inf`` = none) has passed,
   SIGKILL the command's process group at once, even if the crown itself is paused; on SIGTERM
   from the crown, SIGTERM the group, wait ``grace`` (still watching the deadline), then SIGKILL
   the group.

The crown starts this process in a session of its own, so that stopping the crown's whole process
group (Ctrl-Z, ``kill -STOP -PGID``, a frozen job) leaves the supervisor running and enforcing the
deadline. If the supervisor itself is stopped, a kernel timer (:class:`KillTimer`, re-armed
whenever the deadline moves) SIGKILLs it at the deadline, and the command dies with it by its
parent-death signal.

It reports to the crown on the status descriptor, one line per fact: ``pid N`` once the command
runs, ``exit CODE REASON`` at the end (CODE is the command's return code, negative for a signal),
``error CODE MESSAGE`` if the command could not be started (127: not found, 126: not executable).
Its own exit status is the command's code, or 128+N if the command died of signal N.

Not guaranteed: a process the command starts in another session or process group escapes the
group signals; if the supervisor itself is SIGKILLed (by someone, or by its timer while it was
stopped), the kernel kills only the command (by its parent-death signal), and the rest of its
group lives until the crown's reaper finds this process dead without a report and kills it.
"""

import argparse
import ctypes
import math
import mmap
import os
import select
import signal
import subprocess
import sys
import time
from typing import Optional, Tuple

__all__ = ["set_parent_death_signal", "KillTimer", "CLOCK_ID", "monotonic", "main"]

_PR_SET_PDEATHSIG = 1

# The clock of every deadline (see crown_sync.clock): CLOCK_BOOTTIME counts the time the host spent
# suspended, as the lease on the oracle's server (another host) does; CLOCK_MONOTONIC stops then.
CLOCK_ID = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def monotonic() -> float:
    """Seconds on the deadline clock (CLOCK_BOOTTIME where the system has it)."""
    return time.clock_gettime(CLOCK_ID)

#: The supervisor's parent-death signal once it can act on it (SIGKILL before that).
PARENT_DIED = signal.SIGUSR1
#: How long before the deadline a running supervisor SIGKILLs the command's group (seconds).
KILL_AHEAD = 0.05

# Resolve prctl when this module is imported (in the crown's process, before any fork): calling
# dlopen/dlsym in a child forked from a multi-threaded parent could deadlock on the loader lock.
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _prctl = _libc.prctl
    _prctl.restype = ctypes.c_int
    _prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
except (OSError, AttributeError):  # not Linux/glibc: no parent-death signal
    _libc = None
    _prctl = None


def set_parent_death_signal(signum: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent thread exits.

    Returns False where prctl is unavailable. Note the kernel's rule: the signal fires when the
    *thread* that forked this process exits, not only when the whole parent process dies.
    """
    if _prctl is None:
        return False
    return _prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0


# -- the kernel timer a process child or a supervisor arms on itself ---------------------------

_SIGEV_SIGNAL = 0
_TIMER_ABSTIME = 1


class _Sigevent(ctypes.Structure):
    # glibc's struct sigevent: sigval, signo, notify, then a union padding it to 64 bytes.
    _fields_ = [
        ("sigev_value", ctypes.c_void_p),
        ("sigev_signo", ctypes.c_int),
        ("sigev_notify", ctypes.c_int),
        ("_pad", ctypes.c_int * 16),
    ]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _load_timer_functions():
    # Resolved at import, in the parent: dlopen/dlsym in a child forked from a multi-threaded
    # parent could deadlock on the dynamic loader's lock.
    for name in (None, "librt.so.1"):
        try:
            lib = ctypes.CDLL(name, use_errno=True)
            create, settime = lib.timer_create, lib.timer_settime
        except (OSError, AttributeError):
            continue
        create.restype = settime.restype = ctypes.c_int
        create.argtypes = [ctypes.c_int, ctypes.POINTER(_Sigevent), ctypes.POINTER(ctypes.c_void_p)]
        settime.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.POINTER(_Itimerspec),
            ctypes.POINTER(_Itimerspec),
        ]
        return create, settime
    return None, None


_timer_create, _timer_settime = _load_timer_functions()


class KillTimer:
    """A POSIX timer on the deadline clock that SIGKILLs this process at an absolute time.

    The kernel delivers it however busy the process is (a C call holding the GIL included), and
    also while the process is stopped (SIGSTOP, Ctrl-Z): SIGKILL is the one signal a stopped
    process cannot hold back.
    """

    def __init__(self, timer_id: ctypes.c_void_p):
        self._id = timer_id
        self.armed = None

    @classmethod
    def create(cls) -> "Optional[KillTimer]":
        if _timer_create is None:
            return None
        event = _Sigevent()
        event.sigev_notify = _SIGEV_SIGNAL
        event.sigev_signo = signal.SIGKILL
        timer_id = ctypes.c_void_p()
        if _timer_create(CLOCK_ID, ctypes.byref(event), ctypes.byref(timer_id)) != 0:
            return None
        return cls(timer_id)

    def arm(self, deadline: float) -> None:
        spec = _Itimerspec()  # all zero: disarm
        # A deadline beyond ~30 years would not fit the kernel's fields; the caller's loop
        # watches it.
        if math.isfinite(deadline) and 0 < deadline < 1e9:
            seconds = int(deadline)
            spec.it_value.tv_sec = seconds
            spec.it_value.tv_nsec = max(1, min(999_999_999, int((deadline - seconds) * 1e9)))
        _timer_settime(self._id, _TIMER_ABSTIME, ctypes.byref(spec), None)
        self.armed = deadline


def _exit_status(returncode: int) -> int:
    """The shell's convention: a command killed by signal N "exits" with 128+N."""
    return 128 - returncode if returncode < 0 else returncode & 0xFF


class _Supervisor:
    def __init__(self, options):
        self.options = options
        self.grace = options.grace
        self.parent = options.parent
        self.keep_fds = tuple(int(fd) for fd in options.keep_fds.split(",") if fd)
        self.status_fd = options.status_fd
        self._map = mmap.mmap(options.deadline_fd, 8)
        os.close(options.deadline_fd)
        # An aligned 8-byte load: the crown's writes are single aligned 8-byte stores, never torn.
        self._deadline = ctypes.c_double.from_buffer(self._map)
        self.terminating = False
        self.proc = None
        # SIGKILLs this process at the deadline even while it is stopped; the command then dies by
        # its parent-death signal. None where the C library has no POSIX timers.
        self.timer = KillTimer.create()

    # -- reporting ---------------------------------------------------------------------------
    def report(self, line: str) -> None:
        try:
            os.write(self.status_fd, (line + "\n").encode("utf-8", "replace"))
        except OSError:  # the crown is gone; nobody to tell
            pass

    # -- time --------------------------------------------------------------------------------
    def deadline(self) -> float:
        """The deadline as the crown last wrote it; the kernel timer is re-armed to follow it."""
        value = self._deadline.value
        deadline = math.inf if math.isnan(value) else value
        # A deadline already due is ours to act on (kill the group, report), not the timer's.
        if self.timer is not None and self.timer.armed != deadline and deadline > monotonic():
            self.timer.arm(deadline)
        return deadline

    def due(self, deadline: float, now: float) -> bool:
        # KILL_AHEAD early, so that a supervisor that is running acts (the whole group, then a
        # report) before its own timer fires (then only the command dies, by its parent-death
        # signal), with room for a busy host's scheduling delay. Early is the safe side.
        return now >= deadline - KILL_AHEAD

    def parent_gone(self) -> bool:
        return os.getppid() != self.parent

    # -- the command's process group ---------------------------------------------------------
    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def wait_readable(self, wakeup_fd: int, timeout: float) -> None:
        poller = select.poll()  # not select(): it refuses descriptors above 1023
        poller.register(wakeup_fd, select.POLLIN)
        try:
            readable = poller.poll(max(0, math.ceil(timeout * 1000)))
        except InterruptedError:  # pragma: no cover - PEP 475 retries poll
            return
        if readable:
            try:
                while os.read(wakeup_fd, 512):
                    pass
            except (BlockingIOError, InterruptedError):
                pass

    # -- main loop ---------------------------------------------------------------------------
    def run(self, argv) -> int:
        wakeup_r = self.install_signals()
        if self.due(self.deadline(), monotonic()) or self.terminating or self.parent_gone():
            # The term ended (or the crown died) before the command could start: never start it.
            reason = "deadline" if not self.terminating else "stopped"
            self.report(f"exit {-signal.SIGKILL} {reason}-before-start")
            return _exit_status(-signal.SIGKILL)
        failed = self.start(argv)
        if failed is not None:
            return failed
        self.report(f"pid {self.proc.pid}")
        code, reason = self.watch(wakeup_r)
        self.sweep_group(wakeup_r)
        if self.timer is not None:
            self.timer.arm(math.inf)  # the group is gone: let the report out, whatever the hour
        self.report(f"exit {code} {reason}")
        return _exit_status(code)

    def install_signals(self) -> int:
        """Signal handlers that only wake the loop (through the returned descriptor)."""
        wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(wakeup_r, False)
        os.set_blocking(wakeup_w, False)
        signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)

        def on_term(signum, frame):
            self.terminating = True

        signal.signal(signal.SIGTERM, on_term)
        # A handler (not SIG_IGN) so that exec resets it to the default for the command: an
        # ignored disposition would be inherited. Ctrl-C is the crown's business, not ours.
        signal.signal(signal.SIGINT, lambda signum, frame: None)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes select via the fd
        # From now on the crown's death only wakes the loop, which finds the parent gone and
        # SIGKILLs the command's whole group; the kernel's SIGKILL of this process would take only
        # the command (by its own parent-death signal) and leave the rest of its group, e.g.
        # workers it started, running. Not SIGTERM: the signal also comes when the thread that
        # started us exits while the crown's process lives on (as it does in a process being
        # killed), and must not read as "stop gracefully".
        signal.signal(PARENT_DIED, lambda signum, frame: None)
        set_parent_death_signal(PARENT_DIED)
        return wakeup_r

    def start(self, argv) -> Optional[int]:
        """Start the command in a session of its own; an exit status if it could not start."""
        me = os.getpid()

        def preexec():
            # Runs in the command's process between fork and exec (safe: we are single-threaded).
            set_parent_death_signal(signal.SIGKILL)
            if os.getppid() != me:
                os._exit(1)

        try:
            self.proc = subprocess.Popen(
                argv, preexec_fn=preexec, start_new_session=True, pass_fds=self.keep_fds
            )
        except (FileNotFoundError, NotADirectoryError) as exc:
            self.report(f"error 127 command not found: {argv[0]!r} ({exc.strerror or exc})")
            return 127
        except PermissionError as exc:
            self.report(f"error 126 command not executable: {argv[0]!r} ({exc.strerror or exc})")
            return 126
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            self.report(f"error 126 cannot start {argv[0]!r}: {exc}")
            return 126
        return None

    def watch(self, wakeup_r: int) -> Tuple[int, str]:
        """Until the command exits, is stopped, passes its deadline or loses its crown."""
        reason = "exited"
        while True:
            code = self.proc.poll()
            if code is not None:
                break
            now = monotonic()
            deadline = self.deadline()
            if self.due(deadline, now) or self.parent_gone():
                reason = "deadline" if self.due(deadline, now) else "orphaned"
                self.signal_group(signal.SIGKILL)
                code = self.proc.wait()
                break
            if self.terminating:
                reason = "stopped"
                code = self.terminate(wakeup_r)
                break
            # Poll the deadline at least every 50 ms: the crown may move it either way.
            self.wait_readable(wakeup_r, min(deadline - KILL_AHEAD - now, 0.05))
        return code, reason

    def terminate(self, wakeup_r: int) -> int:
        """SIGTERM the group, wait up to grace (watching the deadline), then SIGKILL it."""
        self.signal_group(signal.SIGTERM)
        give_up = monotonic() + self.grace
        while True:
            code = self.proc.poll()
            if code is not None:
                return code
            now = monotonic()
            deadline = self.deadline()
            if now >= give_up or self.due(deadline, now) or self.parent_gone():
                self.signal_group(signal.SIGKILL)
                return self.proc.wait()
            self.wait_readable(wakeup_r, min(give_up - now, deadline - KILL_AHEAD - now, 0.05))

    def sweep_group(self, wakeup_r: int) -> None:
        """The command is gone; stop what it left behind in its process group (same order)."""
        if self.proc is None or not self.group_alive():
            return
        self.signal_group(signal.SIGTERM)
        give_up = min(monotonic() + self.grace, self.deadline() - KILL_AHEAD)
        while self.group_alive() and monotonic() < give_up and not self.parent_gone():
            self.wait_readable(wakeup_r, min(give_up - monotonic(), 0.05))
        self.signal_group(signal.SIGKILL)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m crown_sync._supervise")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--deadline-fd", type=int, required=True)
    parser.add_argument("--status-fd", type=int, required=True)
    parser.add_argument("--grace", type=float, required=True)
    parser.add_argument("--keep-fds", default="")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    command = options.command
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error("no command given")
    return options, command


def main(argv=None) -> int:
    # First thing: die with the crown's process, then check it did not die before we got here.
    set_parent_death_signal(signal.SIGKILL)
    options, command = _parse(sys.argv[1:] if argv is None else argv)
    if os.getppid() != options.parent:
        return 1
    supervisor = _Supervisor(options)
    try:
        return supervisor.run(command)
    except BaseException as exc:  # never leave the command behind on a bug here
        if supervisor.proc is not None:
            supervisor.signal_group(signal.SIGKILL)
        if not isinstance(exc, SystemExit):
            supervisor.report(f"error 1 supervisor failed: {exc!r}")
        raise


if __name__ == "__main__":
    sys.exit(main())
