"""crown_sync.flask: the extension's conventions in-process (real Flask, real crowns on the file
oracle), then real servers: Flask's reloader (``flask run --debug``) and Gunicorn over HTTP."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import types

import flask
import pytest

import crown_sync
from crown_sync.flask import CrownSync, deposed, elected, leader_only, new_leader
from crown_sync.testing import journal
from crown_sync.testing.servers import free_port

from tests.wsgi_support import (
    ROOT, Gunicorn, check_reloader, get, journal_terms, leader_elsewhere, stop_gracefully, unanimous, wait_until,
)

pytestmark = pytest.mark.timeout(180)


def make_app(tmp_path, name="flask-test", **config):
    app = flask.Flask("flask_test_app")
    app.config.update(CROWN_SYNC_NAME=name, CROWN_SYNC_ORACLE=f"file://{tmp_path / 'oracle'}")
    app.config.update(config)
    return app


def add_views(app):
    @app.get("/work")
    @leader_only
    def work():
        return {"done": True}


# ------------------------------------------------------------------------- conventions


def test_factory_pattern_state_in_extensions_and_no_stored_app(tmp_path):
    extension = CrownSync()
    first, second = make_app(tmp_path, "one"), make_app(tmp_path, "two")
    extension.init_app(first)
    extension.init_app(second)
    assert not hasattr(extension, "app")
    assert first.extensions["crown_sync"].name == "one"
    assert second.extensions["crown_sync"].name == "two"
    assert first.extensions["crown_sync"] is not second.extensions["crown_sync"]
    # Nothing started at init: no crown anywhere in this process.
    assert "one" not in crown_sync.known_leaders()
    assert extension.is_leader(first) is False
    with pytest.raises(RuntimeError, match="already"):
        extension.init_app(first)


@pytest.mark.parametrize(
    "config, key",
    [
        ({"CROWN_SYNC_NAME": None}, "CROWN_SYNC_NAME"),
        ({"CROWN_SYNC_NAME": "bad name"}, "CROWN_SYNC_NAME"),
        ({"CROWN_SYNC_FOLLOWER": "teapot"}, "CROWN_SYNC_FOLLOWER"),
        ({"CROWN_SYNC_RETRY_AFTER": -1}, "CROWN_SYNC_RETRY_AFTER"),
        ({"CROWN_SYNC_LEADER_CACHE": "1s"}, "CROWN_SYNC_LEADER_CACHE"),
        ({"CROWN_SYNC_STATUS_URL": "status"}, "CROWN_SYNC_STATUS_URL"),
        ({"CROWN_SYNC_START": "yes"}, "CROWN_SYNC_START"),
        ({"CROWN_SYNC_METADATA": ["url"]}, "CROWN_SYNC_METADATA"),
        ({"CROWN_SYNC_ORACLE": 5}, "CROWN_SYNC_ORACLE"),
    ],
)
def test_bad_config_names_the_key(tmp_path, config, key):
    app = make_app(tmp_path)
    app.config.update(config)
    with pytest.raises((ValueError, TypeError), match=key):
        CrownSync(app)


def test_leader_only_follower_gets_503_with_retry_after_then_200_when_leading(tmp_path):
    app = make_app(tmp_path, CROWN_SYNC_RETRY_AFTER=7)
    CrownSync(app)
    add_views(app)
    client = app.test_client()
    response = client.get("/work")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "7"
    assert response.get_json()["error"] == "not the leader"
    with crown_sync.lead("flask-test", oracle=app.config["CROWN_SYNC_ORACLE"]) as crown:
        assert crown.wait_for_leadership(30)
        assert client.get("/work").get_json() == {"done": True}
    assert client.get("/work").status_code == 503


def test_status_endpoint_is_opt_in_and_has_no_secrets(tmp_path):
    app = make_app(tmp_path)
    CrownSync(app)
    assert app.test_client().get("/_crown_sync").status_code == 404

    secret = "s3cr3t-pw"
    app = make_app(tmp_path, CROWN_SYNC_STATUS_URL="/_crown_sync",
                   CROWN_SYNC_ORACLE=f"postgresql://user:{secret}@127.0.0.1:1/db?connect_timeout=2")
    CrownSync(app)
    response = app.test_client().get("/_crown_sync")
    assert response.status_code == 200
    body = response.get_json()
    assert body["is_leader"] is False and body["leader"] is None and "error" in body
    assert secret not in response.get_data(as_text=True)
    assert app.test_client().get("/_crown_sync?require=leader").status_code == 503


def test_own_crown_starts_on_first_request_runs_job_in_app_context_and_sends_signals(tmp_path, monkeypatch):
    path = str(tmp_path / "journal")
    monkeypatch.setenv("CROWN_TEST_JOURNAL", path)
    from tests.wsgi_support import flask_job

    app = make_app(tmp_path, "flask-own", CROWN_SYNC_START=True, CROWN_SYNC_STATUS_URL="/status",
                   CROWN_SYNC_OPTIONS={"monitor_delay": 0.2})
    extension = CrownSync(app, job=flask_job)
    add_views(app)
    received = []
    for signal_ in (elected, deposed, new_leader):
        signal_.connect(lambda sender, _s=signal_, **kw: received.append((_s.name, sender, kw)), sender=app,
                        weak=False)
    try:
        assert not os.path.exists(path)  # nothing runs before the first request
        client = app.test_client()
        client.get("/status")
        wait_until(lambda: crown_sync.is_leader("flask-own"), message="own crown leads")
        assert client.get("/work").status_code == 200
        status = client.get("/status").get_json()
        assert status["is_leader"] and status["phase"] == "leading" and status["token"] >= 1
        wait_until(lambda: journal_terms(path, "flask-own") and journal_terms(path, "flask-own")[0].beats,
                   message="job beats")
        extension.stop(app)
        assert not crown_sync.is_leader("flask-own")
    finally:
        for signal_ in (elected, deposed, new_leader):
            signal_.receivers.clear()
    starts = [e for e in journal.read(path) if e["ev"] == "start"]
    assert [e["app"] for e in starts] == ["flask_test_app"]
    names = [name for name, sender, kw in received]
    assert "crown-sync-elected" in names and "crown-sync-deposed" in names and "crown-sync-new-leader" in names
    assert all(sender is app for _, sender, _ in received)
    token = next(kw["token"] for name, _, kw in received if name == "crown-sync-elected")
    assert token == starts[0]["token"]
    assert journal.check(path).ok and journal_terms(path)[0].stopped


def test_flask_crown_status_command(tmp_path):
    app = make_app(tmp_path, "flask-cli")
    CrownSync(app)
    runner = app.test_cli_runner()
    result = runner.invoke(args=["crown", "status"])
    assert result.exit_code == 1 and "no leader" in result.output
    with crown_sync.lead("flask-cli", oracle=app.config["CROWN_SYNC_ORACLE"],
                         metadata={"url": "http://leader.example:8000"}) as crown:
        assert crown.wait_for_leadership(30)
        result = runner.invoke(args=["crown", "status"])
        assert result.exit_code == 0, result.output
        assert crown.identity in result.output and "http://leader.example:8000" in result.output
        result = runner.invoke(args=["crown", "status", "--json"])
        data = json.loads(result.output)
        assert data["leader"]["identity"] == crown.identity and data["leader"]["token"] >= 1


def test_flask_crown_status_exit_code_3_when_the_oracle_cannot_be_asked(tmp_path):
    secret = "s3cr3t-pw"
    app = make_app(tmp_path, "flask-cli",
                   CROWN_SYNC_ORACLE=f"postgresql://user:{secret}@127.0.0.1:1/db?connect_timeout=2")
    CrownSync(app)
    result = app.test_cli_runner().invoke(args=["crown", "status"])
    assert result.exit_code == 3, result.output
    assert "cannot read the leader of 'flask-cli'" in result.output and secret not in result.output
    app = make_app(tmp_path, "flask-cli", CROWN_SYNC_ORACLE="nope://x")
    CrownSync(app)
    assert app.test_cli_runner().invoke(args=["crown", "status"]).exit_code == 2  # a usage error


def test_leader_only_on_an_async_view(tmp_path):
    app = make_app(tmp_path, "flask-async")
    CrownSync(app)

    @app.get("/async-work")
    @leader_only
    async def async_work():
        await asyncio.sleep(0)
        return {"done": "async"}

    client = app.test_client()
    assert client.get("/async-work").status_code == 503
    with crown_sync.lead("flask-async", oracle=app.config["CROWN_SYNC_ORACLE"]) as crown:
        assert crown.wait_for_leadership(30)
        response = client.get("/async-work")
        assert response.status_code == 200 and response.get_json() == {"done": "async"}


def test_signals_for_a_crown_the_extension_did_not_make(tmp_path):
    """The Gunicorn worker hooks give the crown they start the loaded app's signals; any other
    crown gets them with ``add_callbacks(**state.callbacks_for(name))``."""
    from crown_sync.gunicorn import WorkerCrown

    app = make_app(tmp_path, "flask-hooks")
    CrownSync(app)
    received = []
    for signal_ in (elected, deposed, new_leader):
        signal_.connect(lambda sender, _s=signal_, **kw: received.append((_s.name, kw)), sender=app, weak=False)
    hooks = WorkerCrown("flask-hooks", child=lambda term: term.stop_event.wait(), die_with_master=False,
                        oracle=app.config["CROWN_SYNC_ORACLE"])
    worker = types.SimpleNamespace(wsgi=app, ppid=os.getppid(), sockets=[])
    try:
        hooks.post_worker_init(worker)
        wait_until(lambda: crown_sync.is_leader("flask-hooks"), message="the worker's crown leads")
        wait_until(lambda: [kw for name, kw in received if name == "crown-sync-elected"], message="elected")
        hooks.worker_exit(None, worker)
        wait_until(lambda: [kw for name, kw in received if name == "crown-sync-deposed"], message="deposed")
        mine = crown_sync.Crown("flask-hooks", oracle=app.config["CROWN_SYNC_ORACLE"])
        with pytest.raises(TypeError, match="on_elected"):
            mine.add_callbacks(on_elected="not callable")
        with pytest.raises(TypeError, match="on_won"):
            mine.add_callbacks(on_won=print)
        assert app.extensions["crown_sync"].callbacks_for("another-name") == {}
        mine.add_callbacks(**app.extensions["crown_sync"].callbacks_for("flask-hooks")).start()
        assert mine.wait_for_leadership(30)
        wait_until(lambda: len([n for n, _ in received if n == "crown-sync-elected"]) == 2, message="elected again")
        mine.stop(30)
    finally:
        for signal_ in (elected, deposed, new_leader):
            signal_.receivers.clear()
    elected_kw = [kw for name, kw in received if name == "crown-sync-elected"]
    deposed_kw = [kw for name, kw in received if name == "crown-sync-deposed"]
    assert [kw["token"] for kw in deposed_kw] == [kw["token"] for kw in elected_kw]
    assert elected_kw[0]["token"] < elected_kw[1]["token"]
    assert [(kw["reason"], kw["lost"]) for kw in deposed_kw] == [("stop", False), ("stop", False)]
    assert elected_kw[1]["identity"] == mine.identity
    leaders = [kw["leader"] for name, kw in received if name == "crown-sync-new-leader"]
    assert leaders[-1] == mine.identity


def test_redirect_to_the_leader_url_from_its_metadata(tmp_path):
    """The leader is another process (``crown-sync run`` publishing its URL as metadata)."""
    oracle = f"file://{tmp_path / 'oracle'}"
    with leader_elsewhere("flask-redirect", oracle) as leader:
        app = make_app(tmp_path, "flask-redirect", CROWN_SYNC_FOLLOWER="redirect", CROWN_SYNC_LEADER_CACHE=0)
        CrownSync(app)
        add_views(app)
        response = app.test_client().get("/work?x=1")
        assert response.status_code == 307
        assert response.headers["Location"] == "http://127.0.0.1:9/base/work?x=1"
        stop_gracefully(leader)
        # No leader any more: a follower falls back to 503.
        assert app.test_client().get("/work").status_code == 503


# ------------------------------------------------------------------------- Flask's reloader


def test_flask_run_debug_reloader_leads_only_in_the_serving_process(tmp_path):
    """``flask run --debug``: the reloader's watcher process loads the app too but never leads;
    a reload stops the old serving process's job and abdicates; the new one leads."""
    port = free_port()
    path = str(tmp_path / "journal")
    touched = tmp_path / "reload-me.txt"
    touched.write_text("0")
    env = dict(os.environ, CROWN_TEST_NAME="flask-reloader", CROWN_TEST_JOURNAL=path,
               CROWN_SYNC_ORACLE=f"file://{tmp_path / 'oracle'}", PYTHONPATH=ROOT)
    server = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app",
         "tests.wsgi_support:create_app(with_job=True, CROWN_SYNC_START=True)",
         "run", "--debug", "--port", str(port), "--extra-files", str(touched)],
        cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    check_reloader(server, port, path, "flask-reloader", lambda: touched.write_text("1"))


