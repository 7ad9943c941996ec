"""Crown-side kernel handles of a child process: a pidfd to signal it, a shared deadline.

(The child side's own kernel timer and parent-death signal are in :mod:`crown_sync._supervise`,
which the command's supervisor runs with the standard library only.)
"""

import ctypes
import math
import mmap
import os
import signal
import tempfile
import threading
from typing import Optional


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

