"""Preferred leaders and election strategies (see :doc:`ranking`): the engine's half.

A crown whose ``strategy`` is not ``"first"`` publishes a :class:`~crown_sync.oracle.Candidate`
through its oracle's candidacy capability while it contends, and its contender is wrapped in a
:class:`RankedContender`, which ranks the live candidates with the strategy:

* after a claim is won and before the child starts: if a live candidate strictly outranks us, we
  abdicate at once and stay out for a yield, so a lock-queue oracle hands the lock along until the
  best candidate holds it;
* while leading, about every ``preempt_interval`` (on a refresh, which it brings forward): if a
  candidate strictly outranks us, the term ends with reason ``"preempted"`` (the engine stops the
  child, then abdicates) and we stay out for a yield;
* a candidate we yielded to that did not take over during the yield is ignored for a while, so a
  live but stuck candidate cannot keep the election leaderless or make it flap.

Ties favour whoever decides (the one that won the lock): equal ranks keep today's behaviour.
"""

import dataclasses
import logging
import secrets
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from . import clock
from ._options import number
from .oracle import Candidacy, Candidate, Claim, Contender, Leader, OnChange, Oracle

__all__ = ["Ranking", "RankedContender", "STRATEGIES"]

logger = logging.getLogger("crown_sync.crown")

Strategy = Callable[[List[Candidate]], Sequence[Candidate]]

#: The yielded-to candidate that did not take over is ignored for this many yields.
SNUB_YIELDS = 10


def _priority(candidates: List[Candidate]) -> List[Candidate]:
    return sorted(candidates, key=lambda c: -c.priority)  # stable: a tie keeps the first (us)


def _oldest(candidates: List[Candidate]) -> List[Candidate]:
    return sorted(candidates, key=lambda c: c.joined)


STRATEGIES: Dict[str, Optional[Strategy]] = {"first": None, "oldest": _oldest, "priority": _priority}


def supports_candidacy(oracle: Any) -> bool:
    return callable(getattr(oracle, "candidacy", None))


