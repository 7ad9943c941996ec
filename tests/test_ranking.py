"""Preferred leaders and strategies (docs/ranking.rst): the options, the engine's ranking on a
scripted contender, and the "oldest" and callable strategies judged from outside (contender
processes on the file oracle, their journal). Every oracle's own candidacy is judged in
tests/oracles/test_contract.py."""

import logging
import os
import signal
import time
import uuid

import pytest

import crown_sync
from crown_sync import clock
from crown_sync._ranking import Ranking, RankedContender
from crown_sync.oracle import Candidacy, Candidate, Claim, Contender
from crown_sync.testing.fleet import Fleet, wait_until
from crown_sync.testing.memory import MemoryOracle

# ------------------------------------------------------------------ options


@pytest.mark.parametrize("options, option", [
    ({"priority": "3", "strategy": "priority"}, "priority"),
    ({"priority": True, "strategy": "priority"}, "priority"),
    ({"priority": 2.5, "strategy": "priority"}, "priority"),
    ({"priority": 3}, "priority"),  # with strategy "first" it would rank nobody
    ({"strategy": "best"}, "strategy"),
    ({"strategy": 7}, "strategy"),
    ({"strategy": "oldest", "preempt_interval": 0}, "preempt_interval"),
    ({"strategy": "oldest", "preempt_interval": "1"}, "preempt_interval"),
    ({"strategy": "oldest", "preempt_interval": float("nan")}, "preempt_interval"),
])
def test_bad_ranking_options_are_refused_at_construction_naming_the_option(tmp_path, options, option):
    with pytest.raises((TypeError, ValueError), match=option):
        crown_sync.Crown("job", oracle=f"file://{tmp_path}", **options)


def test_a_strategy_on_an_oracle_without_candidacies_is_refused_at_construction():
    with pytest.raises(ValueError, match="strategy='priority' needs an oracle that publishes its candidates"):
        crown_sync.Crown("job", oracle=MemoryOracle(), strategy="priority", priority=1)
    crown_sync.Crown("job", oracle=MemoryOracle())  # "first" needs nothing


# ------------------------------------------------------------------ the engine's ranking


class _Scripted(Contender):
    """Always wins; records what the ranking asks of it."""

    def __init__(self):
        self.calls = []

    def claim(self):
        self.calls.append("claim")
        return Claim(won=True, token=1, refresh_in=None)

    def refresh(self):
        self.calls.append("refresh")
        return Claim(won=True, token=1, refresh_in=None)

    def watch(self, leader):
        self.calls.append("watch")
        return True

    def abdicate(self):
        self.calls.append("abdicate")

    def close(self):
        self.calls.append("close")


class _Listed(Candidacy):
    def __init__(self, candidates):
        self.listed = candidates

    def candidates(self):
        if isinstance(self.listed, Exception):
            raise self.listed
        return list(self.listed)

    def close(self):
        pass


def _ranked(strategy, me, others, preempt_interval=0.5):
    ranking = Ranking.check(me.priority, strategy, preempt_interval)
    listed = _Listed([me, *others])
    ranked = RankedContender(ranking, _Scripted(), lambda: listed, me, lambda **_: None)
    ranked.listed = listed  # what the oracle would list, for the test to change
    return ranked


ME = Candidate("me", 1, 100.0, "k-me")


@pytest.mark.parametrize("strategy, other, yields", [
    ("priority", Candidate("other", 2, 200.0, "k-o"), True),
    ("priority", Candidate("other", 1, 50.0, "k-o"), False),  # a tie keeps the one that won
    ("oldest", Candidate("other", 9, 50.0, "k-o"), True),
    ("oldest", Candidate("other", 9, 200.0, "k-o"), False),
])
def test_a_won_claim_is_given_up_before_any_child_only_for_a_strictly_better_candidate(strategy, other, yields):
    ranked = _ranked(strategy, ME, [other])
    claim = ranked.claim()
    assert claim.won is not yields
    assert ranked.inner.calls == (["claim", "abdicate"] if yields else ["claim"])


