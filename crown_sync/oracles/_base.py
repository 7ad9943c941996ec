"""What every oracle repeats, written once: a contender's named phases, fork handling, safe
``on_change`` delivery, option validators and the leader record.

An oracle module subclasses :class:`OracleBase` and :class:`ContenderBase` and keeps only what is
specific to its server. The phases of a contender, and the only moves between them:

==========  =====================================================================  ===================
phase       meaning                                                                 may become
==========  =====================================================================  ===================
FOLLOWING   not leading: about to claim, or watching the leader                     PENDING, LEADING
PENDING     holds the election's key but may not start yet (a quarantine)           FOLLOWING, LEADING
LEADING     a term runs on our lease                                                FOLLOWING
CLOSED      closed by its crown: every call but close() raises                      FORKED
FORKED      a copy inherited across fork(): it must never act (the parent's lease)  (none)
==========  =====================================================================  ===================

Every phase may also become CLOSED or FORKED. Fork is detected twice: by the library's one
at-fork handler (:func:`crown_sync._forksafe.track`), and by comparing the pid the contender was
made in, for servers that fork from C without running Python's at-fork handlers (uWSGI).
"""

import dataclasses
import enum
import json
import logging
import math
import os
import threading
from typing import Any, Callable, Dict, List, Optional

from .. import _forksafe
from ..oracle import Contender, Leader, OnChange, Oracle

__all__ = [
    "Phase",
    "OracleBase",
    "ContenderBase",
    "seconds",
    "seconds_between",
    "leader_of",
    "record_of",
    "bounded",
    "Election",
    "ListingUnsupported",
]

logger = logging.getLogger("crown_sync.oracles")


class Phase(enum.Enum):
    FOLLOWING = "following"
    PENDING = "pending"
    LEADING = "leading"
    CLOSED = "closed"
    FORKED = "forked"


_MOVES = {
    Phase.FOLLOWING: {Phase.PENDING, Phase.LEADING},
    Phase.PENDING: {Phase.FOLLOWING, Phase.LEADING},
    Phase.LEADING: {Phase.FOLLOWING},
    Phase.CLOSED: set(),
    Phase.FORKED: set(),
}


def seconds(option: str, value: Any) -> float:
    """A positive, finite number of seconds, or a TypeError/ValueError naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{option} must be a number of seconds, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{option} must be a positive finite number of seconds, got {value!r}")
    return value


def seconds_between(option: str, value: Any, low: float, high: float) -> float:
    """A number of seconds in ``[low, high]`` (``low`` may be 0), or an error naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{option} must be a number of seconds, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{option} must be between {low:g} and {high:g} seconds, got {value!r}")
    return value


def record_of(identity: str, metadata: Dict[str, Any], token: Optional[int], since: Optional[float]) -> Dict[str, Any]:
    """The leader fields of a record on the oracle (an oracle adds its own fields beside them)."""
    return {"identity": identity, "metadata": metadata, "token": token, "since": since}


def leader_of(record: Optional[Dict[str, Any]]) -> Optional[Leader]:
    """The :class:`Leader` a record names (None for no record)."""
    if record is None:
        return None
    token = record.get("token")
    return Leader(
        identity=str(record.get("identity", "")),
        metadata=dict(record.get("metadata") or {}),
        token=token if isinstance(token, int) and not isinstance(token, bool) else None,
        since=record.get("since"),
    )


@dataclasses.dataclass(frozen=True)
class Election:
    """One election as :meth:`OracleBase.elections` lists it.

    ``leader``: None when nobody leads now; ``contenders``: how many contenders (the leader
    included) wait on the oracle, None when the oracle cannot tell.
    """

    name: str
    leader: Optional[Leader] = None
    contenders: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


class ListingUnsupported(NotImplementedError):
    """This oracle (or its server, as configured) cannot list its elections; the message says why."""


