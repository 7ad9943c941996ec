"""crown_sync.prometheus, judged against the protected work's own journal.

The values a scrape shows (terms won and lost, who leads, the token, the takeover time) are
compared with what the journal of the leader's child saw, never with the oracle's word: in one
process on the file oracle, and under a real Gunicorn in prometheus_client's multiprocess mode
(workers recycled and SIGKILLed, every worker's files added up by the scrape).
"""

import os
import signal

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import crown_sync
import crown_sync.prometheus as metrics
from crown_sync.testing import journal
from crown_sync.testing.journal import journaled_work

from tests.wsgi_support import Gunicorn, get, journal_terms, parent_of, process_gone, wait_until

pytestmark = pytest.mark.timeout(180)


def samples(text: str) -> dict:
    """{(sample name, frozenset of labels without 'election'): value} of one exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset((k, v) for k, v in sample.labels.items() if k != "election")
            out[(sample.name, labels)] = out.get((sample.name, labels), 0.0) + sample.value
    return out


def value(scrape: dict, name: str, **labels) -> float:
    """One series' value (0 when absent); with ``sum_over``, the sum over the other labels."""
    if labels.pop("sum_over", False):
        return sum(v for (n, _), v in scrape.items() if n == name)
    return scrape.get((name, frozenset(labels.items())), 0.0)


def assert_matches_journal(scrape: dict, terms, leading: bool) -> None:
    """What every crown_sync series must say, given the journal's terms (oldest first)."""
    assert value(scrape, "crown_sync_terms_won_total") == len(terms)
    assert value(scrape, "crown_sync_is_leader") == (1 if leading else 0)
    assert value(scrape, "crown_sync_token") == (terms[-1].token if leading else 0)
    assert value(scrape, "crown_sync_campaigns_total", result="won") == len(terms)


def takeover_gaps(terms) -> list:
    """Journal time from each term's last act to the next term's first: a takeover timed by the
    new leader (from learning the old one went to its own term) lies within it."""
    return [later.start - earlier.end for earlier, later in zip(terms, terms[1:])]


# ------------------------------------------------------------------------- one process, file oracle


def test_metrics_of_a_handoff_match_the_journal(tmp_path):
    registry = CollectorRegistry()
    exported = metrics.enable(registry)
    path, oracle = str(tmp_path / "journal"), f"file://{tmp_path / 'oracle'}"
    child = crown_sync.ThreadChild(journaled_work, args=(path,))
    crowns = [crown_sync.Crown("metered", oracle=oracle, child=child, monitor_delay=0.2) for _ in range(2)]
    scrape = lambda: samples(generate_latest(registry).decode())  # noqa: E731
    try:
        crowns[0].start()
        assert crowns[0].wait_for_leadership(30)
        crowns[1].start()
        wait_until(lambda: crowns[1].phase == "following" and len(journal.read(path)) > 3)
        assert_matches_journal(scrape(), journal_terms(path), leading=True)

        crowns[0].stop(30)  # a graceful handoff: the follower takes over
        assert crowns[1].wait_for_leadership(30)
        wait_until(lambda: len(journal_terms(path)) == 2)
        assert_matches_journal(scrape(), journal_terms(path), leading=True)
        crowns[1].stop(30)
    finally:
        for crown in crowns:
            crown.stop(30)
        exported.detach()
    terms = journal.check(path, "metered").terms
    now = scrape()
    assert_matches_journal(now, terms, leading=False)
    assert value(now, "crown_sync_terms_lost_total", reason="stop") == 2
    assert value(now, "crown_sync_takeover_seconds_count") == 1
    assert 0 <= value(now, "crown_sync_takeover_seconds_sum") <= takeover_gaps(terms)[0]


