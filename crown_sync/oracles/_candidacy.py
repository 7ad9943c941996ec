"""Candidacies (see :doc:`ranking`) on the lease oracles (memcached, Redis, NATS KV) and the file
oracle. ZooKeeper's and PostgreSQL's are in their packages.

* Lease oracles: one candidates record per election, ``<key_prefix><name>=candidates`` (``=`` is
  never in an election name, so the key is no election's), a JSON object {candidate key: candidate
  with ``expires``, the oracle's wall clock}, updated by compare-and-set through the oracle's
  shared store. Each candidate renews its entry about every ``ttl / 3`` (a daemon thread) and a
  reader drops entries past their expiry: a dead candidate is gone within ``ttl``.
* File oracle: a directory ``<name>.candidates`` beside the lock files, with one file per
  candidate, locked with ``flock()`` by its candidate for as long as it stands: the kernel drops
  the lock with the process, so a file nobody holds is a dead candidate's (the reader removes it).
"""

import contextlib
import fcntl
import json
import logging
import math
import os
import threading
from typing import Any, Dict, Iterator, List, Optional

import tenacity

from ..oracle import Candidacy, Candidate
from ._base import bounded
from .file import _check_file, open_directory

__all__ = ["CandidacyBase", "LeaseCandidacy", "FileCandidacy", "SUFFIX"]

logger = logging.getLogger("crown_sync.oracles")

#: Appended to an election's key (lease oracles) for its candidates record.
SUFFIX = "=candidates"


class CandidacyBase(Candidacy):
    """A lock for the candidacy's state, and a closed flag (close() may come from any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False

    @contextlib.contextmanager
    def _open(self) -> Iterator[None]:
        """Hold the lock; RuntimeError once closed."""
        with self._lock:
            if self._closed:
                raise RuntimeError("candidacy closed")
            yield


class _Conflict(Exception):
    """Another candidate wrote the record between our read and our compare-and-set."""


class LeaseCandidacy(Candidacy):
    """A candidacy in the election's candidates record (see the module docstring)."""

    def __init__(self, oracle: Any, name: str, candidate: Candidate):
        self._oracle, self._me = oracle, candidate
        self._key = oracle.key(name) + SUFFIX
        oracle.check_key(self._key, "name")
        self._ttl = float(oracle.ttl)
        self._lock = threading.Lock()  # one update at a time: the loop's reads, the renewals
        self._closed = threading.Event()
        self._renewer: Optional[threading.Thread] = None

    def candidates(self) -> List[Candidate]:
        if self._closed.is_set():
            raise RuntimeError("candidacy closed")
        entries = self._update(stand=True, renew=False)
        if self._renewer is None:
            self._renewer = threading.Thread(target=self._renew, name=f"crown-sync:candidacy:{self._key}", daemon=True)
            self._renewer.start()
        return [c for c in map(Candidate.from_dict, entries.values()) if c is not None]

    def close(self) -> None:
        """Withdraw our entry (so the next claimant does not yield to us), unless a renewal is
        stuck on the server: then the entry expires within ttl. Bounded by the store's timeout."""
        if self._closed.is_set():
            return
        self._closed.set()
        bounded(self._lock, 0.5, self._withdraw, lambda: None)

    def _withdraw(self) -> None:
        try:
            self._retrying()(self._update_once, False, False)
        except Exception as exc:
            logger.debug("withdrawing candidacy %s failed: %s", self._key, type(exc).__name__)

    def _renew(self) -> None:
        while not self._closed.wait(self._ttl / 3):
            try:
                self._update(stand=True, renew=True)
            except Exception as exc:  # the next round tries again; a reader sees us until expiry
                logger.debug("renewing candidacy %s failed: %s", self._key, type(exc).__name__)

    def _update(self, stand: bool, renew: bool) -> Dict[str, Dict[str, Any]]:
        """The live entries after making sure ours is there (``stand``) or not: one read, plus a
        compare-and-set when something must change; a lost race reads and tries again."""
        with self._lock:
            return self._retrying()(self._update_once, stand, renew)

    @staticmethod
    def _retrying() -> tenacity.Retrying:
        return tenacity.Retrying(stop=tenacity.stop_after_attempt(10), wait=tenacity.wait_random(0, 0.02),
                                 retry=tenacity.retry_if_exception_type(_Conflict), reraise=True)

    def _update_once(self, stand: bool, renew: bool) -> Dict[str, Dict[str, Any]]:
        value, version = self._oracle._shared("read", self._key)
        now = self._oracle.clock()
        entries = _entries(value)
        live = {key: entry for key, entry in entries.items() if entry.get("expires", 0) > now}
        mine = live.get(self._me.key)
        if stand and (renew or mine is None):
            live[self._me.key] = dict(self._me.to_dict(), expires=now + self._ttl)
        elif not stand:
            live.pop(self._me.key, None)
        if live == entries:
            return live
        data = json.dumps(live, sort_keys=True).encode()
        expire = int(math.ceil(self._ttl * 3))  # the whole record, once every candidate has gone
        done = (self._oracle._shared("create", self._key, data, expire) if version is None
                else self._oracle._shared("replace", self._key, data, version, expire))
        if not done:
            raise _Conflict()
        return live