class OracleBase(Oracle):
    """An oracle with the shared plumbing. Subclasses set :attr:`description` and may override
    :meth:`_forget_after_fork` and :attr:`max_record`."""

    #: Largest JSON leader record (identity + metadata) the server stores, in bytes.
    max_record: int = 512 * 1024

    def __init__(self) -> None:
        self._pid = os.getpid()
        _forksafe.track(self)

    def check_contender(self, name: str, identity: str, metadata: Dict[str, Any]) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        try:
            size = len(json.dumps(record_of(identity, metadata, None, None)))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metadata must be JSON-serializable: {exc}") from None
        if size > self.max_record:
            raise ValueError(
                f"metadata too large for a leader record on {self.description} ({size} bytes > {self.max_record})"
            )

    def elections(self) -> List[Election]:
        """Every election on the oracle (the fleet view), read without contending, in one round
        trip or a few. What each oracle lists, in one place:

        ==========  =================================================================  ===========
        oracle      how                                                                contenders
        ==========  =================================================================  ===========
        file        the directory's ``*.lock`` files and their leader records          no (None)
        memcached   ``lru_crawler metadump hash``: keys with the prefix; one ``get``   no (None)
        Redis       ``SCAN MATCH <prefix>*`` and one ``MGET``                          no (None)
        NATS KV     the last value of every key of the bucket (one watcher)            no (None)
        ZooKeeper   children of ``path_prefix`` and each election's queue              yes
        PostgreSQL  our advisory locks in ``pg_locks`` (held and awaited)              yes
        ==========  =================================================================  ===========

        A lease oracle lists every record (``released`` ones with no leader); PostgreSQL knows
        an election's name only from its holder's record, so it lists led elections only.
        Raises :class:`ListingUnsupported` (naming why) when the oracle cannot list.
        """
        raise ListingUnsupported(f"{type(self).__name__} ({self.description}) cannot list its elections")

    def _check_process(self) -> None:
        """Call before using a shared connection: in a process forked without Python's at-fork
        handlers (uWSGI), forget the parent's connections first."""
        _forksafe.check_process()  # runs every after-fork step of the library, once
        if os.getpid() != self._pid:  # made before check_process last ran
            self._after_fork_in_child()

    def _after_fork_in_child(self) -> None:
        self._pid = os.getpid()
        self._forget_after_fork()

    def _forget_after_fork(self) -> None:
        """In a forked child: drop (never close or use) connections and locks of the parent."""


class ContenderBase(Contender):
    """A contender with a named phase, a lock, safe ``on_change`` delivery and fork detection.

    Subclasses call :meth:`_enter` to move between phases (an impossible move raises, so a bug
    shows at once), :meth:`_check_open` before any I/O and :meth:`_notify` (never under the lock)
    to wake the engine; they may override :meth:`_forget_after_fork`.
    """

    def __init__(self, oracle: Oracle, name: str, identity: str, metadata: Dict[str, Any], on_change: OnChange):
        self.oracle = oracle
        self.name = name
        self.identity = identity
        self.metadata = dict(metadata or {})
        self.phase = Phase.FOLLOWING
        self._on_change = on_change
        self._lock = threading.RLock()
        self._pid = os.getpid()
        _forksafe.track(self)

    def _enter(self, phase: Phase) -> None:
        current = self.phase
        if phase is current:
            return
        allowed = set() if current is Phase.FORKED else _MOVES[current] | {Phase.CLOSED, Phase.FORKED}
        if phase not in allowed:
            raise RuntimeError(f"{type(self).__name__} of {self.name!r}: no move from {current.value} to {phase.value}")
        self.phase = phase

    @property
    def usable(self) -> bool:
        """Not closed, and in the process that made it."""
        _forksafe.check_process()  # forked without Python's at-fork handlers (uWSGI): run them
        if self.phase is not Phase.FORKED and os.getpid() != self._pid:
            self._after_fork_in_child()
        return self.phase not in (Phase.CLOSED, Phase.FORKED)

    def _check_open(self) -> None:
        if not self.usable:
            what = "inherited across fork(): unusable in this process" if self.phase is Phase.FORKED else "closed"
            raise RuntimeError(f"{type(self).__name__} of {self.name!r} is {what}")

    def _notify(self, lost: bool = False) -> None:
        """Tell the engine to look now; whatever the callback raises is logged, never raised."""
        if not self.usable:
            return
        try:
            if lost:
                self._on_change(lost=True)
            else:
                self._on_change()
        except Exception:
            logger.exception("on_change callback of %r failed", self.name)

    def _me(self, token: Optional[int], since: Optional[float]) -> Leader:
        return Leader(self.identity, dict(self.metadata), token, since)

    def _after_fork_in_child(self) -> None:
        self.phase = Phase.FORKED
        self._lock = threading.RLock()  # the parent's may have been held by a thread that is gone
        self._forget_after_fork()

    def _forget_after_fork(self) -> None:
        """In a forked child: drop (never close or use) what the parent's contender owns."""


def bounded(lock: "threading.RLock", wait: float, then: Callable[[], None], otherwise: Callable[[], None]) -> None:
    """Run ``then()`` holding ``lock`` if it can be had within ``wait`` seconds, else ``otherwise()``
    (which must unblock whoever holds it, e.g. by shutting a socket): close() stays bounded in time
    even when a call is stuck on a frozen server."""
    if lock.acquire(timeout=wait):
        try:
            then()
        finally:
            lock.release()
    else:
        otherwise()
