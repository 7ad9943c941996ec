"""Every recipe under examples/ runs here, as a user would run it, on two "hosts" (processes
sharing one file oracle), checked by the work's own journal."""

import os
import signal
import subprocess
import sys

import pytest

from crown_sync.testing import journal

from tests.wsgi_support import (
    ROOT,
    TwoMastersExample,
    parent_of,
    process_gone,
    get,
    journal_terms,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

EXAMPLES = os.path.join(ROOT, "examples")


def crown_sync_run(*args, env=None, **popen):
    environment = dict(os.environ, PYTHONPATH=ROOT)
    environment.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "crown_sync", "run", *args], cwd=ROOT, env=environment,
                            start_new_session=True, **popen)


def kill_group(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(10)


# ------------------------------------------------------------------- APScheduler across masters


#: Shorter than a failover (a job process forked, APScheduler imported and started), so that ticks
#: fall due while nobody leads and the new scheduler must catch up on them.
TICK = 0.1


def test_one_apscheduler_across_two_gunicorn_masters(tmp_path):
    example = TwoMastersExample(tmp_path, "apscheduler_gunicorn", "examples.apscheduler_gunicorn.app:app", TICK)
    try:
        leading, survivor, first = example.start()
        assert get(leading.port, "/run-now")[0] == 405  # POST only; a GET never reaches the view
        example.kill_leading_master(leading, survivor, first)
    finally:
        example.cleanup()
    example.assert_one_grid_of_ticks()


# ------------------------------------------------------------------- a daemon singleton


def test_daemon_singleton_with_crown_sync_run_restart(tmp_path):
    path = str(tmp_path / "journal")
    oracle = f"file://{tmp_path / 'oracle'}"
    command = ["beat-demo", "--oracle", oracle, "--restart", "--restart-delay", "0.2", "--grace", "3", "--",
               sys.executable, "-m", "examples.celery_beat_style.daemon", "--journal", path, "--exit-after", "1"]
    hosts = [crown_sync_run(*command), crown_sync_run(*command)]
    try:
        # The daemon "crashes" after 1 s and is restarted in place: same term, same token.
        runs = wait_until(lambda: len([t for t in journal_terms(path) if t.beats]) >= 3 and journal_terms(path),
                          timeout=60, message="restarted daemon runs")
        first_token = runs[0].token
        assert all(t.token == first_token for t in runs)
        assert len({t.pid for t in runs}) == len(runs)

        # The leading crown-sync is SIGKILLed: its daemon dies with it; the other host's starts.
        def leading():
            for run in reversed(journal_terms(path)):
                for host in hosts:
                    if not process_gone(run.pid) and run.pid in _descendants(host.pid):
                        return host
            return None
        leader = wait_until(leading, message="the host running the daemon")
        os.kill(leader.pid, signal.SIGKILL)
        leader.wait(10)
        wait_until(lambda: all(process_gone(t.pid) for t in journal_terms(path) if t.token == first_token),
                   timeout=10, message="daemon died with crown-sync")
        wait_until(lambda: [t for t in journal_terms(path) if t.token > first_token and t.beats], timeout=60,
                   message="the other host's daemon")
        survivor = next(h for h in hosts if h is not leader)
        survivor.send_signal(signal.SIGTERM)  # graceful: the daemon is stopped, then abdicate
        assert survivor.wait(30) == -signal.SIGTERM
    finally:
        for host in hosts:
            kill_group(host)

    report = journal.check(path)
    assert not report.overlaps, report.summary()
    tokens = [t.token for t in report.terms]
    assert tokens == sorted(tokens) and tokens[-1] > first_token  # rising across terms
    assert report.terms[-1].stopped


def _descendants(pid):
    found, frontier = set(), {pid}
    while frontier:
        children = {int(e) for e in os.listdir("/proc") if e.isdigit() and parent_of(int(e)) in frontier}
        frontier = children - found
        found |= children
    return found


# ------------------------------------------------------------------- a cron one-shot


def test_cron_oneshot_runs_once_across_hosts(tmp_path):
    path = str(tmp_path / "journal")
    state = str(tmp_path / "state")
    oracle = f"file://{tmp_path / 'oracle'}"
    command = ["nightly-report", "--oracle", oracle, "--", sys.executable, "-m", "examples.cron_oneshot.job",
               "--period", "2024-06-01", "--state", state, "--journal", path]
    hosts = [crown_sync_run(*command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outputs = [host.communicate(timeout=60)[0] for host in hosts]
        assert [host.returncode for host in hosts] == [0, 0]
    finally:
        for host in hosts:
            kill_group(host)
    assert sorted("already done" in out for out in outputs) == [False, True], outputs
    (term,) = journal_terms(path)
    assert term.stopped and term.beats > 0
    assert os.path.exists(os.path.join(state, "2024-06-01.done"))

    late = crown_sync_run(*command, stdout=subprocess.PIPE, text=True)  # cron fired late somewhere
    try:
        assert "already done" in late.communicate(timeout=60)[0] and late.returncode == 0
    finally:
        kill_group(late)
    assert len(journal_terms(path)) == 1
    assert journal.check(path).ok
