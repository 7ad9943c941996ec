"""SharedContender: one crown's seat at one election in sessions=shared mode (see _shared).

Per election, the rules of a dedicated session hold on the shared holder session: a claim is
``pg_try_advisory_lock`` in _TRY_SQL (the fencing token, ``claimed:<token>``); a term's deadline
is ``B - margin`` after the START of a statement that saw the session hold the key (one statement
confirms every term of the session: SharedSessions.confirm); a term granted without proof of how
its predecessor's ended holds the lock without leading until its debt is paid (_takeover.Takeover,
the same proof: a ``released:`` from the predecessor, or its session's end not by a termination);
a dismissal counts with the term's token, aimed at the holder session's pid; a release NOTIFYs
``released:<token>`` before the unlock of this key alone. Followers do not block on the lock: a
``released:`` on their channel, or the pump's poll finding their key free, wakes them to claim.
"""

import collections
import math
import threading
from typing import TYPE_CHECKING, Any, Dict, Optional

import psycopg

from ... import clock
from ...oracle import Claim, Leader, OnChange
from .._base import ContenderBase, Phase, record_of
from ._common import PostgresOracleError, StandbyRefused, _channel, _encode_record, _key_parts, _Unanswered, logger
from ._contender import _Term
from ._sql import _TRY_SQL, _sender_trusted
from ._takeover import Takeover

if TYPE_CHECKING:  # pragma: no cover
    from ._oracle import PostgresOracle
    from ._shared import SharedSessions


class _Proof:
    """What Takeover's proof helpers ask of a dedicated contender's waiter: a stop flag and an
    event that cuts their sleeps short (close() sets both)."""

    def __init__(self):
        self.stopping = False
        self.wakeup = threading.Event()

    def ready(self) -> None:
        self.stopping = False
        self.wakeup.clear()

    def failed(self, exc: BaseException) -> None:  # only Takeover.wait_out calls it: unused here
        pass

    def stop(self) -> None:
        self.stopping = True
        self.wakeup.set()


