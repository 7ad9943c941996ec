"""A contender's session: connect, configure, refuse a session we cannot lead on (a standby's,
one behind a pooler, a server that would drop a silent session sooner than the lease) and read
back what the safety arithmetic needs (see the package docstring)."""

import collections
import uuid
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

import psycopg

from ... import clock
from ._common import (_MARKER, _MIN_VERSION, _SETTINGS, PoolingDetected, PostgresOracleError, StandbyRefused,
                      _keepalives, _lease_ms, bounded, logger)

if TYPE_CHECKING:  # pragma: no cover
    from ._oracle import PostgresOracle


class Session(collections.namedtuple("Session", "pid marker bound query_limit counts_terminations")):
    """What connecting found out: the backend pid and the marker every statement checks, the
    server-side lease ``B`` (:func:`server_bound`), ``track_activity_query_size``, and whether
    ``pg_stat_database`` counts terminations in time for the takeover proof."""


def open_session(oracle: "PostgresOracle", name: str, channel: str,
                 on_notify: Callable[[psycopg.Notify], None]) -> Tuple[psycopg.Connection, Session]:
    """A new session for the contender of election ``name``, LISTENing on ``channel``."""
    conn = oracle.connect(f"crown_sync {name}")
    # A frozen server answers nothing: cut the new session if setting it up takes longer than
    # a lease (safe: it holds no lock yet).
    try:
        with bounded(conn, clock.monotonic() + oracle.lease, server=oracle.description):
            return conn, _set_up(oracle, conn, channel, on_notify)
    except psycopg.Error as exc:
        conn.close()
        raise ConnectionError(f"setting up a session on {oracle.description}: {oracle.safe_error(exc)}") from None
    except BaseException:  # _Unanswered (a ConnectionError) included
        conn.close()
        raise


def _set_up(oracle: "PostgresOracle", conn: psycopg.Connection, channel: str,
            on_notify: Callable[[psycopg.Notify], None]) -> Session:
    pid, marker = _configure(oracle, conn)
    # Three statements in a row must reach the same session: a transaction pooler
    # usually gives itself away here already (every later statement checks again).
    _same_session(oracle, conn, pid, marker)
    conn.execute("LISTEN " + channel)
    rows = conn.execute(
        "SELECT pg_backend_pid(), current_setting(%(m)s, true), name, setting"
        " FROM pg_settings WHERE name = ANY(%(names)s)",
        {"m": _MARKER, "names": list(_SETTINGS)},
    ).fetchall()
    if not rows or rows[0][0] != pid or rows[0][1] != marker:
        raise pooling(oracle, pid, rows[0][0] if rows else None)
    settings = {name: setting for _, _, name, setting in rows}
    session = Session(
        pid, marker, server_bound(oracle, settings), int(settings.get("track_activity_query_size", "1024")),
        # PostgreSQL 14's statistics collector counts a disconnect asynchronously (a UDP
        # message, read back from a file up to 500 ms old, or lost), so a backend gone from
        # pg_stat_activity may not be counted yet: no termination proof there (a lease).
        settings.get("track_counts") == "on" and conn.info.server_version >= 150000,
    )
    if settings.get("track_activities") != "on":
        logger.warning("%s: track_activities is off: find_leader can't read leader records", oracle.description)
    conn.add_notify_handler(on_notify)
    return session


def _configure(oracle: "PostgresOracle", conn: psycopg.Connection) -> Tuple[int, str]:
    """Set the session's lease, timeouts and marker; (backend pid, marker)."""
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
    _check_new_session(oracle, conn, pid, in_recovery=row[1], may_read_control=row[-1])
    return pid, marker


def _check_new_session(oracle: "PostgresOracle", conn: psycopg.Connection, pid: int, in_recovery: bool,
                       may_read_control: bool) -> None:
    """Refuse a session we cannot lead on: a standby's, one behind a pooler, or one whose
    role cannot read the server's age after a promotion."""
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


def pooling(oracle: "PostgresOracle", expected: Optional[int], got: Optional[int]) -> PoolingDetected:
    return PoolingDetected(
        f"{oracle.description}: consecutive statements of one connection reached"
        f" different server sessions (backend pid {expected} then {got}): a transaction or"
        f" statement pooler (PgBouncer) is in the way; advisory-lock leadership needs a direct"
        f" connection to PostgreSQL"
    )


def _same_session(oracle: "PostgresOracle", conn: psycopg.Connection, pid: int, marker: str) -> None:
    got, got_marker = conn.execute(
        "SELECT pg_backend_pid(), current_setting(%(m)s, true)", {"m": _MARKER}
    ).fetchone()
    if got != pid or got_marker != marker:
        raise pooling(oracle, pid, got)


def server_bound(oracle: "PostgresOracle", settings: Dict[str, str]) -> float:
    """The smallest time, from a statement's start, after which the server may drop the
    session on its own (the package docstring's B)."""
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
