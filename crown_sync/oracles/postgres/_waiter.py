"""A follower's waiter thread: blocking lock waits on the contender's session (the server wakes
the first waiter the instant the lock is free), the takeover once granted, and what it obtained
for the next claim() (see *How it works* and *Takeover* in the package docstring)."""

import collections
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

import psycopg
import psycopg.errors

from ... import clock
from ...oracle import Claim, Leader
from .._base import Phase
from ._common import _Baseline, _Holder, _readable, _shutdown, logger
from ._sql import _BETWEEN_WAITS_SQL, _WAIT_IN_LINE_SQL, _WAIT_SQL

if TYPE_CHECKING:  # pragma: no cover
    from ._contender import PostgresContender

# What a read between two waits saw of the lock's waiters: is the lock unattended (nobody waits for
# it, nor will soon), and does a session that waits for it hold the election's line (see _line)?
_Seen = collections.namedtuple("_Seen", "unattended first_waits")


class Waiter:
    """The contender's waiter thread (one at a time) and its outcome: ``granted`` (token, since)
    once the server gave us the lock, ``prepared`` (the term's first Claim, if ready), or
    ``error``. The thread waits, takes over, and, once leading, stays on as the term's socket
    watcher. It also runs the wait of a claim that won the lock but owes a lease (owe())."""

    def __init__(self, contender: "PostgresContender"):
        self.contender = contender
        self.thread: Optional[threading.Thread] = None
        self.stopping = False  # stop() asked: the thread and the proof helpers give up
        self.wakeup = threading.Event()  # set by stop(): cuts short the helpers' sleeps
        self.granted: Optional[Tuple[int, float]] = None
        self.prepared: Optional[Claim] = None
        self.error: Optional[BaseException] = None
        self.in_wait = False  # inside the wait statement: only then may stop() cancel it
        self.foreign_seen: Optional[int] = None  # the foreign holder's pid we warned of (follow)

    def ready(self) -> None:
        """Clear a previous stop (the caller holds the contender's lock)."""
        self.stopping = False
        self.wakeup.clear()

    def forget(self) -> None:
        """Drop the thread and what it obtained (the caller holds the contender's lock)."""
        self.thread = None
        self.granted = None
        self.prepared = None
        self.error = None

    def start(self, target: Callable[[], None], kind: str) -> None:
        with self.contender._lock:
            self.ready()
            self.forget()
            self.thread = threading.Thread(target=target, name=f"crown-sync-pg-{kind}:{self.contender.name}",
                                           daemon=True)
            self.thread.start()

    def waiting(self) -> bool:
        """Alive and still queued: nothing granted, no error."""
        with self.contender._lock:
            return self.granted is None and self.error is None

    def failed(self, exc: BaseException) -> None:
        """Report ``exc`` to the next claim() and wake the engine."""
        with self.contender._lock:
            self.error = exc
        self.contender._notify()

    def loop(self) -> None:
        """Wait for our turn in the election's line (see _line), then for the lock: blocking
        waits, each bounded by lock_timeout, until granted, stopped or broken; then take over."""
        contender = self.contender
        line = contender._line
        granted = None
        try:
            while granted is None and not self.stopping and line.enter(self):
                granted = self._wait_for_lock(line)
        except Exception as exc:
            granted = None
            if not self.stopping:
                logger.debug("%s: lock wait failed: %s", contender.name, contender.oracle.safe_error(exc))
                self.failed(exc)
        finally:
            line.leave()  # nothing to do once granted: the wait statement let go of the line
        if granted is not None:
            self._take_over(*granted)

    def _wait_for_lock(self, line) -> Optional[tuple]:
        """Our lock waits: the grant (what _take_over needs), or None if stopped, or if we wait
        out of turn and the first in line now waits too (back to the line)."""
        contender = self.contender
        params = {"key": contender.key, "msg": contender.name, "channel": contender._channel, **line.params}
        while not self.stopping:
            sql = contender._tag + (_WAIT_IN_LINE_SQL if line.holding else _WAIT_SQL)
            try:
                started, row = self.blocking(sql, dict(params, young=contender._takeover.young()))
            except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
                if self.stopping:
                    return None
                seen = self.refresh_leader(contender._conn)
                if not line.holding and seen is not None and seen.first_waits:
                    return None
                continue
            if row is None:  # stopped
                return None
            line.holding = False  # the statement let go of it (_WAIT_IN_LINE_SQL)
            token, _, since, pid, marker, in_recovery, holder, killed, last, age, _, _, trusted, ours = row[:14]
            contender._check_session(pid, marker, in_recovery)
            baseline = contender._takeover.note(holder, killed, last, trusted, ours)
            return contender._conn, int(token), since, started, baseline, age
        return None

    def blocking(self, query: str, params: Dict[str, Any]) -> Tuple[float, Optional[tuple]]:
        """One blocking lock wait on our session: (the monotonic time it started, its row), or
        (that time, None) if stopped first. The server ends it after lock_timeout; beyond that
        and B it is frozen, and the session is cut (see _in_flight)."""
        contender = self.contender
        conn = contender._conn
        if conn is None or conn.closed:
            raise ConnectionError("connection closed")
        with contender._io_lock:
            started = clock.monotonic()
            if self.stopping:
                return started, None
            self.in_wait = True
            until = started + contender.oracle.wait_timeout + contender._bound
            try:
                with contender._in_flight(conn, until):
                    return started, conn.execute(query, params).fetchone()
            finally:
                self.in_wait = False
                contender._statements += 1

    def _take_over(self, conn: psycopg.Connection, token: int, since: float, started: float,
                   baseline: _Baseline, age: Optional[float]) -> None:
        """The server granted us the lock (in the waiter thread). Lead at once if the predecessor
        released it or certainly did not lose it to ``pg_terminate_backend`` (and the server is
        not younger than a lease); otherwise hold the lock without leading until the
        predecessor's deadline has passed (Takeover.debt, Takeover.wait_out). Then tell the
        engine, with the term ready for claim() to return at once."""
        takeover = self.contender._takeover
        until = takeover.debt(conn, token, baseline, clock.monotonic(), age)
        waited = until > clock.monotonic()
        if waited and not takeover.wait_out(conn, until):
            return
        self._begin_term(conn, token, since, started, waited)

    def owe(self, conn: Optional[psycopg.Connection], token: int, since: float, until: float) -> None:
        """A claim won on a server younger than a lease, or on a new session of a contender
        that was waiting out a predecessor's lease: hold the lock in a waiter thread without
        leading until ``until`` (as a woken follower does), then tell the engine."""
        contender = self.contender
        logger.info("%s: won the lock with token %s; the previous term may run %.3fs more: waiting",
                    contender.name, token, until - clock.monotonic())

        def owe() -> None:
            if contender._takeover.wait_out(conn, until):
                self._begin_term(conn, token, since, until, waited=True)

        self.start(owe, "owe")

    def _begin_term(self, conn: psycopg.Connection, token: int, since: float, started: float,
                    waited: bool) -> None:
        """Make the term the waiter obtained ready for claim(). The wait statement itself proves
        the session: it returned, so the lock was granted after it ``started``, and every way
        the server can end the session counts from a moment after that (see the safety
        arithmetic). So the term's deadline counts from ``started``, and the leader record is
        published by the first refresh, which the claim asks for at once (the engine starts the
        child first). After a wait, or when little of that lease is left, it confirms here
        instead, for a fresh deadline."""
        contender = self.contender
        contender._new_term(token, since)
        deadline = started + contender._bound - contender.oracle.margin
        contender._lease_end = started + contender._bound  # the first refresh's bound
        prepared: Optional[Claim] = None
        # The wait's result proves the session against the server's timeouts, not against a
        # termination since (the admin who killed our predecessor may be killing us too): lead
        # on it only at once, with nothing unread from the server; else confirm first.
        if (not waited and deadline - clock.monotonic() >= contender.oracle.confirm_interval
                and not _unread(conn)):
            leader = contender._me(token, since)
            contender._leader = leader
            prepared = Claim(won=True, leader=leader, token=token, deadline=deadline, refresh_in=0.0)
        else:
            try:
                prepared = contender._confirm()
            except Exception as exc:
                logger.debug("%s: confirming the new term failed: %s", contender.name,
                             contender.oracle.safe_error(exc))
        generation = None
        watch = contender._watch
        with contender._lock:
            self.granted = (token, since)
            self.prepared = prepared
            if prepared is not None and prepared.won and not self.stopping and contender.usable:
                # This thread stays on as the term's socket watcher: starting a thread (which
                # waits for it to run) would sit on the handoff's critical path.
                contender._enter(Phase.LEADING)
                generation = watch.begin()
                watch.thread = threading.current_thread()
        contender._notify()
        if generation is not None:
            watch.watch(conn, generation)

    def follow(self, holder: Optional[_Holder]) -> Optional[Leader]:
        """The Leader that ``holder`` (of the lock we do not have) is; a foreign holder (a session
        of another role, with no leader record we can read) is said once per session, as a
        warning: no crown of this election can lead until it lets go."""
        contender = self.contender
        leader = None if holder is None else contender.oracle.leader_from_row(contender.name, *holder)
        contender.oracle.note_holder(contender.name, leader)
        if leader is not None and leader.metadata.get("foreign") and self.foreign_seen != holder.pid:
            self.foreign_seen = holder.pid
            logger.warning("%s: the election's advisory lock is held by backend pid %s of role %s"
                           " (application %r), not a crown of this role: no crown can lead until it lets go",
                           contender.name, holder.pid, holder.role, holder.app)
        return leader

    def refresh_leader(self, conn: Optional[psycopg.Connection]) -> Optional[_Seen]:
        """Between waits: read who holds the lock; tell the engine if it changed. What the read
        saw of the lock's waiters (see _line), None if it failed."""
        contender = self.contender
        try:
            if conn is None or conn.closed:
                return None
            with contender._io_lock:
                if self.stopping:
                    return None
                try:
                    with contender._in_flight(conn):
                        row = conn.execute(_BETWEEN_WAITS_SQL, {"hi": contender._hi, "lo": contender._lo}).fetchone()
                finally:
                    contender._statements += 1
            contender._check_session(*row[5:8])
        except Exception:
            return None  # the next wait will fail the same way and report it
        holder = _Holder(*row[:5])
        if holder.pid is not None:  # a read like the wait's: its trusted holder's release counts next
            ours = [holder.pid] if holder.trusted else []
            contender._takeover.note(holder.pid, None, holder.query, holder.trusted, ours)
        leader = self.follow(holder)
        old = contender._leader
        if leader is not None and (old is None or (old.identity, old.token) != (leader.identity, leader.token)):
            contender._leader = leader
            contender._notify()
        return _Seen(*row[8:10])

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the waiter thread, cancelling its blocking lock wait (bounded in time).

        A cancel request is sent only while the waiter is inside its wait statement: one that
        arrived late could otherwise cancel our next statement instead.
        """
        waiter = self.thread
        if waiter is None:
            return
        self.stopping = True
        self.wakeup.set()
        if waiter.is_alive() and waiter is not threading.current_thread():
            conn = self.contender._conn
            give_up = clock.monotonic() + timeout
            while waiter.is_alive() and clock.monotonic() < give_up:
                if self.in_wait and conn is not None and not conn.closed:
                    canceller = threading.Thread(target=self._cancel, args=(conn,), daemon=True)
                    canceller.start()
                    canceller.join(max(0.0, min(2.0, give_up - clock.monotonic())))
                waiter.join(max(0.0, min(0.2, give_up - clock.monotonic())))
            if waiter.is_alive():  # the server doesn't answer: cut the session under it
                _shutdown(conn)
                waiter.join(1.0)
        with self.contender._lock:
            self.forget()

    def _cancel(self, conn: psycopg.Connection) -> None:
        contender = self.contender
        try:
            if hasattr(conn, "cancel_safe"):  # psycopg >= 3.2
                conn.cancel_safe(timeout=2.0)
            else:
                conn.cancel()
        except Exception as exc:
            logger.debug("%s: cancel failed: %s", contender.name, contender.oracle.safe_error(exc))


def _unread(conn: psycopg.Connection) -> bool:
    """Has the server sent something not read yet (a goodbye, a notification)?"""
    try:
        return _readable(conn.pgconn.socket, 0)
    except (OSError, ValueError, psycopg.Error):
        return True
