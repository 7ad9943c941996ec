"""Hostile neighbours (issue #17): what a co-tenant of a shared server, or an awkward password,
can do to a crown. The file oracle's and memcached's own attacks are in their test modules."""

import logging
import threading
import time
import urllib.parse

import pytest

import crown_sync
from crown_sync import clock, telemetry
from crown_sync.testing.fleet import wait_until
from crown_sync.testing.servers import free_port

# '@', ':', '/', '#', unicode: every character a URL password must have %-encoded.
AWKWARD = "Aw@k:wä/rd#Pw☃"
ENCODED = urllib.parse.quote(AWKWARD, safe="")
URL_FORMS = [
    "postgresql://app:{pw}@127.0.0.1:{port}/db?connect_timeout=1",
    "postgresql://127.0.0.1:{port}/db?user=app&password={pw}&connect_timeout=1",
    "zookeeper://app:{pw}@127.0.0.1:{port}/x?session_timeout=4&connect_timeout=1",
    "redis://app:{pw}@127.0.0.1:{port}/0?connect_timeout=1",
    "redis://:{pw}@127.0.0.1:{port}/0?connect_timeout=1",
    "nats://app:{pw}@127.0.0.1:{port}?connect_timeout=1",
    "nats://{pw}@127.0.0.1:{port}?connect_timeout=1",
    "rediss://app:{pw}@127.0.0.1:{port}/0?connect_timeout=1",
    "tls://app:{pw}@127.0.0.1:{port}?connect_timeout=1",
]


def _never_shown(text):
    return AWKWARD not in text and ENCODED not in text and "Pw☃" not in text and "Pw%E2" not in text


@pytest.mark.parametrize("form", URL_FORMS, ids=lambda form: form.split("@")[0].split("?")[0])
def test_an_awkward_password_shows_in_no_status_event_or_log_of_a_failing_oracle(form, caplog):
    caplog.set_level(logging.DEBUG, logger="crown_sync")
    url = form.format(pw=ENCODED, port=free_port())  # nothing listens there
    events = []
    handle = telemetry.attach(lambda event, meta: events.append(repr((event, meta))))
    crown = crown_sync.Crown("awkward", oracle=url, monitor_delay=0.2)
    try:
        crown.start()
        wait_until(lambda: crown.status().last_error, message="last_error", timeout=60)
        status = crown.status()
        assert "127.0.0.1" in status.oracle, status.oracle  # the server is named (the password is not)
        assert _never_shown(repr(status)) and _never_shown(crown.oracle.description), repr(status)
    finally:
        crown.stop()
        telemetry.detach(handle)
    assert events and all(_never_shown(event) for event in events)
    assert all(_never_shown(record.getMessage()) for record in caplog.records)


@pytest.mark.parametrize("password", [ENCODED, AWKWARD])
def test_a_memcached_url_with_a_password_is_refused_without_showing_it(password):
    with pytest.raises(ValueError) as refused:
        crown_sync.Crown("awkward", oracle=f"memcached://app:{password}@127.0.0.1:11211")
    assert "no user or password" in str(refused.value) and _never_shown(str(refused.value))


# What a dedicated Redis ACL user needs (docs/sharing.rst shows this line), and a co-tenant kept
# to its own keys and channels.
CROWN_ACL = ("user crown on >{pw} resetkeys ~crown_sync:* resetchannels &crown_sync:* -@all +evalsha"
             " +script|load +set +subscribe +unsubscribe +ping +role +info +hello +auth"
             " +get +incr +hget +hset +publish +time +sadd +srem +srandmember +expire +pubsub|numsub")
OTHER_ACL = "user other on >{pw} ~other:* &other:* +@all"


def assert_the_term_survives(server, fleet, attack):
    """Start ``server`` and two crowns, run ``attack()`` while one leads: its term must run on
    past a ttl (2.5 s here), no other term begin before the teardown (which may hand over), and
    the journal show no overlap."""
    try:
        server.start()
        fleet.spawn_many(2, "c")
        before = fleet.wait_for_term(timeout=60)
        attack()
        time.sleep(3.5)  # longer than the ttl: a landed delete or forged release would show by now
        assert fleet.running_term().identity == before.identity
        stopping = clock.monotonic()
    finally:
        fleet.stop_all()
        server.cleanup()
    report = fleet.assert_safe()
    begun = [(t.identity, t.token) for t in report.terms if t.start < stopping]
    assert begun == [(before.identity, before.token)], report.summary()