class SharedContender(ContenderBase):
    """Phases as PostgresContender's: FOLLOWING, PENDING (holds the key, waits out a debt),
    LEADING, CLOSED or FORKED."""

    oracle: "PostgresOracle"

    def __init__(self, oracle: "PostgresOracle", shared: "SharedSessions", name: str, identity: str,
                 metadata: Dict[str, Any], on_change: OnChange):
        super().__init__(oracle, name, identity, metadata, on_change)
        self.shared = shared
        self.key = oracle.key(name)
        self.hi, self.lo = _key_parts(self.key)
        self._hi, self._lo = self.hi, self.lo  # Takeover's names
        self.channel = _channel(self.key)
        self._tag = f"/* {self.channel} */ "
        self._events: "collections.deque" = collections.deque(maxlen=64)  # (kind, token, pid)
        self._waiting = _Proof()
        self._takeover = Takeover(self)
        self.token: Optional[int] = None
        self._since: Optional[float] = None
        self.term: Optional[_Term] = None
        self.term_started = 0.0
        self.record_comment = ""
        self.lease_end = -math.inf
        self._generation = -1  # the holder session generation our key was granted on
        self._pending: Optional[tuple] = None  # (token, since, until) while waiting out a debt
        self._leader: Optional[Leader] = None
        self._woken = False  # wake() since the last claim began
        shared.join(self)

    # -- what Takeover uses -------------------------------------------------------------------

    @property
    def _backend_pid(self) -> Optional[int]:
        return self.shared.pid

    @property
    def _io_lock(self) -> threading.Lock:
        return self.shared.io_lock

    @property
    def _bound(self) -> float:
        session = self.shared.session
        return session.bound if session is not None else self.oracle.lease

    @property
    def _connected_at(self) -> float:
        return self.shared.connected_at

    @property
    def _counts_terminations(self) -> bool:
        session = self.shared.session
        return bool(session and session.counts_terminations)

    def _read_notifications(self, pgconn) -> None:
        self.shared.read_notifications(pgconn)

    def _execute(self, query: str, params: Dict[str, Any], conn=None, until: Optional[float] = None):
        return self.shared.execute(query, params, until).fetchone()

    # -- what SharedSessions calls ------------------------------------------------------------

    def session_changed(self) -> None:
        """A new holder session: what the old one heard or read proves nothing."""
        with self._lock:
            had_baseline = self._takeover.baseline is not None
            self._events.clear()
            self._takeover.forget()
        if had_baseline and self.phase is Phase.FOLLOWING:
            self.wake()  # claim again to read the holder anew: else its crash finds us without a proof

    def session_lost(self) -> None:
        """The holder session (and our lock, if we held it) is gone."""
        self._pending = None
        self._generation = -1  # nothing of ours to release on the next session (see _release)
        if self.phase is Phase.PENDING:
            self._move(Phase.FOLLOWING)
        if self.phase is Phase.LEADING:
            self._notify(lost=True)

    def wake(self) -> None:
        """Claim now: the key may be free (a release, the poll, a debt paid). Remembered until
        the next claim starts, so that a wake-up during a claim is not lost (see watch())."""
        self._woken = True
        self._notify()

    def on_notify(self, notify: psycopg.Notify) -> None:
        """A notification on our channel (see PostgresContender._on_notify)."""
        kind, _, rest = notify.payload.partition(":")
        if kind == "dismiss":
            term = self.term
            if term is not None and self.phase is Phase.LEADING:
                term.dismiss(rest, self.shared.pid, self.token, notify.pid, self.name)
                if term.dismissed or term.asked_by is not None:
                    self._notify()  # refresh now: it steps down, or asks about the sender
            return
        if kind in ("claimed", "released", "leading") and rest.isdigit():
            with self._lock:
                self._events.append((kind, int(rest), notify.pid))
            if self.phase is not Phase.FOLLOWING:
                return
            if kind == "released":
                self.wake()  # a graceful handoff: claim now
            elif kind == "claimed" and notify.pid != self.shared.pid:
                # A new holder our last failed claim did not see (we do not queue on the lock,
                # so _OURS_ON_KEY never lists us as its successor's rival): claim again, to read
                # it as our baseline, or its crash would find us without a proof.
                baseline = self._takeover.baseline
                if baseline is None or baseline.holder != notify.pid:
                    self.wake()

    # -- claim / refresh ----------------------------------------------------------------------

    def _move(self, phase: Phase) -> None:
        with self._lock:
            if self.usable:
                self._enter(phase)

    def _check_open(self) -> None:
        try:
            super()._check_open()
        except RuntimeError as exc:
            raise PostgresOracleError(str(exc)) from None

    def _check_session(self, pid: int, marker: Optional[str], in_recovery: bool) -> None:
        self.shared.check(pid, marker)
        if in_recovery:
            raise StandbyRefused(f"{self.oracle.description} is now a standby (in recovery)")

    def claim(self) -> Claim:
        self._check_open()
        self._woken = False
        if self._pending is not None:
            return self._pay_debt()
        owner = self.shared.take(self)
        if owner is not None:  # another crown of this process holds or claims the key
            return Claim(won=False, leader=owner._leader if owner.phase is Phase.LEADING else None)
        generation = None
        try:
            generation = self.shared.connected_generation()  # the session our lock would be granted on
            row = self.shared.execute(_TRY_SQL, {"key": self.key, "hi": self.hi, "lo": self.lo, "msg": self.name,
                                                 "channel": self.channel, "young": self._takeover.young()},
                                      generation=generation).fetchone()
            locked, token, _, since, pid, marker, in_recovery, holder_pid, holder_query, age, killed = row[:11]
            if not locked:
                self.shared.give_up(self)
                self._check_session(pid, marker, in_recovery)
                self._takeover.baseline = self._takeover.note(holder_pid, killed, holder_query, row[13], row[14])
                self._leader = self.oracle.leader_from_row(self.name, holder_pid, holder_query, *row[11:14])
                self.oracle.note_holder(self.name, self._leader)
                return Claim(won=False, leader=self._leader)
            self._generation = generation
            self._check_session(pid, marker, in_recovery)
            until = self._takeover.claim_debt(self.shared.conn, int(token), clock.monotonic(), age)
        except Exception as exc:
            self._claim_failed(generation)
            raise self._error(exc) from None
        if until > clock.monotonic():
            self._owe(int(token), since, until)
            return Claim(won=False, leader=None)
        return self._won(int(token), since)

    def _claim_failed(self, generation: Optional[int]) -> None:
        """The claim may have failed after the lock was granted (session locks survive errors):
        unlock our key (a no-op if it was not granted), unless the session is gone anyway."""
        if generation is not None and self.shared.take(self) is None and self.shared.conn is not None:
            self.shared.release(self, None, generation)
        self.shared.give_up(self)

    def _error(self, exc: BaseException) -> Exception:
        if isinstance(exc, (PostgresOracleError, ConnectionError)):
            return exc
        return PostgresOracleError(self.oracle.safe_error(exc))

    def _owe(self, token: int, since: float, until: float) -> None:
        """Hold the lock without leading until ``until`` (the pump keeps the session alive and
        wakes us then)."""
        self._takeover.owed_until = max(self._takeover.owed_until, until)
        self._pending = (token, since, until)
        self._move(Phase.PENDING)
        self.shared.wake_at(until, self)

    def _pay_debt(self) -> Claim:
        token, since, until = self._pending
        if self._generation != self.shared.generation or self.shared.conn is None:
            self._pending = None  # the session that held our lock is gone
            self._move(Phase.FOLLOWING)
            self.shared.give_up(self)
            return Claim(won=False, leader=None)
        if clock.monotonic() < until:
            return Claim(won=False, leader=None)
        self._pending = None
        return self._won(token, since)

    def _won(self, token: int, since: float) -> Claim:
        self.token, self._since = token, since
        record = dict(record_of(self.identity, self.metadata, token, since), v=1, ns=self.oracle.namespace,
                      name=self.name)
        # No election tag (a dedicated session's): SHARED_MARK stands for every term's (_QUIET_SQL).
        self.record_comment = _encode_record(record)
        session = self.shared.session
        if session is not None and len(self.record_comment.encode()) >= session.query_limit // 2:
            record.update(metadata={}, metadata_dropped=True)
            self.record_comment = _encode_record(record)
            logger.warning("%s: leader metadata does not fit track_activity_query_size (%d bytes); published"
                           " without it", self.name, session.query_limit)
        self.term = _Term(self.record_comment)
        self.term_started = clock.monotonic()
        self._move(Phase.LEADING)  # its record goes with the first confirmation, which announces it
        self.shared.announce(self)
        self.shared.follow(self, False)
        try:
            claim = self._confirm()
        except Exception:
            self._release()
            raise
        if not claim.won:
            self._release()
            return claim
        self.oracle.note_holder(self.name, None)
        logger.info("%s: %s leads with token %s (shared session)", self.name, self.identity, token)
        return claim

    def _confirm(self, until: Optional[float] = None) -> Claim:
        term = self.term
        if term is None or self._generation != self.shared.generation:
            return Claim(won=False, leader=None)  # a new session could never hold the old one's lock
        try:
            sender = term.take_ask()
            if sender is not None:  # a dismissal naming no token: is its sender of a trusted role?
                term.judge(sender, self._execute("SELECT true" + _sender_trusted(sender), {}, until=until)[-1],
                           self.name)
            started, held, generation = self.shared.confirm(self.term_started, until)
        except (psycopg.OperationalError, _Unanswered) as exc:
            if self.shared.conn is None:  # the session is gone, and our lock with it
                logger.warning("%s: shared session lost while leading: %s", self.name, self.oracle.safe_error(exc))
                return Claim(won=False, leader=None)
            raise self._error(exc) from None
        except psycopg.Error as exc:
            raise self._error(exc) from None
        if generation != self._generation or f"{self.hi}:{self.lo}" not in held:
            logger.warning("%s: the shared session no longer holds the advisory lock", self.name)
            return Claim(won=False, leader=None)
        if term.dismissed:
            logger.info("%s: dismissed; stepping down", self.name)
            # Stay out a little: no follower is queued on the lock to get it first (they claim
            # when our release's notification wakes them).
            return Claim(won=False, leader=None, yield_for=max(0.1, 2 * self.oracle.poll_interval))
        self._leader = self._me(self.token, self._since)
        self.lease_end = started + self._bound
        return Claim(won=True, leader=self._leader, token=self.token,
                     deadline=started + self._bound - self.oracle.margin, refresh_in=self.oracle.confirm_interval)

    def refresh(self) -> Claim:
        self._check_open()
        if self.phase is not Phase.LEADING or self.term is None:
            return Claim(won=False, leader=None)
        claim = self._confirm(until=self.lease_end)
        if not claim.won:
            # Our key stays locked until abdicate(), after the engine stopped the child: a
            # release now would let a successor lead at once beside it.
            self._move(Phase.FOLLOWING)
        return claim

    # -- follower / abdicate / close ----------------------------------------------------------

    def watch(self, leader: Optional[Leader]) -> bool:
        self._check_open()
        self.shared.follow(self, True)
        return not self._woken  # woken during the claim that failed: claim again at once

    def _release(self) -> None:
        """Let go of our key, if this contender holds it: ``released:<token>`` first when a term
        of ours led (the engine stopped its child before)."""
        with self._lock:
            # A term that began (its child may have run: stopped before abdicate) says so.
            token = self.token if self.term is not None else None
            self.term = None
            self.lease_end = -math.inf
            self._pending = None
            if self.phase in (Phase.LEADING, Phase.PENDING):
                self._enter(Phase.FOLLOWING)
        if self.shared.take(self) is None and self._generation == self.shared.generation:
            self.shared.release(self, token, self._generation)  # refused if the session changed since
        self.shared.give_up(self)

    def abdicate(self) -> None:
        if not self.usable:
            return
        self._release()
        self.token = self._since = None

    def close(self) -> None:
        with self._lock:
            if not self.usable:
                return
            self._waiting.stop()
            was = self.phase
        if was in (Phase.LEADING, Phase.PENDING):
            self._release()
        with self._lock:
            self._enter(Phase.CLOSED)
        self.shared.follow(self, False)
        self.shared.leave(self)

    def _forget_after_fork(self) -> None:
        self._pending = None
