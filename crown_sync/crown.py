"""The crown engine: contend for a name through an oracle, run a child while leading.

Phases (Elixir Crown's, plus two for Python's explicit lifecycle)::

    init -> claiming -> leading -> finishing -> claiming ...
                    \\-> following -> claiming ...
    any -> finishing -> stopped          (stop())

One daemon thread per crown runs the loop; it is the only thread that calls the oracle's
contender, except ``close()``. It claims (after ``claim_delay``); on a win it starts a term and the
child, and refreshes the term when the oracle says; on a loss it watches the leader (first at once,
then every ``monitor_delay`` while the leader can't be found, giving up after ``monitor_timeout``)
and claims again the moment the oracle signals the leader may be gone. Oracle errors are retried
with tenacity's jittered exponential backoff; nothing an oracle or a callback raises ends the loop.

Safety argument (what keeps two terms of one election from overlapping):

1. The oracle grants a term only while no other term is valid, and gives each term a deadline:
   an instant of :mod:`crown_sync.clock` (CLOCK_BOOTTIME: it counts a host suspend, as the
   server's lease does) measured from the *start* of the call that confirmed the lease,
   minus a margin, before which the oracle cannot hand the crown to anyone else.
2. ``is_leader()`` compares that deadline with the clock itself, so it turns False on time even if
   every crown thread is stuck; ``term.stop_event`` does the same for the child's own checks.
3. The warden (one thread per process) kills the term's child processes when the deadline passes,
   even if the loop thread is blocked in the oracle call that should have renewed it; and process
   children watch the deadline themselves (shared memory), so they stop by it even while this whole
   process is paused by SIGSTOP.
4. On every end of a term the child is stopped and reaped *before* the crown abdicates, so a
   graceful handoff never overlaps.
5. Every term carries the oracle's fencing token, strictly greater than every earlier term's.

What is NOT guaranteed: a thread child cannot be killed, only told (through ``stop_event``); work
already in flight when a deadline passes (a write on the wire, a paused process resumed between
its check and its action) can land after a successor started. Pass ``term.token`` to the resource
you protect and let it reject stale tokens: the token is the last line of defence. Deadlines need
a clock that runs at roughly the same rate as the oracle's; leap jumps of wall time do not
matter, but a host whose clock *rate* is badly off weakens the margin.
"""

import dataclasses
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

import tenacity

from . import _forksafe, _shared, clock, registry, telemetry, warden
from ._options import CrownOptions, check_name
from .callbacks import Callbacks
from .children import as_child
from ._ranking import Ranking
from .oracle import Claim, Leader, Oracle
from .terms import Term
from .urls import redact_text

__all__ = ["Crown", "Status", "PHASES"]

logger = logging.getLogger("crown_sync.crown")

PHASES = ("init", "claiming", "leading", "following", "finishing", "stopped")
# The only moves between phases (any phase but "stopped" may also move to "finishing").
_MOVES = {
    "init": {"claiming", "stopped"},
    "claiming": {"leading", "following"},
    "leading": set(),
    "following": {"claiming", "following"},
    "finishing": {"claiming", "following", "stopped"},
    "stopped": set(),
}
_monotonic = clock.monotonic


@dataclasses.dataclass(frozen=True)
class Status:
    """A consistent snapshot of one crown."""

    name: str
    phase: str
    is_leader: bool
    identity: str
    leader: Optional[Leader]
    token: Optional[int]
    child_alive: bool
    oracle: str
    last_error: Optional[str]
    #: What the oracle says it cannot protect this election against (an open ACL, planted nodes).
    notices: Tuple[str, ...] = ()