def test_redis_a_co_tenant_kept_to_its_own_keys_cannot_touch_a_crown(tmp_path):
    from redis import Redis
    from redis.exceptions import NoPermissionError

    from crown_sync.testing.redis_server import RedisServer

    from .oracles.support import Fleet

    server = RedisServer(extra_config=[CROWN_ACL.format(pw="crown-pw-1"), OTHER_ACL.format(pw="other-pw-1")])
    name = "billing"
    url = f"redis://crown:crown-pw-1@127.0.0.1:{server.port}/0?ttl=2.5&margin=1&poll_interval=0.05"
    key = f"crown_sync:{name}"

    def attack():
        with Redis(host="127.0.0.1", port=server.port, username="other", password="other-pw-1") as intruder:
            for step in (lambda: intruder.delete(key), lambda: intruder.set(key, b'{"state": "released"}'),
                         lambda: intruder.publish(key, "dismiss"), lambda: intruder.get(key)):
                with pytest.raises(NoPermissionError):
                    step()

    assert_the_term_survives(server, Fleet(url, tmp_path, name), attack)


# NATS: the crowns' user with the permissions docs/sharing.rst shows, and a co-tenant of the same
# account denied the crowns' bucket (its stream API subjects and the bucket's own subjects).
NATS_AUTHORIZATION = """
authorization {
  users = [
    {user: "crown", password: "%(crown)s", permissions: {
       publish: ["$KV.crown_sync.>", "$JS.API.>", "$JS.FC.>", "crown_sync.heir.crown_sync.>"],
       subscribe: ["_INBOX.>", "crown_sync.heir.crown_sync.>"]}}
    {user: "other", password: "%(other)s", permissions: {
       publish: {deny: ["$KV.crown_sync.>", "$JS.API.*.*.KV_crown_sync", "$JS.API.*.*.KV_crown_sync.>",
                        "$JS.API.*.*.*.KV_crown_sync", "$JS.API.*.*.*.KV_crown_sync.>",
                        "crown_sync.heir.crown_sync.>"]},
       subscribe: {deny: ["$KV.crown_sync.>", "crown_sync.heir.crown_sync.>"]}}}
  ]
}
"""


def _nats_attacks(url, key):
    """What the co-tenant tries, each over its own connection: the names of those that worked."""
    import asyncio

    import nats

    async def attempt(what):
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5, error_cb=_ignore)
        try:
            js = nc.jetstream(timeout=2)
            if what == "delete stream":
                await js.delete_stream("KV_crown_sync")
            elif what == "purge stream":
                await js.purge_stream("KV_crown_sync")
            elif what == "read the record":
                await js.get_last_msg("KV_crown_sync", f"$KV.crown_sync.{key}")
            else:
                headers = {"KV-Operation": "DEL"} if what == "delete key" else None
                await js.publish(f"$KV.crown_sync.{key}", b'{"state": "released"}', headers=headers)
            return what
        except Exception:  # a permissions violation: the request gets no answer, or an error
            return None
        finally:
            await nc.close()

    attacks = ["delete stream", "purge stream", "read the record", "delete key", "forge a release"]
    return [done for done in (asyncio.run(attempt(what)) for what in attacks) if done]


async def _ignore(_error):
    pass


def _nats_tenants():
    """A NatsServer (not started) with the users of NATS_AUTHORIZATION; (server, other's password)."""
    import secrets

    from crown_sync.testing.nats_server import NatsServer

    server = NatsServer()
    other = "other-" + secrets.token_hex(6)
    with open(server.config) as handle:
        config = handle.read()
    head = config[: config.index("authorization {")]
    with open(server.config, "w") as handle:
        handle.write(head + NATS_AUTHORIZATION % {"crown": server.password, "other": other})
    return server, other


