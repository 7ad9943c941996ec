"""PostgreSQL oracle: session advisory locks, a server-enforced lease, instant takeover.

``PostgresOracle("postgresql://app@db/app")`` or the URL ``postgresql://app@db/app?lease=10``.

How it works
------------
Every contender owns ONE dedicated autocommit connection (never a pool: advisory locks are
re-entrant per session, so two contenders sharing a session would both "win"). The election
``name`` maps to a 64-bit advisory lock key (:func:`advisory_key`); the leader is whoever's
session holds ``pg_advisory_lock(key)``.

* **claim** runs ``pg_try_advisory_lock(key)``. On success, in the same statement and only after
  the lock is granted, it takes the fencing token ``pg_current_xact_id()`` and writes a
  transactional ``pg_logical_emit_message`` so that the commit is WAL-flushed (see *tokens*).
* **followers** wait in a thread on their own connection in a blocking ``pg_advisory_lock(key)``
  (the same statement then takes the token), so the server wakes the first waiter the instant the
  holder's session ends or unlocks: no polling. Each wait is bounded by ``lock_timeout =
  wait_timeout`` because a running statement pins its snapshot's xmin, which would hold back
  VACUUM for as long as a follower waits; after a timeout the waiter reads the current leader
  record (so ``crown.leader()`` stays fresh) and waits again: two cheap statements per
  ``wait_timeout`` at rest. While its waiter is queued, ``claim()`` answers "lost" with no I/O:
  the server would have woken the waiter if the lock were free.
* **refresh** (every ``confirm_interval``) confirms, in one statement, that the backend pid and a
  per-session marker are unchanged and that ``pg_locks`` shows our pid holding the key.
* **abdicate** sends, in one round trip, ``BEGIN; NOTIFY <channel>, 'released:<token>'; COMMIT;
  SELECT pg_advisory_unlock_all()`` (the session is ours alone, so this releases exactly our
  lock, however many times it was re-entered). Every claim sends ``'claimed:<token>'`` in its own
  transaction. Every contender LISTENs on its election's channel, and notifications arrive in
  commit order, so a follower can tell a release from a death (see *takeover*). The release also
  reports whether another session waits for the key; if one does, ``close()`` waits (at most 50
  ms) for that successor's ``'leading:<token>'``, sent by its term's first confirmation after its
  child started, before it ends our session: a backend's exit costs the server milliseconds of
  CPU, and our process usually exits next, which would otherwise compete with the successor's
  claim and child start.

Takeover
--------
A session can end under a leader that is still running: ``pg_terminate_backend``, a connection
killer. The server then frees the lock before that leader's child has stopped (a daemon may need
seconds to honour SIGTERM), or while the leader's process is paused and hears nothing at all. So
a follower granted the lock leads at once only with proof that the previous term's child can no
longer run:

* **released**: it reads the channel's notifications up to its own ``claimed:<token>``. Its
  predecessor is the last claim it saw before its own (or, if it saw none, whoever held the lock
  when its wait began). If that term's ``released:`` followed, the old child had stopped.
* **ended, not by a termination**: a backend releases its locks, then counts its disconnect in
  ``pg_stat_database`` (``sessions_killed`` for a termination, ``sessions_abandoned`` for a
  vanished client such as a SIGKILLed leader, ``sessions_fatal`` for ``idle_session_timeout``),
  and only then leaves ``pg_stat_activity``. The wait statement read ``sessions_killed`` before
  queueing; once the predecessor's pid has left pg_stat_activity, an unchanged count proves it
  was not terminated: its process died (thread children with it; process children by their
  parent-death signal or their deadline), or the server ended it for silence, which happens
  only after its deadline (see the lease arithmetic). This needs a predecessor that *led*
  (announced ``leading:<token>``, or whose last statement carried a leader record): a session
  that held the lock while waiting out its own predecessor's lease (below) proves nothing about
  that predecessor's child by ending.

Otherwise (a termination anywhere in the database meanwhile, a statistics reset, ``track_counts =
off``, an unknown predecessor or one that never led, no proof within ``_PROOF_WAIT``) the
follower holds the lock **without leading until the predecessor's deadline has certainly
passed**. The bound: the predecessor's deadline is at most ``B - margin`` after the start ``t0``
of its last confirming statement (see the lease arithmetic); that statement reached the server
before the session was terminated, the termination freed the lock, and the lock was granted to
us before our wait statement returned, so before the monotonic instant ``g`` we read next. So the
deadline has passed by ``g + B - margin`` on the predecessor's clock, and we wait until ``g + B``
(the margin absorbs the two clients' clock rates). This assumes every contender of an election
has the same lease. Meanwhile the follower confirms its session every ``confirm_interval`` (the
server ends a session idle for ``lease``; a confirmation also finds out if our own session was
ended), ``claim()`` answers "lost", and a stop or close ends the wait at once (closing the
session frees the lock; the next follower, seeing a session that never led, waits again). The
debt is remembered: if the session ends during the wait, the next claim, on a new session, waits
out the rest. A dismissal names a leader, and a follower waiting out a lease is not one yet.

Cost: a new term starts about ``lease`` after a termination (10 s with the defaults) instead of
at once; a graceful handoff and a crash failover (SIGKILL, a dead host) cost nothing more.
``takeover_delay`` set to a number opts out of the guarantee: the follower waits that long and no
longer (0: it does not look for proof either), an assumption about how fast a told leader stops
its child; the fencing token is then the only protection.

A claim that was not queued (``pg_try_advisory_lock`` wins: a crown that starts or reconnects,
one that polls with ``monitor_leader=False``, a follower between two waits; e.g. after a
connection killer ended every session, followers' included) follows the same rule. A failed
claim reads, before trying the lock, ``sessions_killed``, then the holder: if the last claim on
this session failed, that is a baseline like a woken follower's, and the same proof applies.
Without a baseline (a new session) or proof, the predecessor is unknown, and one more statement
after the grant (``_QUIET_SQL``) reads how long ago, by the server's clock, a termination we
cannot see may have ended a term of this election:

* now, while another session of this database may still be exiting from such a term: its last
  statement carries the election's tag (a leader's confirmations and a follower's lock wait,
  the only statements after which a session leads, begin with ``/* crown_sync_<key> */``), or
  cannot be read (another role's, without ``pg_read_all_stats``; ``track_activities`` off). A
  backend counts its disconnect before it leaves pg_stat_activity, so once none is left, every
  such end is counted, in the count read next;
* then, if ``sessions_killed`` is 0: since the database's statistics were reset (never: no
  termination ever). A leader terminated before the reset had its deadline at most ``B -
  margin`` after its last confirmation, which preceded the termination, which preceded the
  reset; else (any termination counted, or ``track_counts = off``): now.

The child then waits until ``B - age`` after that statement's result (as after a restart). A
session that held the lock without leading (waiting out a debt) carries no tag and needs none:
its debt came from a term that was terminated (counted, or still exiting and tagged), from one
that ended otherwise (nothing to fear), or from a restart (a claim in an incarnation younger than
a lease reads its age: see below). Sessions ended by ``idle_session_timeout`` (``sessions_fatal``:
the leader was silent for ``B``, so its deadline has passed) or by a vanished client
(``sessions_abandoned``: its children die by their parent-death signal or at their deadline) are
not terminations and cost nothing. Cost: none on a database that never counted a termination; a
lease after a claim on a new session on one that did, until ``pg_stat_reset()``, after which a
new session waits only until a lease after the reset. A fast shutdown (``pg_ctl stop -m fast``,
a restart) terminates the sessions it finds and counts them as killed.

Restarts, crashes and failovers
-------------------------------
A server restart, a crash (a crashed backend makes the postmaster end every session and
reinitialise) or a failover ends every session, and the new incarnation knows nothing of the old
one's locks. A leader whose process is paused meanwhile keeps its child until its deadline, up to
``B - margin`` after its last statement, which the old incarnation served. So a claim (or a
waiter's grant) in an incarnation younger than ``B`` wins the lock but does not lead until ``B``
after the incarnation began: it holds the lock without leading, as above, in a thread (the claim
answers "lost" meanwhile). The claim statement itself reads the incarnation's age by the server's
clock (``_INCARNATION_AGE``: since the postmaster's start, since crash recovery discarded the
statistics, or since a promotion, conservatively), no extra round trip, and only when our own session is younger than ``B`` (an older
session proves an older incarnation). The old leader's last statement began before the
incarnation did, and the age was read before the result reached us, so ``B - age`` after that
result the old deadline has passed. On a freshly started server, too, the first leader waits
until the server is ``lease`` old.

Once leading, the waiter thread tells the engine with the term ready (its deadline counted from
the start of the wait statement, which proved the session: see below) and stays on as the
term's socket watcher; the claim asks for a refresh at once, which publishes the leader record
after the child has started.

The lease the server enforces (safety arithmetic)
-------------------------------------------------
A lock outlives its holder's usefulness in three ways, and the server is made to end each one
no sooner than ``lease`` seconds after the start of the holder's last statement:

* a paused (SIGSTOP, swap, GC) or partitioned leader whose TCP connection stays up: the session
  sets ``idle_session_timeout = lease`` (PostgreSQL 14+, settable by any user), so the server
  terminates it, and frees its lock, ``lease`` after it went idle;
* a vanished client (dead host, cable pulled): ``tcp_user_timeout = lease`` and server-side TCP
  keepalives with ``idle + interval * count >= lease``; Linux drops the connection no earlier
  than that after the last segment it received from us;
* a dead process on a live host: its kernel closes the socket and the lock is free at once
  (this is the fast crash failover).

After connecting, the contender reads these settings back (``SHOW`` reports the effective socket
values; zero means "does not apply", e.g. TCP settings over a unix socket) and takes ``B`` = the
smallest that applies. A statement that started at monotonic time ``t0`` and succeeded proves the
session (hence the lock) was alive at ``t0``, and every mechanism above measures from a moment
after ``t0``. So the server cannot give the lock to anyone before ``t0 + B``, and the term's
deadline is ``t0 + B - margin`` (``margin`` absorbs clock-rate differences between the two
hosts). A follower's lock wait that returned is such a statement too: its term's first deadline
counts from the start of the wait (unless less than ``confirm_interval`` of it is left, when it
confirms first; it also confirms first after waiting out a predecessor's lease or with unread
bytes on the socket, since the wait proves nothing against a termination that came after it). The
construction checks ``confirm_interval <= (lease - margin) / 2`` so that one failed
confirmation can be retried before the deadline, and connecting checks ``B >= lease``.

Lost lock without notice (``pg_terminate_backend``, a server restart, ``idle_session_timeout``,
a pooler's connection lifetime): while leading, a watcher thread polls the connection's socket
between our statements. Unsolicited bytes from an idle server are a goodbye (a FATAL message,
EOF), a notice, or a NOTIFY. On EOF or an ``E`` (error) message, peeked without reading, it calls
``on_change(lost=True)`` and the engine ends the term at once; otherwise it lets libpq read the
bytes (a failed read is a goodbye too: TLS hides the message type) and asks for a refresh only
for a dismissal. Should the watcher miss it, the next refresh, within ``confirm_interval``, sees
the broken connection or the missing lock and returns ``won=False``. A broken connection always
means lost leadership (a new session cannot inherit a lock), so refresh returns ``won=False``
rather than raising; other errors raise and the engine retries until the deadline. The next
claim reconnects (with a short tenacity backoff inside, and the engine's own backoff around it).
A claim that finds its session already ended by the server (a follower that stayed quiet longer
than ``lease``, e.g. with ``monitor_leader=False`` and ``monitor_delay > lease``) reconnects and
tries once more at once, instead of failing.

Tokens
------
The token is ``timeline << 48 | (xid & (2**48 - 1))``: the server's timeline (from the current WAL
file's name: 1, and one more after every promotion) above the low 48 bits of
``pg_current_xact_id()`` (a 64-bit, epoch-extended transaction id). Transaction ids rise
monotonically and survive restarts, but only those the server remembers: an xid whose commit
record was never flushed can be handed out again after a crash. A read-only transaction's commit
is not flushed, so the claim statement also writes a tiny transactional logical message (prefix
``crown_sync``, no table, no DDL; visible only to logical decoding consumers) which makes the
commit a flushed, synchronous one (``synchronous_commit = on`` is set for the session). The
token is taken after the lock is granted, so a later term's token is a later xid. A promoted
asynchronous standby that had not received the last WAL hands out xids its old primary already
used, but on a higher timeline, so its tokens are higher still. Bounds: 2**48 xids last 9 years
at a million transactions per second (89 at 100,000/s) from the cluster's creation; timelines
stay below 2**15, so the token a positive bigint, for 32,767 promotions. Tokens taken before this
format (bare xids, below 2**48) are lower than every new one. Assumed: the old primary accepts
no more transactions once the standby is promoted (fence it).

Leader record without DDL
-------------------------
``find_leader`` must name the holder (identity, metadata, token, since). Instead of a table
(DDL, privileges, rows outliving sessions, vacuum), the leader publishes its record in the text
of its own confirm statements, as a leading SQL comment ``/* crown_sync:v1:<base64 JSON> */``.
PostgreSQL shows a session's last statement in ``pg_stat_activity.query``, so readers join
``pg_locks`` (who holds the key) with ``pg_stat_activity`` (what that session last said). The
record therefore exists exactly as long as the lock does. Limits: the text is cut at
``track_activity_query_size`` bytes (1 kB by default; the record drops ``metadata`` rather than
be cut); other roles see it only with ``pg_read_all_stats``, and ``track_activities`` must be on.
When the record can't be read, ``find_leader`` still reports the holder, as
``"(unknown: backend pid N)"``.

dismiss
-------
``dismiss(name)`` sends ``NOTIFY`` on the election's channel naming the holder's backend pid and
token; every contender LISTENs on it, and the leader, woken by its socket watcher, refreshes and
steps down (child stopped first, then unlock). A leader that can't hear it (paused, partitioned)
keeps leading until its session ends; dismiss never kills a session, because that would free
the lock while the old child may still run.

Refused, with a clear error
---------------------------
* a server in recovery (a hot standby grants advisory locks too): checked at connect and in
  every claim and confirm (use ``target_session_attrs=read-write`` with several hosts);
* any connection pooler or protocol-level proxy (PgBouncer, Pgpool-II, RDS Proxy, ... in any
  mode). The guarantees above need the server session to be ours alone and to end exactly when
  our connection ends: a transaction or statement pooler sends consecutive statements to
  different sessions; in transaction mode PgBouncer, by default (``server_round_robin = 0``),
  hands the most recently freed session to whoever asks next, so a quiet contender's session
  (lock included: advisory locks are re-entrant) is given to a second contender, and both would
  lead without any statement seeing another pid; and even in session mode the server-side
  timeouts guard the pooler's connection, not ours. At connect, the backend pid the server
  announced in the startup BackendKeyData (``conn.info.backend_pid``; a pooler sends its own)
  must equal ``pg_backend_pid()``; the session also sets a random marker with
  ``set_config('crown_sync.session', ...)`` and every statement checks that the marker and the
  backend pid are still ours. A plain TCP forwarder (which passes the server's own messages
  through) is not detected, and is fine as long as it does not cut idle connections sooner than
  ``lease``;
* PostgreSQL older than 14 (no ``idle_session_timeout``).

On PostgreSQL 14 the statistics collector counts disconnects asynchronously, so neither proof
through ``sessions_killed`` holds: every takeover but a release waits out a lease there.

NOT guaranteed: a follower whose lease differs from its predecessor's; an explicit
``takeover_delay``; ``track_counts`` turned off for the terminated leader's session alone. Pass the fencing token to the resource you protect. Failover to a
old primary that still accepts statements after its standby was promoted (split brain). Key collisions with other applications'
advisory locks in the same database (see :func:`advisory_key`).

Fork: a forked child gets copies of the connections' sockets. In the child we ``dup2``
``/dev/null`` over them, so nothing sent later (psycopg's goodbye on garbage collection) reaches
the parent's sessions, and mark every object unusable.
"""

