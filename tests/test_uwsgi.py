"""crown_sync.uwsgi with real uWSGI (the pyuwsgi wheel) serving a WSGI app over loopback HTTP.

Leadership is judged from outside: by HTTP answers (``crown_sync.is_leader(name)`` in the worker
that served the request), by the job's own journal (crown_sync.testing.journal), by the oracle's
find_leader and, for which process holds a connection to the oracle, by the kernel's socket table
(``ss``). Faults are real signals to uWSGI's processes.
"""

import ctypes
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

import pytest

import crown_sync
import crown_sync.uwsgi
from crown_sync import registry
from crown_sync.oracles.file import FileOracle
from crown_sync.testing import journal
from crown_sync.testing.memcached_server import MemcachedServer
from crown_sync.testing.memory import MemoryOracle
from crown_sync.testing.servers import Server

from tests.wsgi_support import ROOT, Gunicorn, get, journal_terms, process_gone, wait_until

pytestmark = pytest.mark.timeout(180)

NAME = "uwsgi-test"
BEAT = 0.02

#: The placement module; the app imports it (with lazy-apps and the master placement, uWSGI's
#: shared-import loads it in the master first, and the workers find it already imported).
CROWN_CONF = """
import logging, os, crown_sync, crown_sync.uwsgi
from crown_sync.testing import journal
NAME, PATH, PLACEMENT = os.environ["CROWN_TEST_NAME"], os.environ["CROWN_TEST_JOURNAL"], os.environ["CROWN_TEST_PLACEMENT"]
options = dict(oracle=os.environ["CROWN_TEST_ORACLE"], monitor_delay=0.2, stop_timeout=15)
# as docs/uwsgi.rst advises: the master's threads log to a file, not through sys.stderr
logging.basicConfig(filename=PATH + ".log", level=logging.INFO, format="%%(process)d %%(name)s %%(message)s")
if PLACEMENT == "worker":
    crown_sync.uwsgi.crown_per_worker(NAME, child=crown_sync.ThreadChild(journal.journaled_work, args=(PATH, %(beat)r)), **options)
elif PLACEMENT == "master":
    crown_sync.uwsgi.crown_in_master(NAME, child=crown_sync.ProcessChild(journal.journaled_process, args=(PATH, %(beat)r)), **options)
elif PLACEMENT == "bare":  # a plain crown started while the master loads the app
    crown_sync.Crown(NAME, oracle=options["oracle"]).start()
""" % {"beat": BEAT}

APP = """
import json, os, crown_sync, uwsgi
import crown_conf

def application(environ, start_response):
    body = {"pid": os.getpid(), "worker": uwsgi.worker_id(), "is_leader": crown_sync.is_leader(crown_conf.NAME)}
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]
"""


def _uwsgi_binary() -> str:
    # pyuwsgi (the test extra) puts its uwsgi script beside the interpreter; no skip without it
    candidate = os.path.join(os.path.dirname(sys.executable), "uwsgi")
    found = candidate if os.path.exists(candidate) else shutil.which("uwsgi")
    if found is None:
        raise AssertionError("no uwsgi binary: pip install pyuwsgi (in the test extra)")
    return found