@dataclasses.dataclass(frozen=True)
class Ranking:
    """A crown's checked ``priority``, ``strategy`` and ``preempt_interval``."""

    priority: int = 0
    strategy: Union[str, Strategy] = "first"
    preempt_interval: float = 2.0

    @classmethod
    def check(cls, priority: Any, strategy: Any, preempt_interval: Any) -> "Ranking":
        """The options, or a TypeError/ValueError naming the bad one. No I/O."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an int, got {type(priority).__name__}")
        if not callable(strategy) and strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))} or a callable "
                             f"ranking a list of Candidate, got {strategy!r}")
        if strategy == "first" and priority != 0:  # it would be silently ignored
            raise ValueError(f"priority ({priority}) needs strategy='priority' (or a callable), on every "
                             f"contender of the election; strategy='first' ranks nobody")
        interval = number("preempt_interval", preempt_interval, positive=True)
        return cls(priority, strategy, interval)

    @property
    def active(self) -> bool:
        return self.strategy != "first"

    def check_oracle(self, oracle: Oracle) -> None:
        """ValueError if the strategy needs candidates and ``oracle`` cannot publish them."""
        if self.active and not supports_candidacy(oracle):
            raise ValueError(f"strategy={self.strategy!r} needs an oracle that publishes its candidates "
                             f"(a candidacy() method); {type(oracle).__name__} has none: use strategy='first'")

    def wrap(self, oracle: Oracle, contender: Contender, name: str, identity: str,
             on_change: OnChange) -> Contender:
        """``contender`` as the crown uses it: itself for "first" (today's cost), else ranked."""
        if not self.active:
            return contender
        candidate = Candidate(identity, self.priority, time.time(), secrets.token_hex(8))
        return RankedContender(self, contender, lambda: oracle.candidacy(name, candidate), candidate, on_change)

    def best(self, candidates: List[Candidate], me: Candidate) -> Optional[Candidate]:
        """The candidate that strictly outranks ``me`` (best first), or None. A callable that
        fails or answers nonsense is logged and ranks nobody this round ("first")."""
        others = [c for c in candidates if c.key != me.key]
        ordering = STRATEGIES.get(self.strategy) if isinstance(self.strategy, str) else self.strategy
        try:
            ranked = list(ordering([me, *others]))  # us first: a tie keeps the incumbent
            if ranked and not isinstance(ranked[0], Candidate):
                raise TypeError(f"it returned a {type(ranked[0]).__name__}, not a Candidate")
        except Exception:
            logger.exception("strategy %r failed; ranking nobody this round", self.strategy)
            return None
        return ranked[0] if ranked and ranked[0].key != me.key else None

    def yield_time(self) -> float:
        # Long enough for the preferred one to notice and claim; short so a dead one costs little.
        return min(max(self.preempt_interval, 0.5), 5.0)


class RankedContender(Contender):
    """An oracle's contender plus the ranking (see the module docstring). Driven from the crown's
    loop thread, as every contender; its only thread is a timer that ends a yield."""

    def __init__(self, ranking: Ranking, inner: Contender, candidacy: Callable[[], Candidacy], me: Candidate,
                 on_change: OnChange):
        self.inner, self.me = inner, me
        self.candidacy: Optional[Candidacy] = None  # standing while contending, not between terms
        self._new_candidacy = candidacy
        self._ranking = ranking
        self._on_change = on_change
        self._guard = threading.Lock()  # close() (any thread) against the loop standing anew
        self._closed = False
        self._next_check = 0.0
        self._yield_until = 0.0
        self._yielded_to: Optional[str] = None  # the key of the candidate we last yielded to
        self._ignored: Dict[str, float] = {}  # key -> monotonic time until which it is ignored
        self._timer: Optional[threading.Timer] = None

    def __getattr__(self, attribute: str) -> Any:  # the oracle's own attributes, for tools and tests
        return getattr(self.__dict__["inner"], attribute)

    # ---------------------------------------------------------------------------- Contender

    def claim(self) -> Claim:
        if self.candidacy is None:  # before claiming, so that a leader's check sees us
            self._stand()
        claim = self.inner.claim()
        if not claim.won:
            if claim.leader is not None:  # someone leads: whoever we yielded to did its part
                self._yielded_to = None
            return claim
        now = clock.monotonic()
        if self._yielded_to is not None:  # it did not take over during our yield: stuck or gone
            self._ignored[self._yielded_to] = now + SNUB_YIELDS * self._ranking.yield_time()
            self._yielded_to = None
        better = self._outranked()
        if better is None:
            self._next_check = now + self._ranking.preempt_interval
            return self._paced(claim)
        self.inner.abdicate()  # before the child starts: nothing ran under this claim
        self._stay_out(better, "a claim")
        return Claim(won=False, leader=None)

    def refresh(self) -> Claim:
        claim = self.inner.refresh()
        now = clock.monotonic()
        if not claim.won or now < self._next_check:
            return self._paced(claim) if claim.won else claim
        self._next_check = now + self._ranking.preempt_interval
        better = self._outranked()
        if better is None:
            return self._paced(claim)
        self._stay_out(better, "the term")
        return Claim(won=False, leader=claim.leader, yield_for=self._ranking.yield_time(), reason="preempted")

    def watch(self, leader: Optional[Leader]) -> bool:
        wait = self._yield_until - clock.monotonic()
        if wait <= 0 or leader is not None:
            return self.inner.watch(leader)
        self._cancel_timer()
        self._timer = threading.Timer(wait, self._on_change)  # the yield is over: claim again
        self._timer.daemon = True
        self._timer.start()
        return True

    def abdicate(self) -> None:
        """The term is over: withdraw first (a stopping leader must not be yielded to by the
        successor that claims next), then abdicate; the next claim stands again, as old as ever."""
        try:
            self._withdraw()
        finally:
            self.inner.abdicate()

    def close(self) -> None:
        self._cancel_timer()
        try:
            self._withdraw(closing=True)
        finally:
            self.inner.close()

    # ---------------------------------------------------------------------------- helpers

    def _outranked(self) -> Optional[Candidate]:
        """The live candidate that strictly outranks us, or None (also when the read fails: a
        leader never ends its term for want of a candidates list)."""
        try:
            candidates = self.candidacy.candidates()
        except Exception as exc:
            logger.warning("%s: reading the candidates failed (%s: %s); ranking nobody this round",
                           self.me.identity, type(exc).__name__, exc)
            return None
        now = clock.monotonic()
        self._ignored = {key: until for key, until in self._ignored.items() if until > now}
        return self._ranking.best([c for c in candidates if c.key not in self._ignored], self.me)

    def _stay_out(self, better: Candidate, what: str) -> None:
        logger.info("%s outranked by %s (priority %s): giving up %s", self.me.identity, better.identity,
                    better.priority, what)
        self._yielded_to = better.key
        self._yield_until = clock.monotonic() + self._ranking.yield_time()

    def _paced(self, claim: Claim) -> Claim:
        """``claim`` with a refresh due by the next ranking check at the latest."""
        due = max(0.0, self._next_check - clock.monotonic())
        refresh_in = due if claim.refresh_in is None else min(claim.refresh_in, due)
        return dataclasses.replace(claim, refresh_in=refresh_in)

    def _stand(self) -> None:
        candidacy = self._new_candidacy()
        try:
            candidacy.candidates()  # publishes it
            with self._guard:
                if not self._closed:
                    self.candidacy = candidacy
                    return
            raise RuntimeError("contender closed")
        except BaseException:
            candidacy.close()  # none may outlive the contender: a renewal thread, a node, a session
            raise

    def _withdraw(self, closing: bool = False) -> None:
        with self._guard:
            self._closed = self._closed or closing
            candidacy, self.candidacy = self.candidacy, None
        if candidacy is not None:
            try:
                candidacy.close()
            except Exception as exc:  # it lapses with the session or its expiry anyway
                logger.warning("%s: withdrawing the candidacy failed: %s", self.me.identity, type(exc).__name__)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
