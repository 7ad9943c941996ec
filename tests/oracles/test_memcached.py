"""The memcached oracle against a real memcached started by the suite.

Safety is judged by the independent journal that the leaders' children write themselves
(crown_sync.testing.journal), never by the oracle's word; faults are real: SIGKILL, SIGTERM,
SIGSTOP past the lease, memcached restart, ``flush_all`` and LRU eviction.
"""

import json
import logging
import os
import signal
import stat
import threading
import time

import pytest
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheError

import crown_sync
from crown_sync import clock
from crown_sync.oracles.memcached import MemcachedError, MemcachedOracle
from crown_sync.testing import journal
from crown_sync.testing.memcached_server import MemcachedServer
from crown_sync.testing.servers import free_port

from .memcached_support import FaultProxy
from .support import Fleet, process_state, wait_until

NAME = "nightly-report"
# Short leases keep the suite quick (renewals every 0.5 s, failover ~2.5 s); a whole second of
# margin keeps a busy machine's scheduling delays from turning into journal overlaps.
TTL = 2.5
FAST = f"ttl={TTL:g}&margin=1&poll_interval=0.05"
MARGIN, POLL = 1.0, 0.05
# For bounds that tell a CAS release from waiting out a lease: renewals every 1 s, so a successor
# that had to wait for the lease could not start sooner than ttl - renew_interval = 3 s.
SLOW_TTL = 4.0
SLOW = f"ttl={SLOW_TTL:g}&margin=1&poll_interval=0.05"


@pytest.fixture(scope="module")
def server():
    srv = MemcachedServer(memory_mb=16)
    srv.start()
    yield srv
    srv.cleanup()


@pytest.fixture
def fresh_server():
    """A server of the test's own (restarted, flushed or filled by it)."""
    srv = MemcachedServer(memory_mb=16)
    srv.start()
    yield srv
    srv.cleanup()


@pytest.fixture
def name(request):
    # One election per test on the shared server.
    return f"{NAME}-{request.node.name}".replace("[", "-").replace("]", "")[:100]


def oracle_for(srv, **options):
    options.setdefault("ttl", 1.0)
    options.setdefault("poll_interval", 0.05)
    return MemcachedOracle(srv.address, **options)


class Signals:
    """on_change callbacks received by a contender."""

    def __init__(self):
        self.calls = []
        self.event = threading.Event()

    def __call__(self, lost=False):
        self.calls.append(lost)
        self.event.set()

    def wait(self, timeout=10.0):
        assert self.event.wait(timeout), "no on_change() within the timeout"
        self.event.clear()


def lead(contender, timeout=10.0):
    """Claim until won (a fresh key first goes through the quarantine)."""
    def attempt():
        claim = contender.claim()
        return claim if claim.won else None
    return wait_until(attempt, timeout=timeout, interval=0.05, message="leadership")


def leader_and_watcher(oracle, name, via=None):
    """"a" leads; "b" (on ``via``, default the same oracle) follows and watches it.
    Returns (a, a's winning claim, b, b's Signals)."""
    a = oracle.contender(name, "a", {}, Signals())
    first = lead(a)
    signals = Signals()
    b = (via or oracle).contender(name, "b", {}, signals)
    assert not b.claim().won and b.watch(None)
    return a, first, b, signals


# --------------------------------------------------------------------------- processes, faults

def successor_of(report, identity, token):
    """The journal's next term after the given one."""
    index = [i for i, t in enumerate(report.terms) if (t.identity, t.token) == (identity, token)][0]
    assert index + 1 < len(report.terms), report.summary()
    return report.terms[index], report.terms[index + 1]


def test_contention_and_graceful_handoffs_between_processes(server, tmp_path, name):
    fleet = Fleet(f"{server.url}?{SLOW}", tmp_path, name)
    for i in range(3):
        fleet.spawn(f"c{i}")
    try:
        done, signalled = [], {}
        for round_number in range(3):
            term = fleet.wait_for_term(other_than=set(done[-1:]))
            signalled[(term.identity, term.token)] = clock.monotonic()
            fleet.signal(term.identity, signal.SIGTERM)  # clean stop: child, then CAS release
            fleet.processes[term.identity].wait(30)
            done.append(term.identity)
            fleet.spawn(f"c{3 + round_number}")
        fleet.wait_for_term(other_than=set(done[-1:]))
    finally:
        fleet.stop_all()
    report = fleet.assert_safe(min_terms=4, all_worked=True)
    assert sum(term.stopped for term in report.terms) >= 4, report.summary()
    assert len({term.identity for term in report.terms}) >= 4
    for (identity, token), at in signalled.items():
        old, new = successor_of(report, identity, token)
        assert new.identity != identity
        # The successor started within half the lease of the SIGTERM: it took the CAS release,
        # since waiting out the lease could not have taken less than ttl - renew_interval (3 s).
        assert new.start - at < SLOW_TTL / 2, (identity, new.start - at, report.summary())


