"""crown_sync.gunicorn with real Gunicorn masters serving a real Flask app over loopback HTTP.

Two "hosts" are two Gunicorn masters (4 workers each) on different ports sharing one oracle.
Leadership is observed by requests (``/leader`` answers ``crown_sync.is_leader(name)`` in the
worker that served it) and by the job's own journal (crown_sync.testing.journal), never by the
oracle's word. Faults are real: SIGKILL of a worker and of a master, SIGHUP, SIGTERM, SIGSTOP.
"""

import os
import signal
import time

import pytest

import crown_sync
import crown_sync.gunicorn as cg
from crown_sync.testing import journal
from crown_sync.testing.postgres_server import PostgresServer

from tests.wsgi_support import (
    Gunicorn,
    journal_terms,
    parent_of,
    process_gone,
    unanimous,
    wait_until,
)

pytestmark = pytest.mark.timeout(240)

MASTER_CONF = """
import crown_sync.gunicorn
on_starting, when_ready, on_exit = crown_sync.gunicorn.crown_in_master(
    {name!r}, child="tests.wsgi_support:master_job", monitor_delay=0.2, stop_timeout=15)
preload_app = {preload}
max_requests = {max_requests}
"""

COMMAND_CONF = """
import os, sys, crown_sync, crown_sync.gunicorn
on_starting, when_ready, on_exit = crown_sync.gunicorn.crown_in_master(
    {name!r}, monitor_delay=0.2, stop_timeout=15, child=crown_sync.CommandChild(
        [sys.executable, "-m", "crown_sync.testing.journal", os.environ["CROWN_TEST_JOURNAL"], "0.01"]))
"""

WORKER_CONF = """
import logging, crown_sync, crown_sync.gunicorn
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(message)s")
crown_sync.telemetry.attach_default_logger()  # in the log shown when a test fails
post_worker_init, worker_exit = crown_sync.gunicorn.crown_per_worker(
    {name!r}, child="tests.wsgi_support:worker_job", monitor_delay=0.2, stop_timeout=15)
preload_app = {preload}
max_requests = 40
"""


class Fleet:
    """Gunicorn "hosts" sharing one oracle and one journal; every process killed at teardown."""

    def __init__(self, tmp_path, name, conf, oracle=None):
        self.name = name
        self.conf = conf
        self.journal = str(tmp_path / "journal")
        self.oracle = oracle or f"file://{tmp_path / 'oracle'}"
        self.hosts = []

    def host(self) -> Gunicorn:
        env = {"CROWN_TEST_NAME": self.name, "CROWN_TEST_JOURNAL": self.journal,
               "CROWN_SYNC_ORACLE": self.oracle}
        host = Gunicorn(self.conf, env)
        self.hosts.append(host)
        return host.start()

    def terms(self):
        return journal_terms(self.journal, self.name)

    def check(self):
        report = journal.check(self.journal, self.name)
        assert report.ok, report.summary()
        return report

    def cleanup(self):
        for host in self.hosts:
            # Shown by pytest only when the test failed.
            print(f"---- gunicorn :{host.port} (master {host.pgid}) log tail ----\n{host.log()}")
        for host in self.hosts:
            host.cleanup()


@pytest.fixture
def fleets(tmp_path):
    made = []

    def make(name, conf, oracle=None):
        fleet = Fleet(tmp_path, name, conf, oracle)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        fleet.cleanup()


def leads(host, expected=True, timeout=60.0):
    wait_until(lambda: unanimous(host) is expected, timeout=timeout,
               message=f"every worker of :{host.port} answering is_leader={expected}")


def new_term(fleet, after=0, timeout=60.0, host=None):
    """Wait for the current term: journaled after token ``after``, running (beats, no stop) in a
    live process (a child of ``host``'s master if given). Returns it."""
    def find():
        fresh = [t for t in fleet.terms() if (t.token or 0) > after and t.beats > 0
                 and not t.stopped and not process_gone(t.pid)
                 and (host is None or parent_of(t.pid) == host.pid)]
        return fresh[-1] if fresh else None
    return wait_until(find, timeout=timeout, message=f"a running term after token {after}")


