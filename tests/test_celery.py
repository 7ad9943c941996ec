"""crown_sync.celery.LeaderScheduler with two real ``celery beat`` processes on a real Redis broker.

Two "hosts" run ``celery beat -S crown_sync.celery:LeaderScheduler`` with one schedule entry
every 0.5 s (the app of examples/celery_beat), electing through the file oracle. What was sent is
judged from outside the scheduler: Celery's own ``before_task_publish`` signal, in each beat,
journals every send (crown_sync.testing.journal) with the token the message carries; the broker's
queue says what arrived; a real worker runs the tasks, whose ledger shows the token each one read
from its request and fenced with.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import celery
import pytest

import crown_sync
from crown_sync import registry
from crown_sync.celery import LeaderScheduler
from crown_sync.testing import journal
from crown_sync.testing.fleet import contender_environment, wait_until
from crown_sync.testing.redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)

NAME = "beat-test"
INTERVAL = 0.5

# The example app (examples/celery_beat), with a journal of its beats' sends.
APP = """
import os
from celery.signals import before_task_publish
from crown_sync.testing.journal import Journal
from examples.celery_beat.app import app

app.conf.update(crown_sync_name={name!r}, crown_sync_options={{"monitor_delay": 0.2}})
journal = Journal(os.environ["BEAT_JOURNAL"])


@before_task_publish.connect
def journal_send(sender=None, headers=None, **_):
    # The beat's own record of each send, with the token the message carries.
    token = headers.get("crown_sync_token")
    journal.write("beat", {name!r}, "beat-%d" % os.getpid(), token, task_id=headers["id"])