def test_sigkill_of_the_leader_fails_over_without_overlap(server, tmp_path, name):
    fleet = Fleet(f"{server.url}?{FAST}", tmp_path, name)
    for i in range(3):
        fleet.spawn(f"k{i}")
    try:
        killed, killed_at = [], {}
        for round_number in range(2):
            term = fleet.wait_for_term(other_than=set(killed))
            killed_at[(term.identity, term.token)] = clock.monotonic()
            fleet.processes[term.identity].kill()
            fleet.processes[term.identity].wait(30)
            killed.append(term.identity)
            fleet.spawn(f"k{3 + round_number}")
        survivor = fleet.wait_for_term(other_than=set(killed))
    finally:
        fleet.stop_all()
    report = fleet.assert_safe(min_terms=3, all_worked=True)
    assert survivor.identity not in killed
    # The killed leaders never wrote "stop": their terms simply ended, and others followed.
    assert [t.identity for t in report.terms if not t.stopped][:2] == killed
    for (identity, token), at in killed_at.items():
        old, new = successor_of(report, identity, token)
        # Waited out the lease: the takeover came a whole ttl after the last renewal, whose
        # deadline (ttl - margin after it) bounds the killed child's last line, so the gap is at
        # least the margin (half of it here, for scheduling slack; a CAS release takes ~0.1 s).
        assert new.start - old.end >= MARGIN / 2, (identity, new.start - old.end, report.summary())
        # ...and no later than ttl + a poll after the crash, plus generous slack for a busy host:
        # a poller that stopped polling would leave it to the engine's monitor_timeout (30 s).
        assert new.start - at < TTL + POLL + 10, (identity, new.start - at, report.summary())


def test_sigstop_past_the_lease_then_sigcont_never_overlaps(server, tmp_path, name):
    fleet = Fleet(f"{server.url}?{FAST}", tmp_path, name, child="process", grace=1.0)
    for i in range(3):
        fleet.spawn(f"s{i}")
    try:
        paused = fleet.wait_for_term()
        stopped_at = clock.monotonic()
        fleet.signal(paused.identity, signal.SIGSTOP)  # the crown's process; its child runs on
        try:
            successor = fleet.wait_for_term(other_than={paused.identity}, timeout=30)
            time.sleep(max(0.0, stopped_at + 2 * TTL - clock.monotonic()))  # well past the lease
        finally:
            fleet.signal(paused.identity, signal.SIGCONT)
        time.sleep(1.0)  # the resumed crown finds its lease gone and carries on as a follower
        assert fleet.processes[paused.identity].poll() is None
    finally:
        fleet.stop_all()
    fleet.assert_succeeded(paused, successor)  # the paused leader's child stopped first


@pytest.mark.parametrize("restart, down_for", [("restart", 0.5), ("crash_restart", 1.0)])
def test_memcached_restart_ends_the_term_and_a_later_one_starts(fresh_server, tmp_path, name, restart, down_for):
    """SIGTERM (or SIGKILL), down a while, up again empty on the same port."""
    fleet = Fleet(f"{fresh_server.url}?{FAST}", tmp_path, name)
    fleet.spawn_many(3, "r")
    try:
        before, after = fleet.term_across(lambda: getattr(fresh_server, restart)(down_for=down_for))
        time.sleep(0.2)
    finally:
        fleet.stop_all()
    fleet.assert_succeeded(before, after)


def test_flush_all_ends_the_term_and_a_later_one_starts(server, tmp_path, name):
    fleet = Fleet(f"{server.url}?{FAST}", tmp_path, name)
    fleet.spawn_many(3, "f")
    try:
        before = fleet.wait_for_term()
        flushed_at = clock.monotonic()
        server.flush_all()
        after = fleet.wait_for_new_term(after=flushed_at, timeout=40)
        time.sleep(0.2)
    finally:
        fleet.stop_all()
    # The key vanished while the leader ran: the next term began only after the old one ended
    # (at the leader's next renewal) and after the claimant's quarantine.
    fleet.assert_succeeded(before, after)
    assert after.start - flushed_at >= TTL - 0.1  # quarantine: one ttl after the add


# A daemon slow to honour SIGTERM (the normal case): it works 1.5 s more, within a grace of 2 s.
STOP_DELAY, GRACE = 1.5, 2.0


def slow_fleet(srv, tmp_path, name):
    return Fleet(f"{srv.url}?{FAST}", tmp_path, name, child="command", grace=GRACE, stop_delay=STOP_DELAY)


