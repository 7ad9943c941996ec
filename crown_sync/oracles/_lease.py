"""A lease kept as a record in one key of a key-value server that has compare-and-set.

The machinery of the memcached, Redis and NATS KV oracles; each of those modules only says how to
``read``, ``create`` and ``replace`` a key on its server (a :class:`LeaseStore`) and, where the
server can push changes, calls :meth:`LeaseContender.nudge` so that a follower reads at once.

One key per election, ``<key_prefix><name>``, holds a JSON record in one of four states:

* ``held``: a leader runs a term (identity, metadata, token, since, an acquisition ``nonce``);
* ``pending``: a claimant holds the key but may not start yet (see "quarantine" below);
* ``vacated``: the holder was dismissed or closed without a clean release;
* ``released``: the holder released it cleanly after its child stopped.

Every write carries a fresh random write id, so the same bytes never appear twice in the key.

How a lease lives and dies (the safety argument)
------------------------------------------------
The lease is measured on the contenders' own clocks (:func:`crown_sync.clock.monotonic`, which
keeps counting while a host is suspended), never on the server's. A leader renews by CAS (only
while the record is still its own: same nonce, state ``held``) every ``renew_interval``. Its
term's deadline is the START of the last successful renewal (or of the claim) plus ``ttl`` minus
``margin``; the engine stops the child by then.

A follower may replace a record it does not own only by CAS over the exact version it has seen,
and only when

1. the record is ``released`` (its holder's child had stopped before it wrote that), or
2. it has seen the very same bytes for at least ``ttl``, counted from the END of the read that
   first showed them. That read came back after the holder's last successful renewal was
   applied, and the holder started that renewal before it was applied, so the holder's deadline
   (renewal start + ttl - margin) is at least ``margin`` in the past by then.

When the key is absent (first use, a server restart without persistence, a flush, an eviction,
an administrator's delete) nobody can know whether a leader still runs on a lease the server
forgot. The claimant then creates a ``pending`` record and waits one ``ttl`` (its quarantine,
counted from the end of the create) before it starts, renewing the pending record meanwhile. Any
earlier leader made its last successful renewal before the key vanished, hence before our create,
so its deadline has passed when the quarantine ends; and nobody else can have started meanwhile,
because starting needs the key, which we held all along (our pending record is read and converted
by CAS). The leader that lost the key finds out at its next renewal (a missing key or a lost CAS
ends the term at once) and in any case stops at its deadline.

So the server's clock and its expiry granularity do not enter the argument: the server's own
expiry of a record (``2 * ttl + 2`` seconds after the last write of a ``held`` or ``vacated``
record; a day for ``pending`` and ``released`` records) only collects abandoned records, and is
long enough that followers take over a crashed leader's record by CAS before it expires. A
``pending`` record lives long because it may be renewed only at the engine's claims (every
``monitor_delay`` with ``monitor_leader=False``); an abandoned one is stale after a ``ttl`` and
taken over like any other. ``margin`` covers the child's kill, scheduling jitter and the rate
difference of two hosts' clocks over a ``ttl`` (see :func:`default_margin`; at least ``ttl / 100``).

Dismissal: ``dismiss`` CAS-replaces the ``held`` record with ``vacated``; the leader's next
renewal sees it, the engine stops the child and the leader releases. Its refresh asks the engine
to stay out of the contest for ``dismissed_yield`` (``2 * poll_interval + 1`` s), so a watching
follower, not the dismissed leader, takes the released lease.

Fencing tokens: ``token = max(previous token + 1, oracle.token_floor(store))``, computed when the
term starts, where "previous token" is the one in the record being replaced (every state keeps the
latest term's token), so tokens rise strictly while the record survives. The floor (by default the
oracle's wall clock in microseconds) is what keeps them rising when the record is lost; a server
with a durable counter overrides :meth:`LeaseOracle.token_floor`.

Connection loss: every call has ``timeout``; a failed call raises (the engine retries until the
deadline, then stops the child). Followers' poll errors, failed takeovers included, are logged and
retried at the poll interval.

One connection, one poller: an oracle object has ONE store (connection) for all its contenders
and its own calls (each contender holds a :class:`_Handle` on it; the last handle to close closes
it), and ONE poller thread for all its following contenders (:class:`_Poller`), which reads the
keys of every contender due in one request where the server can (one ``gets_many``, one pipelined
round trip, concurrent NATS reads). So 1,000 crowns of one process on one URL use one connection
and the crowns' own loop threads plus a fixed few, not a connection and a poller thread each.

Herds: with many followers of one election, a handoff must not make each of them hit the server.
A follower whose poller sees a new term (a ``held`` record of another holder) tells the engine,
whose next ``claim()`` is answered from that read (no request), and keeps watching; a pushed
record counts as such a read. Within a process, once one contender tried to take a key over in a
round, the others of that key read again in the next round (once for all) instead of trying too.
Across processes, a server that can pick one heir wakes that process alone (NATS: a queue
group; Redis: a random live member of the election's heirs), whose followers look at once; the
other followers' processes do not wake at all, and read the new term at their next poll. A
release pushed to every follower (Redis, when no heir is known) is taken over at the follower's
*turn* (``nudge``'s ``turn``): each draws a random one of as many turns as there are listeners,
and a follower whose turn comes after the takeover was pushed drops its attempt (see each
server's docs).

Requests at rest: a follower makes one read per ``poll_interval`` (the engine's periodic
re-claims are answered from the poller's fresh read without a request); a leader one CAS per
``renew_interval``, over the version of its own last write where the store knows it
(:meth:`LeaseStore.written_version`; else a read first), and it releases the same way. The poller
takes a released or stale lease over itself, by CAS with the version its read just returned, or
the version a push carried with a ``released`` record (no read), and hands the won lease to the
engine's next ``claim()``
(renewed first if less than ``renew_interval + margin`` of it is left, so that the term outlasts
the engine's first refresh). Crash failover: a follower takes over ``ttl`` after it first saw the
leader's last renewal, i.e. at most ``ttl + poll_interval`` after the crash.
"""

import abc
import heapq
import itertools
import json
import logging
import math
import secrets
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import tenacity

from ..clock import monotonic as _monotonic  # the clock of every deadline (counts a suspend)
from ..oracle import Claim, Leader, OnChange
from ._base import (ContenderBase, Election, ListingUnsupported, OracleBase, Phase, bounded, leader_of,
                    record_of, seconds)

