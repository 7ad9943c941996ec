"""What the PostgreSQL oracle's modules share: options, errors, the advisory key, the leader
record's encoding and the socket helpers."""

import base64
import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import select
import socket
import threading
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import psycopg

from ... import clock, warden
from ...terms import Term

logger = logging.getLogger("crown_sync.oracles.postgres")

#: Options accepted in the URL query string (everything else goes to libpq).
OPTIONS = {
    "namespace": str,
    "lease": float,
    "confirm_interval": float,
    "margin": float,
    "connect_timeout": float,
    "wait_timeout": float,
    "takeover_delay": float,
    "sessions": str,
    "poll_interval": float,
}

_RECORD = re.compile(r"/\* crown_sync:v1:([A-Za-z0-9_-]+) \*/")
_MARKER = "crown_sync.session"
_MIN_VERSION = 140000
# How long a woken follower looks for proof of how its predecessor's term ended (its release
# notification, or its backend's exit, normally both within milliseconds) before it waits out the
# predecessor's lease instead.
_PROOF_WAIT = 0.5


class PostgresOracleError(RuntimeError):
    """The server can't be used as an oracle as configured."""


class StandbyRefused(PostgresOracleError):
    """The server is in recovery (a standby): its advisory locks are not the primary's."""


class _SessionGone(ConnectionError):
    """Our session had ended (by the server) before a statement we sent reached it."""


class _Unanswered(ConnectionError):
    """A statement got no answer within its bound (a frozen server: its kernel still ACKs, so no
    TCP timeout fires), and we cut the session under it (see :func:`bounded`)."""


class _Baseline(collections.namedtuple("_Baseline", "holder killed led ours")):
    """Read by a follower's wait statement before it queued for the lock: the holder's backend
    pid and pg_stat_database.sessions_killed (either None if unknown), whether the holder is of
    a trusted role and its last statement carried a leader record (it led, rather than waited
    out a predecessor), and the pids of the trusted sessions that held or awaited the lock (a
    frozenset, with those of this session's read before: Takeover.note): the only senders whose
    claims and releases count (_sql._TRUSTED)."""


class _Holder(collections.namedtuple("_Holder", "pid query role app trusted")):
    """A session that holds an election's lock, as _sql._HOLDER_COLUMNS reads it: its backend
    pid, last statement, role, application_name, and whether its role is trusted (None: its
    pg_stat_activity row was gone)."""


class PoolingDetected(PostgresOracleError):
    """A pooler or proxy sits between us and the server: the startup message named another
    backend pid than the session's own, or statements of one connection reached different
    server sessions (transaction pooling)."""


def advisory_key(namespace: str, name: str) -> int:
    """The signed 64-bit advisory lock key of election ``name`` in ``namespace``.

    The first 8 bytes of BLAKE2b over ``"crown_sync\\0" + namespace + "\\0" + name`` (UTF-8),
    read as a big-endian signed integer: stable across processes, hosts and Python versions
    (unlike ``hash()``). Two distinct elections collide with probability 2**-64; among ``n``
    elections and other applications' 64-bit advisory locks in one database, about
    ``n**2 / 2**65`` (one in 3.7e13 for a thousand). The two-int form ``pg_advisory_lock(int,
    int)`` lives in a separate key space (``objsubid`` 2) and never collides with these.
    """
    data = b"crown_sync\0" + namespace.encode("utf-8") + b"\0" + name.encode("utf-8")
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _key_parts(key: int) -> Tuple[int, int]:
    """(classid, objid) as pg_locks shows a bigint advisory key (two unsigned 32-bit halves)."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return unsigned >> 32, unsigned & 0xFFFFFFFF


def _channel(key: int) -> str:
    return f"crown_sync_{key & 0xFFFFFFFFFFFFFFFF:016x}"


def _lease_ms(lease: float) -> int:
    """``lease`` in whole milliseconds, rounded UP: a server timeout set from it must never be
    shorter than the lease (``int(2.01 * 1000)`` is 2009, and the connect check would then refuse
    every session). The epsilon keeps float noise (``1.1 * 1000 = 1100.0000000000002``) from
    adding a millisecond."""
    return math.ceil(lease * 1000 - 1e-6)


_SETTINGS = (
    "idle_session_timeout", "tcp_user_timeout", "tcp_keepalives_idle", "tcp_keepalives_interval",
    "tcp_keepalives_count", "track_activity_query_size", "track_activities", "track_counts",
)


def _encode_record(record: Dict[str, Any]) -> str:
    data = json.dumps(record, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return "/* crown_sync:v1:" + base64.urlsafe_b64encode(data).decode("ascii").rstrip("=") + " */ "


def _decode_record(query: Optional[str]) -> Optional[Dict[str, Any]]:
    if not query:
        return None
    match = _RECORD.search(query)
    if not match:
        return None
    text = match.group(1)
    try:
        record = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, TypeError):
        return None
    return record if isinstance(record, dict) else None


def _find_record(query: Optional[str], namespace: str, name: str) -> Optional[Dict[str, Any]]:
    """The leader record of election ``name`` in a session's last statement: a dedicated
    session's carries one, a shared holder session's (sessions=shared) one per term it leads."""
    for match in _RECORD.finditer(query or ""):
        record = _decode_record(match.group(0))
        if record and record.get("ns") == namespace and record.get("name") == name:
            return record
    return None


def _all_records(query: Optional[str]) -> Iterator[Dict[str, Any]]:
    """Every leader record in a session's last statement (see _find_record)."""
    for match in _RECORD.finditer(query or ""):
        record = _decode_record(match.group(0))
        if record:
            yield record


