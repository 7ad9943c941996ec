"""The Redis oracle against real redis-server processes (Debian's package, started per module).

Safety is judged from the journal the contenders' children write themselves, never from Redis.
"""

import contextlib
import json
import logging
import os
import signal
import threading
import time

import pytest

import crown_sync
from crown_sync import clock
from crown_sync.oracles._lease import decode, encode
from crown_sync.oracles.redis import RedisOracle
from crown_sync.testing.fleet import Fleet, wait_until
from crown_sync.testing.redis_server import RedisServer
from crown_sync.testing.servers import free_port
from crown_sync.urls import oracle_from_url

SECRET = "Redis-Test-Secret-42"


@pytest.fixture(scope="module")
def server():
    """A server that keeps every write across restarts (appendonly, fsync always)."""
    with RedisServer(password=SECRET, user="crown", persistence="aof") as redis_server:
        yield redis_server


@pytest.fixture(scope="module")
def volatile():
    """A server with no persistence: a restart forgets every key, as a pure cache does."""
    with RedisServer(password=SECRET, persistence=None) as redis_server:
        yield redis_server


def _released(server, name, token=1):
    """Write a ``released`` record, as a cleanly stopped election leaves: the first claimant then
    leads at once instead of waiting out the quarantine of an absent key."""
    record = {"state": "released", "token": token, "prev": "setup", "identity": "setup", "w": os.urandom(6).hex()}
    with server.client() as client:
        client.set(f"crown_sync:{name}", json.dumps(record), ex=3600)
        # Stamped as written by this incarnation of the server, as the oracle's own writes are.
        client.hset("crown_sync::server", f"crown_sync:{name}", client.info("server")["run_id"])


# -- construction and URLs (no server) --------------------------------------------------------


