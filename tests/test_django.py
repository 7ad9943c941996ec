"""crown_sync.django: real Django in-process (settings from tests/django_project, requests through
Django's test Client and AsyncClient, crowns on the file oracle), then real servers: ``runserver``
with its autoreloader, management commands, and the example project under two Gunicorn masters."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import django
import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.test import AsyncClient, Client, override_settings

if not settings.configured:
    from tests.django_project import settings as project_settings

    settings.configure(**{key: getattr(project_settings, key) for key in dir(project_settings) if key.isupper()})
    django.setup()

import crown_sync  # noqa: E402
import crown_sync.django  # noqa: E402
from crown_sync.django import runtime, signals  # noqa: E402
from crown_sync.django.conf import config  # noqa: E402
from crown_sync.testing import journal  # noqa: E402
from crown_sync.testing.servers import free_port, wait_for_port  # noqa: E402

from tests.wsgi_support import (  # noqa: E402
    ROOT, TwoMastersExample, check_reloader, journal_terms, leader_elsewhere, parent_of, seen,
    stop_gracefully, wait_until,
)

pytestmark = pytest.mark.timeout(180)

NAME = "django-test"


@contextlib.contextmanager
def crown_settings(tmp_path, name=NAME, **keys):
    value = {"NAME": name, "ORACLE": f"file://{tmp_path / 'oracle'}", "OPTIONS": {"monitor_delay": 0.2}}
    value.update(keys)
    try:
        with override_settings(CROWN_SYNC=value):
            yield value
    finally:
        runtime.stop(30)


def fetch(path, client="sync"):
    """A request through Django's WSGI (Client) or ASGI (AsyncClient) handler."""
    if client == "async":
        async def request():
            return await AsyncClient().get(path)
        return async_to_sync(request)()
    return Client().get(path)


def django_env(tmp_path, **extra):
    env = dict(os.environ, PYTHONPATH=ROOT, DJANGO_SETTINGS_MODULE="tests.django_project.settings",
               CROWN_SYNC_ORACLE=f"file://{tmp_path / 'oracle'}", CROWN_TEST_JOURNAL=str(tmp_path / "journal"))
    env.update(extra)
    return env


# ------------------------------------------------------------------------- the package


