"""The contract every oracle keeps, run on each kind of tests/oracles/support.py (one server per
kind per session). Safety is judged from the journal the leaders' children write themselves,
never from the oracle's word; faults are real signals to real processes and servers.

A new oracle passes these by adding its kind to ``support.KINDS``; what only one oracle does is
tested in its own file.
"""

import contextlib
import logging
import signal
import subprocess
import sys
import time
import uuid

import pytest

import crown_sync
from crown_sync import clock, telemetry
from crown_sync.testing import journal

from .support import FORK_SCRIPT, Fleet, assert_safe, terms, wait_until


@pytest.fixture
def name():
    return "contract-" + uuid.uuid4().hex[:12]


def journaled(path: str) -> crown_sync.ThreadChild:
    return crown_sync.ThreadChild(journal.journaled_work, args=(path,))


def working(path: str, name: str, identity: str) -> bool:
    """The newest term in the journal is ``identity``'s and its child has beaten a few times."""
    found = terms(path, name)
    return bool(found) and found[-1].identity == identity and found[-1].beats > 3


# ------------------------------------------------------------------ exclusive leadership, tokens


def test_leadership_moves_through_sigterm_and_sigkill_one_term_at_a_time(served, name, tmp_path):
    """A SIGTERMed leader hands over (its child stopped, then the crown released); a SIGKILLed
    one's child is killed by the kernel, not with its crown, and its successor must wait for
    that: an overlap, or a token that does not rise, shows in the journal."""
    fleet = served.fleet(tmp_path, name, child="process")
    fleet.spawn_many(3, "p")
    try:
        first = fleet.wait_for_term()
        fleet.signal(first.identity, signal.SIGTERM)
        assert fleet.wait_exit(first.identity) == 0  # a clean stop (a second SIGTERM could kill it)
        second = fleet.wait_for_term(other_than={first.identity})
        fleet.signal(second.identity, signal.SIGKILL)
        third = fleet.wait_for_term(other_than={first.identity, second.identity})
    finally:
        fleet.stop_all(strict=True)
    report = fleet.assert_safe(min_terms=3)
    assert first.token < second.token < third.token
    graceful = [t for t in report.terms if t.token == first.token][0]
    killed = [t for t in report.terms if t.token == second.token][0]
    assert graceful.stopped and graceful.end < second.start
    # The killed term's journal was written by a process of its own, which the SIGKILL did not
    # reach directly (so its end, before the successor's start, is a real result)...
    assert killed.pid != fleet.processes[second.identity].pid
    # ...and which was stopped without the chance to say so.
    assert not killed.stopped and killed.end < third.start


def test_two_crowns_in_one_process_never_both_lead_and_hand_over_on_stop(served, name, tmp_path):
    """One crown on a shared Oracle object, one on its own URL, in one process."""
    path = str(tmp_path / "journal.jsonl")
    shared = crown_sync.oracle_from_url(served.url())
    crowns = [crown_sync.Crown(name, oracle=shared, child=journaled(path), identity="shared-oracle"),
              crown_sync.Crown(name, oracle=served.url(), child=journaled(path), identity="own-oracle")]
    both = []
    try:
        for crown in crowns:
            crown.start()
        first = wait_until(lambda: next((c for c in crowns if c.is_leader()), None), message="a leader")
        end = clock.monotonic() + 1.0
        while clock.monotonic() < end:
            both.append(all(c.is_leader() for c in crowns))
            time.sleep(0.005)
        other = next(c for c in crowns if c is not first)
        first.stop()
        assert other.wait_for_leadership(30), other.status().last_error
        wait_until(lambda: working(path, name, other.identity), message="the new term working")
    finally:
        for crown in crowns:
            crown.stop()
        shared.close()
    assert not any(both)
    report = assert_safe(path, name, 2)
    assert [t.identity for t in report.terms] == [first.identity, other.identity]
    assert all(t.stopped for t in report.terms), report.summary()


# ------------------------------------------------------------------ find_leader, dismissal


