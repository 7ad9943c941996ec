"""The PostgreSQL oracle against a real PostgreSQL started by the suite (initdb in a temp dir, as
the ``postgres`` user when root, on a free loopback port, stopped by pid).

Safety is judged by the independent journal that the leaders' children write themselves
(crown_sync.testing.journal), never by the oracle's word. Faults are real: SIGKILL, SIGTERM,
SIGSTOP past the lease, ``pg_terminate_backend``, an immediate server restart, the server's own
``idle_session_timeout``, a hot standby made with ``pg_basebackup -R``, and a transaction-pooling
proxy.
"""

import contextlib
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psycopg
import pytest

import crown_sync
from crown_sync import clock, telemetry
from crown_sync.oracles import postgres as postgres_oracle
from crown_sync.oracles.postgres import (
    OPTIONS,
    PoolingDetected,
    PostgresOracle,
    PostgresOracleError,
    StandbyRefused,
    advisory_key,
)
from crown_sync.testing import journal
from crown_sync.testing.postgres_server import PostgresServer

from .postgres_support import TransactionPooler
from .support import ROOT, Fleet, wait_until

SECRET = "s3cret-Pa55"
# Short leases keep the suite quick: lease 2 s -> margin 0.2 s, confirmations every 0.4 s.
FAST = "lease=2&wait_timeout=1"
# A claim on a server younger than its lease waits out the rest of the lease (a leader of the
# previous incarnation may still run its child): tests that claim directly wait this long first.
SETTLED = 3.0  # the longest lease of a test that claims directly


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer(fsync=False)
    server.start()
    server.settle(SETTLED)
    yield server
    server.cleanup()


APP_USER, APP_PASSWORD = "crown_app", "Pw-of-the-app-7f3"  # an ordinary role, scram auth


@pytest.fixture(autouse=True)
def own_database(request):
    """A test that uses the module's server gets a new database of its own: a claim that was
    not queued when the lock was freed reads the database's count of terminated sessions
    (pg_stat_database.sessions_killed), which the other tests' terminations raise."""
    servers = [f for f in ("pg", "pg_tls") if f in request.fixturenames]
    if not servers:
        yield None
        return
    with fresh_database(request.getfixturevalue(servers[0])) as database:
        yield database


@contextlib.contextmanager
def fresh_database(server):
    server.use_database("t_" + os.urandom(6).hex())
    try:
        yield server.database
    finally:
        server.use_database(None)


@pytest.fixture(scope="module")
def app_role(pg):
    pg.create_role(APP_USER, APP_PASSWORD)


@pytest.fixture
def app_url(pg, app_role, own_database):
    """A URL for an ordinary (non-superuser) role that must authenticate with its password."""
    return pg.url_for(APP_USER, APP_PASSWORD)


@pytest.fixture
def name(request):
    return f"pg-{request.node.name}".replace("[", "-").replace("]", "")[:100]


class Signals:
    """An on_change callback that records its calls."""

    def __init__(self):
        self.calls = []
        self.event = threading.Event()

    def __call__(self, lost=False):
        self.calls.append((clock.monotonic(), lost))
        self.event.set()

    def wait(self, timeout=30.0, lost=None):
        return wait_until(
            lambda: [c for c in self.calls if lost is None or c[1] == lost], timeout=timeout,
            message=f"on_change(lost={lost})",
        )


def oracle_for(pg, **options):
    options.setdefault("lease", 2.0)
    options.setdefault("wait_timeout", 1.0)
    return PostgresOracle(pg.url_for(password=SECRET), **options)


def line_of(pg, oracle, name):
    """The server's view of an election: (holders of the lock, its waiters, holders of the line,
    its waiters), each a sorted list of backend pids."""
    unsigned = oracle.key(name) & 0xFFFFFFFFFFFFFFFF
    rows = pg.sql(
        "SELECT objsubid, granted, pid FROM pg_locks WHERE locktype = 'advisory'"
        " AND classid::bigint = %s AND objid::bigint = %s", (unsigned >> 32, unsigned & 0xFFFFFFFF)
    )
    return tuple(sorted(pid for sub, granted, pid in rows if (sub, granted) == kind)
                 for kind in ((1, True), (1, False), (2, True), (2, False)))


def holder_pid(pg, oracle, name):
    holders = line_of(pg, oracle, name)[0]
    return holders[0] if holders else None


def journal_ok(path, name, min_terms):
    report = journal.check(path, name)
    assert report.ok, report.summary()
    assert len(report.terms) >= min_terms, report.summary()
    assert all(t.beats > 0 for t in report.terms[:-1]), report.summary()  # terms really worked
    return report


@contextlib.contextmanager
def paused(fleet, identity, pause=True):
    """The contender's crown process SIGSTOPped (by pid: its command child runs on) for the
    block, SIGCONTed after it whatever happened."""
    if pause:
        fleet.signal(identity, signal.SIGSTOP)
    try:
        yield
    finally:
        fleet.signal(identity, signal.SIGCONT)


# ----------------------------------------------------------------------- options, no server


def test_advisory_key_is_a_stable_signed_64_bit_hash():
    key = advisory_key("crown_sync", "billing-cron")
    assert key == advisory_key("crown_sync", "billing-cron")
    assert -(2 ** 63) <= key < 2 ** 63
    # Pinned: a key that changed between versions would let old and new contenders both lead.
    assert key == -9101135099483142873
    assert advisory_key("other-app", "billing-cron") != key
    assert advisory_key("crown_sync", "billing-cron2") != key


def test_url_options_are_ours_and_the_rest_is_libpq():
    oracle = PostgresOracle.from_url(
        f"postgres://app:{SECRET}@db.example:6432/app?lease=20&confirm_interval=3&margin=1.5"
        "&namespace=billing&sslmode=verify-full&target_session_attrs=read-write&wait_timeout=2"
    )
    assert (oracle.lease, oracle.confirm_interval, oracle.margin) == (20.0, 3.0, 1.5)
    assert (oracle.namespace, oracle.wait_timeout) == ("billing", 2.0)
    assert SECRET not in oracle.description and "***" in oracle.description
    assert SECRET not in repr(oracle)
    params = psycopg.conninfo.conninfo_to_dict(oracle._dsn)
    assert params["sslmode"] == "verify-full" and params["target_session_attrs"] == "read-write"
    assert "lease" not in params and params["password"] == SECRET
    defaults = PostgresOracle.from_url("postgresql://app@db/app")
    assert (defaults.lease, defaults.confirm_interval, defaults.margin) == (10.0, 2.0, 1.0)
    # key=value DSNs work too
    assert PostgresOracle(f"host=db user=app password={SECRET}").description.count(SECRET) == 0


@pytest.mark.parametrize(
    "url, option",
    [
        ("postgresql://db/app?lease=soon", "lease"),
        ("postgresql://db/app?lease=0.5", "lease"),
        ("postgresql://db/app?lease=10&confirm_interval=5", "confirm_interval"),
        ("postgresql://db/app?lease=10&margin=6", "margin"),
        ("postgresql://db/app?wait_timeout=-1", "wait_timeout"),
        ("postgresql://db/app?connect_timeout=0", "connect_timeout"),
        ("postgresql://db/app?lease=3&lease=4", "lease"),
        ("postgresql://db/app?leese=3", "lease"),  # unknown: the message lists ours
        ("postgresql://db/app?namespace=", "namespace"),
        ("postgresql://db/app?takeover_delay=120", "takeover_delay"),
        ("postgresql://db/app?lease=2&takeover_delay=2", "takeover_delay"),
    ],
)
def test_bad_url_options_name_the_option(url, option):
    with pytest.raises(ValueError) as info:
        crown_sync.oracle_from_url(url)
    assert option in str(info.value)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="dsn"):
        PostgresOracle(f"host=db password={SECRET} bogus_parameter=1")
    with pytest.raises(ValueError, match="confirm_interval"):
        PostgresOracle("postgresql://db/app", lease=4, confirm_interval=2)
    with pytest.raises(TypeError, match="lease"):
        PostgresOracle("postgresql://db/app", lease="10")
    with pytest.raises(TypeError, match="dsn"):
        PostgresOracle(None)
    with pytest.raises(ValueError) as info:
        PostgresOracle(f"postgresql://app:{SECRET}@db/app?lease=3")
    assert SECRET not in str(info.value) and "lease" in str(info.value)
    with pytest.raises(ValueError, match="sessions"):
        PostgresOracle.from_url("postgresql://db/app?sessions=pooled")
    with pytest.raises(ValueError, match="poll_interval"):
        PostgresOracle("postgresql://db/app", sessions="shared", poll_interval=0)
    assert set(OPTIONS) == {"namespace", "lease", "confirm_interval", "margin", "connect_timeout",
                            "wait_timeout", "takeover_delay", "sessions", "poll_interval"}