class Crown:
    """Contend for ``name`` through ``oracle``; run ``child`` while leading.

    See :doc:`options` for every option. ``max_child_restarts`` (an extension) is how
    many times a leader's child that exits by itself is restarted in place within one term before
    the crown gives up the term (abdicates) so another node can try; None means without limit.
    ``child_backoff`` is the pause between such restarts, and after giving a term up that way
    the crown waits ``monitor_delay`` before contending again.

    ``on_elected(term)``, ``on_deposed(term, reason)``, ``on_new_leader(leader)`` and
    ``on_campaign(status)`` are called from the crown's loop thread when leadership changes (see
    :mod:`crown_sync.callbacks`); an exception in one is logged and the crown goes on.
    """

    def __init__(
        self,
        name: str,
        oracle=None,
        child=None,
        follower_child=None,
        claim_delay: float = 0.0,
        monitor_delay: float = 5.0,
        monitor_timeout: float = 30.0,
        monitor_leader: bool = True,
        identity: Optional[str] = None,
        metadata: Optional[Dict[str, Any]] = None,
        max_child_restarts: Optional[int] = 0,
        child_backoff: float = 1.0,
        on_elected: Optional[Callable[[Term], None]] = None,
        on_deposed: Optional[Callable[[Term, str], None]] = None,
        on_new_leader: Optional[Callable[[Optional[Leader]], None]] = None,
        on_campaign: Optional[Callable[["Status"], None]] = None,
        backoff: Optional[Callable[..., float]] = None,
        priority: int = 0, strategy: Any = "first", preempt_interval: float = 2.0,
    ):
        check_name(name)
        self._callbacks = Callbacks(name, on_elected=on_elected, on_deposed=on_deposed,
                                    on_new_leader=on_new_leader, on_campaign=on_campaign)
        options = CrownOptions.check(claim_delay, monitor_delay, monitor_timeout, monitor_leader, identity,
                                     metadata, max_child_restarts, child_backoff, backoff)
        self.name = name
        self.identity = options.identity
        self.metadata = options.metadata
        self.claim_delay = options.claim_delay
        self.monitor_delay = options.monitor_delay
        self.monitor_timeout = options.monitor_timeout
        self.monitor_leader = options.monitor_leader
        self.max_child_restarts = options.max_child_restarts
        self.child_backoff = options.child_backoff
        self._backoff = options.backoff
        self._children = _Children(self, child, follower_child)
        self._seat = _OracleSeat(self, oracle, Ranking.check(priority, strategy, preempt_interval))
        try:  # what the oracle would refuse (a record too big to publish) fails here, not in the loop
            self._seat.oracle.check_contender(name, self.identity, self.metadata)
        except BaseException:
            self._seat.close_oracle()
            raise

        self._cond = threading.Condition(threading.RLock())
        self._phase = "init"
        self._term: Optional[Term] = None
        self._leader: Optional[Leader] = None
        self._changed = False  # the oracle asked us to look (on_change)
        self._lost_signal = False  # the oracle said our leadership is gone (on_change(lost=True))
        self._child_exited = False
        self._stopping = False
        self._started = False
        self._forked = False
        self._pid = os.getpid()  # fork safety that needs no at-fork hook (uWSGI forks from C)
        self._thread: Optional[threading.Thread] = None
        self._terms_started = 0  # so a waiter sees a term that began and ended while it slept
        self._announced: Optional[Leader] = None  # the leader last given to on_new_leader
        _forksafe.track(self)

    # ----------------------------------------------------------------------------- public API

    def start(self) -> "Crown":
        """Start contending in a daemon thread. Never blocks on the oracle. Idempotent."""
        if "uwsgi" in sys.modules:  # a process uWSGI forks from C: refuse what would leak into workers
            from .uwsgi import check_fork_safety
            check_fork_safety("Crown.start()")
        self._inherited()
        with self._cond:
            if self._started or self._forked:
                return self
            self._started = True
            self._thread = threading.Thread(target=self._run, name=f"crown-sync:{self.name}", daemon=True)
        registry.register(self)
        warden.start()
        self._thread.start()
        return self

    def stop(self, timeout: Optional[float] = None) -> "Crown":
        """Stop the child, abdicate, close. Idempotent; safe from any thread (even the child's).

        Waits up to ``timeout`` seconds (None: until done) for that to finish.
        """
        self._inherited()
        with self._cond:
            if self._forked:
                return self  # inherited across fork(): nothing here is ours to release
            if not self._started:
                self._started = self._stopping = True
                self._set_phase("stopped")
                self._seat.close_oracle()
                self._cond.notify_all()
                return self
            first = not self._stopping
            self._stopping = True
            if self._term is not None:
                self._term.end()  # the child sees stop_event now, before the loop gets to it
            self._cond.notify_all()
        if first:
            _emit(self, "crown.process.terminating", reason="stop")
        current = threading.current_thread()
        with self._cond:
            # A thread child that calls stop() must not wait for the loop, which waits for it.
            child_threads = self._children.threads()
        if self._thread is not None and current is not self._thread and current not in child_threads:
            self._thread.join(timeout)
        return self

    def is_leader(self) -> bool:
        """True while this crown holds a term whose deadline has not passed. No I/O, no lock."""
        term = self._term
        return term is not None and not self._inherited() and term.is_leader()

    def term(self) -> Optional[Term]:
        """The current term (token, exact monotonic ``deadline``, ``stop_event``), or None."""
        term = self._term
        return term if term is not None and not self._inherited() and term.is_leader() else None

    def leader(self) -> Optional[Leader]:
        """The current leader as last known to this crown (ourselves while leading)."""
        return self._leader

    def status(self) -> Status:
        self._inherited()  # before the lock: a fork may have copied it held
        with self._cond:
            term = self._term
            leading = term is not None and term.is_leader()  # once: the deadline may pass meanwhile
            runs = self._children.runs(leading=term is not None)
            return Status(
                name=self.name,
                phase=self._phase,
                is_leader=leading,
                identity=self.identity,
                leader=self._leader,
                token=term.token if leading else None,
                child_alive=any(run is not None and run.alive() for run in runs),
                oracle=self._seat.description,
                last_error=self._seat.last_error, notices=self._seat.notices,
            )

    def wait_for_leadership(self, timeout: Optional[float] = None) -> bool:
        """Block until this crown leads, it stops, or ``timeout`` passes.

        True if a term started during the wait, even one that has already ended (a child that
        returns at once: the term can start and end before this thread gets to look).
        """
        self._inherited()
        with self._cond:
            terms = self._terms_started
            self._cond.wait_for(
                lambda: self._terms_started > terms or self.is_leader() or self._phase == "stopped",
                timeout,
            )
            return self._terms_started > terms or self.is_leader()

    def add_callbacks(self, **callbacks: Optional[Callable[..., Any]]) -> "Crown":
        """Add ``on_elected``, ``on_deposed``, ``on_new_leader`` or ``on_campaign`` callbacks
        (see :mod:`crown_sync.callbacks`), e.g. an integration's to a crown it did not construct.
        They run after those given earlier, from the next event on. A TypeError names a bad one."""
        self._callbacks.add(**callbacks)
        return self

    @property
    def phase(self) -> str:
        return self._phase

    @property
    def oracle(self) -> Oracle:
        return self._seat.oracle

    def __enter__(self) -> "Crown":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Crown {self.name} {self._phase} identity={self.identity} oracle={self._seat.description}>"

    # ---------------------------------------------------------------------------- the loop

    def _run(self) -> None:
        try:
            _emit(self, "crown.process.initialized")
            self._seat.contender = self._seat.retry("contender", self._stopping_now, self._seat.new_contender)
            if self._seat.contender is not None:
                self._children.start_follower()
                if self.claim_delay:
                    self._wait(self.claim_delay, self._stopping_now)
                backoff = 0.0
                while not self._stopping:
                    if backoff:
                        self._set_phase("following")
                        self._wait(backoff, self._stopping_now)
                        if self._stopping:
                            break
                    self._callbacks.call("on_campaign", self.status())
                    claim = self._claim()
                    if claim is None:
                        break
                    backoff = self._lead(claim) if claim.won else self._follow(claim)
        except BaseException:  # never expected; the loop must not die silently
            logger.exception("crown %s: loop failed", self.name)
        finally:
            self._finish()

    def _claim(self) -> Optional[Claim]:
        self._set_phase("claiming")
        with self._cond:
            self._lost_signal = False
            self._changed = False
        claim = self._seat.retry("claim", self._stopping_now, self._seat.contender.claim)
        if claim is not None:
            self._seat.clear_error()
        return claim

    def _lead(self, claim: Claim) -> float:
        """Hold one term. Returns how long to wait before contending again."""
        self._children.stop("follower")
        term = Term(self.name, self.identity, claim.token, claim.deadline, fds=claim.fds)
        leader = claim.leader or Leader(self.identity, dict(self.metadata), claim.token, time.time())
        with self._cond:
            self._term = term
            self._leader = leader
            self._child_exited = False
            if self._lost_signal or self._stopping:
                term.end()
            self._set_phase("leading")
            self._terms_started += 1
            self._cond.notify_all()
        _emit(self, "crown.leadership.claimed", token=term.token, deadline_in=_seconds(term.remaining()))
        restarts = 0
        if not term.ended:
            self._children.start_leader(term, restarts)
        # After the child starts (waking the warden's thread would compete with it for the CPU);
        # a deadline already past fires at once, and the child checks its own deadline anyway.
        warden.watch(term, self._children.on_deadline)
        self._announce_leader()
        self._callbacks.call("on_elected", term)  # for every term, so on_deposed always pairs
        next_refresh = _next_refresh(term, claim.refresh_in)

        reason, lost, backoff = "stop", False, 0.0
        while True:
            child_exited, lost_signal = self._await_event(term, next_refresh)
            if self._stopping:
                reason = "stop"
                break
            if term.ended:
                reason, lost = ("oracle" if lost_signal else "deadline"), True
                break
            if child_exited:
                restarts = self._restart_child(term, restarts)
                if restarts is not None:
                    continue
                reason, backoff = "child_exited", self.monitor_delay
                break
            refreshed = self._refresh(term)
            if refreshed is None:
                continue  # interrupted; the checks above decide
            if not refreshed.won:
                reason, lost, backoff = refreshed.reason or "refresh", refreshed.reason is None, refreshed.yield_for
                break
            if not term.extend(refreshed.deadline):
                continue  # the deadline passed while the refresh was under way: the term is over
            run = self._children.leader_run
            if run is not None:
                run.extend(refreshed.deadline)
            if refreshed.leader is not None:
                self._leader = refreshed.leader
                self._announce_leader()
            _emit(self, "crown.leadership.refreshed", token=term.token, deadline_in=_seconds(term.remaining()))
            next_refresh = _next_refresh(term, refreshed.refresh_in)
        self._end_term(term, reason, lost)
        return backoff

    def _await_event(self, term: Term, next_refresh: Optional[float]):
        """Sleep until something needs the leader's attention. Returns (child exited, lost signal)."""
        with self._cond:
            while not (self._stopping or term.ended or self._child_exited or self._changed
                       or (next_refresh is not None and _monotonic() >= next_refresh)):
                timeouts = [term.remaining()]
                if next_refresh is not None:
                    timeouts.append(next_refresh - _monotonic())
                timeout = min(timeouts)
                self._cond.wait(None if timeout == float("inf") else max(0.0, timeout))
            child_exited, self._child_exited = self._child_exited, False
            self._changed = False
            return child_exited, self._lost_signal

    def _restart_child(self, term: Term, restarts: int) -> Optional[int]:
        """The leader's child ended by itself: restart it in place (returns the new count), or
        None when ``max_child_restarts`` is used up and the term must end."""
        exitcode = getattr(self._children.leader_run, "exitcode", None)
        _emit(self, "crown.child.exited", kind="leader", exitcode=exitcode, token=term.token)
        if self.max_child_restarts is not None and restarts >= self.max_child_restarts:
            with self._cond:
                self._children.leader_run = None  # reported as exited, not to be reported as stopped
            return None
        restarts += 1
        self._wait(self.child_backoff, lambda: self._stopping or term.ended)
        if not (self._stopping or term.ended):
            self._children.start_leader(term, restarts)
        return restarts

    def _refresh(self, term: Term) -> Optional[Claim]:
        interrupted = lambda: self._stopping or term.ended or self._child_exited  # noqa: E731
        claim = self._seat.retry("refresh", interrupted, self._seat.contender.refresh, max_wait=1.0)
        if claim is not None:
            self._seat.clear_error()
        return claim

    def _end_term(self, term: Term, reason: str, lost: bool) -> None:
        self._set_phase("finishing")
        with self._cond:
            term.end()
            self._cond.notify_all()
        self._children.stop("leader", token=term.token)
        if lost:
            _emit(self, "crown.leadership.lost", token=term.token, reason=reason)
        try:  # after the child is gone, never before: otherwise two children could overlap
            self._seat.contender.abdicate()
        except Exception as exc:
            self._seat.record_error("abdicate", exc)
        with self._cond:
            self._term = None
            if self._leader is not None and self._leader.identity == self.identity:
                self._leader = None
            self._cond.notify_all()
        if not lost:
            _emit(self, "crown.leadership.abdicated", token=term.token, reason=reason)
        self._callbacks.call("on_deposed", term, reason)
        self._announce_leader()
        if not self._stopping:
            self._children.start_follower()

    def _follow(self, claim: Claim) -> float:
        with self._cond:
            self._leader = claim.leader
        self._set_phase("following")
        _emit(self, "crown.leadership.rejected")
        self._announce_leader()
        self._children.start_follower()
        if not self.monitor_leader:
            self._wait(self.monitor_delay, self._stopping_now)
            return 0.0
        give_up = _monotonic() + self.monitor_timeout
        while not self._stopping:
            with self._cond:
                self._changed = False
            try:
                watching = self._seat.contender.watch(self._leader)
            except Exception as exc:
                self._seat.record_error("watch", exc)
                _emit(self, "crown.monitor.failed", error=self._seat.last_error)
                if _monotonic() >= give_up:
                    _emit(self, "crown.monitor.timeout")
                    return 0.0
                self._wait(min(self.monitor_delay, max(0.0, give_up - _monotonic())), self._stopping_now)
                continue
            if not watching:
                _emit(self, "crown.monitor.leader_down")
                return 0.0
            _emit(self, "crown.monitor.started")
            changed = self._wait(self.monitor_timeout, lambda: self._stopping or self._changed)
            if self._stopping:
                return 0.0
            _emit(self, "crown.monitor.leader_down" if changed else "crown.monitor.timeout")
            return 0.0
        return 0.0

    def _finish(self) -> None:
        with self._cond:
            term = self._term
        if term is not None:  # only if the loop died mid-term
            self._end_term(term, "stop", False)
        self._children.stop("follower")
        self._set_phase("finishing")
        self._seat.close_contender()
        self._seat.close_oracle()
        registry.unregister(self)
        with self._cond:
            self._set_phase("stopped")
            self._leader = None
        self._announce_leader()
        _emit(self, "crown.process.stopped")

    # ------------------------------------------------------------------ signals from other threads

    def _on_change(self, lost: bool = False) -> None:
        """Called by the oracle from any thread: look now; with lost=True, the term is over."""
        with self._cond:
            if lost:
                self._lost_signal = True
                if self._term is not None:
                    self._term.end()
            self._changed = True
            self._cond.notify_all()

    # ---------------------------------------------------------------------------- helpers

    def _stopping_now(self) -> bool:
        return self._stopping

    def _wait(self, seconds: float, predicate) -> bool:
        """Wait up to ``seconds`` for ``predicate()`` (re-checked on every notify)."""
        with self._cond:
            return bool(self._cond.wait_for(predicate, seconds))

    def _announce_leader(self) -> None:
        """on_new_leader, if the leader (identity and token) differs from the one last told."""
        leader, told = self._leader, self._announced
        if _leader_key(leader) != _leader_key(told):
            self._announced = leader
            self._callbacks.call("on_new_leader", leader)

    def _set_phase(self, phase: str) -> None:
        """Move to ``phase``: only along _MOVES (a bug shows at once, and ends the loop safely)."""
        with self._cond:
            current = self._phase
            if phase != current and phase not in _MOVES[current] and not (phase == "finishing" and current != "stopped"):
                raise RuntimeError(f"crown {self.name}: no move from {current} to {phase}")
            self._phase = phase
            self._cond.notify_all()

    def _inherited(self) -> bool:
        """True in a process forked from the one that made this crown, at-fork hook run or not."""
        if not self._forked and self._pid != os.getpid():
            self._after_fork_in_child()
        return self._forked

    def _after_fork_in_child(self) -> None:
        # Everything this object holds belongs to the parent: forget it without releasing it.
        self._forked = True
        self._term = None
        self._cond = threading.Condition(threading.RLock())
        self._phase = "stopped"


