"""A follower's place in its election's line: only the first follower in line LISTENs on the
election's channel and waits for the lock; the others wait for their turn in line, deaf.

PostgreSQL 15 signals every backend that LISTENs in the database at every NOTIFY, whatever the
channel, and a backend blocked in a lock wait has not read the queue, so it is signalled every
time. With every follower listening, each notification of a handoff (the release, the claim)
woke all the queued followers' backends just as the lock was granted to one of them, which then
waited for a CPU behind them (200 followers: 4 to 6 ms per handoff where 1 ms without listeners,
measured on 2 CPUs). So followers first queue for a second advisory lock, the *line*: the
two-integer form of the election's key (the same two halves, a key space of its own; pg_locks
shows it with objsubid 2). Whoever holds it LISTENs and waits for the lock; the wait statement
granted the lock lets go of the line in the same statement, and the next follower takes its
turn. A leader's channel thus has two listeners: the leader and the next in line.

The line carries no safety: the takeover proof is the lock's. It needs the notifications sent
since the baseline it compares with, so the event list restarts whenever we listen again, and a
failed claim's baseline is dropped when we stop listening (a LISTEN may also deliver a few
notifications sent just before it: a contiguous stretch of the channel, which the proof allows).
Should nobody await the lock while we wait in line (the first in line paused or cut off, a
co-tenant or a leader holding the line), the next re-arm of our line wait sees it and waits for
the lock out of turn, listening, until a first in line waits too.
"""

from typing import TYPE_CHECKING, Optional

import psycopg
import psycopg.errors

from ._common import _shutdown, logger
from ._sql import _LEAVE_LINE_SQL, _LINE_SQL, _TRY_LINE_SQL

if TYPE_CHECKING:  # pragma: no cover
    from ._contender import PostgresContender
    from ._waiter import Waiter


def _signed32(half: int) -> int:
    return half - (1 << 32) if half >= 1 << 31 else half


class Line:
    """The contender's session's place in line (``holding``) and whether it LISTENs. A new
    session LISTENs (a claim that fails keeps what it heard for its next claim's proof)."""

    def __init__(self, contender: "PostgresContender"):
        self.contender = contender
        self.params = {"line_hi": _signed32(contender._hi), "line_lo": _signed32(contender._lo),
                       "hi": contender._hi, "lo": contender._lo}
        self.holding = False
        self.listening = True

    def reset(self) -> None:
        """A new session (it LISTENs from the start: open_session)."""
        self.holding = False
        self.listening = True

    def enter(self, waiter: "Waiter") -> bool:
        """Take our turn in line at once if nobody is ahead; else stop listening, wait for our
        turn (blocking waits, each bounded by lock_timeout), then listen again. True when the
        waiter may wait for the lock: our turn came, or nobody awaits the lock. False if
        stopped. A broken session raises."""
        contender = self.contender
        # Our turn at once (nobody else in line): keep listening, without a gap since the
        # claim or read our proof counts from.
        if self._take(_TRY_LINE_SQL):
            if not self.listening:
                self._listen()
            return True
        if self.listening:
            self._command("UNLISTEN " + contender._channel)
            with contender._lock:
                self.listening = False
                # A claim heard from now until we listen again would name another predecessor
                # than what the last failed claim read: that read proves nothing any more.
                contender._takeover.forget()
        while not waiter.stopping:
            try:
                if self._take(_LINE_SQL, waiter):
                    break
                return False  # stopped
            except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
                if waiter.stopping:
                    return False
                seen = waiter.refresh_leader(contender._conn)
                if seen is not None and seen.unattended:
                    logger.debug("%s: nobody waits for the lock: waiting for it out of turn", contender.name)
                    break
        else:
            return False
        self._listen()
        return True

    def _take(self, query: str, waiter: "Optional[Waiter]" = None) -> bool:
        """Take our place in line (``waiter``: a blocking wait, else a try). Note the trusted
        holder of the lock: it just handed the line on, and its release counts if we hear it."""
        contender = self.contender
        conn = contender._conn
        if conn is None or conn.closed:
            raise ConnectionError("connection closed")
        if waiter is None:
            row = contender._execute(query, self.params, conn)
        else:
            _, row = waiter.blocking(query, self.params)
            if row is None:
                return False
        turn, pid, marker, in_recovery, holder, trusted = row
        self.holding = self.holding or bool(turn)
        contender._check_session(pid, marker, in_recovery)
        if turn and holder is not None and trusted:
            contender._takeover.trust(holder)
        return bool(turn)

    def listen_if_deaf(self) -> None:
        """Before a claim: listen again if the last waiter left us deaf (its proof, should the
        claim win, needs what is sent from now on). A session that fails here is dropped: the
        claim reconnects."""
        if self.listening or self.contender._conn is None:
            return
        try:
            self._listen()
        except Exception as exc:
            logger.debug("%s: LISTEN failed (%s); reconnecting", self.contender.name,
                         self.contender.oracle.safe_error(exc))
            self.contender._drop_connection()

    def _listen(self) -> None:
        contender = self.contender
        self._command("LISTEN " + contender._channel)
        with contender._lock:
            self.listening = True
            # The proof counts only what was sent after we listened (see Takeover._handed_over).
            contender._events.clear()

    def leave(self) -> None:
        """Give up our place in line (the waiter ends without the lock). If that fails on a
        live session, end the session: a session that leads while it holds the line would keep
        the next follower from queueing for the lock."""
        if not self.holding:
            return
        self.holding = False
        conn = self.contender._conn
        if conn is None or conn.closed:
            return
        try:
            self.contender._execute(_LEAVE_LINE_SQL, self.params, conn)
        except Exception as exc:
            logger.debug("%s: leaving the line failed (%s); closing the session", self.contender.name,
                         self.contender.oracle.safe_error(exc))
            _shutdown(conn)

    def _command(self, statement: str) -> None:
        """LISTEN or UNLISTEN our channel (a name of ours: no parameters), bounded."""
        contender = self.contender
        conn = contender._conn
        if conn is None or conn.closed:
            raise ConnectionError("connection closed")
        with contender._io_lock, contender._in_flight(conn):
            try:
                conn.execute(statement)
            finally:
                contender._statements += 1