__all__ = ["LeaseStore", "LeaseOracle", "LeaseContender", "default_margin", "record_token", "MIN_MARGIN_RATIO", "URL_OPTIONS"]

logger = logging.getLogger("crown_sync.oracles.lease")

HELD, PENDING, VACATED, RELEASED = "held", "pending", "vacated", "released"
_STATES = (HELD, PENDING, VACATED, RELEASED)
_RELEASED_EXPIRE = 86400  # keeps the token and the "free now" mark of a cleanly stopped election
# A pending record may be renewed only at the engine's claims (every monitor_delay, with
# monitor_leader=False), so it must not expire between them: that would restart the quarantine
# at every claim. A crashed claimant's pending record is taken over as stale after a ttl anyway.
_PENDING_EXPIRE = 86400

#: The query options of every lease oracle's URL (a module adds its own), for urls.parse_options.
URL_OPTIONS: Dict[str, Any] = {
    "ttl": float,
    "renew_interval": float,
    "poll_interval": float,
    "margin": float,
    "key_prefix": str,
    "connect_timeout": float,
    "timeout": float,
}

#: The smallest margin allowed, as a fraction of ttl: ten times the worst rate difference of two
#: hosts' clocks under NTP (each may be slewed by up to 500 ppm: 0.1% between two).
MIN_MARGIN_RATIO = 0.01


def default_margin(ttl: float) -> float:
    """The default margin: a second (a quarter of a short ttl) for the child's kill and the
    scheduler, but at least ttl / 10 (clock-rate differences grow with the time measured)."""
    return max(min(1.0, ttl / 4), ttl / 10)


