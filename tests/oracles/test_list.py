"""The fleet view, ``crown_sync.list_elections(oracle)``, on every oracle kind's real server.

Two elections led, one with two followers: the listing names each leader with the token its own
crown holds (the crown's word, not the oracle's), and, on the oracles that can tell, how many
contenders each election has. A leader that stopped is no longer listed as leading.
"""

import uuid

import pytest

import crown_sync

from .support import wait_until

#: The kinds whose listing counts contenders (the leader included); the others say None.
COUNTS_CONTENDERS = {"zookeeper", "postgres"}


def idle(term) -> None:
    term.stop_event.wait()


def started(url: str, name: str, identity: str, metadata=None) -> crown_sync.Crown:
    # Each crown on an Oracle of its own: its own session, as another process's would be.
    crown = crown_sync.Crown(name, oracle=url, child=crown_sync.ThreadChild(idle), identity=identity,
                             metadata=metadata or {}, monitor_delay=0.5)
    return crown.start()


def listed(url: str, names) -> dict:
    return {election.name: election for election in crown_sync.list_elections(url) if election.name in names}


def test_lists_every_election_with_its_leader_token_and_contenders(served):
    url = served.url()
    busy, quiet = ("list-" + uuid.uuid4().hex[:10] for _ in range(2))
    crowns = []
    try:
        crowns.append(started(url, busy, "busy-leader", {"role": "busy"}))
        crowns.append(started(url, quiet, "quiet-leader"))
        for crown in crowns:
            assert crown.wait_for_leadership(30), crown.status().last_error
        crowns += [started(url, busy, f"busy-follower-{n}") for n in (1, 2)]
        expected = {busy: (crowns[0], 3), quiet: (crowns[1], 1)}
        counts = served.name in COUNTS_CONTENDERS

        def shown() -> bool:
            found = listed(url, expected)
            return set(found) == set(expected) and all(
                found[name].leader is not None
                and found[name].leader.identity == crown.identity
                and found[name].leader.token == crown.status().token
                and found[name].contenders == (count if counts else None)
                for name, (crown, count) in expected.items()
            )

        # Followers queue and a leader publishes its record asynchronously: wait for the listing
        # to agree with the crowns (it must, within the bound, or the listing is wrong).
        wait_until(shown, timeout=30, interval=0.2, message="the listing agrees with the crowns")
        found = listed(url, expected)
        assert found[busy].leader.metadata == {"role": "busy"}
        assert found[quiet].leader.since is not None
        assert all(crown.is_leader() for crown in crowns[:2])

        crowns[1].stop()  # the quiet election's only crown: nobody leads it afterwards
        wait_until(lambda: quiet not in listed(url, {quiet}) or listed(url, {quiet})[quiet].leader is None,
                   timeout=30, interval=0.2, message="the stopped leader is no longer listed as leading")
    finally:
        for crown in crowns:
            crown.stop()


def test_an_unreachable_oracle_raises_without_the_password(served):
    url = served.unreachable_url("List-secret-9")
    with pytest.raises(Exception) as caught:
        crown_sync.list_elections(url)
    assert "List-secret-9" not in str(caught.value)


@pytest.mark.server_oracle  # starts a server: deselected with the server kinds (tox's py39/py313)
def test_a_memcached_without_its_lru_crawler_cannot_list_and_says_why():
    from crown_sync.testing.memcached_server import MemcachedServer

    server = MemcachedServer(memory_mb=8, extra_args=["-o", "no_lru_crawler"]).start()
    try:
        with pytest.raises(crown_sync.ListingUnsupported, match="lru crawler disabled"):
            crown_sync.list_elections(server.url)
    finally:
        server.cleanup()