def _next_refresh(term: Term, refresh_in: Optional[float]) -> Optional[float]:
    """When to refresh: as the oracle asks, but by half the time left at the latest, since the
    oracle's interval was counted from the start of its call and the crown has spent some of it
    since (starting the child, stopping a follower child) and a failed refresh needs a retry."""
    if refresh_in is None:
        return None
    return _monotonic() + min(refresh_in, max(0.0, term.remaining() / 2))


def _emit(crown: Crown, event: str, **extra) -> None:
    """Tell telemetry (the observation surface) what ``crown`` just did."""
    leader = crown._leader
    metadata = {
        "name": crown.name,
        "identity": crown.identity,
        "phase": crown._phase,
        "oracle": crown._seat.description,
        "leader": leader.identity if leader is not None else None,
    }
    metadata.update(extra)
    telemetry.emit(event, metadata)


def _leader_key(leader: Optional[Leader]):
    return None if leader is None else (leader.identity, leader.token)


def _seconds(value: float) -> Optional[float]:
    return None if value == float("inf") else round(value, 3)


class _Children:
    """A crown's two children: the leader's (one per term, restarted in place) and the follower's.

    Every run is stored under the crown's lock as it starts, so that a child that calls
    ``stop()`` or exits at once finds itself; runs being stopped still count as alive for
    ``status()``.
    """

    def __init__(self, crown: "Crown", child, follower_child):
        self.crown = crown
        self.child = as_child(child, argument="child")
        self.follower_child = as_child(follower_child, argument="follower_child")
        self.leader_run = None
        self.follower_run = None
        self.follower_term: Optional[Term] = None
        self.stopping: list = []  # runs being stopped

    def runs(self, leading: bool) -> list:
        return [self.leader_run if leading else self.follower_run, *self.stopping]

    def threads(self) -> list:
        return [getattr(run, "thread", None) for run in (self.leader_run, self.follower_run, *self.stopping)]

    def start_leader(self, term: Term, restarts: int) -> None:
        crown = self.crown
        if self.child is None:
            return
        with crown._cond:
            try:
                run = self.child.start(term, self._on_leader_exit)
            except Exception as exc:
                logger.exception("crown %s: starting the child failed", crown.name)
                crown._seat.record_error("child", exc)
                self.leader_run = None
                crown._child_exited = True
                crown._cond.notify_all()
                return
            self.leader_run = run
            if not run.alive():  # it ended before we stored it: its on_exit was not recognised
                crown._child_exited = True
                crown._cond.notify_all()
        _emit(crown, "crown.child.started", kind="leader", pid=run.pid, restarts=restarts, token=term.token)

    def start_follower(self) -> None:
        crown = self.crown
        if self.follower_child is None or crown._stopping:
            return
        with crown._cond:
            if self.follower_run is not None and self.follower_run.alive():
                return
            term = Term(crown.name, crown.identity, None, None, leading=False)
            try:
                run = self.follower_child.start(term, self._on_follower_exit)
            except Exception as exc:
                logger.exception("crown %s: starting the follower child failed", crown.name)
                crown._seat.record_error("follower_child", exc)
                return
            self.follower_run = run
            self.follower_term = term
        _emit(crown, "crown.child.started", kind="follower", pid=run.pid, restarts=0)

    def stop(self, kind: str, **extra) -> None:
        """Stop the leader's or the follower's run (if any) and wait until it is gone."""
        crown = self.crown
        attribute = "leader_run" if kind == "leader" else "follower_run"
        with crown._cond:
            run = getattr(self, attribute)
            setattr(self, attribute, None)
            if run is None:
                return
            if kind == "follower":
                self.follower_term.end()
            self.stopping.append(run)
        try:
            run.stop()
        finally:
            with crown._cond:
                self.stopping.remove(run)
        _emit(crown, "crown.child.stopped", kind=kind, exitcode=run.exitcode, **extra)

    def on_deadline(self, term: Term) -> None:
        """The warden: the term's deadline passed while it was still on. Kill, don't ask."""
        crown = self.crown
        with crown._cond:
            run = self.leader_run if term is crown._term else None
            term.end()
            crown._cond.notify_all()
        if run is not None:
            run.kill()
        logger.warning("crown %s: term %s passed its deadline before it was renewed", crown.name, term.token)

    def _on_leader_exit(self, run) -> None:
        crown = self.crown
        with crown._cond:
            if run is self.leader_run and crown._term is not None and not crown._term.ended:
                crown._child_exited = True
                crown._cond.notify_all()

    def _on_follower_exit(self, run) -> None:
        crown = self.crown
        with crown._cond:
            mine = run is self.follower_run
        if mine and not crown._stopping:
            _emit(crown, "crown.child.exited", kind="follower", exitcode=run.exitcode)