"""


@pytest.fixture(scope="module")
def broker():
    with RedisServer(persistence=None) as server:
        yield server


def _celery(tmp_path, broker, *args):
    env = contender_environment()
    env.update(CELERY_BROKER_URL=broker.url(), CROWN_SYNC_ORACLE=f"file://{tmp_path}/locks",
               EXAMPLE_EVERY=str(INTERVAL), EXAMPLE_LEDGER=str(tmp_path / "ledger"),
               BEAT_JOURNAL=str(tmp_path / "journal"))
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"
    log = open(tmp_path / f"{args[0]}-{len(list(tmp_path.glob('*.log')))}.log", "wb")
    with log:
        return subprocess.Popen([sys.executable, "-m", "celery", "-A", "beatapp", *args, "-l", "info"],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)


def _sends(tmp_path):
    path = tmp_path / "journal"
    return sorted(journal.read(str(path)), key=lambda e: e["t"]) if path.exists() else []


def _queued(broker):
    import redis

    client = redis.Redis.from_url(broker.url())
    try:
        return [json.loads(raw)["headers"] for raw in client.lrange("celery", 0, -1)]
    finally:
        client.close()


def _stop(process):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _logs(tmp_path):
    return "\n".join(f"---- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(tmp_path.glob("*.log")))


def _sends_of(tmp_path, pid):
    return [e for e in _sends(tmp_path) if e["pid"] == pid]


def _beats_across_a_kill_and_a_stop(tmp_path, broker):
    """Beats A and B; the leader SIGKILLed; beat C started; the survivor SIGTERMed. Returns
    (killed pid, survivor pid, C's pid, monotonic time of the kill)."""
    beats = [_celery(tmp_path, broker, "beat", "-s", str(tmp_path / f"schedule-{i}")) for i in range(2)]
    try:
        wait_until(lambda: len(_sends(tmp_path)) >= 4, timeout=60, message="4 sends")
        killed = _sends(tmp_path)[-1]["pid"]
        os.kill(killed, signal.SIGKILL)
        killed_at = crown_sync.clock.monotonic()
        survivor = next(b for b in beats if b.pid != killed)
        wait_until(lambda: len(_sends_of(tmp_path, survivor.pid)) >= 4, timeout=60, message="4 sends by the survivor")
        beats.append(_celery(tmp_path, broker, "beat", "-s", str(tmp_path / "schedule-2")))
        wait_until(lambda: "is led by" in (tmp_path / "beat-2.log").read_text(), timeout=60, message="C follows")
        _stop(survivor)  # SIGTERM: its crown stops and abdicates, C takes over at once
        wait_until(lambda: len(_sends_of(tmp_path, beats[2].pid)) >= 2, timeout=60, message="2 sends by C")
    finally:
        for beat in beats:
            _stop(beat)
    return killed, survivor.pid, beats[2].pid, killed_at


def test_beat_sends_once_across_a_kill_and_a_stop_of_the_leader(tmp_path, broker):
    (tmp_path / "beatapp.py").write_text(textwrap.dedent(APP.format(name=NAME)))
    killed, survivor, third, killed_at = _beats_across_a_kill_and_a_stop(tmp_path, broker)
    sends = _sends(tmp_path)
    context = _logs(tmp_path) + "\n" + json.dumps(sends)

    # Three terms, one beat each, never at once, tokens rising; a follower sent nothing while it
    # followed; every message carries its term's token.
    report = journal.check(sends, NAME)
    assert report.ok and [t.pid for t in report.terms] == [killed, survivor, third], report.summary() + context
    assert all(e["t"] > killed_at for e in sends if e["pid"] == survivor), context
    # One continuous grid: a slot every INTERVAL within a term (bounds generous for a loaded
    # machine), and across each handoff no gap beyond the failover plus one interval.
    for term in report.terms:
        times = [e["t"] for e in sends if e["pid"] == term.pid]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert all(INTERVAL * 0.8 < gap < INTERVAL + 2.0 for gap in gaps), (gaps, context)
    first_after = next(e["t"] for e in sends if e["pid"] == survivor)
    assert first_after - killed_at < INTERVAL + 10.0, context
    handoff = report.terms[2].start - report.terms[1].end
    assert handoff < INTERVAL + 10.0, context
    print(f"kill to the survivor's first send: {first_after - killed_at:.3f} s; "
          f"graceful handoff, last send to first: {handoff:.3f} s; {report.summary()}")

    # The broker holds what the journal says was sent, with the journal's tokens (a beat killed or
    # stopped during a send may have journaled its last one and not published it).
    queued = {h["id"]: h.get("crown_sync_token") for h in _queued(broker)}
    journaled = {e["task_id"]: e["token"] for e in sends}
    assert queued.items() <= journaled.items(), context
    assert set(journaled) - set(queued) <= {_sends_of(tmp_path, t.pid)[-1]["task_id"] for t in report.terms}, context

    # A real worker runs them; each task reads its term's token from its request and fences with
    # it: a message of an older term, delivered last, is refused.
    with celery.Celery("stale", broker=broker.url(), set_as_current=False) as sender:
        stale = sender.send_task("examples.celery_beat.app.report", headers={"crown_sync_token": 0}).id
    worker = _celery(tmp_path, broker, "worker", "--pool", "solo")
    ledger_path = tmp_path / "ledger"
    try:
        wait_until(lambda: ledger_path.exists() and len(ledger_path.read_text().splitlines()) > len(queued),
                   timeout=60, message="the worker ran every task")
    finally:
        _stop(worker)
    ledger = {r["id"]: r for r in map(json.loads, ledger_path.read_text().splitlines())}
    assert {i: r["token"] for i, r in ledger.items() if r["accepted"]} == queued, _logs(tmp_path)
    assert ledger[stale] == {"id": stale, "token": 0, "accepted": False}, _logs(tmp_path)


@pytest.mark.parametrize("settings, error, word", [
    ({"crown_sync_name": "bad/name"}, ValueError, "name"),
    ({"crown_sync_oracle": "nope://x"}, ValueError, "scheme"),
    ({"crown_sync_oracle": 42}, TypeError, "crown_sync_oracle"),
    ({"crown_sync_options": ["monitor_delay"]}, TypeError, "crown_sync_options"),
    ({"crown_sync_options": {"monitr_delay": 1}}, ValueError, "monitr_delay"),
    ({"crown_sync_options": {"child": print}}, ValueError, "child"),
    ({"crown_sync_options": {"monitor_delay": -1}}, ValueError, "monitor_delay"),
    ({"crown_sync_token_header": ""}, TypeError, "crown_sync_token_header"),
])
def test_bad_settings_fail_at_construction(tmp_path, settings, error, word):
    app = celery.Celery("bad", broker="memory://", set_as_current=False)
    app.conf.update({"crown_sync_oracle": f"file://{tmp_path}", **settings})
    with pytest.raises(error, match=word):
        LeaderScheduler(app, schedule_filename=str(tmp_path / "schedule"))
    assert not [c for c in registry.crowns() if c.name == "celery-beat"]  # nothing started


def test_unreachable_oracle_never_raises_and_sends_nothing(tmp_path, caplog):
    from crown_sync.testing.servers import free_port

    app = celery.Celery("unreachable", broker="memory://", set_as_current=False)
    app.conf.update(crown_sync_name="beat-unreachable", crown_sync_oracle=f"redis://:secret@127.0.0.1:{free_port()}",
                    beat_schedule={"tick": {"task": "tick", "schedule": 0.1}})
    scheduler = LeaderScheduler(app, schedule_filename=str(tmp_path / "schedule"))
    try:
        wait_until(lambda: scheduler.crown.status().last_error, timeout=30, message="an oracle error shown")
        assert "secret" not in scheduler.crown.status().last_error + scheduler.info
        entry = scheduler.schedule["tick"]
        assert scheduler.apply_async(entry) is None  # not leading: nothing sent
        assert scheduler.schedule["tick"].total_run_count == entry.total_run_count + 1  # the slot is skipped
        with caplog.at_level("WARNING", logger="crown_sync.celery"):
            scheduler.apply_entry(entry)
        assert "oracle unavailable" in caplog.text and "secret" not in caplog.text
    finally:
        scheduler.close()
    assert scheduler.crown.phase == "stopped"
