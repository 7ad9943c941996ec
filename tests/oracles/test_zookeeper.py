"""ZooKeeper oracle against real ZooKeeper servers started by the suite (single node and a 3-node
ensemble), with real faults: SIGKILL/SIGTERM/SIGSTOP of leaders, real session expiry, server
restarts and ensemble member crashes. Safety is judged from the children's own journal.
"""

import json
import logging
import os
import signal
import threading
import time
import uuid

import pytest
from kazoo.client import KazooClient

import crown_sync
from crown_sync import clock
from crown_sync.oracles._base import Phase
from crown_sync.oracles.zookeeper import LEASE_FRACTION, ZooKeeperOracle, ZooKeeperUnavailable
from crown_sync.testing import journal
from crown_sync.testing.servers import free_port
from crown_sync.testing.zookeeper_server import ZooKeeperEnsemble, ZooKeeperServer

from . import support
from .support import assert_safe, terms, wait_until
from .zookeeper_support import leader_node, plain_client

SESSION = 3.0  # seconds; the test servers tick every 200 ms


@pytest.fixture(scope="module")
def zk():
    server = ZooKeeperServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def name():
    return "t-" + uuid.uuid4().hex[:12]


def Fleet(url, directory, name, **options):  # noqa: N802 - stands for the class
    """A Fleet whose contenders give their children 1 s and monitor every 0.5 s."""
    return support.Fleet(url, directory, name, **dict(support.ZooKeeperKind.fleet_options, **options))


class Recorder:
    """An on_change callback that remembers its calls."""

    def __init__(self):
        self.calls = []
        self.event = threading.Event()

    def __call__(self, lost=False):
        self.calls.append((clock.monotonic(), lost))
        self.event.set()

    def lost(self):
        return any(lost for _, lost in self.calls)

    def reset(self):
        self.calls.clear()
        self.event.clear()


def contenders(zk, name, count, **options):
    options.setdefault("session_timeout", SESSION)
    oracles = [ZooKeeperOracle(zk.hosts, **options) for _ in range(count)]
    recorders = [Recorder() for _ in range(count)]
    seats = [o.contender(name, f"c{i}", {"i": i}, r) for i, (o, r) in enumerate(zip(oracles, recorders))]
    return oracles, recorders, seats


def close_all(oracles, seats):
    for seat in seats:
        seat.close()
    for oracle in oracles:
        oracle.close()


# --------------------------------------------------------------------------- options, no server


def test_from_url_parses_hosts_chroot_auth_and_options():
    oracle = ZooKeeperOracle.from_url(
        "zookeeper://alice:s%40cret@h1:2181,h2,[::1]:2182/apps/x?session_timeout=7.5&connect_timeout=2"
        "&path_prefix=/elect&acl=creator"
    )
    assert oracle.hosts == "h1:2181,h2:2181,[::1]:2182"
    assert oracle.chroot == "/apps/x"
    assert oracle.session_timeout == 7.5
    assert oracle.connect_timeout == 2.0
    assert oracle.path_prefix == "/elect"
    assert oracle._auth == "alice:s@cret"
    assert "s@cret" not in oracle.description and "cret" not in oracle.description
    assert oracle.description.startswith("zookeeper://alice:***@h1:2181,h2:2181,[::1]:2182/apps/x?")
    assert "session_timeout=7.5" in oracle.description
    assert "cret" not in repr(oracle)
    default = crown_sync.oracle_from_url("zookeeper://127.0.0.1:2181")
    assert isinstance(default, ZooKeeperOracle)
    assert default.session_timeout == 10.0 and default.chroot is None
    assert default.path_prefix == "/crown_sync"
    assert default.acl[0].perms == 31  # open
    # hosts may carry the chroot, kazoo style
    assert ZooKeeperOracle("h:1/root").chroot == "/root"


@pytest.mark.parametrize(
    "url, option",
    [
        ("zookeeper://h:2181?session_timeout=abc", "session_timeout"),
        ("zookeeper://h:2181?session_timeout=0.2", "session_timeout"),
        ("zookeeper://h:2181?sessiontimeout=3", "session_timeout"),  # unknown: names accepted ones
        ("zookeeper://h:2181?connect_timeout=-1", "connect_timeout"),
        ("zookeeper://h:2181?acl=everyone", "acl"),
        ("zookeeper://h:2181?acl=creator", "acl"),  # creator needs auth
        ("zookeeper://h:2181?path_prefix=relative", "path_prefix"),
        ("zookeeper://h:2181?path_prefix=/zookeeper/x", "path_prefix"),
        ("zookeeper://h:2181/a//b", "chroot"),
        ("zookeeper://h:99999", "hosts"),
        ("zookeeper://h:2181,,k", "hosts"),
        ("zookeeper://", "host"),
        ("zookeeper://alice@h:2181", "user:password"),
        ("zookeeper://h:2181?tls_ca=/etc/hostname", "tls_ca"),  # without tls=true
        ("zookeeper://h:2181?tls=true&tls_ca=/nonexistent/ca.pem", "tls_ca"),
        ("zookeeper://h:2181?tls=true&tls_key=/etc/hostname", "tls_key"),
        ("zookeeper://h:2181?tls=maybe", "tls"),
    ],
)
def test_bad_url_raises_value_error_naming_the_option(url, option):
    with pytest.raises(ValueError) as info:
        crown_sync.oracle_from_url(url)
    assert option in str(info.value)


def test_bad_arguments():
    with pytest.raises(TypeError, match="session_timeout"):
        ZooKeeperOracle("h:1", session_timeout="10")
    with pytest.raises(TypeError, match="hosts"):
        ZooKeeperOracle(12)
    with pytest.raises(ValueError, match="auth"):
        ZooKeeperOracle("h:1", auth="nopassword")
    with pytest.raises(TypeError, match="acl"):
        ZooKeeperOracle("h:1", acl=[1, 2])
    with pytest.raises(ValueError, match="chroot"):
        ZooKeeperOracle("h:1/a", chroot="/b")
    oracle = ZooKeeperOracle("h:1")
    with pytest.raises(ValueError, match="name"):
        oracle.contender("..", "me", {}, lambda lost=False: None)
    with pytest.raises(TypeError, match="metadata"):
        oracle.contender("ok", "me", {"x": object()}, lambda lost=False: None)
    oracle.close()