def assert_replaced_without_overlap(fleet, before, after, faulted_at):
    """The journal's verdict on one leader replaced after a fault: the old term's last line comes
    before the new term's first, tokens rise. Returns (old term, the successor's wait)."""
    report = fleet.assert_safe(min_terms=2, all_worked=True)
    old = [t for t in report.terms if (t.identity, t.token) == (before.identity, before.token)][0]
    assert old.end < after.start, report.summary()
    assert after.token > before.token, report.summary()
    return old, after.start - faulted_at


@pytest.mark.parametrize("fault", ["delete", "flush_all"])
def test_revocation_with_a_child_slow_to_stop_never_overlaps(server, tmp_path, name, fault):
    # Someone else deletes the leader's key (or flushes the cache): the leader learns it at its
    # next renewal and SIGTERMs its command, which would work 1.5 s more. A claimant finds no key
    # and waits a whole ttl of quarantine, by which time the old leader's deadline (when its
    # command is SIGKILLed, however slow its stop) is at least the margin in the past.
    fleet = slow_fleet(server, tmp_path, name)
    for i in range(3):
        fleet.spawn(f"v{i}")
    client = Client(server.address, default_noreply=False)
    try:
        before = fleet.wait_for_term()
        faulted_at = clock.monotonic()
        if fault == "delete":
            assert client.delete("crown_sync:" + name, noreply=False) is True  # the lease existed
        else:
            server.flush_all()
        after = fleet.wait_for_new_term(after=faulted_at, timeout=40)
        time.sleep(0.2)
    finally:
        client.close()
        fleet.stop_all()
    old, waited = assert_replaced_without_overlap(fleet, before, after, faulted_at)
    # The revoked command did not get its 1.5 s: the deadline (at most ttl - margin = 1.5 s after
    # the renewal before the fault, SIGTERM came after it) cut it short, so it never wrote "stop".
    assert not old.stopped, (old, waited)
    print(f"{fault}: successor started {waited:.3f} s after the fault; old child's last line "
          f"{old.end - faulted_at:.3f} s after it")


def test_memcached_restart_while_the_leader_is_paused_never_overlaps(fresh_server, tmp_path, name):
    # The leader's crown process is SIGSTOPped (its command runs on, held to the term's deadline
    # by its supervisor) and memcached restarts empty meanwhile: a follower finds no key, waits a
    # ttl of quarantine and leads; the paused leader, resumed, finds its lease gone.
    fleet = slow_fleet(fresh_server, tmp_path, name)
    for i in range(3):
        fleet.spawn(f"p{i}")
    try:
        before = fleet.wait_for_term()
        fleet.signal(before.identity, signal.SIGSTOP)
        try:
            wait_until(lambda: process_state(fleet.processes[before.identity].pid) == "T", timeout=10)
            restarted_at = clock.monotonic()
            fresh_server.restart(down_for=0.2)
            after = fleet.wait_for_new_term(after=restarted_at, timeout=40)
            assert after.identity != before.identity
        finally:
            fleet.signal(before.identity, signal.SIGCONT)
        time.sleep(1.0)  # the resumed crown finds its lease gone and carries on as a follower
        assert fleet.processes[before.identity].poll() is None
    finally:
        fleet.stop_all()
    old, waited = assert_replaced_without_overlap(fleet, before, after, restarted_at)
    print(f"restart during pause: successor started {waited:.3f} s after the restart began; old "
          f"child's last line {old.end - restarted_at:.3f} s after it")


