"""The NATS JetStream KV oracle against a real ``nats-server -js`` started by the suite.

Safety is judged by the independent journal that the leaders' children write themselves
(crown_sync.testing.journal), never by the oracle's word; faults are real: SIGTERM, SIGKILL, an
administrator's delete or purge of the key and a server restart while the leader's whole process
group is stopped, a bucket deleted and recreated.
"""

import contextlib
import logging
import os
import signal
import threading
import time

import pytest

import crown_sync
from crown_sync import clock
from crown_sync.oracles._lease import decode, encode
from crown_sync.oracles.nats import NatsError, NatsOracle
from crown_sync.testing.nats_server import NatsServer
from crown_sync.testing.servers import free_port

from .support import Fleet, process_state, wait_until

# Renewals every 0.5 s, failover ~2.5 s; a whole second of margin keeps a busy machine's
# scheduling delays from turning into journal overlaps. Releases are offered to one heir at once.
TTL, MARGIN = 2.5, 1.0
RENEW = (TTL - MARGIN) / 3  # the default renew_interval
FAST = {"ttl": TTL, "margin": MARGIN, "poll_interval": 1}


@pytest.fixture(scope="module")
def server():
    srv = NatsServer().start()
    yield srv
    srv.cleanup()


@pytest.fixture
def fresh_server():
    """A server of the test's own (restarted, or its bucket deleted, by it)."""
    srv = NatsServer().start()
    yield srv
    srv.cleanup()


@pytest.fixture
def name(request):
    # One election per test on the shared server (a NATS KV key: no brackets).
    return "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name)[:100]


def oracle_for(srv, **options):
    options = dict(FAST, **options)
    return NatsOracle(f"{srv.host}:{srv.port}", user=srv.user, password=srv.password, **options)