@pytest.mark.parametrize("name", [".", "..", "a/b", "a\x00b", "tab\there", "", "x" * 129, "caf\u00e9"])
def test_names_zookeeper_refuses_are_refused_at_construction(name):
    oracle = ZooKeeperOracle("h:1")
    with pytest.raises(ValueError, match="name"):
        oracle.contender(name, "me", {}, lambda lost=False: None)
    assert oracle._client is None, "no connection attempted"
    oracle.close()


@pytest.mark.parametrize("value", ["/a\u0085b", "/a\ue000", "/a\ufff0", "/a\x7f", "/a/./b", "/a/../b"])
def test_paths_zookeeper_refuses_are_refused_at_construction(value):
    with pytest.raises(ValueError, match="path_prefix"):
        ZooKeeperOracle("h:1", path_prefix=value)
    with pytest.raises(ValueError, match="chroot"):
        ZooKeeperOracle("h:1", chroot=value)


def _metadata_of_record_size(size: int) -> dict:
    """Metadata whose worst-case leader record (see _record_size) is exactly ``size`` bytes."""
    from crown_sync.oracles.zookeeper import _record_size

    base = _record_size("me", {"blob": ""})
    return {"blob": "x" * (size - base)}


def test_a_leader_record_up_to_the_cap_is_published_and_a_bigger_one_refused(zk, name):
    from crown_sync.oracles.zookeeper import MAX_RECORD_BYTES, _record_size

    oracle = ZooKeeperOracle(zk.hosts, session_timeout=SESSION)
    too_big = _metadata_of_record_size(MAX_RECORD_BYTES + 1)
    assert _record_size("me", too_big) == MAX_RECORD_BYTES + 1
    with pytest.raises(ValueError, match="metadata"):
        oracle.contender(name, "me", too_big, lambda lost=False: None)
    largest = _metadata_of_record_size(MAX_RECORD_BYTES)
    seat = oracle.contender(name, "me", largest, Recorder())
    try:
        # The real server takes the largest record, with since and a dismissal written in.
        assert seat.claim().won
        assert seat.refresh().won  # the first refresh publishes since
        time.sleep(0.3)
        leader = oracle.find_leader(name)
        assert leader.metadata == largest and leader.since is not None
        assert oracle.dismiss(name) is True
        assert oracle.find_leader(name).metadata == largest
    finally:
        seat.close()
        oracle.close()


# --------------------------------------------------------------------------- contender level


def test_queue_wakes_only_the_successor_and_tokens_rise(zk, name):
    oracles, recorders, seats = contenders(zk, name, 3)
    try:
        first = seats[0].claim()
        assert first.won and isinstance(first.token, int)
        assert first.deadline - clock.monotonic() <= ZooKeeperOracle.lease_for(SESSION)
        assert first.refresh_in <= SESSION / 3  # soon: the first refresh publishes since/token
        second, third = seats[1].claim(), seats[2].claim()
        assert not second.won and not third.won
        assert second.leader.identity == "c0" and third.leader.identity == "c0"
        assert seats[1].watch(second.leader) and seats[2].watch(third.leader)
        refreshed = seats[0].refresh()
        assert refreshed.won and refreshed.token == first.token
        assert refreshed.refresh_in == pytest.approx(SESSION / 3)
        for recorder in recorders:
            recorder.reset()
        seats[0].abdicate()
        wait_until(recorders[1].event.is_set, timeout=30, message="successor woken")
        time.sleep(0.2)
        assert not recorders[2].calls, "the third contender watches the second, not the leader"
        assert not recorders[0].calls, "abdicating is not a dismissal"
        took_over = seats[1].claim()
        assert took_over.won and took_over.token > first.token
        assert oracles[2].find_leader(name).identity == "c1"
        assert oracles[2].find_leader(name).token == took_over.token  # the node's czxid
        seats[1].close()  # a clean close hands over too
        wait_until(recorders[2].event.is_set, timeout=10, message="third woken")
        last = seats[2].claim()
        assert last.won and last.token > took_over.token
        rejoined = seats[0].claim()  # back in the queue, behind the third
        assert not rejoined.won and rejoined.leader.identity == "c2"
    finally:
        close_all(oracles, seats)


def test_next_in_line_takes_over_without_a_round_trip(zk, name):
    oracles, recorders, seats = contenders(zk, name, 3)
    client = plain_client(zk.hosts)
    try:
        assert seats[0].claim().won
        assert not seats[1].claim().won and not seats[2].claim().won
        assert seats[1].watch(None) and seats[2].watch(None)
        assert seats[1]._successor.next_in_line is not None and seats[2]._successor.next_in_line is None
        for recorder in recorders:
            recorder.reset()
        seats[0].abdicate()
        wait_until(recorders[1].event.is_set, timeout=30, message="successor woken")
        assert seats[1]._successor.fast is not None
        before = clock.monotonic()
        claim = seats[1].claim()
        assert claim.won and seats[1]._successor.fast is None
        node, stat = leader_node(client, f"/crown_sync/{name}")
        assert claim.token == stat.czxid and node == seats[1]._node
        # the deadline runs from the session's last answered request, at most T/3 old
        assert before + ZooKeeperOracle.lease_for(SESSION) - SESSION / 3 <= claim.deadline
        assert claim.deadline <= clock.monotonic() + ZooKeeperOracle.lease_for(SESSION)
        # Its first refresh publishes since; the third sees the change, finds it leads, and
        # becomes next in line.
        assert seats[1].refresh().won
        wait_until(lambda: seats[2]._successor.next_in_line is not None, timeout=10, message="third next in line")
        recorders[2].reset()
        seats[1].abdicate()
        wait_until(recorders[2].event.is_set, timeout=10, message="third woken")
        third = seats[2].claim()
        assert third.won and third.token > claim.token
    finally:
        client.stop()
        close_all(oracles, seats)