def _entries(value: Optional[bytes]) -> Dict[str, Dict[str, Any]]:
    try:
        record = json.loads(value) if value is not None else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(record, dict):
        return {}
    return {key: entry for key, entry in record.items() if isinstance(entry, dict)}


class FileCandidacy(CandidacyBase):
    """A candidacy as a ``flock()``-held file in the election's candidates directory, reached as
    the file oracle reaches its own files: walked from ``/`` afresh, never through a symlink, each
    component and file checked (see :func:`.file.open_directory`)."""

    def __init__(self, oracle: Any, name: str, candidate: Candidate):
        super().__init__()
        self._oracle, self._me = oracle, candidate
        self._subdirectory = f"{name}.candidates"
        self._file = f"c-{candidate.key}.json"
        self._fd: Optional[int] = None

    @contextlib.contextmanager
    def _directory(self) -> Iterator[int]:
        self._oracle.ensure_directory()
        fd = open_directory(os.path.join(self._oracle.walked_directory, self._subdirectory), create=True)
        try:
            yield fd
        finally:
            os.close(fd)

    def candidates(self) -> List[Candidate]:
        with self._open():
            if self._fd is None:
                with self._directory() as directory:
                    self._fd = self._publish(directory)
        with self._directory() as directory:
            names = sorted(e for e in os.listdir(directory) if e.startswith("c-") and e.endswith(".json"))
            return [c for c in (_read_live(directory, name) for name in names) if c is not None]

    def _publish(self, directory: int) -> int:
        """Our file, written and locked under a temporary name, then renamed into place: a
        reader never sees it unlocked (it would take it for a dead candidate's)."""
        temporary = f"t-{self._me.key}"
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644,
                     dir_fd=directory)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, json.dumps(self._me.to_dict()).encode())
            os.rename(temporary, self._file, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self) -> None:
        with self._lock:
            self._closed = True
            fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                with self._directory() as directory:
                    # Before unlocking: no reader takes it for a dead candidate's.
                    os.unlink(self._file, dir_fd=directory)
            os.close(fd)


def _read_live(directory: int, name: str) -> Optional[Candidate]:
    """The candidate of the file ``name`` if it is still locked by it; a file nobody holds is
    removed; a symlink or a file someone else planted is no candidate (and left alone)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=directory)
    except OSError:
        return None  # withdrawn meanwhile, or a symlink (never followed)
    try:
        try:
            _check_file(fd, name, directory, private=False)
        except PermissionError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: a live candidate
            with os.fdopen(os.dup(fd), "rb") as file:
                try:
                    return Candidate.from_dict(json.loads(file.read()))
                except (ValueError, UnicodeDecodeError):
                    return None
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=directory)  # we got the lock: its candidate is gone
        return None
    finally:
        os.close(fd)