def test_takeover_delay_must_leave_the_woken_followers_idle_session_alive():
    """An explicit takeover_delay (an opt-out of waiting out the predecessor's lease): the woken
    follower's session is idle while it waits, and the server ends a session idle for lease
    seconds: a delay that long would make every takeover after a termination fail. Unset (the
    default), the follower waits out the lease, confirming its session meanwhile."""
    for lease, delay in ((2, 2), (2, 5), (10, 9.5), (10, 4.6)):
        with pytest.raises(ValueError) as info:
            PostgresOracle("postgresql://db/app", lease=lease, takeover_delay=delay)
        message = str(info.value)
        assert "takeover_delay" in message and "(lease - margin) / 2" in message, message
    # the limit itself, and the defaults, are accepted
    assert PostgresOracle("postgresql://db/app", lease=10, takeover_delay=4.5).takeover_delay == 4.5
    assert PostgresOracle("postgresql://db/app", lease=1).takeover_delay is None
    assert PostgresOracle.from_url("postgresql://db/app?takeover_delay=0").takeover_delay == 0.0


def test_lease_becomes_whole_milliseconds_rounded_up():
    """int(2.01 * 1000) is 2009: a server timeout below the lease, refused on every connect."""
    from crown_sync.oracles.postgres import _lease_ms

    assert [_lease_ms(x) for x in (2.01, 1.1, 2.0, 1.0005, 3600.0)] == [2010, 1100, 2000, 1001, 3600000]
    for lease in (1.001, 1.1, 2.01, 2.3, 4.7, 9.99, 123.456):
        assert _lease_ms(lease) / 1000 >= lease - 1e-9
        oracle = PostgresOracle("postgresql://db/app", lease=lease)
        assert int(oracle._defaults["tcp_user_timeout"]) / 1000 >= lease - 1e-9


# ------------------------------------------------------------------- contender level, server