def test_dismiss_makes_the_leader_step_down_before_anyone_else_leads(zk, name):
    oracles, recorders, seats = contenders(zk, name, 2)
    try:
        won = seats[0].claim()
        assert won.won
        assert not seats[1].claim().won
        assert seats[1].watch(None)
        for recorder in recorders:
            recorder.reset()
        assert oracles[1].dismiss(name) is True
        wait_until(lambda: recorders[0].lost(), timeout=10, message="leader told it lost")
        assert seats[0]._dismissed == seats[0]._node
        assert not seats[0].refresh().won
        time.sleep(0.3)
        # The successor is not let in until the dismissed leader has stopped and left.
        assert not recorders[1].calls
        assert not seats[1].claim().won
        seats[1].watch(None)
        seats[0].abdicate()  # what the engine does once the child has stopped
        wait_until(recorders[1].event.is_set, timeout=10, message="follower woken")
        successor = seats[1].claim()
        assert successor.won and successor.token > won.token
        again = seats[0].claim()  # contends again, behind the new leader
        assert not again.won and again.leader.identity == "c1"
        assert oracles[0].find_leader(name).identity == "c1"
        assert oracles[0].dismiss("nobody-" + name) is False
        assert oracles[0].find_leader("nobody-" + name) is None
    finally:
        close_all(oracles, seats)


def test_a_dismissal_pending_on_a_non_leading_node_sends_it_to_the_back(zk, name):
    oracles, recorders, seats = contenders(zk, name, 2)
    client = plain_client(zk.hosts)
    try:
        first = seats[0].claim()
        assert first.won
        assert not seats[1].claim().won
        target = f"/crown_sync/{name}/{seats[1]._node}"
        seats[0].abdicate()  # leaves; the second's node is now first but it has not claimed yet
        assert oracles[0].find_leader(name).identity == "c1"  # the crown holder dismiss targets
        recorders[1].reset()
        assert oracles[0].dismiss(name) is True
        data, stat = client.get(target)
        assert json.loads(data)["dismissed"] == stat.czxid  # the request names its target
        wait_until(recorders[1].event.is_set, timeout=10, message="second told")
        assert not recorders[1].lost(), "it was not leading: no term to end"
        rejoined = seats[0].claim()  # queues behind the dismissed node
        assert not rejoined.won and rejoined.leader.identity == "c1"
        sent_back = seats[1].claim()  # a dismissed node never hosts a term: to the back
        assert not sent_back.won and sent_back.leader.identity == "c0"
        assert client.exists(target) is None
        took_over = seats[0].claim()
        assert took_over.won and took_over.token > stat.czxid > first.token
    finally:
        client.stop()
        close_all(oracles, seats)


def test_a_dismissal_never_moves_on_to_the_next_in_line(zk, name):
    oracles, recorders, seats = contenders(zk, name, 2)
    dismisser = ZooKeeperOracle(zk.hosts, session_timeout=SESSION)
    client = plain_client(zk.hosts)
    try:
        first = seats[0].claim()
        assert first.won
        assert not seats[1].claim().won and seats[1].watch(None)
        innocent = f"/crown_sync/{name}/{seats[1]._node}"
        listing = dismisser._queue

        def leader_leaves_right_after_the_listing(*args):
            queue = listing(*args)
            seats[0].abdicate()  # a real deletion, between dismiss()'s look and its write
            return queue

        dismisser._queue = leader_leaves_right_after_the_listing
        assert dismisser.dismiss(name) is True  # its target stepped down already
        data, _stat = client.get(innocent)
        assert "dismissed" not in json.loads(data), "the dismissal spilled over to the next in line"
        wait_until(recorders[1].event.is_set, timeout=30, message="successor woken")
        took_over = seats[1].claim()
        assert took_over.won and took_over.token > first.token
    finally:
        client.stop()
        dismisser.close()
        close_all(oracles, seats)


def test_deleting_the_leaders_node_by_hand_ends_its_term(zk, name):
    oracles, recorders, seats = contenders(zk, name, 1)
    client = plain_client(zk.hosts)
    try:
        assert seats[0].claim().won
        recorders[0].reset()
        node, _stat = leader_node(client, f"/crown_sync/{name}")
        client.delete(f"/crown_sync/{name}/{node}")
        wait_until(lambda: recorders[0].lost(), timeout=10, message="leader told it lost")
        assert not seats[0].refresh().won
        seats[0].abdicate()
        assert seats[0].claim().won  # a fresh node
    finally:
        client.stop()
        close_all(oracles, seats)


def test_server_restart_suspends_then_the_same_session_resumes_with_a_higher_token(name):
    with ZooKeeperServer() as server:
        # A long session: a restarting JVM on a busy machine can take seconds to answer the
        # reconnect, and a read kazoo sends while it starts may stall for 2/3 of the session
        # timeout first (seen in CI: 20 s expired); the session must outlive both for the resume
        # this test is about.
        oracle = ZooKeeperOracle(server.hosts, session_timeout=40)
        recorder = Recorder()
        seat = oracle.contender(name, "me", {}, recorder)
        try:
            first = seat.claim()
            assert first.won
            session = oracle._client.client_id[0]
            recorder.reset()
            server.stop()  # SIGTERM: ZooKeeper keeps its sessions across a restart
            wait_until(recorder.lost, timeout=10, message="SUSPENDED reported as loss")
            assert not seat.refresh().won, "refresh must say lost while not CONNECTED"
            seat.abdicate()  # disconnected: keeps the node for a possible resume
            with pytest.raises(ZooKeeperUnavailable):
                seat.claim()
            server.start()
            resumed = wait_until(lambda: _try_claim(seat), timeout=60, message="claim after restart")
            assert resumed.won
            assert oracle._client.client_id[0] == session, "same session"
            assert resumed.token > first.token, "a new term needs a higher token"
        finally:
            seat.close()
            oracle.close()


def _try_claim(seat):
    try:
        return seat.claim()
    except ZooKeeperUnavailable:
        return None


def _suspend_before_the_win(seat, oracle, server):
    """Make the next _win of ``seat`` start only once the server is down and kazoo has reported
    it (a real SUSPENDED): the window between a claim's last connection check and its win."""
    original = seat._win

    def win(*args):
        seat._win = original  # once
        server.stop()
        wait_until(lambda: not oracle._connected_now()[1], timeout=10, message="SUSPENDED")
        time.sleep(0.1)  # the listener's callbacks run right after the state change
        return original(*args)

    seat._win = win


