"""PostgreSQL sessions=shared: many crowns of a few processes on several elections, judged by the
journal their children write (never the oracle's word), and the server's own count of connections.

The contract suite runs on this mode too (the ``postgres-shared`` kind, tests/oracles/conftest.py);
this file adds what only a shared session can get wrong: several elections led through one
session, two crowns of one process on one election (advisory locks are re-entrant per session),
a SIGKILLed process that led several elections at once, and ``pg_terminate_backend`` of the one
session that holds every lock its process leads.
"""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from crown_sync import clock
from crown_sync.testing import journal
from crown_sync.testing.fleet import contender_environment, wait_until

pytestmark = pytest.mark.server_oracle

ELECTIONS = [f"shared-{n}" for n in range(4)]
PER_ELECTION = 5  # crowns of each process on each election: 20 crowns per process

# One process: PER_ELECTION crowns on each election, all from one URL (one oracle, shared
# sessions); a thread child journals its work and takes 0.5 s to stop once told (so a successor
# that does not wait for it overlaps it). SIGTERM stops every crown gracefully.
PROCESS_SCRIPT = textwrap.dedent("""
    import signal, sys, threading
    import crown_sync
    from crown_sync.testing import journal

    url, path, tag, names, per = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(","), int(sys.argv[5])
    crowns = [crown_sync.Crown(name, oracle=url, identity=f"{tag}-{name}-{i}", monitor_delay=0.5,
                               child=crown_sync.ThreadChild(journal.journaled_work, args=(path,),
                                                            kwargs={"stop_delay": 0.5}))
              for name in names for i in range(per)]
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    for crown in crowns:
        crown.start()
    print("ready", flush=True)
    done.wait()
    for crown in crowns:
        crown.stop()
    print("stopped", flush=True)
""")


def spawn(server, path, tag):
    # application_name tells the server which process a session belongs to
    url = server.url_for(lease=2, wait_timeout=1, sessions="shared", poll_interval=0.05, application_name=tag)
    proc = subprocess.Popen([sys.executable, "-c", PROCESS_SCRIPT, url, path, tag, ",".join(ELECTIONS),
                             str(PER_ELECTION)], stdout=subprocess.PIPE, text=True, env=contender_environment())
    assert proc.stdout.readline().strip() == "ready"
    return proc


def connections(server):
    """Client sessions per application_name, as the server counts them."""
    return dict(server.sql("SELECT application_name, count(*) FROM pg_stat_activity"
                           " WHERE backend_type = 'client backend' AND left(application_name, 4) = 'proc'"
                           " GROUP BY 1"))


def leaders(path):
    """Per election: the process tag of its newest term that has worked (a few beats), if any."""
    found = {}
    for name in ELECTIONS:
        terms = journal.check(path, name).terms
        if terms and terms[-1].beats > 3:
            found[name] = terms[-1].identity.split("-")[0]
    return found


