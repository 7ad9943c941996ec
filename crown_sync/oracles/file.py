"""The embedded default oracle: ``flock(2)`` on a file in a private directory, for one host.

Files per election ``NAME`` in the directory:

* ``NAME.lock``: the lock. Never renamed or deleted (that would let two processes lock two
  different files of the same name). The leader holds ``flock(LOCK_EX)`` on it.
* ``NAME.leader``: the leader record (identity, metadata, token, since), replaced atomically
  (write, fsync, rename) by each new leader. It outlives the term so the next token can rise from
  it; whether a leader exists right now is answered by the lock, not by this file.
* ``NAME.dismiss``: a request, naming a token, that the leader of that term step down.

Safety: the kernel grants ``LOCK_EX`` to one open file description at a time and frees it the
moment the last descriptor of the holder is closed, which includes the holder's death by any
signal. So terms need no local deadline (``Claim.deadline`` is None), a crash failover is as fast
as a waiting follower is woken, and a paused (SIGSTOP) leader simply keeps the crown until it
runs again: nobody else can take it meanwhile. A term's child processes inherit the lock
descriptor (``Claim.fds``), so the lock is not free until the child is gone too.

Followers wait in a thread blocked in ``flock(LOCK_EX)`` on their own open file description: the
kernel wakes it exactly when the holder lets go, with no polling, and the lock it gets is handed to
the contender whole. A blocked flock() can't be cancelled, so ``close()`` leaves the thread as an
orphan that the next follower of the same election in this process adopts (starting and stopping
followers never piles up threads); an orphan nobody adopts closes its descriptor when the lock
comes, which frees the lock again at once.

Not guaranteed: anything across hosts (flock is local; on NFS it is unreliable, so refuse to rely
on it there), or tokens surviving deletion of the directory. Fork: a forked process gets copies of
the lock descriptors; we close them in the child (no effect on the parent's lock, since the parent
still holds its own reference), except those a term's child process is meant to inherit.
"""

import fcntl
import json
import os
import stat
import threading
import time
import urllib.parse
import weakref
from typing import Any, Dict, Optional

from ..oracle import Claim, Contender, Leader, OnChange, Oracle
from ..terms import fds_kept_across_fork
from ..urls import parse_options

__all__ = ["FileOracle", "default_directory"]

_OPTIONS = {"check_interval": float}


