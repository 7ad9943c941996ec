"""The SQL of the PostgreSQL oracle (see the package docstring for what each statement proves).

Every statement reports pg_backend_pid() and our session marker: the pooling check."""

import re
from typing import Optional

from ._common import _MARKER

# Leads every statement of a shared holder session (sessions=shared): see _QUIET_SQL.
SHARED_MARK = "/* crown_sync_shared */ "

_KEY_LOCK = (
    "l.locktype = 'advisory' AND l.database = (SELECT oid FROM pg_database"
    " WHERE datname = current_database()) AND l.classid::bigint = %(hi)s"
    " AND l.objid::bigint = %(lo)s AND l.objsubid = 1"
)
_HOLDER = _KEY_LOCK + " AND l.granted"
# pg_locks row ``w``: a session waiting for the key (not granted).
_WAITING_FOR_KEY = _KEY_LOCK.replace("l.", "w.") + " AND NOT w.granted"

# Does the session of pg_stat_activity row ``a`` have our role's privileges (it is of our role, a
# member of it, or a superuser)? Only such a session could be a crown of ours (crowns of one
# election share a role) and its notifications count (see *Sharing a server* in the package
# docstring): the sender's pid of a NOTIFY is the server's word, its payload is anyone's.
_TRUSTED = "pg_has_role(a.usesysid, session_user, 'USAGE')"
# Who holds the key: pid, last statement (a leader's carries its record), role, application and
# whether its role is trusted (the columns every holder read returns, in this order).
_HOLDER_COLUMNS = "l.pid, a.query, a.usename::text AS role, a.application_name AS app, " + _TRUSTED + " AS trusted"
# The sessions of a trusted role that hold or await the key (besides ours): the only ones whose
# claims and releases a follower believes (Takeover._handed_over).
_OURS_ON_KEY = (
    "(SELECT array_agg(l.pid) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE "
    + _KEY_LOCK + " AND l.pid <> pg_backend_pid() AND " + _TRUSTED + ")"
)

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
# sessions of this database were ever terminated: the baseline of a later claim (Takeover.claim_debt).
_TRY_SQL = (
    "SELECT s.locked,"
    " CASE WHEN s.locked THEN " + _TOKEN + "::text END,"
    " CASE WHEN s.locked THEN pg_logical_emit_message(true, 'crown_sync', %(msg)s)::text"
    " || pg_notify(%(channel)s, 'claimed:' || " + _TOKEN + "::text)::text END,"
    " extract(epoch FROM clock_timestamp())::float8, pg_backend_pid(),"
    " current_setting('" + _MARKER + "', true), pg_is_in_recovery(), h.pid, h.query,"
    " CASE WHEN s.locked AND %(young)s THEN " + _INCARNATION_AGE + " END, s.killed,"
    " h.role, h.app, h.trusted, CASE WHEN NOT s.locked THEN " + _OURS_ON_KEY + " END"
    " FROM (SELECT k.killed, pg_try_advisory_lock(%(key)s::bigint + 0 * coalesce(k.killed, 0))"
    " AS locked FROM (SELECT pg_stat_get_db_sessions_killed(" + _DATABASE_OID + ") AS killed"
    " OFFSET 0) k OFFSET 0) s"
    " LEFT JOIN LATERAL (SELECT " + _HOLDER_COLUMNS + " FROM pg_locks l"
    " LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE NOT s.locked AND l.pid <> pg_backend_pid() AND " + _HOLDER + " LIMIT 1) h ON true"
)

# Every claim also NOTIFYs "claimed:<token>" on the election's channel (and every graceful
# release "released:<token>", before unlocking): listeners see these in commit order.

# Before queueing for the lock, the same statement reads who holds it, that holder's last
# statement (a leader's carries its record), its role, which sessions of a trusted role hold or
# await it, and how many sessions of this database were ever
# terminated (pg_terminate_backend): the baseline the takeover proof compares with. The lock's argument
# depends on that read (``+ 0 * ...``), so it cannot be taken first. The target list, evaluated
# after the grant, reads the incarnation's age (see _INCARNATION_AGE).
_WAIT_SQL = (
    "SELECT " + _TOKEN + "::text,"
    " pg_logical_emit_message(true, 'crown_sync', %(msg)s)::text"
    " || pg_notify(%(channel)s, 'claimed:' || " + _TOKEN + "::text)::text,"
    " extract(epoch FROM clock_timestamp())::float8, pg_backend_pid(),"
    " current_setting('" + _MARKER + "', true), pg_is_in_recovery(), b.holder, b.killed, b.query,"
    " CASE WHEN %(young)s THEN " + _INCARNATION_AGE + " END, b.role, b.app, b.trusted, b.ours"
    " FROM (SELECT h.pid AS holder, h.query, h.role, h.app, h.trusted, " + _OURS_ON_KEY + " AS ours,"
    " pg_stat_get_db_sessions_killed(" + _DATABASE_OID + ")"
    " AS killed FROM (SELECT 1) one LEFT JOIN LATERAL (SELECT " + _HOLDER_COLUMNS + " FROM pg_locks l"
    " LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.pid <> pg_backend_pid() AND " + _HOLDER + ""
    " LIMIT 1) h ON true OFFSET 0) b,"
    " LATERAL (SELECT pg_advisory_lock(%(key)s::bigint + 0 * coalesce(b.killed, 0)) OFFSET 0) s"
)
# The wait of the follower first in the election's line (see _line) also lets go of its place
# there once granted, in the same statement: the next follower in line queues behind us at once.
_LINE_KEY = "%(line_hi)s::int4, %(line_lo)s::int4"  # the two-integer key of the election's line
_LEAVE_LINE_SQL = "SELECT pg_advisory_unlock(" + _LINE_KEY + ")"
_WAIT_IN_LINE_SQL = _WAIT_SQL.replace(
    " FROM (SELECT h.pid AS holder,", ", pg_advisory_unlock(" + _LINE_KEY + ") FROM (SELECT h.pid AS holder,", 1)