import base64
import collections
import hashlib
import json
import logging
import math
import os
import re
import select
import socket
import threading
import time
import urllib.parse
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

import psycopg
import psycopg.errors
import tenacity
from psycopg import conninfo as _conninfo

from .. import _forksafe, clock
from ..oracle import Claim, Leader, OnChange
from ..urls import parse_options, redact, redact_text
from ._base import ContenderBase, OracleBase, Phase, leader_of, record_of, seconds_between

__all__ = [
    "PostgresOracle",
    "PostgresContender",
    "advisory_key",
    "PostgresOracleError",
    "StandbyRefused",
    "PoolingDetected",
]

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
}

_RECORD = re.compile(r"/\* crown_sync:v1:([A-Za-z0-9_-]+) \*/")
_MARKER = "crown_sync.session"
_MIN_VERSION = 140000
# close() after a graceful release waits at most this long for the successor to lead (see
# _await_successor); normally it takes a few milliseconds.
_HANDOFF_LINGER = 0.05
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


class _Baseline(collections.namedtuple("_Baseline", "holder killed led")):
    """Read by a follower's wait statement before it queued for the lock: the holder's backend
    pid and pg_stat_database.sessions_killed (either None if unknown), and whether the holder's
    last statement carried a leader record (it led, rather than waited out a predecessor)."""


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


# -------------------------------------------------------------------------------- SQL
# Every statement reports pg_backend_pid() and our session marker: the pooling check.

_KEY_LOCK = (
    "l.locktype = 'advisory' AND l.database = (SELECT oid FROM pg_database"
    " WHERE datname = current_database()) AND l.classid::bigint = %(hi)s"
    " AND l.objid::bigint = %(lo)s AND l.objsubid = 1"
)
_HOLDER = _KEY_LOCK + " AND l.granted"

# The server's current timeline (the first 8 hex digits of the current WAL file's name): 1 on a
# server never promoted, one more after every promotion. pg_control_checkpoint() lags behind it
# until the first checkpoint after a promotion.
_TIMELINE = "('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint"

# The fencing token: the timeline above the low 48 bits of the 64-bit transaction id. Transaction
# ids rise within a timeline; a promoted standby that had not received the latest WAL hands out
# ids its old primary already used, but on a higher timeline. 2**48 transaction ids last 9 years
# at a million per second, and timelines stay below 2**15 (so the token stays a positive bigint)
# for 32767 promotions; see the module docstring.
_TOKEN = "((" + _TIMELINE + " << 48) | (pg_current_xact_id()::text::bigint & 281474976710655))"

# A server restart, crash or failover is a lease boundary: a leader of the previous incarnation
# (paused, its child running on) may keep its child until its deadline, up to a lease after its
# last statement, which the old incarnation (or the old primary) served. How long ago did this
# incarnation begin, by the server's clock? At the latest: when the postmaster started (a
# restart); after a backend crash (the postmaster reinitialises without restarting; every session
# ends), when crash recovery discarded the statistics, which sets pg_stat_bgwriter.stats_reset
# (pg_stat_reset_shared() moves it too: a later time only makes us wait longer); after a
# promotion, now if no checkpoint has completed on the new timeline yet, else when the last one
# began (on a server that was ever promoted, any later checkpoint makes us wait: conservative).
# Read only by a session younger than a lease (%(young)s): an older one proves the incarnation is.
_INCARNATION_AGE = (
    "extract(epoch FROM clock_timestamp() - greatest(pg_postmaster_start_time(),"
    " (SELECT w.stats_reset FROM pg_stat_bgwriter w),"
    " (SELECT CASE WHEN c.timeline_id <> " + _TIMELINE + " THEN clock_timestamp()"
    " WHEN c.timeline_id > 1 THEN c.checkpoint_time + interval '1 second' END"
    " FROM pg_control_checkpoint() c)))::float8"
)

_DATABASE_OID = "(SELECT oid FROM pg_database WHERE datname = current_database())"