def test_a_preempted_leader_ends_its_term_saying_so_and_yields():
    ranked = _ranked("priority", ME, [], preempt_interval=0.01)
    assert ranked.claim().refresh_in <= 0.01  # the check brings the oracle's refresh forward
    ranked.listed.listed.append(Candidate("better", 5, 1.0, "k-b"))
    ended = wait_until(lambda: (lambda claim: None if claim.won else claim)(ranked.refresh()), timeout=5)
    assert ended.reason == "preempted" and ended.yield_for > 0
    assert "abdicate" not in ranked.inner.calls  # the engine abdicates, once the child stopped


def test_a_callable_strategy_that_fails_is_logged_and_ranks_nobody(caplog):
    def broken(candidates):
        raise RuntimeError("no opinion")

    ranked = _ranked(broken, ME, [Candidate("other", 5, 1.0, "k-o")])
    with caplog.at_level(logging.ERROR, logger="crown_sync.crown"):
        assert ranked.claim().won
    assert "no opinion" in caplog.text
    ranked = _ranked(lambda candidates: ["not a candidate"], ME, [Candidate("other", 5, 1.0, "k-o")])
    assert ranked.claim().won


def test_a_candidate_that_does_not_take_over_during_the_yield_is_ignored_for_a_while():
    """Liveness: a live candidate that never claims (stuck) does not keep the election leaderless."""
    stuck = Candidate("stuck", 9, 1.0, "k-s")
    ranked = _ranked("priority", ME, [stuck])
    assert not ranked.claim().won  # yields to it
    assert ranked.claim().won  # it did not take over: ours now, and it is ignored
    assert ranked.claim().won


def test_candidates_that_cannot_be_read_never_end_a_term():
    ranked = _ranked("priority", ME, [], preempt_interval=0.01)
    assert ranked.claim().won  # publishing (before a claim: nothing held) may raise; reading may not
    ranked.listed.listed = ConnectionError("server gone")
    assert ranked.claim().won
    time.sleep(0.02)  # past the next check
    assert ranked.refresh().won


# ------------------------------------------------------------------ strategies, from outside


class _StrategyFleet(Fleet):
    def __init__(self, directory, strategy: str):
        super().__init__(f"file://{directory}", directory, "rank-" + uuid.uuid4().hex[:8])
        self.strategy = strategy

    def command(self, identity: str) -> list:
        return super().command(identity) + ["--strategy", self.strategy, "--preempt-interval", "0.2"]

    def follows(self, identity: str) -> bool:
        return any(e["event"] == "crown.leadership.rejected" for e in self.events_of(identity))

    def lead_then_join(self, leader: str, newcomer: str) -> None:
        self.spawn(leader)
        self.wait_for_term()
        self.spawn(newcomer)


def test_oldest_no_newcomer_takes_over_and_the_oldest_live_one_follows_a_dead_leader(tmp_path):
    fleet = _StrategyFleet(tmp_path, "oldest")
    try:
        fleet.spawn("a")
        fleet.wait_for_term()
        for identity in ("c", "b"):  # c joins before b: older, though its name sorts after
            fleet.spawn(identity)
            wait_until(lambda: fleet.follows(identity))
        beats = sum(t.beats for t in fleet.terms())
        # 0.5 s of beats after both joined (two preempt intervals and more): nobody took over
        wait_until(lambda: sum(t.beats for t in fleet.terms()) > beats + 100)
        fleet.signal("a", signal.SIGKILL)
        after = fleet.wait_for_term(other_than={"a"})
    finally:
        fleet.stop_all(strict=True)
    report = fleet.assert_safe(min_terms=2)
    assert [t.identity for t in report.terms if t.start <= after.start] == ["a", "c"], report.summary()


def test_a_callable_strategy_hands_the_crown_to_its_choice(tmp_path):
    fleet = _StrategyFleet(tmp_path, "crown_sync.testing.contender:last_identity")
    try:
        fleet.lead_then_join("a", "z")
        chosen = fleet.wait_for_term(other_than={"a"})
    finally:
        fleet.stop_all(strict=True)
    report = fleet.assert_safe(min_terms=2)
    assert [t.identity for t in report.terms] == ["a", "z"], report.summary()
    assert report.terms[0].stopped and report.terms[0].end < chosen.start


