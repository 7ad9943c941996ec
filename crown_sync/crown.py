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
import json
import logging
import os
import re
import secrets
import socket
import sys
import threading
import time
from typing import Any, Callable, Dict, Optional

import tenacity

from . import clock, registry, telemetry, warden
from .callbacks import Callbacks
from .children import as_child
from .oracle import Claim, Leader, Oracle
from .terms import Term
from .urls import default_oracle, oracle_from_url, redact_text

__all__ = ["Crown", "Status", "PHASES"]

logger = logging.getLogger("crown_sync.crown")

PHASES = ("init", "claiming", "leading", "following", "finishing", "stopped")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
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


def check_name(name: Any, option: str = "name") -> str:
    """``name`` if it is a valid election name; else TypeError/ValueError naming ``option``.

    Names become file names, keys and node paths in the oracles, so nothing else is accepted.
    """
    if not isinstance(name, str):
        raise TypeError(f"{option} must be a str, got {type(name).__name__}")
    if not _NAME.fullmatch(name) or name in (".", ".."):
        # '.' and '..' are path elements: no file or node can be named after them
        raise ValueError(f"{option} must be 1-128 characters of [A-Za-z0-9._-] (not '.' or '..'), got {name!r}")
    return name


def _default_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def _number(option: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{option} must be a number of seconds, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{option} must be finite, got {value}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{option} must be {'> 0' if positive else '>= 0'}, got {value}")
    if value > threading.TIMEOUT_MAX:  # a longer wait would make every wait() raise OverflowError
        raise ValueError(f"{option} must be at most {threading.TIMEOUT_MAX:g} seconds, got {value}")
    return value


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
        backoff: Optional[Callable[..., float]] = None,
        on_elected: Optional[Callable[[Term], None]] = None,
        on_deposed: Optional[Callable[[Term, str], None]] = None,
        on_new_leader: Optional[Callable[[Optional[Leader]], None]] = None,
        on_campaign: Optional[Callable[["Status"], None]] = None,
    ):
        check_name(name)
        self._callbacks = Callbacks(name, on_elected=on_elected, on_deposed=on_deposed,
                                    on_new_leader=on_new_leader, on_campaign=on_campaign)
        self.claim_delay = _number("claim_delay", claim_delay, positive=False)
        self.monitor_delay = _number("monitor_delay", monitor_delay, positive=True)
        self.monitor_timeout = _number("monitor_timeout", monitor_timeout, positive=True)
        if self.monitor_timeout < self.monitor_delay:
            raise ValueError(
                f"monitor_timeout ({self.monitor_timeout}) must be >= monitor_delay "
                f"({self.monitor_delay}): the crown retries finding the leader every monitor_delay "
                f"until monitor_timeout"
            )
        if not isinstance(monitor_leader, bool):
            raise TypeError(f"monitor_leader must be a bool, got {type(monitor_leader).__name__}")
        if identity is None:
            identity = _default_identity()
        elif not isinstance(identity, str):
            raise TypeError(f"identity must be a str, got {type(identity).__name__}")
        elif not identity or len(identity) > 255 or not identity.isprintable():
            raise ValueError("identity must be 1-255 printable characters")
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        try:
            metadata = json.loads(json.dumps(metadata))  # a private, JSON-clean copy
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metadata must be JSON-serialisable: {exc}") from None
        if max_child_restarts is not None and (
            isinstance(max_child_restarts, bool)
            or not isinstance(max_child_restarts, int)
            or max_child_restarts < 0
        ):
            raise ValueError(f"max_child_restarts must be an int >= 0 or None, got {max_child_restarts!r}")
        self.child_backoff = _number("child_backoff", child_backoff, positive=False)
        self._backoff = _campaign_wait(backoff)

        self.name = name
        self.identity = identity
        self.metadata = metadata
        self.monitor_leader = monitor_leader
        self.max_child_restarts = max_child_restarts
        self._child = as_child(child, argument="child")
        self._follower_child = as_child(follower_child, argument="follower_child")
        self._oracle, self._owns_oracle = self._resolve_oracle(oracle)
        try:  # what the oracle would refuse (a record too big to publish) fails here, not in the loop
            self._oracle.check_contender(name, identity, metadata)
        except BaseException:
            self._close_oracle()
            raise
        self._oracle_description = redact_text(getattr(self._oracle, "description", "") or repr(self._oracle))

        self._cond = threading.Condition(threading.RLock())
        self._phase = "init"
        self._term: Optional[Term] = None
        self._leader: Optional[Leader] = None
        self._last_error: Optional[str] = None
        self._changed = False  # the oracle asked us to look (on_change)
        self._lost_signal = False  # the oracle said our leadership is gone (on_change(lost=True))
        self._child_exited = False
        self._stopping = False
        self._started = False
        self._forked = False
        self._pid = os.getpid()  # fork safety that needs no at-fork hook (uWSGI forks from C)
        self._thread: Optional[threading.Thread] = None
        self._contender = None
        self._child_run = None
        self._follower_run = None
        self._follower_term: Optional[Term] = None
        self._runs_stopping: list = []  # children being stopped: still alive for status()
        self._terms_started = 0  # so a waiter sees a term that began and ended while it slept
        self._announced: Optional[Leader] = None  # the leader last given to on_new_leader
        _live_crowns.add(self)

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
                self._phase = "stopped"
                self._close_oracle()
                self._cond.notify_all()
                return self
            first = not self._stopping
            self._stopping = True
            if self._term is not None:
                self._term.end()  # the child sees stop_event now, before the loop gets to it
            self._cond.notify_all()
        if first:
            self._emit("crown.process.terminating", reason="stop")
        current = threading.current_thread()
        with self._cond:
            # A thread child that calls stop() must not wait for the loop, which waits for it.
            runs = (self._child_run, self._follower_run, *self._runs_stopping)
            child_threads = [getattr(run, "thread", None) for run in runs]
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
            run = self._child_run if term is not None else self._follower_run
            runs = [run, *self._runs_stopping]
            return Status(
                name=self.name,
                phase=self._phase,
                is_leader=leading,
                identity=self.identity,
                leader=self._leader,
                token=term.token if leading else None,
                child_alive=any(run is not None and run.alive() for run in runs),
                oracle=self._oracle_description,
                last_error=self._last_error,
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
        return self._oracle

    def __enter__(self) -> "Crown":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Crown {self.name} {self._phase} identity={self.identity} oracle={self._oracle_description}>"

    # ---------------------------------------------------------------------------- the loop

    def _run(self) -> None:
        try:
            self._emit("crown.process.initialized")
            self._contender = self._retry("contender", self._stopping_now, lambda: self._oracle.contender(
                self.name, self.identity, dict(self.metadata), self._on_change))
            if self._contender is not None:
                self._start_follower_child()
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
        claim = self._retry("claim", self._stopping_now, self._contender.claim)
        if claim is not None:
            self._clear_error()
        return claim

    def _lead(self, claim: Claim) -> float:
        """Hold one term. Returns how long to wait before contending again."""
        self._stop_child("_follower_run", "follower")
        term = Term(self.name, self.identity, claim.token, claim.deadline, fds=claim.fds)
        leader = claim.leader or Leader(self.identity, dict(self.metadata), claim.token, time.time())
        with self._cond:
            self._term = term
            self._leader = leader
            self._child_exited = False
            if self._lost_signal or self._stopping:
                term.end()
            self._phase = "leading"
            self._terms_started += 1
            self._cond.notify_all()
        self._emit("crown.leadership.claimed", token=term.token, deadline_in=_seconds(term.remaining()))
        restarts = 0
        if not term.ended:
            self._start_leader_child(term, restarts)
        # After the child starts (waking the warden's thread would compete with it for the CPU);
        # a deadline already past fires at once, and the child checks its own deadline anyway.
        warden.watch(term, self._on_deadline)
        self._announce_leader()
        self._callbacks.call("on_elected", term)  # for every term, so on_deposed always pairs
        next_refresh = _next_refresh(term, claim.refresh_in)

        reason, lost, backoff = "stop", False, 0.0
        while True:
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
                lost_signal = self._lost_signal
            if self._stopping:
                reason = "stop"
                break
            if term.ended:
                reason, lost = ("oracle" if lost_signal else "deadline"), True
                break
            if child_exited:
                exitcode = getattr(self._child_run, "exitcode", None)
                self._emit("crown.child.exited", kind="leader", exitcode=exitcode, token=term.token)
                if self.max_child_restarts is None or restarts < self.max_child_restarts:
                    restarts += 1
                    self._wait(self.child_backoff, lambda: self._stopping or term.ended)
                    if not (self._stopping or term.ended):
                        self._start_leader_child(term, restarts)
                    continue
                reason, backoff = "child_exited", self.monitor_delay
                with self._cond:
                    self._child_run = None  # reported as exited, not to be reported as stopped
                break
            refreshed = self._refresh(term)
            if refreshed is None:
                continue  # interrupted; the checks above decide
            if not refreshed.won:
                reason, lost, backoff = "refresh", True, refreshed.yield_for
                break
            if not term.extend(refreshed.deadline):
                continue  # the deadline passed while the refresh was under way: the term is over
            run = self._child_run
            if run is not None:
                run.extend(refreshed.deadline)
            if refreshed.leader is not None:
                self._leader = refreshed.leader
                self._announce_leader()
            self._emit("crown.leadership.refreshed", token=term.token, deadline_in=_seconds(term.remaining()))
            next_refresh = _next_refresh(term, refreshed.refresh_in)
        self._end_term(term, reason, lost)
        return backoff

    def _refresh(self, term: Term) -> Optional[Claim]:
        interrupted = lambda: self._stopping or term.ended or self._child_exited  # noqa: E731
        claim = self._retry("refresh", interrupted, self._contender.refresh, max_wait=1.0)
        if claim is not None:
            self._clear_error()
        return claim

    def _end_term(self, term: Term, reason: str, lost: bool) -> None:
        self._set_phase("finishing")
        with self._cond:
            term.end()
            self._cond.notify_all()
        self._stop_child("_child_run", "leader", token=term.token)
        if lost:
            self._emit("crown.leadership.lost", token=term.token, reason=reason)
        try:  # after the child is gone, never before: otherwise two children could overlap
            self._contender.abdicate()
        except Exception as exc:
            self._record_error("abdicate", exc)
        with self._cond:
            self._term = None
            if self._leader is not None and self._leader.identity == self.identity:
                self._leader = None
            self._cond.notify_all()
        if not lost:
            self._emit("crown.leadership.abdicated", token=term.token, reason=reason)
        self._callbacks.call("on_deposed", term, reason)
        self._announce_leader()
        if not self._stopping:
            self._start_follower_child()

    def _follow(self, claim: Claim) -> float:
        with self._cond:
            self._leader = claim.leader
        self._set_phase("following")
        self._emit("crown.leadership.rejected")
        self._announce_leader()
        self._start_follower_child()
        if not self.monitor_leader:
            self._wait(self.monitor_delay, self._stopping_now)
            return 0.0
        give_up = _monotonic() + self.monitor_timeout
        while not self._stopping:
            with self._cond:
                self._changed = False
            try:
                watching = self._contender.watch(self._leader)
            except Exception as exc:
                self._record_error("watch", exc)
                self._emit("crown.monitor.failed", error=self._last_error)
                if _monotonic() >= give_up:
                    self._emit("crown.monitor.timeout")
                    return 0.0
                self._wait(min(self.monitor_delay, max(0.0, give_up - _monotonic())), self._stopping_now)
                continue
            if not watching:
                self._emit("crown.monitor.leader_down")
                return 0.0
            self._emit("crown.monitor.started")
            changed = self._wait(self.monitor_timeout, lambda: self._stopping or self._changed)
            if self._stopping:
                return 0.0
            self._emit("crown.monitor.leader_down" if changed else "crown.monitor.timeout")
            return 0.0
        return 0.0

    def _finish(self) -> None:
        with self._cond:
            term = self._term
        if term is not None:  # only if the loop died mid-term
            self._end_term(term, "stop", False)
        self._stop_child("_follower_run", "follower")
        self._set_phase("finishing")
        contender, self._contender = self._contender, None
        if contender is not None:
            try:
                contender.close()
            except Exception as exc:
                self._record_error("close", exc)
        self._close_oracle()
        registry.unregister(self)
        with self._cond:
            self._phase = "stopped"
            self._leader = None
            self._cond.notify_all()
        self._announce_leader()
        self._emit("crown.process.stopped")

    # ---------------------------------------------------------------------------- children

    def _start_leader_child(self, term: Term, restarts: int) -> None:
        if self._child is None:
            return
        # Under the lock, so that a child calling stop() or exiting at once finds itself stored.
        with self._cond:
            try:
                run = self._child.start(term, self._on_child_exit)
            except Exception as exc:
                logger.exception("crown %s: starting the child failed", self.name)
                self._record_error("child", exc)
                self._child_run = None
                self._child_exited = True
                self._cond.notify_all()
                return
            self._child_run = run
            if not run.alive():  # it ended before we stored it: its on_exit was not recognised
                self._child_exited = True
                self._cond.notify_all()
        self._emit("crown.child.started", kind="leader", pid=run.pid, restarts=restarts, token=term.token)

    def _start_follower_child(self) -> None:
        if self._follower_child is None or self._stopping:
            return
        with self._cond:
            if self._follower_run is not None and self._follower_run.alive():
                return
        term = Term(self.name, self.identity, None, None, leading=False)
        # Under the lock, as for the leader's child: one that calls stop() at once finds itself.
        with self._cond:
            try:
                run = self._follower_child.start(term, self._on_follower_exit)
            except Exception as exc:
                logger.exception("crown %s: starting the follower child failed", self.name)
                self._record_error("follower_child", exc)
                return
            self._follower_run = run
            self._follower_term = term
        self._emit("crown.child.started", kind="follower", pid=run.pid, restarts=0)

    def _stop_child(self, attribute: str, kind: str, **extra) -> None:
        with self._cond:
            run = getattr(self, attribute)
            setattr(self, attribute, None)
            if kind == "follower" and run is not None:
                self._follower_term.end()
            if run is not None:
                self._runs_stopping.append(run)
        if run is None:
            return
        try:
            run.stop()
        finally:
            with self._cond:
                self._runs_stopping.remove(run)
        self._emit("crown.child.stopped", kind=kind, exitcode=run.exitcode, **extra)

    def _on_child_exit(self, run) -> None:
        with self._cond:
            if run is self._child_run and self._term is not None and not self._term.ended:
                self._child_exited = True
                self._cond.notify_all()

    def _on_follower_exit(self, run) -> None:
        with self._cond:
            mine = run is self._follower_run
        if mine and not self._stopping:
            self._emit("crown.child.exited", kind="follower", exitcode=run.exitcode)

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

    def _on_deadline(self, term: Term) -> None:
        """The warden: the term's deadline passed while it was still on. Kill, don't ask."""
        with self._cond:
            current = term is self._term
            run = self._child_run if current else None
            term.end()
            self._cond.notify_all()
        if run is not None:
            run.kill()
        logger.warning("crown %s: term %s passed its deadline before it was renewed", self.name, term.token)

    # ---------------------------------------------------------------------------- helpers

    def _stopping_now(self) -> bool:
        return self._stopping

    def _wait(self, seconds: float, predicate) -> bool:
        """Wait up to ``seconds`` for ``predicate()`` (re-checked on every notify)."""
        with self._cond:
            return bool(self._cond.wait_for(predicate, seconds))

    def _retry(self, operation: str, interrupted, call, max_wait: Optional[float] = None):
        """Call the oracle, retrying errors with backoff until it works or ``interrupted()``.

        Returns the result, or None if interrupted.
        """
        ceiling = max_wait if max_wait is not None else max(0.1, min(self.monitor_delay, 5.0))
        wait = tenacity.wait_random_exponential(multiplier=0.05, min=0.01, max=ceiling)  # full jitter
        if max_wait is None and self._backoff is not None:
            wait = self._backoff  # campaign retries only: a refresh races the term's deadline
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(Exception),
            wait=wait,
            stop=lambda state: interrupted(),
            sleep=lambda seconds: self._wait(seconds, interrupted),
            before_sleep=lambda state: self._record_error(operation, state.outcome.exception()),
            reraise=False,
        )
        if interrupted():
            return None
        try:
            return retrying(call)
        except tenacity.RetryError as exc:
            error = exc.last_attempt.exception()
            if error is not None:
                self._record_error(operation, error)
            return None

    def _announce_leader(self) -> None:
        """on_new_leader, if the leader (identity and token) differs from the one last told."""
        leader, told = self._leader, self._announced
        if _leader_key(leader) != _leader_key(told):
            self._announced = leader
            self._callbacks.call("on_new_leader", leader)

    def _record_error(self, operation: str, exc: BaseException) -> None:
        message = redact_text(f"{operation}: {type(exc).__name__}: {exc}")
        with self._cond:
            self._last_error = message
        logger.debug("crown %s: %s", self.name, message)
        self._emit("crown.oracle.error", operation=operation, error=message)

    def _clear_error(self) -> None:
        with self._cond:
            self._last_error = None

    def _set_phase(self, phase: str) -> None:
        with self._cond:
            self._phase = phase
            self._cond.notify_all()

    def _emit(self, event: str, **extra) -> None:
        leader = self._leader
        metadata = {
            "name": self.name,
            "identity": self.identity,
            "phase": self._phase,
            "oracle": self._oracle_description,
            "leader": leader.identity if leader is not None else None,
        }
        metadata.update(extra)
        telemetry.emit(event, metadata)

    def _resolve_oracle(self, oracle):
        if oracle is None:
            return default_oracle(), True
        if isinstance(oracle, str):
            return oracle_from_url(oracle), True
        if isinstance(oracle, Oracle):
            return oracle, False
        raise TypeError(f"oracle must be an Oracle, an oracle URL or None, got {type(oracle).__name__}")

    def _close_oracle(self) -> None:
        if self._owns_oracle:
            try:
                self._oracle.close()
            except Exception as exc:
                logger.warning("crown %s: closing the oracle failed: %s", self.name, redact_text(str(exc)))

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