def test_a_suspension_just_before_the_win_fails_the_claim(name):
    with ZooKeeperServer() as server:
        oracles, recorders, seats = contenders(server, name, 2, session_timeout=8)
        try:
            # The full claim: queue read, we are first, then SUSPENDED, then the win.
            _suspend_before_the_win(seats[0], oracles[0], server)
            with pytest.raises(ZooKeeperUnavailable, match="dropped"):
                seats[0].claim()
            assert seats[0].phase is not Phase.LEADING
            # No loss signal was sent (the contender did not lead when SUSPENDED came): a won
            # claim here would have started a term that nothing ends.
            assert not recorders[0].lost()
            server.start()
            first = wait_until(lambda: _try_claim(seats[0]), timeout=20, message="claim after restart")
            assert first.won
            # The round-trip-free takeover: same window, same answer.
            assert not seats[1].claim().won and seats[1].watch(None)
            recorders[1].reset()
            seats[0].abdicate()
            wait_until(recorders[1].event.is_set, timeout=30, message="successor woken")
            assert seats[1]._successor.fast is not None, "the fast path is armed"
            _suspend_before_the_win(seats[1], oracles[1], server)
            with pytest.raises(ZooKeeperUnavailable, match="dropped"):
                seats[1].claim()
            assert seats[1].phase is not Phase.LEADING and not recorders[1].lost()
            server.start()
            second = wait_until(lambda: _try_claim(seats[1]), timeout=20, message="claim after restart")
            assert second.won and second.token > first.token
        finally:
            close_all(oracles, seats)


def test_a_spent_node_goes_as_soon_as_the_same_session_reconnects(name):
    with ZooKeeperServer() as server:
        # 45 s, not 8 or 20: under CI load the restarted JVM stalled the reconnect past 8 s, and
        # once past 20 s, and the session expired; this test is about a session that comes back.
        oracles, recorders, seats = contenders(server, name, 2, session_timeout=45)
        client = None
        try:
            first = seats[0].claim()
            assert first.won
            assert not seats[1].claim().won and seats[1].watch(None)
            session = oracles[0]._client.client_id[0]
            spent = f"/crown_sync/{name}/{seats[0]._node}"
            server.stop()
            wait_until(recorders[0].lost, timeout=10, message="SUSPENDED reported as loss")
            assert not seats[0].refresh().won
            seats[0].abdicate()  # cut off: the node cannot be deleted now
            recorders[1].reset()
            server.start()
            client = plain_client(server.hosts)
            # No further call on the old leader (its engine may be backing off): the node goes
            # once its session is back, and the next in line is woken.
            wait_until(lambda: client.exists(spent) is None, timeout=50, message="spent node deleted")
            # kazoo's client_id is None while disconnected (the restarted server may drop the
            # connection once more): read it once the session is back.
            resumed = wait_until(lambda: oracles[0]._client.client_id, timeout=50, message="session back")
            assert resumed[0] == session, "deleted, not expired"
            wait_until(recorders[1].event.is_set, timeout=30, message="successor woken")
            successor = wait_until(lambda: _try_claim(seats[1]), timeout=20, message="successor claims")
            assert successor.won and successor.token > first.token
            again = seats[0].claim()
            assert not again.won and again.leader.identity == "c1"
        finally:
            if client is not None:
                client.stop()
            close_all(oracles, seats)


def test_negotiated_session_timeout_bounds_the_deadline(name):
    with ZooKeeperServer(max_session_timeout=4000) as server:
        oracle = ZooKeeperOracle(server.hosts, session_timeout=20)
        seat = oracle.contender(name, "me", {}, Recorder())
        try:
            before = clock.monotonic()
            claim = seat.claim()
            assert claim.won
            assert oracle.effective_timeout() == pytest.approx(4.0)
            assert claim.deadline <= before + ZooKeeperOracle.lease_for(4.0) + 0.5
            refreshed = seat.refresh()
            assert refreshed.deadline <= clock.monotonic() + ZooKeeperOracle.lease_for(4.0)
            assert refreshed.refresh_in == pytest.approx(4.0 / 3)
        finally:
            seat.close()
            oracle.close()


def test_unreachable_server_fails_in_bounded_time(name):
    url = f"zookeeper://127.0.0.1:{free_port()}?session_timeout=2&connect_timeout=1"
    oracle = crown_sync.oracle_from_url(url)
    seat = oracle.contender(name, "me", {}, Recorder())
    started = clock.monotonic()
    with pytest.raises(ZooKeeperUnavailable, match="not connected"):
        seat.claim()
    with pytest.raises(ZooKeeperUnavailable):
        oracle.find_leader(name)
    seat.close()
    oracle.close()
    assert clock.monotonic() - started < 20  # generous: only guards against a hang
    # A crown on it: test_contract.py's test_an_unreachable_server_never_raises_from_start.


def test_close_is_bounded_when_the_server_is_paused_or_dead(name):
    with ZooKeeperServer() as server:
        oracle = ZooKeeperOracle(server.hosts, session_timeout=10)
        seat = oracle.contender(name, "me", {}, Recorder())
        assert seat.claim().won
        server.pause()  # SIGSTOP: connected as far as the client knows, but no answers
        try:
            started = clock.monotonic()
            seat.close()
            oracle.close()
            assert clock.monotonic() - started < 10
        finally:
            server.resume()
        oracle = ZooKeeperOracle(server.hosts, session_timeout=10)
        seat = oracle.contender(name, "me", {}, Recorder())
        assert seat.claim().won
        server.kill()
        started = clock.monotonic()
        seat.close()
        oracle.close()
        assert clock.monotonic() - started < 10