def test_terms_lost_by_reason_match_the_crowns_own_account(tmp_path):
    """Terms ended three ways (the child exits by itself, an operator's dismissal, stop()): the
    journal has one term per term won, and the reasons counted are those the crown gave its own
    on_deposed."""
    registry = CollectorRegistry()
    exported = metrics.enable(registry)
    path, oracle = str(tmp_path / "journal"), f"file://{tmp_path / 'oracle'}"
    ends, lives = [], iter([True, True, False])  # two terms whose child exits, then one that works on

    def work(term):
        if next(lives, False):
            record = journal.Journal(path)
            record.write("start", term.name, term.identity, term.token)
            record.write("stop", term.name, term.identity, term.token)
            record.close()
        else:
            journaled_work(term, path)

    crown = crown_sync.Crown("reasons", oracle=oracle, child=work, monitor_delay=0.05,
                             on_deposed=lambda term, reason: ends.append(reason))
    try:
        crown.start()
        wait_until(lambda: len(journal_terms(path)) == 3 and journal_terms(path)[-1].beats > 2, message="terms")
        assert crown_sync.dismiss("reasons", oracle=oracle)
        wait_until(lambda: len(journal_terms(path)) == 4 and crown.is_leader(), message="a term after the dismissal")
    finally:
        crown.stop(30)
        exported.detach()
    scrape = samples(generate_latest(registry).decode())
    terms = journal.check(path, "reasons").terms
    assert_matches_journal(scrape, terms, leading=False)
    assert ends[:2] == ["child_exited", "child_exited"] and ends[-1] == "stop" and len(ends) == len(terms)
    for reason in set(ends):
        assert value(scrape, "crown_sync_terms_lost_total", reason=reason) == ends.count(reason), reason
    assert value(scrape, "crown_sync_terms_lost_total", sum_over=True) == len(terms)


def test_a_term_that_began_before_enable_is_not_counted(tmp_path):
    """enable() while a crown leads: its term's end is neither a loss nor a leader less
    (which would leave the gauge at -1 and the losses above the wins)."""
    crown = crown_sync.Crown("early", oracle=f"file://{tmp_path / 'oracle'}", monitor_delay=0.2)
    registry = CollectorRegistry()
    try:
        crown.start()
        assert crown.wait_for_leadership(30)
        exported = metrics.enable(registry)
    finally:
        crown.stop(30)
    exported.detach()
    scrape = samples(generate_latest(registry).decode())
    assert value(scrape, "crown_sync_is_leader") == 0
    assert value(scrape, "crown_sync_terms_lost_total", sum_over=True) == 0


def test_oracle_errors_are_counted_by_operation_without_the_password():
    registry = CollectorRegistry()
    exported = metrics.enable(registry)
    errors = []
    handle = crown_sync.telemetry.attach(lambda event, meta: errors.append(meta["operation"]),
                                         prefixes="crown.oracle.error")
    crown = crown_sync.Crown("unreachable", oracle="postgresql://app:hunter2@127.0.0.1:1/app?connect_timeout=1",
                             monitor_delay=0.2)
    try:
        crown.start()
        wait_until(lambda: len(errors) >= 3, message="oracle errors")
    finally:
        crown.stop(30)
        crown_sync.telemetry.detach(handle)
        exported.detach()
    text = generate_latest(registry).decode()
    assert "hunter2" not in text
    scrape = samples(text)
    for operation in set(errors):
        assert value(scrape, "crown_sync_oracle_errors_total", operation=operation) == errors.count(operation)
    assert value(scrape, "crown_sync_terms_won_total") == 0 and value(scrape, "crown_sync_is_leader") == 0


# ------------------------------------------------------------------------- Gunicorn, multiprocess mode

WORKER_CONF = """
import crown_sync.gunicorn, crown_sync.prometheus
from crown_sync.prometheus import child_exit
crown_sync.prometheus.enable()
post_worker_init, worker_exit = crown_sync.gunicorn.crown_per_worker(
    {name!r}, child="tests.wsgi_support:worker_job", monitor_delay=0.2, stop_timeout=15)
max_requests = 1000
"""

MASTER_CONF = """
import crown_sync.gunicorn, crown_sync.prometheus
from crown_sync.prometheus import child_exit
crown_sync.prometheus.enable()
on_starting, when_ready, on_exit = crown_sync.gunicorn.crown_in_master(
    {name!r}, child="tests.wsgi_support:master_job", monitor_delay=0.2, stop_timeout=15)
"""


