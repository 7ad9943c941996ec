"""Shared by the Gunicorn, Flask and example tests: a Flask app, its jobs, and real processes.

The app (``tests.wsgi_support:app``) reads its election name from ``CROWN_TEST_NAME`` and its
journal from ``CROWN_TEST_JOURNAL``; the oracle comes from ``CROWN_SYNC_ORACLE`` (the default
oracle of every crown). Leadership is observed two ways: by HTTP requests to ``/leader`` (what
``crown_sync.is_leader`` says in the worker that answered) and by the job's own journal.
"""

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Dict, List, Optional

import flask

import crown_sync
from crown_sync.flask import CrownSync, leader_only
from crown_sync.gunicorn import leader_token
from crown_sync.testing import journal
from crown_sync.testing.servers import Server, wait_for_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = os.environ.get("CROWN_TEST_NAME", "wsgi-test")
BEAT = 0.02


# ----------------------------------------------------------------------------- the app

def create_app(with_job: bool = False, **config) -> flask.Flask:
    """The test app. ``with_job``: the extension's own crown (CROWN_SYNC_START) runs
    :func:`flask_job`. Also usable as ``flask --app 'tests.wsgi_support:create_app(...)'``."""
    app = flask.Flask(__name__)
    app.config.update(CROWN_SYNC_NAME=NAME, CROWN_SYNC_STATUS_URL="/_crown_sync")
    if os.environ.get("CROWN_TEST_FOLLOWER"):
        app.config["CROWN_SYNC_FOLLOWER"] = os.environ["CROWN_TEST_FOLLOWER"]
    app.config.update(config)
    CrownSync(app, job=flask_job if with_job else None)

    @app.get("/leader")
    def leader():
        return {"is_leader": crown_sync.is_leader(NAME), "pid": os.getpid(), "ppid": os.getppid(),
                "token": leader_token(NAME),
                "crown_threads": sorted(t.name for t in threading.enumerate() if t.name.startswith("crown-sync")),
                "tcp_peer_ports": tcp_peer_ports()}

    @app.get("/only-leader")
    @leader_only
    def only_leader():
        return {"pid": os.getpid()}

    return app


app = create_app()
APP_LOADED = True  # a job that sees this ran in a process where the app module was imported


# ----------------------------------------------------------------------------- the jobs

def flask_job(term) -> None:
    """The Flask extension's own job: journals, noting the app of its app context."""
    record = journal.Journal(os.environ["CROWN_TEST_JOURNAL"])
    try:
        record.write("start", term.name, term.identity, term.token, app=flask.current_app.name)
        while not term.stop_event.wait(BEAT):
            record.write("beat", term.name, term.identity, term.token)
        record.write("stop", term.name, term.identity, term.token)
    finally:
        record.close()


def master_job(term_info) -> None:
    """ProcessChild target forked from the Gunicorn master: journal until SIGTERM."""
    journal.journaled_process(term_info, os.environ["CROWN_TEST_JOURNAL"], BEAT)


def worker_job(term) -> None:
    """Thread child in the leading worker: journal (marking that the app is loaded) until the
    term ends."""
    path = os.environ["CROWN_TEST_JOURNAL"]
    record = journal.Journal(path)
    loaded = "tests.wsgi_support" in sys.modules and getattr(sys.modules["tests.wsgi_support"], "APP_LOADED", False)
    try:
        record.write("start", term.name, term.identity, term.token, app=loaded)
        while not term.stop_event.wait(BEAT):
            record.write("beat", term.name, term.identity, term.token)
        record.write("stop", term.name, term.identity, term.token)
    finally:
        record.close()


# ----------------------------------------------------------------------------- helpers

def tcp_peer_ports() -> List[int]:
    """Remote ports of this process's established TCP connections (from /proc): what a worker
    would have inherited from its master (an oracle connection) shows here."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as handle:
                rows = handle.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
                ports.append(int(fields[2].rsplit(":", 1)[1], 16))
    return sorted(ports)


def wait_until(predicate: Callable, timeout: float = 30.0, interval: float = 0.05, message: str = "condition"):
    """Poll until predicate() returns something true; fail (never hang) after a generous timeout."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{message}: not met within {timeout}s")
        time.sleep(interval)