def test_forked_child_does_not_disturb_the_parents_session(zk, name):
    oracle = ZooKeeperOracle(zk.hosts, session_timeout=SESSION)
    recorder = Recorder()
    seat = oracle.contender(name, "me", {}, recorder)
    try:
        assert seat.claim().won
        session = oracle._client.client_id[0]
        recorder.reset()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: everything it does must stay away from the parent's session
            code = 1
            try:
                os.close(read)
                try:
                    seat.claim()
                except RuntimeError:
                    pass
                else:
                    raise AssertionError("inherited contender usable")
                seat.close()
                leader = oracle.find_leader(name)  # a fresh client of its own
                os.write(write, (leader.identity if leader else "none").encode())
                oracle.close()
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        seen = os.read(read, 100).decode()
        os.close(read)
        assert os.WEXITSTATUS(status) == 0
        assert seen == "me"
        time.sleep(0.5)
        assert not recorder.calls, "the parent's connection was disturbed"
        refreshed = seat.refresh()
        assert refreshed.won
        assert oracle._client.client_id[0] == session
    finally:
        seat.close()
        oracle.close()


def test_digest_auth_and_acl(zk, name):
    secret = "s3cr3t-" + uuid.uuid4().hex[:6]
    owner = ZooKeeperOracle(zk.hosts, session_timeout=SESSION, auth=f"alice:{secret}", path_prefix="/acl_test")
    stranger = ZooKeeperOracle(zk.hosts, session_timeout=SESSION, path_prefix="/acl_test")
    seat = owner.contender(name, "alice-1", {"k": 1}, Recorder())
    client = plain_client(zk.hosts)
    try:
        assert seat.claim().won
        node, _stat = leader_node(client, f"/acl_test/{name}")
        acls, _ = client.get_acls(f"/acl_test/{name}/{node}")
        assert {(a.id.scheme, a.perms) for a in acls} == {("digest", 31), ("world", 1)}
        assert stranger.find_leader(name).identity == "alice-1"  # readable by all
        with pytest.raises(PermissionError) as info:
            stranger.dismiss(name)  # not writable by others
        assert secret not in str(info.value)
        assert secret not in owner.description
        assert owner.dismiss(name) is True
    finally:
        client.stop()
        seat.close()
        owner.close()
        stranger.close()


def test_chroot_from_url(zk, name):
    oracle = crown_sync.oracle_from_url(f"{zk.url}/chroot-{name}?session_timeout={SESSION}")
    seat = oracle.contender(name, "me", {}, Recorder())
    client = plain_client(zk.hosts)
    try:
        assert seat.claim().won
        node, stat = leader_node(client, f"/chroot-{name}/crown_sync/{name}")
        assert node is not None and stat.ephemeralOwner == oracle._client.client_id[0]
    finally:
        client.stop()
        seat.close()
        oracle.close()


# --------------------------------------------------------------------------- end to end


def test_crowns_in_one_process_share_one_client(zk, name, tmp_path):
    path = str(tmp_path / "journal.jsonl")
    oracle = ZooKeeperOracle(zk.hosts, session_timeout=SESSION)
    client = plain_client(zk.hosts)
    crowns = [
        crown_sync.Crown(name, oracle=oracle, identity=f"p{i}",
                         child=crown_sync.ThreadChild(journal.journaled_work, args=(path,)))
        for i in range(3)
    ]
    try:
        for crown in crowns:
            crown.start()
        leader = wait_until(lambda: next((c for c in crowns if c.is_leader()), None), timeout=20,
                            message="a leader")
        # Per the server: every crown's node (leader's and followers') is owned by one session.
        election = f"/crown_sync/{name}"
        queue = lambda: [c for c in client.get_children(election) if c[-10:].isdigit()]  # noqa: E731
        nodes = wait_until(lambda: (lambda c: c if len(c) == 3 else None)(queue()),
                           timeout=20, message="three nodes")
        owners = {client.exists(f"{election}/{node}").ephemeralOwner for node in nodes}
        assert owners == {oracle._client.client_id[0]}
        wait_until(lambda: len(terms(path, name)) >= 1 and terms(path, name)[-1].beats > 3, timeout=10)
        leader.stop()
        wait_until(lambda: any(c.is_leader() for c in crowns if c is not leader), timeout=20,
                   message="a successor")
        wait_until(lambda: len(terms(path, name)) >= 2 and terms(path, name)[-1].beats > 3, timeout=10)
        assert crown_sync.find_leader(name, oracle=oracle).identity != leader.identity
    finally:
        for crown in crowns:
            crown.stop()
        oracle.close()
        client.stop()
    report = assert_safe(path, name, min_terms=2)
    assert len({t.identity for t in report.terms}) >= 2


def test_processes_contend_through_sigterm_and_sigkill(zk, name, tmp_path):
    fleet = Fleet(f"{zk.url}?session_timeout={SESSION}", tmp_path, name)
    try:
        for identity in ("a", "b", "c"):
            fleet.spawn(identity)
        first = fleet.wait_for_term()
        fleet.signal(first.identity, signal.SIGTERM)  # clean stop: hand over at once
        assert fleet.wait_exit(first.identity) == 0
        second = fleet.wait_for_term(other_than={first.identity})
        ended = max(t.end for t in fleet.terms() if t.token == first.token)
        # The node went when the leader stopped: an expiry would come at least 2/3 T after the
        # crash (the client pings every T/3), so a successor within T/2 proves the handoff.
        assert 0 < second.start - ended < SESSION / 2
        killed_at = clock.monotonic()
        fleet.signal(second.identity, signal.SIGKILL)  # crash: the session must expire first
        third = fleet.wait_for_term(other_than={first.identity, second.identity}, timeout=30)
        assert third.start > killed_at
        # The crash failover waited for the session to expire, no longer (generous bound).
        assert third.start - killed_at < SESSION + 5
    finally:
        fleet.stop_all()
    assert_safe(fleet.journal, name, min_terms=3)  # no overlap, strictly rising tokens