class _OracleSeat:
    """A crown's side of its oracle: the oracle (from a URL or the default: the process's shared
    one, released with the crown, see :mod:`._shared`), the contender, the last error, and the
    retries of failed calls."""

    def __init__(self, crown: "Crown", oracle, ranking: Ranking):
        self.crown = crown
        self.ranking = ranking  # priority and strategy (see _ranking)
        self.shared_key = None  # set while this crown holds a reference to a shared oracle
        if oracle is None or isinstance(oracle, str):
            self.shared_key, self.oracle = _shared.acquire(oracle)
        elif isinstance(oracle, Oracle):
            self.oracle = oracle  # the user's: never closed by the crown
        else:
            raise TypeError(f"oracle must be an Oracle, an oracle URL or None, got {type(oracle).__name__}")
        try:  # a strategy this oracle cannot serve fails at construction, naming the option
            ranking.check_oracle(self.oracle)
        except BaseException:
            self.close_oracle()
            raise
        self.description = redact_text(getattr(self.oracle, "description", "") or repr(self.oracle))
        self.contender = None
        self.last_error: Optional[str] = None
        self.notices: Tuple[str, ...] = ()

    def new_contender(self):
        """The crown's contender (no I/O), ranked when its strategy is not "first"."""
        crown = self.crown
        contender = self.oracle.contender(crown.name, crown.identity, dict(crown.metadata), crown._on_change)
        return self.ranking.wrap(self.oracle, contender, crown.name, crown.identity, crown._on_change)

    def retry(self, operation: str, interrupted, call, max_wait: Optional[float] = None):
        """Call the oracle, retrying errors with backoff until it works or ``interrupted()``.

        Returns the result, or None if interrupted.
        """
        crown = self.crown
        ceiling = max_wait if max_wait is not None else max(0.1, min(crown.monitor_delay, 5.0))
        wait = tenacity.wait_random_exponential(multiplier=0.05, min=0.01, max=ceiling)  # full jitter
        if max_wait is None and crown._backoff is not None:
            wait = crown._backoff  # campaign retries only: a refresh races the term's deadline
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(Exception),
            wait=wait,
            stop=lambda state: interrupted(),
            sleep=lambda seconds: crown._wait(seconds, interrupted),
            before_sleep=lambda state: self.record_error(operation, state.outcome.exception()),
            reraise=False,
        )
        if interrupted():
            return None
        try:
            result = retrying(call)
        except tenacity.RetryError as exc:
            error = exc.last_attempt.exception()
            if error is not None:
                self.record_error(operation, error)
            return None
        self.say_notices()
        return result

    def say_notices(self) -> None:
        """Keep the oracle's notices about this election (``oracle.notices(name)``, if it has
        them) for status(), and emit each new one once."""
        crown, notices = self.crown, getattr(self.oracle, "notices", None)
        try:
            said = tuple(redact_text(str(text)) for text in notices(crown.name)) if callable(notices) else ()
        except Exception:  # an oracle's notices must never end a term: keep the last ones
            logger.exception("%r: the oracle's notices() failed", crown.name)
            return
        if said == self.notices:
            return
        with crown._cond:
            new, self.notices = [text for text in said if text not in self.notices], said
        for text in new:
            _emit(crown, "crown.oracle.notice", notice=text)

    def record_error(self, operation: str, exc: BaseException) -> None:
        crown = self.crown
        message = redact_text(f"{operation}: {type(exc).__name__}: {exc}")
        with crown._cond:
            self.last_error = message
        logger.debug("crown %s: %s", crown.name, message)
        _emit(crown, "crown.oracle.error", operation=operation, error=message)

    def clear_error(self) -> None:
        with self.crown._cond:
            self.last_error = None

    def close_contender(self) -> None:
        contender, self.contender = self.contender, None
        if contender is not None:
            try:
                contender.close()
            except Exception as exc:
                self.record_error("close", exc)

    def close_oracle(self) -> None:
        key, self.shared_key = self.shared_key, None  # one release per crown, however often called
        if key is not None:
            try:
                _shared.release(key, self.oracle)  # closes it only with its last crown
            except Exception as exc:
                logger.warning("crown %s: closing the oracle failed: %s", self.crown.name, redact_text(str(exc)))