class Signals:
    """on_change callbacks received by a contender."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, lost=False):
        self.event.set()


def released(oracle, name, token=1):
    """Seed the key with a released record, as a clean stop leaves it: no quarantine to wait."""
    store = oracle.new_store()
    try:
        assert store.create(oracle.key(name), encode({"state": "released", "token": token}), 10)
    finally:
        store.close()


def lead(contender, timeout=15.0):
    """Claim until won (a fresh key first goes through the quarantine)."""
    def attempt():
        claim = contender.claim()
        return claim if claim.won else None
    return wait_until(attempt, timeout=timeout, interval=0.05, message="leadership")


@contextlib.contextmanager
def leader_and_follower(leader_oracle, follower_oracle, name):
    """A leader holding ``name`` (seeded released: no quarantine) and a follower watching it:
    (leader, follower, the follower's Signals, its refused claim); both closed at the end."""
    leader = leader_oracle.contender(name, "leader", {}, Signals())
    signals = Signals()
    follower = follower_oracle.contender(name, "follower", {}, signals)
    try:
        released(leader_oracle, name)
        lead(leader, timeout=5)
        claim = follower.claim()
        assert not claim.won and claim.leader.identity == "leader"
        assert follower.watch(claim.leader)
        yield leader, follower, signals, claim
    finally:
        follower.close()
        leader.close()


def term_of(report, term):
    return [t for t in report.terms if (t.identity, t.token) == (term.identity, term.token)][0]


# ------------------------------------------------------------------------ the store primitives

def test_store_primitives_on_the_real_server(server, name):
    oracle = oracle_for(server)
    store = oracle.new_store()
    try:
        assert store.read(name) == (None, None)
        assert store.create(name, b"one", 10) is True
        assert store.create(name, b"two", 10) is False  # present: create refuses
        value, first = store.read(name)
        assert value == b"one"
        assert store.replace(name, b"two", first, 10) is True
        value, second = store.read(name)
        assert (value, second > first) == (b"two", True)  # the revision rises
        assert store.replace(name, b"stale", first, 10) is False  # CAS on an old revision
        server.admin("delete", key=name)
        assert store.read(name) == (None, None)  # a delete marker reads as absent
        assert store.replace(name, b"x", second, 10) is None  # ...and a CAS finds it absent
        never = name + "-never"
        assert store.replace(never, b"x", None, 10) is None  # never update(last=0): that creates
        assert store.read(never) == (None, None)
        assert store.create(name, b"again", 10) is True  # create over a delete marker
        server.admin("purge", key=name)
        assert store.read(name) == (None, None)
        floor = store.token_floor()
        info = server.admin("info")
        assert floor > info.state.last_seq  # creation time (us) + last revision + 1
    finally:
        store.close()
        oracle.close()


def test_tokens_rise_across_a_bucket_deleted_and_recreated(fresh_server, name):
    oracle = oracle_for(fresh_server, ttl=1, margin=0.25, poll_interval=0.2)  # three quarantines: keep them short
    tokens = []
    try:
        for round_number in range(2):
            contender = oracle.contender(name, f"me{round_number}", {}, Signals())
            tokens.append(lead(contender).token)
            contender.abdicate()
            contender.close()
            # Revisions restart at 1 in a recreated bucket; its creation time is later.
            fresh_server.admin("delete_bucket")
            time.sleep(0.01)
        contender = oracle.contender(name, "me2", {}, Signals())
        tokens.append(lead(contender).token)
        contender.close()
    finally:
        oracle.close()
    assert tokens == sorted(set(tokens)), tokens


# ---------------------------------------------------------------------------- offered, not polled

def test_a_release_is_offered_to_the_follower_long_before_its_next_poll(server, name):
    # Followers poll every 4 s here: a follower that learns of the release within 2 s heard it
    # from the heir offer (its poller read once when it began to watch, then sleeps 4 s).
    oracle = oracle_for(server, ttl=10, margin=1, poll_interval=4)
    try:
        with leader_and_follower(oracle, oracle, name) as (leader, follower, signals, claim):
            # The leader renews by one update over its own last revision (no read first).
            renewing = leader.requests
            assert leader.refresh().won and leader.requests - renewing == 1
            time.sleep(0.5)  # the poller's first read is done; its next is 4 s away
            assert not signals.event.is_set()
            before = (leader.requests, follower.requests)
            released_at = clock.monotonic()
            leader.abdicate()
            assert signals.event.wait(2.0), "the release was not offered (the follower waited for its poll)"
            won = follower.claim()
            # The release is one update over the leader's last revision; the heir reads the key
            # (the offer's own bytes are never trusted) and takes over by one update (no stream
            # info: the record's token plus one is the new term's).
            assert won.won and won.token == claim.leader.token + 1
            assert (leader.requests - before[0], follower.requests - before[1]) == (1, 2)
            print(f"release offered and taken over in {clock.monotonic() - released_at:.4f} s")
    finally:
        oracle.close()


def test_two_processes_taking_turns_hand_over_by_offer_every_time(server, name):
    """Polls every 30 s: only the heir offer hands over in time. A process that releases leaves
    the key's heir group (so NATS does not offer the release back to it); it must be back in it
    once it follows again, or the other's next release has nobody to offer to (a 15 to 30 s wait)."""
    oracles = [oracle_for(server, ttl=60, poll_interval=30) for _ in range(2)]
    signals = [Signals(), Signals()]
    contenders = [oracle.contender(name, f"p{i}", {}, signals[i]) for i, oracle in enumerate(oracles)]
    try:
        released(oracles[0], name)
        lead(contenders[0], timeout=5)
        for turn in range(5):
            holder, waiter = contenders[turn % 2], contenders[(turn + 1) % 2]
            claim = waiter.claim()
            assert not claim.won and waiter.watch(claim.leader)
            time.sleep(0.5)  # settled: the waiter watching, back in the group
            signals[(turn + 1) % 2].event.clear()
            holder.abdicate()
            assert signals[(turn + 1) % 2].event.wait(5.0), f"release {turn} was not offered to the follower"
            assert waiter.claim().won
            time.sleep(0.5)  # the takeover's pushes reach the other process before it follows again
    finally:
        for contender in contenders:
            contender.close()
        for oracle in oracles:
            oracle.close()


def test_the_heir_subscription_is_remade_after_a_server_restart(fresh_server, name):
    # The oracle's connection dies with the server; it reconnects at the next call and must
    # join the key's heir group again, or the follower hears of the next release only at a poll (3 s).
    oracle = oracle_for(fresh_server, ttl=6, margin=1, poll_interval=3)
    try:
        with leader_and_follower(oracle, oracle, name) as (leader, follower, signals, claim):
            fresh_server.restart()
            assert wait_until(lambda: leader.refresh().won, timeout=10)  # the leader reconnects
            store = oracle.shared_store()  # white box: when the oracle's one connection has reconnected
            wait_until(lambda: store._nc is not None and store._nc.is_connected, timeout=20,
                       message="the follower reconnected")
            time.sleep(0.5)  # its read right after reconnecting is done; its next poll is ~2.5 s away
            signals.event.clear()
            leader.abdicate()
            assert signals.event.wait(1.0), "the release was not offered after the restart"
    finally:
        oracle.close()


def test_a_forged_heir_offer_never_takes_a_held_lease(server, name):
    # Anyone allowed to publish on the heir subject can send a "released" record with the held
    # lease's current revision: a follower that took that message's record for the key's would win
    # the CAS over the revision while the leader still holds (two leaders; the token from the
    # forged record). The offer may only make the follower read the key at once.
    leader_oracle = oracle_for(server, ttl=6, margin=1, poll_interval=3)
    follower_oracle = oracle_for(server, ttl=6, margin=1, poll_interval=3)
    try:
        with leader_and_follower(leader_oracle, follower_oracle, name) as (leader, follower, signals, _):
            time.sleep(0.5)  # the follower's first read is done
            store = leader_oracle.shared_store()
            key = leader_oracle.key(name)
            value, revision = store.read(key)
            forged = dict(decode(value), state="released")
            publish = store._nc.publish(leader_oracle.heir_subject(key), encode(forged),
                                        headers={"Crown-Sync-Revision": str(revision), "Crown-Sync-Hops": "0"})
            store._loop.submit(publish).result(5)
            time.sleep(1.0)  # far more than a takeover takes (milliseconds)
            assert not signals.event.is_set(), "the follower acted on a forged offer"
            assert not follower.claim().won
            assert leader.refresh().won  # the leader's lease was never taken
    finally:
        follower_oracle.close()
        leader_oracle.close()


def test_a_release_wakes_one_followers_process_alone(server, name):
    # Six followers, each on an oracle of its own (as in a process of its own), polls every 30 s:
    # one of them is offered the release and takes it over; the others hear of neither the release
    # nor the takeover (before: every process's push consumer got both, and each told its engine
    # of the new term).
    oracles = [oracle_for(server, ttl=60, poll_interval=30) for _ in range(7)]
    leader = oracles[0].contender(name, "leader", {}, Signals())
    followers = []
    try:
        released(oracles[0], name)
        lead(leader, timeout=5)
        for index, oracle in enumerate(oracles[1:]):
            signals = Signals()
            follower = oracle.contender(name, f"f{index}", {}, signals)
            followers.append((follower, signals))
            claim = follower.claim()
            assert not claim.won and follower.watch(claim.leader)
        time.sleep(1.0)  # every follower's first read done, every process in the heir group
        for _, signals in followers:
            signals.event.clear()
        leader.abdicate()
        wait_until(lambda: any(signals.event.is_set() for _, signals in followers), timeout=5, message="an heir")
        heirs = [follower for follower, signals in followers if signals.event.is_set()]
        assert len(heirs) == 1 and heirs[0].claim().won
        time.sleep(1.0)  # what a push of the takeover would have done by now
        assert sum(signals.event.is_set() for _, signals in followers) == 1
    finally:
        for contender in [leader] + [follower for follower, _ in followers]:
            contender.close()
        for oracle in oracles:
            oracle.close()


class Watcher:
    """What the store nudges (a LeaseContender's part of it): following, and ignoring nudges."""

    watching = True

    def nudge(self, pushed=None, turn=0.0):
        return True


def test_watching_a_key_again_and_again_leaves_no_subscriptions_behind(server, name):
    # Each watch of a key makes its heir subscription (once per key, whatever the watchers); the
    # last unwatch takes it away: counted by the server.
    oracle = oracle_for(server, ttl=6, margin=1, poll_interval=3)
    store = oracle.shared_store()
    key = oracle.key(name)
    try:
        store.read(key)  # connected
        baseline = server._monitor("subsz")["num_subscriptions"]
        for _ in range(5):
            watchers = [Watcher() for _ in range(3)]
            for watcher in watchers:
                store.watch(key, watcher)
            for watcher in watchers:
                store.unwatch(key, watcher)
        wait_until(lambda: server._monitor("subsz")["num_subscriptions"] <= baseline, timeout=10,
                   message="subscriptions back to the baseline")
    finally:
        oracle.close()


# --------------------------------------------------------------------- processes and faults

def fleet_for(srv, tmp_path, name, **options):
    """A Fleet on a key left as a clean stop leaves it: the first leader waits no quarantine."""
    oracle = oracle_for(srv)
    try:
        released(oracle, name)
    finally:
        oracle.close()
    return Fleet(srv.url_for(**FAST), tmp_path, name, **options)


def sigterm_leader(fleet, term) -> float:
    """SIGTERM ``term``'s process (a clean stop: child, then CAS release) and wait for its exit;
    returns when it was signalled."""
    at = clock.monotonic()
    fleet.signal(term.identity, signal.SIGTERM)
    fleet.wait_exit(term.identity)
    return at


def successor_delays(report, signalled):
    """{identity: seconds from its signal to its successor's start}, from the journal."""
    delays = {}
    for (identity, token), at in signalled.items():
        index = [i for i, t in enumerate(report.terms) if (t.identity, t.token) == (identity, token)][0]
        delays[identity] = report.terms[index + 1].start - at
    return delays


def test_contention_and_graceful_handoffs_between_processes(server, tmp_path, name):
    fleet = fleet_for(server, tmp_path, name)
    for i in range(3):
        fleet.spawn(f"c{i}")
    signalled = {}
    try:
        for round_number in range(2):
            term = fleet.wait_for_term()
            signalled[(term.identity, term.token)] = sigterm_leader(fleet, term)
            fleet.spawn(f"c{3 + round_number}")
        fleet.wait_for_term()
    finally:
        fleet.stop_all()
    report = fleet.assert_safe(min_terms=3)
    for identity, delay in successor_delays(report, signalled).items():
        # The successor took the released record, offered to it: taking over a silent record
        # instead needs it unchanged for a ttl after the leader's last renewal, which came at
        # most renew_interval before the signal, so it could not come sooner than 2 s after it.
        assert delay < TTL - RENEW - 0.1, (identity, delay, report.summary())


def test_a_leader_that_exits_right_after_its_release_still_hands_over_at_once(server, tmp_path, name):
    """Polls every 30 s: only the heir offer hands over in time. The releasing process stayed in
    the key's heir group; when NATS picked it and it exited right after its release (SIGTERM),
    the offer was lost and its follower waited 15 to 30 s (3 of 10 handoffs in the benchmark)."""
    oracle = oracle_for(server)
    try:
        released(oracle, name)
    finally:
        oracle.close()
    fleet = Fleet(server.url_for(**dict(FAST, ttl=60, poll_interval=30)), tmp_path, name)
    fleet.spawn("h0")
    signalled = {}
    try:
        for round_number in range(5):
            term = fleet.wait_for_term()
            fleet.spawn(f"h{round_number + 1}")
            time.sleep(3.0)  # the new follower is watching (else it claims as it starts: no offer)
            signalled[(term.identity, term.token)] = sigterm_leader(fleet, term)
        fleet.wait_for_term()
    finally:
        fleet.stop_all()
    report = fleet.assert_safe(min_terms=6)
    for identity, delay in successor_delays(report, signalled).items():
        assert delay < 5.0, (identity, delay, report.summary())  # a lost offer: 15 to 30 s


def test_sigkill_of_the_leader_fails_over_after_its_lease(server, tmp_path, name):
    fleet = fleet_for(server, tmp_path, name, child="process", grace=1.0)
    for i in range(3):
        fleet.spawn(f"k{i}")
    try:
        before = fleet.wait_for_term()
        killed_at = clock.monotonic()
        fleet.signal(before.identity, signal.SIGKILL)
        after = fleet.wait_for_term(other_than={before.identity}, timeout=30)
    finally:
        fleet.stop_all()
    report = fleet.assert_safe(min_terms=2)
    old = term_of(report, before)
    # A crashed leader's record is taken over only once unchanged for a ttl: by then its
    # deadline is at least the margin in the past (half of it here, for scheduling slack).
    assert after.start - old.end >= MARGIN / 2, report.summary()
    assert after.token > before.token
    print(f"crash failover: {after.start - killed_at:.3f} s")


# A purge takes the path of a delete (both leave a marker that reads as an empty key: see the
# primitives test above); the chaos runs purge at random.
@pytest.mark.parametrize("fault", ["delete", "delete_bucket", "restart"])
def test_a_fault_while_the_leaders_group_is_stopped_never_overlaps(fresh_server, tmp_path, name, fault):
    # The leader's whole process group is stopped (Ctrl-Z); its command runs on in its own
    # session, held to the term's deadline by its supervisor, and would work 1.5 s after SIGTERM.
    # Meanwhile an administrator deletes the key, or deletes the whole bucket (a
    # claimant finds the key empty, recreating the bucket, and waits a ttl of quarantine), or the
    # server restarts (the record survives in the file store and is taken over once unchanged for
    # a ttl). Either way the successor starts after the old child's last line.
    fleet = fleet_for(fresh_server, tmp_path, name, child="command", grace=2.0, stop_delay=1.5)
    for i in range(2):
        fleet.spawn(f"p{i}")
    try:
        before = fleet.wait_for_term()
        group = fleet.processes[before.identity].pid
        os.killpg(group, signal.SIGSTOP)
        try:
            wait_until(lambda: process_state(group) == "T", timeout=10, message="the leader stopped")
            faulted_at = clock.monotonic()
            if fault == "restart":
                fresh_server.restart(down_for=0.2)
            else:
                assert fresh_server.admin("get", key=name) is not None  # the lease was there
                fresh_server.admin(fault, key=None if fault == "delete_bucket" else name)
            after = fleet.wait_for_term(other_than={before.identity}, after=faulted_at, timeout=40)
        finally:
            os.killpg(group, signal.SIGCONT)
        time.sleep(1.0)  # the resumed crown finds its lease gone and carries on as a follower
        assert fleet.processes[before.identity].poll() is None
    finally:
        fleet.stop_all()
    report = fleet.assert_safe(min_terms=2)
    old = term_of(report, before)
    assert old.end < after.start, report.summary()
    assert after.token > before.token, report.summary()
    print(f"{fault} during a stop: successor {after.start - faulted_at:.3f} s after the fault, "
          f"old child's last line {old.end - faulted_at:.3f} s after it")


# ------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("url, words", [
    ("nats://127.0.0.1:4222?tll=3", ["tll", "accepted"]),
    ("nats://127.0.0.1:4222?bucket=a.b", ["bucket"]),
    ("nats://a:4222,b:4222", ["one server"]),
    ("nats://127.0.0.1:4222/bucket", ["path"]),
    ("nats://127.0.0.1:99999", ["port"]),
    ("nats://127.0.0.1?key_prefix=.x", ["key_prefix"]),
    ("nats://127.0.0.1?ttl=10&bucket_max_age=5", ["bucket_max_age"]),
    ("nats://127.0.0.1?ttl=0.5", ["ttl"]),
    ("nats://127.0.0.1?tls_ca=/etc/hostname", ["tls_ca", "tls://"]),
    ("tls://127.0.0.1?tls_ca=/nonexistent/ca.pem", ["tls_ca"]),
    ("tls://127.0.0.1?tls_key=/nonexistent/key.pem", ["tls_key", "tls_cert"]),
])
def test_bad_urls_are_value_errors_naming_the_problem(url, words):
    with pytest.raises(ValueError) as info:
        crown_sync.urls.oracle_from_url(url)
    for word in words:
        assert word.lower() in str(info.value).lower()