def term_of(fleet, token):
    return next(t for t in fleet.terms() if t.token == token)


# ------------------------------------------------------------------------- hooks, in-process


def test_hooks_have_the_signatures_gunicorn_requires():
    from gunicorn.config import Config

    config = Config()
    on_starting, when_ready, on_exit = cg.crown_in_master("sig-check", child="tests.wsgi_support:master_job")
    post_worker_init, worker_exit = cg.crown_per_worker("sig-check", child="tests.wsgi_support:worker_job")
    for setting, hook in [("on_starting", on_starting), ("when_ready", when_ready), ("on_exit", on_exit),
                          ("post_worker_init", post_worker_init), ("worker_exit", worker_exit)]:
        config.set(setting, hook)  # gunicorn validates callability and arity here
        assert config.settings[setting].get() == hook


@pytest.mark.parametrize(
    "call, error, word",
    [
        (lambda: cg.crown_in_master("x", child=crown_sync.ThreadChild(print)), TypeError, "child"),
        (lambda: cg.crown_in_master("x", child=None), TypeError, "child"),
        (lambda: cg.crown_in_master("x", child=42), TypeError, "child"),
        (lambda: cg.crown_in_master("x", child="no_colon"), ValueError, "child"),
        (lambda: cg.crown_in_master("bad/name", child="a:b"), ValueError, "name"),
        (lambda: cg.crown_in_master("x", child="a:b", monitor_delay=-1), ValueError, "monitor_delay"),
        (lambda: cg.crown_in_master("x", child="a:b", stop_timeout="soon"), ValueError, "stop_timeout"),
        (lambda: cg.crown_in_master("x", child="a:b", oracle="nope://x"), ValueError, "scheme"),
        (lambda: cg.crown_per_worker("x", child=42), TypeError, "child"),
        (lambda: cg.crown_per_worker("x", child="a:b", die_with_master="yes"), TypeError, "die_with_master"),
        (lambda: cg.crown_per_worker("x", child="a:b", bogus=1), TypeError, "bogus"),
    ],
)
def test_bad_configuration_fails_at_config_load(call, error, word):
    with pytest.raises(error, match=word):
        call()


def test_no_provider_answer_without_a_master_slot():
    # In a process that has no slot (not forked from a master running the crown): no opinion.
    assert cg.leader_token("never-started") is None
    assert crown_sync.is_leader("never-started") is False


# ------------------------------------------------------------------------- the crown in the master


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_crown_in_master_lifecycle(fleets, preload):
    fleet = fleets(f"master-{int(preload)}", MASTER_CONF.format(name=f"master-{int(preload)}", preload=preload, max_requests=12))
    a = fleet.host()
    leads(a)
    b = fleet.host()
    leads(b, False)

    # The job runs once, in a process forked from the leading master; every worker agrees.
    (first,) = wait_until(lambda: [t for t in fleet.terms() if t.beats > 0], message="the job's first beats")
    assert parent_of(first.pid) == a.pid
    answers = a.answers()
    assert {answer["token"] for answer in answers} == {first.token}
    # Nothing of the master's crown crossed the fork: no crown thread in any worker.
    assert all(answer["crown_threads"] == [] for answer in answers), answers

    # A worker SIGKILLed: Gunicorn replaces it; leadership and the job are untouched.
    victim = a.workers(fleet.journal)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in a.workers(fleet.journal) and len(a.workers(fleet.journal)) == 4, message="worker replaced")
    leads(a)

    # max_requests recycling (12) and HUP: every worker replaced, the job never restarted.
    before = set(a.workers(fleet.journal))
    a.answers(80)
    a.signal(signal.SIGHUP)
    wait_until(lambda: not (set(a.workers(fleet.journal)) & before) and len(a.workers(fleet.journal)) == 4, message="HUP replaced workers")
    leads(a)
    assert [t.token for t in fleet.terms()] == [first.token]
    assert not process_gone(first.pid)

    # Graceful shutdown: the job is stopped, the crown abdicates, the other host takes over.
    a.signal(signal.SIGTERM)
    assert a.wait_exit(60) == 0
    assert term_of(fleet, first.token).stopped
    second = new_term(fleet, first.token)
    assert parent_of(second.pid) == b.pid and second.token > first.token
    leads(b)

    # Master SIGKILL: its job dies with it (parent-death signal), its orphaned workers answer
    # False (never what a dead master last wrote), and the other host takes over.
    c = fleet.host()
    leads(c, False)
    b.signal(signal.SIGKILL)
    wait_until(lambda: process_gone(b.pid), timeout=30, message="the master is dead")
    wait_until(lambda: process_gone(second.pid), timeout=10, message="the job died with its master")
    orphans = [answer for _ in range(5) for answer in b.answers(4)]
    assert orphans  # they answer until they notice (Gunicorn's check) and exit
    assert all(answer["is_leader"] is False for answer in orphans), (orphans, fleet.terms())
    third = new_term(fleet, second.token)
    assert parent_of(third.pid) == c.pid and third.token > second.token
    leads(c)

    report = fleet.check()
    assert len(report.terms) == 3