class UWSGI(Gunicorn):
    """A real uWSGI master (its own process group) on a free loopback port, with ``options``
    (ini lines) added to the base config; the Gunicorn helper's answers/workers/cleanup apply."""

    def __init__(self, env: Dict[str, str], options: str = "", processes: int = 2, example: Optional[str] = None,
                 app: str = APP):
        Server.__init__(self)
        for filename, text in (("crown_conf.py", CROWN_CONF), ("app.py", app)):
            with open(os.path.join(self.tmpdir, filename), "w") as handle:
                handle.write(text)
        if example is None:
            base = (f"[uwsgi]\nmaster = true\nprocesses = {processes}\nchdir = {self.tmpdir}\n"
                    f"pythonpath = {self.tmpdir}\nwsgi-file = app.py\nenable-threads = true\n")
        else:  # an example's own ini, run from the repository's root on this port
            with open(os.path.join(ROOT, example)) as handle:
                base = handle.read().replace("http-socket = 127.0.0.1:8000", "") + f"\nchdir = {ROOT}\n"
        self.config_path = os.path.join(self.tmpdir, "uwsgi.ini")
        with open(self.config_path, "w") as handle:
            handle.write(f"{base}\nhttp-socket = 127.0.0.1:{self.port}\n"
                         "min-worker-lifetime = 0\n"
                         # generous for a loaded host; bounds a worker stuck at exit on a stdio lock a
                         # master thread held at the fork (docs/uwsgi.rst)
                         "worker-reload-mercy = 20\n"
                         # pyuwsgi re-execs the base interpreter on a reload, outside the venv: this one instead
                         f"binary-path = {sys.executable}\n"
                         f"{options}\n")
        self.env = dict(os.environ, **env)
        self.log_path = os.path.join(self.tmpdir, "uwsgi.log")
        self.pgid = None

    def start(self, wait: bool = True) -> "UWSGI":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([_uwsgi_binary(), "--ini", self.config_path], cwd=self.tmpdir,
                                            env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self.pgid = self.process.pid
        if wait:
            wait_until(lambda: get(self.port, "/") is not None or self.process.poll() is not None, 60,
                       message="uWSGI serving")
            assert self.process.poll() is None, f"uWSGI exited; log:\n{self.log()}"
        return self

    def answers(self, count: int = 12, path: str = "/") -> List[dict]:
        return super().answers(count, path)


def _env(tmp_path, oracle: str, placement: str) -> Dict[str, str]:
    return {"CROWN_TEST_NAME": NAME, "CROWN_TEST_JOURNAL": str(tmp_path / "journal"),
            "CROWN_TEST_ORACLE": oracle, "CROWN_TEST_PLACEMENT": placement}


def _pid_of(identity: str) -> int:
    return int(identity.split(":")[1])  # the default identity: host:pid:random


def _leader(oracle) -> Optional[crown_sync.Leader]:
    try:
        return oracle.find_leader(NAME)
    except Exception:
        return None


def _new_leader(oracle, old_tokens, alive=True):
    """The leader once one holds a term newer than ``old_tokens`` and (if asked) still runs."""
    def check():
        leader = _leader(oracle)
        if leader is None or leader.token in old_tokens:
            return None
        return leader if not alive or not process_gone(_pid_of(leader.identity)) else None
    return wait_until(check, 60, message="a new leader")


def _assert_one_leading_worker(host: UWSGI, oracle) -> None:
    """Only the leading worker says it leads: the others, and every copy forked from the master,
    say not (each answer is the is_leader of the process that served it). The leader may change
    meanwhile (these requests count towards max-requests): asked until one batch agrees."""
    def settled():
        leading = {a["pid"] for a in host.answers(8) if a["is_leader"]}
        leader = _leader(oracle)
        return leader is not None and leading == {_pid_of(leader.identity)}
    wait_until(settled, 30, message="exactly the leader's worker says it leads")


def _assert_journal(path: str, min_terms: int, name: Optional[str] = NAME) -> List[journal.Term]:
    report = journal.check(path, name)
    assert report.ok, report.summary()
    assert len(report.terms) >= min_terms, report.summary()
    return report.terms


# ----------------------------------------------------------------------------- without uWSGI

def test_a_process_forked_without_at_fork_hooks_sees_no_leadership(tmp_path):
    """A fork from C (as uWSGI's) runs none of Python's at-fork handlers: the pid checks alone
    must keep the copy from answering for the parent's crown or acting on it."""
    crown = crown_sync.Crown(NAME, oracle=MemoryOracle(), monitor_delay=0.2).start()
    try:
        assert crown.wait_for_leadership(10)
        assert crown.is_leader() and crown_sync.is_leader(NAME)
        read, write = os.pipe()
        # libc's fork, no os.register_at_fork handler run; PyDLL keeps the GIL over the call, as uWSGI
        # does (CDLL would drop it, and a thread that takes it meanwhile would hold it in the child)
        pid = ctypes.PyDLL(None).fork()
        if pid == 0:
            try:
                seen = {"is_leader": crown.is_leader(), "term": crown.term() is not None,
                        "status": crown.status().is_leader, "api": crown_sync.is_leader(NAME),
                        "registry": len(registry.crowns(NAME)), "phase": crown.status().phase}
                crown.stop(1)  # must not touch the parent's term
                os.write(write, json.dumps(seen).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as handle:
            if not select.select([handle], [], [], 60)[0]:  # a copy stuck on a lock: fail, don't hang
                os.kill(pid, signal.SIGKILL)
            seen = json.loads(handle.read() or "{}")
        os.waitpid(pid, 0)
        assert seen == {"is_leader": False, "term": False, "status": False, "api": False, "registry": 0,
                        "phase": "stopped"}
        assert crown.is_leader(), "the child's stop() ended the parent's term"
    finally:
        crown.stop(10)


def test_bad_options_fail_at_the_call_and_outside_uwsgi_nothing_starts(caplog):
    with pytest.raises(TypeError, match="child"):
        crown_sync.uwsgi.crown_per_worker(NAME, child=None)
    with pytest.raises(TypeError, match="thread"):
        crown_sync.uwsgi.crown_in_master(NAME, child=crown_sync.ThreadChild(print))
    with pytest.raises(ValueError, match="name"):
        crown_sync.uwsgi.crown_per_worker("no spaces", child=print)
    with pytest.raises(ValueError, match="monitor_timeout"):
        crown_sync.uwsgi.crown_in_master(NAME, child=print, monitor_delay=5, monitor_timeout=1)
    crown_sync.uwsgi.crown_per_worker(NAME, child=print, oracle=MemoryOracle())  # a test importing the app
    crown_sync.uwsgi.crown_in_master(NAME, child=print, oracle=MemoryOracle())
    assert registry.crowns(NAME) == [] and crown_sync.uwsgi.running_crown(NAME) is None
    assert "not running under uWSGI" in caplog.text
    crown_sync.uwsgi.check_fork_safety()  # outside uWSGI: nothing to refuse


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("placement, options", [("master", ""), ("bare", ""),
                                                ("master", "py-call-uwsgi-fork-hooks = false")])
def test_a_crown_in_the_master_without_fork_hooks_is_refused(tmp_path, placement, options):
    host = UWSGI(_env(tmp_path, f"file://{tmp_path / 'oracle'}", placement), f"need-app = true\n{options}")
    try:
        host.start(wait=False)
        assert host.wait_exit(60) != 0
        log = host.log()
        assert "needs the uWSGI option(s) py-call-uwsgi-fork-hooks" in log, log
        assert not os.path.exists(tmp_path / "journal")
    finally:
        host.cleanup()


# ----------------------------------------------------------------------------- one crown per worker

@pytest.mark.parametrize("lazy", [False, True])
def test_crown_per_worker_recycling_kill_and_reload(tmp_path, lazy):
    oracle = FileOracle(str(tmp_path / "oracle"))
    host = UWSGI(_env(tmp_path, f"file://{tmp_path / 'oracle'}", "worker"),
                 f"max-requests = 30\nlazy-apps = {str(lazy).lower()}")
    path = str(tmp_path / "journal")
    try:
        host.start()
        first = _new_leader(oracle, set())
        _assert_one_leading_worker(host, oracle)

        # max-requests: every worker is recycled (uWSGI's atexit stops its crown), another leads
        host.answers(80)
        recycled = _new_leader(oracle, {first.token})
        assert process_gone(_pid_of(first.identity))
        _assert_one_leading_worker(host, oracle)

        # SIGKILL of the leading worker: its lock goes with it, another worker takes over
        current = _new_leader(oracle, set())  # this test's own requests may have recycled it again
        os.kill(_pid_of(current.identity), signal.SIGKILL)
        killed = _new_leader(oracle, {first.token, recycled.token, current.token})
        _assert_one_leading_worker(host, oracle)

        # graceful reload (SIGHUP): new workers, a new term
        host.signal(signal.SIGHUP)
        reloaded = _new_leader(oracle, {first.token, recycled.token, current.token, killed.token})
        _assert_one_leading_worker(host, oracle)
        workers = host.workers()
        host.signal(signal.SIGINT)
        assert host.wait_exit(60) is not None
        terms = _assert_journal(path, 4)
        assert {term.pid for term in terms[-1:]} <= set(workers), "the job ran outside the workers"
        assert terms[-1].stopped, "shutdown did not stop the leading worker's job"
    finally:
        host.cleanup()


def test_crown_per_worker_master_sigkill(tmp_path):
    """Two instances, a crown per worker: the leading worker's master is SIGKILLed. The kernel
    sends its workers SIGTERM (die_with_master), the leading one's job ends with it, and a worker
    of the other instance takes over, without overlap. Whether the job is stopped gracefully
    depends on uWSGI running its atexit then, which it does not always do (docs/uwsgi.rst)."""
    oracle = FileOracle(str(tmp_path / "oracle"))
    hosts = [UWSGI(_env(tmp_path, f"file://{tmp_path / 'oracle'}", "worker")) for _ in range(2)]
    path = str(tmp_path / "journal")
    try:
        for host in hosts:
            host.start()
        first = _new_leader(oracle, set())
        leading = next(h for h in hosts if _pid_of(first.identity) in h.workers())
        other = hosts[1 - hosts.index(leading)]
        orphans = leading.workers()
        leading.signal(signal.SIGKILL)
        wait_until(lambda: all(process_gone(pid) for pid in orphans), 30, message="the orphaned workers exited")
        second = _new_leader(oracle, {first.token})
        assert _pid_of(second.identity) in other.workers()
        wait_until(lambda: len(journal.check(path, NAME).terms) >= 2, 30, message="the new term's work")
        _assert_journal(path, 2)
    finally:
        for host in hosts:
            host.cleanup()


DJANGO_APP = """
from django.core.wsgi import get_wsgi_application
application = get_wsgi_application()
"""


def test_django_own_crown_per_worker(tmp_path):
    """A Django app with CROWN_SYNC["START"] under uWSGI (app loaded in the master): ready() in
    the master starts nothing, each worker's first request starts its crown, the job runs in one
    worker; a recycled worker (max-requests) hands over, and shutdown stops the job."""
    oracle = FileOracle(str(tmp_path / "oracle"))
    env = {"PYTHONPATH": ROOT, "DJANGO_SETTINGS_MODULE": "tests.django_project.settings", "CROWN_TEST_NAME": NAME,
           "CROWN_SYNC_ORACLE": f"file://{tmp_path / 'oracle'}", "CROWN_TEST_JOURNAL": str(tmp_path / "journal"),
           "CROWN_TEST_START": "1"}
    host = UWSGI(env, "max-requests = 30", app=DJANGO_APP)
    try:
        host.start()
        first = _new_leader(oracle, set())
        assert _pid_of(first.identity) in host.workers()
        host.answers(80, "/leader")  # every worker recycled at least once
        second = _new_leader(oracle, {first.token})
        wait_until(lambda: any(a["is_leader"] for a in host.answers(4, "/leader")), 30, message="a worker leads")
        assert _pid_of(second.identity) in host.workers()
        host.signal(signal.SIGINT)
        host.wait_exit(60)
        terms = _assert_journal(str(tmp_path / "journal"), 2)
        assert terms[-1].stopped, "shutdown did not stop the leading worker's job"
    finally:
        host.cleanup()


# ----------------------------------------------------------------------------- the crown in the master

def _oracle_holders(port: int) -> Dict[int, int]:
    """pid -> how many established TCP connections to 127.0.0.1:``port`` it holds, as the kernel
    tells ``ss`` (iproute2): every process that has a copy of a socket is listed with it."""
    output = subprocess.run(["ss", "-tnpH", "state", "established", "dst", f"127.0.0.1:{port}"],
                            capture_output=True, text=True, check=True).stdout
    holders: Dict[int, int] = {}
    for pid in re.findall(r"pid=(\d+)", output):
        holders[int(pid)] = holders.get(int(pid), 0) + 1
    return holders


@pytest.fixture(scope="module")
def memcached():
    server = MemcachedServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.mark.parametrize("lazy", [False, True])
def test_crown_in_master_two_instances_master_sigkill_and_reload(tmp_path, memcached, lazy):
    url = f"{memcached.url}?ttl=3&key_prefix=uwsgi-{int(lazy)}-{os.getpid()}-"
    oracle = crown_sync.urls.oracle_from_url(url)
    options = "py-call-uwsgi-fork-hooks = true\n" + ("lazy-apps = true\nshared-import = crown_conf" if lazy else "")
    hosts = [UWSGI(_env(tmp_path, url, "master"), options, processes=3) for _ in range(2)]
    path = str(tmp_path / "journal")
    try:
        for host in hosts:
            host.start()
        first = _new_leader(oracle, set())
        leading = next(h for h in hosts if h.process.pid == _pid_of(first.identity))
        other = hosts[1 - hosts.index(leading)]
        wait_until(lambda: all(a["is_leader"] for a in leading.answers(12)), 30, message="every worker leads")
        assert not any(a["is_leader"] for a in other.answers(12))

        # the masters hold their oracle connections; no worker holds a copy, not even one forked
        # while the crown was connected (uWSGI forks the first workers before the crown can run)
        for host in hosts:
            victim = host.workers(path)[0]
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: victim not in host.workers(path) and len(host.workers(path)) == 3, 30,
                       message="a worker respawned")
        holders = _oracle_holders(memcached.port)
        for host in hosts:
            assert holders.get(host.process.pid, 0) >= 1, (holders, host.log())
            for worker in host.workers(path):
                assert worker not in holders, f"worker {worker} kept the master's connection"

        # SIGKILL of the leading master: its job dies with it, the other instance takes over
        leading.signal(signal.SIGKILL)
        second = _new_leader(oracle, {first.token})
        assert _pid_of(second.identity) == other.process.pid
        wait_until(lambda: all(a["is_leader"] for a in other.answers(12)), 30, message="the survivor's workers lead")
        assert not any(a["is_leader"] for a in leading.answers(6))  # orphans still serving (if any) say no

        # graceful reload: uWSGI re-executes the master (same pid); its job dies with the old
        # image and the new image's crown leads again once the lease is free
        job = journal_terms(path, NAME)[-1].pid
        other.signal(signal.SIGHUP)
        third = _new_leader(oracle, {first.token, second.token})
        assert _pid_of(third.identity) == other.process.pid and process_gone(job)
        wait_until(lambda: all(a["is_leader"] for a in other.answers(12)), 30, message="the reloaded workers lead")
        time.sleep(0.5)
        other.signal(signal.SIGINT)
        other.wait_exit(60)
        _assert_journal(path, 3)
    finally:
        for host in hosts:
            host.cleanup()
        oracle.close()


# ----------------------------------------------------------------------------- the example

@pytest.mark.parametrize("ini, every_worker", [("uwsgi.ini", False), ("uwsgi-master.ini", True)])
def test_example(tmp_path, ini, every_worker):
    """examples/uwsgi_app as docs/uwsgi.rst shows it: one job, stopped at shutdown."""
    path = str(tmp_path / "journal")
    host = UWSGI({"CROWN_SYNC_ORACLE": f"file://{tmp_path / 'oracle'}", "EXAMPLE_JOURNAL": path},
                 example=f"examples/uwsgi_app/{ini}")
    try:
        host.start()
        wait_until(lambda: journal_terms(path), 60, message="the job started")
        answers = wait_until(lambda: [a for a in host.answers(8) if a["job_here"]], 30, message="a worker leads")
        if every_worker:
            assert all(a["token"] == journal_terms(path)[0].token for a in answers)
        host.signal(signal.SIGINT)
        host.wait_exit(60)
        # (per worker, a worker that is still serving may win the crown while the others exit)
        terms = _assert_journal(path, 1, None)
        assert all(process_gone(term.pid) for term in terms), terms
        # uWSGI runs no Python exit handler in its master: the master's job is killed with it (it
        # must not outlive the master: the oracle may free the lease at the master's death)
        assert terms[-1].stopped != every_worker, terms
    finally:
        host.cleanup()