# The subquery with OFFSET 0 is evaluated (lock taken) before the outer target list (token). A
# failed claim also reads, before trying the lock (its argument depends on the read), how many
# sessions of this database were ever terminated: the baseline of a later claim (_claim_debt).
_TRY_SQL = (
    "SELECT s.locked,"
    " CASE WHEN s.locked THEN " + _TOKEN + "::text END,"
    " CASE WHEN s.locked THEN pg_logical_emit_message(true, 'crown_sync', %(msg)s)::text"
    " || pg_notify(%(channel)s, 'claimed:' || " + _TOKEN + "::text)::text END,"
    " extract(epoch FROM clock_timestamp())::float8, pg_backend_pid(),"
    " current_setting('" + _MARKER + "', true), pg_is_in_recovery(), h.pid, h.query,"
    " CASE WHEN s.locked AND %(young)s THEN " + _INCARNATION_AGE + " END, s.killed"
    " FROM (SELECT k.killed, pg_try_advisory_lock(%(key)s::bigint + 0 * coalesce(k.killed, 0))"
    " AS locked FROM (SELECT pg_stat_get_db_sessions_killed(" + _DATABASE_OID + ") AS killed"
    " OFFSET 0) k OFFSET 0) s"
    " LEFT JOIN LATERAL (SELECT l.pid, a.query FROM pg_locks l"
    " LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE NOT s.locked AND l.pid <> pg_backend_pid() AND " + _HOLDER + " LIMIT 1) h ON true"
)

# Every claim also NOTIFYs "claimed:<token>" on the election's channel (and every graceful
# release "released:<token>", before unlocking): listeners see these in commit order.

# Before queueing for the lock, the same statement reads who holds it, that holder's last
# statement (a leader's carries its record) and how many sessions of this database were ever
# terminated (pg_terminate_backend): the baseline _take_over compares with. The lock's argument
# depends on that read (``+ 0 * ...``), so it cannot be taken first. The target list, evaluated
# after the grant, reads the incarnation's age (see _INCARNATION_AGE).
_WAIT_SQL = (
    "SELECT " + _TOKEN + "::text,"
    " pg_logical_emit_message(true, 'crown_sync', %(msg)s)::text"
    " || pg_notify(%(channel)s, 'claimed:' || " + _TOKEN + "::text)::text,"
    " extract(epoch FROM clock_timestamp())::float8, pg_backend_pid(),"
    " current_setting('" + _MARKER + "', true), pg_is_in_recovery(), b.holder, b.killed, b.query,"
    " CASE WHEN %(young)s THEN " + _INCARNATION_AGE + " END"
    " FROM (SELECT h.pid AS holder, h.query, pg_stat_get_db_sessions_killed(" + _DATABASE_OID + ")"
    " AS killed FROM (SELECT 1) one LEFT JOIN LATERAL (SELECT l.pid, a.query FROM pg_locks l"
    " LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.pid <> pg_backend_pid() AND " + _HOLDER + ""
    " LIMIT 1) h ON true OFFSET 0) b,"
    " LATERAL (SELECT pg_advisory_lock(%(key)s::bigint + 0 * coalesce(b.killed, 0)) OFFSET 0) s"
)

# After the grant: has the predecessor's session finished exiting (its pg_stat_activity entry
# is removed after its disconnect was counted), and how many terminations are counted now?
# Evaluated left to right: the entry is looked up before the counter is read.
_PREDECESSOR_SQL = (
    "SELECT EXISTS (SELECT 1 FROM pg_stat_get_activity(%(pid)s) a WHERE a.pid = %(pid)s),"
    " pg_stat_get_db_sessions_killed(" + _DATABASE_OID + ")"
)

# After a claim won with pg_try_advisory_lock without a baseline (_claim_debt): how long ago, by
# the server's clock, could a termination we cannot see have ended a term of this election? Now
# (0) while any other session of this database may still be exiting from such a term: its last
# statement carries the election's tag (a leader's confirmations, a follower's lock wait) or can't
# be read (another role's session without pg_read_all_stats, track_activities off). Otherwise,
# every such session has left pg_stat_activity, so its disconnect is counted (read next, left to
# right): with no termination counted since the database's statistics were reset, since that
# reset (never reset: forever); with one, now.
_QUIET_SQL = (
    "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid <> pg_backend_pid()"
    " AND a.datid = " + _DATABASE_OID + " AND (strpos(a.query, %(tag)s) > 0"
    " OR a.query = '<insufficient privilege>' OR a.state = 'disabled')) THEN 0::float8"
    " WHEN pg_stat_get_db_sessions_killed(" + _DATABASE_OID + ") = 0 THEN coalesce(extract(epoch"
    " FROM clock_timestamp() - pg_stat_get_db_stat_reset_time(" + _DATABASE_OID + "))::float8,"
    " 'Infinity'::float8) ELSE 0::float8 END"
)

_HOLDER_SQL = (
    "SELECT l.pid, a.query, pg_backend_pid(), current_setting('" + _MARKER + "', true),"
    " pg_is_in_recovery()"
    " FROM (SELECT 1) one LEFT JOIN (pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid)"
    " ON l.pid <> pg_backend_pid() AND " + _HOLDER + " LIMIT 1"
)

# Preceded by the leader record comment when leading.
_CONFIRM_SQL = (
    "SELECT pg_backend_pid(), current_setting('" + _MARKER + "', true),"
    " EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = pg_backend_pid() AND " + _HOLDER + "),"
    " pg_is_in_recovery()"
)
# A term's first confirmation also announces "leading:<token>" (after the engine started the
# child): a predecessor that just released to us ends its session only then (_await_successor).
_ANNOUNCING_CONFIRM_SQL = _CONFIRM_SQL + ", pg_notify(%(channel)s, %(leading)s)"


def _release_sql(channel: str, token: int, hi: int, lo: int) -> str:
    """A graceful release in one round trip (see _release). After the unlock (the FROM item is
    evaluated first), it reports whether another session now holds the key or waits for it: a
    successor whose claim close() lets commit before ending our session. Literals, not
    parameters: only the simple query protocol takes several statements; every value is ours (a
    hex channel name and integers), and a plain string skips psycopg's composition on the
    handoff's critical path."""
    assert re.fullmatch(r"crown_sync_[0-9a-f]{16}", channel)
    assert all(isinstance(v, int) and not isinstance(v, bool) for v in (token, hi, lo))
    others = (_KEY_LOCK % {"hi": hi, "lo": lo}) + " AND l.pid <> pg_backend_pid()"
    return (f"BEGIN; SELECT pg_notify('{channel}', 'released:{token}'); COMMIT;"
            f" SELECT EXISTS (SELECT 1 FROM pg_locks l WHERE {others})"
            f" FROM (SELECT pg_advisory_unlock_all() OFFSET 0) unlocked")


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


# ---------------------------------------------------------------------------------- oracle