def default_directory() -> str:
    """``$XDG_STATE_HOME/crown_sync``, else ``~/.local/state/crown_sync`` (persistent, per user)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "crown_sync")


class FileOracle(Oracle):
    """flock-based oracle in ``directory`` (created 0700; symlinks and foreign owners refused).

    ``check_interval``: how often this process looks for dismissal requests for the elections
    it leads (one directory listing per interval, however many crowns lead).
    """

    def __init__(self, directory: Optional[str] = None, check_interval: float = 0.25):
        if directory is None:
            directory = default_directory()
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path, got {type(directory).__name__}")
        directory = os.fspath(directory)
        if not os.path.isabs(directory):
            raise ValueError(f"directory must be an absolute path, got {directory!r}")
        if isinstance(check_interval, bool) or not isinstance(check_interval, (int, float)) or not (
            0 < check_interval <= 3600
        ):
            raise ValueError(f"check_interval must be a number of seconds in (0, 3600], got {check_interval!r}")
        self.directory = os.path.normpath(directory)
        self.check_interval = float(check_interval)
        self.description = "file://" + self.directory
        self._checked = False

    @classmethod
    def from_url(cls, url: str) -> "FileOracle":
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file oracle URL must be file:///absolute/dir, got host {parts.hostname!r}")
        path = urllib.parse.unquote(parts.path)
        if not path or not os.path.isabs(path):
            raise ValueError("file oracle URL must be file:///absolute/dir")
        return cls(path, **parse_options(url, _OPTIONS))

    # -- files -------------------------------------------------------------------------------

    def _path(self, name: str, suffix: str) -> str:
        return os.path.join(self.directory, f"{name}.{suffix}")

    def ensure_directory(self) -> None:
        """Create the directory (0700) if needed and refuse one that others could tamper with."""
        if self._checked:
            return
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        info = os.lstat(self.directory)
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            raise PermissionError(f"{self.directory} is not a plain directory (symlinks are refused)")
        if info.st_uid != os.geteuid():
            raise PermissionError(f"{self.directory} belongs to uid {info.st_uid}, not to us")
        if info.st_mode & 0o022:
            raise PermissionError(f"{self.directory} is writable by others (mode {oct(info.st_mode & 0o777)})")
        self._checked = True

    def open_lock(self, name: str) -> int:
        self.ensure_directory()
        return os.open(
            self._path(name, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )

    def read_record(self, name: str) -> Optional[Leader]:
        try:
            fd = os.open(self._path(name, "leader"), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        try:
            with os.fdopen(fd, "r", encoding="utf-8") as handle:
                data = json.load(handle)
            if not isinstance(data, dict) or not isinstance(data.get("token"), int):
                raise ValueError("no integer token")
            return Leader.from_dict(data)
        except ValueError as exc:
            # Only a hand edit can tear it (a leader's own writes are atomic). Refuse rather than
            # guess: treated as absent, the next token would start again from 1.
            raise ValueError(
                f"{self._path(name, 'leader')} is not a valid leader record ({exc}); restore it, or"
                f" remove it only if no process still holds an older term's token"
            ) from None

    def write_record(self, name: str, leader: Leader) -> None:
        final = self._path(name, "leader")
        temporary = f"{final}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, json.dumps(leader.to_dict()).encode())
            os.fsync(fd)  # the token must not go back after a power loss
        finally:
            os.close(fd)
        os.replace(temporary, final)
        directory = os.open(self.directory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    # -- Oracle ----------------------------------------------------------------------------

    def contender(self, name: str, identity: str, metadata: Dict[str, Any], on_change: OnChange) -> "FileContender":
        return FileContender(self, name, identity, metadata, on_change)

    def _lock_is_held(self, name: str) -> bool:
        try:
            fd = os.open(self._path(name, "lock"), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also drops the shared probe lock if we got it
        return False

    def find_leader(self, name: str) -> Optional[Leader]:
        self.ensure_directory()
        if not self._lock_is_held(name):
            return None
        return self.read_record(name)

    def dismiss(self, name: str) -> bool:
        leader = self.find_leader(name)
        if leader is None:
            return False
        final = self._path(name, "dismiss")
        temporary = f"{final}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump({"token": leader.token, "at": time.time()}, handle)
        os.replace(temporary, final)
        return True

    def dismissal_for(self, name: str, token: Optional[int]) -> bool:
        """True if a dismissal names the term ``token``. The request is consumed either way: one
        naming another term is stale (that term is over) and must not wake the leader again."""
        path = self._path(name, "dismiss")
        try:
            with open(path, "r", encoding="utf-8") as handle:
                request = json.load(handle)
        except FileNotFoundError:
            return False
        except ValueError:
            request = {}  # torn by hand: not a request for anyone
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return request.get("token") == token


class _DismissalWatch:
    """One thread per directory in this process that tells leaders of a dismissal request.

    A leader needs nothing else checked on a schedule (the kernel lock can't lapse), so its
    term has no periodic refresh: the leaders of one process cost one directory listing per
    ``check_interval`` together, and nothing at all while none of them leads.
    """

    def __init__(self, directory: str, interval: float):
        self.directory = directory
        self.interval = interval
        self._leaders: Dict[str, set] = {}  # election name -> contenders leading it here
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None

    def add(self, name: str, contender: "FileContender") -> None:
        with self._cond:
            self._leaders.setdefault(name, set()).add(contender)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="crown-sync-file-dismissals", daemon=True)
                self._thread.start()
            self._cond.notify()

    def discard(self, name: str, contender: "FileContender") -> None:
        with self._cond:
            leaders = self._leaders.get(name)
            if leaders is not None:
                leaders.discard(contender)
                if not leaders:
                    del self._leaders[name]

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._leaders:
                    self._cond.wait()
                self._cond.wait(self.interval)
                watched = {name: list(leaders) for name, leaders in self._leaders.items()}
            try:
                requested = {entry[: -len(".dismiss")] for entry in os.listdir(self.directory)
                             if entry.endswith(".dismiss")}
            except OSError:
                continue  # the directory is gone or unreadable: the leaders' locks still hold
            for name in requested.intersection(watched):
                for contender in watched[name]:
                    contender._on_change()  # the engine refreshes; refresh() reads the request


_watches: Dict[str, _DismissalWatch] = {}
_watches_lock = threading.Lock()


def _dismissal_watch(oracle: FileOracle) -> _DismissalWatch:
    with _watches_lock:
        watch = _watches.get(oracle.directory)
        if watch is None:
            watch = _watches[oracle.directory] = _DismissalWatch(oracle.directory, oracle.check_interval)
        watch.interval = min(watch.interval, oracle.check_interval)
        return watch


class _Waiter:
    """A thread blocked in ``flock(LOCK_EX)`` on its own open file description of a lock file.

    A blocked flock() can't be cancelled, so when its contender closes, the waiter is left as an
    orphan that the next contender of the same lock file in this process adopts instead of
    starting another thread: stopping and starting followers never piles up threads. An orphan
    nobody adopts closes its descriptor (freeing the lock at once) when the lock comes.
    """

    def __init__(self, path: str, fd: int, owner: "FileContender"):
        self.path = path
        self.fd = fd
        self.owner: Optional[FileContender] = owner
        self.granted = False
        self.thread = threading.Thread(target=self._run, name=f"crown-sync-file-wait:{os.path.basename(path)}",
                                       daemon=True)

    def _run(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)  # the kernel wakes us when the holder lets go
        except OSError:
            pass  # only if the descriptor was closed under us (fork child): nobody to tell
        with _waiters_lock:
            self.granted = True
            owner = self.owner
            if _orphans.get(self.path) is self:
                del _orphans[self.path]
        if owner is None or not owner._granted(self):
            os.close(self.fd)  # the only reference: the lock is free again at once


_waiters_lock = threading.Lock()
_orphans: Dict[str, _Waiter] = {}  # lock path -> a waiter whose contender closed


class FileContender(Contender):
    """One crown's descriptor on ``NAME.lock`` and, while following, its waiter.

    Only the loop thread uses ``_fd``; a waiter that gets the lock parks its own descriptor in
    ``_granted_fd``, and the loop thread swaps it in (never closing a descriptor under a
    flock() call of its own).
    """

    def __init__(self, oracle: FileOracle, name: str, identity: str, metadata: Dict[str, Any], on_change: OnChange):
        self._oracle = oracle
        self._name = name
        self._path = oracle._path(name, "lock")
        self._identity = identity
        self._metadata = metadata
        self._on_change = on_change
        self._mutex = threading.Lock()
        self._fd: Optional[int] = None
        self._granted_fd: Optional[int] = None  # a waiter's descriptor that holds LOCK_EX for us
        self._held = False  # we hold LOCK_EX (by claim or by the waiter)
        self._waiter: Optional[_Waiter] = None
        self._closed = False
        self._leader: Optional[Leader] = None
        _live_contenders.add(self)

    def _descriptor(self) -> int:
        with self._mutex:
            if self._closed:
                raise RuntimeError("contender is closed")
            if self._granted_fd is not None:
                old, self._fd, self._granted_fd = self._fd, self._granted_fd, None
                if old is not None:
                    os.close(old)
            fd = self._fd
        if fd is None:
            fd = self._oracle.open_lock(self._name)
            with self._mutex:
                if self._closed:
                    os.close(fd)
                    raise RuntimeError("contender is closed")
                self._fd = fd
        return fd

    def claim(self) -> Claim:
        fd = self._descriptor()
        with self._mutex:
            held = self._held
        if not held:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return Claim(won=False, leader=self._oracle.read_record(self._name))
            with self._mutex:
                self._held = True
        try:
            previous = self._oracle.read_record(self._name)
            token = (previous.token or 0) + 1 if previous is not None else 1
            leader = Leader(self._identity, dict(self._metadata), token, time.time())
            self._oracle.dismissal_for(self._name, token)  # a stale request must not hit this term
            self._oracle.write_record(self._name, leader)
        except BaseException:
            self.abdicate()
            raise
        self._leader = leader
        _dismissal_watch(self._oracle).add(self._name, self)
        return Claim(True, leader, token, None, None, (fd,))

    def refresh(self) -> Claim:
        leader = self._leader
        with self._mutex:
            held = self._held and not self._closed
        if not held or leader is None:
            return Claim(False)
        if self._oracle.dismissal_for(self._name, leader.token):
            # Stay out long enough for a waiting follower's thread to be scheduled and lock.
            return Claim(False, leader=None, yield_for=2 * self._oracle.check_interval)
        return Claim(True, leader, leader.token, None, None, (self._fd,))

    def watch(self, leader: Optional[Leader]) -> bool:
        self._descriptor()  # creates the directory and lock file if needed; swaps in a grant
        with self._mutex:
            if self._held:
                return False  # the waiter already got it: claim now
            if self._waiter is not None:
                return True
            with _waiters_lock:
                waiter = _orphans.pop(self._path, None)
                if waiter is not None:
                    waiter.owner = self
            if waiter is None:
                # Its own open file description: the lock it gets is handed to us whole.
                fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
                waiter = _Waiter(self._path, fd, self)
                waiter.thread.start()
            self._waiter = waiter
        return True

    def _granted(self, waiter: _Waiter) -> bool:
        """From the waiter's thread: it holds LOCK_EX for us. False if we no longer want it."""
        with self._mutex:
            if self._waiter is waiter:
                self._waiter = None
            if self._closed or self._held:
                return False
            self._granted_fd = waiter.fd
            self._held = True
        self._on_change()
        return True

    def abdicate(self) -> None:
        try:
            self._descriptor()  # a lock granted to the waiter is swapped in, then released
        except RuntimeError:
            return  # closed: close() released everything
        with self._mutex:
            if not self._held or self._closed:
                return
        self._leader = None
        _dismissal_watch(self._oracle).discard(self._name, self)
        self._drop()

    def _drop(self) -> None:
        """Close our descriptor, never flock(LOCK_UN) it: the lock belongs to the open file
        description, which the term's child processes share; unlocking would free it under a
        child that still runs. Closing drops our reference; the lock goes with the last one."""
        with self._mutex:
            fd, self._fd, self._held = self._fd, None, False
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            fds = [fd for fd in (self._fd, self._granted_fd) if fd is not None]
            self._fd = self._granted_fd = None
            self._held = False
            waiter, self._waiter = self._waiter, None
        _dismissal_watch(self._oracle).discard(self._name, self)
        if waiter is not None:
            with _waiters_lock:
                if not waiter.granted:
                    waiter.owner = None
                    _orphans.setdefault(waiter.path, waiter)
        for fd in fds:
            os.close(fd)  # frees our lock unless a term's child process still holds a copy

    def _after_fork_in_child(self) -> None:
        keep = fds_kept_across_fork()
        for fd in (self._fd, self._granted_fd):
            if fd is not None and fd not in keep:
                try:
                    os.close(fd)  # our copy only: the parent's lock stays held by the parent
                except OSError:
                    pass
        self._fd = self._granted_fd = None
        self._waiter = None
        self._closed = True
        self._held = False
        self._mutex = threading.Lock()


_live_contenders: "weakref.WeakSet[FileContender]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _waiters_lock, _watches_lock
    contenders = list(_live_contenders)
    # The waiters' threads did not cross the fork; their descriptors did: close our copies.
    waiters = list(_orphans.values()) + [c._waiter for c in contenders if c._waiter is not None]
    for contender in contenders:
        contender._after_fork_in_child()
    for waiter in waiters:
        try:
            os.close(waiter.fd)
        except OSError:
            pass
    _orphans.clear()
    _waiters_lock = threading.Lock()
    _watches.clear()  # their threads did not cross the fork
    _watches_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