class LeaseStore(abc.ABC):
    """The oracle's connection to the server, shared by all its contenders: every method may be
    called from several threads at once (a store serializes its calls on its one connection, or
    uses a small fixed pool). A contender uses it through a :class:`_Handle`.

    ``version`` is whatever the server's compare-and-set compares (a memcached CAS id, a NATS
    revision, the bytes themselves for a server whose script compares values). ``expire`` is in
    whole seconds; a server with no per-key expiry may ignore it (its records then live until
    replaced, which costs storage, never safety). Every method raises on a failed call.
    """

    @abc.abstractmethod
    def read(self, key: str) -> Tuple[Optional[bytes], Any]:
        """(value, version), or (None, None) when the key is absent."""

    @abc.abstractmethod
    def create(self, key: str, value: bytes, expire: int) -> bool:
        """Write ``value`` only if the key is absent. False if it was present."""

    @abc.abstractmethod
    def replace(self, key: str, value: bytes, version: Any, expire: int) -> Optional[bool]:
        """Write ``value`` only if the key still has ``version``: True if done, False if the key
        changed meanwhile, None if it is absent."""

    def read_many(self, keys: List[str]) -> Dict[str, Tuple[Optional[bytes], Any]]:
        """{key: (value, version)} of every key, as :meth:`read` gives it; a server that can
        read many keys in one round trip overrides this (the shared poller's reads)."""
        return {key: self.read(key) for key in keys}

    def written_version(self, value: bytes) -> Any:
        """The version the server gave ``value`` when the calling thread last wrote it through
        this store (a create or replace that succeeded), or None if unknown. Known, it lets a
        holder renew and release by one compare-and-set over its own last write, without reading
        first (a lost CAS then reads to learn why). Default: unknown (a classic memcached ``cas``
        returns no new CAS id)."""
        return None

    def entries(self, prefix: str) -> Dict[str, Optional[bytes]]:
        """{key: value} of every key that starts with ``prefix``, in one round trip or a few (the
        fleet view); a value may be None (gone meanwhile, or not a plain value)."""
        raise ListingUnsupported(f"{type(self).__name__} cannot list keys")

    def interrupt(self) -> None:
        """Unblock a call in progress in another thread (close() that cannot wait for it)."""
        self.close()

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection (idempotent; in a forked child, only drop it)."""


class _Contended(Exception):
    """A CAS lost a race with another writer; read again."""


def _nonce() -> str:
    return secrets.token_hex(8)


def encode(record: Dict[str, Any]) -> bytes:
    record = dict(record, w=secrets.token_hex(6))  # a fresh write id: bytes never repeat
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode()


def decode(value: Optional[bytes]) -> Optional[Dict[str, Any]]:
    """The record, or None for an absent key or bytes that are not one of our records."""
    if value is None:
        return None
    try:
        record = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("state") not in _STATES:
        return None
    return record


def record_token(record: Optional[Dict[str, Any]]) -> int:
    token = record.get("token") if record else None
    return token if isinstance(token, int) and not isinstance(token, bool) else 0


def _holder(record: Optional[Dict[str, Any]], value: bytes) -> Tuple[Any, Any]:
    """Who a record is about: (state, acquisition nonce). Renewals change the bytes, not this."""
    if record is None:
        return ("?", value)
    return (record.get("state"), record.get("nonce") or record.get("prev"))


def held_leader(record: Optional[Dict[str, Any]]) -> Optional[Leader]:
    """The leader a record names: only a ``held`` record has one running."""
    return leader_of(record) if record is not None and record.get("state") == HELD else None


class LeaseOracle(OracleBase):
    """The options and the shared reads/writes of every lease oracle.

    ttl: lease length in seconds (>= 1). Crash failover takes about ``ttl + poll_interval``; after
        the server lost the key, the first claimant waits one ``ttl`` before it starts.
    margin: how long before the lease ends the leader's deadline falls (default
        ``max(min(1, ttl / 4), ttl / 10)``, at least ``ttl / 100``): time for the child to be
        killed, scheduling jitter, and clock-rate differences between hosts (they grow with ttl).
    renew_interval: how often the leader renews (default ``(ttl - margin) / 3``; at most
        ``(ttl - margin) / 2`` so that a failed renewal can be retried before the deadline).
    poll_interval: how often a follower reads the key.
    key_prefix: prepended to the election name to make the key.
    connect_timeout, timeout: socket timeouts of every call (default ``min(2.0, renew_interval)``).
    clock: the wall clock, a callable returning epoch seconds (default :func:`time.time`), read
        for the token floor and ``since`` only, never for the lease.

    A subclass sets :attr:`description`, implements :meth:`new_store` and :meth:`check_key`, and
    may override :meth:`token_floor`, :meth:`watching` and :meth:`released`.
    """

    def __init__(
        self,
        ttl: float,
        renew_interval: Optional[float],
        poll_interval: float,
        margin: Optional[float],
        key_prefix: str,
        connect_timeout: Optional[float],
        timeout: Optional[float],
        clock: Callable[[], float],
    ):
        super().__init__()
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning epoch seconds, got {type(clock).__name__}")
        self.clock = clock
        self.ttl = seconds("ttl", ttl)
        if not 1.0 <= self.ttl <= 3600:
            raise ValueError(f"ttl must be between 1 and 3600 seconds, got {self.ttl!r}")
        self.margin = default_margin(self.ttl) if margin is None else seconds("margin", margin)
        self._check_margin()
        usable = self.ttl - self.margin
        if renew_interval is None:
            self.renew_interval = usable / 3
        else:
            self.renew_interval = seconds("renew_interval", renew_interval)
            if self.renew_interval > usable / 2:
                raise ValueError(
                    f"renew_interval ({self.renew_interval}) must be at most half of ttl - margin "
                    f"({usable:g}) so that a failed renewal can be retried before the deadline; "
                    f"lower renew_interval or raise ttl"
                )
        self.poll_interval = seconds("poll_interval", poll_interval)
        if self.poll_interval > self.ttl / 2:
            raise ValueError(f"poll_interval ({self.poll_interval}) must be at most half of ttl ({self.ttl})")
        default_timeout = min(2.0, self.renew_interval)
        self.connect_timeout = default_timeout if connect_timeout is None else seconds("connect_timeout", connect_timeout)
        self.timeout = default_timeout if timeout is None else seconds("timeout", timeout)
        for option, value in (("connect_timeout", self.connect_timeout), ("timeout", self.timeout)):
            if value > usable:
                raise ValueError(f"{option} ({value}) must be at most ttl - margin ({usable:g})")
        if not isinstance(key_prefix, str):
            raise TypeError(f"key_prefix must be a str, got {type(key_prefix).__name__}")
        self.check_key(key_prefix, "key_prefix")
        self.key_prefix = key_prefix
        #: the server's expiry of held and vacated records: garbage collection only (see above).
        self.record_expire = int(math.ceil(2 * self.ttl)) + 2
        #: seconds a dismissed leader stays out of the contest after its release (see dismiss()).
        self.dismissed_yield = 2 * self.poll_interval + 1.0
        self._lock = threading.Lock()
        # One store (connection) for the oracle and all its contenders, made on demand and
        # closed with the last contender's handle (or by close()).
        self._store: Optional[LeaseStore] = None
        self._handles = 0
        self._poller: Optional[_Poller] = None  # one thread polls for every following contender

    def _check_margin(self) -> None:
        if self.margin > self.ttl / 2:
            raise ValueError(f"margin ({self.margin}) must be at most half of ttl ({self.ttl})")
        if self.margin < self.ttl * MIN_MARGIN_RATIO:
            # The lease is timed on two hosts' monotonic clocks (the leader's deadline, the
            # follower's or claimant's wait): their rates may differ, by an amount that grows
            # with the length timed.
            raise ValueError(
                f"margin ({self.margin:g}) must be at least ttl / {1 / MIN_MARGIN_RATIO:g} "
                f"({self.ttl * MIN_MARGIN_RATIO:g}): the lease is timed on different hosts' clocks, "
                f"whose rates may differ by up to 0.1% under NTP; raise margin or lower ttl"
            )

    # -- what a subclass provides ---------------------------------------------------------------

    @abc.abstractmethod
    def new_store(self) -> LeaseStore:
        """A new, lazily connecting store, safe to call from several threads (no I/O here)."""

    @abc.abstractmethod
    def check_key(self, text: str, option: str) -> None:
        """Raise ValueError naming ``option`` if ``text`` cannot be (part of) a key on the server."""

    def token_floor(self, store: LeaseStore) -> int:
        """The lowest token a new term may take: the wall clock in microseconds."""
        return int(self.clock() * 1_000_000)

    def term_token(self, store: LeaseStore, record: Optional[Dict[str, Any]]) -> int:
        """The token of a term that starts by replacing ``record`` (None: not a lease record):
        above the record's and at least the floor. A server whose floor adds nothing while a
        record exists may override this to save the floor's round trip on a handoff."""
        return max(record_token(record) + 1, self.token_floor(store))

    def start_term(self, store: LeaseStore, key: str, record: Optional[Dict[str, Any]], version: Any,
                   build: Callable[[int], bytes]) -> Optional[Tuple[int, bytes]]:
        """Replace ``record`` (at ``version``) with the held record ``build(token)`` of a new term:
        (token, bytes written), or None if the CAS lost. A server that can take the token and
        write in one step (a script) overrides this: one round trip less on every handoff."""
        token = self.term_token(store, record)
        value = build(token)
        return (token, value) if store.replace(key, value, version, self.record_expire) else None

    def watching(self, contender: "LeaseContender", store: LeaseStore) -> None:
        """A contender started following: a server that can push arranges (on the shared
        ``store``) to call ``contender.nudge()`` when the election's key changes, or when this
        process is offered a release as its heir (NATS, Redis). Called once per contender."""

    def watching_again(self, contender: "LeaseContender", store: LeaseStore) -> None:
        """A contender already hooked by :meth:`watching` follows again after a term or a claim
        (never raises, no wait)."""

    def unwatching(self, contender: "LeaseContender") -> None:
        """A contender that was watched closed: stop pushing to it (called once, never raises)."""

    def released(self, store: LeaseStore, contender: "LeaseContender") -> None:
        """A record of ``contender``'s election became ``released`` or ``vacated`` (by
        ``contender``, on ``store``): a server that can push tells the followers now."""

    # -- shared reads and writes ------------------------------------------------------------

    def key(self, name: str) -> str:
        return self.key_prefix + name

    def candidacy(self, name: str, candidate):
        """This contender's published candidacy, for ranking strategies (see docs/ranking.rst)."""
        from ._candidacy import LeaseCandidacy
        return LeaseCandidacy(self, name, candidate)

    def check_contender(self, name: str, identity: str, metadata: Dict[str, Any]) -> None:
        super().check_contender(name, identity, metadata)
        self.check_key(self.key(name), "name")

    def shared_store(self) -> LeaseStore:
        """The one store of this oracle (made on demand): its contenders' and its own calls."""
        self._check_process()
        with self._lock:
            if self._store is None:
                self._store = self.new_store()
            return self._store

    def _shared(self, method: str, *args: Any) -> Any:
        return getattr(self.shared_store(), method)(*args)

    def _handle_opened(self) -> None:
        self._check_process()
        with self._lock:
            self._handles += 1

    def _handle_closed(self, interrupt: bool) -> None:
        """A contender's handle closed: the last one closes the store (``interrupt``: a call may
        be stuck in it, cut it short) and stops the poller; a later call makes them anew."""
        with self._lock:
            self._handles -= 1
            if self._handles > 0:
                return
            store, self._store = self._store, None
            poller, self._poller = self._poller, None
        if poller is not None:
            poller.close()
        if store is not None:
            if interrupt:
                store.interrupt()
            store.close()

    def _unpoll(self, contender: "LeaseContender") -> None:
        with self._lock:
            poller = self._poller
        if poller is not None:
            poller.remove(contender)

    @property
    def poller(self) -> "_Poller":
        self._check_process()
        with self._lock:
            if self._poller is None:
                self._poller = _Poller(self)
            return self._poller

    def contender(self, name: str, identity: str, metadata: Dict[str, Any], on_change: OnChange) -> "LeaseContender":
        self.check_contender(name, identity, metadata)
        return LeaseContender(self, name, identity, metadata, on_change)

    def find_leader(self, name: str) -> Optional[Leader]:
        """The holder of a ``held`` record. A leader that crashed is still named until a
        contender takes its lease over (about ``ttl``) or the server expires the record."""
        return held_leader(decode(self._shared("read", self.key(name))[0]))

    def dismiss(self, name: str) -> bool:
        """Replace a ``held`` record (by CAS) with a ``vacated`` one. The leader's next renewal
        fails and it stops; successors start once it released (its abdicate turns the record into
        ``released``) or, if it never does, ``ttl`` after they saw the ``vacated`` record. The
        dismissed leader then stays out of the contest for ``dismissed_yield`` seconds
        (``2 * poll_interval + 1``), so that a watching follower takes over, not itself again."""
        key = self.key(name)
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(10),
            wait=tenacity.wait_random(0, 0.02),
            retry=tenacity.retry_if_exception_type(_Contended),
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                value, version = self._shared("read", key)
                record = decode(value)
                if record is None or record.get("state") != HELD:
                    return False
                vacated = _farewell(VACATED, record, HELD, record.get("identity"), by="dismiss")
                done = self._shared("replace", key, encode(vacated), version, self.record_expire)
                if done is None:
                    return False  # vanished meanwhile: nobody to dismiss
                if not done:
                    raise _Contended()
                logger.info("dismissed %s (token %s) on %s", record.get("identity"), record.get("token"), self.description)
                return True
        return False  # pragma: no cover - tenacity reraises

    def elections(self) -> List[Election]:
        """Every record under ``key_prefix`` (see :meth:`OracleBase.elections`); a key that holds
        something other than a lease record (a Redis token counter) is not an election."""
        # A connection of its own: a SCAN or a metadump of a large keyspace must not hold the
        # shared connection's turn, through which every crown of the process renews its lease.
        store = self.new_store()
        try:
            entries = store.entries(self.key_prefix)
        finally:
            store.close()
        found = []
        for key, value in sorted(entries.items()):
            record = decode(value)
            if record is not None:
                found.append(Election(key[len(self.key_prefix):], held_leader(record)))
        return found

    def close(self) -> None:
        with self._lock:
            store, self._store = self._store, None
            poller, self._poller = self._poller, None
        if poller is not None:
            poller.close()
        if store is not None:
            store.close()

    def _forget_after_fork(self) -> None:
        self._lock = threading.Lock()  # the parent's lock may have been held by a thread that is gone
        self._store = None  # the parent's: its socket is blinded; a fresh one is made on demand
        self._handles = 0  # the inherited contenders are unusable here and never close theirs
        self._poller = None  # its thread did not cross the fork