def holder_pid(server, tag):
    rows = server.sql("SELECT DISTINCT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                      " WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = %s", (tag,))
    return rows[0][0] if rows else None


def started_server():
    from crown_sync.testing.postgres_server import PostgresServer

    server = PostgresServer(fsync=False)
    server.start()
    server.settle(3.0)  # a claim on a server younger than a lease waits it out
    try:
        yield server
    finally:
        server.cleanup()


server = pytest.fixture(started_server, name="server")
# The small tests below (one election each, their own names) share one server: one start for all.
small_server = pytest.fixture(started_server, scope="module", name="small_server")


def test_many_crowns_of_three_processes_share_two_sessions_each_through_kill_terminate_and_stop(server, tmp_path):
    path = str(tmp_path / "journal.jsonl")
    procs = {tag: spawn(server, path, tag) for tag in ("proc0", "proc1", "proc2")}
    try:
        wait_until(lambda: len(leaders(path)) == len(ELECTIONS), timeout=60, message="every election led")
        counts = connections(server)
        assert set(counts) == set(procs) and max(counts.values()) <= 2, counts  # 20 crowns each

        # SIGKILL the process that leads the most elections: each has a successor elsewhere.
        before = leaders(path)
        victim = max(procs, key=lambda tag: list(before.values()).count(tag))
        procs[victim].kill()
        procs[victim].wait(30)
        wait_until(lambda: all(tag != victim for tag in leaders(path).values())
                   and len(leaders(path)) == len(ELECTIONS), timeout=60, message="successors of the killed process")

        # Terminate the holder session of a process that leads: all its terms end at once, and
        # their successors (no proof of how those terms ended) wait out the lease.
        led = leaders(path)
        target = next(tag for tag in procs if tag != victim and tag in led.values())
        pid = wait_until(lambda: holder_pid(server, target), message="the holder session")
        ended = {name: len(journal.check(path, name).terms) for name, tag in led.items() if tag == target}
        assert server.terminate(pid)
        survivor = next(tag for tag in procs if tag not in (victim, target))
        # Each election the target led gets a new term that works; whose is a race the target (its
        # holder reconnected) may win: both wait out the lease, neither has a proof.
        wait_until(lambda: len(leaders(path)) == len(ELECTIONS) and all(
            len(journal.check(path, name).terms) > count for name, count in ended.items()),
            timeout=60, message="terms after the termination")
        wait_until(lambda: set(leaders(path).values()) <= {target, survivor}, timeout=60, message="leaders")
        time.sleep(1.0)  # the terminated process reconnects: still at most 2 sessions each
        counts = connections(server)
        assert max(counts.values()) <= 2, counts
    finally:
        for tag, proc in procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for tag, proc in procs.items():
            if tag != victim:
                assert proc.wait(60) == 0, tag  # a graceful stop of 20 crowns
    for name in ELECTIONS:
        report = journal.check(path, name)
        assert report.ok, report.summary()
        assert len(report.terms) >= 2, report.summary()
    # every session ends with its process (its backend exits a moment after the client goes)
    wait_until(lambda: not connections(server), timeout=30, message="no session left")


def shared_oracle(server, poll_interval=0.05):
    from crown_sync.urls import oracle_from_url

    return oracle_from_url(server.url_for(lease=2, wait_timeout=1, sessions="shared", poll_interval=poll_interval))


@contextlib.contextmanager
def one_leader(server, name, poll_interval=0.05):
    """A sessions=shared oracle and its crown that leads ``name`` (both closed after)."""
    oracle = shared_oracle(server, poll_interval)
    try:
        crown = oracle.contender(name, "first", {}, lambda **_: None)
        # After another test's pg_terminate_backend a first claim may owe a lease (no proof).
        wait_until(lambda: crown.claim().won, timeout=30, interval=0.1, message="the first crown leads")
        yield oracle, crown
        crown.close()
    finally:
        oracle.close()


def test_a_crown_that_joins_right_after_the_last_one_left_is_woken_when_the_key_is_freed(small_server):
    server = small_server
    # A leave() that stops the pump, then a join() while the stopping pump still runs: the new
    # crown needs a pump of its own, or nothing ever polls for its crashed leader's key.
    import threading

    import psycopg

    oracle = shared_oracle(server)
    holder = psycopg.connect(server.superuser_dsn, autocommit=True)  # another process's leader
    try:
        for attempt in range(3):
            name = f"rejoin-{attempt}"
            holder.execute("SELECT pg_advisory_lock(%s)", (oracle.key(name),))
            first = oracle.contender(name, "first", {}, lambda **_: None)
            assert not first.claim().won
            first.watch(None)
            first.close()  # the last crown leaves: the pump is told to stop
            woken = threading.Event()
            second = oracle.contender(name, "second", {}, lambda **_: woken.set())
            assert not second.claim().won
            woken.clear()
            second.watch(None)
            time.sleep(0.5)  # several polls while the key is held: no wake-up
            assert not woken.is_set()
            holder.execute("SELECT pg_advisory_unlock(%s)", (oracle.key(name),))  # its crash
            assert woken.wait(30), "the follower was not woken: no pump polls for it"
            second.close()
    finally:
        holder.close()
        oracle.close()


def test_a_key_leaked_on_a_lost_session_is_not_unlocked_on_the_next_one(small_server):
    server = small_server
    # An unlock that failed on a live session is retried by the next confirmation, but only on
    # that session: after a reconnect the key may be another local crown's lock.
    with one_leader(server, "leaked") as (oracle, first):
        shared = first.shared
        shared._leaked.add((first.key, shared.generation))  # as release() after a failed unlock
        assert server.terminate(shared.pid)
        wait_until(lambda: shared.conn is None, timeout=30, message="the holder session lost")
        first.close()
        second = oracle.contender("leaked", "second", {}, lambda **_: None)
        second.claim()  # granted on the new session (it may wait out the lease: no proof)
        assert shared._owners.get(second.key) is second
        shared.confirm(clock.monotonic())  # what the pump runs every confirm_interval
        # the new session still holds the key: no other session can take it
        assert server.sql("SELECT pg_try_advisory_lock(%s)", (second.key,)) == [(False,)]
        second.close()


def test_a_statement_that_fails_inside_a_transaction_does_not_spoil_the_holder_session(small_server):
    server = small_server
    # A release's NOTIFY failing between BEGIN and COMMIT left the session in an aborted
    # transaction: every later claim and confirmation failed, and nothing reconnected.
    import psycopg

    with one_leader(server, "aborted") as (oracle, crown):
        shared = crown.shared
        pid = shared.pid
        with pytest.raises(psycopg.errors.DivisionByZero):
            shared.execute("BEGIN; SELECT 1/0; COMMIT")
        _, held, _ = shared.confirm(clock.monotonic())  # a statement now (not a recent one's answer)
        assert f"{crown.hi}:{crown.lo}" in held  # the same session, still holding the key
        assert shared.pid == pid


def test_a_local_follower_is_woken_once_its_local_leader_gave_up_the_key(small_server):
    server = small_server
    # The leader's own released: reaches the follower before the leader gives up its local
    # ownership, when a claim is refused (take()): without another wake-up the follower would
    # wait for the next poll (1 s here) to claim.
    with one_leader(server, "handoff", poll_interval=1.0) as (oracle, leader):
        owners_at_wake = []
        follower = oracle.contender("handoff", "follower", {}, lambda **_: owners_at_wake.append(
            leader.shared._owners.get(leader.key)))
        assert not follower.claim().won
        follower.watch(None)
        owners_at_wake.clear()
        leader.abdicate()
        assert owners_at_wake and owners_at_wake[0] is leader  # woken by released:, while it owned the key
        assert owners_at_wake[-1] is None  # and again once a claim would not be refused
        follower.close()


def test_followers_are_woken_to_read_their_leader_again_on_a_new_holder_session(small_server):
    server = small_server
    # What a follower read of its leader (its takeover proof's baseline) on a lost session
    # proves nothing: woken on the new one, it claims and reads it again; else its leader's
    # crash would find it without a proof (a full lease's wait).
    import threading

    import psycopg

    with one_leader(server, "reconnect-a") as (oracle, crown):
        holder = psycopg.connect(server.superuser_dsn, autocommit=True)  # another process's leader
        try:
            holder.execute("SELECT pg_advisory_lock(%s)", (oracle.key("reconnect-b"),))
            woken = threading.Event()
            follower = oracle.contender("reconnect-b", "follower", {}, lambda **_: woken.set())
            assert not follower.claim().won  # reads its leader: the baseline
            follower.watch(None)
            woken.clear()
            shared = crown.shared
            assert server.terminate(shared.pid)
            wait_until(lambda: shared.conn is None, timeout=30, message="the holder session lost")
            crown.abdicate()
            crown.claim()  # the lost leader claims again: on a new holder session
            assert shared.conn is not None
            assert woken.wait(30), "the follower was not woken on the new session"
            follower.close()
        finally:
            holder.close()


def test_the_pump_confirms_the_holder_session_in_time_whatever_the_poll_interval(small_server):
    server = small_server
    # The pump slept a whole poll_interval between confirmations: with polls rarer than the lease,
    # the server's idle_session_timeout (= lease) ended the holder session and every lock on it.
    with one_leader(server, "rare-polls", poll_interval=30.0) as (oracle, crown):
        pid = crown.shared.pid
        time.sleep(3 * oracle.lease)  # nothing but the pump uses the session meanwhile
        assert crown.shared.pid == pid
        assert server.sql("SELECT pg_try_advisory_lock(%s)", (crown.key,)) == [(False,)]


def test_a_hung_poll_does_not_hold_up_the_holder_session(small_server):
    server = small_server
    # The pump ran the followers' poll itself: a reader statement that hung (here its backend
    # stopped, up to the lease before it is cut) held up the holder's confirmations, and the
    # server's idle_session_timeout (= lease) ended the holder session and every lock on it.
    import psycopg

    with one_leader(server, "hung-poll-leader") as (oracle, crown):
        other = psycopg.connect(server.superuser_dsn, autocommit=True)  # another process's leader
        follower = oracle.contender("hung-poll-followed", "follower", {}, lambda **_: None)
        try:
            other.execute("SELECT pg_advisory_lock(%s)", (oracle.key("hung-poll-followed"),))
            assert not follower.claim().won
            follower.watch(None)  # followed: the polls run
            reader = wait_until(lambda: oracle._reader is not None and oracle._reader.info.backend_pid,
                                timeout=30, message="the reader session")
            pid = crown.shared.pid
            os.kill(reader, signal.SIGSTOP)
            try:
                time.sleep(3 * oracle.lease)
                assert crown.shared.pid == pid
                assert server.sql("SELECT pg_try_advisory_lock(%s)", (crown.key,)) == [(False,)]
            finally:
                os.kill(reader, signal.SIGCONT)
        finally:
            follower.close()
            other.close()
