"""PostgresOracle: options, URL, connections and the reads that need no contender."""

import sys
import threading
import urllib.parse
from typing import Any, Dict, List, Optional, Tuple, Union

import psycopg
import tenacity
from psycopg import conninfo as _conninfo

from ... import _forksafe, clock
from ...oracle import Leader, OnChange
from ...urls import parse_options, redact, redact_text
from .._base import Election, OracleBase, leader_of, seconds_between
from ._common import (OPTIONS, PostgresOracleError, StandbyRefused, _all_records, _blind, _channel, _find_record,
                      _Holder, _keepalives, _key_parts, _lease_ms, _Unanswered, advisory_key, bounded, logger)
from ._contender import PostgresContender
from ._shared import SharedSessions
from ._shared_contender import SharedContender
from ._sql import _HOLDER_SQL, _LIST_SQL, SHARED_MARK


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
    sessions: ``"per_crown"`` (the default): every crown has a dedicated session, and a follower
        blocks in ``pg_advisory_lock`` on it (crash failover by the server's wake-up).
        ``"shared"``: all the crowns of this oracle object share two sessions whatever their
        number (one holds the locks the process leads and LISTENs, the other reads and polls);
        a crashed leader's successor is found by a poll every ``poll_interval`` (see _shared).
    poll_interval: sessions=shared only: seconds between the polls that find the followed
        elections whose leader's session ended (one statement for all). 0.01 to 60.
    """

    #: Metadata that does not fit ``track_activity_query_size`` is left out of the published
    #: record (a warning), not refused: no size limit at construction.
    max_record = sys.maxsize

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
        sessions: str = "per_crown",
        poll_interval: float = 0.5,
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
        self._set_sessions(sessions, poll_interval)
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
        self._foreign: Dict[str, str] = {}  # election -> its foreign holder, as last seen (notices)
        self._forked = False
        self._closed = False

    def _set_sessions(self, sessions: str, poll_interval: float) -> None:
        if sessions not in ("per_crown", "shared"):
            raise ValueError(f"sessions must be 'per_crown' or 'shared', got {sessions!r}")
        self.sessions = sessions
        self.poll_interval = seconds_between("poll_interval", poll_interval, 0.01, 60.0)
        self._shared: Optional[SharedSessions] = None  # built for the first shared-mode contender
        self._shared_lock = threading.Lock()

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
                    fresh = True
                else:
                    fresh = False
                # A frozen server answers nothing: cut the reader (it holds no lock) after a lease.
                try:
                    with bounded(conn, clock.monotonic() + self.lease, server=self.description):
                        return self._read_on(conn, fresh, query, params)
                except _Unanswered as exc:
                    self._reader = None
                    raise PostgresOracleError(str(exc)) from None
                except psycopg.OperationalError as exc:
                    if conn.broken and attempt == 1:
                        self._reader = None
                        continue
                    raise PostgresOracleError(self.safe_error(exc)) from None
        raise AssertionError("unreachable")

    def _read_on(self, conn: psycopg.Connection, fresh: bool, query: str, params: Dict[str, Any]):
        if fresh:
            row = conn.execute("SELECT pg_is_in_recovery(), current_setting('server_version_num')::int").fetchone()
            if row[0]:
                self._reader = None
                conn.close()
                raise StandbyRefused(f"{self.description} is a standby (in recovery)")
        return conn.execute(query, params).fetchall()

    # -- Oracle API ------------------------------------------------------------------------

    def key(self, name: str) -> int:
        return advisory_key(self.namespace, name)

    def candidacy(self, name: str, candidate):
        """This contender's published candidacy, for ranking strategies (see docs/ranking.rst)."""
        from ._candidacy import PostgresCandidacy
        return PostgresCandidacy(self, name, candidate)

    def contender(self, name: str, identity: str, metadata: Dict[str, Any], on_change: OnChange
                  ) -> Union[PostgresContender, SharedContender]:
        self._check_process()
        if self._forked:
            raise PostgresOracleError("this oracle was inherited across fork(); create a new one")
        if self.sessions == "shared":
            with self._shared_lock:
                if self._shared is None:
                    self._shared = SharedSessions(self)
            return SharedContender(self, self._shared, name, identity, metadata, on_change)
        return PostgresContender(self, name, identity, metadata, on_change)

    def _holder(self, name: str) -> Optional[_Holder]:
        hi, lo = _key_parts(self.key(name))
        rows = self._read(_HOLDER_SQL, {"hi": hi, "lo": lo})
        return _Holder(*rows[0][:5]) if rows and rows[0][0] is not None else None

    def leader_from_row(self, name: str, pid: Optional[int], query: Optional[str], role: Optional[str] = None,
                        app: Optional[str] = None, trusted: Optional[bool] = None) -> Optional[Leader]:
        """The Leader that holds the lock, from its pid and last statement text (and its role:
        a holder of a role without ours' privileges and without a record is a foreign holder)."""
        if pid is None:
            return None
        record = _find_record(query, self.namespace, name)
        if record:
            return leader_of(record)
        if trusted is False:
            # Not a crown of ours as far as we can tell: say who it is, not "a leader".
            return Leader(identity=f"(foreign holder: backend pid {pid}, role {role}, application {app!r})",
                          metadata={"foreign": True, "backend_pid": pid, "role": role, "application_name": app})
        return Leader(identity=f"(unknown: backend pid {pid})", metadata={}, token=None, since=None)

    def note_holder(self, name: str, leader: Optional[Leader]) -> None:
        """Remember whether election ``name``'s lock has a foreign holder (for notices())."""
        if leader is not None and leader.metadata.get("foreign"):
            self._foreign[name] = (f"the election's advisory lock is held by {leader.identity[1:-1]}, not a"
                                   f" crown of this role: no crown can lead until it lets go")
        else:
            self._foreign.pop(name, None)

    def notices(self, name: str) -> List[str]:
        """What election ``name`` cannot be protected against now, as last seen (no I/O): a foreign
        holder of its key."""
        text = self._foreign.get(name)
        return [text] if text else []

    def find_leader(self, name: str) -> Optional[Leader]:
        holder = self._holder(name)
        leader = self.leader_from_row(name, *holder) if holder else None
        self.note_holder(name, leader)
        return leader

    def elections(self) -> List[Election]:
        """The elections of our namespace whose lock a session holds, in one query: the name is
        read from the holder's record, so a lock only waited on (or held by a successor that has
        not confirmed yet) is not listed. Contenders: the holder and the sessions waiting for the
        lock or in its line (see _line)."""
        locks: Dict[Tuple[int, int], list] = {}
        for hi, lo, granted, pid, query in self._read(_LIST_SQL, {}):
            entry = locks.setdefault((hi, lo), [set(), None])
            entry[0].add(pid)  # the first follower in line is on the line and on the lock
            if granted:
                entry[1] = (pid, query)
        found = []
        for parts, (pids, holder) in locks.items():
            count = len(pids)
            # A shared holder session (sessions=shared) carries one record per term it leads.
            names = [r.get("name") for r in _all_records(holder[1] if holder else None)
                     if r.get("ns") == self.namespace and isinstance(r.get("name"), str)]
            # Another application's advisory lock, or another namespace's: not ours to list.
            name = next((n for n in names if _key_parts(self.key(n)) == parts), None)
            if name is None:
                continue
            # A shared holder's followers (sessions=shared) do not queue on the lock: unknown.
            shared = SHARED_MARK.strip() in (holder[1] or "")
            found.append(Election(name, self.leader_from_row(name, *holder), None if shared else count))
        return found

    def dismiss(self, name: str) -> bool:
        """Ask the leader of ``name`` to step down (NOTIFY; see the module docstring). False if
        there is none: no holder, or a holder of the crowns' role that has not started leading."""
        # A new leader publishes its record with its first confirmation, right after its claim.
        # An empty query: the holder's track_activities is off, no record will ever show.
        holder = tenacity.Retrying(
            retry=tenacity.retry_if_result(lambda h: h is not None and bool(h.trusted) and bool(h.query)
                                           and _find_record(h.query, self.namespace, name) is None),
            wait=tenacity.wait_fixed(0.02), stop=tenacity.stop_after_delay(self.confirm_interval),
            retry_error_callback=lambda state: state.outcome.result(),
        )(self._holder, name)
        if holder is None:
            return False
        token = (_find_record(holder.query, self.namespace, name) or {}).get("token")
        if token is None and holder.trusted and holder.query == "":
            return self._dismiss_unnamed(name, holder)
        if token is None and holder.trusted is not False:  # ours (or its session just ended)
            logger.warning("%s: the lock's holder (backend pid %s) has published no leader record: it has not"
                           " started leading yet (it waits out its predecessor's lease), or is no crown;"
                           " no leader to dismiss", name, holder.pid)
            return False
        if token is None:  # a leader heeds a dismissal only with its term's token, or from its own role
            why = ("track_activities is off on its session, so its leader record is not readable and only a"
                   " session of its role can dismiss it" if holder.query == "" else
                   "its leader record is not readable (another role's session: connect as the crowns' role,"
                   " or one with pg_read_all_stats), and a leader steps down only for its own term's token")
            raise PostgresOracleError(
                f"cannot dismiss the leader of {name!r} (backend pid {holder.pid}, role {holder.role}): {why}")
        self._send_dismissal(name, holder, str(token))
        return True

    def _send_dismissal(self, name: str, holder: _Holder, token: str) -> None:
        payload = f"dismiss:{holder.pid}:{token}"
        self._read("SELECT pg_notify(%(channel)s, %(payload)s)", {"channel": _channel(self.key(name)), "payload": payload})
        logger.info("dismissed the leader of %s (backend pid %s)", name, holder.pid)

    def _dismiss_unnamed(self, name: str, holder: _Holder) -> bool:
        """track_activities is off: the leader's record (its token) cannot be read, so send a
        dismissal naming no token. The leader heeds it if our session is of a trusted role, which
        it asks the server at its next confirmation (woken at once by its socket watcher): so
        stay connected until the holder lets go, or for two confirm intervals (its scheduled
        confirmation comes within one). A holder still waiting out a lease ignores it."""
        logger.info("%s: track_activities is off on the holder's session (backend pid %s): its leader record"
                    " cannot be read; dismissing it by our session's role, without its token", name, holder.pid)
        self._send_dismissal(name, holder, "")
        tenacity.Retrying(  # until the holder lets go, or two confirm intervals
            retry=tenacity.retry_if_result(lambda now: now is not None and now.pid == holder.pid),
            wait=tenacity.wait_fixed(0.05), stop=tenacity.stop_after_delay(2 * self.confirm_interval),
            retry_error_callback=lambda state: None,
        )(self._holder, name)
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
        if self._shared is not None:
            self._shared.forget_after_fork()
        self._shared_lock = threading.Lock()
        _blind(self._reader)
        self._reader = None
        self._reader_lock = threading.Lock()

