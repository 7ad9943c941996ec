"""The embedded default oracle: ``flock(2)`` on a file in a private directory, for one host.

Files per election ``NAME`` in the directory:

* ``NAME.lock``: the lock. We never rename or delete it. The leader holds ``flock(LOCK_EX)`` on it.
* ``NAME.leader``: the leader record (identity, metadata, token, since; ``lock``, the device and
  inode of the lock file the term locked; ``pid_namespace``), replaced atomically (write, fsync,
  rename) by each new leader. It outlives the term so the next token can rise from it; whether a
  leader exists right now is answered by the lock, not by this file.
* ``NAME.dismiss``: a request, naming a token, that the leader of that term step down.

Safety: the kernel grants ``LOCK_EX`` to one open file description at a time and frees it the
moment the last descriptor of the holder is closed, which includes the holder's death by any
signal. So terms need no local deadline (``Claim.deadline`` is None), a crash failover is as fast
as a waiting follower is woken, and a paused (SIGSTOP) leader simply keeps the crown until it
runs again: nobody else can take it meanwhile. A term's child processes inherit the lock
descriptor (``Claim.fds``), so the lock is not free until the child is gone too. For the same
reason a term ends by *closing* our descriptor, never by ``flock(LOCK_UN)``: the lock belongs to
the open file description the children share, and unlocking it would free it under a child (a
command's daemon, a process stuck past SIGKILL) that still runs.

A lock file deleted or replaced (a tmp cleaner, ``rm``, a ``mv`` over it) while a term holds it
would otherwise let a newcomer create and lock a new file of the same name: two leaders. Rules:

1. A claimant leads only on the file that is at the path: after locking, it checks that its
   descriptor's file still has links and is the one ``lstat`` finds at the path; if not it drops
   it and locks the new one. (A follower blocked on an unlinked file gets it when its holder
   lets go, and drops it then.)
2. The record names the file the last term locked. A claimant that locks a *different* file
   leads only once the kernel shows that no lock on the old file remains: no line in
   /proc/locks for its inode (held by the old leader or any child process of its term). Until
   then it raises :class:`LockFileReplaced` (``status().last_error``); the engine retries with
   backoff (at most ``min(monitor_delay, 5 s)``), which is what it costs after the old term
   ends. The old leader is not disturbed: it keeps leading on the unlinked file and logs a
   warning (its dismissal watch sees the path change); ``find_leader`` still names it.
3. Record check and record write happen under a ``flock`` of the directory itself (the claim
   section), so two claimants can't both read the record of the term before a replacement.
   The directory's own lock is held for milliseconds, by no child (no fork in this process
   while one runs), and a claim waits at most ``SECTION_WAIT`` for another process's section.
4. In a pid namespace (a container), /proc/locks hides locks whose locking process has exited,
   such as one only a dead leader's child still holds: there the claimant also looks through the
   descriptors of every process it can see. Processes outside its pid namespace (another
   container, the host) stay invisible to it, so the record also names the pid namespace of the
   term: a claimant in a pid namespace takes over from a term on a replaced file only if that
   term ran in its own namespace; otherwise it refuses (an error naming the way out) and a
   claimant of that namespace, or of the host's (which sees every lock), must take over.
5. /proc/locks must be seen to list a lock of ours (once per oracle: when a follower starts
   watching, else at its first claim; and at every claim after a replaced file), so the proof is
   never blind (no /proc, a file system whose inode numbers /proc/locks does not show): a claim
   refuses otherwise.
   Matching is by inode number only (btrfs shows other devices in stat() than in /proc/locks):
   another locked file that reuses the inode number of a deleted one makes a claimant wait
   longer, never lead early.

Followers wait in a thread blocked in ``flock(LOCK_EX)`` on their own open file description: the
kernel wakes it exactly when the holder lets go, with no polling, and the lock it gets is handed to
the contender whole. A blocked flock() can't be cancelled, so ``close()`` leaves the thread as an
orphan that the next follower of the same election in this process adopts (starting and stopping
followers never piles up threads); an orphan nobody adopts closes its descriptor when the lock
comes, which frees the lock again at once.

Hostile neighbours: every open is relative to a descriptor of the directory reached from ``/``
one component at a time (``O_DIRECTORY|O_NOFOLLOW``, each checked: owned by root or us, not
writable by others unless root-owned and sticky like /tmp; see open_directory), walked afresh for
each operation, and files are opened ``O_NOFOLLOW`` and checked (regular, ours or root's, not
open to others): a symlink swapped in later, a foreign-owned parent or a file planted by another
user is refused with an error naming it, never followed. Only root's symlinks on the way (the
system's layout: /var/lock -> /run/lock) are resolved, once per oracle (resolve_trusted_symlinks).

Refused: a directory on a network or FUSE file system (NFS, SMB/CIFS, FUSE, 9p, Ceph, AFS, Coda,
NCP, Lustre, VirtualBox shared folders: ``statfs`` ``f_type``, see ``REFUSED_FILE_SYSTEMS``) is an
``OSError`` naming the type and the directory at first use: flock there is emulated, per client
or up to a server, not one lock among this host's processes.

Not guaranteed: anything across hosts, tokens surviving deletion of the directory or of the
record, or a directory renamed or replaced as a whole. Fork: a forked process gets copies of
the lock descriptors; we close them in the child (no effect on the parent's lock, since the parent
still holds its own reference), except those a term's child process is meant to inherit.
"""

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import stat
import sys
import threading
import time
import urllib.parse
import weakref
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