@pytest.mark.parametrize("url, words", [
    ("redis+sentinel://:pw@127.0.0.1:26379/mymaster", "Sentinel"),
    ("redis://a:6379,b:6379/0", "exactly one server"),
    ("redis://127.0.0.1:6379/zero", "database number"),
    ("redis://127.0.0.1:6379/0?nope=1", "unknown oracle option 'nope'"),
    ("redis://127.0.0.1:6379/0?ttl=0.5", "ttl"),
    ("redis://127.0.0.1:6379/0?poll_interval=9&ttl=10", "poll_interval"),
    ("redis://127.0.0.1:6379/0?ssl_ca_certs=/etc/ca.pem", "rediss://"),
    ("rediss://127.0.0.1:6379/0?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
    ("redis://:Sekrit-pw@127.0.0.1:99999/0", "Port"),
])
def test_bad_urls_are_clear_errors_naming_the_problem(url, words):
    with pytest.raises(ValueError) as caught:
        oracle_from_url(url)
    assert words in str(caught.value)
    assert "Sekrit-pw" not in str(caught.value) and ":pw@" not in str(caught.value)


def test_url_fields_and_description_without_password():
    oracle = oracle_from_url("rediss://crown:p%40ss@redis.example:6380/3?ttl=4&poll_interval=0.5&key_prefix=app:")
    assert (oracle.host, oracle.port, oracle.db, oracle.tls) == ("redis.example", 6380, 3, True)
    assert (oracle.ttl, oracle.poll_interval, oracle.key_prefix) == (4.0, 0.5, "app:")
    assert oracle.description == "rediss://crown@redis.example:6380/3"
    assert oracle.new_client().connection_pool.connection_kwargs["password"] == "p@ss"
    defaults = RedisOracle()
    # Requests at rest: a follower reads once per poll_interval, a leader renews by one
    # compare-and-set per renew_interval (and reads first only after one failed).
    assert defaults.poll_interval <= 1.0 and 2 / defaults.renew_interval <= 1.0


def test_requests_at_rest_stay_near_one_per_second_per_contender_by_default(volatile):
    # Defaults (ttl 10): a follower reads once a second, the leader renews every 3 s.
    # Counted with MONITOR: what the three crowns sent, not what their scripts ran inside Redis.
    _released(volatile, "rest")
    crowns = [crown_sync.Crown("rest", oracle=volatile.url(), child=lambda term: term.stop_event.wait())
              for _ in range(3)]
    for crown in crowns:
        crown.start()
    try:
        wait_until(lambda: any(crown.is_leader() for crown in crowns), timeout=30, message="a leader")
        time.sleep(1.5)  # past every crown's first claim and watch
        before, started = volatile.request_count(), clock.monotonic()
        time.sleep(6.0)
        rate = (volatile.request_count() - before) / (clock.monotonic() - started) / len(crowns)
    finally:
        for crown in crowns:
            crown.stop()
    assert 0.3 < rate <= 1.2, rate  # (2 x 1 + 1/3) / 3 = 0.78 expected; a poll at 5/s would be 3.5


# -- the store primitives and tokens on the real server ---------------------------------------


def test_store_compare_and_set_never_touches_another_writers_value(server):
    oracle = oracle_from_url(server.url())
    store = oracle.new_store()
    try:
        assert store.read("prim") == (None, None)
        assert store.create("prim", b"first", 60) is True
        assert store.create("prim", b"second", 60) is False  # present: NX refuses
        value, version = store.read("prim")
        assert value == b"first"
        assert store.replace("prim", b"stale-writer", b"not-the-version", 60) is False
        assert store.read("prim")[0] == b"first"  # a lost CAS leaves the value alone
        assert store.replace("prim", b"third", version, 60) is True
        assert store.replace("prim", b"again", version, 60) is False  # that version is gone
        assert store.replace("absent", b"x", b"y", 60) is None
        with server.client() as client:
            assert 0 < client.ttl("prim") <= 60
            assert client.exists("absent") == 0  # a replace never creates
    finally:
        store.close()
        oracle.close()


def test_tokens_rise_across_restarts_and_above_a_lost_counter(server, volatile):
    oracle = oracle_from_url(server.url())
    store = oracle.new_store()
    first = [oracle.token_floor(store) for _ in range(3)]
    assert first == sorted(set(first)) and first[1] == first[0] + 1  # INCR: one by one
    server.crash_restart()  # SIGKILL: the append-only file (fsync always) keeps the counter...
    after_crash = [oracle.token_floor(store) for _ in range(2)]
    # ...and a new incarnation of the server first lifts it to the server's clock (microseconds)
    assert after_crash[0] > first[-1] and after_crash[1] == after_crash[0] + 1
    store.close()
    oracle.close()
    # Without persistence a restart loses the counter: it is seeded again from the server's
    # clock in microseconds, above every token taken before (an earlier seed plus one per claim).
    oracle = oracle_from_url(volatile.url())
    store = oracle.new_store()
    before = oracle.token_floor(store)
    assert abs(before - time.time() * 1e6) < 600e6  # seeded from TIME (same host's clock)
    volatile.restart()
    assert volatile.client().exists("crown_sync::token") == 0
    assert oracle.token_floor(store) > before
    store.close()
    oracle.close()


def test_a_terms_token_is_taken_in_its_compare_and_set_above_the_counter_and_the_record(server):
    oracle = oracle_from_url(server.url())
    store = oracle.new_store()
    key = oracle.key("start-term")

    def build(token):
        return encode({"state": "held", "token": token, "nonce": "n"})

    try:
        floor = oracle.token_floor(store)
        for least in (1, floor + 1000):  # the counter's INCR wins, then the replaced record's token
            _released(server, "start-term", token=least - 1)
            value, version = store.read(key)
            token, written = oracle.start_term(store, key, decode(value), version, build)
            assert token == (floor + 1 if least == 1 else least)
            assert store.read(key)[0] == written and decode(written)["token"] == token
            floor = oracle.token_floor(store)
        assert oracle.start_term(store, key, None, b"not-the-version", build) is None
        assert store.read(key)[0] == written  # a lost compare-and-set writes nothing
    finally:
        store.close()
        oracle.close()


class _Signals:
    def __init__(self):
        self.event = threading.Event()

    def __call__(self, lost=False):
        self.event.set()


def _watching_follower(oracle, name, leader_identity):
    signals = _Signals()
    follower = oracle.contender(name, "follower", {}, signals)
    claim = follower.claim()
    assert not claim.won
    assert follower.watch(claim.leader)
    time.sleep(0.5)  # subscribed (a tick), and the poller's first read done; its next is far off
    return follower, signals, claim


def test_a_handoff_costs_one_request_on_each_side(server):
    # The leader renews and releases by one compare-and-set over its own last write (no read);
    # the release's message carries the record, so the follower takes over by one script (no
    # read, the token taken inside the compare-and-set). Before: 2 to release, 3 to take over.
    name = "one-each"
    _released(server, name)
    oracle = oracle_from_url(server.url(ttl=10, poll_interval=4))
    leader = oracle.contender(name, "leader", {}, _Signals())
    try:
        assert wait_until(lambda: leader.claim().won, timeout=10, message="leading")
        follower, signals, claim = _watching_follower(oracle, name, "leader")
        before = leader.requests
        assert leader.refresh().won
        assert leader.requests - before == 1
        server.request_count()  # MONITOR running from here on
        time.sleep(0.3)
        before = (leader.requests, follower.requests, server.request_count())
        leader.abdicate()
        assert signals.event.wait(5.0), "the release was not pushed"
        won = follower.claim()
        assert won.won and won.token > claim.leader.token
        assert (leader.requests - before[0], follower.requests - before[1]) == (1, 1)
        time.sleep(0.3)  # MONITOR's lines arrive on their own connection
        assert server.request_count() - before[2] == 2  # what the server received: two scripts in all
    finally:
        leader.close()
        if "follower" in locals():
            follower.close()
        oracle.close()


def _messages(pubsub, seconds):
    """What ``pubsub`` received within ``seconds`` (its subscription confirmations left out)."""
    found, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        message = pubsub.get_message(timeout=0.1)
        if message is not None and message["type"] == "message":
            found.append(message["data"])
    return found


@contextlib.contextmanager
def _contenders(url, name, count):
    """``count`` watching followers of ``name``, each on an oracle of its own (as if in a process
    of its own), and a leader on another: (oracles, leader, [(follower, signals)]), all closed
    at the end."""
    oracles = [oracle_from_url(url) for _ in range(count + 1)]
    contenders = [oracles[0].contender(name, "leader", {}, _Signals())]
    try:
        assert wait_until(lambda: contenders[0].claim().won, timeout=10, message="leading")
        followers = []
        for oracle in oracles[1:]:
            followers.append(_watching_follower(oracle, name, "leader")[:2])
            contenders.append(followers[-1][0])
        yield oracles, contenders[0], followers
    finally:
        for contender in contenders:
            contender.close()
        for oracle in oracles:
            oracle.close()


def _hands_over(leader, follower, signals):
    leader.abdicate()
    assert signals.event.wait(5.0), "the release was not pushed"
    assert follower.claim().won


def _acl_user(server, user, rules):
    """An ACL user of ``rules`` on ``server``; its URL (polls every 30 s)."""
    with server.client() as client:
        client.execute_command("ACL", "SETUSER", user, "reset", "on", f">{user}-secret", *rules.split())
    return f"redis://{user}:{user}-secret@{server.host}:{server.port}/0?ttl=60&poll_interval=30"


def test_a_release_is_offered_to_one_heir_process_alone(server):
    # Six followers' processes, polls every 30 s: the release reaches one of them (on its own
    # channel), which takes it over at once; the election's channel, on which every follower's
    # process listens, carries neither the release nor the takeover (before: both, waking all).
    name = "one-heir"
    _released(server, name)
    with _contenders(server.url(ttl=60, poll_interval=30), name, 6) as (_, leader, followers), \
            server.client() as client:
        wait_until(lambda: client.scard(f"crown_sync::heirs:{name}") == 7, timeout=10, message="every heir registered")
        everyone = client.pubsub()
        everyone.subscribe(f"crown_sync:{name}")
        assert everyone.get_message(timeout=5)["type"] == "subscribe"
        leader.abdicate()
        wait_until(lambda: sum(signals.event.is_set() for _, signals in followers) >= 1, timeout=5,
                   message="an heir woken")
        heirs = [follower for follower, signals in followers if signals.event.is_set()]
        assert len(heirs) == 1
        assert heirs[0].claim().won
        assert _messages(everyone, 1.0) == []
        everyone.close()


def test_an_heir_whose_crowns_do_not_follow_passes_the_release_on(server):
    # The only registered heir is a process whose one contender does not watch (it never started
    # to): it broadcasts the release, and the follower elsewhere takes it over at once, not at its
    # poll 30 s later.
    name = "heir-passes"
    _released(server, name)
    url = server.url(ttl=60, poll_interval=30)
    idle_oracle = oracle_from_url(url)
    idle = idle_oracle.contender(name, "idle", {}, _Signals())
    inherited = []
    inherit = idle_oracle._push._inherit
    idle_oracle._push._inherit = lambda *args: (inherited.append(args), inherit(*args))
    try:
        with _contenders(url, name, 1) as (_, leader, [(follower, signals)]):
            heirs = f"crown_sync::heirs:{name}"
            channel = idle_oracle._push.heir_channel(idle_oracle.key(name))
            with server.client() as client:
                wait_until(lambda: client.sismember(heirs, channel), timeout=10, message="the idle process registered")
                client.delete(heirs)
                client.sadd(heirs, channel)
            _hands_over(leader, follower, signals)
            assert len(inherited) == 1  # offered to the idle process, which passed it on
    finally:
        idle.close()
        idle_oracle.close()


def test_dead_heirs_are_dropped_when_a_process_registers(server):
    # Processes that died leave their heir channels in the set: a registration drops those it
    # samples (8), so they never outnumber the live ones for long.
    name = "dead-heirs"
    _released(server, name)
    heirs = f"crown_sync::heirs:{name}"
    with server.client() as client:
        client.sadd(heirs, *(f"crown_sync:{name} dead{i}" for i in range(5)))
        with _contenders(server.url(ttl=60, poll_interval=30), name, 1) as (oracles, _, _):
            expected = {oracle._push.heir_channel(oracle.key(name)).encode() for oracle in oracles}
            wait_until(lambda: client.smembers(heirs) == expected, timeout=10, message="only the live heirs left")


def test_a_user_allowed_only_the_elections_own_channel_still_gets_its_pushes(server, caplog):
    # An ACL naming the election's channel exactly (no pattern) refuses the heir channels: the
    # process goes on without them, and releases are broadcast and taken over at once.
    name = "exact-channel"
    _released(server, name)
    url = _acl_user(server, "exact", f"resetkeys ~crown_sync:* resetchannels &crown_sync:{name} +@all")
    with caplog.at_level(logging.WARNING, logger="crown_sync.oracles.redis"), \
            _contenders(url, name, 1) as (oracles, leader, [(follower, signals)]):
        wait_until(lambda: not oracles[1]._push._heirs, timeout=10, message="heir channels refused")
        time.sleep(1.0)  # subscribed again, to the election's channel alone
        _hands_over(leader, follower, signals)
    assert "may not subscribe to the crowns' own channels" in caplog.text


@pytest.mark.parametrize("extra", ["", "+sadd +expire +srandmember"])
def test_a_user_the_acl_denies_the_heir_commands_still_hands_over_at_once(server, extra):
    # The ACL line of the docs before heirs (no SADD, SRANDMEMBER, PUBSUB), or with heirs but
    # without PUBSUB: every release is broadcast, as before, and taken over at once.
    name = f"old-acl-{len(extra)}"
    _released(server, name)
    url = _acl_user(server, "old", "resetkeys ~crown_sync:* resetchannels &crown_sync:* -@all +evalsha +script|load"
                    " +set +subscribe +unsubscribe +ping +role +info +hello +auth +get +incr +hget +hset +publish"
                    " +time " + extra)
    with _contenders(url, name, 1) as (_, leader, [(follower, signals)]):
        _hands_over(leader, follower, signals)


@pytest.mark.parametrize("offered", [False, True])
def test_a_release_pushed_before_a_restart_is_not_taken_over_after_it(tmp_path, offered):
    """A message is handled after the server restarted from a snapshot holding that release (its
    taker's record lost): the follower must treat it as a read would, as a stale candidate only,
    not take it over at once."""
    name = "pushed-restart"
    with RedisServer(password=SECRET, persistence="rdb") as rdb:
        _released(rdb, name)
        with rdb.client() as client:
            value = client.get(f"crown_sync:{name}")
        rdb.restart()  # a clean shutdown saves the snapshot: the release comes back, stamped by the old run
        oracle = oracle_from_url(rdb.url(ttl=10, poll_interval=4))
        follower = None
        try:
            follower, signals, claim = _watching_follower(oracle, name, None)
            with rdb.client() as client:
                wait_until(lambda: client.pubsub_numsub(f"crown_sync:{name}")[0][1] == 1, timeout=10,
                           message="the follower's subscription")
                # as sent before the restart, to every follower or to this one as the heir
                channel = oracle._push.heir_channel(oracle.key(name)) if offered else f"crown_sync:{name}"
                wait_until(lambda: client.pubsub_numsub(channel)[0][1] == 1, timeout=10, message="subscribed")
                client.publish(channel, b"released\n" + value)
            time.sleep(1.0)
            assert not signals.event.is_set() and not follower.claim().won
        finally:
            if follower is not None:
                follower.close()
            oracle.close()


# -- elections of contender processes, judged from their journal ------------------------------


def test_exclusive_leadership_and_graceful_handoffs_woken_by_push(server, tmp_path):
    # Polls every 30 s: a handoff within 10 s, twice, is (but for a ~1% chance) the pub/sub push.
    name = "push"
    _released(server, name)
    fleet = Fleet(server.url(ttl=60, poll_interval=30), tmp_path, name)
    for identity in ("a", "b", "c"):
        fleet.spawn(identity)
    try:
        first = fleet.wait_for_term()
        time.sleep(1.0)  # every follower watching its poll schedule
        ended = []
        for _ in range(2):
            leader = fleet.running_term()
            fleet.signal(leader.identity, signal.SIGTERM)
            fleet.wait_exit(leader.identity)
            stopped = [t for t in fleet.terms() if t.identity == leader.identity][-1]
            assert stopped.stopped
            successor = fleet.wait_for_term(after=stopped.end, other_than=ended + [leader.identity], timeout=10.0)
            ended.append(leader.identity)
            assert successor.token > stopped.token
        assert first.identity in ended
    finally:
        fleet.stop_all()
    fleet.assert_safe(min_terms=3)


def test_the_push_outlives_a_server_restart(server, tmp_path):
    # Polls every 30 s: after the restart, the follower's pub/sub connection must be made again
    # and subscribed, or the release waits for the poll.
    name = "push-restart"
    _released(server, name)
    fleet = Fleet(server.url(ttl=60, poll_interval=30), tmp_path, name)
    for identity in ("a", "b"):
        fleet.spawn(identity)
    try:
        leader = fleet.wait_for_term()
        server.restart()  # appendonly: the lease survives, every connection breaks
        time.sleep(2.0)  # the pub/sub thread's reconnection (its backoff is under a second)
        fleet.signal(leader.identity, signal.SIGTERM)
        fleet.wait_exit(leader.identity)
        fleet.wait_for_term(other_than={leader.identity}, after=leader.start, timeout=10.0)
    finally:
        fleet.stop_all()
    fleet.assert_safe(min_terms=2)


def test_a_dismissal_is_pushed_to_the_leader(server):
    # Renewals every 3 minutes: a leader that steps down within seconds was told, not polling.
    _released(server, "dismissed")
    url = server.url(ttl=600)
    crown = crown_sync.Crown("dismissed", oracle=url, child=lambda term: term.stop_event.wait())
    crown.start()
    try:
        wait_until(crown.is_leader, timeout=30, message="leading")
        assert crown_sync.dismiss("dismissed", oracle=url)
        wait_until(lambda: not crown.is_leader(), timeout=10, message="the dismissed leader stepping down")
    finally:
        crown.stop()


def test_crash_failover_without_overlap(server, tmp_path):
    name = "crash"
    _released(server, name)
    fleet = Fleet(server.url(ttl=2, poll_interval=0.5), tmp_path, name, child="process")
    for identity in ("a", "b", "c"):
        fleet.spawn(identity)
    try:
        leader = fleet.wait_for_term()
        os.killpg(fleet.processes[leader.identity].pid, signal.SIGKILL)
        fleet.wait_for_term(other_than={leader.identity}, after=leader.start)
    finally:
        fleet.stop_all()
    fleet.assert_safe(min_terms=2)


@pytest.mark.parametrize("fault", ["del", "flushall", "restart"])
def test_revocation_under_a_paused_leader_waits_out_its_deadline(volatile, tmp_path, fault):
    """The leader's process group is stopped; its command child (own session) runs on and takes
    1.5 s to stop. The key is deleted, flushed, or lost in a restart without persistence: a
    successor must not start while the old command may still run."""
    name = f"revoke-{fault}"
    fleet = Fleet(volatile.url(ttl=2, poll_interval=0.5), tmp_path, name, child="command", stop_delay=1.5)
    for identity in ("a", "b"):
        fleet.spawn(identity)
    leader_pid = None
    try:
        leader = fleet.wait_for_term(timeout=60)  # first use: a quarantine of one ttl
        leader_pid = fleet.processes[leader.identity].pid
        os.killpg(leader_pid, signal.SIGSTOP)
        paused_at = clock.monotonic()
        if fault == "del":
            volatile.client().delete(f"crown_sync:{name}")
        elif fault == "flushall":
            volatile.flushall()
        else:
            volatile.restart()
        successor = fleet.wait_for_term(other_than={leader.identity}, after=paused_at, timeout=60)
        assert successor.token > leader.token
    finally:
        if leader_pid is not None:
            os.killpg(leader_pid, signal.SIGCONT)
        fleet.stop_all()
    fleet.assert_safe(min_terms=2)


def test_a_restart_from_an_older_snapshot_is_not_taken_as_a_release(tmp_path):
    """Debian's default persistence is RDB snapshots. A snapshot holding a clean release, a
    takeover after it, then a crash: the restarted server shows the release again while its taker
    (paused, with a command child slow to stop) may still run, and its counter is older than the
    taker's token. The successor must wait as for a stale record, and take a higher token."""
    name = "snapshot"
    with RedisServer(password=SECRET, persistence="rdb") as rdb:
        url = rdb.url(ttl=2, poll_interval=0.5)
        fleet = Fleet(url, tmp_path, name, child="command", stop_delay=1.5)
        fleet.spawn("a")
        taker_pid = None
        try:
            first = fleet.wait_for_term(timeout=60)
            fleet.signal("a", signal.SIGTERM)
            fleet.wait_exit("a")
            rdb.client().save()  # the snapshot: a released record, stamped by this incarnation
            fleet.spawn("b")
            fleet.spawn("c")
            taker = fleet.wait_for_term(other_than={"a"}, after=first.end)
            taker_pid = fleet.processes[taker.identity].pid
            os.killpg(taker_pid, signal.SIGSTOP)
            paused_at = clock.monotonic()
            rdb.crash_restart()  # back to the snapshot: "released", and the older token counter
            fleet.wait_for_term(other_than={"a", taker.identity}, after=paused_at, timeout=60)
        finally:
            if taker_pid is not None:
                os.killpg(taker_pid, signal.SIGCONT)
            fleet.stop_all()
    fleet.assert_safe(min_terms=3)


# -- bad servers and credentials --------------------------------------------------------------


def _last_error(url, caplog, timeout=30.0):
    caplog.set_level(logging.DEBUG, logger="crown_sync")
    crown = crown_sync.Crown("errors", oracle=url, child=lambda term: term.stop_event.wait())
    crown.start()  # never raises on the oracle
    try:
        error = wait_until(lambda: crown.status().last_error, timeout=timeout, message="an oracle error")
        assert not crown.is_leader()
        return error
    finally:
        crown.stop()


def test_wrong_password_is_a_clear_error_without_the_password(server, caplog):
    error = _last_error(server.url(password="Wrong-Pass-777"), caplog)
    assert "wrong user or password" in error
    assert "Wrong-Pass-777" not in caplog.text + error and SECRET not in caplog.text + error


def test_missing_password_says_the_server_requires_one(server, caplog):
    error = _last_error(f"redis://127.0.0.1:{server.port}/0", caplog)
    assert "requires a password" in error


def test_unreachable_server_shows_in_status(caplog):
    error = _last_error(f"redis://:Unreach-pw-1@127.0.0.1:{free_port()}/0?connect_timeout=0.5", caplog)
    assert "127.0.0.1" in error and "Unreach-pw-1" not in caplog.text + error


def test_tls_with_the_servers_certificate_and_a_clear_error_without_it(caplog):
    with RedisServer(password=SECRET, persistence=None, tls=True) as server:
        url = server.url(ssl_ca_certs=server.certificate, ssl_check_hostname="true", ttl=2)
        _released(server, "tls")
        crown = crown_sync.Crown("tls", oracle=url, child=lambda term: term.stop_event.wait())
        crown.start()
        try:
            wait_until(crown.is_leader, timeout=30, message="leading over TLS")
        finally:
            crown.stop()
        error = _last_error(server.url(), caplog)  # the system's CAs do not know this certificate
    assert "CERTIFICATE_VERIFY_FAILED" in error and SECRET not in caplog.text + error


def test_a_cluster_node_is_refused(caplog):
    with RedisServer(password=SECRET, cluster=True, persistence=None) as node:
        error = _last_error(node.url(), caplog)
    assert "Redis Cluster node" in error


def test_a_replica_is_refused(server, caplog):
    config = [f"replicaof 127.0.0.1 {server.port}", f"masterauth {SECRET}"]
    with RedisServer(password=SECRET, persistence=None, extra_config=config) as replica:
        error = _last_error(replica.url(), caplog)
    assert "replica" in error