def test_a_name_that_is_no_kv_key_is_refused_at_construction(server):
    with pytest.raises(ValueError, match="name"):
        crown_sync.Crown("a..b", oracle=server.url_for(**FAST))


def test_wrong_password_is_a_clear_error_and_never_shown(server, name, caplog):
    secret = "Wrong-pw-" + os.urandom(4).hex()
    url = server.url_for(password=secret, **FAST)
    caplog.set_level(logging.DEBUG)
    oracle = crown_sync.urls.oracle_from_url(url)
    contender = oracle.contender(name, "me", {}, Signals())
    with pytest.raises(NatsError) as info:
        contender.claim()
    assert "authorization violation" in str(info.value)
    crown = crown_sync.Crown(name, oracle=url, child=lambda term: term.stop_event.wait())
    crown.start()
    try:
        status = wait_until(lambda: crown.status() if crown.status().last_error else None, timeout=30)
        assert "authorization violation" in status.last_error
    finally:
        crown.stop()
        contender.close()
        oracle.close()
    shown = [str(info.value), repr(oracle), status.last_error, str(status)] + [r.getMessage() for r in caplog.records]
    assert not [text for text in shown if secret in text]


def test_tls_leads_with_the_servers_certificate_and_refuses_a_server_it_cannot_verify(name):
    srv = NatsServer(tls=True).start()
    try:
        oracle = crown_sync.urls.oracle_from_url(srv.url_for(**FAST))  # tls://...&tls_ca=<its cert>
        contender = oracle.contender(name, "me", {}, Signals())
        try:
            released(oracle, name)
            assert lead(contender, timeout=10).won
            assert oracle.find_leader(name).identity == "me"
        finally:
            contender.close()
            oracle.close()
        unverified = crown_sync.urls.oracle_from_url(srv.url_for(**FAST).split("&tls_ca=")[0])
        try:
            with pytest.raises(NatsError, match="certificate verify failed"):
                unverified.find_leader(name)
        finally:
            unverified.close()
    finally:
        srv.cleanup()


