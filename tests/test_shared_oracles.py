"""Crowns of one process built from the same oracle URL share one oracle (crown_sync._shared):
reference-counted, closed with its last crown, forgotten by a forked child; and, judged by the
ZooKeeper server itself, 20 crowns from one URL hold one session.
"""

import os
import uuid

import pytest

import crown_sync
from crown_sync import _shared
from crown_sync.oracles.file import FileOracle
from crown_sync.testing import journal
from crown_sync.testing.fleet import assert_safe, terms, wait_until
from crown_sync.testing.zookeeper_server import ZooKeeperServer, four_letter_word


@pytest.fixture
def name():
    return "s-" + uuid.uuid4().hex[:12]


def closes(oracle):
    """Count the oracle's close() calls (the oracle still closes as it would)."""
    calls = []
    close = oracle.close

    def counting():
        calls.append(1)
        close()
    oracle.close = counting
    return calls


def journaled(path):
    return crown_sync.ThreadChild(journal.journaled_work, args=(path,))


def test_crowns_from_one_url_share_one_oracle_closed_with_the_last(tmp_path, name):
    url = f"file://{tmp_path / 'oracle'}"
    path = str(tmp_path / "journal.jsonl")
    crowns = [crown_sync.Crown(name, oracle=url, identity=f"c{i}", child=journaled(path)) for i in range(5)]
    oracle = crowns[0].oracle
    assert all(crown.oracle is oracle for crown in crowns)
    assert [refs for shared, refs in _shared.shared() if shared is oracle] == [5]
    closed = closes(oracle)
    other = crown_sync.Crown(name + "-x", oracle=url + "?check_interval=2")  # other options: another oracle
    mine = FileOracle(str(tmp_path / "mine"))
    users_closed = closes(mine)
    users = crown_sync.Crown(name + "-y", oracle=mine)
    try:
        assert other.oracle is not oracle and users.oracle is mine
        other.stop()
        assert all(shared is not mine for shared, _refs in _shared.shared())
        for crown in crowns:
            crown.start()
        for stopping in range(4):  # a crown stopping must not close the others' oracle
            leader = wait_until(lambda: next((c for c in crowns[stopping:] if c.is_leader()), None),
                                timeout=30, message="a leader")
            wait_until(lambda: journal_beats(path, name, leader) > 3, timeout=30, message="work")
            crowns.remove(leader)
            crowns.insert(0, leader)
            leader.stop()
            assert not closed
        last = crowns[4]
        wait_until(lambda: journal_beats(path, name, last) > 3, timeout=30,
                   message="the last crown works on the shared oracle")
        last.stop()
        assert closed == [1]
        assert all(shared is not oracle for shared, _refs in _shared.shared())
        other = crown_sync.Crown(name, oracle=url)
        assert other.oracle is not oracle  # a new one after the last
    finally:
        for crown in crowns + [other, users]:
            crown.stop()
    assert not users_closed  # the user's oracle is the user's to close
    assert_safe(path, name, min_terms=5)


def test_the_default_oracle_is_shared_like_its_url(tmp_path, name, monkeypatch):
    url = f"file://{tmp_path / 'oracle'}"
    monkeypatch.setenv("CROWN_SYNC_ORACLE", url)
    crowns = [crown_sync.Crown(name), crown_sync.Crown(name), crown_sync.Crown(name, oracle=url)]
    oracle = crowns[0].oracle
    try:
        assert crowns[1].oracle is oracle and crowns[2].oracle is oracle
    finally:
        for crown in crowns:
            crown.stop()
    assert all(shared is not oracle for shared, _refs in _shared.shared())


def journal_beats(path, name, crown):
    """Beats journaled by ``crown``'s current term (0 if it leads no term now)."""
    term = crown.term()
    return sum(t.beats for t in terms(path, name) if term is not None and t.token == term.token)


def test_a_crown_releases_once_however_it_ends(tmp_path, name):
    url = f"file://{tmp_path / 'oracle'}"
    keeper = crown_sync.Crown(name, oracle=url)
    oracle = keeper.oracle
    closed = closes(oracle)
    with pytest.raises(TypeError, match="metadata"):
        crown_sync.Crown(name, oracle=url, metadata={"x": object()})  # refused: its reference given back
    unstarted = crown_sync.Crown(name, oracle=url)
    unstarted.stop()
    unstarted.stop()  # a second stop must not drop the keeper's reference
    assert [refs for shared, refs in _shared.shared() if shared is oracle] == [1]
    assert not closed
    keeper.stop()
    assert closed == [1]


def test_a_forked_child_starts_with_an_empty_registry(tmp_path, name):
    url = f"file://{tmp_path / 'oracle'}"
    crown = crown_sync.Crown(name, oracle=url)
    oracle = crown.oracle
    closed = closes(oracle)
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if every check holds
        status = 1
        try:
            fresh = [shared for shared, _refs in _shared.shared()] == []
            child_crown = crown_sync.Crown(name, oracle=url)
            status = 0 if fresh and child_crown.oracle is not oracle else 2
            child_crown.stop()
            crown.stop()  # inherited: releases nothing in the child
            status = status or (3 if closed else 0)
        finally:
            os._exit(status)
    _pid, status = os.waitpid(pid, 0)
    try:
        assert os.WEXITSTATUS(status) == 0, f"child failed check {os.WEXITSTATUS(status)}"
        assert [refs for shared, refs in _shared.shared() if shared is oracle] == [1]  # the parent's stays
    finally:
        crown.stop()
    assert closed == [1]


@pytest.fixture(scope="module")
def zk():
    with ZooKeeperServer() as server:
        yield server


def test_twenty_crowns_from_one_url_hold_one_zookeeper_session(zk, name, tmp_path):
    """Ten elections, two crowns each, all from one URL: the server lists one session (``cons``)
    while they run, still one after 19 stopped, none after the last. Each election's journal is
    safe."""
    url = f"{zk.url}?session_timeout=3"
    path = str(tmp_path / "journal.jsonl")
    elections = [f"{name}-{i}" for i in range(10)]
    crowns = [crown_sync.Crown(election, oracle=url, identity=f"{election}-{j}", child=journaled(path))
              for election in elections for j in range(2)]
    try:
        for crown in crowns:
            crown.start()
        for election in elections:
            wait_until(lambda: any(t.beats for t in terms(path, election)), timeout=60,
                       message=f"a leader of {election} at work")
        assert len(zk.sessions()) == 1, four_letter_word(zk.port, "cons")
        for crown in crowns[1:]:
            crown.stop()
        wait_until(crowns[0].is_leader, timeout=30, message="the last crown leads")
        assert len(zk.sessions()) == 1, four_letter_word(zk.port, "cons")
        crowns[0].stop()
        wait_until(lambda: not zk.sessions(), timeout=30, message="the session closed with the last crown")
    finally:
        for crown in crowns:
            crown.stop()
    for election in elections:
        assert_safe(path, election, min_terms=1)