from .. import _forksafe
from ..oracle import Claim, Leader, OnChange
from ..terms import fds_kept_across_fork
from ..urls import parse_options
from ._base import ContenderBase, Election, OracleBase, Phase

__all__ = ["FileOracle", "default_directory"]

logger = logging.getLogger("crown_sync.oracles.file")

_OPTIONS = {"check_interval": float}

#: statfs(2) f_type of the file systems refused for the directory (linux/magic.h): their flock()
#: is not one lock among this host's processes (NFS emulates it with byte-range locks or keeps it
#: on one client; SMB, FUSE daemons, 9p servers and the cluster file systems decide for themselves).
REFUSED_FILE_SYSTEMS = {
    0x6969: "nfs",
    0x517B: "smb",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x65735546: "fuse",
    0x01021997: "9p",
    0x00C36400: "ceph",
    0x5346414F: "afs",
    0x6B414653: "afs",
    0x73757245: "coda",
    0x564C: "ncp",
    0x0BD00BD0: "lustre",
    0x786F4256: "vboxsf",
}

#: /proc/self/ns/pid's inode in the host's initial pid namespace (PROC_PID_INIT_INO).
_INITIAL_PID_NAMESPACE = 0xEFFFFFFC
#: How long a claim waits for another process's claim section before raising (the engine retries).
SECTION_WAIT = 5.0
#: How many times a claim reopens a lock file that was replaced while it locked it, before raising.
_REOPENS = 5

LockId = Tuple[int, int]  # (st_dev, st_ino) of a lock file


def file_system_type(path: str) -> int:
    """statfs(2) ``f_type`` of the file system holding ``path`` (a magic number, linux/magic.h)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(512)  # struct statfs: 120 bytes on 64-bit Linux
    if libc.statfs(os.fsencode(path), buffer) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    # f_type is the first member, a C long on every Linux ABI glibc supports; the magics are u32.
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF


def refused_file_system(f_type: int) -> Optional[str]:
    """The name of the file system if the oracle refuses it (see REFUSED_FILE_SYSTEMS), else None."""
    return REFUSED_FILE_SYSTEMS.get(f_type)


def _locked_inodes() -> Set[int]:
    """Inode numbers that somebody holds a lock on, from /proc/locks (requests still blocked, the
    ``->`` lines, are not holders). Inode numbers only: btrfs subvolumes give stat() another
    device than /proc/locks shows, and a match on another device can only make a claimant wait."""
    held = set()
    with open("/proc/locks", "r", encoding="ascii", errors="replace") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) < 6 or fields[1] == "->":
                continue
            for field in fields[2:]:
                parts = field.split(":")
                if len(parts) == 3 and parts[2].isdigit():  # MAJ:MIN:INODE
                    held.add(int(parts[2]))
                    break
    return held


def _pid_namespace() -> Optional[int]:
    """The inode of this process's pid namespace (None if /proc does not tell)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _in_initial_pid_namespace() -> bool:
    return _pid_namespace() == _INITIAL_PID_NAMESPACE


def _open_in_some_process(lock: LockId) -> bool:
    """True if a process we can see has a descriptor on the file ``lock``.

    In a pid namespace (a container), /proc/locks hides a lock whose locking process has exited,
    such as one that only a term's child process still holds: look for the holders themselves.
    """
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or not ours to read
        for fd in descriptors:
            try:
                info = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (info.st_dev, info.st_ino) == lock:
                return True
    return False


def _lock_is_still_held(lock: LockId, held: Optional[Set[int]] = None) -> bool:
    if lock[1] in (_locked_inodes() if held is None else held):
        return True
    return not _in_initial_pid_namespace() and _open_in_some_process(lock)


_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _trusted(uid: int) -> bool:
    """Root or us: nobody else may own a directory on the way or a file of the oracle."""
    return uid in (0, os.geteuid())