class PostgresOracle(OracleBase):
    """Session advisory locks on one PostgreSQL database (14 or newer).

    dsn: a libpq URL (``postgresql://`` or ``postgres://``) or ``key=value`` string. Every libpq
        parameter (``sslmode``, ``sslrootcert``, ``target_session_attrs``, several hosts, ...)
        passes through. The connection parameters ``connect_timeout``, ``keepalives*``,
        ``tcp_user_timeout`` and ``fallback_application_name`` are set from our options unless
        the DSN sets them.
    namespace: separates elections of different applications in one database (part of the key).
    lease: seconds the server keeps a silent session (and its lock) alive; a paused or
        partitioned leader is replaced after about this long. 1 to 3600.
    confirm_interval: seconds between a leader's confirmations; default ``lease / 5``. Must be at
        most ``(lease - margin) / 2``.
    margin: seconds taken off every deadline; default ``max(0.2, lease / 10)``; below lease / 2.
    connect_timeout: seconds to connect (libpq counts whole seconds, at least 2).
    wait_timeout: seconds one blocking lock wait of a follower lasts before it is re-armed.
    takeover_delay: None (the default): a successor that cannot prove how its predecessor's
        term ended (a graceful release, or a session that ended otherwise than by
        ``pg_terminate_backend``) holds the lock without leading until the predecessor's
        deadline has certainly passed, ``lease`` after its grant (see *Takeover*). A number
        OPTS OUT of that guarantee: the successor waits only that long (0: not at all, and
        without looking for proof), an assumption about how fast a told leader stops its child.
        0 to 60 and at most ``(lease - margin) / 2`` (the session is idle meanwhile).
    """

    def __init__(
        self,
        dsn: str,
        namespace: str = "crown_sync",
        lease: float = 10.0,
        confirm_interval: Optional[float] = None,
        margin: Optional[float] = None,
        connect_timeout: float = 5.0,
        wait_timeout: float = 5.0,
        takeover_delay: Optional[float] = None,
    ):
        super().__init__()
        if not isinstance(dsn, str):
            raise TypeError(f"dsn must be a str, got {type(dsn).__name__}")
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str, got {type(namespace).__name__}")
        if not namespace or len(namespace) > 128 or not namespace.isprintable():
            raise ValueError("namespace must be 1-128 printable characters")
        self.lease = seconds_between("lease", lease, 1.0, 3600.0)
        if margin is None:
            margin = max(0.2, self.lease / 10)
        self.margin = seconds_between("margin", margin, 0.001, 3600.0)
        if self.margin >= self.lease / 2:
            raise ValueError(f"margin ({self.margin:g}) must be less than lease / 2 ({self.lease / 2:g})")
        if confirm_interval is None:
            confirm_interval = self.lease / 5
        self.confirm_interval = seconds_between("confirm_interval", confirm_interval, 0.01, 3600.0)
        limit = (self.lease - self.margin) / 2
        if self.confirm_interval > limit + 1e-9:
            raise ValueError(
                f"confirm_interval ({self.confirm_interval:g}) must be at most (lease - margin) / 2"
                f" = {limit:g}, so that a failed confirmation can be retried before the term's"
                f" deadline (lease {self.lease:g}, margin {self.margin:g})"
            )
        self.connect_timeout = seconds_between("connect_timeout", connect_timeout, 0.1, 3600.0)
        self.wait_timeout = seconds_between("wait_timeout", wait_timeout, 0.05, 3600.0)
        self.takeover_delay: Optional[float] = None
        if takeover_delay is not None:
            self.takeover_delay = seconds_between("takeover_delay", takeover_delay, 0.0, 60.0)
            # The woken follower's session sends nothing while it waits an explicit delay, and
            # idle_session_timeout (= lease) would end it. Same rule as confirm_interval.
            if self.takeover_delay > limit + 1e-9:
                raise ValueError(
                    f"takeover_delay ({self.takeover_delay:g}) must be at most (lease - margin) / 2"
                    f" = {limit:g}: the woken follower's session is idle while it waits, and the"
                    f" server ends a session idle for lease seconds (lease {self.lease:g}, margin"
                    f" {self.margin:g}); leave it unset to wait out the predecessor's lease safely"
                )
        self.namespace = namespace
        try:
            params = _conninfo.conninfo_to_dict(dsn)
        except psycopg.Error as exc:
            raise ValueError(
                f"dsn is not a valid libpq connection string ({redact_text(str(exc)).strip()}); oracle"
                f" options ({', '.join(sorted(OPTIONS))}) go in keyword arguments or in"
                f" PostgresOracle.from_url()"
            ) from None
        self._dsn = dsn
        self._password = params.get("password") or None
        self._defaults = self._connection_defaults(params)
        self.description = redact(dsn) if "://" in dsn else redact_text(dsn)
        self._reader: Optional[psycopg.Connection] = None
        self._reader_lock = threading.Lock()
        self._forked = False
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> "PostgresOracle":
        """``postgresql://user:pw@host:port/db?lease=10&sslmode=require``: our options
        (:data:`OPTIONS`) are taken out of the query string; every other parameter is libpq's."""
        if not isinstance(url, str):
            raise TypeError(f"url must be a str, got {type(url).__name__}")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("postgresql", "postgres"):
            raise ValueError(f"not a postgresql:// or postgres:// URL: {redact(url)!r}")
        # Split the raw query without decoding libpq's part: libpq has its own URI decoding
        # (no '+' for space), so its parameters are passed on byte for byte.
        ours, theirs = [], []
        for piece in parts.query.split("&") if parts.query else []:
            key = urllib.parse.unquote(piece.partition("=")[0])
            (ours if key in OPTIONS else theirs).append(piece)
        options = parse_options("?" + "&".join(ours), OPTIONS)
        dsn = url
        if ours:
            dsn = urllib.parse.urlunsplit(
                (parts.scheme, parts.netloc, parts.path, "&".join(theirs), parts.fragment)
            )
        try:
            _conninfo.conninfo_to_dict(dsn)
        except psycopg.Error as exc:
            raise ValueError(
                f"invalid PostgreSQL URL {redact(url)!r}: {redact_text(str(exc)).strip()}; oracle options"
                f" are {', '.join(sorted(OPTIONS))}, other query parameters must be libpq's"
            ) from None
        oracle = cls(dsn, **options)
        oracle.description = redact(url)
        return oracle

    def _connection_defaults(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """libpq parameters we set unless the DSN does: the client-side half of the lease
        (so a follower blocked on a dead server notices) and the connect timeout."""
        keepalive_idle, keepalive_interval, keepalive_count = _keepalives(self.lease)
        defaults = {
            "connect_timeout": str(max(2, int(-(-self.connect_timeout // 1)))),
            "keepalives": "1",
            "keepalives_idle": str(keepalive_idle),
            "keepalives_interval": str(keepalive_interval),
            "keepalives_count": str(keepalive_count),
            "tcp_user_timeout": str(_lease_ms(self.lease)),
            "fallback_application_name": "crown_sync",
        }
        return {k: v for k, v in defaults.items() if k not in params}

    # -- connections ------------------------------------------------------------------------

    def safe_error(self, exc: BaseException) -> str:
        """``exc`` as text with any password masked."""
        text = redact_text(f"{type(exc).__name__}: {exc}".strip())
        if self._password:
            text = text.replace(self._password, "***")
        return text

    def connect(self, application_name: Optional[str] = None) -> psycopg.Connection:
        """A new autocommit connection (no prepared statements: records change per term)."""
        self._check_process()
        if self._forked:
            raise PostgresOracleError("this oracle was inherited across fork(); create a new one")
        kwargs = dict(self._defaults)
        if application_name and "fallback_application_name" in kwargs:
            kwargs["fallback_application_name"] = application_name[:63]
        try:
            with _forksafe.opening() as keep:  # a fork meanwhile must not copy a socket nobody knows
                conn = psycopg.connect(self._dsn, autocommit=True, prepare_threshold=None, **kwargs)
                keep(conn.pgconn.socket)
        except psycopg.Error as exc:
            raise ConnectionError(f"cannot connect to {self.description}: {self.safe_error(exc)}") from None
        return conn

    def _read(self, query: str, params: Dict[str, Any]):
        """Run a read on the shared reader connection (find_leader, dismiss); one retry on a
        broken connection."""
        self._check_process()
        if self._closed:
            raise PostgresOracleError("oracle is closed")
        with self._reader_lock:
            for attempt in (1, 2):
                conn = self._reader
                if conn is None or conn.closed:
                    conn = self._reader = self.connect("crown_sync reader")
                    row = conn.execute("SELECT pg_is_in_recovery(), current_setting('server_version_num')::int").fetchone()
                    if row[0]:
                        self._reader = None
                        conn.close()
                        raise StandbyRefused(f"{self.description} is a standby (in recovery)")
                try:
                    return conn.execute(query, params).fetchall()
                except psycopg.OperationalError as exc:
                    if conn.broken and attempt == 1:
                        self._reader = None
                        continue
                    raise PostgresOracleError(self.safe_error(exc)) from None
        raise AssertionError("unreachable")

    # -- Oracle API ------------------------------------------------------------------------

    def key(self, name: str) -> int:
        return advisory_key(self.namespace, name)

    def contender(self, name: str, identity: str, metadata: Dict[str, Any], on_change: OnChange) -> "PostgresContender":
        self._check_process()
        if self._forked:
            raise PostgresOracleError("this oracle was inherited across fork(); create a new one")
        return PostgresContender(self, name, identity, metadata, on_change)

    def _holder(self, name: str):
        hi, lo = _key_parts(self.key(name))
        rows = self._read(_HOLDER_SQL, {"hi": hi, "lo": lo})
        return rows[0] if rows else None

    def leader_from_row(self, name: str, pid: Optional[int], query: Optional[str]) -> Optional[Leader]:
        """The Leader that holds the lock, from its pid and last statement text."""
        if pid is None:
            return None
        record = _decode_record(query)
        if record and record.get("ns") == self.namespace and record.get("name") == name:
            return leader_of(record)
        return Leader(identity=f"(unknown: backend pid {pid})", metadata={}, token=None, since=None)

    def find_leader(self, name: str) -> Optional[Leader]:
        row = self._holder(name)
        return self.leader_from_row(name, row[0], row[1]) if row else None

    def dismiss(self, name: str) -> bool:
        """Ask the leader of ``name`` to step down (NOTIFY; see the module docstring)."""
        row = self._holder(name)
        if not row or row[0] is None:
            return False
        record = _decode_record(row[1]) or {}
        payload = f"dismiss:{row[0]}:{record.get('token', '')}"
        self._read("SELECT pg_notify(%(channel)s, %(payload)s)", {"channel": _channel(self.key(name)), "payload": payload})
        logger.info("dismissed the leader of %s (backend pid %s)", name, row[0])
        return True

    def close(self) -> None:
        self._check_process()
        self._closed = True
        with self._reader_lock:
            conn, self._reader = self._reader, None
        if conn is not None and not self._forked:
            try:
                conn.close()
            except Exception:
                pass

    def _forget_after_fork(self) -> None:
        self._forked = True
        _blind(self._reader)
        self._reader = None
        self._reader_lock = threading.Lock()


def _keepalives(lease: float) -> Tuple[int, int, int]:
    """(idle, interval, count) in whole seconds with idle + interval * count >= lease."""
    idle = max(1, int(lease // 3))
    interval = max(1, int(lease // 6))
    count = 1
    while idle + interval * count < lease:
        count += 1
    return idle, interval, count


# ------------------------------------------------------------------------------- contender


class PostgresContender(ContenderBase):
    """One crown's dedicated session. See the module docstring.

    Its phase (:class:`~crown_sync.oracles._base.Phase`): FOLLOWING, PENDING while it holds the
    lock but waits out a predecessor's lease (_wait_out), LEADING, CLOSED or FORKED."""

    oracle: "PostgresOracle"

    def __init__(self, oracle: PostgresOracle, name: str, identity: str, metadata: Dict[str, Any], on_change: OnChange):
        super().__init__(oracle, name, identity, metadata, on_change)
        self.key = oracle.key(name)
        self._hi, self._lo = _key_parts(self.key)
        self._channel = _channel(self.key)
        # Leads the text of every statement after which this session may lead (a leader's
        # confirmations, a follower's lock wait): _QUIET_SQL looks for it in pg_stat_activity.
        self._tag = f"/* {self._channel} */ "
        self._conn: Optional[psycopg.Connection] = None
        self._backend_pid: Optional[int] = None  # our session's (the base's _pid is our process's)
        self._marker: Optional[str] = None
        self._bound: float = oracle.lease  # server-side lease B, read back at connect
        self._query_limit = 1024
        self._counts_terminations = False  # track_counts: pg_stat_database counts terminations
        self._connected_at = -math.inf  # monotonic time our session was known to exist
        # Our child must not start before this monotonic instant: a predecessor's deadline we
        # waited out and may not have finished waiting (kept across reconnects; see _wait_out).
        self._owed_until = -math.inf
        # What the last failed claim on this session saw (its holder, the termination count):
        # the baseline of a later claim's proof (_claim_debt).
        self._baseline: Optional[_Baseline] = None
        self._io_lock = threading.Lock()  # held while a statement is in flight on _conn
        # leadership
        self._token: Optional[int] = None
        self._since: Optional[float] = None
        self._record_comment: Optional[str] = None
        self._announced = False  # this term's "leading:<token>" was sent
        self._dismissed = False
        self._session_lost = False  # the socket watcher heard a goodbye (FATAL, EOF)
        self._statements = 0  # bumped after every statement: the socket watcher's progress mark
        # follower's waiter thread
        self._waiter: Optional[threading.Thread] = None
        self._waiter_stop = False
        self._granted: Optional[Tuple[int, float]] = None  # (token, since) the waiter obtained
        self._waiter_error: Optional[BaseException] = None
        self._in_wait = False
        self._prepared: Optional[Claim] = None
        self._events: "collections.deque" = collections.deque(maxlen=64)  # (kind, token, pid)
        self._handoff: Optional[Tuple[int, float]] = None  # (released token, linger until): close()
        self._waiter_wakeup = threading.Event()
        self._leader: Optional[Leader] = None
        # leader's socket watcher thread
        self._watcher: Optional[threading.Thread] = None
        self._watch_generation = 0
        self._wake_r, self._wake_w = -1, -1
        self._retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(ConnectionError),
            wait=tenacity.wait_exponential(multiplier=0.05, max=0.5) + tenacity.wait_random(0, 0.05),
            stop=tenacity.stop_after_attempt(3) | tenacity.stop_after_delay(oracle.connect_timeout),
            reraise=True,
        )
        # One more attempt when the claim finds its session already ended (see _try_lock).
        self._claim_retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_SessionGone),
            stop=tenacity.stop_after_attempt(2),
            reraise=True,
        )

    # -- connection ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        try:
            super()._check_open()
        except RuntimeError as exc:  # closed or forked: this module's error, as it always was
            raise PostgresOracleError(str(exc)) from None

    def _move(self, phase: Phase) -> None:
        """Enter ``phase`` unless closed or forked meanwhile (close() may run in another thread
        while a claim or the waiter finishes: it wins)."""
        with self._lock:
            if self.usable:
                self._enter(phase)

    def _ensure_connected(self) -> psycopg.Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        self._drop_connection()
        conn = self._retrying(self._connect)
        with self._lock:
            if not self.usable:
                conn.close()
                self._check_open()
            self._conn = conn
        return conn

    def _connect(self) -> psycopg.Connection:
        oracle = self.oracle
        conn = oracle.connect(f"crown_sync {self.name}")
        try:
            if conn.info.server_version < _MIN_VERSION:
                raise PostgresOracleError(
                    f"{oracle.description}: PostgreSQL 14 or newer is needed (idle_session_timeout),"
                    f" server is {conn.info.server_version}"
                )
            marker = uuid.uuid4().hex
            idle, interval, count = _keepalives(oracle.lease)
            lease_ms = str(_lease_ms(oracle.lease))
            row = conn.execute(
                "SELECT pg_backend_pid(), pg_is_in_recovery(),"
                " set_config(%(m)s, %(marker)s, false),"
                " set_config('idle_session_timeout', %(lease)s, false),"
                " set_config('tcp_user_timeout', %(lease)s, false),"
                " set_config('tcp_keepalives_idle', %(idle)s, false),"
                " set_config('tcp_keepalives_interval', %(interval)s, false),"
                " set_config('tcp_keepalives_count', %(count)s, false),"
                " set_config('client_connection_check_interval', '1000', false),"
                " set_config('lock_timeout', %(wait)s, false),"
                " set_config('statement_timeout', '0', false),"
                " set_config('idle_in_transaction_session_timeout', '0', false),"
                " set_config('synchronous_commit', 'on', false),"
                " set_config('default_transaction_read_only', 'off', false),"
                " has_function_privilege('pg_control_checkpoint()', 'EXECUTE')",
                {
                    "m": _MARKER, "marker": marker, "lease": lease_ms, "idle": str(idle),
                    "interval": str(interval), "count": str(count),
                    "wait": str(max(1, int(oracle.wait_timeout * 1000))),
                },
            ).fetchone()
            pid = row[0]
            self._check_new_session(conn, pid, in_recovery=row[1], may_read_control=row[-1])
            # Three statements in a row must reach the same session: a transaction pooler
            # usually gives itself away here already (every later statement checks again).
            self._same_session(conn, pid, marker)
            conn.execute("LISTEN " + self._channel)
            rows = conn.execute(
                "SELECT pg_backend_pid(), current_setting(%(m)s, true), name, setting"
                " FROM pg_settings WHERE name = ANY(%(names)s)",
                {"m": _MARKER, "names": list(_SETTINGS)},
            ).fetchall()
            if not rows or rows[0][0] != pid or rows[0][1] != marker:
                raise self._pooling(pid, rows[0][0] if rows else None)
            settings = {name: setting for _, _, name, setting in rows}
            self._bound = self._server_bound(settings, conn)
            self._query_limit = int(settings.get("track_activity_query_size", "1024"))
            # PostgreSQL 14's statistics collector counts a disconnect asynchronously (a UDP
            # message, read back from a file up to 500 ms old, or lost), so a backend gone from
            # pg_stat_activity may not be counted yet: no termination proof there (a lease).
            self._counts_terminations = (settings.get("track_counts") == "on"
                                         and conn.info.server_version >= 150000)
            if settings.get("track_activities") != "on":
                logger.warning("%s: track_activities is off: find_leader can't read leader records", oracle.description)
            conn.add_notify_handler(self._on_notify)
        except psycopg.Error as exc:
            conn.close()
            raise ConnectionError(f"setting up a session on {oracle.description}: {oracle.safe_error(exc)}") from None
        except BaseException:
            conn.close()
            raise
        self._backend_pid, self._marker = pid, marker
        self._connected_at = clock.monotonic()
        with self._lock:
            self._events.clear()  # what happened while we were not listening is unknown
            self._baseline = None
        logger.debug("%s: connected, backend pid %s, server lease bound %.3fs", self.name, pid, self._bound)
        return conn

    def _check_new_session(self, conn: psycopg.Connection, pid: int, in_recovery: bool,
                           may_read_control: bool) -> None:
        """Refuse a session we cannot lead on: a standby's, one behind a pooler, or one whose
        role cannot read the server's age after a promotion."""
        oracle = self.oracle
        if in_recovery:
            raise StandbyRefused(
                f"{oracle.description} is a standby (in recovery): it grants advisory locks"
                f" that the primary doesn't know about; connect to the primary"
                f" (e.g. target_session_attrs=read-write)"
            )
        if not may_read_control:  # a claim reads the server's age with it (_INCARNATION_AGE)
            raise PostgresOracleError(
                f"{oracle.description}: this role may not execute pg_control_checkpoint()"
                f" (allowed to every role by default), which tells when a promoted server"
                f" took over; GRANT EXECUTE ON FUNCTION pg_control_checkpoint() TO it"
            )
        # The pid in the startup BackendKeyData is the server's own unless something that
        # speaks the protocol itself (a pooler or proxy) sent its own. Such a middleman can
        # hand this very session to another client while we are quiet (PgBouncer reuses the
        # most recently freed one), so the per-statement marker check would never see a change.
        if conn.info.backend_pid != pid:
            raise PoolingDetected(
                f"{oracle.description}: the server session is backend pid {pid}, but the"
                f" connection's startup message named pid {conn.info.backend_pid}: a pooler or"
                f" proxy (e.g. PgBouncer, in any pool mode) sits between us and the server and"
                f" may share this session with other clients; advisory-lock leadership needs a"
                f" direct connection to PostgreSQL"
            )

    def _pooling(self, expected: Optional[int], got: Optional[int]) -> PoolingDetected:
        return PoolingDetected(
            f"{self.oracle.description}: consecutive statements of one connection reached"
            f" different server sessions (backend pid {expected} then {got}): a transaction or"
            f" statement pooler (PgBouncer) is in the way; advisory-lock leadership needs a direct"
            f" connection to PostgreSQL"
        )

    def _same_session(self, conn: psycopg.Connection, pid: int, marker: str) -> None:
        got, got_marker = conn.execute(
            "SELECT pg_backend_pid(), current_setting(%(m)s, true)", {"m": _MARKER}
        ).fetchone()
        if got != pid or got_marker != marker:
            raise self._pooling(pid, got)

    def _server_bound(self, settings: Dict[str, str], conn: psycopg.Connection) -> float:
        """The smallest time, from a statement's start, after which the server may drop the
        session on its own (the module docstring's B)."""
        oracle = self.oracle
        bounds = []
        idle_ms = int(settings.get("idle_session_timeout", "0"))
        if idle_ms > 0:
            bounds.append(idle_ms / 1000)
        user_ms = int(settings.get("tcp_user_timeout", "0"))
        if user_ms > 0:
            bounds.append(user_ms / 1000)
        ka = [int(settings.get(n, "0")) for n in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")]
        if all(v > 0 for v in ka):  # zero: not a TCP connection (or no keepalive support)
            bounds.append(ka[0] + ka[1] * ka[2])
        bound = min(bounds) if bounds else oracle.lease
        if idle_ms <= 0 or bound + 1e-6 < oracle.lease:
            raise PostgresOracleError(
                f"{oracle.description}: the server would drop a silent session after {bound:g}s,"
                f" sooner than lease={oracle.lease:g}s (idle_session_timeout {idle_ms} ms,"
                f" tcp_user_timeout {user_ms} ms, keepalives {ka}); a proxy may be in the way"
            )
        return bound

    def _drop_connection(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            self._backend_pid = self._marker = None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def _execute(self, query: str, params: Dict[str, Any], conn: Optional[psycopg.Connection] = None):
        """One statement on our session, under the I/O lock; returns the first row."""
        if conn is None:
            conn = self._ensure_connected()
        with self._io_lock:
            try:
                return conn.execute(query, params).fetchone()
            finally:
                self._statements += 1

    def _check_session(self, pid: int, marker: Optional[str], in_recovery: bool) -> None:
        if pid != self._backend_pid or marker != self._marker:
            raise self._pooling(self._backend_pid, pid)
        if in_recovery:
            raise StandbyRefused(f"{self.oracle.description} is now a standby (in recovery)")

    def _fail(self, exc: BaseException) -> None:
        """After a failed claim: end the session. The statement may have failed after the lock
        was granted (session locks survive errors), and a refusal (standby, pooler) means the
        session is not one to keep; closing it releases whatever it holds."""
        self._drop_connection()

    def _error(self, exc: BaseException) -> Exception:
        if isinstance(exc, _SessionGone):  # internal type: users see a plain ConnectionError
            return ConnectionError(str(exc))
        if isinstance(exc, (PostgresOracleError, ConnectionError)):
            return exc
        return PostgresOracleError(self.oracle.safe_error(exc))

    # -- claim / refresh -------------------------------------------------------------------------

    def _record(self) -> Dict[str, Any]:
        return dict(record_of(self.identity, self.metadata, self._token, self._since),
                    v=1, ns=self.oracle.namespace, name=self.name)

    def _make_record_comment(self) -> str:
        """Our leader record, as the SQL comment that leads each of the term's confirm statements
        (the first of which announces the term)."""
        self._announced = False
        record = self._record()
        comment = self._tag + _encode_record(record)
        if len(comment.encode()) >= self._query_limit:
            record["metadata"] = {}
            record["metadata_dropped"] = True
            comment = self._tag + _encode_record(record)
            logger.warning(
                "%s: leader metadata does not fit track_activity_query_size (%d bytes); published without it",
                self.name, self._query_limit,
            )
        return comment

    def claim(self) -> Claim:
        self._check_open()
        waiter = self._waiter
        if waiter is not None:
            with self._lock:
                granted, error = self._granted, self._waiter_error
            if granted is None and error is None and waiter.is_alive():
                # Queued on the lock: the server would have woken us if it were free.
                return Claim(won=False, leader=self._leader)
            with self._lock:
                prepared = self._prepared
                # The waiter may have stayed on as the term's socket watcher (see _take_over).
                adopted = granted is not None and waiter is self._watcher
                if adopted:
                    self._forget_waiter()
            if adopted:
                self._token, self._since = granted
                if self._session_lost:  # its watcher heard a goodbye before the engine asked
                    self._release(quietly=True)
                    self._token = self._since = None
                    return Claim(won=False, leader=None)
                return self._lead(prepared, watching=True)
            if granted is not None:
                waiter.join(5.0)  # it is ending
            self._stop_waiter()
            if granted is not None:
                self._token, self._since = granted
                if prepared is not None and prepared.won:
                    return self._lead(prepared)
                return self._won()
        try:
            row = self._claim_retrying(self._try_lock)
            locked, token, _, since, pid, marker, in_recovery, holder_pid, holder_query, age, killed = row
            self._check_session(pid, marker, in_recovery)
            if not locked:
                self._baseline = _Baseline(holder_pid, killed, _decode_record(holder_query) is not None)
                self._leader = self.oracle.leader_from_row(self.name, holder_pid, holder_query)
                return Claim(won=False, leader=self._leader)
            until = self._claim_debt(self._conn, int(token), clock.monotonic(), age)
        except Exception as exc:
            self._fail(exc)
            raise self._error(exc) from None
        if until > clock.monotonic():
            return self._owe(int(token), since, until)
        self._token, self._since = int(token), since
        return self._won()

    def _try_lock(self):
        """The claiming statement. A session the server ended while we were quiet (a follower
        with monitor_leader=False idles for monitor_delay, which may exceed the lease, and the
        server's idle_session_timeout ends it) only shows when we use it: then reconnect and try
        again (once, through _claim_retrying) instead of failing the claim. Safe: if the old
        session were somehow alive and holding the lock, the new one would simply lose."""
        conn = self._ensure_connected()
        try:
            return self._execute(
                _TRY_SQL,
                {"key": self.key, "hi": self._hi, "lo": self._lo, "msg": self.name,
                 "channel": self._channel, "young": self._young()},
                conn,
            )
        except psycopg.OperationalError as exc:
            if conn.broken or conn.closed:
                logger.debug("%s: session gone before the claim (%s); reconnecting", self.name,
                             self.oracle.safe_error(exc))
                self._drop_connection()
                raise _SessionGone(f"connection to {self.oracle.description} lost:"
                                   f" {self.oracle.safe_error(exc)}") from None
            raise

    def _won(self) -> Claim:
        self._record_comment = self._make_record_comment()
        self._dismissed = False
        try:
            claim = self._confirm()
        except Exception:
            self._release(quietly=True)
            raise
        if not claim.won:
            self._release(quietly=True)
            return claim
        return self._lead(claim)

    def _lead(self, claim: Claim, watching: bool = False) -> Claim:
        self._move(Phase.LEADING)
        if not watching:
            self._start_watcher()
        logger.info("%s: %s leads with token %s", self.name, self.identity, self._token)
        return claim

    def _confirm(self) -> Claim:
        """Run the confirm statement (which carries our leader record)."""
        conn = self._conn
        if conn is None or conn.closed:  # a new session could never hold the old one's lock
            self._drop_connection()
            return Claim(won=False, leader=None)
        started = clock.monotonic()
        announce, self._announced = not self._announced, True  # once, even if it fails
        params = {"hi": self._hi, "lo": self._lo}
        if announce:
            params.update(channel=self._channel, leading=f"leading:{self._token}")
        try:
            row = self._execute(
                self._record_comment + (_ANNOUNCING_CONFIRM_SQL if announce else _CONFIRM_SQL), params, conn
            )
            pid, marker, held, in_recovery = row[:4]
            self._check_session(pid, marker, in_recovery)
        except psycopg.OperationalError as exc:
            conn = self._conn
            if conn is None or conn.closed:  # the session is gone, and our lock with it
                logger.warning("%s: connection lost while leading: %s", self.name, self.oracle.safe_error(exc))
                self._drop_connection()
                return Claim(won=False, leader=None)
            raise self._error(exc) from None
        except PostgresOracleError as exc:
            # A pooler or a standby under us: whatever the lock's state, it is not ours to trust.
            logger.error("%s: %s", self.name, exc)
            self._drop_connection()
            return Claim(won=False, leader=None)
        except psycopg.Error as exc:
            raise self._error(exc) from None
        if not held:
            logger.warning("%s: our session no longer holds the advisory lock", self.name)
            self._token = None  # nothing of ours to announce as released
            return Claim(won=False, leader=None)
        if self._dismissed:
            logger.info("%s: dismissed; stepping down", self.name)
            return Claim(won=False, leader=None)
        leader = self._me(self._token, self._since)
        self._leader = leader
        return Claim(
            won=True,
            leader=leader,
            token=self._token,
            deadline=started + self._bound - self.oracle.margin,
            refresh_in=self.oracle.confirm_interval,
        )

    def refresh(self) -> Claim:
        self._check_open()
        if self.phase is not Phase.LEADING or self._record_comment is None:
            return Claim(won=False, leader=None)
        claim = self._confirm()
        if not claim.won:
            self._move(Phase.FOLLOWING)
            self._stop_watcher()
        return claim

    def _on_notify(self, notify) -> None:
        """Every notification on our channel, in commit order (psycopg calls this while it reads
        our connection; _handed_over reads them itself)."""
        if notify.channel != self._channel:
            return
        kind, _, rest = notify.payload.partition(":")
        if kind == "dismiss":
            pid, _, token = rest.partition(":")
            if self.phase is Phase.LEADING and pid == str(self._backend_pid) and (not token or token == str(self._token)):
                self._dismissed = True
            return
        if kind in ("claimed", "released", "leading") and rest.isdigit():
            with self._lock:
                self._events.append((kind, int(rest), notify.pid))

    def _read_notifications(self, pgconn) -> None:
        """Read what the server sent; our channel's notifications go to _on_notify. Raises if the
        connection is broken. Callers hold _io_lock (or own the connection)."""
        pgconn.consume_input()
        while True:
            raw = pgconn.notifies()
            if raw is None:
                return
            self._on_notify(psycopg.Notify(raw.relname.decode(), raw.extra.decode(), raw.be_pid))

    def _read_events_until(self, conn: psycopg.Connection, until: float,
                           match: Callable[[List[Tuple[str, int, int]]], Any],
                           stopped: Callable[[], bool] = lambda: False) -> Any:
        """Read the channel's notifications (commit order) until ``match(events)`` answers
        something other than None, and return that; None once ``until`` passes, ``stopped()``
        says so or the connection fails. What has arrived is read first: notifications usually
        come right behind a statement's result, and must be seen before waiting for more."""
        pgconn = conn.pgconn
        while True:
            try:
                with self._io_lock:
                    self._read_notifications(pgconn)
            except Exception:
                return None
            with self._lock:
                events = list(self._events)
            found = match(events)
            if found is not None:
                return found
            remaining = until - clock.monotonic()
            if remaining <= 0 or stopped():
                return None
            try:
                _readable(pgconn.socket, min(remaining, 0.01))
            except (OSError, ValueError, psycopg.Error):
                return None

    def _handed_over(self, conn: psycopg.Connection, token: int, until: float,
                     baseline: "_Baseline") -> Tuple[bool, Optional[int], bool]:
        """How did the term before our claim ``token`` end? (released, predecessor, led): did it
        end with a release; who held the lock (a backend pid, None if unknown); did that session
        lead (announce ``leading:``) rather than hold the lock while waiting out its own
        predecessor. Reads the channel's notifications until our own "claimed" arrives, or
        ``until``. The predecessor is the last claim seen before ours, or, if we saw none, the
        baseline's holder: the session that held the lock when our wait began."""

        def decide(events):
            for index, (kind, event_token, pid) in enumerate(events):
                if kind == "claimed" and event_token == token and pid == self._backend_pid:
                    before = events[:index]
                    claims = [i for i, e in enumerate(before) if e[0] == "claimed"]
                    if not claims:  # earlier terms had ended when we started listening
                        released = any(e[0] == "released" for e in before)
                        return released, baseline.holder, baseline.led
                    _, last, predecessor = before[claims[-1]]
                    after = before[claims[-1] + 1:]
                    released = any(e[0] == "released" and e[1] == last for e in after)
                    led = any(e == ("leading", last, predecessor) for e in after)
                    return released, predecessor, led
            return None

        return self._read_events_until(conn, until, decide, lambda: self._waiter_stop) or (False, None, False)

    def _not_terminated(self, conn: psycopg.Connection, predecessor: Optional[int],
                        killed_before: Optional[int], until: float) -> bool:
        """True if the predecessor's session certainly did not end by ``pg_terminate_backend``.

        A backend that exits releases its locks first, then counts its disconnect in
        ``pg_stat_database`` (``sessions_killed`` for a termination; a crashed client counts as
        abandoned), and only then leaves ``pg_stat_activity``. So once the predecessor's pid has
        left pg_stat_activity, an unchanged ``sessions_killed`` (read before our wait and now)
        proves it was not terminated. Any termination in the database meanwhile, a statistics
        reset, ``track_counts = off`` or an unknown predecessor answer False (wait)."""
        if predecessor is None or killed_before is None or not self._counts_terminations:
            return False
        params = {"pid": predecessor}
        pause = 0.0002
        while not self._waiter_stop:
            try:
                present, killed = self._execute(_PREDECESSOR_SQL, params, conn)
            except Exception:
                return False
            if not present:
                return killed == killed_before
            remaining = until - clock.monotonic()
            if remaining <= 0 or self._waiter_wakeup.wait(min(remaining, pause)):
                return False
            pause = min(pause * 2, 0.01)  # the exit takes a millisecond or two, unless loaded
        return False

    # -- abdicate / close -------------------------------------------------------------------------

    def _release(self, quietly: bool = False) -> None:
        """Unlock, announcing it first ("released:<token>"), so the follower woken by it knows
        we let go (our child already stopped) rather than died. If a session waits for the lock,
        note it: close() then lets that successor lead before ending our session."""
        self._handoff = None
        was_leading = self._record_comment is not None and self._token is not None
        self._move(Phase.FOLLOWING)
        self._record_comment = None
        self._watch_generation += 1  # the socket watcher goes inert now; joined after the unlock
        conn = self._conn
        if conn is None or conn.closed:
            self._drop_connection()
            self._stop_watcher()
            return
        try:
            with self._io_lock:
                try:
                    if was_leading:
                        # One round trip: the NOTIFY commits before the unlock, so it precedes
                        # the next claim's.
                        cursor = conn.execute(_release_sql(self._channel, self._token, self._hi, self._lo))
                        while cursor.nextset():  # BEGIN, NOTIFY, COMMIT: the unlock's row is last
                            pass
                        (successor,) = cursor.fetchone()
                        if successor:
                            self._handoff = (self._token, clock.monotonic() + _HANDOFF_LINGER)
                    else:
                        conn.execute("SELECT pg_advisory_unlock_all()")
                finally:
                    self._statements += 1
        except Exception as exc:
            # Can't say "unlock": end the session instead, which releases the lock. A session
            # the server already ended (the usual case after a lost term) is not news.
            if not quietly and not conn.broken:
                logger.warning("%s: unlock failed (%s); closing the session", self.name, self.oracle.safe_error(exc))
            _shutdown(conn)
            self._drop_connection()
        finally:
            self._stop_watcher()

    def abdicate(self) -> None:
        if not self.usable:
            return
        self._stop_waiter()
        self._release()
        self._token = self._since = None

    def close(self) -> None:
        with self._lock:
            if not self.usable:  # closed already, or a copy inherited across fork: never act
                return
            self._enter(Phase.CLOSED)
        self._stop_watcher()
        self._stop_waiter(timeout=2.0)
        self._await_successor()
        conn = self._conn
        if conn is not None:
            # Polite close if no statement is in flight, else cut the socket (bounded).
            if not self._io_lock.acquire(timeout=1.0):
                _shutdown(conn)
            else:
                self._io_lock.release()
        self._drop_connection()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = -1

    def _await_successor(self) -> None:
        """Right after a graceful release to a queued successor, wait (at most
        ``_HANDOFF_LINGER``) until it leads, seen as its ``leading:<token>`` notification (sent
        by its first confirmation, after its child started), before our session ends. Ending a
        session makes its backend process exit, which costs the server milliseconds of CPU, and
        our own process usually exits next; at once, both would compete with the successor's
        claim and its child's start (on the database server, and on a shared host) on the
        handoff's critical path. Nothing waits on this but our own close()."""
        handoff, self._handoff = self._handoff, None
        conn = self._conn
        if handoff is None or conn is None or conn.closed:
            return
        released_token, until = handoff
        self._read_events_until(conn, until, lambda events: any(
            kind == "leading" and token > released_token and pid != self._backend_pid
            for kind, token, pid in events) or None)

    def _forget_after_fork(self) -> None:
        _blind(self._conn)
        self._conn = None
        self._waiter = self._watcher = None
        self._io_lock = threading.Lock()

    # -- follower: the waiter ---------------------------------------------------------------------

    def watch(self, leader: Optional[Leader]) -> bool:
        self._check_open()
        waiter = self._waiter
        if waiter is not None and waiter.is_alive():
            with self._lock:
                return self._granted is None and self._waiter_error is None
        if waiter is not None:
            self._stop_waiter()
        self._ensure_connected()
        with self._lock:
            self._waiter_stop = False
            self._waiter_wakeup.clear()
            self._forget_waiter()
            self._waiter = threading.Thread(
                target=self._wait_loop, name=f"crown-sync-pg-wait:{self.name}", daemon=True
            )
            self._waiter.start()
        return True

    def _wait_loop(self) -> None:
        """Blocking lock waits (each bounded by lock_timeout), until granted, stopped or broken."""
        holder_params = {"hi": self._hi, "lo": self._lo}
        params = {"key": self.key, "msg": self.name, "channel": self._channel, **holder_params}
        while not self._waiter_stop:
            conn = self._conn
            try:
                if conn is None or conn.closed:
                    raise ConnectionError("connection closed")
                with self._io_lock:
                    if self._waiter_stop:
                        return
                    self._in_wait = True
                    started = clock.monotonic()
                    try:
                        row = conn.execute(self._tag + _WAIT_SQL, dict(params, young=self._young())).fetchone()
                    finally:
                        self._in_wait = False
                        self._statements += 1
                token, _, since, pid, marker, in_recovery, holder, killed, query, age = row
                self._check_session(pid, marker, in_recovery)
            except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
                if self._waiter_stop:
                    return
                self._refresh_leader(conn, holder_params)
                continue
            except Exception as exc:
                if self._waiter_stop:
                    return
                with self._lock:
                    self._waiter_error = exc
                logger.debug("%s: lock wait failed: %s", self.name, self.oracle.safe_error(exc))
                self._notify()
                return
            baseline = _Baseline(holder, killed, _decode_record(query) is not None)
            self._take_over(conn, int(token), since, started, baseline, age)
            return

    def _take_over(self, conn: psycopg.Connection, token: int, since: float, started: float,
                   baseline: "_Baseline", age: Optional[float]) -> None:
        """The server granted us the lock (in the waiter thread). Lead at once if the predecessor
        released it or certainly did not lose it to ``pg_terminate_backend`` (and the server is
        not younger than a lease); otherwise hold the lock without leading until the
        predecessor's deadline has passed (_debt, _wait_out). Then tell the engine, with the
        term ready for claim() to return at once."""
        until = self._debt(conn, token, baseline, clock.monotonic(), age)
        waited = until > clock.monotonic()
        if waited and not self._wait_out(conn, until):
            return
        self._begin_term(conn, token, since, started, waited)

    def _young(self) -> bool:
        """Is our session younger than a lease? If not, the server's incarnation is not either,
        and no leader of a previous one can still be running its child (_INCARNATION_AGE)."""
        return clock.monotonic() - self._connected_at < self._bound

    def _restart_debt(self, age: Optional[float]) -> float:
        """Seconds our child must wait because the server's incarnation began ``age`` seconds
        ago (None: our session is older than a lease, so the incarnation is too). A leader of
        the previous incarnation confirmed at ``t0`` before it ended; its deadline is at most
        ``B - margin`` after ``t0``, so before the incarnation's start plus ``B``, which is ``B
        - age`` after the statement that read ``age`` (and after its result reached us). The
        margin is not subtracted: it absorbs the two hosts' clock rates."""
        return 0.0 if age is None else max(0.0, self._bound - age)

    def _debt(self, conn: psycopg.Connection, token: int, baseline: "_Baseline",
              granted_at: float, age: Optional[float]) -> float:
        """The monotonic instant before which the child of our term ``token`` (granted at
        ``granted_at``) must not start.

        Without proof of how the predecessor's term ended, its child may run until its
        deadline, which is at most ``B - margin`` after the start of its last confirming
        statement. That statement reached the server before the session was terminated, and the
        termination freed the lock before it was granted to us, before ``granted_at``. So the
        predecessor's deadline has passed ``B`` after ``granted_at`` (the margin absorbs the two
        hosts' clock rates; every contender of an election must have the same lease)."""
        until = max(self._owed_until, granted_at + self._restart_debt(age))
        delay = self.oracle.takeover_delay
        if delay == 0:  # opted out: lead at once
            return until
        look = granted_at + (_PROOF_WAIT if delay is None else delay)
        if self._proven(conn, token, baseline, look):
            return until
        wait = self._bound if delay is None else delay
        logger.debug("%s: the predecessor's session may have been terminated under it (or it never"
                     " led): waiting %.3fs", self.name, wait)
        return max(until, granted_at + wait)

    def _proven(self, conn: psycopg.Connection, token: int, baseline: "_Baseline",
                look: float) -> bool:
        """Is there proof, found before the monotonic instant ``look``, that the term before
        ours (``token``) can no longer run its child: a release, or the end of a session that
        led, otherwise than by a termination (``baseline``: what we saw before our claim)?"""
        released, predecessor, led = self._handed_over(conn, token, look, baseline)
        if released:
            logger.debug("%s: the predecessor released the lock: leading at once", self.name)
            return True
        # A session that held the lock without leading was waiting out a debt of its own: its
        # end, however it came, proves nothing about its predecessor's child.
        if led and self._not_terminated(conn, predecessor, baseline.killed, look):
            logger.debug("%s: the predecessor's session (backend pid %s) ended, not by"
                         " pg_terminate_backend: leading at once", self.name, predecessor)
            return True
        return False

    def _claim_debt(self, conn: psycopg.Connection, token: int, granted_at: float,
                    age: Optional[float]) -> float:
        """As _debt, for a term won with pg_try_advisory_lock (granted at ``granted_at``): no
        wait of ours was queued when the lock was freed. With a baseline from a failed claim on
        this session (its holder and termination count), the follower's proof applies. Without
        one, or without proof, the predecessor is unknown: _QUIET_SQL tells how long ago a
        termination we cannot see may have ended a term of this election (see *Takeover*), and
        the child waits until ``B`` after that, as after a restart."""
        until = max(self._owed_until, granted_at + self._restart_debt(age))
        delay = self.oracle.takeover_delay
        if delay == 0:  # opted out: lead at once
            return until
        with self._lock:
            baseline, self._baseline = self._baseline, None
            if self.phase is Phase.CLOSED:
                return until  # close() frees the lock anyway
            self._waiter_stop = False  # there is no waiter now; the proof helpers watch this
            self._waiter_wakeup.clear()
        look = granted_at + (_PROOF_WAIT if delay is None else delay)
        if baseline is not None and self._proven(conn, token, baseline, look):
            return until
        quiet = 0.0  # track_counts off: sessions_killed stays 0 and proves nothing
        if self._counts_terminations:
            (quiet,) = self._execute(_QUIET_SQL, {"tag": self._tag.strip()}, conn)
        wait = self._restart_debt(quiet)
        if delay is not None:
            wait = min(wait, delay)
        if wait > 0:
            logger.debug("%s: won the lock without a queued wait; a termination %.3fs ago may have"
                         " ended the previous term: waiting %.3fs", self.name, quiet, wait)
        return max(until, clock.monotonic() + wait)

    def _wait_out(self, conn: psycopg.Connection, until: float) -> bool:
        """Hold the lock without leading until the monotonic instant ``until``, confirming the
        session every ``confirm_interval`` so that ``idle_session_timeout`` does not end it.
        False if stopped or the session failed (the waiter reports the error and the engine
        claims again; the debt stays in _owed_until, for a claim on a new session)."""
        self._owed_until = max(self._owed_until, until)
        with self._lock:
            if self.phase is Phase.FOLLOWING:
                self._enter(Phase.PENDING)
        if self._hold_until(conn, until):
            return True
        with self._lock:
            if self.phase is Phase.PENDING:
                self._enter(Phase.FOLLOWING)
        return False

    def _hold_until(self, conn: psycopg.Connection, until: float) -> bool:
        """_wait_out's loop: confirm the session every ``confirm_interval`` until ``until``."""
        params = {"hi": self._hi, "lo": self._lo}
        while True:
            remaining = until - clock.monotonic()
            if remaining <= 0:
                return True
            if self._waiter_wakeup.wait(min(remaining, self.oracle.confirm_interval)) or self._waiter_stop:
                return False  # stopped (close): closing the connection releases the lock
            try:
                pid, marker, held, in_recovery = self._execute(_CONFIRM_SQL, params, conn)
                self._check_session(pid, marker, in_recovery)
                if not held:
                    raise PostgresOracleError("our session no longer holds the advisory lock")
            except Exception as exc:
                logger.debug("%s: waiting out the predecessor's lease failed: %s", self.name,
                             self.oracle.safe_error(exc))
                with self._lock:
                    self._waiter_error = exc
                self._notify()
                return False

    def _owe(self, token: int, since: float, until: float) -> Claim:
        """A claim won on a server younger than a lease, or on a new session of a contender
        that was waiting out a predecessor's lease: hold the lock in a waiter thread without
        leading until ``until`` (as a woken follower does), then tell the engine."""
        conn = self._conn
        logger.info("%s: won the lock with token %s; the previous term may run %.3fs more: waiting",
                    self.name, token, until - clock.monotonic())

        def owe() -> None:
            if self._wait_out(conn, until):
                self._begin_term(conn, token, since, until, waited=True)

        with self._lock:
            self._waiter_stop = False
            self._waiter_wakeup.clear()
            self._forget_waiter()
            self._waiter = threading.Thread(target=owe, name=f"crown-sync-pg-owe:{self.name}", daemon=True)
            self._waiter.start()
        return Claim(won=False, leader=None)

    def _begin_term(self, conn: psycopg.Connection, token: int, since: float, started: float,
                    waited: bool) -> None:
        """Make the term the waiter obtained ready for claim(). The wait statement itself proves
        the session: it returned, so the lock was granted after it ``started``, and every way
        the server can end the session counts from a moment after that (see the safety
        arithmetic). So the term's deadline counts from ``started``, and the leader record is
        published by the first refresh, which the claim asks for at once (the engine starts the
        child first). After a wait, or when little of that lease is left, it confirms here
        instead, for a fresh deadline."""
        self._token, self._since = token, since
        self._record_comment = self._make_record_comment()
        self._dismissed = False
        self._session_lost = False
        deadline = started + self._bound - self.oracle.margin
        prepared: Optional[Claim] = None
        # The wait's result proves the session against the server's timeouts, not against a
        # termination since (the admin who killed our predecessor may be killing us too): lead
        # on it only at once, with nothing unread from the server; else confirm first.
        if (not waited and deadline - clock.monotonic() >= self.oracle.confirm_interval
                and not self._unread(conn)):
            leader = self._me(token, since)
            self._leader = leader
            prepared = Claim(won=True, leader=leader, token=token, deadline=deadline, refresh_in=0.0)
        else:
            try:
                prepared = self._confirm()
            except Exception as exc:
                logger.debug("%s: confirming the new term failed: %s", self.name, self.oracle.safe_error(exc))
        generation = None
        with self._lock:
            self._granted = (token, since)
            self._prepared = prepared
            if prepared is not None and prepared.won and not self._waiter_stop and self.usable:
                # This thread stays on as the term's socket watcher: starting a thread (which
                # waits for it to run) would sit on the handoff's critical path.
                self._enter(Phase.LEADING)
                generation = self._begin_watch()
                self._watcher = threading.current_thread()
        self._notify()
        if generation is not None:
            self._watch_socket(conn, generation)

    def _refresh_leader(self, conn: psycopg.Connection, params: Dict[str, Any]) -> None:
        """Between waits: read who holds the lock; tell the engine if it changed."""
        try:
            with self._io_lock:
                if self._waiter_stop:
                    return
                try:
                    pid, query, mypid, marker, in_recovery = conn.execute(_HOLDER_SQL, params).fetchone()
                finally:
                    self._statements += 1
            self._check_session(mypid, marker, in_recovery)
        except Exception:
            return  # the next wait will fail the same way and report it
        leader = self.oracle.leader_from_row(self.name, pid, query)
        old = self._leader
        if leader is not None and (old is None or (old.identity, old.token) != (leader.identity, leader.token)):
            self._leader = leader
            self._notify()

    def _stop_waiter(self, timeout: float = 5.0) -> None:
        """Stop the waiter thread, cancelling its blocking lock wait (bounded in time).

        A cancel request is sent only while the waiter is inside its wait statement: one that
        arrived late could otherwise cancel our next statement instead.
        """
        waiter = self._waiter
        if waiter is None:
            return
        self._waiter_stop = True
        self._waiter_wakeup.set()
        if waiter.is_alive() and waiter is not threading.current_thread():
            conn = self._conn
            give_up = clock.monotonic() + timeout
            while waiter.is_alive() and clock.monotonic() < give_up:
                if self._in_wait and conn is not None and not conn.closed:
                    canceller = threading.Thread(target=self._cancel, args=(conn,), daemon=True)
                    canceller.start()
                    canceller.join(max(0.0, min(2.0, give_up - clock.monotonic())))
                waiter.join(max(0.0, min(0.2, give_up - clock.monotonic())))
            if waiter.is_alive():  # the server doesn't answer: cut the session under it
                _shutdown(conn)
                waiter.join(1.0)
        with self._lock:
            self._forget_waiter()

    @staticmethod
    def _unread(conn: psycopg.Connection) -> bool:
        """Has the server sent something not read yet (a goodbye, a notification)?"""
        try:
            return _readable(conn.pgconn.socket, 0)
        except (OSError, ValueError, psycopg.Error):
            return True

    def _forget_waiter(self) -> None:
        """Drop the waiter and what it obtained (the caller holds _lock)."""
        self._waiter = None
        self._granted = None
        self._prepared = None
        self._waiter_error = None

    def _cancel(self, conn: psycopg.Connection) -> None:
        try:
            if hasattr(conn, "cancel_safe"):  # psycopg >= 3.2
                conn.cancel_safe(timeout=2.0)
            else:
                conn.cancel()
        except Exception as exc:
            logger.debug("%s: cancel failed: %s", self.name, self.oracle.safe_error(exc))

    # -- leader: the socket watcher ---------------------------------------------------------------

    def _begin_watch(self) -> int:
        """A new watch generation (the previous watcher goes inert); the caller sets _watcher."""
        if self._wake_r < 0:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
        self._watch_generation += 1
        return self._watch_generation

    def _start_watcher(self) -> None:
        conn = self._conn
        if conn is None:
            return
        thread = threading.Thread(
            target=self._watch_socket, args=(conn, self._begin_watch()),
            name=f"crown-sync-pg-watch:{self.name}", daemon=True,
        )
        self._watcher = thread
        thread.start()

    def _stop_watcher(self) -> None:
        self._watch_generation += 1
        thread, self._watcher = self._watcher, None
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

    def _watch_socket(self, conn: psycopg.Connection, generation: int) -> None:
        """Wake the engine when the idle server sends something unasked: a goodbye (FATAL, EOF)
        ends the term at once; a dismissal asks for a refresh; other notifications are read."""
        try:
            fd = conn.pgconn.socket
        except Exception:
            return
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP)
        poller.register(self._wake_r, select.POLLIN)
        signalled = -1
        while generation == self._watch_generation:
            events = poller.poll(1000)
            if generation != self._watch_generation or any(f == self._wake_r for f, _ in events):
                return
            if not events:
                continue
            if signalled == self._statements:  # told the engine; wait for it to act
                time.sleep(0.05)
                continue
            lost = dismissed = False
            with self._io_lock:  # no statement in flight: readable now means unsolicited
                if generation != self._watch_generation or conn.closed:
                    return
                if not _readable(fd, 0):
                    continue
                lost = self._peek_fatal(conn, fd)
                if not lost:
                    try:  # read it the way psycopg would: notifications go to _on_notify
                        self._read_notifications(conn.pgconn)
                    except Exception:
                        lost = True
                dismissed = self._dismissed
                if lost:
                    self._session_lost = True  # read by claim(), for a term not yet begun
                if lost or dismissed:
                    signalled = self._statements
            if lost or dismissed:
                logger.debug("%s: unsolicited message from the server (lost=%s, dismissed=%s)",
                             self.name, lost, dismissed)
                self._notify(lost=lost)

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
