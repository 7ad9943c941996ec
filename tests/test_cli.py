"""The command line, end to end: real `crown-sync` processes on the real file oracle.

Every test runs the console script (when installed next to this Python, as under tox) or
``python -m crown_sync`` in subprocesses, against a file oracle in the test's temp dir. Safety is
judged from the journal the command itself writes (``python -m crown_sync.testing.journal``),
never from the oracle's word.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from crown_sync.testing import journal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "crown-sync")
#: The installed console script when there is one (tox), else the module: same code either way.
CLI = [_SCRIPT] if os.access(_SCRIPT, os.X_OK) else [PY, "-m", "crown_sync"]
WAIT = 30.0  # generous bound against hangs on a loaded machine; never a speed assertion

pytestmark = pytest.mark.timeout(180)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    env.pop("CROWN_SYNC_ORACLE", None)
    return env


def cli(*args, timeout=60, env=None):
    return subprocess.run(
        CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
        env=env or _env(), cwd=REPO,
    )


def journal_command(path, interval=0.01):
    return [PY, "-m", "crown_sync.testing.journal", str(path), str(interval)]


class Run:
    """A background `crown-sync run` process, stopped by pid at the end of the test."""

    def __init__(self, tmp_path, name, url, command, identity, *options):
        self.identity = identity
        self.stderr_path = tmp_path / f"{identity}.stderr"
        self.stdout_path = tmp_path / f"{identity}.stdout"
        argv = CLI + ["run", name, "--oracle", url, "--identity", identity, "-v", *options, "--"]
        argv += [str(c) for c in command]
        with open(self.stderr_path, "wb") as err, open(self.stdout_path, "wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=err, env=_env(), cwd=REPO)

    @property
    def pid(self):
        return self.process.pid

    def stderr(self):
        return self.stderr_path.read_text(errors="replace")

    def signal(self, signum):
        os.kill(self.process.pid, signum)

    def wait(self, timeout=WAIT):
        return self.process.wait(timeout)

    def cleanup(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def runs():
    started = []
    yield started
    for run in started:
        run.cleanup()


@pytest.fixture
def url(tmp_path):
    return "file://" + str(tmp_path / "oracle")


def start_run(runs, tmp_path, name, url, command, identity, *options):
    run = Run(tmp_path, name, url, command, identity, *options)
    runs.append(run)
    return run


def leading_and_following(runs, tmp_path, url, path):
    """Run "A" (its command journals to ``path``) until its command runs, then "B" until it
    finds A leading; returns both runs."""
    first = start_run(runs, tmp_path, "job", url, journal_command(path), "A")
    wait_until(lambda: started(path, "A"), "A's command to start")
    second = start_run(runs, tmp_path, "job", url, journal_command(path), "B")
    wait_until(lambda: "crown.leadership.rejected" in second.stderr(), "B to find A leading")
    return first, second


def wait_until(predicate, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def terms(path):
    if not os.path.exists(path):
        return []
    return journal.check(str(path)).terms


def term_of(path, identity):
    return [t for t in terms(path) if t.identity == identity]


def started(path, identity, count=1):
    return len(term_of(path, identity)) >= count


# ------------------------------------------------------------------------------------ run


def test_command_exit_code_is_run_exit_code_and_another_can_lead_after(url):
    first = cli("run", "job", "--oracle", url, "--",
                PY, "-c", "import os, sys; print(os.environ['CROWN_SYNC_TOKEN']); sys.exit(3)")
    assert first.returncode == 3, first.stderr
    # crown-sync prints nothing of its own on stdout: only the command's output goes through.
    first_token = int(first.stdout.strip())

    # It abdicated on the way out: nobody leads, and the next contender leads at once.
    gone = cli("status", "job", "--oracle", url)
    assert gone.returncode == 1, gone.stdout + gone.stderr
    second = cli("run", "job", "--oracle", url, "--",
                 PY, "-c", "import os; print('second', os.environ['CROWN_SYNC_NAME'], os.environ['CROWN_SYNC_TOKEN'])")
    assert second.returncode == 0, second.stderr
    word, name, token = second.stdout.split()
    assert (word, name) == ("second", "job")
    assert int(token) > first_token


def test_command_killed_by_signal_gives_128_plus_n(url):
    result = cli("run", "job", "--oracle", url, "--",
                 PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert result.returncode == 128 + signal.SIGKILL, result.stderr


def test_command_not_found_is_127(url):
    result = cli("run", "job", "--oracle", url, "--", "no-such-command-crown-sync-test")
    assert result.returncode == 127
    assert "command not found" in result.stderr


def test_two_runs_take_turns_and_sigterm_stops_the_command(tmp_path, url, runs):
    path = tmp_path / "journal.jsonl"
    first, second = leading_and_following(runs, tmp_path, url, path)

    status = json.loads(cli("status", "job", "--oracle", url, "--json").stdout)
    assert status["leader"]["identity"] == "A"

    first.signal(signal.SIGTERM)
    assert first.wait() == -signal.SIGTERM  # died of the signal, as timeout(1) does: shell says 143
    wait_until(lambda: started(path, "B"), "B to take over")
    time.sleep(0.3)  # let B's command beat a few times
    second.signal(signal.SIGTERM)
    assert second.wait() == -signal.SIGTERM

    report = journal.check(str(path))
    assert report.ok, report.summary()
    assert [t.identity for t in report.terms] == ["A", "B"], report.summary()
    # Both commands were stopped by SIGTERM and wrote their own "stop" line.
    assert all(t.stopped for t in report.terms), report.summary()
    assert report.terms[1].token > report.terms[0].token


def test_sigkill_of_the_leading_run_kills_its_command_and_the_follower_takes_over(tmp_path, url, runs):
    path = tmp_path / "journal.jsonl"
    first, second = leading_and_following(runs, tmp_path, url, path)
    first.signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    wait_until(lambda: started(path, "B"), "B to take over")
    time.sleep(0.3)
    second.signal(signal.SIGTERM)
    assert second.wait() == -signal.SIGTERM
    report = journal.check(str(path))
    # A's command died with its crown (no "stop" line) before B's command started.
    assert report.ok, report.summary()
    assert [(t.identity, t.stopped) for t in report.terms] == [("A", False), ("B", True)]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_sigint_and_sighup_stop_the_command_and_abdicate(tmp_path, url, runs, signum):
    path = tmp_path / "journal.jsonl"
    run = start_run(runs, tmp_path, "job", url, journal_command(path), "A")
    wait_until(lambda: started(path, "A"), "the command to start")
    run.signal(signum)
    assert run.wait() == -signum
    report = journal.check(str(path))
    assert report.ok and len(report.terms) == 1 and report.terms[0].stopped, report.summary()
    assert cli("status", "job", "--oracle", url).returncode == 1  # abdicated


def test_a_run_with_a_higher_priority_takes_over_gracefully(tmp_path, url, runs):
    path = tmp_path / "journal.jsonl"
    low = start_run(runs, tmp_path, "job", url, journal_command(path), "low", "--priority", "1")
    wait_until(lambda: started(path, "low"), "low's command to start")
    high = start_run(runs, tmp_path, "job", url, journal_command(path), "high", "--priority", "5",
                     "--strategy", "priority")
    # The higher priority joins while low leads: low's command is stopped, then high's starts.
    wait_until(lambda: started(path, "high"), "high to take over")
    time.sleep(0.3)
    for run in (high, low):
        run.signal(signal.SIGTERM)
        assert run.wait() == -signal.SIGTERM
    report = journal.check(str(path))
    assert report.ok, report.summary()
    assert [(t.identity, t.stopped) for t in report.terms][:2] == [("low", True), ("high", True)], report.summary()


def test_restart_keeps_leading_and_restarts_the_command(tmp_path, url, runs):
    lines = tmp_path / "lines"
    command = [PY, "-c", f"import os; open({str(lines)!r}, 'a').write(os.environ['CROWN_SYNC_TOKEN'] + '\\n')"]
    run = start_run(runs, tmp_path, "job", url, command, "A", "--restart", "--restart-delay", "0.05")

    def count():
        return lines.exists() and len(lines.read_text().split()) >= 3

    wait_until(count, "the command to run three times")
    assert run.process.poll() is None  # still running: --restart
    run.signal(signal.SIGTERM)
    assert run.wait() == -signal.SIGTERM
    tokens = lines.read_text().split()
    # Restarted in place: the same term, so the same fencing token every time.
    assert len(set(tokens)) == 1, tokens
    assert "crown.child.exited" in run.stderr()


def _lead_with_a(runs, tmp_path, url, path):
    """A `run` that leads "job" with a journaling command, once its command has started."""
    leader = start_run(runs, tmp_path, "job", url, journal_command(path), "A")
    wait_until(lambda: started(path, "A"), "A's command to start")
    return leader


@pytest.mark.parametrize("option", [["--no-wait"], ["--wait-timeout", "1"]])
def test_giving_up_while_another_leads_exits_124_and_never_runs_the_command(tmp_path, url, runs, option):
    path = tmp_path / "journal.jsonl"
    leader = _lead_with_a(runs, tmp_path, url, path)
    marker = tmp_path / "ran"
    result = cli("run", "job", "--oracle", url, *option, "--",
                 PY, "-c", f"open({str(marker)!r}, 'w').close()")
    assert result.returncode == 124, result.stdout + result.stderr
    assert "giving up" in result.stderr
    assert not marker.exists()  # the command never started
    # The leader was not disturbed: still one term, still running.
    assert leader.process.poll() is None
    report = journal.check(str(path))
    assert report.ok and [t.identity for t in report.terms] == ["A"], report.summary()


def test_wait_timeout_waits_for_the_leader_to_go_then_runs_the_command(tmp_path, url, runs):
    path = tmp_path / "journal.jsonl"
    leader = _lead_with_a(runs, tmp_path, url, path)
    waiter = start_run(runs, tmp_path, "job", url, journal_command(path), "B", "--wait-timeout", "60")
    wait_until(lambda: "crown.leadership.rejected" in waiter.stderr(), "B to find A leading")
    leader.signal(signal.SIGTERM)
    wait_until(lambda: started(path, "B"), "B to take over within its wait timeout")
    waiter.signal(signal.SIGTERM)
    assert waiter.wait() == -signal.SIGTERM
    report = journal.check(str(path))
    assert report.ok and [t.identity for t in report.terms] == ["A", "B"], report.summary()


def test_no_wait_with_nobody_leading_runs_the_command(url):
    result = cli("run", "job", "--oracle", url, "--no-wait", "--", PY, "-c", "raise SystemExit(7)")
    assert result.returncode == 7, result.stderr


def test_an_unreachable_oracle_is_said_once_on_stderr_and_its_return_too(tmp_path):
    from crown_sync.testing.memcached_server import MemcachedServer

    server = MemcachedServer(memory_mb=8)  # a free port, with nothing listening on it yet
    lines = tmp_path / "lines"
    command = [PY, "-c", f"open({str(lines)!r}, 'a').write('ran\\n')"]
    url = server.url
    try:
        # No -v: the messages must come without it.
        argv = CLI + ["run", "job", "--oracle", url, "--wait-timeout", "60", "--"] + command
        with open(tmp_path / "stderr", "wb") as err:
            process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=_env(), cwd=REPO)
        try:
            stderr = lambda: (tmp_path / "stderr").read_text()  # noqa: E731
            wait_until(lambda: "failed, retrying" in stderr(), "the oracle's failure on stderr")
            time.sleep(1.0)  # several more failed attempts: still one line
            server.start()
            assert process.wait(WAIT) == 0, stderr()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    finally:
        server.stop()
    text = stderr()
    assert text.count("failed, retrying") == 1, text
    assert text.count("answers again") == 1, text
    assert lines.read_text() == "ran\n"


def test_waiting_message_on_a_terminal(tmp_path, url, runs):
    import pty

    path = tmp_path / "journal.jsonl"
    _lead_with_a(runs, tmp_path, url, path)
    master, slave = pty.openpty()
    argv = CLI + ["run", "job", "--oracle", url, "--identity", "B", "--no-wait", "--", "true"]
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=slave, env=_env(), cwd=REPO)
        os.close(slave)
        assert process.wait(WAIT) == 124
        output = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(master)
    assert b"job is led by A" in output, output


# --------------------------------------------------------------------------------- status


def test_status_text_and_json_with_and_without_leader(tmp_path, url, runs):
    none_text = cli("status", "job", "--oracle", url)
    assert none_text.returncode == 1
    assert none_text.stdout.strip() == "no leader for job"
    none_json = cli("status", "job", "--oracle", url, "--json")
    assert none_json.returncode == 1
    document = json.loads(none_json.stdout)
    assert document["leader"] is None and document["name"] == "job"

    path = tmp_path / "journal.jsonl"
    run = start_run(runs, tmp_path, "job", url, journal_command(path), "web-1",
                    "-m", "role=cron", "--metadata", "url=http://web-1:8000/")
    wait_until(lambda: started(path, "web-1"), "the command to start")
    token = term_of(path, "web-1")[0].token

    text = cli("status", "job", "--oracle", url)
    assert text.returncode == 0, text.stderr
    assert "web-1" in text.stdout
    assert f"token     {token}" in text.stdout
    assert "role" in text.stdout and "ago" in text.stdout

    as_json = cli("status", "job", "--oracle", url, "--json")
    assert as_json.returncode == 0
    leader = json.loads(as_json.stdout)["leader"]
    assert leader["identity"] == "web-1"
    assert leader["token"] == token
    assert leader["metadata"] == {"role": "cron", "url": "http://web-1:8000/"}
    assert leader["age"] >= 0 and leader["since_iso"]

    run.signal(signal.SIGTERM)
    run.wait()
    assert cli("status", "job", "--oracle", url).returncode == 1


# ----------------------------------------------------------------------------------- list


def test_list_text_and_json_show_each_election_and_its_leader(tmp_path, url, runs):
    assert cli("list", "--oracle", url).stdout.strip() == f"no elections on {url}"
    path = tmp_path / "journal.jsonl"
    old = start_run(runs, tmp_path, "old-job", url, journal_command(path), "web-0")
    wait_until(lambda: started(path, "web-0"), "the first command to start")
    old.signal(signal.SIGTERM)
    old.wait()
    start_run(runs, tmp_path, "job", url, journal_command(path), "web-1", "-m", "role=cron")
    wait_until(lambda: started(path, "web-1"), "the command to start")
    token = term_of(path, "web-1")[0].token

    text = cli("list", "--oracle", url)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["NAME", "LEADER", "TOKEN", "SINCE", "CONTENDERS", "METADATA"]
    assert lines[1].split()[:3] == ["job", "web-1", str(token)] and '"role": "cron"' in lines[1]
    assert lines[2].split() == ["old-job", "-", "-", "-", "?", "-"]  # nobody leads it now

    as_json = cli("list", "--oracle", url, "--json")
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    assert [entry["name"] for entry in document["elections"]] == ["job", "old-job"]
    job, old_job = document["elections"]
    assert job["leader"]["identity"] == "web-1" and job["leader"]["token"] == token
    assert job["leader"]["metadata"] == {"role": "cron"} and job["contenders"] is None
    assert old_job["leader"] is None


def test_list_on_an_unreachable_oracle_exits_3_without_the_password():
    result = cli("list", "--oracle", "postgresql://admin:hunter2@127.0.0.1:1/db", "--json")
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert "cannot list the elections" in result.stderr and "Traceback" not in result.stderr
    assert "hunter2" not in result.stdout + result.stderr


# -------------------------------------------------------------------------------- dismiss


def test_dismiss_makes_the_leader_step_down(tmp_path, url, runs):
    assert cli("dismiss", "job", "--oracle", url).returncode == 1  # nobody to dismiss

    path = tmp_path / "journal.jsonl"
    first, second = leading_and_following(runs, tmp_path, url, path)

    result = cli("dismiss", "job", "--oracle", url)
    assert result.returncode == 0, result.stderr
    assert "dismissed A" in result.stdout

    # A's command is stopped, and B (A yields for a moment) leads with a higher token.
    wait_until(lambda: term_of(path, "A")[0].stopped, "A's command to stop")
    wait_until(lambda: len(terms(path)) >= 2, "a new term after the dismissal")
    assert terms(path)[1].identity == "B"
    assert first.process.poll() is None and second.process.poll() is None  # both contend on
    time.sleep(0.3)
    for run in (first, second):
        run.signal(signal.SIGTERM)
        run.wait()
    report = journal.check(str(path))
    assert report.ok, report.summary()
    assert report.terms[0].identity == "A" and report.terms[0].stopped
    assert len(report.terms) >= 2


def test_dismiss_json(tmp_path, url, runs):
    none = cli("dismiss", "job", "--oracle", url, "--json")
    assert none.returncode == 1
    assert json.loads(none.stdout) == {"name": "job", "oracle": json.loads(none.stdout)["oracle"],
                                       "dismissed": None}
    path = tmp_path / "journal.jsonl"
    _lead_with_a(runs, tmp_path, url, path)
    token = term_of(path, "A")[0].token
    result = cli("dismiss", "job", "--oracle", url, "--json")
    assert result.returncode == 0, result.stderr
    dismissed = json.loads(result.stdout)["dismissed"]
    assert (dismissed["identity"], dismissed["token"]) == ("A", token)
    wait_until(lambda: term_of(path, "A")[0].stopped, "A's command to stop")


# ------------------------------------------------------------------------------ bad input


def test_unknown_scheme_is_a_usage_error_without_the_password():
    result = cli("status", "job", "--oracle", "zz://admin:hunter2@db.example/")
    assert result.returncode == 2
    assert "unknown oracle URL scheme" in result.stderr
    assert "file://" in result.stderr and "postgresql://" in result.stderr  # names the accepted ones
    assert "hunter2" not in result.stderr + result.stdout


@pytest.mark.parametrize("oracle, code", [
    ("file://admin:hunter2@somehost/tmp/x", 2),  # the file oracle's own error quotes the netloc
    ("file:///tmp/x?password=hunter2", 2),  # unknown option
    ("postgresql://admin:hunter2@127.0.0.1:1/db", 3),  # nothing listens on port 1: oracle error
])
def test_errors_never_show_the_password(oracle, code):
    for args in (["status", "job"], ["dismiss", "job"]):
        result = cli(*args, "--oracle", oracle)
        assert result.returncode == code, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        assert "hunter2" not in result.stdout + result.stderr, result.stderr


def test_run_against_an_unreachable_oracle_says_so_without_the_password():
    result = cli("run", "job", "--oracle", "postgresql://admin:hunter2@127.0.0.1:1/db",
                 "--wait-timeout", "1", "--", "true")
    assert result.returncode == 124, result.stderr
    assert result.stderr.count("failed, retrying") == 1, result.stderr
    assert "hunter2" not in result.stdout + result.stderr


def test_bad_input_exit_code_2(tmp_path, url):
    cases = [
        ["run", "job", "--oracle", "nope://x", "--", "true"],
        ["run", "bad name!", "--oracle", url, "--", "true"],
        ["status", "x" * 129, "--oracle", url],
        ["run", "job", "--oracle", url],  # no command
        ["run", "job", "--oracle", url, "--grace", "-1", "--", "true"],
        ["run", "job", "--oracle", url, "--metadata", "novalue", "--", "true"],
        ["run", "job", "--oracle", url, "--priority", "high", "--", "true"],
        ["run", "job", "--oracle", url, "--strategy", "loudest", "--", "true"],
        ["run", "job", "--oracle", url, "--priority", "3", "--strategy", "first", "--", "true"],
        ["status", "job", "--oracle", url + "?no_such_option=1"],
        ["dismiss", "job", "--oracle", "memcache://localhost"],
        ["demo", "--contenders", "1"],
        ["no-such-command"],
    ]
    for args in cases:
        result = cli(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, (args, result.stderr)
    env = _env()
    env["CROWN_SYNC_ORACLE"] = "gopher://x"
    result = cli("status", "job", env=env)
    assert result.returncode == 2 and "CROWN_SYNC_ORACLE" in result.stderr


def test_help_version_and_entry_point():
    assert cli("--help").returncode == 0
    for command in ("run", "status", "dismiss", "demo"):
        result = cli(command, "--help")
        assert result.returncode == 0 and "Usage" in result.stdout
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("crown-sync ")
    module = subprocess.run([PY, "-m", "crown_sync", "--help"], capture_output=True, text=True,
                            env=_env(), cwd=REPO, timeout=60)
    assert module.returncode == 0 and "demo" in module.stdout
    with open(os.path.join(REPO, "setup.cfg"), encoding="utf-8") as handle:
        assert "crown-sync = crown_sync.cli:main" in handle.read()


@pytest.mark.parametrize("command, code", [(["status", "job"], 3), (["run", "job", "--", "true"], 125)])
def test_a_default_directory_that_cannot_be_made_is_said_at_once(command, code):
    """A service account whose home can't hold the default file oracle's directory: one line on
    stderr saying what to set and the oracle-unusable exit code (run: 125, as env(1), since 3
    could be the command's own), never a traceback or a silent retry loop."""
    env = _env()
    for name in ("STATE_DIRECTORY", "XDG_STATE_HOME"):
        env.pop(name, None)
    env["HOME"] = "/proc/1/no-home"
    result = cli(*command, env=env)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert "/proc/1/no-home/.local/state/crown_sync" in result.stderr
    assert "CROWN_SYNC_ORACLE" in result.stderr and "STATE_DIRECTORY" in result.stderr
