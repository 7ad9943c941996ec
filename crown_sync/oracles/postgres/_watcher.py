"""The leader's socket watcher: between our statements, a thread polls the session's socket and
wakes the engine when the idle server sends something unasked (see *Lost lock without notice* in
the package docstring)."""

import os
import select
import socket
import threading
import time
from typing import TYPE_CHECKING, Optional

import psycopg

from ._common import _readable, logger

if TYPE_CHECKING:  # pragma: no cover
    from ._contender import PostgresContender


class SocketWatcher:
    """One contender's watcher thread. Each term's watch has a generation: bumping it makes the
    running watch inert (it returns at its next wake-up, or at once through the wake pipe)."""

    def __init__(self, contender: "PostgresContender"):
        self.contender = contender
        self.thread: Optional[threading.Thread] = None
        self.generation = 0
        self._wake_r, self._wake_w = -1, -1

    def begin(self) -> int:
        """A new watch generation (the previous watcher goes inert); the caller sets ``thread``."""
        if self._wake_r < 0:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
        self.generation += 1
        return self.generation

    def start(self, conn: Optional[psycopg.Connection]) -> None:
        if conn is None:
            return
        thread = threading.Thread(
            target=self.watch, args=(conn, self.begin()),
            name=f"crown-sync-pg-watch:{self.contender.name}", daemon=True,
        )
        self.thread = thread
        thread.start()

    def stop(self) -> None:
        self.generation += 1
        thread, self.thread = self.thread, None
        if thread is not None and self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
            if thread is not threading.current_thread():
                thread.join(2.0)
        if self._wake_r >= 0:
            try:
                while os.read(self._wake_r, 64):
                    pass
            except OSError:
                pass

    def close(self) -> None:
        """Close the wake pipe (after stop())."""
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = -1

    def watch(self, conn: psycopg.Connection, generation: int) -> None:
        """Wake the engine when the idle server sends something unasked: a goodbye (FATAL, EOF)
        ends the term at once; a dismissal asks for a refresh; other notifications are read."""
        contender = self.contender
        try:
            fd = conn.pgconn.socket
        except Exception:
            return
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP)
        poller.register(self._wake_r, select.POLLIN)
        signalled = -1
        while generation == self.generation:
            events = poller.poll(1000)
            if generation != self.generation or any(f == self._wake_r for f, _ in events):
                return
            if not events:
                continue
            if signalled == contender._statements:  # told the engine; wait for it to act
                time.sleep(0.05)
                continue
            lost = dismissed = False
            with contender._io_lock:  # no statement in flight: readable now means unsolicited
                if generation != self.generation or conn.closed:
                    return
                if not _readable(fd, 0):
                    continue
                lost = self._peek_fatal(conn, fd)
                if not lost:
                    try:  # read it the way psycopg would: notifications go to _on_notify
                        contender._read_notifications(conn.pgconn)
                    except Exception:
                        lost = True
                term = contender._term
                dismissed = term is not None and (term.dismissed or term.asked_by is not None)
                if lost and term is not None:
                    term.lost = True  # read by claim(), for a term not yet begun
                if lost or dismissed:
                    signalled = contender._statements
            if lost or dismissed:
                logger.debug("%s: unsolicited message from the server (lost=%s, dismissed=%s)",
                             contender.name, lost, dismissed)
                contender._notify(lost=lost)

    @staticmethod
    def _peek_fatal(conn: psycopg.Connection, fd: int) -> bool:
        """True if the pending bytes are EOF or an ErrorResponse (never read, only peeked)."""
        try:
            if conn.pgconn.ssl_in_use:
                return False
            sock = socket.socket(fileno=os.dup(fd))
        except Exception:
            return False
        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            return data in (b"", b"E")
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        finally:
            sock.close()