def test_eviction_of_the_lease_ends_the_term_safely(tmp_path, name):
    # A tiny cache with memcached 1.4's flat LRU: a busy key is evicted like any other (the
    # segmented LRU of 1.6 keeps a key that is read often, which is good for users but slow to test).
    with MemcachedServer(memory_mb=2, extra_args=["-o", "no_lru_maintainer"]) as srv:
        srv.start()
        fleet = Fleet(f"{srv.url}?{FAST}", tmp_path, name)
        for i in range(3):
            fleet.spawn(f"e{i}")
        client = Client(srv.address, default_noreply=False)
        key = "crown_sync:" + name
        try:
            before = fleet.wait_for_term()
            size = len(client.get(key))
            evicted_at = None
            filler = 0
            for burst in range(40):
                # Filler items exactly the lease's size (key and value) land in its slab class
                # and push it out of that class's LRU.
                batch = {f"{key[:-8]}{filler + i:08d}": b"z" * size for i in range(3000)}
                filler += len(batch)
                client.set_many(batch, expire=0, noreply=True)
                if client.get(key) is None:
                    evicted_at = clock.monotonic()
                    break
            assert evicted_at is not None, "the lease key was never evicted"
            assert int(srv.stats()["evictions"]) > 0
            after = fleet.wait_for_new_term(after=evicted_at, timeout=40)
            time.sleep(0.2)
        finally:
            client.close()
            fleet.stop_all()
        report = fleet.assert_safe(min_terms=2, all_worked=True)
        assert after.token > before.token
        old = [t for t in report.terms if t.token == before.token][0]
        assert old.end < after.start


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize(
    "url, words",
    [
        ("memcached://a:11211,b:11211", ["one server"]),
        ("memcached://127.0.0.1:11211?bogus=1", ["bogus", "ttl"]),
        ("memcached://127.0.0.1:11211?ttl=0.5", ["ttl"]),
        ("memcached://127.0.0.1:11211?ttl=soon", ["ttl"]),
        ("memcached://127.0.0.1:11211?ttl=2&renew_interval=1", ["renew_interval"]),
        ("memcached://127.0.0.1:11211?ttl=2&margin=1.5", ["margin"]),
        ("memcached://127.0.0.1:11211?ttl=100&margin=0.5", ["margin", "ttl / 100", "clock"]),
        ("memcached://127.0.0.1:11211?ttl=2&poll_interval=5", ["poll_interval"]),
        ("memcached://127.0.0.1:11211?ttl=2&timeout=0", ["timeout"]),
        ("memcached://127.0.0.1:11211?ttl=1&ttl=2", ["ttl"]),
        ("memcached://127.0.0.1:notaport", ["port"]),
        ("memcached://127.0.0.1:11211/somewhere", ["path"]),
        ("memcached:///", ["host"]),
    ],
)
def test_bad_urls_are_value_errors_naming_the_problem(url, words):
    with pytest.raises(ValueError) as info:
        crown_sync.oracle_from_url(url)
    for word in words:
        assert word in str(info.value)
    with pytest.raises(ValueError):
        crown_sync.Crown("job", oracle=url)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="one server"):
        MemcachedOracle(["a:1", "b:2", "c:3"])
    with pytest.raises(ValueError, match="one server"):
        MemcachedOracle("a:1,b:2")
    with pytest.raises(TypeError, match="ttl"):
        MemcachedOracle("a:1", ttl="10")
    with pytest.raises(TypeError, match="key_prefix"):
        MemcachedOracle("a:1", key_prefix=5)
    with pytest.raises(ValueError, match="key_prefix"):
        MemcachedOracle("a:1", key_prefix="has space")
    with pytest.raises(TypeError, match="clock"):
        MemcachedOracle("a:1", clock=12.5)


@pytest.mark.parametrize("ttl, margin", [(1, 0.25), (2.5, 0.625), (4, 1.0), (10, 1.0), (60, 6.0), (3600, 360.0)])
def test_the_default_margin_is_a_second_or_a_tenth_of_a_long_ttl(ttl, margin):
    # The margin covers the child's kill and the scheduler (about a second, less for short leases)
    # and the rate difference of the hosts' clocks, which grows with the time measured.
    oracle = MemcachedOracle("a:1", ttl=ttl)
    assert oracle.margin == pytest.approx(margin)
    assert oracle.renew_interval == pytest.approx((ttl - margin) / 3)
    MemcachedOracle("a:1", ttl=ttl, margin=ttl / 100)  # the smallest margin accepted


def test_a_password_never_reaches_the_message():
    with pytest.raises(ValueError) as info:
        crown_sync.oracle_from_url("memcached://user:hunter2@127.0.0.1:11211")
    assert "hunter2" not in str(info.value)


def test_url_options_reach_the_oracle():
    oracle = crown_sync.oracle_from_url(
        "memcached://127.0.0.1:12345?ttl=6&margin=0.5&renew_interval=1&poll_interval=0.1&key_prefix=app:"
    )
    assert isinstance(oracle, MemcachedOracle)
    assert (oracle.host, oracle.port, oracle.ttl, oracle.margin) == ("127.0.0.1", 12345, 6.0, 0.5)
    assert (oracle.renew_interval, oracle.poll_interval, oracle.key_prefix) == (1.0, 0.1, "app:")
    assert oracle.description == "memcached://127.0.0.1:12345"
    default = MemcachedOracle("localhost")
    assert default.port == 11211 and default.renew_interval == pytest.approx(3.0)


# --------------------------------------------------------------------------- unreachable

def test_unreachable_server_raises_from_contender_calls_with_the_server_named():
    oracle = MemcachedOracle(("127.0.0.1", free_port()), ttl=2)
    contender = oracle.contender("x", "me", {}, lambda lost=False: None)
    with pytest.raises(MemcachedError, match=r"memcached://127\.0\.0\.1:\d+"):
        contender.claim()
    with pytest.raises(MemcachedError):
        oracle.find_leader("x")
    contender.close()
    oracle.close()


# --------------------------------------------------------------------------- contender level