def _farewell(state: str, record: Dict[str, Any], prev_state: str, identity: Any, by: str = "") -> Dict[str, Any]:
    """A ``vacated`` or ``released`` record after ``record``: keeps its token (tokens keep rising)."""
    farewell = {"state": state, "token": record.get("token"), "prev": record.get("nonce"), "identity": identity}
    if state == VACATED:
        farewell.update(prev_state=prev_state, by=by)
    return farewell


class _Pending:
    __slots__ = ("nonce", "ready_at", "renewed_at")

    def __init__(self, nonce: str, ready_at: float, renewed_at: float):
        self.nonce = nonce
        self.ready_at = ready_at
        self.renewed_at = renewed_at


class _Handle(LeaseStore):
    """A contender's use of its oracle's one store: closing it never closes the connection that
    other contenders share (the oracle's last handle does). Other store methods (a server's token
    or term-start calls) pass through."""

    def __init__(self, oracle: "LeaseOracle"):
        self._oracle = oracle
        self.closed = False
        self._closing = threading.Lock()  # close() and interrupt() may race: count it once
        oracle._handle_opened()

    def _shared(self) -> LeaseStore:
        if self.closed:
            raise RuntimeError("the contender's store is closed")
        return self._oracle.shared_store()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._shared(), name)

    def read(self, key: str) -> Tuple[Optional[bytes], Any]:
        return self._shared().read(key)

    def create(self, key: str, value: bytes, expire: int) -> bool:
        return self._shared().create(key, value, expire)

    def replace(self, key: str, value: bytes, version: Any, expire: int) -> Optional[bool]:
        return self._shared().replace(key, value, version, expire)

    def written_version(self, value: bytes) -> Any:
        return self._shared().written_version(value)

    def interrupt(self) -> None:
        self._close(interrupt=True)

    def close(self) -> None:
        self._close(interrupt=False)

    def _close(self, interrupt: bool) -> None:
        with self._closing:
            if self.closed:
                return
            self.closed = True
        self._oracle._handle_closed(interrupt)