def own_session_settings(contender):
    """The settings of the contender's OWN session, read through its own connection (not an
    admin session), and the client socket's TCP options."""
    with contender._io_lock:
        conn = contender._conn
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        server = dict(conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
            (["idle_session_timeout", "tcp_user_timeout", "tcp_keepalives_idle",
              "tcp_keepalives_interval", "tcp_keepalives_count"],),
        ).fetchall())
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    try:
        client = {
            "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            "user_timeout_ms": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        }
    finally:
        sock.close()
    return pid, {k: int(v) for k, v in server.items()}, client


@pytest.mark.parametrize("lease", [2.01, 3.0])
def test_leaders_own_session_carries_the_lease_settings(pg, name, lease):
    """What the docs promise, read from the leader's own session (server side, through its
    connection) and from its socket (client side): every timeout is at least the lease."""
    oracle = oracle_for(pg, lease=lease)
    contender = oracle.contender(name, "me", {}, Signals())
    try:
        claim = contender.claim()
        assert claim.won
        pid, server, client = own_session_settings(contender)
        assert pid == holder_pid(pg, oracle, name)  # the session that holds the lock
        lease_ms = lease * 1000 - 1e-6
        assert server["idle_session_timeout"] >= lease_ms, server
        assert server["tcp_user_timeout"] >= lease_ms, server
        assert min(server[n] for n in server if n.startswith("tcp_keepalives")) > 0, server
        assert server["tcp_keepalives_idle"] + server["tcp_keepalives_interval"] * server["tcp_keepalives_count"] >= lease
        assert client["keepalive"] == 1 and client["user_timeout_ms"] >= lease_ms, client
        assert client["idle"] + client["interval"] * client["count"] >= lease, client
        # The bound used for deadlines is what the server enforces, never below the lease.
        assert contender._bound >= lease - 1e-9
        assert contender.refresh().won
        # The server-wide defaults are untouched: these are per-session settings.
        assert pg.sql("SELECT setting FROM pg_settings WHERE name = 'idle_session_timeout'") == [("0",)]
    finally:
        contender.close()
        oracle.close()


def test_awkward_lease_still_leads(pg, name, tmp_path):
    """lease=2.01 (int(2.01 * 1000) = 2009 ms) used to be refused on every connect."""
    path = str(tmp_path / "journal")
    url = pg.url_for(password=SECRET, lease=2.01, wait_timeout=1)
    child = crown_sync.ThreadChild(journal.journaled_work, args=(path,))
    with crown_sync.Crown(name, oracle=url, child=child) as crown:
        assert crown.wait_for_leadership(30), crown.status().last_error
        time.sleep(1.0)  # confirmations keep it
        assert crown.is_leader() and crown.status().last_error is None
    journal_ok(path, name, 1)


def test_libpq_parameters_reach_the_server_and_passwords_stay_hidden(pg, name):
    oracle = PostgresOracle.from_url(pg.url_for(password=SECRET, lease=3, sslmode="disable", application_name="billing-app"))
    contender = oracle.contender(name, "me", {}, Signals())
    try:
        claim = contender.claim()
        assert claim.won
        pid = holder_pid(pg, oracle, name)
        rows = pg.sql(
            "SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)"
            " WHERE a.pid = %s", (pid,)
        )
        assert rows == [("billing-app", False)]
        settings = dict(pg.sql(
            "SELECT name, setting FROM pg_settings WHERE name IN ('idle_session_timeout', 'tcp_user_timeout')"
        ))
        assert settings["idle_session_timeout"] == "0"  # ours is per session, not the server's
        assert SECRET not in oracle.description
    finally:
        contender.close()
        oracle.close()


def test_leader_record_is_readable_without_ddl_and_vanishes_with_the_lock(pg, name):
    oracle, reader = oracle_for(pg), oracle_for(pg)
    leader = oracle.contender(name, "host-a:1", {"url": "http://a:8000", "n": [1, 2]}, Signals())
    try:
        assert reader.find_leader(name) is None
        claim = leader.claim()
        assert claim.won and claim.token > 0
        found = reader.find_leader(name)
        assert found.identity == "host-a:1"
        assert found.metadata == {"url": "http://a:8000", "n": [1, 2]}
        assert found.token == claim.token
        assert abs(found.since - time.time()) < 600
        assert pg.sql("SELECT count(*) FROM pg_class WHERE relname LIKE 'crown%%'") == [(0,)]
        follower = oracle.contender(name, "host-b:2", {}, Signals())
        lost = follower.claim()
        assert not lost.won and lost.leader.identity == "host-a:1" and lost.leader.token == claim.token
        follower.close()
        leader.abdicate()
        assert reader.find_leader(name) is None
        # metadata too big for track_activity_query_size is dropped, never cut
        big = oracle.contender(name, "host-c:3", {"blob": "x" * 5000}, Signals())
        assert big.claim().won
        found = reader.find_leader(name)
        assert found.identity == "host-c:3" and found.metadata == {} and found.token is not None
        big.close()
        wait_until(lambda: reader.find_leader(name) is None, message="lock freed by close()")
    finally:
        leader.close()
        oracle.close()
        reader.close()


def test_follower_is_woken_by_the_server_and_takes_over_with_a_higher_token(pg, name):
    oracle = oracle_for(pg)
    signals = Signals()
    a = oracle.contender(name, "a", {}, Signals())
    b = oracle.contender(name, "b", {}, signals)
    try:
        first = a.claim()
        assert first.won
        lost = b.claim()
        assert not lost.won and lost.leader.identity == "a"
        assert b.watch(lost.leader) is True
        assert b.claim().won is False  # queued on the lock: answered without I/O
        a.abdicate()
        signals.wait()
        second = b.claim()
        assert second.won and second.token > first.token
        # Granted by the server: the claim asks for a refresh at once, which publishes the
        # record (the engine starts the child first).
        assert second.refresh_in == 0
        assert b.refresh().won
        assert oracle.find_leader(name).identity == "b"
        assert oracle.find_leader(name).token == second.token
        assert a.claim().won is False
    finally:
        a.close()
        b.close()
        oracle.close()


def test_only_the_first_follower_in_line_listens_and_waits_for_the_lock(pg, name):
    """Followers queue in the election's line (the two-integer advisory lock of the key's
    halves); only the first in line LISTENs and waits for the lock, so a handoff's
    notifications signal two backends, not every follower's (PostgreSQL signals every listening
    backend of the database). Each handoff passes the line on, as the server shows, and each
    successor leads at once: it heard its predecessor's release."""
    oracle = oracle_for(pg)
    leader = oracle.contender(name, "leader", {}, Signals())
    followers = {}
    try:
        first = leader.claim()
        assert first.won
        for i in range(5):
            signals = Signals()
            follower = oracle.contender(name, f"f{i}", {}, signals)
            followers[follower] = signals
            assert follower.claim().won is False and follower.watch(None)

        def settled(holder, queued):
            holders, waiting, in_line, behind = line_of(pg, oracle, name)
            return (holders == [holder._backend_pid] and len(waiting) == 1 and in_line == waiting
                    and sorted(behind + waiting) == sorted(f._backend_pid for f in queued))

        token = first.token
        for _ in range(4):
            wait_until(lambda: settled(leader, followers), message="one follower on the lock, the rest in line")
            (next_pid,) = line_of(pg, oracle, name)[1]
            successor = next(f for f in followers if f._backend_pid == next_pid)
            assert [f for f in followers if f._line.listening] == [successor]
            leader.abdicate()
            followers.pop(successor).wait()
            claim = successor.claim()
            assert claim.won and claim.token > token
            assert claim.refresh_in == 0  # led on the wait's result: the release was heard
            assert successor.refresh().won
            leader.close()
            leader, token = successor, claim.token
        wait_until(lambda: settled(leader, followers), message="the last follower on the lock")
    finally:
        for contender in [leader, *followers]:
            contender.close()
        oracle.close()


def test_a_line_held_by_another_session_costs_at_most_a_wait(pg, name):
    """A session that holds the election's line but does not wait for the lock (a co-tenant;
    a first-in-line follower whose process is paused past its wait's lock_timeout; a session
    that leads with its place in line) must not keep the followers from the lock: a line wait
    that times out (every wait_timeout) and finds nobody waiting for the lock waits for it out
    of turn, listening. Queued so, it hears the leader's release and leads at once."""
    oracle = oracle_for(pg)  # lease 2 s, wait_timeout 1 s
    leader = oracle.contender(name, "leader", {}, Signals())
    signals = Signals()
    follower = oracle.contender(name, "follower", {}, signals)
    try:
        with psycopg.connect(pg.url, autocommit=True) as squatter:
            squatter.execute("SELECT pg_advisory_lock(%(line_hi)s::int4, %(line_lo)s::int4)", follower._line.params)
            first = leader.claim()
            assert first.won
            assert follower.claim().won is False and follower.watch(None)
            wait_until(lambda: line_of(pg, oracle, name)[3] == [follower._backend_pid], message="in line")
            wait_until(lambda: line_of(pg, oracle, name)[1] == [follower._backend_pid], timeout=30,
                       message="waiting for the lock out of turn")  # never, if it waited for its turn
            leader.close()
            signals.wait()
            claim = follower.claim()
            assert claim.won and claim.token > first.token
            assert claim.refresh_in == 0  # led at once: it heard the release
    finally:
        follower.close()
        leader.close()
        oracle.close()


def test_a_follower_that_read_no_record_but_heard_its_holder_lead_takes_over_a_crash_at_once(pg, name):
    """A follower whose wait began after the holder's claim but before its first confirmation
    (the moment the first in line is granted the lock and hands the line on) reads no leader
    record, and hears no claim: it counts the holder's ``leading:`` announcement instead, so
    the holder's crash (its session ended, not terminated) is proof enough to lead at once."""
    oracle = oracle_for(pg)
    a = oracle.contender(name, "a", {}, Signals())
    b_signals, c_signals = Signals(), Signals()
    b = oracle.contender(name, "b", {}, b_signals)
    c = oracle.contender(name, "c", {}, c_signals)
    try:
        assert a.claim().won
        assert b.claim().won is False and b.watch(None)
        wait_until(lambda: line_of(pg, oracle, name)[1] == [b._backend_pid], message="b queued")
        a.abdicate()
        b_signals.wait()  # b was granted the lock; its record is not published yet
        assert c.claim().won is False and c.watch(None)
        wait_until(lambda: line_of(pg, oracle, name)[1] == [c._backend_pid], message="c queued")
        second = b.claim()
        assert second.won and b.refresh().won  # announces "leading:<token>"
        postgres_oracle._shutdown(b._conn)  # b's process dies: the server sees its socket close
        c_signals.wait()
        third = c.claim()
        assert third.won and third.token > second.token
        assert third.refresh_in == 0  # led at once, without waiting out b's lease
    finally:
        for contender in (c, b, a):
            contender.close()
        oracle.close()


def test_a_claim_won_as_a_follower_queues_behind_it_leads_at_once(pg, name, monkeypatch):
    """As when a fleet starts: the first claim wins the free lock with no baseline, and asks
    whether a term of this election may still be ending (_QUIET_SQL). A follower whose wait
    (its statement tagged with the election) queued behind it meanwhile is alive and holds
    nothing: it does not count, so the first leader does not wait out a lease for it."""
    oracle = oracle_for(pg)
    a = oracle.contender(name, "a", {}, Signals())
    b = oracle.contender(name, "b", {}, Signals())
    asked = []
    execute = a._execute

    def follower_queues_first(query, params, conn=None, until=None):
        if query == postgres_oracle._sql._QUIET_SQL:
            assert b.claim().won is False and b.watch(None)
            wait_until(lambda: line_of(pg, oracle, name)[1] == [b._backend_pid], message="b queued")
            asked.append(query)
        return execute(query, params, conn, until)

    monkeypatch.setattr(a, "_execute", follower_queues_first)
    try:
        claim = a.claim()
        assert asked  # the claim did ask, with the follower queued
        assert claim.won and claim.token is not None
    finally:
        b.close()
        a.close()
        oracle.close()


def session_alive(pg, pid):
    return bool(pg.sql("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)))


def test_old_leaders_session_ends_only_after_its_successor_leads(pg, name, monkeypatch):
    # A long bound, so that only the successor's announcement can end the wait.
    monkeypatch.setattr(postgres_oracle._contender, "_HANDOFF_LINGER", 60.0)
    oracle = oracle_for(pg)
    signals = Signals()
    a = oracle.contender(name, "a", {}, Signals())
    b = oracle.contender(name, "b", {}, signals)
    closer = None
    try:
        assert a.claim().won
        a_pid = holder_pid(pg, oracle, name)
        assert b.claim().won is False and b.watch(None)
        wait_until(lambda: pg.sql("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (b._backend_pid,))
                   == [("Lock",)], message="b waiting on the lock")
        a.abdicate()
        closer = threading.Thread(target=a.close)
        closer.start()
        signals.wait()
        claim = b.claim()
        assert claim.won and claim.refresh_in == 0
        assert holder_pid(pg, oracle, name) == b._backend_pid
        # b holds the lock but has not confirmed (announced) yet: a's session is still there.
        time.sleep(0.3)
        assert closer.is_alive() and session_alive(pg, a_pid)
        assert b.refresh().won  # the term's first confirmation announces "leading:<token>"
        closer.join(30)
        assert not closer.is_alive()
        wait_until(lambda: not session_alive(pg, a_pid), message="a's session ended")
        assert b.refresh().won
    finally:
        if closer is not None:
            b.close()
            closer.join(60)
        a.close()
        b.close()
        oracle.close()


def test_handoff_with_sockets_above_descriptor_1023(pg, name, fds_above_1023):
    """A process with many crowns has sockets that select() refuses: the handoff still takes the
    fast path (nothing unread, the release seen), and the leader's socket watcher still works."""
    oracle = oracle_for(pg)
    signals = Signals()
    a = oracle.contender(name, "a", {}, Signals())
    b = oracle.contender(name, "b", {}, signals)
    try:
        assert a.claim().won
        assert b.claim().won is False and b.watch(None)
        assert b._conn.pgconn.socket > 1023
        a.abdicate()
        signals.wait()
        claim = b.claim()
        assert claim.won and claim.refresh_in == 0  # led on the wait's result: the fast path
        assert b.refresh().won
        pg.sql("SELECT pg_terminate_backend(%s)", (b._backend_pid,))
        signals.wait(lost=True)  # the socket watcher heard the goodbye
    finally:
        a.close()
        b.close()
        oracle.close()


@pytest.mark.parametrize("successor", ["none", "silent"])
def test_close_after_a_release_waits_only_for_a_successor_and_only_so_long(pg, name, monkeypatch, successor):
    """Nobody queued: close() does not wait at all. A queued session that never announces
    (not a crown: a plain pg_advisory_lock): close() waits out the bound, no longer."""
    bound = 60.0 if successor == "none" else 1.0
    monkeypatch.setattr(postgres_oracle._contender, "_HANDOFF_LINGER", bound)
    oracle = oracle_for(pg)
    a = oracle.contender(name, "a", {}, Signals())
    other = None
    try:
        assert a.claim().won
        a_pid = holder_pid(pg, oracle, name)
        if successor == "silent":
            other = psycopg.connect(pg.url_for(password=SECRET), autocommit=True)
            other_pid = other.info.backend_pid
            waiting = threading.Thread(target=lambda: other.execute("SELECT pg_advisory_lock(%s)", (oracle.key(name),)))
            waiting.start()
            wait_until(lambda: pg.sql("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (other_pid,))
                       == [("Lock",)], message="the plain session waiting on the lock")
        started = clock.monotonic()
        a.abdicate()
        a.close()
        took = clock.monotonic() - started
        wait_until(lambda: not session_alive(pg, a_pid), message="a's session ended")
        if successor == "none":
            assert took < 30  # far below the 60 s bound: it did not wait (generous: not a speed test)
        else:
            waiting.join(30)
            assert holder_pid(pg, oracle, name) == other_pid
            assert bound <= took < 30  # waited out the bound, and no longer
    finally:
        a.close()
        if other is not None:
            other.close()
        oracle.close()


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_terminated_session_is_noticed_at_once_and_refresh_says_lost(request, name, transport):
    """The socket watcher sees the FATAL message: on_change(lost=True) before any refresh. Over
    TLS it cannot peek at the message type; it lets libpq read, and the read fails all the same."""
    server = request.getfixturevalue("pg" if transport == "tcp" else "pg_tls")
    database = fresh_database(server)
    database.__enter__()
    oracle = oracle_for(server) if transport == "tcp" else PostgresOracle.from_url(tls_url(server))
    signals = Signals()
    a = oracle.contender(name, "a", {}, signals)
    b = oracle.contender(name, "b", {}, Signals())
    try:
        first = a.claim()
        assert first.won
        pid = holder_pid(server, oracle, name)
        assert encrypted(server, pid) is (transport == "tls")  # the server's word, not ours
        assert server.terminate(pid)
        signals.wait(lost=True)
        assert a.refresh().won is False
        # b wins the lock with no wait of its queued and no baseline: the database counted a
        # termination, so it holds the lock without leading for a lease, then leads.
        assert not b.claim().won
        second = wait_until(lambda: _won(b.claim), message="b leads a lease later")
        assert second.token > first.token
        assert encrypted(server, holder_pid(server, oracle, name)) is (transport == "tls")
        b.abdicate()
        # a reconnects: its new session cannot have seen b's release: a lease again.
        third = wait_until(lambda: _won(a.claim), message="a leads again")
        assert third.token > second.token
    finally:
        a.close()
        b.close()
        oracle.close()
        database.__exit__(None, None, None)


@pytest.mark.parametrize("end", ["release", "terminate", "sigkill"])
def test_takeover_waits_only_when_the_predecessor_may_have_been_terminated(pg, name, caplog, end, tmp_path):
    """A woken follower leads at once after a release, and after a session that ended otherwise
    than by pg_terminate_backend (here: its client process was SIGKILLed); after a termination,
    whose leader may still be stopping its child, it waits out the lease first."""
    caplog.set_level(logging.DEBUG, logger="crown_sync.oracles.postgres")
    oracle = oracle_for(pg)
    signals = Signals()
    a = oracle.contender(name, "a", {}, Signals())
    b = oracle.contender(name, "b", {}, signals)
    crashing = Fleet(f"{pg.url}?{FAST}", tmp_path, name, child="none")
    try:
        if end == "sigkill":  # the predecessor is a crown in a process of its own
            crashing.spawn("crashing")
            wait_until(lambda: holder_pid(pg, oracle, name), message="the crashing crown leads")
            first_token = None
        else:
            first = a.claim()
            assert first.won
            first_token = first.token
        assert not b.claim().won and b.watch(None)
        wait_until(lambda: pg.sql("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (b._backend_pid,)) == [("Lock",)],
                   message="b waiting")
        if end == "release":
            a.abdicate()
        elif end == "terminate":
            assert pg.terminate(holder_pid(pg, oracle, name))
        else:
            crashing.signal("crashing", signal.SIGKILL)
        signals.wait()
        second = b.claim()
        assert second.won and (first_token is None or second.token > first_token)
        decisions = [r.getMessage() for r in caplog.records if ": the predecessor" in r.getMessage()]
        expected = {"release": "released the lock: leading at once",
                    "terminate": "may have been terminated under it (or it never led): waiting 2.000s",
                    "sigkill": "not by pg_terminate_backend: leading at once"}[end]
        assert len(decisions) == 1 and expected in decisions[0], decisions
    finally:
        crashing.stop_all()
        a.close()
        b.close()
        oracle.close()


def test_terminated_leader_slow_to_stop_never_overlaps_its_successor(pg, name, tmp_path):
    """pg_terminate_backend frees the lock while the leader's child still runs; the leader hears
    the FATAL at once and stops its child, which here takes 150 ms. The woken follower, which
    cannot know that its predecessor is still alive, waits takeover_delay (0.5 s) first. The
    work's own journal shows no overlap: leading at once (a wrong kill detection) would."""
    path = str(tmp_path / "journal")

    def slow_to_stop(term):
        log = journal.Journal(path)
        try:
            log.write("start", term.name, term.identity, term.token)
            while not term.stop_event.wait(0.005):
                log.write("beat", term.name, term.identity, term.token)
            for _ in range(30):  # keeps acting for 150 ms after being told to stop
                time.sleep(0.005)
                log.write("beat", term.name, term.identity, term.token)
            log.write("stop", term.name, term.identity, term.token)
        finally:
            log.close()

    url = f"{pg.url}?lease=2&wait_timeout=1&takeover_delay=0.5"
    crowns = [crown_sync.Crown(name, oracle=url, child=crown_sync.ThreadChild(slow_to_stop, grace=5),
                               identity=f"c{i}") for i in range(2)]
    oracle = oracle_for(pg)
    try:
        crowns[0].start()
        assert crowns[0].wait_for_leadership(30)
        crowns[1].start()
        wait_until(lambda: crowns[1].status().phase == "following", message="c1 following")
        time.sleep(0.3)  # c1 is queued on the lock
        assert pg.terminate(holder_pid(pg, oracle, name))
        assert crowns[1].wait_for_leadership(30)
        time.sleep(0.2)
    finally:
        for crown in crowns:
            crown.stop()
        oracle.close()
    report = journal_ok(path, name, 2)
    first, second = report.terms[:2]
    assert first.identity == "c0" and second.identity == "c1"
    assert first.end < second.start and second.token > first.token


@pytest.mark.parametrize("crown", ["running", "paused"])
def test_terminated_leader_whose_command_is_slow_to_stop_never_overlaps(pg, name, tmp_path, crown):
    """pg_terminate_backend frees the lock of a live leader whose command needs 1.5 s to honour
    SIGTERM (the normal daemon), or whose crown process is paused (SIGSTOP, by pid: its command
    runs on) and hears nothing. The woken follower cannot prove how that term ended, so it holds
    the lock without leading until the predecessor's deadline has passed (a lease after its
    grant), confirming its session meanwhile. The command's own journal: no overlap, rising
    tokens. (Waiting takeover_delay, 50 ms, as before, overlapped by ~1.4 s.)"""
    fleet = Fleet(f"{pg.url}?{FAST}", tmp_path, name, child="command", grace=3.0, stop_delay=1.5)
    oracle = oracle_for(pg)
    for i in range(3):
        fleet.spawn(f"v{i}")
    try:
        before = fleet.wait_for_term()
        pid = holder_pid(pg, oracle, name)
        with paused(fleet, before.identity, pause=crown == "paused"):
            killed_at = clock.monotonic()
            assert pg.terminate(pid)
            after = fleet.wait_for_term(other_than={before.identity}, after=killed_at)
        time.sleep(0.3)
    finally:
        fleet.stop_all()
        oracle.close()
    fleet.assert_succeeded(before, after)


def test_successor_that_dies_while_waiting_out_the_lease_passes_the_wait_on(pg, name, tmp_path):
    """A successor that holds the lock without leading (waiting out a terminated leader's lease)
    and then vanishes proves nothing about the terminated leader's child: the next follower,
    whose wait began after the termination (so the termination count is unchanged, as after a
    plain crash), must not lead at once, since that session never led. The terminated leader's
    command (2.5 s to honour SIGTERM) journals; no overlap."""
    fleet = Fleet(pg.url_for(lease=3, wait_timeout=1), tmp_path, name, child="command", grace=4.0,
                  stop_delay=2.5)
    oracle = oracle_for(pg, lease=3, wait_timeout=30)  # b's wait stays first in the queue
    b = oracle.contender(name, "b", {}, Signals())
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND application_name = %s"
    try:
        fleet.spawn("a")
        first = fleet.wait_for_term()
        assert not b.claim().won and b.watch(None)
        wait_until(lambda: pg.sql(waiting, (f"crown_sync {name}"[:63],)) == [(1,)], message="b queued")
        fleet.spawn("c")
        wait_until(lambda: pg.sql(waiting, (f"crown_sync {name}"[:63],)) == [(2,)], message="c queued")
        killed_at = clock.monotonic()
        assert pg.terminate(holder_pid(pg, oracle, name))
        wait_until(lambda: holder_pid(pg, oracle, name) == b._backend_pid, message="b granted")
        time.sleep(1.2)  # c's wait has been re-armed (wait_timeout 1 s) since the termination
        postgres_oracle._shutdown(b._conn)  # b's client vanishes: its session ends, not killed
        second = fleet.wait_for_term(other_than={"a"}, after=killed_at)
        time.sleep(0.3)
    finally:
        b.close()
        fleet.stop_all()
        oracle.close()
    report = journal_ok(fleet.journal, name, 2)
    old = [t for t in report.terms if t.token == first.token][0]
    assert second.identity == "c" and old.end < second.start and second.token > first.token


def test_every_crown_session_terminated_while_the_leader_is_paused_never_overlaps(pg, name, tmp_path):
    """A connection killer ends every crown_sync session of the database at once (the leader's
    and the queued followers'), while the leader's crown process is paused (SIGSTOP, by pid: its
    command, 1.5 s to honour SIGTERM, runs on). The followers reconnect and one wins with
    pg_try_advisory_lock: no wait of its was queued when the lock was freed and its new session
    saw nothing. The database has counted a termination, so it holds its child back for a lease.
    The command's own journal: no overlap, rising tokens. (It led at once before: overlap.)"""
    fleet = Fleet(f"{pg.url}?{FAST}", tmp_path, name, child="command", grace=3.0, stop_delay=1.5)
    oracle = oracle_for(pg)
    application = f"crown_sync {name}"[:63]
    sessions = "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
    for i in range(3):
        fleet.spawn(f"e{i}")
    try:
        before = fleet.wait_for_term()
        wait_until(lambda: len(pg.sql(sessions, (application,))) == 3, message="3 sessions")
        leader = holder_pid(pg, oracle, name)
        with paused(fleet, before.identity):
            killed_at = clock.monotonic()
            ended = pg.sql("SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
                           " WHERE application_name = %s", (application,))  # in one statement
            assert leader in {pid for pid, _ in ended} and [e for _, e in ended] == [True] * 3
            after = fleet.wait_for_term(other_than={before.identity}, after=killed_at)
        time.sleep(0.3)
    finally:
        fleet.stop_all()
        oracle.close()
    fleet.assert_succeeded(before, after)


@pytest.mark.parametrize("end", ["release", "vanish", "terminate"])
def test_a_claim_that_was_not_queued_leads_at_once_only_with_proof(pg, name, end):
    """A crown that polls (as with monitor_leader=False) wins with pg_try_advisory_lock. Its
    failed claim on the same session saw the holder and the termination count: after a release
    or a vanished client (sessions_abandoned) it leads at once; after pg_terminate_backend it
    holds the lock a lease before it leads (the old code led at once)."""
    oracle = oracle_for(pg)
    a = oracle.contender(name, "a", {}, Signals())
    b = oracle.contender(name, "b", {}, Signals())
    try:
        first = a.claim()
        assert first.won
        assert not b.claim().won  # b's baseline: a holds the lock
        if end == "release":
            a.abdicate()
        elif end == "vanish":
            postgres_oracle._shutdown(a._conn)  # a's client is gone: not a termination
        else:
            assert pg.terminate(holder_pid(pg, oracle, name))
        wait_until(lambda: holder_pid(pg, oracle, name) is None, message="the lock is free")
        second = b.claim()
        if end == "terminate":
            assert not second.won
            second = wait_until(lambda: _won(b.claim), message="b leads a lease later")
        assert second.won and second.token > first.token
    finally:
        a.close()
        b.close()
        oracle.close()


def test_server_drops_a_silent_leader_no_sooner_than_its_deadline(pg, name):
    """idle_session_timeout is the lease: a leader that stops confirming loses its session, but
    only after the deadline it was given."""
    oracle = oracle_for(pg, lease=1.0, wait_timeout=0.2)
    signals = Signals()
    a = oracle.contender(name, "a", {}, signals)
    b = oracle.contender(name, "b", {}, Signals())
    try:
        claim = a.claim()
        assert claim.won
        pid = holder_pid(pg, oracle, name)
        log_before = len(pg.log_tail(10 ** 9))
        won = wait_until(lambda: b.claim().won and clock.monotonic(), timeout=30, message="b wins")
        assert won >= claim.deadline
        assert "idle-session timeout" in pg.log_tail(10 ** 9)[log_before:]
        assert pid not in [r[0] for r in pg.sql("SELECT pid FROM pg_stat_activity")]
        assert a.refresh().won is False
    finally:
        a.close()
        b.close()
        oracle.close()


def _won(call):
    claim = _try(call)
    return claim if claim is not None and claim.won else None


def test_tokens_rise_across_immediate_restarts(pg, name):
    """A restart is a lease boundary: the first claim on the new server wins the lock but waits
    (in a thread, confirming) until a lease has passed since the server started."""
    oracle = oracle_for(pg, lease=1.0, wait_timeout=0.5)
    contender = oracle.contender(name, "a", {}, Signals())
    tokens = []
    try:
        for _ in range(3):
            claim = wait_until(lambda: _won(contender.claim), timeout=30, message="claim after restart")
            tokens.append(claim.token)
            pg.restart(mode="immediate")
            assert contender.refresh().won is False
        claim = wait_until(lambda: _won(contender.claim), timeout=30, message="claim after restart")
        assert pg.incarnation_age() >= oracle.lease  # led no sooner than a lease after the start
        tokens.append(claim.token)
        assert tokens == sorted(set(tokens)), tokens
    finally:
        contender.close()
        oracle.close()
        pg.settle(SETTLED)


def _try(call):
    try:
        return call()
    except Exception:
        return None


def test_follower_waits_are_bounded_and_close_cancels_them(pg, name):
    oracle = oracle_for(pg, wait_timeout=0.5)
    a = oracle.contender(name, "a", {}, Signals())
    b = oracle.contender(name, "b", {}, Signals())
    try:
        assert a.claim().won
        assert b.claim().won is False
        assert b.watch(None)
        b_pid = b._backend_pid
        starts = set()

        def waiting_since():
            rows = pg.sql("SELECT query_start, wait_event_type FROM pg_stat_activity WHERE pid = %s", (b_pid,))
            if rows and rows[0][1] == "Lock":
                starts.add(rows[0][0])
            return len(starts) >= 2

        # The wait is re-armed (a fresh statement, a fresh snapshot) instead of pinning xmin.
        wait_until(waiting_since, timeout=30, interval=0.05, message="two lock waits")
        started = clock.monotonic()
        b.close()
        assert clock.monotonic() - started < 10  # bounded (generous: not a speed test)
        wait_until(lambda: not pg.sql("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (b_pid,)),
                   message="the follower's session ended")
        assert a.refresh().won
    finally:
        a.close()
        b.close()
        oracle.close()


def test_close_is_bounded_when_the_backend_is_frozen(pg, name):
    oracle = oracle_for(pg)
    a = oracle.contender(name, "a", {}, Signals())
    b = oracle.contender(name, "b", {}, Signals())
    frozen = None
    try:
        assert a.claim().won
        assert b.claim().won is False and b.watch(None)
        frozen = b._backend_pid
        wait_until(lambda: pg.sql("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (frozen,)) == [("Lock",)],
                   message="follower waiting")
        os.kill(frozen, signal.SIGSTOP)
        started = clock.monotonic()
        b.close()
        assert clock.monotonic() - started < 15
    finally:
        if frozen:
            os.kill(frozen, signal.SIGCONT)
        a.close()
        b.close()
        oracle.close()


@contextlib.contextmanager
def sigstopped(pid):
    """The process ``pid`` (a backend) SIGSTOPped for the block."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_claim_on_a_frozen_backend_fails_in_bounded_time_and_ends_its_session(pg, name):
    """A frozen server's kernel still ACKs, so nothing but our own bound ends a statement it
    never answers: a follower's claim (here its backend alone is SIGSTOPped) raises a
    ConnectionError about lease seconds later instead of blocking the crown's loop (and its
    stop()) for good, and its session is cut; the leader is undisturbed."""
    oracle = oracle_for(pg)
    a, b = (oracle.contender(name, identity, {}, Signals()) for identity in ("a", "b"))
    try:
        assert a.claim().won and b.claim().won is False
        outcome = []
        with sigstopped(b._backend_pid) as frozen:
            claimer = threading.Thread(target=lambda: outcome.append(_try(b.claim) or "raised"), daemon=True)
            claimer.start()
            give_up = clock.monotonic() + 30  # generous: the bound is the lease (2 s)
            while claimer.is_alive() and clock.monotonic() < give_up:
                assert a.refresh().won  # the leader confirms as its crown would
                claimer.join(0.3)
            assert not claimer.is_alive(), "the claim on a frozen backend never returned"
        assert outcome == ["raised"]
        wait_until(lambda: not pg.sql("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (frozen,)),
                   message="the cut session ended")
        assert b.claim().won is False  # on a new session: the leader still holds the lock
        assert a.refresh().won
    finally:
        for each in (a, b, oracle):
            each.close()


def test_fork_child_does_not_disturb_the_parents_session(pg, name):
    oracle = oracle_for(pg)
    leader = oracle.contender(name, "parent", {}, Signals())
    try:
        assert leader.claim().won
        assert oracle.find_leader(name).identity == "parent"
        pid_before = holder_pid(pg, oracle, name)
        child = os.fork()
        if child == 0:  # pragma: no cover - the child's exit code is the assertion
            code = 0
            try:
                leader.close()
                oracle.close()
                try:
                    leader.claim()
                    code = 3
                except PostgresOracleError:
                    pass
                del leader
                gc.collect()
            except BaseException:
                code = 4
            os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        time.sleep(0.2)
        assert leader.refresh().won
        assert holder_pid(pg, oracle, name) == pid_before
        assert oracle.find_leader(name).identity == "parent"
    finally:
        leader.close()
        oracle.close()


def test_standby_is_refused(pg, name):
    standby = pg.create_standby()
    try:
        standby.start()
        wait_until(lambda: standby.sql("SELECT pg_is_in_recovery()") == [(True,)], message="standby up")
        oracle = PostgresOracle(standby.url_for(password=SECRET), lease=2)
        contender = oracle.contender(name, "a", {}, Signals())
        with pytest.raises(StandbyRefused, match="standby"):
            contender.claim()
        with pytest.raises(StandbyRefused):
            oracle.find_leader(name)
        with crown_sync.Crown(name, oracle=oracle) as crown:
            wait_until(lambda: crown.status().last_error, message="last_error set")
            time.sleep(0.5)
            assert "standby" in crown.status().last_error and not crown.is_leader()
        assert standby.sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == [(0,)]
        contender.close()
        oracle.close()
    finally:
        standby.cleanup()


def test_a_role_that_cannot_read_the_control_file_is_refused_naming_the_function(pg, name):
    """Without pg_control_checkpoint() a claim could not tell a freshly promoted server: refused
    at connect with the grant to make, never a claim that might lead too early."""
    url = pg.create_role("no_control", "Pw-no-control-1")
    pg.sql("REVOKE EXECUTE ON FUNCTION pg_control_checkpoint() FROM PUBLIC")
    try:
        oracle = PostgresOracle.from_url(url + "?lease=2&wait_timeout=1")
        contender = oracle.contender(name, "a", {}, Signals())
        with pytest.raises(PostgresOracleError, match=r"GRANT EXECUTE ON FUNCTION pg_control_checkpoint\(\)"):
            contender.claim()
        contender.close()
        oracle.close()
    finally:
        pg.sql("GRANT EXECUTE ON FUNCTION pg_control_checkpoint() TO PUBLIC")


def test_failover_to_a_standby_that_missed_wal_keeps_tokens_rising(name, tmp_path):
    """An asynchronous standby stops receiving WAL (primary_conninfo cleared), the primary runs
    transactions and a new term, whose crown process is then paused (its command runs on), the
    primary crashes and the standby, running all along, is promoted. Its transaction ids continue
    from an older point, but the token carries the timeline in its high bits, so the term on the
    promoted server has the highest token; and the promotion is a lease boundary, so that term's
    child waits until the paused leader's command has reached its deadline. The journal: no
    overlap, rising tokens. (With the bare transaction id as the token, the third term's token
    was lower than the second's.)"""
    primary = PostgresServer(fsync=False)
    standby = fleet = None
    try:
        primary.start()
        standby = primary.create_standby()
        standby.start()
        url = (f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/postgres"
               f"?target_session_attrs=read-write&lease=4&wait_timeout=1")
        fleet = Fleet(url, tmp_path, name, child="command")
        for i in range(3):
            fleet.spawn(f"f{i}")
        first = fleet.wait_for_term(timeout=60)
        standby.sql("ALTER SYSTEM SET primary_conninfo = ''")
        standby.sql("SELECT pg_reload_conf()")
        wait_until(lambda: standby.sql("SELECT count(*) FROM pg_stat_wal_receiver") == [(0,)],
                   message="the standby stopped receiving WAL")
        for _ in range(20):  # transactions the standby never receives
            primary.sql("SELECT pg_current_xact_id()")
        fleet.signal(first.identity, signal.SIGTERM)
        second = fleet.wait_for_term(other_than={first.identity})
        with paused(fleet, second.identity):
            primary.stop(mode="immediate")
            failed_at = clock.monotonic()
            assert standby.sql("SELECT pg_promote(true, 60)") == [(True,)]
            third = fleet.wait_for_term(other_than={first.identity, second.identity}, after=failed_at,
                                        timeout=60)
        time.sleep(0.2)
    finally:
        if fleet is not None:
            fleet.stop_all()
        for server in (standby, primary):
            if server is not None:
                server.cleanup()
    report = journal_ok(fleet.journal, name, 3)
    assert first.token < second.token < third.token, report.summary()


def test_transaction_pooling_is_refused(pg, name):
    """A round-robin transaction pooler that forwards the server's own BackendKeyData (so the
    connect-time pid check passes): the marker and pid that every statement reports give it
    away."""
    pooler = TransactionPooler("127.0.0.1", pg.port, pg.superuser, "postgres",
                               reuse="round_robin", backend_key="forward").start()
    try:
        oracle = PostgresOracle.from_url(pooler.url(lease=2))
        contender = oracle.contender(name, "a", {}, Signals())
        with pytest.raises(PoolingDetected, match="different server sessions") as info:
            contender.claim()
        assert "pooler" in str(info.value)
        assert len(set(pooler.used)) == 2  # it really alternated
        contender.close()
        _assert_a_crown_is_refused(pg, pooler, oracle, name)
    finally:
        pooler.close()


def _assert_a_crown_is_refused(pg, pooler, oracle, name):
    """A whole crown through the pooler: it never leads, says why, and leaves no lock behind."""
    with crown_sync.Crown(name, oracle=oracle) as crown:
        wait_until(lambda: crown.status().last_error, message="last_error set")
        time.sleep(0.5)
        assert "pooler" in crown.status().last_error and not crown.is_leader()
    oracle.close()
    assert not [h for h in pg.advisory_holders() if h[0] in pooler.backend_pids()]


def test_pgbouncer_default_pooling_is_refused_even_on_one_reused_session(pg, name):
    """PgBouncer's default reuses the most recently freed server session: quiet contenders all
    get the SAME session, so the marker and pid never change, and a second contender's lock
    would be re-entered (two leaders). The pooler's own BackendKeyData gives it away at connect,
    before any lock is taken."""
    pooler = TransactionPooler("127.0.0.1", pg.port, pg.superuser, "postgres",
                               reuse="lifo", backend_key="own").start()
    try:
        # The hazard is real: two plain clients both "get" the same advisory lock through it.
        key = advisory_key("hazard", name)
        with psycopg.connect(pooler.url(), autocommit=True) as one, \
                psycopg.connect(pooler.url(), autocommit=True) as two:
            assert one.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]
            assert two.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]
            # The pooler may route the unlock to another of its sessions (seen under load):
            # unlock until the server shows the key free.
            unsigned = key & 0xFFFFFFFFFFFFFFFF
            wait_until(lambda: one.execute("SELECT pg_advisory_unlock_all()") and not [
                h for h in pg.advisory_holders() if (h[1], h[2]) == (unsigned >> 32, unsigned & 0xFFFFFFFF)
            ], message="the hazard lock released")
        del pooler.used[:]
        oracle = PostgresOracle.from_url(pooler.url(lease=2))
        contenders = [oracle.contender(name, identity, {}, Signals()) for identity in ("a", "b")]
        for contender in contenders:
            with pytest.raises(PoolingDetected, match="pooler or proxy") as info:
                contender.claim()
            assert "startup message" in str(info.value) and "direct connection" in str(info.value)
            contender.close()
        # Every statement went to one server session: only the startup check could tell.
        assert pooler.used and len(set(pooler.used)) == 1
        _assert_a_crown_is_refused(pg, pooler, oracle, name)
    finally:
        pooler.close()


# ------------------------------------------------------------------------- crowns, end to end


def test_pg_terminate_backend_of_the_leader(pg, name, tmp_path):
    fleet = Fleet(f"{pg.url}?{FAST}", tmp_path, name)
    oracle = oracle_for(pg)
    fleet.spawn_many(2, "t")
    try:
        before, after = fleet.term_across(lambda: pg.terminate(holder_pid(pg, oracle, name)), timeout=30)
        time.sleep(0.2)
    finally:
        fleet.stop_all()
        oracle.close()
    fleet.assert_succeeded(before, after, stopped=True)


@pytest.fixture(scope="module")
def pg_tls():
    server = PostgresServer(fsync=False, tls=True)
    server.start()
    server.settle(SETTLED)
    yield server
    server.cleanup()


def tls_url(server):
    return server.url_for(sslmode="verify-full", sslrootcert=server.certificate, lease=2, wait_timeout=1)


def encrypted(server, pid):
    rows = server.sql("SELECT ssl FROM pg_stat_ssl WHERE pid = %s", (pid,))
    return bool(rows and rows[0][0])


def test_tls_fleet_terminate_and_sigkill(pg_tls, name, tmp_path):
    """Contender processes over verify-full TLS: pg_terminate_backend of the leader, then SIGKILL
    of the next; the work's journal shows no overlap and rising tokens."""
    fleet = Fleet(tls_url(pg_tls), tmp_path, name)
    oracle = PostgresOracle.from_url(tls_url(pg_tls))
    for i in range(3):
        fleet.spawn(f"s{i}")
    try:
        first = fleet.wait_for_term()
        pid = holder_pid(pg_tls, oracle, name)
        assert encrypted(pg_tls, pid)
        killed_at = clock.monotonic()
        assert pg_tls.terminate(pid)
        second = fleet.wait_for_term(after=killed_at)
        assert encrypted(pg_tls, holder_pid(pg_tls, oracle, name))
        fleet.signal(second.identity, signal.SIGKILL)
        third = fleet.wait_for_term(other_than={second.identity})
        time.sleep(0.2)
    finally:
        fleet.stop_all()
        oracle.close()
    report = journal_ok(fleet.journal, name, 3)
    assert first.token < second.token < third.token
    old = [t for t in report.terms if t.token == first.token][0]
    assert old.stopped and old.end < second.start


def test_terminating_every_session_one_after_another_never_overlaps(pg, name, tmp_path):
    """As an admin killing a role's sessions does: the leader's, then the followers' one by one.
    Each follower is woken by the previous kill and is killed itself while it waits
    takeover_delay; none may lead on its dead session while the old leader, reconnected, leads
    on a new one (seen in the chaos suite)."""
    fleet = Fleet(f"{pg.url}?{FAST}", tmp_path, name)
    for i in range(3):
        fleet.spawn(f"k{i}")
    sessions = ("SELECT pid FROM pg_stat_activity WHERE application_name = %s ORDER BY"
                " (SELECT bool_or(granted AND objsubid = 1) FROM pg_locks l WHERE l.pid = pg_stat_activity.pid) IS NOT TRUE")
    try:
        for _ in range(4):
            fleet.wait_for_term()
            wait_until(lambda: len(pg.sql(sessions, (f"crown_sync {name}"[:63],))) == 3, message="3 sessions")
            killed_at = clock.monotonic()
            for (pid,) in pg.sql(sessions, (f"crown_sync {name}"[:63],)):  # the leader's first
                pg.terminate(pid)
                time.sleep(0.01)
            fleet.wait_for_term(after=killed_at)
        time.sleep(0.2)
    finally:
        fleet.stop_all()
    journal_ok(fleet.journal, name, 5)


def test_immediate_server_restart(pg, name, tmp_path):
    fleet = Fleet(f"{pg.url}?{FAST}", tmp_path, name)
    fleet.spawn_many(2, "r")
    try:
        before, after = fleet.term_across(lambda: pg.restart(mode="immediate"), timeout=60)
        time.sleep(0.2)
    finally:
        fleet.stop_all()
        pg.settle(SETTLED)
    fleet.assert_succeeded(before, after)


def test_server_restart_while_the_leader_is_paused_never_overlaps(pg, name, tmp_path):
    """The leader's crown process is paused (SIGSTOP, by pid: its command runs on, watched only
    by its deadline) while the server crashes and restarts. A follower reconnects and wins the
    lock of the new incarnation, which knows nothing of the old leader; its child waits until a
    lease has passed since the server started, by when the old command has been killed at its
    deadline. (Before, the follower led about 0.7 s after the restart: 2.5 s of overlap.)"""
    fleet = Fleet(pg.url_for(lease=4, wait_timeout=1), tmp_path, name, child="command")
    for i in range(2):
        fleet.spawn(f"r{i}")
    try:
        before = fleet.wait_for_term()
        with paused(fleet, before.identity):
            restarted_at = clock.monotonic()
            pg.restart(mode="immediate")
            after = fleet.wait_for_term(other_than={before.identity}, after=restarted_at, timeout=60)
        time.sleep(0.5)
    finally:
        fleet.stop_all()
        pg.settle(SETTLED)
    fleet.assert_succeeded(before, after)


def test_paused_leader_is_replaced_after_idle_session_timeout(pg, name, tmp_path):
    """SIGSTOP past the lease, then SIGCONT: the server ends the paused leader's session
    (idle_session_timeout), its process child stops itself by the deadline, a follower takes
    over, and the resumed crown finds its lease gone."""
    fleet = Fleet(f"{pg.url}?{FAST}", tmp_path, name, child="process")
    for i in range(2):
        fleet.spawn(f"s{i}")
    try:
        before = fleet.wait_for_term()
        log_before = len(pg.log_tail(10 ** 9))
        stopped_at = clock.monotonic()
        with paused(fleet, before.identity):  # the crown's process; its child runs on
            successor = fleet.wait_for_term(other_than={before.identity}, timeout=30)
            time.sleep(max(0.0, stopped_at + 3.0 - clock.monotonic()))
        time.sleep(1.0)
        assert fleet.processes[before.identity].poll() is None
        assert "idle-session timeout" in pg.log_tail(10 ** 9)[log_before:]  # the server did it
    finally:
        fleet.stop_all()
    fleet.assert_succeeded(before, successor)


def test_ordinary_role_with_a_password_leads_and_the_password_never_shows(pg, app_url, name, caplog):
    """scram-sha-256 over TCP, as a role without any privilege: it leads, its record is readable
    by its own role, another ordinary role sees only a foreign holder: its pid and role (docs), one with
    pg_read_all_stats sees the record; the password is nowhere in status, errors, events, logs."""
    caplog.set_level(logging.DEBUG, logger="crown_sync")
    assert pg.sql("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (APP_USER,)) == [(False,)]
    other_url = pg.create_role("crown_other", "Other-pw-1")
    stats_url = pg.create_role("crown_stats", "Stats-pw-2", grants=["pg_read_all_stats"])
    events = []
    handle = telemetry.attach(lambda event, meta: events.append(repr((event, meta))))
    url = f"{app_url}?{FAST}"
    assert APP_PASSWORD in url
    errors = []
    try:
        with crown_sync.Crown(name, oracle=url, metadata={"url": "http://a"}) as crown:
            assert crown.wait_for_leadership(30), crown.status().last_error
            rows = pg.sql("SELECT usename, client_addr IS NOT NULL FROM pg_stat_activity WHERE pid = %s",
                          (holder_pid(pg, crown.oracle, name),))
            assert rows == [(APP_USER, True)]  # the leader's session is the role's, over TCP
            token = crown.status().token
            found = crown_sync.find_leader(name, oracle=url)
            assert (found.identity, found.token, found.metadata) == (crown.identity, token, {"url": "http://a"})
            assert crown_sync.find_leader(name, oracle=stats_url).identity == crown.identity
            hidden = crown_sync.find_leader(name, oracle=other_url)
            pid = holder_pid(pg, crown.oracle, name)
            assert hidden.identity.startswith(f"(foreign holder: backend pid {pid}, role {APP_USER}, application ")
            assert (hidden.token, hidden.metadata["backend_pid"], hidden.metadata["role"]) == (None, pid, APP_USER)
            with pytest.raises(PostgresOracleError, match="leader record is not readable"):
                crown_sync.dismiss(name, oracle=other_url)  # a dismissal needs the term's token
            assert pg.terminate(holder_pid(pg, crown.oracle, name))  # errors get logged too
            wait_until(lambda: crown.is_leader() and crown.status().token not in (None, token),
                       timeout=30, message="leading again")
            text = repr(crown.status())
            errors.append(crown.status().last_error)
    finally:
        telemetry.detach(handle)
    assert APP_PASSWORD not in text and "***" in crown.status().oracle
    assert not any(APP_PASSWORD in (e or "") for e in errors)
    assert events and not any(APP_PASSWORD in e for e in events)
    assert any("crown.leadership.lost" in e for e in events)  # the termination was seen
    assert not any(APP_PASSWORD in r.getMessage() for r in caplog.records)


def test_quiet_follower_whose_session_the_server_ended_claims_without_error(pg, name):
    """monitor_leader=False with monitor_delay > lease: between two claims the follower's
    session is idle longer than idle_session_timeout, and the server ends it. The next claim
    must reconnect and go on, not fail once (error event, backoff) and retry later."""
    url = pg.url_for(password=SECRET, lease=2, wait_timeout=1)
    seen = []
    lock = threading.Lock()

    def record(event, meta):
        with lock:
            seen.append((clock.monotonic(), event, meta.get("identity"), meta.get("error")))

    handle = telemetry.attach(record)
    log_before = len(pg.log_tail(10 ** 9))
    app = f"crown_sync {name}"[:63]

    def idle_timeouts():  # the server's own word that a session of this election idled out
        lines = pg.log_tail(10 ** 9)[log_before:].splitlines()
        return [line for line in lines if "idle-session timeout" in line and f" {app} " in line]

    leader = crown_sync.Crown(name, oracle=url, identity="leader")
    quiet = crown_sync.Crown(name, oracle=url, identity="quiet", monitor_leader=False, monitor_delay=4.0)
    try:
        leader.start()
        assert leader.wait_for_leadership(30)
        quiet.start()
        # The leader confirms every 0.4 s and never idles: these timeouts are the quiet one's.
        wait_until(idle_timeouts, timeout=30, interval=0.1, message="the quiet follower's session idled out")
        timed_out_at = clock.monotonic()
        wait_until(lambda: [e for e in seen if e[1] == "crown.leadership.rejected" and e[2] == "quiet"
                            and e[0] > timed_out_at],
                   timeout=30, interval=0.05, message="a claim after the timeout")
        leader.stop()
        assert quiet.wait_for_leadership(30)
        assert quiet.status().last_error is None
    finally:
        telemetry.detach(handle)
        quiet.stop()
        leader.stop()
    errors = [e for e in seen if e[1] == "crown.oracle.error" and e[2] == "quiet"]
    assert not errors, errors


def run_cli(*args):
    """``python -m crown_sync ARGS`` in a subprocess (this checkout, no oracle from the environment)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("CROWN_SYNC_ORACLE", None)
    return subprocess.run([sys.executable, "-m", "crown_sync", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=60, cwd=ROOT, env=env)


def test_cli_status_of_a_live_leader(pg, app_url, name):
    """``python -m crown_sync status NAME --oracle URL --json`` in a subprocess, against a leader
    that connects with a password."""
    url = f"{app_url}?{FAST}"

    def status():
        return run_cli("status", name, "--oracle", url, "--json")

    with crown_sync.Crown(name, oracle=url, identity="cli-leader", metadata={"role": "api"}) as crown:
        assert crown.wait_for_leadership(30)
        result = status()
        assert result.returncode == 0, result.stderr
        document = json.loads(result.stdout)
        assert document["name"] == name and document["leader"]["identity"] == "cli-leader"
        assert document["leader"]["token"] == crown.status().token
        assert document["leader"]["metadata"] == {"role": "api"}
        assert "***" in document["oracle"]
        assert APP_PASSWORD not in result.stdout + result.stderr
    result = status()
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["leader"] is None
    assert APP_PASSWORD not in result.stdout + result.stderr


def test_cli_dismiss_as_the_crowns_role_works_with_track_activities_off(pg, app_url, name, own_database, caplog):
    """``track_activities = off`` hides every leader record (its token), even from the crowns'
    own role. ``crown-sync dismiss`` run as that role still dismisses the leader (exit 0): the
    leader heeds a dismissal naming no token once the server says its sender is a live session
    of a trusted role (a co-tenant's is ignored: tests/test_hostile.py)."""
    caplog.set_level(logging.INFO, logger="crown_sync")
    pg.sql(f'ALTER DATABASE "{own_database}" SET track_activities = off')  # the sessions to come
    url = f"{app_url}?{FAST}"
    with crown_sync.Crown(name, oracle=url, identity="A") as crown:
        assert crown.wait_for_leadership(30), crown.status().last_error
        token = crown.status().token
        pid = holder_pid(pg, crown.oracle, name)
        assert pg.sql("SELECT state, query FROM pg_stat_activity WHERE pid = %s", (pid,)) == [("disabled", "")]
        result = run_cli("dismiss", name, "--oracle", url)
        assert result.returncode == 0, result.stdout + result.stderr
        wait_until(lambda: "naming no token from backend pid" in caplog.text, timeout=30, message="the dismissal heeded")
        wait_until(lambda: crown.status().token not in (None, token), timeout=30, message="a new term")
    assert APP_PASSWORD not in result.stdout + result.stderr


def test_dismiss_of_a_holder_still_waiting_out_a_lease_finds_no_leader(pg, app_url, name, caplog):
    """An admin terminates the leader's session: the follower of the crowns' role gets the lock
    but waits out the lease before it leads (it has no leader record yet). A dismissal meanwhile
    finds no leader (False: ``crown-sync dismiss`` exits 1) and says why; it does not fail as if
    the holder were another role's session."""
    url = f"{app_url}?lease=4&wait_timeout=1"
    first = crown_sync.Crown(name, oracle=url, identity="first")
    second = crown_sync.Crown(name, oracle=url, identity="second")
    try:
        first.start()
        assert first.wait_for_leadership(30), first.status().last_error
        second.start()
        on_key = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND database ="
                  " (SELECT oid FROM pg_database WHERE datname = current_database())")  # the test's only key
        wait_until(lambda: pg.sql(on_key) == [(2,)], timeout=30, message="the follower queued")
        old = holder_pid(pg, first.oracle, name)
        assert pg.terminate(old)
        wait_until(lambda: holder_pid(pg, first.oracle, name) not in (None, old), timeout=30, message="a new holder")
        assert crown_sync.dismiss(name, oracle=url) is False
        assert "has not started leading yet" in caplog.text
        assert not first.is_leader() and not second.is_leader()  # so the answer was right: it waits still
        wait_until(lambda: first.is_leader() or second.is_leader(), timeout=30, message="a leader, undismissed")
    finally:
        second.stop()
        first.stop()