def _ancestors(pid):
    found = []
    while pid and pid > 1 and len(found) < 10:
        pid = parent_of(pid)
        found.append(pid)
    return found


def test_crown_in_master_with_a_command_child(fleets):
    """The job as a CommandChild of the master: run once, stopped on graceful shutdown before the
    other host starts its own, and gone with its master on SIGKILL."""
    fleet = fleets("master-command", COMMAND_CONF.format(name="master-command"))
    a = fleet.host()
    leads(a)
    b = fleet.host()
    leads(b, False)
    first = new_term(fleet)
    assert a.pid in _ancestors(first.pid)  # the command, under its supervisor, under a's master

    a.signal(signal.SIGTERM)
    assert a.wait_exit(60) == 0
    assert term_of(fleet, first.token).stopped
    second = new_term(fleet, first.token)
    assert b.pid in _ancestors(second.pid) and second.token > first.token
    leads(b)

    b.signal(signal.SIGKILL)
    wait_until(lambda: process_gone(b.pid), timeout=30, message="the master is dead")
    wait_until(lambda: process_gone(second.pid), timeout=10, message="the command died with its master")
    report = fleet.check()
    assert [t.token for t in report.terms] == [first.token, second.token]


# ------------------------------------------------------------------------- one crown per worker


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_crown_per_worker_lifecycle(fleets, preload):
    name = f"worker-{int(preload)}"
    fleet = fleets(name, WORKER_CONF.format(name=name, preload=preload))
    hosts = [fleet.host(), fleet.host()]

    def leader_now(after=0):
        """The running term and the live host whose worker runs it (re-read until both hold)."""
        def find():
            term = new_term(fleet, after)
            host = next((h for h in hosts if parent_of(term.pid) == h.pid), None)
            return (term, host) if host is not None else None
        return wait_until(find, message="the leader and its host")

    def check_answers():
        """Every True answer comes from the worker the journal names for that token, and answers
        name several leaders only one after the other: our own requests count towards
        max_requests, so the leading worker may be recycled while we ask, and then the journal
        must show its term over before the next began."""
        answers = [answer for host in hosts for answer in host.answers(16)]
        terms = {t.token: t for t in fleet.terms()}  # read after: a term journals on start
        for answer in answers:
            if answer["is_leader"]:
                assert answer["token"] in terms and terms[answer["token"]].pid == answer["pid"], (answer, terms)
        tokens = sorted({answer["token"] for answer in answers if answer["is_leader"]})
        for earlier, later in zip(tokens, tokens[1:]):
            assert terms[earlier].end < terms[later].start, (terms[earlier], terms[later])

    first, _ = leader_now()
    check_answers()

    # Exactly one worker in the fleet leads: the one that runs the job, with the app loaded.
    starts = [e for e in journal.read(fleet.journal) if e["ev"] == "start"]
    assert starts and all(e["app"] for e in starts)
    assert len({t.pid for t in fleet.terms() if not t.stopped}) == 1

    # The leading worker SIGKILLed: its job (a thread) dies with it; another worker leads.
    os.kill(first.pid, signal.SIGKILL)
    current, leader_host = leader_now(first.token)
    assert current.pid != first.pid and not term_of(fleet, first.token).stopped

    # max_requests recycling (40) of the leading worker: the job stops, then the crown abdicates.
    wait_until(lambda: leader_host.answers(20) and process_gone(current.pid), timeout=90,
               message="the leading worker recycled by max_requests")
    assert term_of(fleet, current.token).stopped

    # HUP of the leading worker's master: old workers exit gracefully, leadership moves on.
    current, leader_host = leader_now(current.token)
    leader_host.signal(signal.SIGHUP)
    wait_until(lambda: process_gone(current.pid), message="HUP replaced the leading worker")
    assert term_of(fleet, current.token).stopped

    # Graceful shutdown of the leading host: its worker's job stops; the other host leads.
    current, leader_host = leader_now(current.token)
    other = next(h for h in hosts if h is not leader_host)
    leader_host.signal(signal.SIGTERM)
    assert leader_host.wait_exit(60) == 0
    hosts.remove(leader_host)
    assert term_of(fleet, current.token).stopped
    current, host = leader_now(current.token)
    assert host is other
    check_answers()

    # Master SIGKILL: the kernel SIGTERMs its workers (die_with_master), the leading worker stops
    # its job and abdicates, and the surviving host's worker takes over.
    hosts.append(fleet.host())
    current, leader_host = leader_now(current.token - 1)
    survivor = next(h for h in hosts if h is not leader_host)
    leader_host.signal(signal.SIGKILL)
    hosts.remove(leader_host)
    wait_until(lambda: term_of(fleet, current.token).stopped, timeout=30,
               message="the leading worker stopped its job when its master died")
    # (an exiting worker of the dead master may hold a brief term first: safe, and journaled)
    current = new_term(fleet, current.token, host=survivor)
    check_answers()

    report = fleet.check()
    tokens = [t.token for t in report.terms]
    assert tokens == sorted(tokens) and len(tokens) >= 5