class _Poller:
    """The oracle's one poller thread, for all its following contenders (not a thread each).

    Each contender has a due time. A round takes every contender due, reads their keys in one
    request where the store can (:meth:`LeaseStore.read_many`; a key followed by several
    contenders of this process is read once), and runs each contender's round on that read
    (:meth:`_Follower._poll_round`), which may take a released or stale lease over. After one
    contender tried to take a key over, the others of that key wait for the next round's read
    instead of trying too: a handoff costs one attempt per process, not per follower.
    """

    def __init__(self, oracle: "LeaseOracle"):
        self._oracle = oracle
        self._cond = threading.Condition()
        self._due: Dict["LeaseContender", float] = {}  # contender -> monotonic time of its next round
        self._heap: List[Tuple[float, int, "LeaseContender"]] = []  # (due, seq, contender); stale ones skipped
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._closed = False

    def at(self, contender: "LeaseContender", delay: float) -> None:
        """Run ``contender``'s round in ``delay`` seconds, or sooner if already due sooner."""
        when = _monotonic() + delay
        with self._cond:
            if self._closed:
                return
            if self._due.get(contender, math.inf) <= when:
                return
            self._due[contender] = when
            heapq.heappush(self._heap, (when, next(self._seq), contender))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="crown-sync-lease", daemon=True)
                self._thread.start()
            self._cond.notify()

    def remove(self, contender: "LeaseContender") -> None:
        with self._cond:
            self._due.pop(contender, None)

    def _take_due(self) -> Tuple[List["LeaseContender"], Optional[float]]:
        """(contenders due now, removed from the schedule; seconds until the next one)."""
        now, due = _monotonic(), []
        while self._heap:
            when, _, contender = self._heap[0]
            if self._due.get(contender) != when:
                heapq.heappop(self._heap)  # rescheduled or removed since
            elif when <= now:
                heapq.heappop(self._heap)
                del self._due[contender]
                due.append(contender)
            else:
                return due, when - now
        return due, None

    def _run(self) -> None:
        while True:
            with self._cond:
                batch, wait = self._take_due()
                while not batch and not self._closed:
                    self._cond.wait(wait)
                    batch, wait = self._take_due()
                if self._closed:
                    return
            try:
                self._round(batch)
            except Exception:  # never let the one poller die: each contender is retried
                logger.exception("lease poller round on %s failed", self._oracle.description)
                for contender in batch:
                    self.at(contender, self._oracle.poll_interval)

    def _round(self, batch: List["LeaseContender"]) -> None:
        # Prefetch the keys of the contenders that will read (a hint read without their locks:
        # each checks under its lock that the read is still for its current watch).
        epochs = {contender: contender._read_epoch() for contender in batch}
        keys = sorted({contender._key for contender, epoch in epochs.items() if epoch is not None})
        reads: Dict[str, Tuple[Optional[bytes], Any]] = {}
        failed: Optional[BaseException] = None
        if keys:
            try:
                reads = self._oracle.shared_store().read_many(keys)
            except Exception as exc:  # an unreachable server: every reader retries at the poll interval
                failed = exc
        read_end = _monotonic()
        tried: set = set()
        for contender in batch:
            if contender._key in tried:
                contender._pushed = None  # that push is being acted on: read again, once for all
                self.at(contender, 0.0)
                continue
            epoch = epochs[contender]
            if epoch is not None and failed is not None:
                logger.debug("%s: poll of %s failed: %s", contender.identity, contender.name, failed)
                self.at(contender, self._oracle.poll_interval)
                continue
            read = (*reads[contender._key], read_end, epoch) if epoch is not None else None
            self._one(contender, read, tried)

    def _one(self, contender: "LeaseContender", read: Optional[tuple], tried: set) -> None:
        try:
            signal, delay, attempted = contender._poll_round(read)
        except Exception as exc:  # a failed read or takeover: keep trying at the poll interval
            logger.debug("%s: poll of %s failed: %s", contender.identity, contender.name, exc)
            signal, delay, attempted = False, self._oracle.poll_interval, True
        if attempted:
            tried.add(contender._key)
        if delay is not None:
            self.at(contender, delay)
        if signal:
            contender._notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._due.clear()
            self._heap.clear()
            self._cond.notify_all()