def test_quarantine_after_the_key_vanished_then_tokens_rise_across_flush_and_restart(fresh_server):
    oracle = oracle_for(fresh_server)
    tokens = []
    for fault in ("first use", "flush_all", "restart"):
        if fault == "flush_all":
            fresh_server.flush_all()
        elif fault == "restart":
            fresh_server.restart()
        contender = oracle.contender("q", f"q-{len(tokens)}", {}, Signals())
        started = clock.monotonic()
        claim = contender.claim()
        assert not claim.won and claim.leader is None  # it holds the key but must wait a ttl
        assert oracle.find_leader("q") is None
        claim = lead(contender)
        assert clock.monotonic() - started >= oracle.ttl
        assert oracle.find_leader("q").token == claim.token
        tokens.append(claim.token)
        contender.close()  # closing without abdicate vacates (never "released")
    assert tokens == sorted(set(tokens)), tokens
    oracle.close()


def test_a_follower_takes_over_a_silent_leader_only_after_a_whole_ttl(server, name):
    oracle = oracle_for(server)
    a = oracle.contender(name, "a", {"n": 1}, Signals())
    first = lead(a)
    signals = Signals()
    b = oracle.contender(name, "b", {}, signals)
    claim = b.claim()
    assert not claim.won and claim.leader.identity == "a" and claim.leader.metadata == {"n": 1}
    seen_at = clock.monotonic()
    assert b.watch(claim.leader)
    # "a" renews for a while: the follower never takes over meanwhile.
    for _ in range(6):
        time.sleep(0.2)
        assert a.refresh().won
        assert not b.claim().won
        assert b.watch(None)
    # Now "a" falls silent (as if paused): the follower is told once the record went stale.
    silent_at = clock.monotonic()
    signals.wait(10)
    claim = b.claim()
    assert claim.won and claim.token > first.token
    assert clock.monotonic() - silent_at >= oracle.ttl - 0.2  # the last renewal's bytes for a ttl
    assert clock.monotonic() - seen_at >= oracle.ttl
    # The paused leader's next renewal fails; its abdicate never frees b's lease (CAS).
    assert not a.refresh().won
    a.abdicate()
    assert oracle.find_leader(name).identity == "b"
    assert b.refresh().won
    b.abdicate()
    assert oracle.find_leader(name) is None
    for c in (a, b):
        c.close()
    oracle.close()


def test_a_watching_follower_answers_the_engines_periodic_claims_without_a_request(server, name):
    oracle = oracle_for(server, ttl=4.0, poll_interval=0.05)
    a = oracle.contender(name, "a", {}, Signals())
    lead(a, timeout=15)
    b = oracle.contender(name, "b", {}, Signals())
    assert not b.claim().won and b.watch(None)
    time.sleep(0.2)  # the poller has read the record since
    before = b.requests
    claim = b.claim()
    assert not claim.won and claim.leader.identity == "a"
    assert b.requests == before
    assert b.watch(claim.leader)
    assert not b.claim().won  # and again, still no request while the poller is fresh
    assert b.requests <= before + 1  # (at most the poller's own read in between)
    a.abdicate()
    for c in (a, b):
        c.close()
    oracle.close()


def test_graceful_release_is_seen_by_the_poller_and_taken_at_once(server, name):
    oracle = oracle_for(server)
    a, first, b, signals = leader_and_watcher(oracle, name)
    a.abdicate()
    signals.wait(10)
    claim = b.claim()
    assert claim.won and claim.token > first.token
    assert claim.deadline > clock.monotonic()
    a.abdicate()  # idempotent, and b's lease is untouched
    assert b.refresh().won
    b.close()
    a.close()
    oracle.close()


def test_dismiss_makes_the_leader_step_down_and_its_release_lets_the_next_in(server, name):
    oracle = oracle_for(server)
    assert oracle.dismiss(name) is False  # nobody leads
    a, first, b, signals = leader_and_watcher(oracle, name)
    assert oracle.dismiss(name) is True
    assert oracle.find_leader(name) is None
    signals.wait(10)  # the record changed hands (to "vacated")
    assert not b.claim().won  # a's child may still run until a notices: b must wait
    assert b.watch(None)
    dismissed = a.refresh()  # a notices at its next renewal...
    assert not dismissed.won
    assert dismissed.yield_for >= 2 * oracle.poll_interval  # ...and stays out while b takes over
    a.abdicate()  # its child has stopped: now it vouches for that with a "released" record
    signals.wait(10)
    claim = b.claim()
    assert claim.won and claim.token > first.token
    assert oracle.dismiss(name) is True
    for c in (a, b):
        c.close()
    oracle.close()


def test_a_poller_whose_takeover_was_cut_off_keeps_polling_and_takes_over(server, name):
    oracle = oracle_for(server)
    with FaultProxy(server.address) as proxy:
        via = oracle_for(proxy)
        a, first, b, signals = leader_and_watcher(oracle, name, via)
        # b's poller reads the release below, then its takeover CAS dies with the connection.
        proxy.cut_next(lambda chunk: chunk.startswith((b"cas ", b"ms ")))  # a CAS (classic or meta)
        a.abdicate()
        signals.wait(10)  # the next poll read the release again and took it over
        assert proxy.cuts == 1
        claim = b.claim()
        assert claim.won and claim.token > first.token
        assert oracle.find_leader(name).identity == "b"
        b.abdicate()
        b.close()
        via.close()
    a.close()
    oracle.close()