def test_a_user_without_publish_rights_hears_the_servers_reason(server, name):
    oracle = NatsOracle(f"{server.host}:{server.port}", user=server.reader, password=server.reader_password,
                        **dict(FAST, timeout=1))
    contender = oracle.contender(name, "me", {}, Signals())
    try:
        with pytest.raises(NatsError, match="permissions violation"):
            contender.claim()
    finally:
        contender.close()
        oracle.close()


def test_unreachable_server_never_raises_from_start_and_shows_in_status(name):
    secret = "Unreach-pw-" + os.urandom(4).hex()
    url = f"nats://crown:{secret}@127.0.0.1:{free_port()}?ttl=2&connect_timeout=0.5"
    crown = crown_sync.Crown(name, oracle=url, child=lambda term: term.stop_event.wait())
    crown.start()
    try:
        status = wait_until(lambda: crown.status() if crown.status().last_error else None, timeout=30)
        assert "could not connect" in status.last_error and secret not in status.last_error
        assert not crown.is_leader()
    finally:
        started = clock.monotonic()
        crown.stop()
        assert clock.monotonic() - started < 20  # bounded, not a hang


def test_close_is_bounded_while_the_server_is_paused(fresh_server, name):
    oracle = oracle_for(fresh_server, timeout=0.5)
    contender = oracle.contender(name, "me", {}, Signals())
    released(oracle, name)
    lead(contender)
    fresh_server.pause()
    try:
        with pytest.raises(NatsError, match="no answer"):
            contender.refresh()
        started = clock.monotonic()
        contender.close()
        oracle.close()
        assert clock.monotonic() - started < 10
    finally:
        fresh_server.resume()


def test_a_forked_child_never_touches_the_parents_connection(server, name):
    oracle = oracle_for(server)
    contender = oracle.contender(name, "parent", {}, Signals())
    released(oracle, name)
    lead(contender)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its inherited contender is unusable; the oracle makes a new loop
        code = 1
        try:
            try:
                contender.refresh()
            except RuntimeError:
                leader = oracle.find_leader(name)  # a fresh connection of its own
                code = 0 if leader is not None and leader.identity == "parent" else 2
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 1) == b"\x00"
        os.waitpid(pid, 0)
        assert contender.refresh().won  # the parent's connection and lease are untouched
    finally:
        os.close(read)
        contender.close()
        oracle.close()