class _Follower:
    """A following contender's side of :class:`LeaseContender`: ``watch`` and its rounds of the
    oracle's one poller (:class:`_Poller`), every ``poll_interval`` or at once when the server
    pushes a change; a round takes a released or stale lease over for the engine's next
    ``claim()``. Its state is LeaseContender's (set up in its __init__)."""

    @property
    def watching(self) -> bool:
        """Whether this contender follows the leader now (a push would make it look)."""
        return self._watching

    def nudge(self, pushed: Optional[Tuple[Optional[bytes], Any]] = None, turn: float = 0.0) -> bool:
        """The key may have changed (a push from the server): a watching contender looks now.
        ``pushed``: the key's new (value, version) if the push carried them: a ``released``
        record is then taken over by CAS over that version, without reading it first, ``turn``
        seconds from now (see "Herds" in the docs: a push of the takeover meanwhile cancels the
        attempt); any other record counts as read when the push arrived (no request).
        Returns whether this contender is watching (False: the nudge was ignored)."""
        if not self._watching:
            return False
        now, due = _monotonic(), 0.0
        if pushed is not None:
            earlier = self._pushed
            due = now + turn
            if earlier is not None and earlier[0] == pushed[0]:
                now, due = earlier[2], min(due, earlier[3])  # the same news twice: the earlier turn
            self._pushed = (pushed[0], pushed[1], now, due)
        waits = pushed is not None and _released(pushed[0])
        self.oracle.poller.at(self, max(0.0, due - _monotonic()) if waits else 0.0)
        return True

    def watch(self, leader: Optional[Leader]) -> bool:
        with self._lock:
            self._check_open()
            if not self._may_watch():
                return False
            hooked = self._hooked
            if not hooked:
                self.oracle.watching(self, self._store)  # before we count as watching: it may raise
                self._hooked = True
            was_watching, self._watching = self._watching, True
            if not was_watching:
                self._epoch += 1  # a read the poller started before this watch is not for it
        if not was_watching:
            if hooked:
                self.oracle.watching_again(self, self._store)
            self.oracle.poller.at(self, 0.0)  # else the poller's schedule stands (no extra request)
        return True

    def _may_watch(self) -> bool:
        """False if the engine should claim at once instead of watching."""
        if self._prewon is not None:
            return False  # the poller already took the lease: claim now
        if self._pending is not None:
            return _monotonic() < self._pending.ready_at
        seen = self._seen
        if seen is None:
            return False  # no record seen: claim again
        record = decode(seen[0])
        if record is not None and record.get("state") == RELEASED:
            return False
        if _monotonic() >= seen[1] + self.oracle.ttl:
            return False
        self._watch_holder = _holder(record, seen[0])
        return True

    def _read_epoch(self) -> Optional[int]:
        """The watch's epoch if its next round reads the key (no lock: a hint for the poller)."""
        if self._watching and self._pending is None and self._pushed is None:
            return self._epoch
        return None

    def _poll_round(self, read: Optional[tuple]) -> Tuple[bool, Optional[float], bool]:
        """One round, on the poller's ``read`` (value, version, end of the read, epoch) if it
        has one. Returns (call on_change?, seconds until the next round or None, tried to take
        the lease over?)."""
        with self._lock:
            if not self._watching or not self.usable:
                return False, None, False
            if self._pending is not None:
                return (*self._poll_pending(), False)
            pushed, self._pushed = self._pushed, None
            if pushed is not None:
                value, version, arrived, due = pushed
                if value is not None and _monotonic() < due and _released(value):
                    self._pushed = pushed  # not our turn yet: a push of the takeover may come first
                    return False, due - _monotonic(), False
                won = self._take_pushed(value, version)
                if won is not None:
                    self._watching = False
                    self._prewon = won
                    return True, None, True
                read = (value, version, arrived, self._epoch) if value is not None and not _released(value) else None
            if read is None or read[3] != self._epoch:
                value, version = self._call("read", self._key)
                read_end = _monotonic()
            else:
                self.requests += 1  # the poller's read, shared with other contenders of the key
                value, version, read_end = read[:3]
            return self._after_read(value, version, read_end)

    def _after_read(self, value: Optional[bytes], version: Any, read_end: float) -> Tuple[bool, Optional[float], bool]:
        first_seen = self._observe(value, read_end)
        record = decode(value)
        if value is not None and (
            (record is not None and record.get("state") == RELEASED)
            or read_end >= first_seen + self.oracle.ttl  # unchanged for a whole ttl: stale
        ):
            # Take it over right here, then tell the engine: claim() hands the won lease over.
            # A takeover that raised leaves us watching: the next round reads again.
            won = self._take_over(record, version)
            self._watching = False
            self._prewon = won
            return True, None, True
        if value is not None and _holder(record, value) != self._watch_holder and held_leader(record) is not None:
            # A new term runs: tell the engine, whose claim() is answered from this read (no
            # request), and keep watching the new holder.
            self._watch_holder = _holder(record, value)
        elif value is None or _holder(record, value) != self._watch_holder:
            self._watching = False
            return True, None, False  # a dismissal, a vacated record or none: the engine claims
        else:
            self._last_quiet_poll = _monotonic()
            return False, self._next_poll(first_seen), False
        self._last_quiet_poll = _monotonic()
        return True, self._next_poll(first_seen), False

    def _next_poll(self, first_seen: float) -> float:
        # Poll again after poll_interval, or exactly when the record will have been unchanged
        # for a ttl if that comes sooner (crash failover is then ttl + at most one poll).
        stale_in = first_seen + self.oracle.ttl - _monotonic()
        return max(0.0, min(self.oracle.poll_interval, stale_in))

    def _take_pushed(self, value: Optional[bytes], version: Any) -> Optional[Claim]:
        """A ``released`` record the server pushed: take it over by CAS over the pushed version,
        as after a read (the CAS fails if anything was written since). None: not a release, or
        the CAS lost; the round then reads as usual."""
        record = decode(value)
        if record is None or record.get("state") != RELEASED or version is None:
            return None
        return self._take_over(record, version)

    def _poll_pending(self) -> Tuple[bool, Optional[float]]:
        oracle = self.oracle
        pending = self._pending
        now = _monotonic()
        if now >= pending.ready_at:
            # Quarantine over: convert the pending record now, then tell the engine. Stop
            # watching only once that call has answered: if it raises, the poller's next
            # round tries again (the engine hears nothing until then).
            result = self._claim_once()
            self._watching = False
            if result is not None and result.won:
                self._prewon = result
            return True, None
        if now - pending.renewed_at >= oracle.renew_interval and not self._renew_pending():
            self._watching = False
            return True, None  # lost our pending record: claim afresh
        wake_at = min(pending.ready_at, pending.renewed_at + oracle.renew_interval)
        return False, max(0.0, wake_at - _monotonic())


def _released(value: bytes) -> bool:
    record = decode(value)
    return record is not None and record.get("state") == RELEASED