def test_real_session_expiry_ends_the_term(zk, name, tmp_path):
    path = str(tmp_path / "journal.jsonl")
    # A session each (crowns on one URL would share one, and both lose it when it expires).
    oracles = [ZooKeeperOracle(zk.hosts, session_timeout=SESSION) for _ in range(2)]
    first = crown_sync.Crown(name, oracle=oracles[0], identity="first",
                             child=crown_sync.ThreadChild(journal.journaled_work, args=(path,)))
    second = crown_sync.Crown(name, oracle=oracles[1], identity="second",
                              child=crown_sync.ThreadChild(journal.journaled_work, args=(path,)))
    try:
        first.start()
        assert first.wait_for_leadership(20)
        second.start()
        wait_until(lambda: second.phase == "following", timeout=20, message="second follows")
        wait_until(lambda: terms(path, name) and terms(path, name)[-1].beats > 5, timeout=10)
        # Expire the leader's session for real: connect with its id and password, then close.
        session = first.oracle._client.client_id
        thief = KazooClient(hosts=zk.hosts, client_id=session)
        thief.start(timeout=20)
        thief.stop()
        thief.close()
        assert second.wait_for_leadership(20), "the follower takes over at once"
        wait_until(lambda: not first.is_leader(), timeout=10)
        wait_until(lambda: first.oracle._client.client_id and first.oracle._client.client_id[0] != session[0],
                   timeout=20, message="a new session")
        wait_until(lambda: first.phase == "following", timeout=20, message="first contends again")
        wait_until(lambda: terms(path, name)[-1].identity == "second" and terms(path, name)[-1].beats > 5,
                   timeout=10)
    finally:
        first.stop()
        second.stop()
        for oracle in oracles:
            oracle.close()
    report = assert_safe(path, name, min_terms=2)
    assert [t.identity for t in report.terms][:2] == ["first", "second"]


def test_sigstop_leader_past_the_session_timeout_then_sigcont(zk, name, tmp_path):
    fleet = Fleet(f"{zk.url}?session_timeout={SESSION}", tmp_path, name, child="process")
    try:
        fleet.spawn("a")
        first = fleet.wait_for_term()
        fleet.spawn("b")
        time.sleep(1.0)  # b queued behind a
        fleet.signal(first.identity, signal.SIGSTOP)
        stopped_at = clock.monotonic()
        second = fleet.wait_for_term(other_than={first.identity}, timeout=30)
        assert second.start > stopped_at
        time.sleep(1.0)
        fleet.signal(first.identity, signal.SIGCONT)
        time.sleep(2.0)  # the resumed leader must not work again while b leads
        now = fleet.running_term()
        assert now is not None and now.identity == second.identity
    finally:
        fleet.stop_all()
    assert_safe(fleet.journal, name, min_terms=2)


def test_server_restart_end_to_end(name, tmp_path):
    with ZooKeeperServer() as server:
        fleet = Fleet(f"{server.url}?session_timeout=6", tmp_path, name, child="process")
        try:
            fleet.spawn("a")
            fleet.spawn("b")
            first = fleet.wait_for_term(timeout=30)
            server.stop()  # a clean restart: ZooKeeper keeps the sessions
            down_at = clock.monotonic()
            time.sleep(1.0)
            server.start()
            # Leadership resumes (same session, new term, higher token) or moves: either way a
            # new term, with no overlap.
            after = fleet.wait_for_term(after=down_at, timeout=40)
            assert after.token > first.token
        finally:
            fleet.stop_all()
        report = assert_safe(fleet.journal, name, min_terms=2)
        assert max(t.start for t in report.terms) > down_at


def test_ensemble_member_of_the_leader_killed(name, tmp_path):
    # T = 8 s: syncLimit x tickTime = T/4 = 2 s, room for JVM pauses on a busy test machine.
    with ZooKeeperEnsemble(3, session_timeout=8) as ensemble:
        url = f"{ensemble.url}?session_timeout=8"
        fleet = Fleet(url, tmp_path, name)
        client = plain_client(ensemble.hosts)
        try:
            fleet.spawn("a")
            fleet.spawn("b")
            first = fleet.wait_for_term(timeout=30)
            _node, stat = leader_node(client, f"/crown_sync/{name}")
            member = ensemble.member_with_session(stat.ephemeralOwner)
            assert member is not None
            killed_at = clock.monotonic()
            member.kill()
            # Leadership survives (a new term of the same identity after the reconnect) or moves.
            after = fleet.wait_for_term(after=killed_at, timeout=40)
            report = journal.check(fleet.journal, name)
            assert report.ok, report.summary()
            member.start()
            ensemble.wait_quorum()
            time.sleep(0.5)
            assert fleet.running_term() is not None
        finally:
            client.stop()
            fleet.stop_all()
        report = assert_safe(fleet.journal, name, min_terms=2)
        assert after.token > first.token


def test_quorum_loss_ends_every_term_and_nobody_leads_until_it_is_back(name, tmp_path):
    timeout = 8.0  # syncLimit x tickTime = 2 s: room for JVM pauses on a busy test machine
    with ZooKeeperEnsemble(3, session_timeout=timeout) as ensemble:
        # A member cut off from the quorum may serve for syncLimit x tickTime before it notices.
        notice = ensemble.members[0].sync_limit * ensemble.members[0].tick_time / 1000.0
        fleet = Fleet(f"{ensemble.url}?session_timeout={timeout:g}", tmp_path, name)
        try:
            fleet.spawn("a")
            fleet.spawn("b")
            first = fleet.wait_for_term(timeout=30)
            for member in ensemble.members[1:]:
                member.kill()
            lost_at = clock.monotonic()  # one member of three left: no quorum
            time.sleep(timeout + 1.0)
            assert fleet.running_term() is None, "someone leads without a quorum"
            restored_at = clock.monotonic()  # no quorum before the members are back
            for member in ensemble.members[1:]:
                member.spawn()
            ensemble.wait_quorum()
            after = fleet.wait_for_term(after=restored_at, timeout=40)
        finally:
            fleet.stop_all()
    report = assert_safe(fleet.journal, name, min_terms=2)  # no overlap, rising tokens
    assert after.token > first.token
    for term in report.terms:
        # No term goes on past the session-timeout bound after the quorum was lost...
        assert term.end <= lost_at + timeout or term.start >= restored_at, term
        # ...and none starts while there is no quorum.
        assert not lost_at + notice < term.start < restored_at, term