def test_find_leader_names_the_leader_and_nobody_once_it_stopped(served, name):
    url = served.url()
    assert crown_sync.find_leader(name, oracle=url) is None  # nobody ever contended
    with crown_sync.Crown(name, oracle=url, metadata={"url": "http://10.0.0.1:8000"}) as crown:
        assert crown.wait_for_leadership(30), crown.status().last_error
        found = crown_sync.find_leader(name, oracle=url)
        assert (found.identity, found.token) == (crown.identity, crown.status().token)
        assert found.metadata == {"url": "http://10.0.0.1:8000"}
        assert found.since <= time.time()
    assert crown_sync.find_leader(name, oracle=url) is None  # a clean stop leaves no leader


def test_a_dismissed_leader_steps_down_and_a_follower_leads_with_a_higher_token(served, name, tmp_path):
    path = str(tmp_path / "journal.jsonl")
    url = served.url()
    crowns = [crown_sync.Crown(name, oracle=url, child=journaled(path), identity=f"d{i}") for i in range(2)]
    seen = []
    handle = telemetry.attach(lambda event, meta: seen.append((event, meta.get("identity"), meta.get("token"))),
                              prefixes=["crown.leadership"])
    try:
        assert crown_sync.dismiss(name, oracle=url) is False  # nobody to dismiss yet
        for crown in crowns:
            crown.start()
        first = wait_until(lambda: next((c for c in crowns if c.is_leader()), None), message="a leader")
        other = next(c for c in crowns if c is not first)
        wait_until(lambda: other.phase == "following", message="the other following")
        # The first term must have journaled its work before it is dismissed (on a fast oracle a
        # dismissal can end it before its child's first beat, and the journal has one term less).
        wait_until(lambda: working(path, name, first.identity), message="the first term working")
        token = first.status().token
        assert crown_sync.dismiss(name, oracle=url) is True
        wait_until(lambda: other.is_leader(), message="the follower leading after the dismissal")
        assert other.status().token > token
        wait_until(lambda: working(path, name, other.identity), message="the new term working")
    finally:
        telemetry.detach(handle)
        for crown in crowns:
            crown.stop()
    assert ("crown.leadership.lost", first.identity, token) in seen
    report = assert_safe(path, name, 2)
    assert report.terms[0].identity == first.identity and report.terms[0].stopped, report.summary()
    assert crown_sync.dismiss(name, oracle=url) is False  # everyone stopped


# ------------------------------------------------------------------ fork


def test_a_forked_child_neither_leads_nor_ends_the_parents_term(served, name, tmp_path):
    script = tmp_path / "fork_script.py"
    script.write_text(FORK_SCRIPT)
    out = subprocess.run([sys.executable, str(script), served.url(), name, "wait"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "child-exit 0" in out.stdout, out.stdout + out.stderr
    assert "parent-leads True" in out.stdout and "still-leads True True" in out.stdout, out.stdout + out.stderr


# ------------------------------------------------------------------ a frozen server


@pytest.mark.needs("freeze")
def test_stop_while_leading_is_bounded_when_the_server_is_frozen(served, name, tmp_path):
    path = str(tmp_path / "journal.jsonl")
    crown = crown_sync.Crown(name, oracle=served.url(), child=journaled(path))
    crown.start()
    try:
        assert crown.wait_for_leadership(30), crown.status().last_error
        wait_until(lambda: working(path, name, crown.identity), message="the term working")
        with served.frozen():  # SIGSTOP: connected as far as the client knows, but no answers
            time.sleep(1.0)  # a refresh is now waiting for an answer
            started = clock.monotonic()
            crown.stop(timeout=15)
            took = clock.monotonic() - started
        assert crown.phase == "stopped", f"still {crown.phase} {took:.1f}s after stop()"
        assert took < 15, f"stop() took {took:.1f}s"  # bounded (generously: not a speed test)
    finally:
        crown.stop()
    assert_safe(path, name)


# ------------------------------------------------------------------ an oracle that refuses


@contextlib.contextmanager
def crown_that_cannot_lead(url, name, secret, caplog):
    """A started crown (start() must not raise) on an oracle that cannot serve it, yielded once
    last_error is set. Afterwards stop() must have returned in bounded time, and ``secret`` must
    have shown in no status, telemetry event or log record."""
    caplog.set_level(logging.DEBUG, logger="crown_sync")
    events = []
    handle = telemetry.attach(lambda event, meta: events.append(repr((event, meta))))
    crown = crown_sync.Crown(name, oracle=url, monitor_delay=0.2)
    try:
        assert crown.start() is crown
        wait_until(lambda: crown.status().last_error, message="last_error")
        status = crown.status()
        assert not crown.is_leader() and not status.is_leader and status.token is None
        assert secret not in repr(status)
        yield crown
    finally:
        started = clock.monotonic()
        crown.stop()
        stopped_in = clock.monotonic() - started
        telemetry.detach(handle)
    assert stopped_in < 30 and crown.phase == "stopped"
    assert events and not any(secret in e for e in events)
    assert not any(secret in r.getMessage() for r in caplog.records)


def test_an_unreachable_server_never_raises_from_start(served, name, caplog):
    secret = "Unreach-" + uuid.uuid4().hex[:8]
    with crown_that_cannot_lead(served.unreachable_url(secret), name, secret, caplog) as crown:
        assert crown.status().phase in ("claiming", "following")


@pytest.mark.needs("credentials")
def test_wrong_credentials_never_raise_and_the_password_shows_nowhere(served, name, caplog):
    secret = "Wr0ng-" + uuid.uuid4().hex[:8]
    with crown_that_cannot_lead(served.wrong_credentials_url(secret), name, secret, caplog) as crown:
        time.sleep(0.5)  # a retry or two
        assert served.kind.wrong_credentials_error in crown.status().last_error
        assert not crown.is_leader()
    assert crown_sync.find_leader(name, oracle=served.url()) is None


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "x" * 129, "sp ace", "\u00e9t\u00e9"])
def test_bad_names_are_refused_at_construction(served, bad):
    with pytest.raises(ValueError, match="name"):
        crown_sync.Crown(bad, oracle=served.url())
    with pytest.raises(ValueError, match="name"):
        crown_sync.find_leader(bad, oracle=served.url())