def get(port: int, path: str, timeout: float = 5.0):
    """(status, headers, parsed JSON or text) of GET http://127.0.0.1:port/path; None if refused."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=timeout) as response:
            body = response.read()
            status, headers = response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        body, status, headers = error.read(), error.code, dict(error.headers)
    except (urllib.error.URLError, ConnectionError, OSError, http.client.HTTPException):
        return None  # refused, or cut short (IncompleteRead) by a server restarting
    try:
        return status, headers, json.loads(body)
    except ValueError:
        return status, headers, body.decode("utf-8", "replace")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@contextlib.contextmanager
def leader_elsewhere(name: str, oracle: str, url: str = "http://127.0.0.1:9/base"):
    """Another process leads ``name`` (``crown-sync run``, publishing ``url`` as its metadata)
    for the block; yields its Popen (:func:`stop_gracefully` ends it in the block). Killed by
    process group at the end."""
    leader = subprocess.Popen(
        [sys.executable, "-m", "crown_sync", "run", name, "--oracle", oracle,
         "-m", f"url={url}", "--", sys.executable, "-c", "import time; time.sleep(120)"],
        cwd=ROOT, start_new_session=True,
    )
    try:
        wait_until(lambda: crown_sync.find_leader(name, oracle=oracle), message="the other process leads")
        yield leader
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)
        leader.wait(30)


def stop_gracefully(process: subprocess.Popen) -> None:
    """SIGTERM to ``process``'s group (a ``crown-sync run``: its command stops, it abdicates)."""
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(30)


def seen(port: int) -> Optional[dict]:
    """What the process that answered /leader sees, or None (refused, or not a 200 while the
    server restarts)."""
    answer = get(port, "/leader")
    return answer[2] if answer is not None and answer[0] == 200 and isinstance(answer[2], dict) else None


def check_reloader(server: subprocess.Popen, port: int, path: str, name: str, touch: Callable[[], None]) -> None:
    """A development server with a reloader (``flask run --debug``, ``runserver``) whose app
    journals its job to ``path``: nobody contends before the first request; the serving child,
    never the watcher, leads; after ``touch()`` (a change the reloader watches) the old serving
    process stops its job and abdicates on its way out and the new one leads. Kills the server."""
    try:
        wait_for_port(port, timeout=60)
        time.sleep(0.5)
        assert journal_terms(path, name) == []  # no request yet: nobody contends
        first = wait_until(lambda: seen(port), message="first answer")
        assert first["pid"] != server.pid  # the serving child, not the watcher
        wait_until(lambda: (seen(port) or {}).get("is_leader"), message="the serving process leads")
        (term,) = wait_until(lambda: journal_terms(path, name), message="the job started")
        assert term.pid == first["pid"]

        time.sleep(1.1)  # the stat reloader compares mtimes once a second
        touch()

        def reloaded():
            answer = seen(port)
            return answer is not None and answer["pid"] != first["pid"] and answer["is_leader"]
        wait_until(reloaded, timeout=60, message="the reloaded process leads")
        terms = wait_until(lambda: len(journal_terms(path, name)) == 2 and journal_terms(path, name),
                           message="second term")
        assert terms[0].stopped  # the old process stopped its job and abdicated on its way out
        assert terms[1].pid != terms[0].pid and terms[1].token > terms[0].token
        assert server.pid not in {t.pid for t in terms}
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
    assert journal.check(path).ok


def journal_terms(path: str, name: str = None) -> List[journal.Term]:
    if not os.path.exists(path):
        return []
    return journal._terms(journal.read(path), name)


def _task_state(path: str) -> Optional[str]:
    """The state letter in a /proc stat file, or None if the task is gone."""
    try:
        with open(path) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def process_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (gone, or a zombie nobody reaped yet).

    Every thread counts: the main thread of a multi-threaded process (a Gunicorn master running a
    crown) can be a zombie while its other threads are still exiting, and until the last one has,
    the process still holds its descriptors and its children are not yet orphaned.
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return True
    return all(_task_state(f"/proc/{pid}/task/{task}/stat") in (None, "Z", "X") for task in tasks)


def parent_of(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None


# ----------------------------------------------------------------------------- gunicorn

class Gunicorn(Server):
    """A real Gunicorn master (its own process group) serving ``app`` on a free loopback port.

    ``config`` is the text of gunicorn.conf.py (``bind`` is added; ``@PORT@`` is replaced by the
    port). Stopped by pid; cleanup
    SIGKILLs the whole process group, orphaned workers included.
    """

    def __init__(self, config: str, env: Dict[str, str], app_spec: str = "tests.wsgi_support:app",
                 workers: int = 4):
        super().__init__()
        self.config_path = os.path.join(self.tmpdir, "gunicorn.conf.py")
        with open(self.config_path, "w") as handle:
            handle.write(config.replace("@PORT@", str(self.port)))
            handle.write(f"\nbind = '127.0.0.1:{self.port}'\nworkers = {workers}\n"
                         "control_socket_disable = True\ngraceful_timeout = 10\n")
        self.env = dict(os.environ)
        self.env.update(env)
        self.env["PYTHONPATH"] = ROOT + os.pathsep + self.env.get("PYTHONPATH", "")
        self.app_spec = app_spec
        self.log_path = os.path.join(self.tmpdir, "gunicorn.log")
        self.pgid = None

    def start(self) -> "Gunicorn":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", self.config_path, self.app_spec],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.pgid = self.process.pid
        try:
            wait_for_port(self.port, timeout=60)
        except TimeoutError:
            raise AssertionError(f"gunicorn did not listen; log:\n{self.log()}")
        return self

    def log(self) -> str:
        with open(self.log_path, "r", errors="replace") as handle:
            return handle.read()[-6000:]

    def signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def answers(self, count: int = 24, path: str = "/leader") -> List[dict]:
        """``count`` answers of /leader (connections refused are left out)."""
        out = []
        for _ in range(count):
            result = get(self.port, path)
            if result is not None and result[0] == 200:
                out.append(result[2])
        return out

    def workers(self, journal_path: Optional[str] = None) -> List[int]:
        """Live worker pids: children of the master (per /proc), except the job processes that
        the journal names (with the crown in the master, the job is a child of it too)."""
        jobs = set()
        if journal_path and os.path.exists(journal_path):
            jobs = {event["pid"] for event in journal.read(journal_path)}
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) not in jobs and parent_of(int(entry)) == self.process.pid \
                    and not process_gone(int(entry)):
                pids.append(int(entry))
        return pids

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.process.wait(timeout)

    def cleanup(self) -> None:
        if self.pgid is not None:
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process is not None:
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.process = None
        super().cleanup()


