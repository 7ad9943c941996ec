"""memcached oracle: a lease record claimed with ``add`` and renewed and released only by CAS.

For apps whose only shared service is memcached. One key per election, ``<key_prefix><name>``,
holds a JSON record in one of four states:

* ``held``: a leader runs a term (identity, metadata, token, since, an acquisition ``nonce``);
* ``pending``: a claimant holds the key but may not start yet (see "quarantine" below);
* ``vacated``: the holder was dismissed or closed without a clean release;
* ``released``: the holder released it cleanly after its child stopped.

Every write carries a fresh random write id, so the same bytes never appear twice in the key.

How a lease lives and dies (the safety argument)
------------------------------------------------
The lease is measured on the contenders' own clocks (:func:`crown_sync.clock.monotonic`, which
keeps counting while a host is suspended), not on memcached's. A leader
renews with ``gets`` + ``cas`` (only while the record is still its own: same nonce, state
``held``) every ``renew_interval``. Its term's deadline is the START of the last successful
renewal (or of the claim) plus ``ttl`` minus ``margin``; the engine stops the child by then.

A follower may replace a record it does not own only with ``cas`` over the exact version it has
seen, and only when

1. the record is ``released`` (its holder's child had stopped before it wrote that), or
2. it has seen the very same bytes for at least ``ttl``, counted from the END of the read that
   first showed them. That read came back after the holder's last successful renewal was
   applied, and the holder started that renewal before it was applied, so the holder's deadline
   (renewal start + ttl - margin) is at least ``margin`` in the past by then.

When the key is absent (first use, memcached restart, ``flush_all``, eviction) nobody can know
whether a leader is still running on a lease that memcached forgot. The claimant then ``add``\\ s a
``pending`` record and waits one ``ttl`` (its quarantine, counted from the end of the ``add``)
before it starts, renewing the pending record meanwhile. Any earlier leader made its last
successful renewal before the key vanished, hence before our ``add``, so its deadline has passed
when the quarantine ends; and nobody else can have started meanwhile, because starting needs the
key, which we held all along (our pending record is checked with ``gets`` and converted with
``cas``). The leader that lost the key finds out at its next renewal (a missing key or a lost CAS
ends the term at once) and in any case stops at its deadline.

So memcached's one-second expiry granularity and its clock do not enter the argument: memcached's
own expiry of an item (``2 * ttl + 2`` seconds after the last write of a ``held`` or ``vacated``
record; a day for ``pending`` and ``released`` records) only collects abandoned records, and is
long enough that followers take over a crashed leader's record by CAS before it expires. A
``pending`` record lives long because it may be renewed only at the engine's claims (every
``monitor_delay`` with ``monitor_leader=False``); an abandoned one is stale after a ``ttl`` and
taken over like any other. ``margin`` covers the child's kill, scheduling jitter and the rate
difference of two hosts' clocks over a ``ttl`` (see ``default_margin``; at least ``ttl / 100``).
A revocation (the key deleted by someone else, ``flush_all``, a restart) leaves no record: the
quarantine above waits it out, and the revoked child, however slow to honour SIGTERM, is killed
at its deadline.

Dismissal: ``dismiss`` CAS-replaces the ``held`` record with ``vacated``; the leader's next
renewal sees it, the engine stops the child and the leader releases. Its refresh asks the engine
to stay out of the contest for ``dismissed_yield`` (``2 * poll_interval + 1`` s), so a watching
follower, not the dismissed leader, takes the released lease.

Fencing tokens
--------------
``token = max(previous token + 1, clock() in microseconds)``, computed when the term starts, where
``clock`` is the oracle's wall clock (:func:`time.time` unless given), and
"previous token" is the one in the record being replaced (every state keeps the latest term's
token). While the record survives (clean handoffs, crash takeovers, dismissals) tokens rise
strictly with no assumption at all. When memcached loses the record (restart, ``flush_all``,
eviction, or the record expiring after all contenders stopped), the next token is the new
leader's wall clock in microseconds, read at least ``ttl`` after the previous term's token was
issued (the quarantine): it is larger as long as no host's wall clock is behind the previous
leader's clock by ``ttl`` or more (skew between hosts, or a clock stepped backwards). That is an
assumption, stated plainly; keep clocks in sync (NTP) and ``ttl`` generous.

What is NOT guaranteed
----------------------
* memcached is a cache: it may lose the record at any time. That costs liveness (a ``ttl`` of
  quarantine, and the dismissed leader runs until its next renewal or deadline), never overlap by
  the argument above; but tokens across such a loss rest on the clock assumption.
* A paused or partitioned leader stops by its deadline only if the engine's deadline machinery
  runs (it does, see ``crown_sync.crown``); work already in flight when the deadline passes can
  land after a successor started: pass ``term.token`` to the resource and let it reject stale
  tokens.
* Monotonic clocks must run at about the same rate on every host (they do; NTP slews).
* Anyone who can write to the memcached server can break everything (no authentication here).

Connection loss: every call has ``timeout``; a failed call raises (the engine retries until the
deadline, then stops the child). pymemcache reconnects on the next call. Followers' poll errors,
failed takeovers included, are logged and retried at the poll interval.

Requests at rest: a follower makes one read (``gets``, as cheap as a ``get``) per
``poll_interval`` (default 0.2 s: at most 5/s; the engine's periodic re-claims are answered from
the poller's fresh read without a request); a leader one ``gets`` and one ``cas`` per
``renew_interval`` (0.67/s with the default ttl). The poller thread takes a released or stale
lease over itself, by CAS with the id its read just returned, and hands the won lease to the
engine's next ``claim()`` (renewed first if less than ``renew_interval + margin`` of it is left,
so that the term outlasts the engine's first refresh). A graceful handoff waits for the quickest
follower's next poll: half a poll interval on average with one follower, a third with two; lower
``poll_interval`` for faster handoffs at more requests. Crash failover: a follower takes over
``ttl`` after it first saw the leader's last renewal, i.e. at most ``ttl + poll_interval`` after
the crash (and as little as ``ttl - renew_interval`` when the leader died just before renewing).

Fork safety: in a forked child, inherited sockets get /dev/null dup2'ed over them (so nothing the
child does can write into the parent's connection) and inherited contenders become unusable.
"""