# ------------------------------------------------------------------------- Gunicorn over HTTP


MASTER_CONF = """
import crown_sync.gunicorn
on_starting, when_ready, on_exit = crown_sync.gunicorn.crown_in_master(
    "flask-gunicorn", child="tests.wsgi_support:master_job", monitor_delay=0.2,
    metadata={"url": "http://127.0.0.1:@PORT@"})
"""


@pytest.mark.parametrize("follower", ["503", "redirect"])
def test_leader_only_and_status_over_http_with_gunicorn(tmp_path, follower):
    env = {"CROWN_TEST_NAME": "flask-gunicorn", "CROWN_TEST_JOURNAL": str(tmp_path / "journal"),
           "CROWN_SYNC_ORACLE": f"file://{tmp_path / 'oracle'}", "CROWN_TEST_FOLLOWER": follower}
    leader = Gunicorn(MASTER_CONF, env)
    other = Gunicorn(MASTER_CONF, env)
    try:
        leader.start()
        wait_until(lambda: unanimous(leader) is True, message="first host leads")
        other.start()
        wait_until(lambda: unanimous(other) is False, message="second host follows")
        for _ in range(8):
            assert get(leader.port, "/only-leader")[0] == 200
            assert get(leader.port, "/_crown_sync?require=leader")[0] == 200
            status, headers, body = get(other.port, "/only-leader")
            if follower == "503":
                assert status == 503 and headers["Retry-After"] == "5"
            else:
                assert status == 307
                assert headers["Location"] == f"http://127.0.0.1:{leader.port}/only-leader"
            status, _, body = get(other.port, "/_crown_sync?require=leader")
            assert status == 503 and body["is_leader"] is False
            assert body["leader"]["token"] >= 1
    finally:
        leader.cleanup()
        other.cleanup()