def unanimous(host: Gunicorn, count: int = 24) -> Optional[bool]:
    """True/False if every worker that answered agrees about is_leader; None if they disagree or
    none answered."""
    answers = host.answers(count)
    values = {a["is_leader"] for a in answers}
    return values.pop() if len(values) == 1 else None


# ----------------------------------------------------------------------------- the scheduler examples

class TwoMastersExample:
    """An example under examples/ whose scheduler journals one ``beat`` per tick (with its
    ``tick`` time), served by two Gunicorn masters with the example's own gunicorn.conf.py on one
    file oracle; its pages answer ``{"scheduler_here": ...}`` at ``/``."""

    def __init__(self, tmp_path, example: str, app_spec: str, tick: float):
        self.path = str(tmp_path / "journal")
        self.tick = tick
        self.env = {"CROWN_SYNC_ORACLE": f"file://{tmp_path / 'oracle'}", "EXAMPLE_JOURNAL": self.path,
                    "EXAMPLE_TICK": str(tick)}
        # The example's own gunicorn.conf.py, verbatim; Gunicorn adds bind and test settings.
        config = f"exec(open({os.path.join(ROOT, 'examples', example, 'gunicorn.conf.py')!r}).read())\n"
        self.hosts = [Gunicorn(config, self.env, app_spec=app_spec) for _ in range(2)]

    def ticks(self) -> List[dict]:
        return [e for e in journal.read(self.path) if e["ev"] == "beat"] if os.path.exists(self.path) else []

    def scheduler_here(self, host: "Gunicorn") -> Optional[bool]:
        """What every worker of ``host`` says (None while they disagree or do not answer)."""
        answers = [get(host.port, "/") for _ in range(12)]
        values = {a[2]["scheduler_here"] for a in answers if a is not None and a[0] == 200}
        return values.pop() if len(values) == 1 else None

    def start(self):
        """Start both masters; once ticks come, (leading host, the other, the first term)."""
        for host in self.hosts:
            host.start()
        wait_until(lambda: len(self.ticks()) >= 6, timeout=60, message="ticks")
        leading = [h for h in self.hosts if self.scheduler_here(h) is True]
        assert len(leading) == 1
        survivor = next(h for h in self.hosts if h not in leading)
        assert self.scheduler_here(survivor) is False
        (first,) = journal_terms(self.path)
        assert parent_of(first.pid) == leading[0].pid
        return leading[0], survivor, first

    def kill_leading_master(self, leading: "Gunicorn", survivor: "Gunicorn", first: journal.Term) -> None:
        """SIGKILL the leading master: its scheduler dies with it, the other master's takes over."""
        before = len(self.ticks())
        leading.signal(signal.SIGKILL)
        wait_until(lambda: process_gone(first.pid), timeout=10, message="the scheduler died with its master")
        wait_until(lambda: len([t for t in self.ticks() if t["token"] != first.token]) >= 6, timeout=60,
                   message="ticks from the other master")
        assert len(self.ticks()) > before
        wait_until(lambda: self.scheduler_here(survivor) is True, message="the survivor's workers see the scheduler")

    def cleanup(self) -> None:
        for host in self.hosts:
            host.cleanup()

    def assert_one_grid_of_ticks(self) -> None:
        """No overlap, two terms, and every tick ran once: no scheduled time twice, none skipped
        from the first to the last, across the failover too (the new scheduler caught up)."""
        report = journal.check(self.path)
        assert report.ok, report.summary()
        assert len(report.terms) == 2
        all_ticks = sorted(t["tick"] for t in self.ticks())
        assert len(all_ticks) == len(set(all_ticks))
        gaps = {round(b - a, 3) for a, b in zip(all_ticks, all_ticks[1:])}
        assert gaps == {self.tick}, gaps
        late = [t for t in self.ticks() if t.get("late")]
        print(f"{len(late)} ticks caught up after the failover")
