"""ZooKeeper, many elections on one session (issue #18): the leaders of a session share one
confirmation (the session's proof) instead of asking the server each, and a leader whose node an
administrator deletes still loses its term while the session's other leaders keep theirs. Judged
from outside: the server's own packet counter (``srvr``) and the children's journal.
"""

import re
import time
import uuid

import crown_sync
from crown_sync import clock
from crown_sync.oracles.zookeeper import ZooKeeperOracle
from crown_sync.testing import journal
from crown_sync.testing.zookeeper_server import ZooKeeperServer, four_letter_word

from .support import assert_safe, terms, wait_until
# Module-scoped: a server of this module's own, whose packet counter sees its clients only.
from .test_zookeeper import zk  # noqa: F401
from .zookeeper_support import leader_node, plain_client

SESSION = 3.0  # seconds: a leader refreshed every second used to send an exists each time
CROWNS = 30
WINDOW = 4.0  # seconds of counting at rest
SETTLE = 1.5  # seconds: the terms' first refreshes (which publish since) are behind them


def received(server: ZooKeeperServer) -> int:
    """Packets the server received from clients so far (pings included), as ``srvr`` says."""
    match = re.search(r"^Received: (\d+)", four_letter_word(server.port, "srvr"), re.M)
    assert match, "srvr shows no Received count"
    return int(match.group(1))


def rate_at_rest(server: ZooKeeperServer) -> float:
    first, start = received(server), clock.monotonic()
    time.sleep(WINDOW)
    return (received(server) - first) / (clock.monotonic() - start)


def test_leaders_share_one_confirmation_and_a_deleted_node_still_ends_its_term(zk, tmp_path):  # noqa: F811
    path = str(tmp_path / "journal.jsonl")
    names = [f"s{i}-{uuid.uuid4().hex[:8]}" for i in range(CROWNS)]
    oracle = ZooKeeperOracle(zk.hosts, session_timeout=SESSION)
    other = ZooKeeperOracle(zk.hosts, session_timeout=SESSION)  # the successor's own session

    def crown(name: str, on, identity: str = "a"):
        child = crown_sync.ThreadChild(journal.journaled_work, args=(path, 0.05))
        return crown_sync.Crown(name, oracle=on, identity=identity, child=child).start()

    crowns = [crown(names[0], oracle)]
    successor = None
    try:
        wait_until(crowns[0].is_leader, timeout=30, message="the first leader")
        time.sleep(SETTLE)
        one = rate_at_rest(zk)
        crowns += [crown(name, oracle) for name in names[1:]]
        wait_until(lambda: all(c.is_leader() for c in crowns), timeout=60, message="all leading")
        time.sleep(SETTLE)
        many = rate_at_rest(zk)
        # Before: each leader confirmed its node every T/3, 29 more requests a second here.
        assert many - one < 3, f"{one:.1f} packets/s with 1 leader, {many:.1f} with {CROWNS}"
        assert oracle._session.client is not None and len(zk.sessions()) == 1

        successor = crown(names[0], other, identity="b")
        client = plain_client(zk.hosts)
        try:
            election = f"/crown_sync/{names[0]}"
            queued = lambda: len([c for c in client.get_children(election) if c[-10:].isdigit()]) == 2  # noqa: E731
            wait_until(queued, timeout=20, message="the successor queued")
            node, _stat = leader_node(client, election)
            deleted_at = clock.monotonic()
            client.delete(f"{election}/{node}")  # as an administrator would (zkCli delete)
        finally:
            client.stop()
            client.close()
        wait_until(lambda: any(t.identity == "b" and t.beats > 3 for t in terms(path, names[0])), timeout=30,
                   message="the successor's term")
        time.sleep(0.5)
        assert all(c.is_leader() for c in crowns[1:])
    finally:
        for c in crowns + ([successor] if successor else []):
            c.stop(timeout=0)
        for c in crowns + ([successor] if successor else []):
            c.stop()
        oracle.close()
        other.close()
    report = assert_safe(path, names[0], min_terms=2)  # no overlap, rising tokens
    assert [t.identity for t in report.terms] == ["a", "b"]
    assert report.terms[0].end < deleted_at + SESSION
    for name in names[1:]:  # the session's other leaders kept their one term throughout
        kept = assert_safe(path, name).terms
        assert len(kept) == 1 and kept[0].start < deleted_at < kept[0].end - 0.5, kept