HOOKS_ORACLE_CONF = """
import os, crown_sync.gunicorn
on_starting, when_ready, on_exit = crown_sync.gunicorn.crown_in_master(
    "flask-master-status", child="tests.wsgi_support:master_job", monitor_delay=0.2,
    oracle=os.environ["CROWN_TEST_ORACLE"], metadata={"url": "http://127.0.0.1:@PORT@"})
"""


def test_status_in_the_workers_of_the_master_placement_says_who_leads(tmp_path):
    """The oracle is given to the hooks only (the app's own, CROWN_SYNC_ORACLE, is another, where
    nobody contends): every worker's status shows its master crown's phase and the leader that
    crown knows, which is the one the job's journal names, on both hosts and after a handoff; a
    follower's leader_only redirects to the URL in that leader's metadata."""
    path = str(tmp_path / "journal")
    env = {"CROWN_TEST_NAME": "flask-master-status", "CROWN_TEST_JOURNAL": path, "CROWN_TEST_FOLLOWER": "redirect",
           "CROWN_TEST_ORACLE": f"file://{tmp_path / 'oracle'}",
           "CROWN_SYNC_ORACLE": f"file://{tmp_path / 'not-the-oracle'}"}
    hosts = [Gunicorn(HOOKS_ORACLE_CONF, env), Gunicorn(HOOKS_ORACLE_CONF, env)]

    def say(host, phase, term):
        """Every worker that answers: ``phase``, and ``term``'s identity and token as the leader."""
        bodies = [answer[2] for answer in (get(host.port, "/_crown_sync") for _ in range(8)) if answer]
        return bodies and all(body["phase"] == phase and body["leader"] is not None
                              and (body["leader"]["identity"], body["leader"]["token"]) == (term.identity, term.token)
                              for body in bodies)

    try:
        hosts[0].start()
        wait_until(lambda: unanimous(hosts[0]) is True, message="the first host leads")
        hosts[1].start()
        wait_until(lambda: unanimous(hosts[1]) is False, message="the second host follows")
        (first,) = wait_until(lambda: journal_terms(path), message="the job's term")
        wait_until(lambda: say(hosts[0], "leading", first), message="the leading host's workers say it")
        wait_until(lambda: say(hosts[1], "following", first), message="the following host's workers name the leader")
        for _ in range(4):
            status, headers, _ = get(hosts[1].port, "/only-leader")
            assert status == 307 and headers["Location"] == f"http://127.0.0.1:{hosts[0].port}/only-leader"

        hosts[0].signal(signal.SIGTERM)
        assert hosts[0].wait_exit(60) == 0
        second = wait_until(lambda: [t for t in journal_terms(path) if t.token != first.token], message="handoff")[0]
        wait_until(lambda: say(hosts[1], "leading", second), message="the new leader's workers say it")
    finally:
        for host in hosts:
            host.cleanup()
    report = journal.check(path)
    assert report.ok and len(report.terms) == 2, report.summary()