def _delete_leaders_node(hosts: str, name: str) -> str:
    """Delete the leader's queue node as an administrator would (zkCli ``delete``): one plain
    client, nothing else touched."""
    client = plain_client(hosts)
    try:
        node, _stat = leader_node(client, f"/crown_sync/{name}")
        assert node is not None
        client.delete(f"/crown_sync/{name}/{node}")
        return node
    finally:
        client.stop()
        client.close()


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
def test_a_leaders_node_deleted_by_hand_no_overlap(zk, name, tmp_path, paused):
    # A command that takes 1.5 s to honour SIGTERM: the successor must wait for it to stop (the
    # old leader deletes its guard then), or, when the old leader's crown process is paused and
    # cannot say so, for the old term's deadline.
    fleet = Fleet(f"{zk.url}?session_timeout={SESSION}", tmp_path, name, child="command",
                  grace=2.5, stop_delay=1.5)
    try:
        fleet.spawn("a")
        first = fleet.wait_for_term()
        fleet.spawn("b")
        time.sleep(1.5)  # b queued behind a
        if paused:
            fleet.signal("a", signal.SIGSTOP)  # the crown's process only: its command runs on
        deleted_at = clock.monotonic()
        _delete_leaders_node(zk.hosts, name)
        second = fleet.wait_for_term(other_than={"a"}, after=deleted_at, timeout=30)
        if paused:
            fleet.signal("a", signal.SIGCONT)
        time.sleep(1.0)
    finally:
        fleet.stop_all()
    assert_safe(fleet.journal, name, min_terms=2)  # no overlap, strictly rising tokens
    assert second.token > first.token


def test_an_ensemble_whose_sync_limit_voids_the_deadlines_is_refused(name):
    # One member of a quorum (not standalone), so that conf shows syncLimit: 10 x 200 ms = 2 s
    # of serving after a cut, more than a quarter of a 3 s session.
    with ZooKeeperEnsemble(1, session_timeout=SESSION, sync_limit=10) as ensemble:
        crown = crown_sync.Crown(name, oracle=f"{ensemble.url}?session_timeout={SESSION:g}", child=None)
        crown.start()  # never raises: the refusal shows like an unreachable oracle
        try:
            error = wait_until(lambda: crown.status().last_error, timeout=30, message="last_error set")
            assert "syncLimit x tickTime = 10 x 200 ms = 2 s" in error and "0.75 s" in error, error
            assert "session_timeout >= 8" in error
            time.sleep(1.0)
            assert not crown.is_leader() and crown.phase != "leading"
        finally:
            crown.stop(timeout=30)
        # The same ensemble with a session long enough for it is used.
        fine = crown_sync.Crown(name, oracle=f"{ensemble.url}?session_timeout=8", child=None)
        fine.start()
        try:
            assert fine.wait_for_leadership(30)
            assert fine.status().last_error is None
        finally:
            fine.stop(timeout=30)


def test_an_unreadable_conf_is_said_once_and_not_refused(name, caplog):
    with ZooKeeperServer(extra_config={"4lw.commands.whitelist": "srvr"}) as server:
        oracle = ZooKeeperOracle(server.hosts, session_timeout=SESSION)
        seats = [oracle.contender(name, f"c{i}", {}, Recorder()) for i in range(2)]
        try:
            with caplog.at_level(logging.WARNING, logger="crown_sync.oracles.zookeeper"):
                assert seats[0].claim().won
                assert not seats[1].claim().won
                assert seats[0].refresh().won
            said = [r for r in caplog.records if "cannot read the conf" in r.getMessage()]
            assert len(said) == 1
        finally:
            close_all([oracle], seats)


@pytest.mark.parametrize("crash", [False, True], ids=["stop", "kill"])
def test_server_restart_while_the_leaders_crown_process_is_paused_no_overlap(name, tmp_path, crash):
    # ZooKeeper keeps sessions across a restart (even a crash: they are in its transaction log)
    # and gives each a full timeout again from the restart: the paused leader's session expires
    # (and its node goes) only a session timeout after the server is back, when its deadline,
    # which its command's supervisor enforces, has long passed.
    with ZooKeeperServer() as server:
        fleet = Fleet(f"{server.url}?session_timeout={SESSION}", tmp_path, name, child="command",
                      grace=2.5, stop_delay=1.5)
        try:
            fleet.spawn("a")
            first = fleet.wait_for_term(timeout=30)
            fleet.spawn("b")
            time.sleep(1.5)  # b queued behind a
            fleet.signal("a", signal.SIGSTOP)
            paused_at = clock.monotonic()
            if crash:
                server.kill()
            else:
                server.stop()
            server.start()
            second = fleet.wait_for_term(other_than={"a"}, after=paused_at, timeout=40)
            fleet.signal("a", signal.SIGCONT)
            time.sleep(1.0)
        finally:
            fleet.stop_all()
        assert_safe(fleet.journal, name, min_terms=2)  # no overlap, strictly rising tokens
        assert second.token > first.token


@pytest.mark.parametrize("timeout", [20.0, SESSION], ids=["released", "waited-out"])
def test_a_successor_holds_back_while_a_revoked_leaders_guard_remains(zk, name, timeout):
    # Contender level: the leader's node is deleted by another client; the leader does nothing
    # more (as if its child were still stopping, or its process paused). The successor must not
    # win until the leader's guard goes (released: the leader abdicates once its child stopped)
    # or the leader's longest lease, counted from the successor's listing, has passed.
    oracles, recorders, seats = contenders(zk, name, 2, session_timeout=timeout)
    client = plain_client(zk.hosts)
    try:
        first = seats[0].claim()
        assert first.won
        assert not seats[1].claim().won and seats[1].watch(None)
        recorders[1].reset()
        deleted_at = clock.monotonic()
        client.delete(f"/crown_sync/{name}/{seats[0]._node}")
        wait_until(recorders[1].event.is_set, timeout=30, message="successor woken")
        wait_until(recorders[0].lost, timeout=10, message="old leader told it lost")
        held = seats[1].claim()
        assert not held.won and held.leader.identity == "c0"
        assert seats[1].watch(None) is True  # it waits to be woken, it does not spin
        assert client.exists(f"/crown_sync/{name}/{seats[0]._guard.name}") is not None
        recorders[1].reset()
        if timeout > SESSION:
            seats[0].abdicate()  # the old child stopped: the guard goes, the successor is woken
            wait_until(recorders[1].event.is_set, timeout=10, message="successor woken by the release")
            took_over = seats[1].claim()
            assert took_over.won, "the guard's release lets the successor in at once"
        else:
            for _attempt in range(10):  # a wake-up for another reason (a reconnect) looks again
                wait_until(recorders[1].event.is_set, timeout=20, message="successor woken by its timer")
                recorders[1].reset()
                took_over = seats[1].claim()
                if took_over.won:
                    break
                assert seats[1].watch(None)
            assert took_over.won
            # Never before the old term's deadline (lease_for) and its kill's 50 ms could pass.
            assert clock.monotonic() >= deleted_at + LEASE_FRACTION * timeout
        assert took_over.token > first.token
    finally:
        client.stop()
        close_all(oracles, seats)