def _check_component(path: str, info: os.stat_result, last: bool) -> None:
    """Refuse a directory on the way to (``last``: or being) the oracle's directory that someone
    else could replace or fill. Accepted on the way: owned by root or us, and not writable by group
    or others unless root-owned and sticky (``/tmp``: others may add entries there but never rename
    or remove ours). The oracle's directory itself: ours, writable by nobody else."""
    if last:
        if info.st_uid != os.geteuid():
            raise PermissionError(f"{path} belongs to uid {info.st_uid}, not to us (uid {os.geteuid()})")
        if info.st_mode & 0o022:
            raise PermissionError(f"{path} is writable by others (mode {oct(info.st_mode & 0o777)})")
        return
    if not _trusted(info.st_uid):
        raise PermissionError(
            f"{path}, on the way to the file oracle's directory, belongs to uid {info.st_uid}: that"
            f" user could swap what is under it; refused (accepted: owned by root or uid {os.geteuid()})"
        )
    sticky_root = info.st_uid == 0 and info.st_mode & stat.S_ISVTX
    if info.st_mode & 0o022 and not sticky_root:
        raise PermissionError(
            f"{path}, on the way to the file oracle's directory, is writable by others (mode"
            f" {oct(info.st_mode & 0o7777)}) and not a sticky root-owned directory like /tmp: refused"
        )


def _open_component(parent: int, part: str, path: str, create: bool) -> int:
    """``part`` of the directory ``parent``, opened as a directory and never through a symlink."""
    for _ in range(2):
        try:
            return os.open(part, _DIRECTORY_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):  # another process made it meanwhile
                os.mkdir(part, 0o700, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # O_NOFOLLOW met a symlink, or a file
                raise PermissionError(
                    f"{path} is a symlink or not a directory: refused (the file oracle's path is never"
                    f" followed through a symlink)"
                ) from None
            raise
    return os.open(part, _DIRECTORY_FLAGS, dir_fd=parent)


def open_directory(directory: str, create: bool = False) -> int:
    """A descriptor of ``directory`` (absolute, normalised) reached from ``/`` one component at a
    time, each opened ``O_DIRECTORY|O_NOFOLLOW`` relative to the one before and checked (see
    _check_component): a component swapped for a symlink or for someone else's directory is
    refused, never followed. ``create``: make missing components (0700, ours)."""
    parts = [part for part in directory.split("/") if part]
    fd = os.open("/", _DIRECTORY_FLAGS)
    path = "/"
    try:
        _check_component(path, os.fstat(fd), not parts)
        for index, part in enumerate(parts):
            path = os.path.join(path, part)
            child = _open_component(fd, part, path, create)
            os.close(fd)
            fd = child
            _check_component(path, os.fstat(fd), index == len(parts) - 1)
        return fd
    except BaseException:
        os.close(fd)
        raise


def resolve_trusted_symlinks(directory: str) -> str:
    """``directory`` with the root-owned symlinks on its way resolved (the system's layout:
    ``/var/lock`` -> ``/run/lock``, ``/home`` -> ``/var/home``), each in a directory that passes
    _check_component; any other symlink, ours included, is refused. Done once per oracle; the
    resolved path is then walked with O_NOFOLLOW every time, so a symlink swapped in later is
    refused, never followed."""
    pending = [part for part in directory.split("/") if part]
    resolved, hops = "/", 0
    while pending:
        part = pending.pop(0)
        if part in (".", ".."):
            resolved = os.path.dirname(resolved) if part == ".." else resolved
            continue
        candidate = os.path.join(resolved, part)
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            return os.path.join(candidate, *pending)  # made (0700, ours) by the walk
        if not stat.S_ISLNK(info.st_mode):
            resolved = candidate
            continue
        hops += 1
        _check_component(resolved, os.lstat(resolved), last=False)  # nobody else may re-point it
        if info.st_uid != 0 or hops > 40:
            raise PermissionError(f"{candidate} is a symlink of uid {info.st_uid}: refused, never followed")
        target = os.readlink(candidate)
        resolved = "/" if target.startswith("/") else resolved
        pending = [piece for piece in target.split("/") if piece] + pending
    return resolved


def _check_file(fd: int, path: str, directory: int, private: bool) -> None:
    """Refuse a file of the oracle that someone else planted or may write; ``private`` (a lock
    file): or may open, through a directory they may enter (whoever opens it can flock it)."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or not _trusted(info.st_uid):
        raise PermissionError(
            f"{path} is not a regular file of uid {os.geteuid()} or root (uid {info.st_uid}): planted by"
            f" someone else? refused; remove it if no crown of this directory made it"
        )
    refused = 0o022
    if private and os.fstat(directory).st_mode & 0o011:  # others may reach it: reading is enough
        refused = 0o066
    if info.st_mode & refused:
        raise PermissionError(f"{path} is open to others (mode {oct(info.st_mode & 0o777)}): refused")


def _open_file(directory: int, path: str, flags: int, private: bool) -> int:
    """``path``'s file in the directory ``directory`` (a descriptor), never through a symlink,
    checked (see _check_file)."""
    name = os.path.basename(path)
    try:
        fd = os.open(name, flags | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600, dir_fd=directory)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PermissionError(f"{path} is a symlink: refused, never followed") from None
        raise
    try:
        _check_file(fd, path, directory, private)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_atomically(directory: int, path: str, data: bytes) -> None:
    """``data`` as ``path`` in the directory ``directory``: written, fsynced and renamed over it."""
    name = os.path.basename(path)
    temporary = f"{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600,
                 dir_fd=directory)
    try:
        os.write(fd, data)
        os.fsync(fd)  # the token must not go back after a power loss
    finally:
        os.close(fd)
    os.replace(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
    os.fsync(directory)


class LockFileReplaced(OSError):
    """A claim found that the lock file was deleted or replaced while a term held it, and that
    term's lock is still held: the claimant waits (the engine retries) until it is released."""


def default_directory() -> str:
    """``$STATE_DIRECTORY/crown_sync`` (a systemd service's ``StateDirectory=``, the first one if
    several), else ``$XDG_STATE_HOME/crown_sync``, else ``~/.local/state/crown_sync``: persistent
    and per user. Never ``$RUNTIME_DIRECTORY``: systemd empties it when the service stops, and the
    leader record kept here is what makes the next term's token rise."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return os.path.join(state, "crown_sync")
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "crown_sync")


def _create_default(directory: str) -> None:
    """Create the default directory now (0700), or raise saying what to set: a service account
    whose home is missing or not its own (``nobody``, ``www-data`` under /var/www) would
    otherwise retry for ever, its crowns never leading."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"the file oracle's default directory {directory} cannot be created by uid {os.geteuid()} "
            f"({exc.strerror}; HOME={os.environ.get('HOME')!r}): set $CROWN_SYNC_ORACLE (e.g. "
            f"file:///var/lib/myapp/crowns, a directory of this user's), $STATE_DIRECTORY (systemd: "
            f"StateDirectory=) or $XDG_STATE_HOME",
        ) from None