def test_import_crown_sync_imports_nothing_of_django():
    code = ("import sys, crown_sync, crown_sync.cli, crown_sync.gunicorn; "
            "sys.exit(sorted(m for m in sys.modules if m == 'django' or m.startswith('django.')) or None)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------- settings


@pytest.mark.parametrize("value, key, check_id", [
    (None, "CROWN_SYNC", "crown_sync.E001"),
    ({}, "NAME", "crown_sync.E003"),
    ({"NAME": "bad name"}, "NAME", "crown_sync.E003"),
    ({"NAME": "x", "ORACEL": "file:///tmp"}, "ORACEL", "crown_sync.E002"),
    ({"NAME": "x", "ORACLE": "gopher://h"}, "ORACLE", "crown_sync.E004"),
    ({"NAME": "x", "START": "yes"}, "START", "crown_sync.E005"),
    ({"NAME": "x", "JOB": "tests.django_project.jobs:journal_job"}, "JOB", "crown_sync.E006"),
    ({"NAME": "x", "START": True, "JOB": "tests.django_project.jobs:no_such_job"}, "JOB", "crown_sync.E006"),
    ({"NAME": "x", "METADATA": ["url"]}, "METADATA", "crown_sync.E007"),
    ({"NAME": "x", "METADATA": {"url": object()}}, "METADATA", "crown_sync.E007"),
    ({"NAME": "x", "OPTIONS": {"monitor_delay": -1}}, "OPTIONS", "crown_sync.E008"),
    ({"NAME": "x", "OPTIONS": {"child": print}}, "OPTIONS", "crown_sync.E008"),
    ({"NAME": "x", "FOLLOWER": "teapot"}, "FOLLOWER", "crown_sync.E009"),
    ({"NAME": "x", "RETRY_AFTER": -1}, "RETRY_AFTER", "crown_sync.E010"),
    ({"NAME": "x", "LEADER_URL_KEY": ""}, "LEADER_URL_KEY", "crown_sync.E011"),
    ({"NAME": "x", "LEADER_CACHE": "1s"}, "LEADER_CACHE", "crown_sync.E012"),
])
def test_bad_setting_is_a_check_error_naming_it(value, key, check_id):
    with override_settings(CROWN_SYNC=value):
        errors = [e for e in checks.run_checks() if e.id.startswith("crown_sync.")]
        assert [e.id for e in errors] == [check_id]
        named = "settings.CROWN_SYNC" if key == "CROWN_SYNC" else f'CROWN_SYNC["{key}"]'
        assert named in errors[0].msg
        with pytest.raises(ImproperlyConfigured, match=named.replace("[", r"\[").replace("]", r"\]")):
            config()
    assert checks.run_checks() == []  # the project's own settings pass


def test_bad_oracle_url_check_error_never_shows_its_password():
    with override_settings(CROWN_SYNC={"NAME": "x", "ORACLE": "postgresql://app:s3cr3t-pw@db/app?bogus=1"}):
        (error,) = checks.run_checks()
    assert 'CROWN_SYNC["ORACLE"]' in error.msg and "bogus" in error.msg
    assert "s3cr3t-pw" not in error.msg


@pytest.fixture
def no_usable_home(monkeypatch):
    """The default file oracle's directory can't be created (a service account's home)."""
    for variable in ("CROWN_SYNC_ORACLE", "STATE_DIRECTORY", "XDG_STATE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", "/proc/1/no-home")


def test_options_with_an_unusable_default_oracle_are_a_check_error_not_a_crash(no_usable_home):
    with override_settings(CROWN_SYNC={"NAME": "x", "OPTIONS": {"monitor_delay": 1}}):
        (error,) = [e for e in checks.run_checks() if e.id.startswith("crown_sync.")]
    assert 'CROWN_SYNC["OPTIONS"]' in error.msg and "CROWN_SYNC_ORACLE" in error.msg


def test_an_own_crown_that_cannot_be_made_is_logged_once_and_requests_go_on(tmp_path, no_usable_home, caplog,
                                                                            monkeypatch):
    monkeypatch.setattr(runtime, "_failed_in", None)
    with crown_settings(tmp_path, ORACLE=None, START=True):
        for _ in range(3):  # as Django's handlers send request_started: outside their error handling
            runtime.start_on_request(sender=None)
        assert runtime.crown() is None
    said = [r for r in caplog.records if r.name == "crown_sync.django" and "could not be started" in r.getMessage()]
    assert len(said) == 1 and "CROWN_SYNC_ORACLE" in said[0].exc_text


# ------------------------------------------------------------------------- leader_only

VIEWS = [("/work", "sync", "function"), ("/async-work", "async", "async"), ("/class-work", "sync", "class"),
         ("/async-class-work", "async", "async-class"), ("/method-decorated", "async", "method-decorated"),
         ("/method-work", "sync", "method")]


def test_leader_only_every_kind_of_view_503_on_a_follower_runs_on_the_leader(tmp_path):
    with crown_settings(tmp_path, RETRY_AFTER=7) as value:
        for path, client, _ in VIEWS:
            for kind in {client, "sync"}:  # Django's WSGI handler runs async views too
                response = fetch(path, kind)
                assert response.status_code == 503, (path, kind)
                assert response["Retry-After"] == "7"
                assert response.json() == {"error": "not the leader", "name": NAME}
        with crown_sync.lead(NAME, oracle=value["ORACLE"]) as crown:
            assert crown.wait_for_leadership(30)
            for path, client, view in VIEWS:
                for kind in {client, "sync"}:
                    response = fetch(path, kind)
                    assert response.status_code == 200, (path, kind)
                    assert response.json()["view"] == view
            assert Client().post("/class-work").json() == {"view": "class", "method": "post"}
        assert fetch("/work").status_code == 503  # the term is over


def test_leader_only_refuses_what_is_not_a_view():
    from django.views.generic.base import ContextMixin

    with pytest.raises(TypeError, match="leader_only"):
        crown_sync.django.leader_only(ContextMixin)
    with pytest.raises(TypeError, match="leader_only"):
        crown_sync.django.leader_only(42)


def test_redirect_to_the_leader_url_from_its_metadata(tmp_path):
    """The leader is another process (``crown-sync run`` publishing its URL as metadata)."""
    oracle = f"file://{tmp_path / 'oracle'}"
    with leader_elsewhere("django-redirect", oracle) as leader:
        with crown_settings(tmp_path, "django-redirect", FOLLOWER="redirect", LEADER_CACHE=0):
            for path, client, _ in VIEWS[:2]:
                response = fetch(path + "?x=1", client)
                assert response.status_code == 307, path
                assert response["Location"] == f"http://127.0.0.1:9/base{path}?x=1"
            stop_gracefully(leader)
            # No leader any more: a follower falls back to 503.
            assert fetch("/work").status_code == 503


def test_redirect_in_a_gunicorn_worker_follows_the_masters_crown(tmp_path, monkeypatch):
    """A worker whose master runs the crown (crown_in_master) redirects to the leader that crown
    knows, from the master's shared memory, not to what Django's own ORACLE setting reads (an
    oracle with no leader here). The slot is the real one; only its owner is made this process's
    parent, as a worker's master is."""
    import crown_sync.gunicorn as cg

    leader = crown_sync.Leader("master-host:1:abc", {"url": "http://10.0.0.9:8000/app"}, 7, time.time())
    status = crown_sync.Status("django-master", "following", False, "me", leader, None, False, "file", None)
    slot = cg._Slot()
    slot.owner = os.getppid()
    slot._store(float("-inf"), -1, cg._view_bytes(status))
    monkeypatch.setitem(cg._slots, "django-master", slot)
    with crown_settings(tmp_path, "django-master", FOLLOWER="redirect", LEADER_CACHE=0):
        assert runtime.leader_url() == "http://10.0.0.9:8000/app"
        response = fetch("/work?x=1")
        assert response.status_code == 307 and response["Location"] == "http://10.0.0.9:8000/app/work?x=1"


# ------------------------------------------------------------------------- the status view


def test_status_view_says_who_leads_and_never_shows_secrets(tmp_path):
    with crown_settings(tmp_path) as value:
        body = fetch("/_crown_sync/").json()
        assert body["is_leader"] is False and body["leader"] is None and body["phase"] is None
        with crown_sync.lead(NAME, oracle=value["ORACLE"], metadata={"secret": "hidden-meta"}) as crown:
            assert crown.wait_for_leadership(30)
            response = fetch("/_crown_sync/?require=leader")
            assert response.status_code == 200 and "no-store" in response["Cache-Control"]
            body = response.json()
            assert body["is_leader"] is True and body["token"] >= 1
            assert body["leader"]["identity"] == crown.identity and "hidden-meta" not in response.content.decode()

    secret = "s3cr3t-pw"
    with crown_settings(tmp_path, ORACLE=f"postgresql://user:{secret}@127.0.0.1:1/db?connect_timeout=2"):
        response = fetch("/_crown_sync/?require=leader")
        assert response.status_code == 503
        body = response.json()
        assert body["leader"] is None and "error" in body and secret not in response.content.decode()
        assert "127.0.0.1" not in response.content.decode()  # the error's type only: its text names hosts


# ------------------------------------------------------------------------- the own crown


def test_own_crown_started_by_start_runs_the_job_and_sends_signals_never_by_the_test_client(tmp_path, monkeypatch):
    path = str(tmp_path / "journal")
    monkeypatch.setenv("CROWN_TEST_JOURNAL", path)
    received = []

    def receiver(signal, sender, **kwargs):
        received.append((signal, sender, kwargs))

    def failing(**kwargs):
        raise RuntimeError("a receiver that fails")

    for signal_ in (signals.elected, signals.deposed, signals.new_leader):
        signal_.connect(failing, weak=False, dispatch_uid="test-failing")  # first: the others still hear
        signal_.connect(receiver, weak=False, dispatch_uid="test")
    try:
        with crown_settings(tmp_path, START=True, JOB="tests.django_project.jobs:journal_job"):
            # The test client's requests are not served ones ("manage.py test" never leads).
            fetch("/_crown_sync/", "async")
            fetch("/work")
            assert runtime.crown() is None and not os.path.exists(path)
            own = crown_sync.django.start()
            assert runtime.crown() is own and crown_sync.django.start() is own
            wait_until(lambda: crown_sync.is_leader(NAME), message="the own crown leads")
            assert fetch("/work").status_code == 200
            body = fetch("/_crown_sync/").json()
            assert body["is_leader"] and body["phase"] == "leading" and body["token"] >= 1
            wait_until(lambda: journal_terms(path, NAME) and journal_terms(path, NAME)[0].beats, message="job beats")
            fetch("/work")
            assert runtime.crown() is own  # one crown per process
            runtime.stop(30)
            assert not crown_sync.is_leader(NAME)
    finally:
        for signal_ in (signals.elected, signals.deposed, signals.new_leader):
            signal_.disconnect(dispatch_uid="test")
            signal_.disconnect(dispatch_uid="test-failing")
    (term,) = journal_terms(path, NAME)
    assert term.stopped and journal.check(path).ok
    kinds = [(s, kw.get("token"), kw.get("reason")) for s, _, kw in received if s is not signals.new_leader]
    assert kinds == [(signals.elected, term.token, None), (signals.deposed, term.token, "stop")]
    assert all(sender is crown_sync.Crown and kw["name"] == NAME for _, sender, kw in received)
    leaders = [kw["leader"] for s, _, kw in received if s is signals.new_leader]
    assert leaders and leaders[0].identity == own.identity


def test_management_commands_never_contend(tmp_path):
    """ready() runs in every management command: with START, none of them may lead."""
    env = django_env(tmp_path, CROWN_TEST_START="1")
    probe = ("import time, crown_sync.registry; time.sleep(1.0); "
             "assert not crown_sync.registry.crowns(), crown_sync.registry.crowns()")
    for command in (["migrate", "--no-input"], ["shell", "-c", probe]):
        result = subprocess.run([sys.executable, "-m", "django", *command], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    assert not os.path.exists(env["CROWN_TEST_JOURNAL"])  # no job ever ran


# ------------------------------------------------------------------------- manage.py crown_sync


def command(*args):
    """(exit code, stdout) of ``manage.py crown_sync ARGS`` run in-process."""
    out = io.StringIO()
    try:
        call_command("crown_sync", *args, stdout=out)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, out.getvalue()


def test_crown_sync_command_status_and_dismiss_with_the_cli_exit_codes(tmp_path):
    with crown_settings(tmp_path) as value:
        assert command("status") == (1, f"no leader for {NAME}\n")
        assert command("dismiss") == (1, f"no leader for {NAME}\n")
        with crown_sync.lead(NAME, oracle=value["ORACLE"], monitor_delay=0.2) as crown:
            assert crown.wait_for_leadership(30)
            code, out = command("status", "--json")
            assert code == 0 and json.loads(out)["leader"]["identity"] == crown.identity
            code, out = command("status")
            assert code == 0 and crown.identity in out
            code, out = command("dismiss", "--json")
            assert code == 0 and json.loads(out)["dismissed"]["identity"] == crown.identity
            wait_until(lambda: crown.status().token != json.loads(out)["dismissed"]["token"],
                       message="the dismissed leader stepped down")
        code, out = command("status", "other-name", "--oracle", value["ORACLE"])
        assert (code, out) == (1, "no leader for other-name\n")
        secret = "s3cr3t-pw"
        with pytest.raises(CommandError) as caught:
            command("status", "--oracle", f"postgresql://u:{secret}@127.0.0.1:1/db?connect_timeout=2")
        assert caught.value.returncode == 3 and secret not in str(caught.value)
        with pytest.raises(CommandError) as caught:
            command("status", "bad name")
        assert caught.value.returncode == 2


def test_manage_py_crown_sync_exit_code_and_output_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "django", "crown_sync", "status", "--json"], cwd=ROOT,
                            env=django_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout) == {"name": NAME, "oracle": f"file://{tmp_path / 'oracle'}", "leader": None,
                                         "notices": []}