class LeaseContender(_Follower, ContenderBase):
    """One crown's seat: a handle on its oracle's one store (connection), its lease, and rounds
    of the oracle's one poller while following.

    The engine's calls and the poller's rounds share the state under ``_lock``; ``on_change`` is
    always called with no lock held.
    """

    oracle: LeaseOracle

    def __init__(self, oracle: LeaseOracle, name: str, identity: str, metadata: Dict[str, Any], on_change: OnChange):
        super().__init__(oracle, name, identity, metadata, on_change)
        self._key = oracle.key(name)
        self._store = _Handle(oracle)
        # Leading: the nonce and token of our term (None when not leading).
        self._nonce: Optional[str] = None
        self._token: Optional[int] = None
        self._since: Optional[float] = None
        self._ended_nonce: Optional[str] = None  # our last term's nonce, for abdicate
        self._pending: Optional[_Pending] = None
        self._prewon: Optional[Claim] = None  # a lease the poller took, for the next claim()
        # Our held record as we last wrote it, and its version (see LeaseStore.written_version).
        self._mine: Optional[Tuple[bytes, Any]] = None
        # The key's new (value, version) as the server pushed it, when it arrived and (for a
        # release) when this contender's turn to take it over comes (monotonic seconds).
        self._pushed: Optional[Tuple[Optional[bytes], Any, float, float]] = None
        # What we last saw in the key: (bytes, monotonic end of the first read that showed them).
        self._seen: Optional[Tuple[bytes, float]] = None
        # Poller state.
        self._watching = False
        self._epoch = 0  # counts watches: a read started for an earlier one is not used
        self._hooked = False  # the oracle's watching() hook ran
        self._watch_holder: Optional[Tuple[Any, Any]] = None
        self._last_quiet_poll: Optional[float] = None  # when the poller last saw nothing new
        self.requests = 0  # calls made to the server (for benchmarks and tests)

    # -- helpers (lock held) ------------------------------------------------------------------

    def _call(self, method: str, *args: Any) -> Any:
        self._check_open()
        self.requests += 1
        return getattr(self._store, method)(*args)

    def _observe(self, value: Optional[bytes], read_end: float) -> Optional[float]:
        """Remember ``value``; return the end time of the first read that showed these bytes."""
        if value is None:
            self._seen = None
            return None
        if self._seen is None or self._seen[0] != value:
            self._seen = (value, read_end)
        return self._seen[1]

    def _remember(self, value: bytes) -> None:
        """``value`` (our held record) was just written: keep it and its version, if known."""
        version = self._store.written_version(value)
        self._mine = None if version is None else (value, version)

    def _record(self, state: str, nonce: str, token: int, since: Optional[float]) -> Dict[str, Any]:
        return dict(record_of(self.identity, self.metadata, token, since), state=state, nonce=nonce)

    def _won(self, nonce: str, token: int, since: float, started: float) -> Claim:
        self._nonce, self._token, self._since = nonce, token, since
        self._ended_nonce = None
        self._pending = self._pushed = None
        self._seen = None
        self._watching = False
        self._enter(Phase.LEADING)
        logger.info("%s leads %s with token %s", self.identity, self.name, token)
        return self._lease(started)

    def _lease(self, started: float) -> Claim:
        oracle = self.oracle
        return Claim(
            won=True,
            leader=self._me(self._token, self._since),
            token=self._token,
            deadline=started + oracle.ttl - oracle.margin,
            refresh_in=oracle.renew_interval,
        )

    def _hold(self, record: Optional[Dict[str, Any]], version: Any, nonce: str, started: float) -> Optional[Claim]:
        """CAS our ``held`` record over ``version`` of ``record``. None if we lost the race."""
        since = self.oracle.clock()
        self._check_open()
        self.requests += 1
        written = self.oracle.start_term(self._store, self._key, record, version,
                                         lambda token: encode(self._record(HELD, nonce, token, since)))
        if written is None:
            return None
        self._remember(written[1])
        return self._won(nonce, written[0], since, started)

    def _take_over(self, record: Optional[Dict[str, Any]], version: Any) -> Optional[Claim]:
        return self._hold(record, version, _nonce(), _monotonic())

    def _drop_pending(self) -> None:
        self._pending = None
        self._enter(Phase.FOLLOWING)

    def _renew_pending(self) -> bool:
        """Rewrite our pending record (CAS). False if it is no longer ours."""
        pending = self._pending
        value, version = self._call("read", self._key)
        record = decode(value)
        if record is None or record.get("state") != PENDING or record.get("nonce") != pending.nonce:
            self._drop_pending()
            return False
        if not self._call("replace", self._key, encode(record), version, _PENDING_EXPIRE):
            self._drop_pending()
            return False
        pending.renewed_at = _monotonic()
        return True

    # -- Contender ---------------------------------------------------------------------------

    def claim(self) -> Claim:
        with self._lock:
            self._check_open()
            quiet = self._quiet_answer()
            if quiet is not None:
                return quiet
            self._watching = False
            prewon, self._prewon = self._prewon, None
            if prewon is not None and self._nonce is not None:
                # The poller took the lease the moment it could (saves round trips on handoff).
                # Hand it over as is only if it outlasts the engine's first refresh (due in
                # renew_interval) by the margin; a lease that waited longer is renewed first.
                oracle = self.oracle
                if prewon.deadline - _monotonic() > oracle.renew_interval + oracle.margin:
                    return prewon
                try:
                    renewed = self._refresh_locked()
                except Exception:
                    # No child ran on it: forget the term; the next claim finds our own record.
                    self._lose("its renewal failed before the term began")
                    raise
                if renewed.won:
                    return renewed
            for _ in range(5):
                result = self._claim_once()
                if result is not None:
                    return result
            return Claim(won=False)  # the key kept changing under us; the engine will come back

    def _quiet_answer(self) -> Optional[Claim]:
        """The engine claims again every ``monitor_timeout`` even when nothing changed. While our
        poller is watching and read a live, unchanged record within the last two poll intervals
        (it would have called on_change otherwise), answer from that read: no request."""
        seen, last = self._seen, self._last_quiet_poll
        if not self._watching or self._pending is not None or self._prewon is not None:
            return None
        if seen is None or last is None:
            return None
        now = _monotonic()
        if now - last > 2 * self.oracle.poll_interval or now >= seen[1] + self.oracle.ttl:
            return None
        record = decode(seen[0])
        if _holder(record, seen[0]) != self._watch_holder or (record is not None and record.get("state") == RELEASED):
            return None
        return Claim(won=False, leader=held_leader(record))

    def _claim_pending(self) -> Optional[Claim]:
        """Our pending record: start if its quarantine is over, else renew it. None: claim afresh."""
        pending = self._pending
        started = _monotonic()
        value, version = self._call("read", self._key)
        record = decode(value)
        if record is not None and record.get("state") == PENDING and record.get("nonce") == pending.nonce:
            if started >= pending.ready_at:
                # Quarantine over and the key was ours throughout: start.
                won = self._hold(record, version, pending.nonce, started)
                if won is None:
                    self._drop_pending()
                return won
            if self._call("replace", self._key, encode(record), version, _PENDING_EXPIRE):
                pending.renewed_at = _monotonic()
                return Claim(won=False, leader=None)
        self._drop_pending()  # lost it (flushed, taken over): claim afresh
        return None

    def _claim_once(self) -> Optional[Claim]:
        oracle = self.oracle
        if self._pending is not None:
            result = self._claim_pending()
            if result is not None or self.phase is Phase.LEADING:
                return result
        # Try to create the key: succeeds only if the server has no record at all.
        nonce = _nonce()
        record = self._record(PENDING, nonce, oracle.token_floor(self._store), None)
        if self._call("create", self._key, encode(record), _PENDING_EXPIRE):
            now = _monotonic()
            self._pending = _Pending(nonce, ready_at=now + oracle.ttl, renewed_at=now)
            self._enter(Phase.PENDING)
            self._seen = None
            logger.info(
                "%s found no lease record for %s on %s (first use, restart, flush, eviction or a "
                "delete): holding it, starting in %.3gs unless it is lost meanwhile",
                self.identity, self.name, oracle.description, oracle.ttl,
            )
            return Claim(won=False, leader=None)

        value, version = self._call("read", self._key)
        read_end = _monotonic()
        if value is None:
            return None  # vanished between create and read: again
        record = decode(value)
        state = record.get("state") if record else None
        if state == RELEASED:
            return self._take_over(record, version)
        if state == HELD and record.get("nonce") is not None and record.get("nonce") in (self._ended_nonce, self._nonce):
            # Our own last term's record, untouched since: that term's child has stopped (the
            # engine claims only between terms) and nobody else held the key since.
            return self._take_over(record, version)
        first_seen = self._observe(value, read_end)
        if read_end >= first_seen + oracle.ttl:
            # Unchanged for a whole ttl: its holder's deadline has passed.
            return self._take_over(record, version)
        return Claim(won=False, leader=held_leader(record))

    def refresh(self) -> Claim:
        with self._lock:
            self._check_open()
            return self._refresh_locked()

    def _refresh_locked(self) -> Claim:
        nonce = self._nonce
        if nonce is None:
            return Claim(won=False)
        started = _monotonic()
        if self._renew_mine(nonce):
            return self._lease(started)
        value, version = self._call("read", self._key)
        record = decode(value)
        if record is not None and record.get("state") == VACATED and record.get("prev") == nonce:
            # Dismissed. Our abdicate will write "released" and followers' pollers take it over
            # at their next poll: stay out of the contest for two polls of every follower, plus a
            # second for a busy host, or we would usually win our own release back at once.
            self._lose("it was dismissed")
            return Claim(won=False, yield_for=self.oracle.dismissed_yield)
        if record is None or record.get("state") != HELD or record.get("nonce") != nonce:
            self._lose("its lease record is gone" if value is None else "its lease record was replaced")
            return Claim(won=False, leader=held_leader(record))
        value = encode(record)
        if not self._call("replace", self._key, value, version, self.oracle.record_expire):
            self._lose("a renewal lost its CAS")
            return Claim(won=False)
        self._remember(value)
        return self._lease(started)

    def _renew_mine(self, nonce: str) -> bool:
        """Renew by one CAS over our own last write, if its version is known. False: unknown, or
        the record changed since (dismissed, replaced, gone): the caller reads to learn which."""
        mine, self._mine = self._mine, None
        record = decode(mine[0]) if mine is not None else None
        if record is None or record.get("nonce") != nonce:
            return False
        value = encode(record)
        if not self._call("replace", self._key, value, mine[1], self.oracle.record_expire):
            return False
        self._remember(value)
        return True

    def _lose(self, why: str) -> None:
        logger.info("%s lost %s (token %s): %s", self.identity, self.name, self._token, why)
        self._ended_nonce, self._nonce = self._nonce, None
        self._token = self._since = None
        self._enter(Phase.FOLLOWING)

    def abdicate(self) -> None:
        with self._lock:
            if self.usable:
                self._release_locked()

    def _release_locked(self) -> None:
        """Turn our record into ``released``: only after our child stopped (or never started)."""
        self._prewon = None
        nonce = self._nonce or self._ended_nonce
        self._nonce = self._token = self._since = None
        self._ended_nonce = nonce  # kept: a later claim may find our record still there
        if self.phase is Phase.LEADING:
            self._enter(Phase.FOLLOWING)
        mine, self._mine = self._mine, None
        if nonce is None:
            return
        if mine is not None:
            # Our last write's version is known: one CAS over it, no read (a successor waits on
            # this write). If it fails, the record changed since (a dismissal): read, as below.
            record = decode(mine[0])
            if record is not None and record.get("nonce") == nonce and self._release_over(record, mine[1], nonce):
                return
        value, version = self._call("read", self._key)
        record = decode(value)
        if record is None:
            return
        ours = (record.get("state") == HELD and record.get("nonce") == nonce) or (
            record.get("state") == VACATED and record.get("prev") == nonce and record.get("prev_state") == HELD
        )
        if ours:  # else someone else's now: never touch it
            self._release_over(record, version, nonce)

    def _release_over(self, record: Dict[str, Any], version: Any, nonce: str) -> bool:
        released = _farewell(RELEASED, dict(record, nonce=nonce), HELD, self.identity)
        # CAS, never a blind delete: if anything changed since our read, it is not ours to free.
        if not self._call("replace", self._key, encode(released), version, _RELEASED_EXPIRE):
            return False
        self._ended_nonce = None
        logger.info("%s released %s (token %s)", self.identity, self.name, record.get("token"))
        self.oracle.released(self._store, self)
        return True

    def _vacate(self, nonce: str, state: str) -> None:
        """Give up a record we hold without vouching that our child has stopped: successors wait
        ``ttl`` after seeing the vacated record, which outlasts any deadline of ours."""
        value, version = self._call("read", self._key)
        record = decode(value)
        if record is None or record.get("nonce") != nonce or record.get("state") != state:
            return
        vacated = _farewell(VACATED, record, state, self.identity, by="close")
        if self._call("replace", self._key, encode(vacated), version, self.oracle.record_expire):
            self.oracle.released(self._store, self)

    def close(self) -> None:
        if not self.usable:
            return
        wait = self.oracle.timeout * 2 + self.oracle.connect_timeout + 0.5
        bounded(self._lock, wait, self._farewell_and_close, self._interrupt)
        self.oracle._unpoll(self)
        if self._hooked:
            self.oracle.unwatching(self)

    def _farewell_and_close(self) -> None:
        if self.phase is not Phase.CLOSED:
            try:
                # Normally the engine abdicated already; if not, our child may still run, so
                # vacate (successors wait a ttl) rather than release. A lease the poller took
                # but the engine never received ran no child: release it.
                if self._prewon is not None:
                    self._release_locked()
                elif self._nonce is not None:
                    self._vacate(self._nonce, HELD)
                elif self._pending is not None:
                    self._vacate(self._pending.nonce, PENDING)
            except Exception as exc:
                logger.debug("%s: vacating %s on close failed: %s", self.identity, self.name, exc)
        self._closed_now()
        self._store.close()

    def _interrupt(self) -> None:
        self._store.interrupt()  # a call is stuck in another thread: cut it short
        self._enter(Phase.CLOSED)  # that thread holds the lock: leave the rest of its state to it
        self._watching = False

    def _closed_now(self) -> None:
        self._enter(Phase.CLOSED)
        self._watching = False
        self._nonce = self._pending = self._prewon = self._mine = self._pushed = None

    def _forget_after_fork(self) -> None:
        self._watching = False