class FileOracle(OracleBase):
    """flock-based oracle in ``directory`` (created 0700; symlinks and foreign owners refused, on
    the whole way from /).

    ``check_interval``: how often this process looks for dismissal requests for the elections
    it leads (one directory listing per interval, however many crowns lead).
    """

    #: A local file holds a leader record of any size (the base's limit is for servers).
    max_record = sys.maxsize

    def __init__(self, directory: Optional[str] = None, check_interval: float = 0.25):
        super().__init__()
        if directory is None:
            directory = default_directory()
            _create_default(directory)  # nobody chose it: say now what to set, not in a retry loop
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
        self._walked = self.directory  # the path walked from /: see resolve_trusted_symlinks
        self._proc_locks_seen = False  # /proc/locks has listed a lock we hold (see _check_predecessor)

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

    def candidacy(self, name: str, candidate):
        """This contender's published candidacy, for ranking strategies (see docs/ranking.rst)."""
        from ._candidacy import FileCandidacy
        return FileCandidacy(self, name, candidate)

    @contextlib.contextmanager
    def _at(self, directory: Optional[int] = None) -> Iterator[int]:
        """A descriptor of the directory: ``directory`` if given, else one walked from / afresh
        (open_directory), so that a component swapped since the last call is refused, not used."""
        if directory is not None:
            yield directory
            return
        self.ensure_directory()
        fd = open_directory(self._walked)
        try:
            yield fd
        finally:
            os.close(fd)

    @property
    def walked_directory(self) -> str:
        """The directory as it is walked from / (root's symlinks on the way resolved), once
        :meth:`ensure_directory` ran."""
        return self._walked

    def ensure_directory(self) -> None:
        """Create the directory (0700) if needed and refuse one that others could tamper with, or
        whose way from / they could (see open_directory)."""
        if self._checked:
            return
        self._walked = resolve_trusted_symlinks(self.directory)
        fd = open_directory(self._walked, create=True)
        try:
            kind = refused_file_system(file_system_type(f"/proc/self/fd/{fd}"))  # the one we walked to
        finally:
            os.close(fd)
        if kind is not None:
            raise OSError(
                f"{self.directory} is on a {kind} file system, where flock() is not one lock among"
                f" this host's processes: refused; use a directory on a local file system"
            )
        self._checked = True

    def prove_proc_locks(self, fd: int) -> None:
        """Once, ahead of need (a follower starting to watch, off any handoff's path): check that
        /proc/locks lists a lock of ours on this file system, so that a claim need not read it
        (see _check_predecessor). The lock is a POSIX read lock on the lock file ``fd``: Linux
        keeps POSIX locks and the election's flock() locks apart, so it blocks nobody."""
        if self._proc_locks_seen:
            return
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return  # the next claim proves it itself
        try:
            if os.fstat(fd).st_ino in _locked_inodes():
                self._proc_locks_seen = True
        except OSError:
            pass
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)

    def open_lock(self, name: str) -> int:
        with self._at() as directory:
            return _open_file(directory, self._path(name, "lock"), os.O_RDWR | os.O_CREAT, private=True)

    def read_record(self, name: str) -> Optional[Leader]:
        return self._load_record(name)[0]

    def _load_record(self, name: str, directory: Optional[int] = None
                     ) -> Tuple[Optional[Leader], Optional[LockId], Optional[int]]:
        """The leader record, the lock file its term locked and the pid namespace the term ran in
        (None for either in a record without them)."""
        try:
            with self._at(directory) as at:
                fd = _open_file(at, self._path(name, "leader"), os.O_RDONLY, private=False)
        except FileNotFoundError:
            return None, None, None
        try:
            with os.fdopen(fd, "r", encoding="utf-8") as handle:
                data = json.load(handle)
            if not isinstance(data, dict) or not isinstance(data.get("token"), int):
                raise ValueError("no integer token")
            lock = data.get("lock")
            if lock is not None and not (isinstance(lock, list) and len(lock) == 2
                                         and all(isinstance(part, int) for part in lock)):
                raise ValueError("lock is not [device, inode]")
            namespace = data.get("pid_namespace")
            return (Leader.from_dict(data), tuple(lock) if lock is not None else None,
                    namespace if isinstance(namespace, int) else None)
        except ValueError as exc:
            # Only a hand edit can tear it (a leader's own writes are atomic). Refuse rather than
            # guess: treated as absent, the next token would start again from 1.
            raise ValueError(
                f"{self._path(name, 'leader')} is not a valid leader record ({exc}); restore it, or"
                f" remove it only if no process still holds an older term's token"
            ) from None

    def write_record(self, name: str, leader: Leader, lock: Optional[LockId] = None,
                     directory: Optional[int] = None) -> None:
        record = leader.to_dict()
        if lock is not None:  # which file this term locked, and from where: see _check_predecessor
            record.update(lock=list(lock), pid_namespace=_pid_namespace())
        with self._at(directory) as at:
            _write_atomically(at, self._path(name, "leader"), json.dumps(record).encode())

    # -- a lock file deleted or replaced ---------------------------------------------------

    def lock_file_now(self, name: str, directory: Optional[int] = None) -> Optional[LockId]:
        """(device, inode) of the file at ``NAME.lock`` now, None if there is none; ``directory``:
        a descriptor of the directory walked afresh by the caller (else walked here)."""
        try:
            with self._at(directory) as directory:
                info = os.stat(f"{name}.lock", dir_fd=directory, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return info.st_dev, info.st_ino

    @contextlib.contextmanager
    def _claim_section(self, directory: int) -> Iterator[None]:
        """One claim at a time in the directory, across processes: flock on the directory.

        Claimants check the record and write theirs inside it, so that a lock file replaced
        between two claims can't let both read the same record. No fork happens in this process
        while it runs (see _before_fork), so no child ever holds a copy of the locked directory.
        """
        with _section_lock:
            # An open file description of its own (flock belongs to it), of the walked directory.
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=directory)
            try:
                give_up = time.monotonic() + SECTION_WAIT
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > give_up:
                            raise TimeoutError(
                                f"another process has held the claim lock of {self.directory} for"
                                f" {SECTION_WAIT:g} s (stopped?)"
                            ) from None
                        time.sleep(0.002)
                yield
            finally:
                os.close(fd)  # frees the directory lock: no other descriptor shares it

    def _check_predecessor(self, name: str, previous: Optional[Leader], previous_lock: Optional[LockId],
                           namespace: Optional[int], ours: LockId) -> None:
        """Raise unless the term before ours is certainly over.

        We hold the lock on the file now at the path. If the last term locked that same file, its
        lock (held by its crown and child processes alike) is ours now: it is over. If it locked
        another file (``NAME.lock`` was deleted or replaced meanwhile), its holders may still run
        on the unlinked file: over only once the kernel lists no lock on it (/proc/locks), and,
        from inside a pid namespace, only if that term ran in ours (we can't see the others).
        """
        replaced = previous_lock is not None and previous_lock != ours
        # Reading /proc/locks can take 10 ms (the first read after a pause, on some kernels): once
        # per oracle to prove it sees our locks (a follower does it ahead: prove_proc_locks), else
        # only when a lock file was replaced.
        if replaced or not self._proc_locks_seen:
            held = _locked_inodes()
            if ours[1] not in held:  # the proof below would be blind here: refuse rather than guess
                raise OSError(
                    f"/proc/locks does not list the lock this process holds on {self._path(name, 'lock')}:"
                    f" a deleted or replaced lock file could not be detected in {self.directory}"
                )
            self._proc_locks_seen = True
        if not replaced:
            return
        term = previous.token if previous else "?"
        if _lock_is_still_held(previous_lock, held):
            raise LockFileReplaced(
                f"{self._path(name, 'lock')} was deleted or replaced while term {term} held it, and"
                f" that term's lock on the old file (inode {previous_lock[1]}) is still held: waiting"
                f" until it is released"
            )
        if not _in_initial_pid_namespace() and namespace != _pid_namespace():
            raise LockFileReplaced(
                f"{self._path(name, 'lock')} was deleted or replaced since term {term}, which ran in"
                f" another pid namespace: from this one its locks and processes are invisible, so"
                f" nothing proves it over. A claimant in that namespace or on the host can take"
                f" over; or, once no process of term {term} runs, remove \"lock\" from"
                f" {self._path(name, 'leader')}"
            )

    # -- Oracle ----------------------------------------------------------------------------

    def contender(self, name: str, identity: str, metadata: Dict[str, Any], on_change: OnChange) -> "FileContender":
        return FileContender(self, name, identity, metadata, on_change)

    def _lock_is_held(self, name: str) -> bool:
        try:
            with self._at() as directory:
                fd = _open_file(directory, self._path(name, "lock"), os.O_RDONLY, private=True)
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
        if self._lock_is_held(name):
            return self.read_record(name)
        leader, lock, _ = self._load_record(name)
        # A leader still holding a lock file that was deleted or replaced under it.
        if lock is not None and lock != self.lock_file_now(name) and _lock_is_still_held(lock):
            return leader
        return None

    def dismiss(self, name: str) -> bool:
        leader = self.find_leader(name)
        if leader is None:
            return False
        with self._at() as directory:
            request = json.dumps({"token": leader.token, "at": time.time()}).encode()
            _write_atomically(directory, self._path(name, "dismiss"), request)
        return True

    def dismissal_for(self, name: str, token: Optional[int], directory: Optional[int] = None) -> bool:
        """True if a dismissal names the term ``token``. The request is consumed either way: one
        naming another term is stale (that term is over) and must not wake the leader again."""
        path = self._path(name, "dismiss")
        with self._at(directory) as at:
            try:
                fd = _open_file(at, path, os.O_RDONLY, private=False)
            except FileNotFoundError:
                return False
            try:
                with os.fdopen(fd, "r", encoding="utf-8") as handle:
                    request = json.load(handle)
            except ValueError:
                request = {}  # torn by hand: not a request for anyone
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.basename(path), dir_fd=at)
        return isinstance(request, dict) and request.get("token") == token

    # -- the fleet view (Oracle.elections) ----------------------------------------------------

    def elections(self) -> List[Election]:
        """Every ``NAME.lock`` in the directory that is a regular file (a symlink is skipped,
        never followed), with :meth:`find_leader`'s answer. Contenders: None (/proc/locks shows
        waiters, but not those of processes in other pid namespaces)."""
        names = []
        with self._at() as directory:
            for entry in os.listdir(directory):
                if not entry.endswith(".lock") or entry == ".lock":
                    continue
                try:
                    info = os.stat(entry, dir_fd=directory, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    names.append(entry[: -len(".lock")])
        return [Election(name, self.find_leader(name)) for name in sorted(names)]


class _DismissalWatch:
    """One thread per directory in this process that tells leaders of a dismissal request.

    A leader needs nothing else checked on a schedule (the kernel lock can't lapse), so its
    term has no periodic refresh: the leaders of one process cost one directory listing per
    ``check_interval`` together, and nothing at all while none of them leads.
    """

    def __init__(self, oracle: FileOracle, interval: float):
        self.oracle = oracle
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
            # One walk from / per round for every leader of the directory (each walk checks every
            # component: a walk per leader cost 1,000 crowns 4x the CPU at rest).
            with contextlib.ExitStack() as cycle:
                try:
                    directory: Optional[int] = cycle.enter_context(self.oracle._at())
                    entries = os.listdir(directory)
                except OSError:
                    # Gone or refused: the leaders' locks still hold (each says so below).
                    directory, entries = None, []
                requested = {entry[: -len(".dismiss")] for entry in entries if entry.endswith(".dismiss")}
                for name in requested.intersection(watched):
                    for contender in watched[name]:
                        contender._notify()  # the engine refreshes; refresh() reads the request
                for contenders in watched.values():
                    for contender in contenders:
                        contender.report_if_moved(directory)


_watches: Dict[str, _DismissalWatch] = {}
_watches_lock = threading.Lock()


def _dismissal_watch(oracle: FileOracle) -> _DismissalWatch:
    with _watches_lock:
        watch = _watches.get(oracle.directory)
        if watch is None:
            watch = _watches[oracle.directory] = _DismissalWatch(oracle, oracle.check_interval)
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


class FileContender(ContenderBase):
    """One crown's descriptor on ``NAME.lock`` and, while following, its waiter.

    Only the loop thread uses ``_fd``; a waiter that gets the lock parks its own descriptor in
    ``_granted_fd``, and the loop thread swaps it in (never closing a descriptor under a
    flock() call of its own).
    """

    oracle: "FileOracle"

    def __init__(self, oracle: FileOracle, name: str, identity: str, metadata: Dict[str, Any], on_change: OnChange):
        super().__init__(oracle, name, identity, metadata, on_change)
        self._path = oracle._path(name, "lock")
        self._fd: Optional[int] = None
        self._granted_fd: Optional[int] = None  # a waiter's descriptor that holds LOCK_EX for us
        self._held = False  # we hold LOCK_EX (by claim or by the waiter)
        self._waiter: Optional[_Waiter] = None
        self._leader: Optional[Leader] = None
        self._term_lock: Optional[LockId] = None  # the file our term locked
        self._moved_reported = False
        _live_contenders.add(self)

    def _descriptor(self) -> int:
        with self._lock:
            self._check_open()
            if self._granted_fd is not None:
                old, self._fd, self._granted_fd = self._fd, self._granted_fd, None
                if old is not None:
                    os.close(old)
            fd = self._fd
        if fd is None:
            fd = self.oracle.open_lock(self.name)
            with self._lock:
                if not self.usable:
                    os.close(fd)
                    self._check_open()
                self._fd = fd
        return fd

    def claim(self) -> Claim:
        fd = self._locked_descriptor()
        if fd is None:
            return Claim(won=False, leader=self.oracle.read_record(self.name))
        try:
            ours = os.fstat(fd)
            lock = (ours.st_dev, ours.st_ino)
            with self.oracle._at() as directory, self.oracle._claim_section(directory):
                previous, previous_lock, namespace = self.oracle._load_record(self.name, directory)
                self.oracle._check_predecessor(self.name, previous, previous_lock, namespace, lock)
                token = (previous.token or 0) + 1 if previous is not None else 1
                leader = Leader(self.identity, dict(self.metadata), token, time.time())
                # A stale request must not hit this term.
                self.oracle.dismissal_for(self.name, token, directory)
                self.oracle.write_record(self.name, leader, lock, directory)
        except BaseException:
            self.abdicate()
            raise
        self._leader = leader
        self._term_lock = lock
        self._moved_reported = False
        self._enter(Phase.LEADING)
        _dismissal_watch(self.oracle).add(self.name, self)
        return Claim(True, leader, token, None, None, (fd,))

    def _locked_descriptor(self) -> Optional[int]:
        """Our descriptor, holding LOCK_EX on the file that is at the path now; None if another
        process holds that file. A lock on a file no longer at the path (deleted or replaced since
        we or our waiter opened it) is worth nothing to a claimant: drop it, open the new one."""
        for _ in range(_REOPENS):
            fd = self._descriptor()
            with self._lock:
                held = self._held
            if not held:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return None
                with self._lock:
                    self._held = True
            info = os.fstat(fd)
            if info.st_nlink > 0 and self.oracle.lock_file_now(self.name) == (info.st_dev, info.st_ino):
                return fd
            self._drop()
        raise OSError(f"{self._path} was replaced {_REOPENS} times while this process locked it")

    def report_if_moved(self, directory: Optional[int] = None) -> None:
        """From the dismissal watch: say so, once a term, if our lock file left the path. The term
        goes on (its lock still holds); claimants wait until it ends (_check_predecessor).
        ``directory``: the watch's descriptor of the directory for this round, if it has one."""
        lock, leader = self._term_lock, self._leader
        if lock is None or leader is None or self._moved_reported:
            return
        try:
            now = self.oracle.lock_file_now(self.name, directory)
        except OSError as exc:  # the way to the directory is refused now (a symlink swapped in)
            self._moved_reported = True
            logger.warning(
                "%s while this process leads %r (token %s): the term goes on with its lock, but no"
                " dismissal or claim can reach this directory until that is repaired",
                exc, self.name, leader.token,
            )
            return
        if now != lock:
            self._moved_reported = True
            logger.warning(
                "%s was deleted or replaced while this process leads %r (token %s) on it: the term goes"
                " on with the unlinked file, and a successor waits until this term's lock is released",
                self._path, self.name, leader.token,
            )

    def refresh(self) -> Claim:
        leader = self._leader
        with self._lock:
            held = self._held and self.usable
        if not held or leader is None:
            return Claim(False)
        if self.oracle.dismissal_for(self.name, leader.token):
            # Stay out long enough for a waiting follower's thread to be scheduled and lock.
            return Claim(False, leader=None, yield_for=2 * self.oracle.check_interval)
        return Claim(True, leader, leader.token, None, None, (self._fd,))

    def watch(self, leader: Optional[Leader]) -> bool:
        fd = self._descriptor()  # creates the directory and lock file if needed; swaps in a grant
        self.oracle.prove_proc_locks(fd)
        with self._lock:
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
                fd = self.oracle.open_lock(self.name)
                waiter = _Waiter(self._path, fd, self)
                waiter.thread.start()
            self._waiter = waiter
        return True

    def _granted(self, waiter: _Waiter) -> bool:
        """From the waiter's thread: it holds LOCK_EX for us. False if we no longer want it."""
        with self._lock:
            if self._waiter is waiter:
                self._waiter = None
            if not self.usable or self._held:
                return False
            self._granted_fd = waiter.fd
            self._held = True
        self._notify()
        return True

    def abdicate(self) -> None:
        try:
            self._descriptor()  # a lock granted to the waiter is swapped in, then released
        except RuntimeError:
            return  # closed: close() released everything
        with self._lock:
            if not self._held or not self.usable:
                return
            if self.phase is Phase.LEADING:
                self._enter(Phase.FOLLOWING)
        self._leader = self._term_lock = None
        _dismissal_watch(self.oracle).discard(self.name, self)
        self._drop()

    def _drop(self) -> None:
        """Close our descriptor, never flock(LOCK_UN) it: the lock belongs to the open file
        description, which the term's child processes share; unlocking would free it under a
        child that still runs. Closing drops our reference; the lock goes with the last one."""
        with self._lock:
            fd, self._fd, self._held = self._fd, None, False
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            if not self.usable:
                return
            self._enter(Phase.CLOSED)
            fds = [fd for fd in (self._fd, self._granted_fd) if fd is not None]
            self._fd = self._granted_fd = None
            self._held = False
            waiter, self._waiter = self._waiter, None
        _dismissal_watch(self.oracle).discard(self.name, self)
        if waiter is not None:
            with _waiters_lock:
                if not waiter.granted:
                    waiter.owner = None
                    _orphans.setdefault(waiter.path, waiter)
        for fd in fds:
            os.close(fd)  # frees our lock unless a term's child process still holds a copy

    def _forget_after_fork(self) -> None:
        keep = fds_kept_across_fork()
        for fd in (self._fd, self._granted_fd):
            if fd is not None and fd not in keep:
                try:
                    os.close(fd)  # our copy only: the parent's lock stays held by the parent
                except OSError:
                    pass
        self._fd = self._granted_fd = None
        self._waiter = None
        self._held = False


_live_contenders: "weakref.WeakSet[FileContender]" = weakref.WeakSet()
_section_lock = threading.Lock()  # one claim section at a time in this process; no fork during one


def _before_fork() -> None:
    _section_lock.acquire()


def _after_fork_in_parent() -> None:
    _section_lock.release()


def _after_fork_in_child() -> None:
    global _waiters_lock, _watches_lock, _section_lock
    _section_lock = threading.Lock()
    # The waiters' threads did not cross the fork; their descriptors did: close our copies (this
    # runs before the contenders' own after-fork handlers, which forget their waiters).
    waiters = list(_orphans.values()) + [c._waiter for c in list(_live_contenders) if c._waiter is not None]
    for waiter in waiters:
        try:
            os.close(waiter.fd)
        except OSError:
            pass
    _orphans.clear()
    _waiters_lock = threading.Lock()
    _watches.clear()  # their threads did not cross the fork
    _watches_lock = threading.Lock()


_forksafe.at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
