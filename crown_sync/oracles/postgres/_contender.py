"""PostgresContender: one crown's dedicated session, its claims, confirmations and release; the
follower's waiter (_waiter), the takeover proof (_takeover) and the leader's socket watcher
(_watcher) are its parts."""

import collections
import math
import threading
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import psycopg
import tenacity

from ... import clock
from ...oracle import Claim, Leader, OnChange
from .._base import ContenderBase, Phase, record_of
from ._common import (PostgresOracleError, StandbyRefused, _blind, _channel, _encode_record, _Holder,
                      _key_parts, _SessionGone, _shutdown, _Unanswered, bounded, logger)
from ._line import Line
from ._session import open_session, pooling
from ._sql import _ANNOUNCING_CONFIRM_SQL, _CONFIRM_SQL, _TRY_SQL, _release_sql, _sender_trusted
from ._takeover import Takeover
from ._waiter import Waiter
from ._watcher import SocketWatcher

if TYPE_CHECKING:  # pragma: no cover
    from ._oracle import PostgresOracle

# close() after a graceful release waits at most this long for the successor to lead (see
# Takeover.await_successor); normally it takes a few milliseconds.
_HANDOFF_LINGER = 0.05


class _Term:
    """A term of ours: the leader record its confirmations carry, and what happened to it since
    it began: its first confirmation announced it (``leading:<token>``), a dismissal named it,
    or the socket watcher heard the server's goodbye (FATAL, EOF) before the engine asked;
    ``asked_by``: the sender of a dismissal naming no token, to be judged at the next
    confirmation (``track_activities = off`` hides our record, so the crowns' own role cannot
    read the token; the sender's role is the server's word, its payload anyone's)."""

    __slots__ = ("record", "announced", "dismissed", "lost", "asked_by")

    def __init__(self, record: str):
        self.record = record
        self.announced = False
        self.dismissed = False
        self.lost = False
        self.asked_by: Optional[int] = None

    def dismiss(self, payload: str, backend_pid: Optional[int], token: Optional[int], sender: int, name: str) -> None:
        """A dismissal ``<pid>:<token>`` reached this term (of ``token``, on ``backend_pid``), from ``sender``."""
        pid, _, named = payload.partition(":")
        if pid != str(backend_pid):  # aimed at another session (a past holder's)
            return
        if named == str(token):
            self.dismissed = True
        elif not named:  # heeded if ``sender`` is of a trusted role (judge(), at the next confirmation)
            self.asked_by = sender
        else:  # a stale or forged token: not a dismissal of this term
            logger.warning("%s: ignored a dismissal from backend pid %s naming token %r, not our term's",
                           name, sender, named[:32])

    def take_ask(self) -> Optional[int]:
        """The sender of a dismissal naming no token since the last confirmation, if any."""
        sender, self.asked_by = self.asked_by, None
        return sender

    def judge(self, sender: Optional[int], trusted: bool, name: str) -> None:
        """The confirmation's answer on ``sender`` (_sql._sender_trusted) decides its dismissal."""
        if sender is None:
            return
        if trusted:
            logger.info("%s: dismissal naming no token from backend pid %s, a session of a trusted role",
                        name, sender)
            self.dismissed = True
        else:  # a co-tenant's (or a session gone before we could ask): ignored, as with a wrong token
            logger.warning("%s: ignored a dismissal from backend pid %s naming no token: not a live"
                           " session of a trusted role", name, sender)


