"""sessions=shared: the two server sessions every crown of one PostgresOracle object shares.

* the **holder** session (this module): it holds the advisory lock of every election the process
  leads (or holds while waiting out a predecessor's lease), LISTENs on the channel of every
  election a crown of the process contends in, and runs every claim, confirmation and release.
  Advisory locks are re-entrant per session, so at most one local contender may claim or hold a
  key at a time (:meth:`SharedSessions.take`): the others of the process follow it locally.
* the oracle's **reader** session (find_leader, dismiss): one statement per ``poll_interval``
  tells which of the keys the process follows no session holds any more (a crashed leader's).

One thread per oracle (the pump) reads the holder's notifications between statements, wakes the
followers it concerns (a ``released:`` of their election, a debt paid), and confirms the holder
session every ``confirm_interval`` when nothing else ran, so the server's ``idle_session_timeout``
(the lease) never ends it under a term that waits out a debt. Another runs the polls on the
reader (and wakes the followers of a free key), so a slow poll never holds the pump up.

Every statement on the holder starts with :data:`_sql.SHARED_MARK` and the leader record of every
term it leads (as far as ``track_activity_query_size`` shows): what a dedicated session's
confirmations carry, for find_leader, dismiss and the takeover proof of other processes.

The holder session is never ended while a term on it may still run its child: a statement is cut
(a frozen server) only once every term's lease end has passed, and the session is closed when its
last contender leaves (after their children stopped). An administrator's
``pg_terminate_backend`` of it ends every term of the process at once.
"""

import heapq
import itertools
import threading
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Tuple

import psycopg
import tenacity

from ... import clock
from .._base import Phase
from ._common import StandbyRefused, _blind, _readable, _shutdown, _Unanswered, bounded, logger
from ._session import Session, open_session, pooling
from ._sql import _FREE_SQL, _HELD_SQL, SHARED_MARK, _shared_release_sql

if TYPE_CHECKING:  # pragma: no cover
    from ._oracle import PostgresOracle
    from ._shared_contender import SharedContender

# The holder LISTENs on no election at connect: channels are added as contenders join.
_IDLE_CHANNEL = "crown_sync_shared"


class SessionChanged(ConnectionError):
    """A statement meant for one holder session (an unlock) refused on a newer one: the lock it
    would free is gone with the old session, and the key may be another local crown's now."""