def test_bad_options_are_refused_naming_the_option(served):
    for option, value in dict(served.kind.bad_options, colour="red").items():
        url = served.url(**{option: value})
        with pytest.raises((ValueError, TypeError), match=option):
            crown_sync.oracle_from_url(url)
        with pytest.raises((ValueError, TypeError), match=option):
            crown_sync.Crown("fine", oracle=url)


# ------------------------------------------------------------------ ranking (docs/ranking.rst)


class _RankedFleet(Fleet):
    """Contenders with strategy "priority", each with its own priority."""

    def __init__(self, served, directory, name: str, priorities: dict):
        super().__init__(served.url(), directory, name, **served.kind.fleet_options)
        self.priorities = priorities

    def command(self, identity: str) -> list:
        return super().command(identity) + ["--strategy", "priority", "--preempt-interval", "0.3",
                                            "--priority", str(self.priorities[identity])]

    def follows(self, identity: str, after: float) -> bool:
        return any(e["event"] == "crown.leadership.rejected" and e["t"] > after for e in self.events_of(identity))


def test_a_preferred_contender_takes_over_gracefully_and_the_next_one_after_its_death(served, name, tmp_path):
    """low leads; high joins and gets the crown by a graceful handoff (low's child stopped
    first, reason "preempted"); mid joins and follows; SIGKILL of high hands the crown to mid,
    never to low (ahead of mid in a lock queue, or as quick on a lease: it must yield)."""
    fleet = _RankedFleet(served, tmp_path, name, {"low": 1, "mid": 3, "high": 5})
    try:
        fleet.spawn("low")
        low = fleet.wait_for_term()
        fleet.spawn("high")
        high = fleet.wait_for_term(other_than={"low"})
        # low follows again (back in a lock queue, ahead of mid) before mid joins and follows
        wait_until(lambda: fleet.follows("low", after=high.start))
        fleet.spawn("mid")
        wait_until(lambda: fleet.follows("mid", after=high.start))
        fleet.signal("high", signal.SIGKILL)
        mid = fleet.wait_for_term(other_than={"low", "high"}, timeout=40)
    finally:
        fleet.stop_all(strict=True)
    report = fleet.assert_safe(min_terms=3)
    assert [t.identity for t in report.terms if t.start <= mid.start] == ["low", "high", "mid"], report.summary()
    assert report.terms[0].stopped and report.terms[0].end < high.start, report.summary()
    assert low.token < high.token < mid.token
    ends = [e.get("reason") for e in fleet.events_of("low") if e["event"] == "crown.leadership.abdicated"]
    assert ends[:1] == ["preempted"], ends