def test_equal_priorities_keep_the_incumbent(tmp_path):
    """No flapping: a newcomer of the leader's priority never takes over, over many checks."""
    fleet = _StrategyFleet(tmp_path, "priority")
    try:
        fleet.lead_then_join("a", "b")
        wait_until(lambda: fleet.follows("b"))
        beats = sum(t.beats for t in fleet.terms())
        # 0.5 s of beats after b joined (two preempt intervals and more)
        wait_until(lambda: sum(t.beats for t in fleet.terms()) > beats + 100)
        until = clock.monotonic()
    finally:
        fleet.stop_all(strict=True)  # a's stop hands the crown to b: not a flap
    report = fleet.assert_safe(min_terms=1)
    assert [t.identity for t in report.terms if t.start < until] == ["a"], report.summary()


def test_a_term_that_ends_withdraws_the_candidacy_before_abdicating_and_the_next_claim_stands_again():
    """A stopping leader must not be yielded to by the successor that claims right after it."""
    ranked = _ranked("priority", ME, [])
    withdrawn = []
    ranked.listed.close = lambda: withdrawn.append(list(ranked.inner.calls))
    assert ranked.claim().won
    ranked.abdicate()
    assert withdrawn == [["claim"]] and ranked.inner.calls == ["claim", "abdicate"]
    assert ranked.claim().won and ranked.candidacy is ranked.listed


def test_a_candidacy_published_while_the_contender_closes_is_withdrawn():
    """stop() (another thread) closes the contender while the loop stands: nothing may outlive it."""
    ranked = _ranked("priority", ME, [])
    closed = []
    ranked.listed.close = lambda: closed.append(True)
    publish = ranked.listed.candidates
    ranked.listed.candidates = lambda: (ranked.close(), publish())[1]
    with pytest.raises(RuntimeError, match="closed"):
        ranked.claim()
    assert closed and ranked.candidacy is None


def test_a_preemption_is_seen_by_callbacks_and_metrics_as_the_journal_saw_it(tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest

    import crown_sync.prometheus as metrics
    from crown_sync.testing import journal

    registry = CollectorRegistry()
    exported = metrics.enable(registry)
    path, oracle = str(tmp_path / "journal"), f"file://{tmp_path / 'oracle'}"
    ends = []
    crowns = [crown_sync.Crown("ranked", oracle=oracle, child=crown_sync.ThreadChild(journal.journaled_work, args=(path,)),
                               identity=f"p{priority}", strategy="priority", priority=priority, preempt_interval=0.2,
                               on_deposed=lambda term, reason: ends.append((term.identity, reason)))
              for priority in (1, 5)]
    try:
        crowns[0].start()
        assert crowns[0].wait_for_leadership(30)
        crowns[1].start()
        assert crowns[1].wait_for_leadership(30)
    finally:
        for crown in reversed(crowns):
            crown.stop(30)
        exported.detach()
    report = journal.check(path, "ranked")
    assert report.ok and [t.identity for t in report.terms][:2] == ["p1", "p5"], report.summary()
    assert ends[0] == ("p1", "preempted")
    assert 'crown_sync_terms_lost_total{election="ranked",reason="preempted"} 1.0' in generate_latest(registry).decode()


def test_the_file_oracles_candidates_directory_is_never_reached_through_a_symlink(tmp_path):
    # The candidates directory is walked as the file oracle walks its own: a symlink planted in
    # its place is refused, and nothing is written where it points.
    from crown_sync.oracles.file import FileOracle

    oracle = FileOracle(str(tmp_path / "oracle"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    oracle.ensure_directory()
    os.symlink(elsewhere, tmp_path / "oracle" / "job.candidates")
    candidacy = oracle.candidacy("job", Candidate("me", 1, time.time(), uuid.uuid4().hex))
    try:
        with pytest.raises(PermissionError, match="symlink"):
            candidacy.candidates()
        assert list(elsewhere.iterdir()) == []
    finally:
        candidacy.close()
        oracle.close()
