"""The lease oracles (memcached, Redis, NATS KV) at scale, judged by the servers' own counts:
many crowns of one process on one oracle share one connection and one poller thread, and with
many followers of one election a graceful handoff costs a bounded number of server requests,
not some per follower. Safety is read from the journal the leaders' children write.
"""

import threading
import time
import uuid
from typing import Any, Dict, List

import pytest

import crown_sync
from crown_sync.oracles._lease import encode
from crown_sync.testing import journal
from crown_sync.testing.fleet import wait_until
from crown_sync.urls import oracle_from_url

from .support import with_query

KINDS = ("memcached", "redis", "nats")


def _start(kind: str) -> Any:
    if kind == "memcached":
        from crown_sync.testing.memcached_server import MemcachedServer

        return MemcachedServer(memory_mb=16).start()
    if kind == "redis":
        from crown_sync.testing.redis_server import RedisServer

        return RedisServer(persistence=None).start()
    from crown_sync.testing.nats_server import NatsServer

    return NatsServer().start()


def _connections(kind: str, server: Any) -> int:
    """Client connections the server counts now (the counting connection included, if any)."""
    if kind == "memcached":
        return int(server.stats()["curr_connections"])
    if kind == "redis":
        return int(server.info("clients")["connected_clients"])
    return int(server.varz()["connections"])


@pytest.fixture(scope="module")
def servers():
    """Each kind's server, started on first use, stopped with the module."""
    started: Dict[str, Any] = {}

    def get(kind: str) -> Any:
        if kind not in started:
            started[kind] = _start(kind)
        return started[kind]

    try:
        yield get
    finally:
        for server in started.values():
            server.stop()


def _url(kind: str, server: Any, **options) -> str:
    return server.url(**options) if kind == "redis" else with_query(server.url, options)


def _crown(name: str, oracle: Any, path: str) -> crown_sync.Crown:
    return crown_sync.Crown(name, oracle=oracle, child=crown_sync.ThreadChild(journal.journaled_work, args=(path,)))


def _pollers() -> set:
    return {thread for thread in threading.enumerate() if thread.name.startswith("crown-sync-lease")}


def _assert_safe(path: str, names: List[str]) -> None:
    for name in names:
        report = journal.check(path, name)
        assert report.ok, report.summary()


@pytest.mark.parametrize("kind", KINDS)
def test_many_crowns_of_a_process_share_one_connection_and_one_poller(kind, servers, tmp_path):
    """20 elections, two crowns each, all on one URL in this process: one oracle, whose one
    connection (Redis: and its pub/sub connection) and one poller thread serve every crown.
    Before, each crown opened its own connection and each follower ran a poller thread."""
    server = servers(kind)
    url = _url(kind, server, ttl=2.5, margin=1, poll_interval=0.2)
    path = str(tmp_path / "journal")
    names = [f"scale-{uuid.uuid4().hex[:8]}" for _ in range(20)]
    base = _connections(kind, server)
    pollers_before = _pollers()
    crowns = [_crown(name, url, path) for name in names for _ in range(2)]
    for crown in crowns:
        crown.start()
    try:
        wait_until(lambda: sum(crown.is_leader() for crown in crowns) == len(names), timeout=60,
                   message="a leader in every election")
        time.sleep(1.0)  # every follower watching, every leader renewed
        assert _connections(kind, server) - base <= (2 if kind == "redis" else 1)
        assert len(_pollers() - pollers_before) == 1  # (other tests' oracles may have theirs)
    finally:
        for crown in crowns:
            crown.stop()
    wait_until(lambda: _connections(kind, server) <= base, timeout=20, message="every connection closed")
    _assert_safe(path, names)


@pytest.mark.parametrize("kind", ["redis", "nats"])
def test_a_handoff_costs_a_bounded_number_of_requests_whatever_the_followers(kind, servers, tmp_path):
    """20 followers, each on an oracle of its own (its own connection, push and poller, as if in
    processes of their own), watch one election; its leader stops and hands over. The server
    counts what the handoff cost: about one write on each side, not a takeover attempt and a
    claim per follower as before (3 x 20 = 60 or more)."""
    server = servers(kind)
    followers = 20
    # Rare polls (every 10 s) so that the count is the handoff's, not the followers' rest.
    url = _url(kind, server, ttl=20, poll_interval=10)
    path = str(tmp_path / "journal")
    name = f"herd-{uuid.uuid4().hex[:8]}"
    oracles = [oracle_from_url(url) for _ in range(followers + 1)]
    crowns = [_crown(name, oracle, path) for oracle in oracles]
    try:
        # As a cleanly stopped election leaves its key: the first leader waits no quarantine.
        stopped = {"state": "released", "token": 1, "prev": "setup", "identity": "setup"}
        oracle, key = oracles[0], oracles[0].key(name)
        assert oracle._shared("create", key, encode(stopped), 3600)
        # Rewritten by compare-and-set, as a release is (Redis stamps its server's run_id then).
        assert oracle._shared("replace", key, encode(stopped), oracle._shared("read", key)[1], 3600)
        crowns[0].start()
        wait_until(crowns[0].is_leader, timeout=60, message="the first leader")
        for crown in crowns[1:]:
            crown.start()
        wait_until(lambda: all(crown.leader() is not None for crown in crowns), timeout=60,
                   message="every follower knows the leader")
        server.request_count()  # (Redis: starts counting with MONITOR)
        time.sleep(1.5)  # every follower watching
        before = server.request_count()
        crowns[0].stop()
        wait_until(lambda: sum(crown.is_leader() for crown in crowns[1:]) == 1, timeout=30, message="a successor")
        time.sleep(1.0)  # every follower heard of the new leader
        cost = server.request_count() - before
        leaders = [crown for crown in crowns[1:] if crown.is_leader()]
        assert len(leaders) == 1
        print(f"{kind}: {cost} server requests for one handoff with {followers} followers")
        assert cost < followers, f"{cost} server requests for one handoff with {followers} followers"
    finally:
        for crown in crowns:
            crown.stop()
        for oracle in oracles:
            oracle.close()
    _assert_safe(path, [name])