assert _WAIT_IN_LINE_SQL != _WAIT_SQL

# A place in the election's line: the two-integer advisory lock of the key's two halves, a key
# space of its own (pg_locks shows it with objsubid 2). Taken only if we do not hold it already
# (a wait cancelled after its grant left it held: once is enough). Once we have it, which trusted
# session holds the lock (the one that just handed the line on, unless it let go already): its
# release counts if we hear it (Takeover.trust). Bounded by lock_timeout, as the wait.
_LINE_LOCK = _KEY_LOCK.replace("l.objsubid = 1", "l.objsubid = 2")


def _line_sql(take: str) -> str:
    return (
        "SELECT s.turn, pg_backend_pid(), current_setting('" + _MARKER + "', true), pg_is_in_recovery(),"
        " h.pid, h.trusted FROM (SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_locks l WHERE " + _LINE_LOCK +
        " AND l.granted AND l.pid = pg_backend_pid()) THEN true ELSE " + take + " END AS turn OFFSET 0) s"
        " LEFT JOIN LATERAL (SELECT l.pid, " + _TRUSTED + " AS trusted FROM pg_locks l"
        " LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE s.turn AND l.pid <> pg_backend_pid() AND "
        + _HOLDER + " LIMIT 1) h ON true"
    )


_LINE_SQL = _line_sql("pg_advisory_lock(" + _LINE_KEY + ") IS NOT NULL")
_TRY_LINE_SQL = _line_sql("pg_try_advisory_lock(" + _LINE_KEY + ")")

# After the grant: has the predecessor's session finished exiting (its pg_stat_activity entry
# is removed after its disconnect was counted), and how many terminations are counted now?
# Evaluated left to right: the entry is looked up before the counter is read.
_PREDECESSOR_SQL = (
    "SELECT EXISTS (SELECT 1 FROM pg_stat_get_activity(%(pid)s) a WHERE a.pid = %(pid)s),"
    " pg_stat_get_db_sessions_killed(" + _DATABASE_OID + ")"
)

# After a claim won with pg_try_advisory_lock without a baseline (Takeover.claim_debt): how long ago, by
# the server's clock, could a termination we cannot see have ended a term of this election? Now
# (0) while any other session of this database may still be exiting from such a term: its last
# statement carries the election's tag (a leader's confirmations, a follower's lock wait) or can't
# be read (another role's session without pg_read_all_stats, track_activities off), unless it is
# queued for the lock right now. Otherwise,
# every such session has left pg_stat_activity, so its disconnect is counted (read next, left to
# right): with no termination counted since the database's statistics were reset, since that
# reset (never reset: forever); with one, now.
_QUIET_SQL = (
    "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid <> pg_backend_pid()"
    " AND a.datid = " + _DATABASE_OID + " AND (strpos(a.query, %(tag)s) > 0"
    # A shared holder session (sessions=shared) leads each statement with this mark; the tags
    # of its terms may be cut off by track_activity_query_size, the mark never is.
    # (spelled in two pieces, so that this statement's own text does not carry it).
    " OR strpos(a.query, '" + SHARED_MARK.strip()[:13] + "' || '" + SHARED_MARK.strip()[13:] + "') > 0"
    " OR a.query = '<insufficient privilege>' OR a.state = 'disabled')"
    # A session queued for this lock is alive and holds it not: no term of it is ending (a
    # follower whose wait began between our claim and this statement).
    " AND NOT EXISTS (SELECT 1 FROM pg_locks w WHERE w.pid = a.pid AND " + _WAITING_FOR_KEY + "))"
    " THEN 0::float8"
    " WHEN pg_stat_get_db_sessions_killed(" + _DATABASE_OID + ") = 0 THEN coalesce(extract(epoch"
    " FROM clock_timestamp() - pg_stat_get_db_stat_reset_time(" + _DATABASE_OID + "))::float8,"
    " 'Infinity'::float8) ELSE 0::float8 END"
)