import json
import logging
import math
import os
import secrets
import socket
import threading
import time
import urllib.parse
import weakref
from typing import Any, Callable, Dict, Optional, Tuple, Union

import tenacity
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheError, MemcacheUnexpectedCloseError

from .. import _forksafe
from ..clock import monotonic as _monotonic  # the clock of every deadline (counts a suspend)
from ..oracle import Claim, Contender, Leader, OnChange, Oracle
from ..urls import parse_options, redact

__all__ = ["MemcachedOracle", "MemcachedContender", "MemcachedError"]

logger = logging.getLogger("crown_sync.oracles.memcached")

_OPTIONS = {
    "ttl": float,
    "renew_interval": float,
    "poll_interval": float,
    "margin": float,
    "key_prefix": str,
    "connect_timeout": float,
    "timeout": float,
}

HELD, PENDING, VACATED, RELEASED = "held", "pending", "vacated", "released"
_STATES = (HELD, PENDING, VACATED, RELEASED)
_RELEASED_EXPIRE = 86400  # keeps the token and the "free now" mark of a cleanly stopped election
# A pending record may be renewed only at the engine's claims (every monitor_delay, with
# monitor_leader=False), so it must not expire between them: that would restart the quarantine
# at every claim. A crashed claimant's pending record is taken over as stale after a ttl anyway.
_PENDING_EXPIRE = 86400
_MAX_RECORD = 512 * 1024


#: The smallest margin allowed, as a fraction of ttl: ten times the worst rate difference of two
#: hosts' clocks under NTP (each may be slewed by up to 500 ppm: 0.1% between two).
MIN_MARGIN_RATIO = 0.01


def default_margin(ttl: float) -> float:
    """The default margin: a second (a quarter of a short ttl) for the child's kill and the
    scheduler, but at least ttl / 10 (clock-rate differences grow with the time measured)."""
    return max(min(1.0, ttl / 4), ttl / 10)


class MemcachedError(ConnectionError):
    """memcached could not be reached or answered an error (the message names the server)."""


_READS = ("get", "gets")
_STALE = (MemcacheUnexpectedCloseError, ConnectionResetError, BrokenPipeError)


class _Contended(Exception):
    """A CAS lost a race with another writer; read again."""


def _nonce() -> str:
    return secrets.token_hex(8)


def _encode(record: Dict[str, Any]) -> bytes:
    record = dict(record, w=secrets.token_hex(6))  # a fresh write id: bytes never repeat
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode()


def _decode(value: Optional[bytes]) -> Optional[Dict[str, Any]]:
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


def _record_token(record: Optional[Dict[str, Any]]) -> int:
    token = record.get("token") if record else None
    return token if isinstance(token, int) and not isinstance(token, bool) else 0


def _holder(record: Optional[Dict[str, Any]], value: bytes) -> Tuple[Any, Any]:
    """Who a record is about: (state, acquisition nonce). Renewals change the bytes, not this."""
    if record is None:
        return ("?", value)
    return (record.get("state"), record.get("nonce") or record.get("prev"))