class SharedSessions:
    """The holder session of one oracle, its contenders and its pump thread (see the module
    docstring). Created by the oracle for its first shared-mode contender."""

    def __init__(self, oracle: "PostgresOracle"):
        self.oracle = oracle
        self.conn: Optional[psycopg.Connection] = None
        self.session: Optional[Session] = None
        self.generation = 0  # bumped at every (re)connect: a lock of an older session is gone
        self.connected_at = -float("inf")
        self.io_lock = threading.Lock()  # held while a statement is in flight on the holder
        self._lock = threading.RLock()  # the registry below
        self._connect_lock = threading.Lock()
        self._confirm_lock = threading.Lock()
        self._members: Dict[str, Set["SharedContender"]] = {}  # channel -> its local contenders
        self._listening: Set[str] = set()
        self._owners: Dict[int, "SharedContender"] = {}  # key -> the local contender claiming or holding it
        self._followed: Dict["SharedContender", str] = {}  # follower -> "classid:objid" of its key
        self._wakeups: List[Tuple[float, int, "SharedContender"]] = []  # heap: debts due
        self._order = itertools.count()
        self._unannounced: Set["SharedContender"] = set()  # new terms: the next confirmation announces them
        self._gate = threading.Condition()  # confirmations before claims (_acquire_io)
        self._urgent = 0
        self._leaked: Set[Tuple[int, int]] = set()  # (key, generation): unlock failed on a live session
        self._last_confirm: Optional[Tuple[float, frozenset, int]] = None  # (start, held keys, generation)
        self._last_statement = -float("inf")
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(ConnectionError),
            wait=tenacity.wait_exponential(multiplier=0.05, max=0.5) + tenacity.wait_random(0, 0.05),
            stop=tenacity.stop_after_attempt(3) | tenacity.stop_after_delay(oracle.connect_timeout),
            reraise=True,
        )

    @property
    def pid(self) -> Optional[int]:
        session = self.session
        return session.pid if session is not None and self.conn is not None else None

    # -- membership ---------------------------------------------------------------------------

    def join(self, contender: "SharedContender") -> None:
        with self._lock:
            self._members.setdefault(contender.channel, set()).add(contender)
            # A pump told to stop (the last crown just left) may still be finishing a wait: start anew.
            if self._thread is None or not self._thread.is_alive() or self._stop.is_set():
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._run, args=(self._stop,), daemon=True,
                                                name=f"crown_sync postgres shared {self.oracle.description}")
                self._thread.start()
                # Polls in a thread of their own: a reader statement that hangs (up to a lease)
                # must not hold up the holder's notifications and confirmations.
                threading.Thread(target=self._run_polls, args=(self._stop,), daemon=True,
                                 name=f"crown_sync postgres shared poll {self.oracle.description}").start()

    def leave(self, contender: "SharedContender") -> None:
        """``contender`` is closing (its term, if any, has ended): drop it; the last one out ends
        the holder session and the pump."""
        with self._lock:
            members = self._members.get(contender.channel, set())
            members.discard(contender)
            if not members:
                self._members.pop(contender.channel, None)
            self._followed.pop(contender, None)
            last = not self._members
            if last:
                self._stop.set()
                conn, self.conn, self.session = self.conn, None, None
                self._listening.clear()
                self._owners.clear()
        if last and conn is not None:
            # No contender left, so no term: ending the session frees nothing anyone relies on.
            if self.io_lock.acquire(timeout=1.0):
                self.io_lock.release()
            else:
                _shutdown(conn)
            try:
                conn.close()
            except Exception:
                pass

    def take(self, contender: "SharedContender") -> Optional["SharedContender"]:
        """Make ``contender`` the local owner of its key, unless another local contender is:
        then return that one (the session would grant it the lock again: re-entrant)."""
        with self._lock:
            owner = self._owners.setdefault(contender.key, contender)
            return None if owner is contender else owner

    def give_up(self, contender: "SharedContender", released: bool = False) -> None:
        """``contender`` no longer claims or holds its key; ``released``: it unlocked it, so wake
        the local followers of its election (one woken by its ``released:`` before this moment
        was refused by take() and would wait for the next poll)."""
        with self._lock:
            if self._owners.get(contender.key) is not contender:
                return
            del self._owners[contender.key]
            followers = [c for c in self._members.get(contender.channel, ())
                         if c is not contender and c.phase is Phase.FOLLOWING] if released else []
        for follower in followers:
            follower.wake()

    def follow(self, contender: "SharedContender", following: bool) -> None:
        with self._lock:
            if following:
                self._followed[contender] = f"{contender.hi}:{contender.lo}"
            else:
                self._followed.pop(contender, None)

    def wake_at(self, when: float, contender: "SharedContender") -> None:
        with self._lock:
            heapq.heappush(self._wakeups, (when, next(self._order), contender))

    # -- the holder session -------------------------------------------------------------------

    def connected_generation(self) -> int:
        """The generation of the holder session, connecting first if needed."""
        self.ensure_connected()
        return self.generation

    def ensure_connected(self) -> psycopg.Connection:
        with self._connect_lock:
            conn = self.conn
            if conn is not None and not conn.closed:
                return conn
            conn, session = self._retrying(open_session, self.oracle, "shared", _IDLE_CHANNEL, self._dispatch)
            with self._lock:
                if not self._members:  # everyone left meanwhile
                    conn.close()
                    raise ConnectionError("no contender left on the shared session")
                self.conn, self.session = conn, session
                self.generation += 1
                self.connected_at = clock.monotonic()
                self._listening.clear()
                members = [c for group in self._members.values() for c in group]
            for contender in members:
                contender.session_changed()
            logger.debug("%s: shared holder session connected, backend pid %s", self.oracle.description, session.pid)
            return conn

    def _comment(self) -> str:
        """SHARED_MARK and the records of the terms the session leads, up to what the server shows."""
        with self._lock:
            leaders = [c for c in self._owners.values() if c.phase is Phase.LEADING and c.term is not None]
        limit = (self.session.query_limit if self.session else 1024) - 1  # the server shows this much
        parts, size = [SHARED_MARK], len(SHARED_MARK)
        for contender in sorted(leaders, key=lambda c: c.term_started):
            record = contender.record_comment
            if size + len(record) > limit:
                continue  # it would not show (see the module docstring); a shorter one may
            parts.append(record)
            size += len(record)
        return "".join(parts)

    def latest_lease_end(self) -> float:
        with self._lock:
            # Every term not yet released: one that lost its lead may still be stopping its child.
            return max([c.lease_end for c in self._owners.values()], default=-1.0)

    def _acquire_io(self, urgent: bool) -> None:
        """Take io_lock; a confirmation (``urgent``) goes before the claims waiting for it: with
        a thousand crowns claiming at once, the terms already won must not pass their deadlines."""
        with self._gate:
            if urgent:
                self._urgent += 1
            else:
                self._gate.wait_for(lambda: self._urgent == 0, timeout=self.oracle.confirm_interval)
        self.io_lock.acquire()
        if urgent:
            with self._gate:
                self._urgent -= 1
                self._gate.notify_all()

    def execute(self, sql: str, params: Optional[Dict[str, Any]] = None, until: Optional[float] = None,
                urgent: bool = False, generation: Optional[int] = None):
        """Run ``sql`` on the holder session (connecting if needed) and return its cursor (after
        the last result set). Cut if unanswered at ``until`` (default: a lease from now), but
        never before every term on the session has passed its lease end: ending the session
        before a term's deadline would let a successor take its end for our process's death.
        ``generation``: run only on that holder session, else raise SessionChanged."""
        if generation is not None and generation != self.generation:
            raise SessionChanged(f"{self.oracle.description}: the holder session changed")  # no reconnect for it
        conn = self.ensure_connected()
        self._listen()  # before our statement: a claim must hear the releases that follow it
        text = self._comment() + sql
        self._acquire_io(urgent)
        try:
            with self._lock:  # checked under io_lock: the statement runs on conn, of this generation
                if generation is not None and (self.conn is not conn or self.generation != generation):
                    raise SessionChanged(f"{self.oracle.description}: the holder session changed")
            bound = clock.monotonic() + self.session.bound if until is None else until
            try:
                with bounded(conn, max(bound, self.latest_lease_end()), self._on_cut, self.oracle.description):
                    try:
                        cursor = conn.execute(text, params)
                        while cursor.nextset():  # several statements (a release): the last one's row
                            pass
                    except psycopg.Error as exc:
                        if (not isinstance(exc, psycopg.OperationalError)
                                and conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR):
                            # A release's NOTIFY failed inside BEGIN...COMMIT: every later statement
                            # would fail (InFailedSqlTransaction) until this ends the transaction.
                            conn.execute("ROLLBACK")
                        raise
                    self._drain(conn.pgconn)
                    return cursor
            except (psycopg.OperationalError, _Unanswered) as exc:
                if isinstance(exc, _Unanswered) or conn.broken or conn.closed:
                    self._lost(conn, exc)
                raise
            finally:
                self._last_statement = clock.monotonic()
        finally:
            self.io_lock.release()

    def _listen(self) -> None:
        """LISTEN on the channels of contenders that joined since (one statement)."""
        with self._lock:
            missing = sorted(set(self._members) - self._listening)
            self._listening |= set(missing)
        if not missing:
            return
        try:  # through execute(): bounded, and with the mark and records (_QUIET_SQL)
            self.execute("; ".join(f"LISTEN {channel}" for channel in missing))
        except Exception:
            with self._lock:
                self._listening -= set(missing)
            raise

    def check(self, pid: int, marker: Optional[str]) -> None:
        session = self.session
        if session is None or pid != session.pid or marker != session.marker:
            raise pooling(self.oracle, session.pid if session else None, pid)

    def _on_cut(self) -> None:
        logger.warning("%s: no answer in time; closed the shared holder session", self.oracle.description)

    def _lost(self, conn: psycopg.Connection, exc: BaseException) -> None:
        """The holder session is gone (and every lock on it): every term on it ends now."""
        with self._lock:
            if self.conn is not conn:
                return
            self.conn = None
            self._listening.clear()
            owners = list(self._owners.values())
            self._owners.clear()
            self._last_confirm = None
        logger.warning("%s: shared holder session lost: %s", self.oracle.description, self.oracle.safe_error(exc))
        try:
            conn.close()
        except Exception:
            pass
        for contender in owners:
            contender.session_lost()

    def release(self, contender: "SharedContender", token: Optional[int], generation: int) -> None:
        """Unlock ``contender``'s key (announcing ``released:<token>`` first if it led), if the
        holder session is still the one of ``generation`` (the one its lock was granted on)."""
        unlocked = False
        try:
            self.execute(_shared_release_sql(contender.channel, token, contender.key), generation=generation)
            unlocked = True
        except SessionChanged:
            pass  # the lock went with its session
        except Exception as exc:
            conn = self.conn
            if conn is not None and not conn.broken:  # the session lives on: unlock it later
                logger.warning("%s: unlock failed (%s); retrying with the next confirmation", contender.name,
                               self.oracle.safe_error(exc))
                with self._lock:
                    self._leaked.add((contender.key, generation))
        finally:
            self.give_up(contender, released=unlocked)

    def confirm(self, since: float, until: Optional[float] = None) -> Tuple[float, frozenset, int]:
        """(start, keys held, generation) of a confirmation of the holder session that started
        at or after ``since`` and at most confirm_interval / 2 ago: one statement confirms every
        term of the session. Announces the terms confirmed for the first time."""
        with self._confirm_lock:
            last = self._last_confirm
            now = clock.monotonic()
            with self._lock:
                fresh = [c for c in self._unannounced if c.term is not None and not c.term.announced]
                self._unannounced.clear()
            if (last is not None and not fresh and last[2] == self.generation and last[0] >= since
                    and now - last[0] <= self.oracle.confirm_interval / 2):
                return last
            with self._lock:
                generation = self.generation
                # Leaked on an older session: gone with it (and the key may be another crown's now).
                leaked = sorted(key for key, of in self._leaked if of == generation)
                self._leaked.clear()
            for term_of in fresh:
                term_of.term.announced = True  # once, even if it fails
            if leaked:
                try:
                    self.execute("; ".join(f"SELECT pg_advisory_unlock({int(key)}::bigint)" for key in leaked), None,
                                 until, generation=generation)
                except Exception:
                    with self._lock:  # still locked, with no owner: the next confirmation retries
                        self._leaked.update((key, generation) for key in leaked)
                    raise
            params = {"channels": [c.channel for c in fresh], "payloads": [f"leading:{c.token}" for c in fresh]}
            started = clock.monotonic()
            row = self.execute(_HELD_SQL, params, until, urgent=True).fetchone()
            generation = self.generation
            self.check(row[0], row[1])
            if row[2]:
                raise StandbyRefused(f"{self.oracle.description} is now a standby (in recovery)")
            result = (started, frozenset(row[3]), generation)
            self._last_confirm = result
            return result

    def announce(self, contender: "SharedContender") -> None:
        """``contender``'s new term is to be announced by the next confirmation."""
        with self._lock:
            self._unannounced.add(contender)

    # -- notifications and the pump -----------------------------------------------------------

    def _dispatch(self, notify: psycopg.Notify) -> None:
        with self._lock:
            members = list(self._members.get(notify.channel, ()))
        for contender in members:
            contender.on_notify(notify)

    def _drain(self, pgconn) -> None:
        """Notifications libpq read behind a statement's result but has not parsed: the socket
        shows nothing more, so the pump would not wake for them."""
        while True:
            raw = pgconn.notifies()
            if raw is None:
                return
            self._dispatch(psycopg.Notify(raw.relname.decode(), raw.extra.decode(), raw.be_pid))

    def read_notifications(self, pgconn) -> None:
        """Read what the server sent to the holder; callers hold io_lock. Raises if broken."""
        pgconn.consume_input()
        self._drain(pgconn)

    def _run(self, stop: threading.Event) -> None:
        try:
            self._pump(stop)
        finally:
            stop.set()  # the polls end with the pump: the next join() starts both anew

    def _pump(self, stop: threading.Event) -> None:
        oracle = self.oracle
        while not stop.is_set():
            now = clock.monotonic()
            # Woken for a contender's wake-up or the next confirmation, whichever is first: polls
            # rarer than the lease must not let idle_session_timeout end the session.
            confirm_due = self._last_statement + oracle.confirm_interval if self.conn is not None else float("inf")
            wait = min(oracle.poll_interval, self._next_wakeup() - now, confirm_due - now)
            self._wait_for_news(max(0.0, wait), stop)
            if stop.is_set():
                return
            self._wake_due()
            now = clock.monotonic()
            conn = self.conn
            if conn is not None and now - self._last_statement >= oracle.confirm_interval:
                try:  # keeps the session (and any lock waiting out a debt) alive
                    self.confirm(now)
                except Exception as exc:
                    logger.debug("%s: shared session confirmation failed: %s", oracle.description,
                                 oracle.safe_error(exc))

    def _wait_for_news(self, timeout: float, stop: threading.Event) -> None:
        conn = self.conn
        if conn is None:
            # stop: this pump's own (a pump started after it has another). No longer than a
            # confirmation: a session opened meanwhile (by a claim) is confirmed in time.
            stop.wait(min(timeout, self.oracle.confirm_interval))
            return
        try:
            if not _readable(conn.pgconn.socket, timeout):
                return
            with self.io_lock:
                if self.conn is conn:
                    self.read_notifications(conn.pgconn)
        except Exception as exc:
            if conn.broken or conn.closed or isinstance(exc, psycopg.OperationalError):
                self._lost(conn, exc)

    def _next_wakeup(self) -> float:
        with self._lock:
            return self._wakeups[0][0] if self._wakeups else float("inf")

    def _wake_due(self) -> None:
        due = []
        with self._lock:
            now = clock.monotonic()
            while self._wakeups and self._wakeups[0][0] <= now:
                due.append(heapq.heappop(self._wakeups)[2])
        for contender in due:
            contender.wake()

    def _run_polls(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self._poll()
            except Exception:  # pragma: no cover - a bug: keep polling, or crash failover stops
                logger.exception("%s: poll failed", self.oracle.description)
            stop.wait(self.oracle.poll_interval)

    def _poll(self) -> None:
        """The followers' crash failover: one statement on the reader for every followed key."""
        with self._lock:
            followed = dict(self._followed)
        if not followed:
            return
        try:
            rows = self.oracle._read(_FREE_SQL, {"keys": sorted(set(followed.values()))})
        except Exception as exc:
            logger.debug("%s: poll failed: %s", self.oracle.description, self.oracle.safe_error(exc))
            return
        free = {row[0] for row in rows}
        for contender, key in followed.items():
            if key in free:
                contender.wake()

    def forget_after_fork(self) -> None:
        _blind(self.conn)
        self.conn = self.session = None
        self._thread = None
        self.io_lock = threading.Lock()
        self._lock = threading.RLock()
        self._connect_lock = threading.Lock()
        self._confirm_lock = threading.Lock()
        self._members.clear()
        self._owners.clear()
        self._followed.clear()