def test_nats_the_crowns_user_of_the_docs_hands_over_at_once(tmp_path):
    # Its permissions include the heir subject: with polls every 30 s, only the offer hands over.
    from crown_sync.oracles._lease import encode
    from crown_sync.urls import oracle_from_url

    server, _ = _nats_tenants()
    try:
        server.start()
        url = f"nats://crown:{server.password}@127.0.0.1:{server.port}?ttl=60&poll_interval=30"
        oracles = [oracle_from_url(url) for _ in range(2)]
        changed = threading.Event()
        leader = oracles[0].contender("offered", "leader", {}, lambda lost=False: None)
        follower = oracles[1].contender("offered", "follower", {}, lambda lost=False: changed.set())
        try:
            # As a clean stop leaves the key: the first claim waits no quarantine (a ttl).
            assert oracles[0].shared_store().create(oracles[0].key("offered"), encode({"state": "released", "token": 1}), 10)
            assert wait_until(lambda: leader.claim().won, timeout=10, message="a first term")
            claim = follower.claim()
            assert not claim.won and follower.watch(claim.leader)
            time.sleep(1.0)  # its first read done, its process in the heir group
            changed.clear()
            leader.abdicate()
            assert changed.wait(5.0), "the release was not offered to the follower"
            assert follower.claim().won
        finally:
            for contender in (leader, follower):
                contender.close()
            for oracle in oracles:
                oracle.close()
    finally:
        server.cleanup()


def test_nats_a_co_tenant_denied_the_bucket_cannot_touch_a_crown(tmp_path):
    from .oracles.support import Fleet

    server, other = _nats_tenants()
    name = "billing"
    base = f"127.0.0.1:{server.port}"
    fleet = Fleet(f"nats://crown:{server.password}@{base}?ttl=2.5&margin=1&poll_interval=0.05", tmp_path, name)

    def attack():
        assert _nats_attacks(f"nats://other:{other}@{base}", name) == []

    assert_the_term_survives(server, fleet, attack)


# PostgreSQL: the crowns' role and a co-tenant's, each with CONNECT on the crowns' database and
# nothing else (docs/sharing.rst shows this SQL). A co-tenant may LISTEN and NOTIFY on any
# channel and take any advisory lock: PostgreSQL has no privileges on either.
def _pg_tenants(server, database="app"):
    """(crowns' URL, co-tenant's URL) on ``server``, started, in a database of the crowns' own."""
    server.start()
    crown_url = server.create_role("crown", "crown-pw-1")
    other_url = server.create_role("mallory", "mallory-pw-1")
    server.use_database(database)
    for statement in (f"REVOKE CONNECT, TEMPORARY ON DATABASE {database} FROM PUBLIC",
                      f"GRANT CONNECT ON DATABASE {database} TO crown, mallory"):
        server.sql(statement)
    return (crown_url.replace("/postgres", f"/{database}") + "?lease=2&wait_timeout=1",
            other_url.replace("/postgres", f"/{database}"))


def _notifications(conn):
    return [(n.payload, n.pid) for n in conn.notifies(timeout=0.2, stop_after=100)]