# ------------------------------------------------------------------------------ fork safety


def _blind(conn: Optional[psycopg.Connection]) -> None:
    """In a forked child: point the inherited socket at /dev/null, so any goodbye goes nowhere.
    _forksafe already did so after a fork that ran Python's at-fork handlers; a fork from C
    (uWSGI), found by the pid check, did not, and dropping the connection unblinded would send
    psycopg's goodbye on the parent's session (and free its lock under its running child)."""
    if conn is None:
        return
    try:
        fd = conn.pgconn.socket
    except Exception:
        return
    try:
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
    except OSError:
        pass


def _readable(fd: int, timeout: float) -> bool:
    """Has ``fd`` something to read (or an error, or EOF) within ``timeout`` seconds? poll(), not
    select(): select() refuses descriptors above 1023, which a process with many crowns has."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(max(0, math.ceil(timeout * 1000))))


def _shutdown(conn: Optional[psycopg.Connection]) -> None:
    """Cut the connection's socket under whoever is using it (bounded, no network wait)."""
    if conn is None:
        return
    try:
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    except Exception:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


class _Flight:
    """One statement in flight on ``conn``; :func:`bounded` cuts the socket if it is still in
    flight at its bound. The lock closes the race between the cut and the statement's end (the
    next statement on the same connection must never be the one cut)."""

    def __init__(self, conn: psycopg.Connection, on_cut: Callable[[], None]):
        self._lock = threading.Lock()
        self._conn = conn
        self._on_cut = on_cut
        self.done = False
        self.cut = False

    def expire(self, _statement: Term) -> None:
        with self._lock:
            if self.done:
                return
            self.cut = True
            _shutdown(self._conn)
        self._on_cut()  # outside the lock: it may call on_change

    def finish(self) -> None:
        with self._lock:
            self.done = True


@contextlib.contextmanager
def bounded(conn: psycopg.Connection, until: float, on_cut: Callable[[], None] = lambda: None,
            server: str = "the server") -> Iterator[_Flight]:
    """Run the body (one statement, or a few in a row) with a client-side bound: if it is still
    in flight at the monotonic instant ``until``, the warden's thread shuts the socket down (the
    statement then fails at once, the session is lost), calls ``on_cut()``, and the body's
    psycopg error becomes :class:`_Unanswered`. libpq has no statement timeout of its own, and
    a stopped server's kernel keeps the TCP connection up. The caller must make sure that
    ending the session at ``until`` is safe (see its comment)."""
    flight = _Flight(conn, on_cut)
    started = clock.monotonic()
    # The warden (one thread per process, a heap of deadlines) serves statements as it serves
    # terms: a term here is just "this statement, due at until".
    statement = Term("statement", "", None, until, leading=False)
    warden.watch(statement, flight.expire)
    try:
        yield flight
    except psycopg.Error:
        if flight.cut:
            raise _Unanswered(f"{server} did not answer within {max(0.0, until - started):.3g}s;"
                              f" session closed") from None
        raise
    finally:
        flight.finish()
        statement.end()  # the warden drops it when it comes due


def _keepalives(lease: float) -> Tuple[int, int, int]:
    """(idle, interval, count) in whole seconds with idle + interval * count >= lease."""
    idle = max(1, int(lease // 3))
    interval = max(1, int(lease // 6))
    count = 1
    while idle + interval * count < lease:
        count += 1
    return idle, interval, count