# ------------------------------------------------------------------------- PostgreSQL, deadline


@pytest.fixture(scope="module")
def postgres():
    with PostgresServer(fsync=False) as server:
        yield server


def test_crown_in_master_deadline_bounds_workers_on_postgres(fleets, postgres):
    """A stuck (SIGSTOPped) master: its workers answer False once its term's deadline passes,
    its job stops by the deadline, and the other host takes over without overlap."""
    oracle = postgres.url + "?lease=3"
    # No max_requests here: a stopped master could not replace recycled workers.
    conf = MASTER_CONF.format(name="pg-master", preload=True, max_requests=0)
    fleet = fleets("pg-master", conf, oracle=oracle)
    a = fleet.host()
    leads(a)
    b = fleet.host()
    leads(b, False)
    first = new_term(fleet)
    assert parent_of(first.pid) == a.pid
    # The master's oracle session and crown threads stay in the master (preload: the app, and
    # with it crown_sync, was imported before the fork).
    answers = a.answers() + b.answers()
    assert answers and all(answer["crown_threads"] == [] and postgres.port not in answer["tcp_peer_ports"]
                           for answer in answers), (postgres.port, answers)

    a.signal(signal.SIGSTOP)
    try:
        # Workers keep serving (only the master is stopped) and soon say False by the clock.
        leads(a, False, timeout=30)
        wait_until(lambda: process_gone(first.pid), timeout=30, message="job killed at its deadline")
        second = new_term(fleet, first.token)
        assert parent_of(second.pid) == b.pid and second.token > first.token
        leads(b)
    finally:
        a.signal(signal.SIGCONT)
    # Resumed, the old master finds its session gone and stays a follower.
    time.sleep(2.0)
    leads(a, False)
    leads(b)
    fleet.check()
