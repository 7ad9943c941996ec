"""The takeover proof: may the term the server just granted us lead at once, or must it first
wait out its predecessor's lease? (See *Takeover* and *Restarts, crashes and failovers* in the
package docstring; every step there is here.)"""

import math
from typing import TYPE_CHECKING, Any, Callable, FrozenSet, Iterable, List, Optional, Tuple

import psycopg

from ... import clock
from .._base import Phase
from ._common import _PROOF_WAIT, PostgresOracleError, _Baseline, _find_record, _readable, logger
from ._sql import _CONFIRM_SQL, _PREDECESSOR_SQL, _QUIET_SQL

if TYPE_CHECKING:  # pragma: no cover
    from ._contender import PostgresContender


class Takeover:
    """One contender's proof helpers and the debt they may leave: the monotonic instant before
    which its child must not start, kept across reconnects (a session that ends while waiting
    out a predecessor's lease leaves the rest to the next claim)."""

    def __init__(self, contender: "PostgresContender"):
        self.contender = contender
        # Our child must not start before this monotonic instant: a predecessor's deadline we
        # waited out and may not have finished waiting (kept across reconnects; see wait_out).
        self.owed_until = -math.inf
        # What the last failed claim on this session saw (its holder, the termination count):
        # the baseline of a later claim's proof (claim_debt).
        self.baseline: Optional[_Baseline] = None
        # The trusted sessions on the lock at this session's previous read (note()).
        self._last_ours: FrozenSet[int] = frozenset()

    def note(self, holder: Optional[int], killed: Optional[int], query: Optional[str], trusted: Optional[bool],
             ours: Optional[Iterable[int]]) -> _Baseline:
        """The baseline a claim, wait or holder read found (see _Baseline). Its trusted senders
        include those of the read before on this session (forget() at connect): a wait that
        began just after the holder released finds the lock free, and its predecessor is the
        holder the failed claim or the read between two waits saw. Not longer: a pid is reused,
        in time, by another session (perhaps of another role)."""
        contender = self.contender
        current = frozenset(ours or ())
        with contender._lock:
            seen, self._last_ours = self._last_ours, current
        # This election's record: a shared holder session's statement carries those of the
        # other terms it leads too, while it may only wait out a debt on this one.
        led = bool(trusted) and _find_record(query, contender.oracle.namespace, contender.name) is not None
        return _Baseline(holder, killed, led, current | seen)

    def forget(self) -> None:
        """A new session, or ours stops listening: what it read before proves nothing (the
        caller holds the lock)."""
        self.baseline = None
        self._last_ours = frozenset()

    def trust(self, pid: int) -> None:
        """A trusted session seen holding the lock by a read between note()s (taking our turn
        in line, see _line): its claims and releases count at our next wait, as note()'s do."""
        with self.contender._lock:
            self._last_ours = self._last_ours | {pid}

    # -- the channel ------------------------------------------------------------------------------

    def read_events_until(self, conn: psycopg.Connection, until: float,
                          match: Callable[[List[Tuple[str, int, int]]], Any],
                          stopped: Callable[[], bool] = lambda: False) -> Any:
        """Read the channel's notifications (commit order) until ``match(events)`` answers
        something other than None, and return that; None once ``until`` passes, ``stopped()``
        says so or the connection fails. What has arrived is read first: notifications usually
        come right behind a statement's result, and must be seen before waiting for more."""
        contender = self.contender
        pgconn = conn.pgconn
        while True:
            try:
                with contender._io_lock:
                    contender._read_notifications(pgconn)
            except Exception:
                return None
            with contender._lock:
                events = list(contender._events)
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

    def await_successor(self, conn: Optional[psycopg.Connection], handoff: Optional[Tuple[int, float]]) -> None:
        """Right after a graceful release to a queued successor, wait (at most
        ``_HANDOFF_LINGER``) until it leads, seen as its ``leading:<token>`` notification (sent
        by its first confirmation, after its child started), before our session ends. Ending a
        session makes its backend process exit, which costs the server milliseconds of CPU, and
        our own process usually exits next; at once, both would compete with the successor's
        claim and its child's start (on the database server, and on a shared host) on the
        handoff's critical path. Nothing waits on this but our own close()."""
        if handoff is None or conn is None or conn.closed:
            return
        released_token, until = handoff
        ours = self.contender._backend_pid
        self.read_events_until(conn, until, lambda events: any(
            kind == "leading" and token > released_token and pid != ours
            for kind, token, pid in events) or None)

    def _handed_over(self, conn: psycopg.Connection, token: int, until: float,
                     baseline: _Baseline) -> Tuple[bool, Optional[int], bool]:
        """How did the term before our claim ``token`` end? (released, predecessor, led): did it
        end with a release; who held the lock (a backend pid, None if unknown); did that session
        lead (announce ``leading:``) rather than hold the lock while waiting out its own
        predecessor. Reads the channel's notifications until our own "claimed" arrives, or
        ``until``. The predecessor is the last claim seen before ours, or, if we saw none, the
        baseline's holder: the session that held the lock when our wait began.

        Any session of the database may NOTIFY anything; the sender's pid is the server's word.
        So a claim, release or announcement counts only from a sender that held or awaited the
        lock when our wait began and is of a trusted role (``baseline.ours``), or from us. A
        last claim from anyone else (a co-tenant's forgery, or a session that took the lock
        between our read and our queueing) leaves the predecessor unknown: no proof, we wait."""
        contender = self.contender
        ours = baseline.ours | {contender._backend_pid}

        def decide(events):
            for index, (kind, event_token, pid) in enumerate(events):
                if kind == "claimed" and event_token == token and pid == contender._backend_pid:
                    before = events[:index]
                    claims = [i for i, e in enumerate(before) if e[0] == "claimed"]
                    if not claims:  # earlier terms had ended when we started listening
                        # Its release, if a trusted session held the lock at our read; if the lock
                        # was free then, the release of the holder a read before saw.
                        senders = ours if baseline.holder is None else ours & {baseline.holder}
                        released = any(e[0] == "released" and e[2] in senders for e in before)
                        # A follower that began listening between the holder's claim and its
                        # first confirmation (see _line) read no record, but hears it lead.
                        led = baseline.led or (baseline.holder in senders and any(
                            e[0] == "leading" and e[2] == baseline.holder for e in before))
                        return released, baseline.holder, led
                    _, last, predecessor = before[claims[-1]]
                    if predecessor not in ours:
                        logger.warning("%s: the last claim before ours came from backend pid %s, not a"
                                       " session of a trusted role seen on the lock: predecessor unknown",
                                       contender.name, predecessor)
                        return False, None, False
                    after = before[claims[-1] + 1:]
                    released = any(e == ("released", last, predecessor) for e in after)
                    led = any(e == ("leading", last, predecessor) for e in after)
                    return released, predecessor, led
            return None

        waiter = contender._waiting
        return self.read_events_until(conn, until, decide, lambda: waiter.stopping) or (False, None, False)

    def _not_terminated(self, conn: psycopg.Connection, predecessor: Optional[int],
                        killed_before: Optional[int], until: float) -> bool:
        """True if the predecessor's session certainly did not end by ``pg_terminate_backend``.

        A backend that exits releases its locks first, then counts its disconnect in
        ``pg_stat_database`` (``sessions_killed`` for a termination; a crashed client counts as
        abandoned), and only then leaves ``pg_stat_activity``. So once the predecessor's pid has
        left pg_stat_activity, an unchanged ``sessions_killed`` (read before our wait and now)
        proves it was not terminated. Any termination in the database meanwhile, a statistics
        reset, ``track_counts = off`` or an unknown predecessor answer False (wait)."""
        contender = self.contender
        if predecessor is None or killed_before is None or not contender._counts_terminations:
            return False
        waiter = contender._waiting
        params = {"pid": predecessor}
        pause = 0.0002
        while not waiter.stopping:
            try:
                present, killed = contender._execute(_PREDECESSOR_SQL, params, conn)
            except Exception:
                return False
            if not present:
                return killed == killed_before
            remaining = until - clock.monotonic()
            if remaining <= 0 or waiter.wakeup.wait(min(remaining, pause)):
                return False
            pause = min(pause * 2, 0.01)  # the exit takes a millisecond or two, unless loaded
        return False

    # -- the debt ---------------------------------------------------------------------------------

    def young(self) -> bool:
        """Is our session younger than a lease? If not, the server's incarnation is not either,
        and no leader of a previous one can still be running its child (_INCARNATION_AGE)."""
        contender = self.contender
        return clock.monotonic() - contender._connected_at < contender._bound

    def _restart_debt(self, age: Optional[float]) -> float:
        """Seconds our child must wait because the server's incarnation began ``age`` seconds
        ago (None: our session is older than a lease, so the incarnation is too). A leader of
        the previous incarnation confirmed at ``t0`` before it ended; its deadline is at most
        ``B - margin`` after ``t0``, so before the incarnation's start plus ``B``, which is ``B
        - age`` after the statement that read ``age`` (and after its result reached us). The
        margin is not subtracted: it absorbs the two hosts' clock rates."""
        return 0.0 if age is None else max(0.0, self.contender._bound - age)

    def debt(self, conn: psycopg.Connection, token: int, baseline: _Baseline,
             granted_at: float, age: Optional[float]) -> float:
        """The monotonic instant before which the child of our term ``token`` (granted at
        ``granted_at``) must not start.

        Without proof of how the predecessor's term ended, its child may run until its
        deadline, which is at most ``B - margin`` after the start of its last confirming
        statement. That statement reached the server before the session was terminated, and the
        termination freed the lock before it was granted to us, before ``granted_at``. So the
        predecessor's deadline has passed ``B`` after ``granted_at`` (the margin absorbs the two
        hosts' clock rates; every contender of an election must have the same lease)."""
        contender = self.contender
        until = max(self.owed_until, granted_at + self._restart_debt(age))
        delay = contender.oracle.takeover_delay
        if delay == 0:  # opted out: lead at once
            return until
        look = granted_at + (_PROOF_WAIT if delay is None else delay)
        if self._proven(conn, token, baseline, look):
            return until
        wait = contender._bound if delay is None else delay
        logger.debug("%s: the predecessor's session may have been terminated under it (or it never"
                     " led): waiting %.3fs", contender.name, wait)
        return max(until, granted_at + wait)

    def _proven(self, conn: psycopg.Connection, token: int, baseline: _Baseline,
                look: float) -> bool:
        """Is there proof, found before the monotonic instant ``look``, that the term before
        ours (``token``) can no longer run its child: a release, or the end of a session that
        led, otherwise than by a termination (``baseline``: what we saw before our claim)?"""
        name = self.contender.name
        released, predecessor, led = self._handed_over(conn, token, look, baseline)
        if released:
            logger.debug("%s: the predecessor released the lock: leading at once", name)
            return True
        # A session that held the lock without leading was waiting out a debt of its own: its
        # end, however it came, proves nothing about its predecessor's child.
        if led and self._not_terminated(conn, predecessor, baseline.killed, look):
            logger.debug("%s: the predecessor's session (backend pid %s) ended, not by"
                         " pg_terminate_backend: leading at once", name, predecessor)
            return True
        return False

    def claim_debt(self, conn: psycopg.Connection, token: int, granted_at: float,
                   age: Optional[float]) -> float:
        """As debt(), for a term won with pg_try_advisory_lock (granted at ``granted_at``): no
        wait of ours was queued when the lock was freed. With a baseline from a failed claim on
        this session (its holder and termination count), the follower's proof applies. Without
        one, or without proof, the predecessor is unknown: _QUIET_SQL tells how long ago a
        termination we cannot see may have ended a term of this election (see *Takeover*), and
        the child waits until ``B`` after that, as after a restart."""
        contender = self.contender
        until = max(self.owed_until, granted_at + self._restart_debt(age))
        delay = contender.oracle.takeover_delay
        if delay == 0:  # opted out: lead at once
            return until
        with contender._lock:
            baseline, self.baseline = self.baseline, None
            if contender.phase is Phase.CLOSED:
                return until  # close() frees the lock anyway
            contender._waiting.ready()  # there is no waiter now; the proof helpers watch its flag
        look = granted_at + (_PROOF_WAIT if delay is None else delay)
        if baseline is not None and self._proven(conn, token, baseline, look):
            return until
        quiet = 0.0  # track_counts off: sessions_killed stays 0 and proves nothing
        if contender._counts_terminations:
            (quiet,) = contender._execute(_QUIET_SQL, {"tag": contender._tag.strip(), "hi": contender._hi,
                                                       "lo": contender._lo}, conn)
        wait = self._restart_debt(quiet)
        if delay is not None:
            wait = min(wait, delay)
        if wait > 0:
            logger.debug("%s: won the lock without a queued wait; a termination %.3fs ago may have"
                         " ended the previous term: waiting %.3fs", contender.name, quiet, wait)
        return max(until, clock.monotonic() + wait)

    def wait_out(self, conn: psycopg.Connection, until: float) -> bool:
        """Hold the lock without leading (the PENDING phase) until the monotonic instant
        ``until``, confirming the session every ``confirm_interval`` so that
        ``idle_session_timeout`` does not end it. False if stopped or the session failed (the
        waiter reports the error and the engine claims again; the debt stays in owed_until, for
        a claim on a new session)."""
        contender = self.contender
        self.owed_until = max(self.owed_until, until)
        with contender._lock:
            if contender.phase is Phase.FOLLOWING:
                contender._enter(Phase.PENDING)
        if self._hold_until(conn, until):
            return True
        with contender._lock:
            if contender.phase is Phase.PENDING:
                contender._enter(Phase.FOLLOWING)
        return False

    def _hold_until(self, conn: psycopg.Connection, until: float) -> bool:
        """wait_out's loop: confirm the session every ``confirm_interval`` until ``until``."""
        contender = self.contender
        waiter = contender._waiting
        params = {"hi": contender._hi, "lo": contender._lo}
        while True:
            remaining = until - clock.monotonic()
            if remaining <= 0:
                return True
            if waiter.wakeup.wait(min(remaining, contender.oracle.confirm_interval)) or waiter.stopping:
                return False  # stopped (close): closing the connection releases the lock
            try:
                pid, marker, held, in_recovery = contender._execute(_CONFIRM_SQL, params, conn)
                contender._check_session(pid, marker, in_recovery)
                if not held:
                    raise PostgresOracleError("our session no longer holds the advisory lock")
            except Exception as exc:
                logger.debug("%s: waiting out the predecessor's lease failed: %s", contender.name,
                             contender.oracle.safe_error(exc))
                waiter.failed(exc)
                return False