class MeteredHost(Gunicorn):
    """A Gunicorn "host" in multiprocess mode (a metrics directory of its own) serving only
    crown_sync.prometheus's /metrics; its crowns journal to ``path``."""

    def __init__(self, tmp_path, conf: str, name: str, workers: int):
        self.path, self.name = str(tmp_path / "journal"), name
        env = {"CROWN_TEST_NAME": name, "CROWN_TEST_JOURNAL": self.path,
               "CROWN_SYNC_ORACLE": f"file://{tmp_path / 'oracle'}"}
        super().__init__(conf.format(name=name), env, app_spec="crown_sync.prometheus:make_wsgi_app()",
                         workers=workers)
        self.env["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(self.tmpdir, "prometheus")
        os.mkdir(self.env["PROMETHEUS_MULTIPROC_DIR"])

    def scrape(self) -> dict:
        result = get(self.port, "/metrics")
        assert result is not None and result[0] == 200, result
        return samples(result[2])

    def running_term(self, after: int = 0):
        """The journal's current term (after token ``after``), run by a live child of this
        master, once the scrape shows one leader (the master's child_exit of a killed worker,
        which drops its gauges, may come after the successor's first beats)."""
        def find():
            terms = [t for t in journal_terms(self.path, self.name) if t.token > after and t.beats
                     and not t.stopped and not process_gone(t.pid) and parent_of(t.pid) == self.pid]
            return terms[-1] if terms and value(self.scrape(), "crown_sync_is_leader") == 1 else None
        return wait_until(find, timeout=60, message=f"a running term after token {after} on :{self.port}")

    def following(self, count: int) -> None:
        """Wait until ``count`` claims here were refused: crowns that wait for the leader to go."""
        wait_until(lambda: value(self.scrape(), "crown_sync_campaigns_total", result="lost") >= count,
                   message="followers")


@pytest.fixture
def metered(tmp_path):
    hosts = []

    def make(conf, name, workers=2):
        hosts.append(MeteredHost(tmp_path, conf, name, workers))
        return hosts[-1].start()

    yield make
    for host in hosts:
        print(f"---- gunicorn :{host.port} log tail ----\n{host.log()}")  # shown when the test failed
        host.cleanup()


def test_gunicorn_multiprocess_scrape_matches_the_journal(metered):
    """Three workers, one crown each, one /metrics that adds up every worker's files: after a
    graceful handoff (the leading worker is told to exit) and a SIGKILLed leader, the scrape
    shows one leader with the journal's current token, as many terms won as the journal has, the
    loss the stopped worker counted (the killed one could count nothing), and a takeover time
    within the journal's gap."""
    host = metered(WORKER_CONF, "metered-workers", workers=3)
    first = host.running_term()
    assert_matches_journal(host.scrape(), journal_terms(host.path), leading=True)
    # Both other workers follow (wait on the lock) before the handoff, so one of them takes
    # over, and times it, rather than the worker Gunicorn starts in the leader's place.
    host.following(2)

    os.kill(first.pid, signal.SIGTERM)  # graceful: the worker's crown stops its job, abdicates
    second = host.running_term(first.token)
    terms, now = journal_terms(host.path), host.scrape()
    assert_matches_journal(now, terms, leading=True)
    assert value(now, "crown_sync_terms_lost_total", reason="stop") == 1
    assert value(now, "crown_sync_takeover_seconds_count") == 1
    assert 0 <= value(now, "crown_sync_takeover_seconds_sum") <= takeover_gaps(terms)[-1]

    os.kill(second.pid, signal.SIGKILL)  # its gauges must leave with it (child_exit)
    host.running_term(second.token)
    now = host.scrape()
    assert_matches_journal(now, journal_terms(host.path), leading=True)
    assert value(now, "crown_sync_terms_lost_total", sum_over=True) == 1
    assert journal.check(host.path, host.name).ok


def test_gunicorn_crown_in_master_scrapes_match_the_journal(metered):
    """Two hosts, the crown in each master: the workers' scrape shows the master's values.
    After the leading host's graceful shutdown the other host's scrape shows its own term, with
    the journal's token, and the takeover within the journal's gap."""
    a = metered(MASTER_CONF, "metered-master")
    first = a.running_term()
    assert_matches_journal(a.scrape(), journal_terms(a.path), leading=True)
    b = metered(MASTER_CONF, "metered-master")
    b.following(1)
    assert value(b.scrape(), "crown_sync_is_leader") == 0 and value(b.scrape(), "crown_sync_token") == 0
    beats = first.beats  # the leader works on a while (a takeover timed from b's arrival would show)
    wait_until(lambda: journal_terms(a.path)[0].beats > beats + 25, message="the leader's beats")

    a.signal(signal.SIGTERM)
    assert a.wait_exit(60) == 0
    second = b.running_term(first.token)
    terms, now = journal_terms(b.path), b.scrape()
    assert [t.token for t in terms] == [first.token, second.token]
    assert_matches_journal(now, terms[1:], leading=True)  # the terms this host won
    assert value(now, "crown_sync_takeover_seconds_count") == 1
    assert 0 <= value(now, "crown_sync_takeover_seconds_sum") <= takeover_gaps(terms)[-1]
    assert journal.check(b.path, b.name).ok