def _leader_of(record: Optional[Dict[str, Any]]) -> Optional[Leader]:
    """The leader a record names: only a ``held`` record has one running."""
    if record is None or record.get("state") != HELD:
        return None
    return Leader(
        identity=str(record.get("identity", "")),
        metadata=dict(record.get("metadata") or {}),
        token=record.get("token"),
        since=record.get("since"),
    )


def _seconds(option: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{option} must be a number of seconds, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{option} must be a positive finite number of seconds, got {value!r}")
    return value


def _parse_server(server: Union[str, Tuple[str, int]]) -> Tuple[str, int]:
    if isinstance(server, (list, tuple)) and len(server) == 2 and isinstance(server[0], str) and not isinstance(
        server[1], (list, tuple, str)
    ):
        host, port = server
    elif isinstance(server, str):
        if "," in server or " " in server.strip():
            raise ValueError(
                f"server must be ONE memcached server, got {server!r}: a lease cannot be sharded "
                f"across a hash ring; give each election one server"
            )
        text = server.strip()
        if text.startswith("["):  # [::1]:11211
            host, _, rest = text[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else 11211
        elif text.count(":") == 1:
            host, port = text.split(":")
        else:
            host, port = text, 11211
    elif isinstance(server, (list, tuple)):
        raise ValueError(
            f"server must be ONE memcached server, got {len(server)}: a lease cannot be sharded "
            f"across a hash ring; give each election one server"
        )
    else:
        raise TypeError(f"server must be 'host:port' or (host, port), got {type(server).__name__}")
    if not isinstance(host, str) or not host:
        raise ValueError(f"server host must be a non-empty string, got {host!r}")
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ValueError(f"server port must be an integer, got {port!r}") from None
    if isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError(f"server port must be in 1..65535, got {port!r}")
    return host, port


class _ForkSafeSocketModule:
    """The ``socket`` module as pymemcache uses it, but every socket is recorded as it is made, so
    that a fork at any moment never leaves a copy of it in the child (see crown_sync._forksafe)."""

    def __getattr__(self, name):
        return getattr(socket, name)

    @staticmethod
    def socket(*args, **kwargs) -> socket.socket:
        with _forksafe.opening() as keep:
            sock = socket.socket(*args, **kwargs)
            keep(sock)
        return sock


_fork_safe_sockets = _ForkSafeSocketModule()


class _Connection:
    """One pymemcache client used by one owner at a time (callers hold the owner's lock)."""

    def __init__(self, oracle: "MemcachedOracle"):
        self._oracle = oracle
        self._client: Optional[Client] = None
        self.forked = False
        self.closed = False
        _live_connections.add(self)

    def call(self, method: str, *args, **kwargs):
        if self.forked:
            raise RuntimeError("memcached connection inherited across fork(): unusable in this process")
        if self.closed:
            raise RuntimeError("memcached connection is closed")
        try:
            if method in _READS:
                # A read on a connection the server closed meanwhile (it restarted) is retried
                # once on a fresh one: harmless for a read, unlike a write whose fate is unknown.
                retrying = tenacity.Retrying(
                    stop=tenacity.stop_after_attempt(2),
                    retry=tenacity.retry_if_exception_type(_STALE),
                    reraise=True,
                )
                return retrying(self._invoke, method, *args, **kwargs)
            return self._invoke(method, *args, **kwargs)
        except (OSError, MemcacheError, ValueError) as exc:
            raise MemcachedError(
                f"memcached at {self._oracle.description}: {method} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _invoke(self, method: str, *args, **kwargs):
        if self.closed:
            raise RuntimeError("memcached connection is closed")
        if self._client is None:
            self._client = self._oracle._new_client()
        try:
            return getattr(self._client, method)(*args, **kwargs)
        except Exception:
            self._client.close()
            raise

    def socket(self) -> Optional[socket.socket]:
        client = self._client
        return getattr(client, "sock", None) if client is not None else None

    def interrupt(self) -> None:
        """Unblock a call in progress in another thread (close() that can't wait)."""
        self.closed = True
        sock = self.socket()
        if sock is not None and not self.forked:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.closed = True
        client, self._client = self._client, None
        if client is not None and not self.forked:
            try:
                client.close()  # just closes the socket: no goodbye on the wire
            except Exception:  # pragma: no cover - closing must never raise
                pass

    def after_fork_in_child(self) -> None:
        self.forked = True
        sock = self.socket()
        if sock is not None:
            try:
                devnull = os.open(os.devnull, os.O_RDWR)
                try:
                    os.dup2(devnull, sock.fileno())  # nothing we write can reach the parent's peer
                finally:
                    os.close(devnull)
            except OSError:
                pass
        self._client = None  # dropping it only closes our /dev/null duplicate


class MemcachedOracle(Oracle):
    """Leases on ONE memcached server (see the module docstring for the safety argument).

    server: ``"host:port"``, ``"host"`` (port 11211) or ``(host, port)``. Several servers are
        refused: a lease cannot be sharded across a hash ring.
    ttl: lease length in seconds (>= 1). Crash failover takes about ``ttl + poll_interval``; after
        memcached lost the key, the first claimant waits one ``ttl`` before it starts.
    margin: how long before the lease ends the leader's deadline falls (default
        ``max(min(1, ttl / 4), ttl / 10)``, at least ``ttl / 100``): time for the child to be
        killed, scheduling jitter, and clock-rate differences between hosts (they grow with ttl).
    renew_interval: how often the leader renews (default ``(ttl - margin) / 3``; at most
        ``(ttl - margin) / 2`` so that a failed renewal can be retried before the deadline).
    poll_interval: how often a follower reads the key (default 0.2 s: at most 5 requests/s).
    key_prefix: prepended to the election name to make the key (default ``"crown_sync:"``).
    connect_timeout, timeout: socket timeouts of every call (default ``min(2.0, renew_interval)``).
    clock: the wall clock, a callable returning epoch seconds (default :func:`time.time`), read
        for the token floor and ``since`` only, never for the lease. For tests, and for hosts with a
        better clock source.
    """

    def __init__(
        self,
        server: Union[str, Tuple[str, int]] = "127.0.0.1:11211",
        ttl: float = 10.0,
        renew_interval: Optional[float] = None,
        poll_interval: float = 0.2,
        margin: Optional[float] = None,
        key_prefix: str = "crown_sync:",
        connect_timeout: Optional[float] = None,
        timeout: Optional[float] = None,
        clock: Callable[[], float] = time.time,
    ):
        self.host, self.port = _parse_server(server)
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning epoch seconds, got {type(clock).__name__}")
        self.clock = clock
        self.ttl = _seconds("ttl", ttl)
        if self.ttl < 1.0:
            raise ValueError(f"ttl must be at least 1 second, got {self.ttl!r}")
        if self.ttl > 3600:
            raise ValueError(f"ttl must be at most 3600 seconds, got {self.ttl!r}")
        self.margin = default_margin(self.ttl) if margin is None else _seconds("margin", margin)
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
        usable = self.ttl - self.margin
        if renew_interval is None:
            self.renew_interval = usable / 3
        else:
            self.renew_interval = _seconds("renew_interval", renew_interval)
            if self.renew_interval > usable / 2:
                raise ValueError(
                    f"renew_interval ({self.renew_interval}) must be at most half of ttl - margin "
                    f"({usable:g}) so that a failed renewal can be retried before the deadline; "
                    f"lower renew_interval or raise ttl"
                )
        self.poll_interval = _seconds("poll_interval", poll_interval)
        if self.poll_interval > self.ttl / 2:
            raise ValueError(f"poll_interval ({self.poll_interval}) must be at most half of ttl ({self.ttl})")
        default_timeout = min(2.0, self.renew_interval)
        self.connect_timeout = default_timeout if connect_timeout is None else _seconds("connect_timeout", connect_timeout)
        self.timeout = default_timeout if timeout is None else _seconds("timeout", timeout)
        for option, value in (("connect_timeout", self.connect_timeout), ("timeout", self.timeout)):
            if value > usable:
                raise ValueError(f"{option} ({value}) must be at most ttl - margin ({usable:g})")
        if not isinstance(key_prefix, str):
            raise TypeError(f"key_prefix must be a str, got {type(key_prefix).__name__}")
        if len(key_prefix) > 100 or not all(33 <= ord(c) < 127 for c in key_prefix):
            raise ValueError("key_prefix must be at most 100 printable ASCII characters without spaces")
        self.key_prefix = key_prefix
        #: memcached's expiry of held and vacated records: garbage collection only (see above).
        self.record_expire = int(math.ceil(2 * self.ttl)) + 2
        #: seconds a dismissed leader stays out of the contest after its release (see dismiss()).
        self.dismissed_yield = 2 * self.poll_interval + 1.0
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.description = redact(f"memcached://{host}:{self.port}")
        self._lock = threading.Lock()
        self._connection: Optional[_Connection] = None
        _live_oracles.add(self)

    @classmethod
    def from_url(cls, url: str) -> "MemcachedOracle":
        """``memcached://host[:port][?ttl=..&renew_interval=..&poll_interval=..&margin=..
        &key_prefix=..&connect_timeout=..&timeout=..]``; exactly one server."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() != "memcached":
            raise ValueError(f"not a memcached:// URL: {redact(url)!r}")
        netloc = parts.netloc
        if "@" in netloc:
            raise ValueError("memcached:// URLs take no user or password (memcached's text protocol has no auth)")
        if "," in netloc:
            count = len(netloc.split(","))
            raise ValueError(
                f"memcached:// takes exactly one server, got {count} in {redact(url)!r}: a lease "
                f"cannot be sharded across a hash ring; give each election one server"
            )
        if parts.path not in ("", "/"):
            raise ValueError(f"memcached:// URL takes no path, got {parts.path!r}")
        try:
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise ValueError(f"bad memcached:// URL {redact(url)!r}: {exc}") from None
        if not host:
            raise ValueError(f"memcached:// URL needs a host, got {redact(url)!r}")
        return cls((host, port or 11211), **parse_options(url, _OPTIONS))

    # -- plumbing ---------------------------------------------------------------------------

    def _new_client(self) -> Client:
        return Client(
            (self.host, self.port),
            connect_timeout=self.connect_timeout,
            timeout=self.timeout,
            no_delay=True,
            default_noreply=False,  # add() would otherwise say True whatever happened
            socket_module=_fork_safe_sockets,
        )

    def key(self, name: str) -> str:
        return self.key_prefix + name

    def _shared_call(self, method: str, *args, **kwargs):
        with self._lock:
            if self._connection is None or self._connection.forked or self._connection.closed:
                self._connection = _Connection(self)
            return self._connection.call(method, *args, **kwargs)

    # -- Oracle -----------------------------------------------------------------------------

    def contender(self, name: str, identity: str, metadata: Dict[str, Any], on_change: OnChange) -> "MemcachedContender":
        return MemcachedContender(self, name, identity, metadata, on_change)

    def find_leader(self, name: str) -> Optional[Leader]:
        """The holder of a ``held`` record. A leader that crashed is still named until a
        contender takes its lease over (about ``ttl``) or memcached expires the record."""
        return _leader_of(_decode(self._shared_call("get", self.key(name))))

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
                value, cas = self._shared_call("gets", key)
                record = _decode(value)
                if record is None or record.get("state") != HELD:
                    return False
                vacated = {
                    "state": VACATED,
                    "token": record.get("token"),
                    "prev": record.get("nonce"),
                    "prev_state": HELD,
                    "identity": record.get("identity"),
                    "by": "dismiss",
                }
                done = self._shared_call("cas", key, _encode(vacated), cas, expire=self.record_expire, noreply=False)
                if done is None:
                    return False  # vanished meanwhile: nobody to dismiss
                if not done:
                    raise _Contended()
                logger.info("dismissed %s (token %s) on %s", record.get("identity"), record.get("token"), self.description)
                return True
        return False  # pragma: no cover - tenacity reraises

    def close(self) -> None:
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # the parent's lock may have been held by a thread that is gone
        self._connection = None  # neutered by its own fork handler; a fresh one is made on demand


class _Pending:
    __slots__ = ("nonce", "ready_at", "renewed_at")

    def __init__(self, nonce: str, ready_at: float, renewed_at: float):
        self.nonce = nonce
        self.ready_at = ready_at
        self.renewed_at = renewed_at


class MemcachedContender(Contender):
    """One crown's seat: its own connection, its lease state, and a poller thread while following.

    The engine's calls and the poller share the connection under ``_lock``; ``on_change`` is
    always called with no lock held.
    """

    def __init__(self, oracle: MemcachedOracle, name: str, identity: str, metadata: Dict[str, Any], on_change: OnChange):
        self._oracle = oracle
        self._name = name
        self._key = oracle.key(name)
        self._identity = identity
        self._metadata = dict(metadata or {})
        size = len(json.dumps({"identity": identity, "metadata": self._metadata}))
        if size > _MAX_RECORD:
            raise ValueError(f"metadata too large for a memcached lease record ({size} bytes > {_MAX_RECORD})")
        self._on_change = on_change
        self._lock = threading.RLock()
        self._connection = _Connection(oracle)
        self._closed = False
        self._forked = False
        # Leading: the nonce and token of our term (None when not leading).
        self._nonce: Optional[str] = None
        self._token: Optional[int] = None
        self._since: Optional[float] = None
        self._ended_nonce: Optional[str] = None  # our last term's nonce, for abdicate
        self._pending: Optional[_Pending] = None
        self._prewon: Optional[Claim] = None  # a lease the poller took, for the next claim()
        # What we last saw in the key: (bytes, monotonic end of the first read that showed them).
        self._seen: Optional[Tuple[bytes, float]] = None
        # Poller state.
        self._watching = False
        self._watch_holder: Optional[Tuple[Any, Any]] = None
        self._last_quiet_poll: Optional[float] = None  # when the poller last saw nothing new
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.requests = 0  # calls made to memcached (for benchmarks and tests)
        _live_contenders.add(self)

    # -- helpers (lock held) ------------------------------------------------------------------

    def _call(self, method: str, *args, **kwargs):
        self._check_open()
        self.requests += 1
        return self._connection.call(method, *args, **kwargs)

    def _check_open(self) -> None:
        if self._forked:
            raise RuntimeError("memcached contender inherited across fork(): unusable in this process")
        if self._closed:
            raise RuntimeError("memcached contender is closed")

    def _observe(self, value: Optional[bytes], read_end: float) -> Optional[float]:
        """Remember ``value``; return the end time of the first read that showed these bytes."""
        if value is None:
            self._seen = None
            return None
        if self._seen is None or self._seen[0] != value:
            self._seen = (value, read_end)
        return self._seen[1]

    def _token_floor(self) -> int:
        """The wall clock in microseconds: the lowest token a new term may take."""
        return int(self._oracle.clock() * 1_000_000)

    def _me(self, token: Optional[int], since: Optional[float]) -> Leader:
        return Leader(self._identity, dict(self._metadata), token, since)

    def _record(self, state: str, nonce: str, token: int, since: Optional[float]) -> Dict[str, Any]:
        return {
            "state": state,
            "identity": self._identity,
            "metadata": self._metadata,
            "token": token,
            "since": since,
            "nonce": nonce,
        }

    def _won(self, nonce: str, token: int, since: float, started: float) -> Claim:
        self._nonce, self._token, self._since = nonce, token, since
        self._ended_nonce = None
        self._pending = None
        self._seen = None
        self._watching = False
        oracle = self._oracle
        return Claim(
            won=True,
            leader=self._me(token, since),
            token=token,
            deadline=started + oracle.ttl - oracle.margin,
            refresh_in=oracle.renew_interval,
        )

    def _take_over(self, record: Optional[Dict[str, Any]], cas: Any) -> Optional[Claim]:
        """CAS our ``held`` record over the version ``cas`` of ``record``. None if we lost the race."""
        nonce = _nonce()
        token = max(_record_token(record) + 1, self._token_floor())
        since = self._oracle.clock()
        started = _monotonic()
        done = self._call(
            "cas", self._key, _encode(self._record(HELD, nonce, token, since)), cas,
            expire=self._oracle.record_expire, noreply=False,
        )
        if not done:
            return None
        logger.info("%s leads %s with token %s", self._identity, self._name, token)
        return self._won(nonce, token, since, started)

    def _renew_pending(self) -> bool:
        """Rewrite our pending record (CAS). False if it is no longer ours."""
        pending = self._pending
        value, cas = self._call("gets", self._key)
        record = _decode(value)
        if record is None or record.get("state") != PENDING or record.get("nonce") != pending.nonce:
            self._pending = None
            return False
        done = self._call("cas", self._key, _encode(record), cas, expire=_PENDING_EXPIRE, noreply=False)
        if not done:
            self._pending = None
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
                oracle = self._oracle
                if prewon.deadline - _monotonic() > oracle.renew_interval + oracle.margin:
                    return prewon
                renewed = self._refresh_locked()
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
        if now - last > 2 * self._oracle.poll_interval or now >= seen[1] + self._oracle.ttl:
            return None
        record = _decode(seen[0])
        if _holder(record, seen[0]) != self._watch_holder or (record is not None and record.get("state") == RELEASED):
            return None
        return Claim(won=False, leader=_leader_of(record))

    def _claim_once(self) -> Optional[Claim]:
        oracle = self._oracle
        if self._pending is not None:
            pending = self._pending
            started = _monotonic()
            value, cas = self._call("gets", self._key)
            record = _decode(value)
            if record is not None and record.get("state") == PENDING and record.get("nonce") == pending.nonce:
                if started >= pending.ready_at:
                    # Quarantine over and the key was ours throughout: start.
                    token = max(_record_token(record) + 1, self._token_floor())
                    since = self._oracle.clock()
                    done = self._call(
                        "cas", self._key, _encode(self._record(HELD, pending.nonce, token, since)), cas,
                        expire=oracle.record_expire, noreply=False,
                    )
                    if done:
                        logger.info("%s leads %s with token %s after quarantine", self._identity, self._name, token)
                        return self._won(pending.nonce, token, since, started)
                    self._pending = None
                    return None
                done = self._call("cas", self._key, _encode(record), cas, expire=_PENDING_EXPIRE, noreply=False)
                if done:
                    pending.renewed_at = _monotonic()
                    return Claim(won=False, leader=None)
            self._pending = None  # lost it (flushed, taken over): claim afresh

        # Try to create the key: succeeds only if memcached has no record at all.
        nonce = _nonce()
        record = self._record(PENDING, nonce, self._token_floor(), None)
        if self._call("add", self._key, _encode(record), expire=_PENDING_EXPIRE, noreply=False):
            now = _monotonic()
            self._pending = _Pending(nonce, ready_at=now + oracle.ttl, renewed_at=now)
            self._seen = None
            logger.info(
                "%s found no lease record for %s on %s (first use, restart, flush or eviction): "
                "holding it, starting in %.3gs unless it is lost meanwhile",
                self._identity, self._name, oracle.description, oracle.ttl,
            )
            return Claim(won=False, leader=None)

        value, cas = self._call("gets", self._key)
        read_end = _monotonic()
        if value is None:
            return None  # vanished between add and gets: again
        record = _decode(value)
        state = record.get("state") if record else None
        if state == RELEASED:
            return self._take_over(record, cas)
        if state == HELD and record.get("nonce") is not None and record.get("nonce") in (self._ended_nonce, self._nonce):
            # Our own last term's record, untouched since: that term's child has stopped (the
            # engine claims only between terms) and nobody else held the key since.
            return self._take_over(record, cas)
        first_seen = self._observe(value, read_end)
        if read_end >= first_seen + oracle.ttl:
            # Unchanged for a whole ttl: its holder's deadline has passed.
            return self._take_over(record, cas)
        return Claim(won=False, leader=_leader_of(record))

    def refresh(self) -> Claim:
        with self._lock:
            self._check_open()
            return self._refresh_locked()

    def _refresh_locked(self) -> Claim:
        nonce = self._nonce
        if nonce is None:
            return Claim(won=False)
        started = _monotonic()
        value, cas = self._call("gets", self._key)
        record = _decode(value)
        if record is not None and record.get("state") == VACATED and record.get("prev") == nonce:
            # Dismissed. Our abdicate will write "released" and followers' pollers take it over
            # at their next poll: stay out of the contest for two polls of every follower, plus a
            # second for a busy host, or we would usually win our own release back at once.
            self._lose("it was dismissed")
            return Claim(won=False, yield_for=self._oracle.dismissed_yield)
        if record is None or record.get("state") != HELD or record.get("nonce") != nonce:
            self._lose("its lease record is gone" if value is None else "its lease record was replaced")
            return Claim(won=False, leader=_leader_of(record))
        done = self._call("cas", self._key, _encode(record), cas, expire=self._oracle.record_expire, noreply=False)
        if not done:
            self._lose("a renewal lost its CAS")
            return Claim(won=False)
        oracle = self._oracle
        return Claim(
            won=True,
            leader=self._me(self._token, self._since),
            token=self._token,
            deadline=started + oracle.ttl - oracle.margin,
            refresh_in=oracle.renew_interval,
        )

    def _lose(self, why: str) -> None:
        logger.info("%s lost %s (token %s): %s", self._identity, self._name, self._token, why)
        self._ended_nonce, self._nonce = self._nonce, None
        self._token = self._since = None

    def watch(self, leader: Optional[Leader]) -> bool:
        with self._lock:
            self._check_open()
            now = _monotonic()
            was_watching = self._watching
            if self._prewon is not None:
                return False  # the poller already took the lease: claim now
            if self._pending is not None:
                if now >= self._pending.ready_at:
                    return False
            else:
                seen = self._seen
                if seen is None:
                    return False  # no record seen: claim again
                record = _decode(seen[0])
                if record is not None and record.get("state") == RELEASED:
                    return False
                if now >= seen[1] + self._oracle.ttl:
                    return False
                self._watch_holder = _holder(record, seen[0])
            self._watching = True
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._poll_loop, name=f"crown-sync-memcached:{self._name}", daemon=True
                )
                self._thread.start()
        if not was_watching:
            self._wake.set()  # else the poller's schedule stands (no extra request)
        return True

    def _poll_loop(self) -> None:
        delay: Optional[float] = None
        while True:
            self._wake.wait(delay)
            self._wake.clear()
            if self._closed or self._forked:
                return
            try:
                signal, delay = self._poll_once()
            except Exception as exc:  # an unreachable server: keep trying at the poll interval
                logger.debug("%s: poll of %s failed: %s", self._identity, self._name, exc)
                signal, delay = False, self._oracle.poll_interval
            if signal and not self._closed:
                try:
                    self._on_change()
                except Exception:  # the engine's callback must not kill the poller
                    logger.exception("on_change callback failed")

    def _poll_once(self) -> Tuple[bool, Optional[float]]:
        """One round of the poller. Returns (call on_change?, seconds until the next round)."""
        oracle = self._oracle
        with self._lock:
            if not self._watching or self._closed or self._forked:
                return False, None
            if self._pending is not None:
                now = _monotonic()
                if now >= self._pending.ready_at:
                    # Quarantine over: convert the pending record now, then tell the engine. Stop
                    # watching only once that call has answered: if it raises, the poller's next
                    # round tries again (the engine hears nothing until then).
                    result = self._claim_once()
                    self._watching = False
                    if result is not None and result.won:
                        self._prewon = result
                    return True, None
                if now - self._pending.renewed_at >= oracle.renew_interval and not self._renew_pending():
                    self._watching = False
                    return True, None  # lost our pending record: claim afresh
                pending = self._pending
                wake_at = min(pending.ready_at, pending.renewed_at + oracle.renew_interval)
                return False, max(0.0, wake_at - _monotonic())
            value, cas = self._call("gets", self._key)  # as cheap as a get; the CAS id saves a trip
            read_end = _monotonic()
            first_seen = self._observe(value, read_end)
            record = _decode(value)
            if value is not None and (
                (record is not None and record.get("state") == RELEASED)
                or read_end >= first_seen + oracle.ttl  # unchanged for a whole ttl: stale
            ):
                # Take it over right here, then tell the engine: claim() hands the won lease over.
                # As above, a takeover that raised leaves us watching: the next round reads again.
                won = self._take_over(record, cas)
                self._watching = False
                if won is not None:
                    self._prewon = won
                return True, None
            if value is None or _holder(record, value) != self._watch_holder:
                self._watching = False
                return True, None  # a new holder, a dismissal, or no record: the engine claims
            self._last_quiet_poll = _monotonic()
            # Poll again after poll_interval, or exactly when the record will have been unchanged
            # for a ttl if that comes sooner (crash failover is then ttl + at most one poll).
            stale_in = first_seen + oracle.ttl - _monotonic()
            return False, max(0.0, min(oracle.poll_interval, stale_in))

    def abdicate(self) -> None:
        with self._lock:
            if self._closed or self._forked:
                return
            self._release_locked()

    def _release_locked(self) -> None:
        """Turn our record into ``released``: only after our child stopped (or never started)."""
        self._prewon = None
        nonce = self._nonce or self._ended_nonce
        self._nonce = self._token = self._since = None
        self._ended_nonce = nonce  # kept: a later claim may find our record still there
        if nonce is None:
            return
        value, cas = self._call("gets", self._key)
        record = _decode(value)
        if record is None:
            return
        ours = (record.get("state") == HELD and record.get("nonce") == nonce) or (
            record.get("state") == VACATED and record.get("prev") == nonce and record.get("prev_state") == HELD
        )
        if not ours:
            return  # someone else's now: never touch it
        released = {
            "state": RELEASED,
            "token": record.get("token"),
            "prev": nonce,
            "identity": self._identity,
        }
        # CAS, never a blind delete: if anything changed since our gets, it is not ours to free.
        if self._call("cas", self._key, _encode(released), cas, expire=_RELEASED_EXPIRE, noreply=False):
            self._ended_nonce = None
            logger.info("%s released %s (token %s)", self._identity, self._name, record.get("token"))

    def _vacate(self, nonce: str, state: str) -> None:
        """Give up a record we hold without vouching that our child has stopped: successors wait
        ``ttl`` after seeing the vacated record, which outlasts any deadline of ours."""
        value, cas = self._call("gets", self._key)
        record = _decode(value)
        if record is None or record.get("nonce") != nonce or record.get("state") != state:
            return
        vacated = {
            "state": VACATED,
            "token": record.get("token"),
            "prev": nonce,
            "prev_state": state,
            "identity": self._identity,
            "by": "close",
        }
        self._call("cas", self._key, _encode(vacated), cas, expire=self._oracle.record_expire, noreply=False)

    def close(self) -> None:
        if self._closed or self._forked:
            return
        self._wake.set()
        wait = self._oracle.timeout * 2 + self._oracle.connect_timeout + 0.5
        acquired = self._lock.acquire(timeout=wait)
        try:
            if acquired and not self._closed:
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
                    logger.debug("%s: vacating %s on close failed: %s", self._identity, self._name, exc)
            self._closed = True
            self._watching = False
            self._nonce = self._pending = self._prewon = None
        finally:
            if acquired:
                self._connection.close()
                self._lock.release()
            else:
                self._connection.interrupt()  # a call is stuck in another thread: cut it short
                self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(wait)

    def _after_fork_in_child(self) -> None:
        self._forked = True
        self._closed = True
        self._watching = False
        self._thread = None
        self._lock = threading.RLock()


_live_connections: "weakref.WeakSet[_Connection]" = weakref.WeakSet()
_live_contenders: "weakref.WeakSet[MemcachedContender]" = weakref.WeakSet()
_live_oracles: "weakref.WeakSet[MemcachedOracle]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for connection in list(_live_connections):
        connection.after_fork_in_child()
    for contender in list(_live_contenders):
        contender._after_fork_in_child()
    for oracle in list(_live_oracles):
        oracle._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