# --------------------------------------------------------------------------- sharing the ensemble


def test_an_open_acl_is_said_once_in_status_telemetry_and_the_cli(zk, name, caplog):
    from click.testing import CliRunner

    from crown_sync import telemetry
    from crown_sync.cli import main

    said = []
    handle = telemetry.attach(lambda event, meta: said.append(meta["notice"]), prefixes=["crown.oracle.notice"])
    open_crown = crown_sync.Crown(name, oracle=f"{zk.url}?session_timeout={SESSION}",
                                  child=lambda term: term.stop_event.wait())
    closed_crown = crown_sync.Crown(name + "-auth", oracle=f"zookeeper://app:pw-1@{zk.hosts}?session_timeout={SESSION}"
                                    "&path_prefix=/notices_test",
                                    child=lambda term: term.stop_event.wait())
    try:
        with caplog.at_level(logging.WARNING, logger="crown_sync.oracles.zookeeper"):
            open_crown.start()
            closed_crown.start()
            assert open_crown.wait_for_leadership(30) and closed_crown.wait_for_leadership(30)
            time.sleep(SESSION)  # a few refreshes: nothing said again
        notices = open_crown.status().notices
        assert len(notices) == 1 and "open ACL" in notices[0], notices
        assert closed_crown.status().notices == ()
        assert said == list(notices)
        assert sum("open ACL" in r.getMessage() for r in caplog.records) == 1
        result = CliRunner().invoke(main, ["status", name, "--oracle", zk.url])
        assert result.exit_code == 0 and "note: open ACL" in result.output, result.output
        # run: said once on stderr, here before it gives up (the election is led)
        result = CliRunner().invoke(main, ["run", name, "--oracle", f"{zk.url}?session_timeout={SESSION}",
                                           "--no-wait", "--", "true"])
        assert result.output.count("note: open ACL") == 1, result.output
    finally:
        telemetry.detach(handle)
        open_crown.stop()
        closed_crown.stop()


@pytest.fixture(scope="module")
def zk_tls():
    # A client certificate is required, given as one PEM (certificate and key) through tls_cert
    # alone: kazoo sent none that way (it loads one only with a keyfile).
    server = ZooKeeperServer(tls=True, client_certificate=True)
    server.start()
    yield server
    server.cleanup()


def test_over_tls_a_crown_leads_with_a_clean_journal(zk_tls, name, tmp_path):
    fleet = Fleet(f"{zk_tls.tls_url}&session_timeout={SESSION}", tmp_path, name)
    try:
        fleet.spawn_many(2, "c")
        first = fleet.wait_for_term(timeout=60)
        fleet.signal(first.identity, signal.SIGTERM)
        fleet.wait_for_term(other_than={first.identity}, timeout=60)
    finally:
        fleet.stop_all()
    fleet.assert_safe(min_terms=2)
    # The ensemble check reads the member's conf over TLS too (a plain read would be refused).
    oracle = ZooKeeperOracle.from_url(f"{zk_tls.tls_url}&session_timeout={SESSION}")
    seat = oracle.contender(name, "me", {}, Recorder())
    try:
        seat.claim()
        assert oracle._session._ensemble_check[1] is None and not oracle._session._conf_unreadable_logged
    finally:
        seat.close()
        oracle.close()


@pytest.mark.parametrize("case", ["plain client", "wrong CA"])
def test_a_tls_port_turns_away_a_plain_client_and_an_untrusted_certificate_clearly(zk_tls, name, case):
    from crown_sync.testing.servers import self_signed

    query = f"session_timeout={SESSION}&connect_timeout=1"
    if case == "plain client":
        url, expected = f"zookeeper://127.0.0.1:{zk_tls.tls_port}?{query}", "is this its TLS port? then use tls=true"
    else:
        other = self_signed(str(zk_tls.tmpdir), "other-" + name)
        url, expected = (f"zookeeper://127.0.0.1:{zk_tls.tls_port}?tls=true&tls_ca={other}&{query}",
                         "TLS handshake failed: SSLCertVerificationError")
    crown = crown_sync.Crown(name, oracle=url, child=lambda term: term.stop_event.wait())
    try:
        crown.start()
        wait_until(lambda: expected in (crown.status().last_error or ""), message=expected, timeout=60)
        assert not crown.is_leader()
    finally:
        crown.stop()


def test_a_planted_node_neither_leads_nor_takes_a_dismissal(zk, name):
    # A co-tenant's persistent node that sorts first and carries a leader record: the claim
    # looks past it, find_leader names the contender, dismiss reaches the contender.
    client = plain_client(zk.hosts)
    client.ensure_path(f"/crown_sync/{name}")
    planted = client.create(f"/crown_sync/{name}/{'f' * 32}-", b'{"identity": "mallory", "metadata": {}}',
                            sequence=True).rsplit("/", 1)[1]
    oracles, recorders, seats = contenders(zk, name, 1)
    try:
        assert seats[0].claim().won
        assert oracles[0].find_leader(name).identity == "c0"
        assert oracles[0].dismiss(name) is True
        wait_until(recorders[0].lost, timeout=10, message="the contender dismissed")
        assert b"dismissed" not in client.get(f"/crown_sync/{name}/{planted}")[0]
        assert any(planted in text and "persistent" in text for text in oracles[0].notices(name))
    finally:
        client.stop()
        close_all(oracles, seats)