def test_a_poller_whose_end_of_quarantine_was_cut_off_keeps_polling_and_leads(server, name):
    with FaultProxy(server.address) as proxy:
        oracle = oracle_for(proxy)
        signals = Signals()
        b = oracle.contender(name, "b", {}, signals)
        claim = b.claim()
        assert not claim.won and claim.leader is None  # a fresh key: pending, in quarantine
        # Pending renewals pass; the CAS that turns the pending record into "held" is cut.
        proxy.cut_next(lambda chunk: chunk.startswith((b"cas ", b"ms ")) and b'"state":"held"' in chunk)
        assert b.watch(None)
        signals.wait(10)
        assert proxy.cuts == 1
        claim = b.claim()
        assert claim.won
        assert oracle.find_leader(name).identity == "b"
        b.abdicate()
        b.close()
        oracle.close()


def test_a_crown_whose_takeover_was_cut_off_leads_long_before_monitor_timeout(server, name, tmp_path):
    path = str(tmp_path / "journal.jsonl")
    direct = oracle_for(server, ttl=TTL, margin=MARGIN)
    with FaultProxy(server.address) as proxy:
        via = oracle_for(proxy, ttl=TTL, margin=MARGIN)
        first = crown_sync.Crown(name, oracle=direct, identity="first",
                                 child=crown_sync.ThreadChild(journal.journaled_work, args=(path,)))
        # monitor_timeout far beyond the wait below: only the poller can bring this crown in.
        second = crown_sync.Crown(name, oracle=via, identity="second", monitor_timeout=300,
                                  child=crown_sync.ThreadChild(journal.journaled_work, args=(path,)))
        try:
            first.start()
            assert first.wait_for_leadership(timeout=30)
            second.start()
            wait_until(lambda: second.status().phase == "following" and second.status().leader is not None)
            time.sleep(0.2)  # its poller is watching
            proxy.cut_next(lambda chunk: chunk.startswith((b"cas ", b"ms ")))  # a CAS (classic or meta)
            first.stop(timeout=20)
            assert second.wait_for_leadership(timeout=30)
            assert proxy.cuts == 1
            time.sleep(0.2)
        finally:
            for crown in (first, second):
                crown.stop(timeout=20)
            via.close()
            direct.close()
    report = journal.check(path, name)
    assert report.ok, report.summary()
    assert [t.identity for t in report.terms] == ["first", "second"], report.summary()


class StuckClock:
    """A wall clock that never moves (stuck), or steps back a second at every read (backwards)."""

    def __init__(self, kind):
        self.kind = kind
        self.now = time.time()

    def __call__(self):
        if self.kind == "backwards":
            self.now -= 1.0
        return self.now


@pytest.mark.parametrize("kind", ["stuck", "backwards"])
def test_tokens_rise_from_the_previous_token_when_the_wall_clock_does_not(server, name, kind):
    # With a clock that never rises, only "previous token + 1" can make tokens rise.
    oracle = oracle_for(server, clock=StuckClock(kind))
    a_signals = Signals()
    a = oracle.contender(name, "a", {}, a_signals)
    tokens = [lead(a).token]
    floor = oracle.clock() * 1_000_000
    # Clean handoff: a releases, b's poller takes over.
    b_signals = Signals()
    b = oracle.contender(name, "b", {}, b_signals)
    assert not b.claim().won and b.watch(None)
    a.abdicate()
    b_signals.wait(10)
    tokens.append(b.claim().token)
    # Crash takeover: b falls silent, c takes the stale lease over after a ttl.
    c_signals = Signals()
    c = oracle.contender(name, "c", {}, c_signals)
    assert not c.claim().won and c.watch(None)
    c_signals.wait(10)
    claim = c.claim()
    assert claim.won
    tokens.append(claim.token)
    assert not b.refresh().won
    # Dismissal: c steps down and releases; a (watching) takes over.
    assert not a.claim().won and a.watch(None)
    assert oracle.dismiss(name) is True
    a_signals.wait(10)  # a's poller saw the "vacated" record: the engine would claim and watch
    assert not a.claim().won and a.watch(None)
    dismissed = c.refresh()
    assert not dismissed.won and dismissed.yield_for > 0
    c.abdicate()
    a_signals.wait(10)  # ...and then the release, which it took over
    claim = a.claim()
    assert claim.won
    tokens.append(claim.token)
    assert tokens == list(range(tokens[0], tokens[0] + 4)), tokens
    assert tokens[-1] > floor  # the clock never reached these: the previous token did
    for contender in (a, b, c):
        contender.close()
    oracle.close()