# ------------------------------------------------------------------------- runserver


def test_runserver_autoreloader_leads_only_in_the_serving_process(tmp_path):
    """The autoreloader's watcher sets Django up too but never serves, so it never leads; a reload
    stops the old serving process's job and abdicates at exit; the new one leads."""
    port = free_port()
    path = str(tmp_path / "journal")
    watched = tmp_path / "reload_settings.py"  # a settings module: the reloader watches it
    watched.write_text("from tests.django_project.settings import *  # noqa\n")
    env = django_env(tmp_path, CROWN_TEST_START="1", DJANGO_SETTINGS_MODULE="reload_settings",
                     PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    server = subprocess.Popen([sys.executable, "-m", "django", "runserver", f"127.0.0.1:{port}"], cwd=ROOT,
                              env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    check_reloader(server, port, path, NAME,
                   lambda: watched.write_text("from tests.django_project.settings import *  # noqa: reloaded\n"))


# ------------------------------------------------------------------------- an ASGI server


def test_uvicorn_workers_contend_on_their_first_request_and_one_leads(tmp_path):
    """uvicorn with two workers: the supervisor never contends, a worker does on its first request
    (Django's ASGI handler), only one leads. At shutdown uvicorn's worker dies of the SIGTERM it
    re-raises (at-exit handlers do not run): its job dies with it and the lock goes with the
    process, so another contender leads at once."""
    port = free_port()
    path = str(tmp_path / "journal")
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "tests.django_project.asgi:application", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "2"],
        cwd=ROOT, env=django_env(tmp_path, CROWN_TEST_START="1"), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=60)
        time.sleep(0.5)
        assert journal_terms(path, NAME) == []  # no request yet: nobody contends
        wait_until(lambda: (seen(port) or {}).get("is_leader"), message="a worker leads")
        answers = [seen(port) for _ in range(40)]
        leaders = {a["pid"] for a in answers if a and a["is_leader"]}
        (term,) = wait_until(lambda: journal_terms(path, NAME), message="the job started")
        assert leaders == {term.pid} and term.pid != server.pid and parent_of(term.pid) == server.pid
        os.kill(server.pid, signal.SIGTERM)
        server.wait(60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
    # The other worker, a follower, may lead in the moment between the leader's death and its own.
    report = journal.check(path)
    assert report.ok, report.summary()
    assert report.terms[0].pid == term.pid and all(t.pid != server.pid for t in report.terms)
    with crown_sync.lead(NAME, oracle=f"file://{tmp_path / 'oracle'}") as crown:
        assert crown.wait_for_leadership(30)


# ------------------------------------------------------------------------- the example under Gunicorn

#: Shorter than a failover, so ticks fall due while nobody leads and the new scheduler catches up.
TICK = 0.1


def post(port, path):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers)


def manage_status(env):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "django_gunicorn", "manage.py"),
                             "crown_sync", "status", "--json"], cwd=ROOT, env=dict(os.environ, **env),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["leader"]


def test_example_django_scheduler_runs_once_across_two_gunicorn_masters(tmp_path):
    example = TwoMastersExample(tmp_path, "django_gunicorn", "examples.django_gunicorn.wsgi:application", TICK)
    try:
        leading, survivor, first = example.start()
        assert post(leading.port, "/run-now")[0] == 200
        status, headers = post(survivor.port, "/run-now")
        assert status == 503 and headers["Retry-After"] == "5"
        assert f":{leading.pid}:" in manage_status(example.env)["identity"]
        example.kill_leading_master(leading, survivor, first)
        assert post(survivor.port, "/run-now")[0] == 200
        assert f":{survivor.pid}:" in manage_status(example.env)["identity"]
    finally:
        example.cleanup()
    example.assert_one_grid_of_ticks()