_HOLDER_SQL = (
    "SELECT " + _HOLDER_COLUMNS + ", pg_backend_pid(), current_setting('" + _MARKER + "', true),"
    " pg_is_in_recovery()"
    " FROM (SELECT 1) one LEFT JOIN (pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid)"
    " ON l.pid <> pg_backend_pid() AND " + _HOLDER + " LIMIT 1"
)
# A follower's read between two waits: the holder as above, then whether the lock is left
# unattended (nobody waits for it, and the line's holder is not a follower about to: it has been
# idle for a second, or its state is hidden from us), and whether one that waits for the lock
# holds the line (see _line: a follower in line that finds the lock unattended waits for it out
# of turn, and goes back once the first in line waits). The first in line is briefly between two
# waits every wait_timeout: not unattended.
_BETWEEN_WAITS_SQL = _HOLDER_SQL.replace(
    " FROM (SELECT 1) one",
    ", NOT EXISTS (SELECT 1 FROM pg_locks w WHERE " + _WAITING_FOR_KEY +
    " AND w.pid <> pg_backend_pid()) AND NOT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a"
    " ON a.pid = l.pid WHERE " + _LINE_LOCK + " AND l.granted AND l.pid <> pg_backend_pid() AND (a.state = 'active'"
    " OR a.state_change > clock_timestamp() - interval '1 second')),"
    " EXISTS (SELECT 1 FROM pg_locks w JOIN pg_locks l ON l.pid = w.pid"
    " WHERE " + _WAITING_FOR_KEY + " AND w.pid <> pg_backend_pid() AND "
    + _LINE_LOCK + " AND l.granted) FROM (SELECT 1) one", 1)
assert _BETWEEN_WAITS_SQL != _HOLDER_SQL

# The fleet view: every session's 64-bit advisory lock in this database and every place in an
# election's line (objsubid 2), held or awaited, with the session's last statement (a leader's
# carries its record, which names the election).
_LIST_SQL = (
    "SELECT l.classid::bigint, l.objid::bigint, l.objsubid = 1 AND l.granted, l.pid, a.query FROM pg_locks l"
    " LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory'"
    " AND l.database = " + _DATABASE_OID + " AND l.objsubid IN (1, 2) AND l.pid <> pg_backend_pid()"
)


def _sender_trusted(pid: Optional[int]) -> str:
    """A confirm statement's last column when a dismissal naming no token came from backend
    ``pid``: is that session alive and of a trusted role? (Its sender stays connected until we
    have asked: PostgresOracle.dismiss.) Nothing when there was none. A literal: ``pid`` is the
    server's int."""
    if pid is None:
        return ""
    return f", EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = {int(pid)} AND {_TRUSTED})"


# Preceded by the leader record comment when leading.
_CONFIRM_SQL = (
    "SELECT pg_backend_pid(), current_setting('" + _MARKER + "', true),"
    " EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = pg_backend_pid() AND " + _HOLDER + "),"
    " pg_is_in_recovery()"
)
# A term's first confirmation also announces "leading:<token>" (after the engine started the
# child): a predecessor that just released to us ends its session only then (Takeover.await_successor).
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



# sessions=shared: the holder session's confirmation of every lock it holds, in one statement: the
# keys of its granted advisory locks ("classid:objid"), and the announcements (``leading:<token>``)
# of the terms it confirms for the first time, sent on commit.
_HELD_SQL = (
    "SELECT pg_backend_pid(), current_setting('" + _MARKER + "', true), pg_is_in_recovery(),"
    " ARRAY(SELECT l.classid::text || ':' || l.objid::text FROM pg_locks l WHERE l.pid = pg_backend_pid()"
    " AND l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.database = " + _DATABASE_OID + "),"
    " (SELECT count(pg_notify(n.c, n.p)) FROM unnest(%(channels)s::text[], %(payloads)s::text[]) AS n(c, p))"
)

# sessions=shared: which of the followed keys ("classid:objid") no session holds now. One statement
# per poll for every election the process follows (its crash failover: see _shared).
_FREE_SQL = (
    "SELECT k FROM unnest(%(keys)s::text[]) AS k WHERE NOT EXISTS (SELECT 1 FROM pg_locks l"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.database = " + _DATABASE_OID +
    " AND l.classid::text || ':' || l.objid::text = k)"
)


def _shared_release_sql(channel: str, token: Optional[int], key: int) -> str:
    """sessions=shared: a graceful release of ONE key (the session holds others): the NOTIFY
    commits before the unlock, as in _release_sql. Literals, checked as there."""
    assert re.fullmatch(r"crown_sync_[0-9a-f]{16}", channel)
    assert isinstance(key, int) and (token is None or isinstance(token, int)) and not isinstance(token, bool)
    unlock = f"SELECT pg_advisory_unlock({key}::bigint)"
    if token is None:
        return unlock
    return f"BEGIN; SELECT pg_notify('{channel}', 'released:{token}'); COMMIT; {unlock}"