def _campaign_wait(backoff) -> Optional[Callable[[tenacity.RetryCallState], float]]:
    """The ``backoff`` option as a tenacity wait: a tenacity wait strategy as it is, a callable
    ``(attempt) -> seconds`` adapted; None keeps the default. TypeError names the option."""
    if backoff is None:
        return None
    if not callable(backoff):
        raise TypeError(f"backoff must be a tenacity wait strategy or a callable (attempt) -> seconds, "
                        f"got {type(backoff).__name__}")
    strategy = isinstance(backoff, tenacity.wait.wait_base)

    def wait(state: tenacity.RetryCallState) -> float:
        try:  # the user's code runs in the loop: a bad answer must not end it
            seconds = _number("backoff", backoff(state) if strategy else backoff(state.attempt_number),
                              positive=False)
        except Exception:
            logger.exception("backoff %r failed; waiting 1 s", backoff)
            seconds = 1.0
        return seconds

    return wait


def _next_refresh(term: Term, refresh_in: Optional[float]) -> Optional[float]:
    """When to refresh: as the oracle asks, but by half the time left at the latest, since the
    oracle's interval was counted from the start of its call and the crown has spent some of it
    since (starting the child, stopping a follower child) and a failed refresh needs a retry."""
    if refresh_in is None:
        return None
    return _monotonic() + min(refresh_in, max(0.0, term.remaining() / 2))


def _leader_key(leader: Optional[Leader]):
    return None if leader is None else (leader.identity, leader.token)


def _seconds(value: float) -> Optional[float]:
    return None if value == float("inf") else round(value, 3)


class _LiveCrowns:
    """Every Crown object in the process (weakly held), for the fork handler."""

    def __init__(self):
        import weakref

        self._crowns = weakref.WeakSet()

    def add(self, crown) -> None:
        self._crowns.add(crown)

    def after_fork_in_child(self) -> None:
        for crown in list(self._crowns):
            crown._after_fork_in_child()


_live_crowns = _LiveCrowns()
os.register_at_fork(after_in_child=_live_crowns.after_fork_in_child)