class PostgresContender(ContenderBase):
    """One crown's dedicated session. See the package docstring.

    Its phase (:class:`~crown_sync.oracles._base.Phase`): FOLLOWING, PENDING while it holds the
    lock but waits out a predecessor's lease (Takeover.wait_out), LEADING, CLOSED or FORKED.
    Its parts: ``_waiting`` (the follower's waiter thread and what it obtained), ``_takeover``
    (the proof and the debt) and ``_watch`` (the leader's socket watcher)."""

    oracle: "PostgresOracle"

    def __init__(self, oracle: "PostgresOracle", name: str, identity: str, metadata: Dict[str, Any], on_change: OnChange):
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
        self._io_lock = threading.Lock()  # held while a statement is in flight on _conn
        # leadership: the token and start of the term we hold or are about to lead
        self._token: Optional[int] = None
        self._since: Optional[float] = None
        self._term: Optional[_Term] = None  # from the term's start to its release
        self._lease_end = -math.inf  # last confirmation's start + B: a refresh is cut there
        self._statements = 0  # bumped after every statement: the socket watcher's progress mark
        self._events: "collections.deque" = collections.deque(maxlen=64)  # (kind, token, pid)
        self._handoff: Optional[Tuple[int, float]] = None  # (released token, linger until): close()
        self._leader: Optional[Leader] = None
        self._waiting = Waiter(self)
        self._line = Line(self)  # the waiter's place in the election's line
        self._takeover = Takeover(self)
        self._watch = SocketWatcher(self)
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
        conn, session = open_session(self.oracle, self.name, self._channel, self._on_notify)
        self._backend_pid, self._marker = session.pid, session.marker
        self._bound, self._query_limit = session.bound, session.query_limit
        self._counts_terminations = session.counts_terminations
        self._connected_at = clock.monotonic()
        with self._lock:
            self._events.clear()  # what happened while we were not listening is unknown
            self._takeover.forget()
            self._line.reset()
        logger.debug("%s: connected, backend pid %s, server lease bound %.3fs", self.name, session.pid, session.bound)
        return conn

    def _drop_connection(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            self._backend_pid = self._marker = None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def _execute(self, query: str, params: Dict[str, Any], conn: Optional[psycopg.Connection] = None,
                 until: Optional[float] = None):
        """One statement on our session, under the I/O lock, bounded (see _in_flight); returns
        the first row."""
        if conn is None:
            conn = self._ensure_connected()
        with self._io_lock, self._in_flight(conn, until):
            try:
                return conn.execute(query, params).fetchone()
            finally:
                self._statements += 1

    def _in_flight(self, conn: psycopg.Connection, until: Optional[float] = None):
        """Cut our session if a statement (under the I/O lock) is unanswered at ``until`` (default
        B from now): safe, since a refresh passes _lease_end, after the term's deadline, and the
        other statements run while no child of ours does (see the package docstring)."""
        bound = clock.monotonic() + self._bound if until is None else until
        return bounded(conn, bound, self._on_cut, self.oracle.description)

    def _on_cut(self) -> None:
        """In the warden's thread, after a statement's session was cut (see _in_flight)."""
        logger.warning("%s: no answer from %s in time; closed the session", self.name, self.oracle.description)
        if self.phase is Phase.LEADING:
            self._notify(lost=True)  # the session is gone, and the lock with it once the server sees it

    def _check_session(self, pid: int, marker: Optional[str], in_recovery: bool) -> None:
        if pid != self._backend_pid or marker != self._marker:
            raise pooling(self.oracle, self._backend_pid, pid)
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
        waiter = self._waiting.thread
        if waiter is not None:
            collected = self._collect(waiter)
            if collected is not None:
                return collected
        try:
            self._line.listen_if_deaf()
            row = self._claim_retrying(self._try_lock)
            locked, token, _, since, pid, marker, in_recovery, holder_pid, holder_query, age, killed = row[:11]
            self._check_session(pid, marker, in_recovery)
            if not locked:
                holder = _Holder(holder_pid, holder_query, *row[11:14])
                self._takeover.baseline = self._takeover.note(holder_pid, killed, holder_query, holder.trusted, row[14])
                self._leader = self._waiting.follow(holder)
                return Claim(won=False, leader=self._leader)
            until = self._takeover.claim_debt(self._conn, int(token), clock.monotonic(), age)
        except Exception as exc:
            self._fail(exc)
            raise self._error(exc) from None
        if until > clock.monotonic():
            self._waiting.owe(self._conn, int(token), since, until)
            return Claim(won=False, leader=None)
        self._token, self._since = int(token), since
        return self._won()

    def _collect(self, waiter: threading.Thread) -> Optional[Claim]:
        """What the waiter obtained, for claim(): "lost" while it is queued, the term it got
        (adopted, or confirmed now), or None when it failed or ended without the lock (claim
        afresh)."""
        waiting = self._waiting
        with self._lock:
            granted, error = waiting.granted, waiting.error
        if granted is None and error is None and waiter.is_alive():
            # Queued on the lock: the server would have woken us if it were free.
            return Claim(won=False, leader=self._leader)
        with self._lock:
            prepared = waiting.prepared
            # The waiter may have stayed on as the term's socket watcher (see Waiter._begin_term).
            adopted = granted is not None and waiter is self._watch.thread
            if adopted:
                waiting.forget()
        if adopted:
            self._token, self._since = granted
            term = self._term
            if term is not None and term.lost:  # its watcher heard a goodbye before the engine asked
                self._release(quietly=True)
                self._token = self._since = None
                return Claim(won=False, leader=None)
            return self._lead(prepared, watching=True)
        if granted is not None:
            waiter.join(5.0)  # it is ending
        waiting.stop()
        if granted is not None:
            self._token, self._since = granted
            if prepared is not None and prepared.won:
                return self._lead(prepared)
            return self._won()
        return None

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
                 "channel": self._channel, "young": self._takeover.young()},
                conn,
            )
        except psycopg.OperationalError as exc:  # not _Unanswered: a frozen server is not retried at once
            if conn.broken or conn.closed:
                logger.debug("%s: session gone before the claim (%s); reconnecting", self.name,
                             self.oracle.safe_error(exc))
                self._drop_connection()
                raise _SessionGone(f"connection to {self.oracle.description} lost:"
                                   f" {self.oracle.safe_error(exc)}") from None
            raise

    def _new_term(self, token: Optional[int], since: Optional[float]) -> None:
        """A term begins on our session: its record, and nothing heard about it yet."""
        self._token, self._since = token, since
        self._term = _Term(self._make_record_comment())

    def _won(self) -> Claim:
        self._new_term(self._token, self._since)
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
        self.oracle.note_holder(self.name, None)  # ours now: no foreign holder to tell of
        if not watching:
            self._watch.start(self._conn)
        logger.info("%s: %s leads with token %s", self.name, self.identity, self._token)
        return claim

    def _confirm(self, until: Optional[float] = None) -> Claim:
        """Run the confirm statement (which carries our leader record), cut at ``until`` if
        unanswered (default: B after it starts; see _in_flight)."""
        conn = self._conn
        if conn is None or conn.closed:  # a new session could never hold the old one's lock
            self._drop_connection()
            return Claim(won=False, leader=None)
        started = clock.monotonic()
        term = self._term
        announce, term.announced = not term.announced, True  # once, even if it fails
        sender = term.take_ask()  # this statement also asks whether its sender is trusted
        params = {"hi": self._hi, "lo": self._lo}
        if announce:
            params.update(channel=self._channel, leading=f"leading:{self._token}")
        try:
            sql = term.record + (_ANNOUNCING_CONFIRM_SQL if announce else _CONFIRM_SQL) + _sender_trusted(sender)
            row = self._execute(sql, params, conn, until)
            pid, marker, held, in_recovery = row[:4]
            self._check_session(pid, marker, in_recovery)
            term.judge(sender, row[-1], self.name)
        except (psycopg.OperationalError, _Unanswered) as exc:
            conn = self._conn
            if isinstance(exc, _Unanswered) or conn is None or conn.closed:  # gone, and our lock with it
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
        if term.dismissed:
            logger.info("%s: dismissed; stepping down", self.name)
            return Claim(won=False, leader=None)
        leader = self._me(self._token, self._since)
        self._leader = leader
        self._lease_end = started + self._bound
        return Claim(won=True, leader=leader, token=self._token, deadline=started + self._bound - self.oracle.margin,
                     refresh_in=self.oracle.confirm_interval)

    def refresh(self) -> Claim:
        self._check_open()
        if self.phase is not Phase.LEADING or self._term is None:
            return Claim(won=False, leader=None)
        claim = self._confirm(until=self._lease_end)
        if not claim.won:
            self._move(Phase.FOLLOWING)
            self._watch.stop()
        return claim

    def _on_notify(self, notify) -> None:
        """Every notification on our channel, in commit order (read by psycopg, or by Takeover.
        read_events_until). Anyone may NOTIFY: a dismissal counts with our term's token, or naming
        none from a trusted role (_Term), claims and releases as Takeover._handed_over says."""
        if notify.channel != self._channel:
            return
        kind, _, rest = notify.payload.partition(":")
        if kind == "dismiss":
            term = self._term
            if term is not None and self.phase is Phase.LEADING:
                term.dismiss(rest, self._backend_pid, self._token, notify.pid, self.name)
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

    # -- abdicate / close -------------------------------------------------------------------------

    def _release(self, quietly: bool = False) -> None:
        """Unlock, announcing it first ("released:<token>"), so the follower woken by it knows
        we let go (our child already stopped) rather than died. If a session waits for the lock,
        note it: close() then lets that successor lead before ending our session."""
        self._handoff = None
        was_leading = self._term is not None and self._token is not None
        self._move(Phase.FOLLOWING)
        self._term = None
        self._watch.generation += 1  # the socket watcher goes inert now; joined after the unlock
        conn = self._conn
        if conn is None or conn.closed:
            self._drop_connection()
            self._watch.stop()
            return
        try:
            # Cut if unanswered: safe, as the child has stopped (abdicate comes after it).
            with self._io_lock, self._in_flight(conn):
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
            self._watch.stop()

    def abdicate(self) -> None:
        if not self.usable:
            return
        self._waiting.stop()
        self._release()
        self._token = self._since = None

    def close(self) -> None:
        with self._lock:
            if not self.usable:  # closed already, or a copy inherited across fork: never act
                return
            self._enter(Phase.CLOSED)
        self._watch.stop()
        self._waiting.stop(timeout=2.0)
        handoff, self._handoff = self._handoff, None
        self._takeover.await_successor(self._conn, handoff)
        conn = self._conn
        if conn is not None:
            # Polite close if no statement is in flight, else cut the socket (bounded).
            if not self._io_lock.acquire(timeout=1.0):
                _shutdown(conn)
            else:
                self._io_lock.release()
        self._drop_connection()
        self._watch.close()

    def _forget_after_fork(self) -> None:
        _blind(self._conn)  # see _blind: a fork from C was not blinded by _forksafe
        self._conn = None
        self._waiting.thread = self._watch.thread = None
        self._io_lock = threading.Lock()

    # -- follower ----------------------------------------------------------------------------------

    def watch(self, leader: Optional[Leader]) -> bool:
        self._check_open()
        waiting = self._waiting
        waiter = waiting.thread
        if waiter is not None and waiter.is_alive():
            return waiting.waiting()
        if waiter is not None:
            waiting.stop()
        self._ensure_connected()
        waiting.start(waiting.loop, "wait")
        return True