def test_postgres_a_co_tenant_cannot_dismiss_or_forge_a_release(tmp_path):
    """The co-tenant LISTENs from the start (so it learns every token), then NOTIFYs dismissals
    with an empty and a wrong token (the leader's pid is public in pg_locks): the term runs on (a
    dismissal naming no token counts only from a live session of the crowns' role's privileges).
    Then, twice, it forges a release just before an admin terminates the leader's session while
    its child takes 1.2 s to stop: first ``released:<the leader's token>``, then a claim and a
    release of its own. The woken follower must take neither for its predecessor's release, and
    waits out the lease (2 s): the journal shows no overlap (leading at once would overlap the
    stopping child)."""
    import psycopg

    from crown_sync.oracles.postgres import advisory_key
    from crown_sync.oracles.postgres._common import _channel
    from crown_sync.testing.postgres_server import PostgresServer

    from .oracles.support import Fleet

    name = "billing"
    channel = _channel(advisory_key("crown_sync", name))
    server = PostgresServer(fsync=False)
    terms = []
    try:
        crown_url, other_url = _pg_tenants(server)
        fleet = Fleet(crown_url, tmp_path, name, stop_delay=1.2)
        with psycopg.connect(other_url, autocommit=True) as intruder:
            intruder.execute(f"LISTEN {channel}")
            heard = []

            def holder_and_token():
                heard.extend(_notifications(intruder))
                token = max(int(p.split(":")[1]) for p, _ in heard if p.startswith("claimed:"))
                (holder,) = intruder.execute(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1").fetchone()
                return holder, token

            def notify(*payloads):
                for payload in payloads:
                    intruder.execute("SELECT pg_notify(%s, %s)", (channel, payload))

            fleet.spawn_many(2, "c")
            terms.append(fleet.wait_for_term(timeout=60))
            holder, token = holder_and_token()
            notify(f"dismiss:{holder}:", f"dismiss:{holder}:{token + 1}", f"dismiss:{holder}:x")
            time.sleep(1.6)  # a heeded dismissal stops the child at once, and it is gone 1.2 s later
            running = fleet.running_term()
            assert (running.identity, running.token) == (terms[0].identity, terms[0].token)
            for forged in (lambda token: [f"released:{token}"],
                           lambda token: [f"claimed:{token + 1}", f"released:{token + 1}"]):
                holder, token = holder_and_token()
                notify(*forged(token))  # committed: they precede the termination
                terminated = clock.monotonic()
                assert server.terminate(holder)
                terms.append(fleet.wait_for_term(other_than=[terms[-1].identity], after=terminated, timeout=60))
    finally:
        fleet.stop_all()
        server.cleanup()
    report = fleet.assert_safe(min_terms=3)
    for before, after in zip(terms, terms[1:]):
        old = [t for t in report.terms if t.token == before.token][0]
        assert old.end < after.start, report.summary()


def test_postgres_a_foreign_holder_of_the_key_is_reported_with_its_pid_and_role(tmp_path):
    """The co-tenant takes the election's computable advisory key before any crown: the crown
    does not look like an ordinary follower: its status names the holder's pid and role, its
    telemetry says so, and so does ``crown-sync status``. Once it lets go the crown leads."""
    import json
    import subprocess
    import sys

    import psycopg

    from crown_sync.oracles.postgres import advisory_key
    from crown_sync.testing.fleet import ROOT, contender_environment
    from crown_sync.testing.postgres_server import PostgresServer

    name = "billing"
    server = PostgresServer(fsync=False)
    events = []
    handle = telemetry.attach(lambda event, meta: events.append((event, meta.get("leader"), meta.get("notice"))))
    try:
        crown_url, other_url = _pg_tenants(server)
        with psycopg.connect(other_url, autocommit=True) as intruder:
            intruder.execute("SELECT pg_advisory_lock(%s)", (advisory_key("crown_sync", name),))
            pid = intruder.info.backend_pid
            expected = f"(foreign holder: backend pid {pid}, role mallory"
            with crown_sync.Crown(name, oracle=crown_url) as crown:
                wait_until(lambda: crown.status().leader is not None, message="the holder named", timeout=60)
                leader = crown.status().leader
                assert leader.identity.startswith(expected) and leader.metadata["role"] == "mallory", leader
                assert any(str(seen).startswith(expected) for _, seen, _ in events), events
                notice = f"the election's advisory lock is held by foreign holder: backend pid {pid}, role mallory"
                wait_until(lambda: crown.status().notices, message="the notice", timeout=30)
                assert [n[:len(notice)] for n in crown.status().notices] == [notice], crown.status()
                assert any(e == "crown.oracle.notice" and said.startswith(notice) for e, _, said in events), events
                result = subprocess.run(
                    [sys.executable, "-m", "crown_sync", "status", name, "--oracle", crown_url, "--json"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60, cwd=ROOT,
                    env=contender_environment())
                shown = json.loads(result.stdout)
                assert shown["leader"]["identity"].startswith(expected), result
                assert shown["leader"]["metadata"]["backend_pid"] == pid, result
                assert [n[:len(notice)] for n in shown["notices"]] == [notice], result
                assert not crown.is_leader()
                intruder.execute("SELECT pg_advisory_unlock_all()")
                assert crown.wait_for_leadership(30)
                wait_until(lambda: crown.status().notices == (), message="the notice withdrawn", timeout=30)
    finally:
        telemetry.detach(handle)
        server.cleanup()


# ZooKeeper: the crowns with digest credentials of their own; a co-tenant with other credentials
# (one JVM for the block).
@pytest.fixture(scope="module")
def zookeeper():
    from crown_sync.testing.zookeeper_server import ZooKeeperServer

    server = ZooKeeperServer()
    server.start()
    yield server
    server.cleanup()


def _zk_tenant(server, user="mallory"):
    from kazoo.client import KazooClient

    client = KazooClient(hosts=server.hosts, auth_data=[("digest", f"{user}:{user}-pw-1")])
    client.start(timeout=30)
    return client


def _zk_fleet(server, tmp_path, name, prefix):
    from .oracles.support import Fleet

    url = f"zookeeper://crown:crown-pw-1@{server.hosts}?session_timeout=3&path_prefix={prefix}"
    return Fleet(url, tmp_path, name, grace=1.0, monitor_delay=0.5)


def _notices(fleet):
    return [event["notice"] for event in fleet.events_of() if event.get("event") == "crown.oracle.notice"]


def test_zookeeper_a_co_tenant_with_other_credentials_cannot_touch_a_crowns_election(zookeeper, tmp_path):
    import types

    from kazoo.exceptions import NoAuthError
    from kazoo.security import OPEN_ACL_UNSAFE

    name, prefix = "billing", "/hostile_a"
    fleet = _zk_fleet(zookeeper, tmp_path, name, prefix)
    election = f"{prefix}/{name}"

    def attack():
        intruder = _zk_tenant(zookeeper)
        try:
            leader = sorted(intruder.get_children(election))[0]
            for step in (
                lambda: intruder.create(f"{election}/{'0' * 32}-", b"{}", acl=OPEN_ACL_UNSAFE, sequence=True),
                lambda: intruder.create(f"{prefix}/other", b"", acl=OPEN_ACL_UNSAFE),
                lambda: intruder.delete(f"{election}/{leader}"),
                lambda: intruder.set(f"{election}/{leader}", b'{"identity": "mallory"}'),
                lambda: intruder.set_acls(election, OPEN_ACL_UNSAFE),
            ):
                with pytest.raises(NoAuthError):
                    step()
        finally:
            intruder.stop()

    # The server runs for the whole block: nothing to start or clean up here.
    assert_the_term_survives(types.SimpleNamespace(start=lambda: None, cleanup=lambda: None), fleet, attack)
    assert _notices(fleet) == []  # nothing to report: credentials, parents of the crowns' own


def test_zookeeper_nodes_planted_in_an_open_election_are_ignored_and_reported(zookeeper, tmp_path):
    import signal

    from kazoo.security import OPEN_ACL_UNSAFE

    from crown_sync.oracles.zookeeper import ZooKeeperOracle

    name, prefix = "billing", "/hostile_b"
    election = f"{prefix}/{name}"
    intruder = _zk_tenant(zookeeper)
    # Before any crown: the election's node made open, a persistent node that sorts first and
    # looks like a leader, and a persistent "orphan guard" that claims an hour of lease.
    intruder.ensure_path(election, acl=OPEN_ACL_UNSAFE)
    planted = intruder.create(f"{election}/{'a' * 32}-", b'{"identity": "mallory", "metadata": {}}',
                              acl=OPEN_ACL_UNSAFE, sequence=True).rsplit("/", 1)[1]
    intruder.create(f"{election}/{'b' * 32}-guard", b'{"identity": "mallory", "session_timeout": 3600}',
                    acl=OPEN_ACL_UNSAFE)
    fleet = _zk_fleet(zookeeper, tmp_path, name, prefix)
    reader = ZooKeeperOracle.from_url(fleet.url)
    try:
        fleet.spawn_many(2, "c")
        first = fleet.wait_for_term(timeout=60)  # never, when the planted node counts
        assert reader.find_leader(name).identity == first.identity
        fleet.signal(first.identity, signal.SIGTERM)  # a handover past the planted nodes
        second = fleet.wait_for_term(other_than={first.identity}, timeout=60)
        wait_until(lambda: len(set(_notices(fleet))) >= 2, message="the crowns' notices", timeout=30)
    finally:
        reader.close()
        fleet.stop_all()
        intruder.stop()
    fleet.assert_safe(min_terms=2)
    assert second.token > first.token
    said = set(_notices(fleet))
    assert any(planted in text and "persistent" in text for text in said), said
    assert any(election in text and "world:anyone" in text for text in said), said
    assert any(planted in text for text in reader.notices(name))


def test_zookeeper_a_planted_ephemeral_node_before_a_follower_does_not_delay_its_takeover(zookeeper, tmp_path):
    # A co-tenant's ephemeral node with data that is no leader record, created (open election)
    # between the leader and the follower: the follower's watch must see it is not a contender's
    # and watch the leader instead, so that the leader's exit wakes it (it used to wake only at
    # monitor_timeout: 60 s here).
    from crown_sync.oracles.zookeeper import ZooKeeperOracle
    from crown_sync.testing import journal
    from crown_sync.testing.fleet import assert_safe, terms

    name, prefix = "billing", "/hostile_d"
    path = str(tmp_path / "journal.jsonl")
    url = f"zookeeper://{zookeeper.hosts}?session_timeout=3&path_prefix={prefix}"
    oracles = [ZooKeeperOracle.from_url(url) for _ in range(2)]  # a session each
    crowns = [crown_sync.Crown(name, oracle=oracle, identity=identity, monitor_timeout=60,
                               child=crown_sync.ThreadChild(journal.journaled_work, args=(path,)))
              for oracle, identity in zip(oracles, ("L", "F"))]
    watching = []
    handle = telemetry.attach(lambda event, meta: watching.append(meta["identity"]), "crown.monitor.started")
    intruder = _zk_tenant(zookeeper)
    try:
        crowns[0].start()
        assert crowns[0].wait_for_leadership(30)
        planted = intruder.create(f"{prefix}/{name}/{'b' * 32}-", b"not a record", ephemeral=True,
                                  sequence=True).rsplit("/", 1)[1]
        crowns[1].start()
        wait_until(lambda: "F" in watching, message="F watching", timeout=30)
        crowns[0].stop()
        assert crowns[1].wait_for_leadership(15), "F waited for its monitor_timeout"
        wait_until(lambda: len(terms(path, name)) >= 2 and terms(path, name)[-1].beats > 3, timeout=10)
        notices = crowns[1].status().notices
        assert any(planted in text and "not a contender's record" in text for text in notices), notices
    finally:
        telemetry.detach(handle)
        for crown in crowns:
            crown.stop()
        for oracle in oracles:
            oracle.close()
        intruder.stop()
    report = assert_safe(path, name, min_terms=2)
    assert [t.identity for t in report.terms] == ["L", "F"], report.summary()


def test_zookeeper_a_path_prefix_taken_by_a_co_tenant_is_reported_clearly(zookeeper):
    from kazoo.security import CREATOR_ALL_ACL, READ_ACL_UNSAFE

    intruder = _zk_tenant(zookeeper)
    intruder.create("/hostile_c", b"", acl=CREATOR_ALL_ACL + READ_ACL_UNSAFE)  # before the crowns
    crown = crown_sync.Crown("billing", oracle=f"zookeeper://crown:crown-pw-1@{zookeeper.hosts}"
                             "?session_timeout=3&connect_timeout=1&path_prefix=/hostile_c",
                             child=lambda term: term.stop_event.wait(), monitor_delay=0.2)
    try:
        crown.start()
        wait_until(lambda: "PermissionError: not allowed to create a node in /hostile_c/billing"
                   in (crown.status().last_error or ""), message="a clear last_error", timeout=30)
        assert not crown.is_leader() and "crown-pw-1" not in crown.status().last_error
    finally:
        crown.stop()
        intruder.stop()