def test_a_lease_the_poller_won_long_ago_is_renewed_before_it_is_handed_over(server, name):
    oracle = oracle_for(server, ttl=4.0, margin=1.0)  # renew_interval 1 s
    a = oracle.contender(name, "a", {}, Signals())
    lead(a, timeout=20)
    signals = Signals()
    b = oracle.contender(name, "b", {}, signals)
    assert not b.claim().won and b.watch(None)
    a.abdicate()
    signals.wait(10)  # b's poller holds the lease now, waiting for the engine's claim
    time.sleep(1.5)  # the engine is late: the lease has at most 1.5 s left, < renew_interval + margin
    before = b.requests
    claim = b.claim()
    assert claim.won
    # Renewed before it was handed over: one meta-set over the CAS id its takeover returned
    # (a classic cas would need a gets first).
    assert b.requests == before + 1
    # The engine's first refresh is due in renew_interval: the term must outlast it by the margin.
    assert claim.deadline - clock.monotonic() > oracle.renew_interval + oracle.margin
    b.abdicate()
    for c in (a, b):
        c.close()
    oracle.close()


def test_monitor_leader_false_with_claims_rarer_than_the_record_expiry_still_leads(server, name, tmp_path):
    path = str(tmp_path / "journal.jsonl")
    oracle = oracle_for(server, ttl=1.5, margin=0.5)
    monitor_delay = oracle.record_expire + 1  # a record with that expiry would vanish between claims
    crowns = [
        crown_sync.Crown(name, oracle=oracle, child=crown_sync.ThreadChild(journal.journaled_work, args=(path,)),
                         identity=f"m{i}", monitor_leader=False, monitor_delay=monitor_delay,
                         monitor_timeout=monitor_delay)
        for i in range(2)
    ]
    try:
        for crown in crowns:
            crown.start()
        # The first claim holds the fresh key as pending; the next one, monitor_delay later, leads.
        leader = wait_until(lambda: next((c for c in crowns if c.is_leader()), None),
                            timeout=3 * monitor_delay + 10, interval=0.05)
        time.sleep(0.5)
        assert leader.is_leader()
    finally:
        for crown in crowns:
            crown.stop(timeout=20)
        oracle.close()
    report = journal.check(path, name)
    assert report.ok, report.summary()
    assert len(report.terms) >= 1 and report.terms[0].beats > 0, report.summary()


def test_the_leader_loses_at_once_when_its_record_is_replaced(server, name):
    oracle = oracle_for(server)
    a = oracle.contender(name, "a", {}, Signals())
    lead(a)
    client = Client(server.address, default_noreply=False)
    value, cas = client.gets("crown_sync:" + name)
    assert client.cas("crown_sync:" + name, value.replace(b'"held"', b'"vacated"'), cas)
    client.close()
    assert not a.refresh().won
    a.close()
    oracle.close()


def test_close_is_bounded_while_memcached_is_paused(fresh_server):
    oracle = oracle_for(fresh_server, timeout=0.5, connect_timeout=0.5)
    a = oracle.contender("p", "a", {}, Signals())
    lead(a)
    os.kill(fresh_server.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: process_state(fresh_server.pid) == "T", message="memcached stopped")
        result = {}
        refresher = threading.Thread(target=lambda: result.setdefault("r", _catch(a.refresh)))
        refresher.start()
        time.sleep(0.1)
        started = clock.monotonic()
        a.close()
        closed_in = clock.monotonic() - started
        refresher.join(10)
        assert not refresher.is_alive()
        # A refresh that cannot know is an error (or refused after close), never a win.
        assert isinstance(result.get("r"), Exception), result
        assert closed_in < 10, closed_in  # bounded (generously: this is not a speed test)
    finally:
        os.kill(fresh_server.pid, signal.SIGCONT)
    oracle.close()


def _catch(call):
    try:
        return call()
    except Exception as exc:
        return exc


def test_a_forked_child_cannot_touch_the_parents_connection(server, name):
    oracle = oracle_for(server)
    a = oracle.contender(name, "a", {}, Signals())
    lead(a)
    fd = a._store.socket().fileno()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: everything inherited must be inert
        code = 1
        try:
            os.close(read_end)
            try:
                a.refresh()
            except RuntimeError as exc:
                os.write(write_end, b"refused:" + str(exc).encode()[:100] + b"\n")
            a.close()  # must not vacate or release the parent's lease
            a.abdicate()
            try:  # the inherited descriptor is /dev/null now (or already closed): never the socket
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.write(write_end, b"still a socket\n")
                os.write(fd, b"flush_all\r\n")
            except OSError:
                pass
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    report = os.read(read_end, 4096)
    os.close(read_end)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert report.startswith(b"refused:") and b"fork" in report and b"still a socket" not in report
    assert a.refresh().won  # the parent's connection and lease are intact
    assert oracle.find_leader(name).identity == "a"
    a.abdicate()
    a.close()
    oracle.close()



# --------------------------------------------------------------------------- hostile neighbours (#17)


def test_a_co_tenant_overwriting_the_lease_ends_the_term_without_overlap(server, tmp_path, name):
    # Any client of a plain memcached can write the key: here it forges a "held" record of its own
    # (the leader's, with another identity and nonce) while the leader's command would work 1.5 s
    # past SIGTERM. The leader's next renewal sees the record replaced and ends the term (its
    # deadline cuts the command short); followers take the forged record over only once they
    # have seen it unchanged for a whole ttl. The leader says so: crown.leadership.lost.
    fleet = slow_fleet(server, tmp_path, name)
    fleet.spawn_many(3, "v")
    client = Client(server.address, default_noreply=False)
    try:
        before = fleet.wait_for_term()
        key = "crown_sync:" + name
        record = json.loads(client.get(key))
        record.update(identity="mallory", nonce="forged-by-a-co-tenant")
        faulted_at = clock.monotonic()
        assert client.set(key, json.dumps(record).encode(), noreply=False)
        after = fleet.wait_for_new_term(after=faulted_at, timeout=40)
        time.sleep(0.2)
    finally:
        client.close()
        fleet.stop_all()
    assert_replaced_without_overlap(fleet, before, after, faulted_at)
    lost = [e for e in fleet.events_of(before.identity) if e["event"] == "crown.leadership.lost"]
    assert [e["token"] for e in lost][:1] == [before.token], lost


@pytest.fixture(scope="module")
def tls_server():
    srv = MemcachedServer(memory_mb=16, client_certificates=True)
    srv.start()
    yield srv
    srv.cleanup()


def test_with_client_certificates_a_co_tenant_cannot_touch_the_lease(tls_server, tmp_path, name):
    fleet = Fleet(f"{tls_server.url}&{FAST}", tmp_path, name)
    fleet.spawn_many(2, "c")
    try:
        before = fleet.wait_for_term()
        # Plain, and TLS without a certificate: both turned away before any command runs.
        for context in (None, tls_server.tls_context(client_certificate=False)):
            intruder = Client(tls_server.address, tls_context=context, default_noreply=False,
                              connect_timeout=5, timeout=5)
            with pytest.raises((OSError, MemcacheError)):
                intruder.delete("crown_sync:" + name, noreply=False)
            intruder.close()
        time.sleep(TTL + 1)  # had the delete landed, the term would have ended by now
        assert fleet.running_term().identity == before.identity
    finally:
        fleet.stop_all()
    report = fleet.assert_safe(all_worked=True)
    assert [(t.identity, t.token) for t in report.terms] == [(before.identity, before.token)], report.summary()


def test_tls_verifies_the_servers_certificate(tls_server, name):
    client_cert = {"tls_cert": tls_server.client_certificate, "tls_key": tls_server.client_key}
    trusting = MemcachedOracle(tls_server.address, ttl=1.0, tls=True, tls_ca=tls_server.certificate, **client_cert)
    unverified = MemcachedOracle(tls_server.address, ttl=1.0, tls=True, **client_cert)  # the system's CAs
    try:
        assert trusting.find_leader(name) is None  # a round trip over TLS
        with pytest.raises(MemcachedError, match="CERTIFICATE_VERIFY_FAILED"):
            unverified.find_leader(name)
    finally:
        trusting.close()
        unverified.close()


@pytest.mark.parametrize("options, words", [
    ({"tls_ca": "/etc/hostname"}, "tls_ca given without TLS"),
    ({"tls": True, "tls_ca": "/nonexistent/ca.pem"}, "tls_ca '/nonexistent/ca.pem' cannot be used"),
    ({"tls": True, "tls_key": "/nonexistent/key.pem"}, "tls_key given without tls_cert"),
])
def test_bad_tls_options_are_value_errors_naming_the_option(options, words):
    with pytest.raises(ValueError, match=words):
        MemcachedOracle("127.0.0.1:11211", **options)


def test_an_open_server_is_said_once_and_one_with_client_certificates_not_at_all(server, tls_server, name, caplog):
    from crown_sync.oracles import memcached

    memcached._said_open.clear()
    caplog.set_level(logging.WARNING, logger="crown_sync.oracles.memcached")
    for srv in (server, server, tls_server):
        oracle = crown_sync.oracle_from_url(f"{srv.url}{'&' if srv.tls else '?'}ttl=1")
        oracle.find_leader(name)
        oracle.close()
    said = [r.getMessage() for r in caplog.records if "trusted network" in r.getMessage()]
    assert len(said) == 1 and f"127.0.0.1:{server.port}:" in said[0], said
