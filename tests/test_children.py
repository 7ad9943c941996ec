"""Children with real threads and processes: stop order, grace, deadlines, parent death.

No mocks. Timing bounds are generous upper limits against hangs; the only tight bound is the
safety one (no journal line after a deadline, allowing a few milliseconds of scheduling delay).
"""

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from crown_sync import clock
from crown_sync.children import CommandChild, ProcessChild, ThreadChild, as_child
from crown_sync.children.process import DEFAULT_START_METHOD
from crown_sync.terms import Term
from crown_sync.testing import journal

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A journal line may be stamped just before the kill lands: allow this much past a deadline.
PROCESS_SLACK = 0.010  # the kernel timer kills on time; this covers the last write in flight
COMMAND_SLACK = 0.025  # the supervisor must be scheduled to act


def make_term(deadline_in=None, token=7, name="kids", fds=()):
    deadline = None if deadline_in is None else clock.monotonic() + deadline_in
    return Term(name, "me@test", token, deadline, fds=fds)


def wait_for(predicate, timeout=10.0, interval=0.01):
    end = clock.monotonic() + timeout
    while clock.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class Exits:
    """An on_exit callback that records every call."""

    def __init__(self):
        self.calls = []
        self._lock = threading.Lock()

    def __call__(self, running):
        with self._lock:
            self.calls.append((running, running.exitcode, threading.current_thread().name))

    def wait(self, count=1, timeout=15.0):
        assert wait_for(lambda: len(self.calls) >= count, timeout), self.calls
        time.sleep(0.05)  # a second call would show up now
        return self.calls


def gone(pid):
    """True once pid is not running: no such process, or a zombie nobody reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            data = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return data.rsplit(")", 1)[1].split()[0] in ("Z", "X")


# ------------------------------------------------------------------------------------------
# Targets (module level so that "spawn" can pickle them)


def wait_for_stop(term, box=None):
    if box is not None:
        box["thread"] = threading.current_thread().name
        box["term"] = term
    term.stop_event.wait()


def raises(term):
    raise RuntimeError("boom in child")


def stubborn_thread(term, release):
    release.wait(30)


def ignores_sigterm(info, ready_path):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(ready_path, "w") as handle:
        handle.write(str(os.getpid()))
    while True:
        time.sleep(0.05)


def process_raises(info):
    raise ValueError("boom in process")


def record_info(info, path):
    with open(path, "w") as handle:
        json.dump({"name": info.name, "token": info.token, "identity": info.identity,
                   "type": type(info).__name__}, handle)
    while True:
        time.sleep(0.05)


def journal_then_hog_gil(info, path, go):
    j = journal.Journal(path)
    j.write("start", info.name, info.identity, info.token)
    while not os.path.exists(go):  # the test moves the deadline close first (see the test)
        time.sleep(0.01)
    # One C call that never releases the GIL: the watchdog thread cannot run, the kernel timer
    # must kill us.
    sum(range(10 ** 12))
    j.write("beat", info.name, info.identity, info.token)


def touch(info, path):
    open(path, "w").close()


def record_is_leader(info, path):
    import crown_sync

    with open(path + ".tmp", "w") as handle:
        json.dump([crown_sync.is_leader(info.name), crown_sync.is_leader("another")], handle)
    os.rename(path + ".tmp", path)
    while True:
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------
# Construction and as_child


def test_as_child():
    assert as_child(None) is None
    child = ProcessChild(touch)
    assert as_child(child) is child
    wrapped = as_child(wait_for_stop)
    assert isinstance(wrapped, ThreadChild) and wrapped.target is wait_for_stop
    with pytest.raises(TypeError, match="follower_child"):
        as_child(42, argument="follower_child")
    with pytest.raises(TypeError, match="child"):
        as_child("echo hi")
    with pytest.raises(TypeError, match="child"):
        as_child(ThreadChild)


@pytest.mark.parametrize(
    "make, error, word",
    [
        (lambda: ThreadChild(42), TypeError, "target"),
        (lambda: ThreadChild(touch, args=5), TypeError, "args"),
        (lambda: ThreadChild(touch, kwargs=[1]), TypeError, "kwargs"),
        (lambda: ThreadChild(touch, grace=-1), ValueError, "grace"),
        (lambda: ThreadChild(touch, grace="1"), TypeError, "grace"),
        (lambda: ThreadChild(touch, grace=True), TypeError, "grace"),
        (lambda: ProcessChild(touch, grace=float("inf")), ValueError, "grace"),
        (lambda: ProcessChild(touch, start_method="teleport"), ValueError, "start_method"),
        (lambda: ProcessChild(touch, start_method=1), TypeError, "start_method"),
        (lambda: ProcessChild(lambda info: None, start_method="spawn"), TypeError, "picklable"),
        (lambda: CommandChild("echo hi"), TypeError, "argv"),
        (lambda: CommandChild([]), ValueError, "argv"),
        (lambda: CommandChild(["echo", 1]), TypeError, "argv"),
        (lambda: CommandChild([""]), ValueError, "argv"),
        (lambda: CommandChild(["true"], grace=-0.5), ValueError, "grace"),
        (lambda: CommandChild(["true"], env=["A=1"]), TypeError, "env"),
        (lambda: CommandChild(["true"], env={"A": 1}), TypeError, "env"),
        (lambda: CommandChild(["true"], env={"A=B": "1"}), ValueError, "env"),
    ],
)
def test_bad_arguments_name_the_argument(make, error, word):
    with pytest.raises(error, match=word):
        make()


def test_process_child_default_start_method():
    """spawn on Python 3.12+ (fork from a process with threads is deprecated there), fork before;
    a target that spawn cannot pickle is refused at construction, with the way out."""
    assert DEFAULT_START_METHOD == ("spawn" if sys.version_info >= (3, 12) else "fork")
    assert ProcessChild(touch).start_method == DEFAULT_START_METHOD
    assert ProcessChild(touch, start_method=None).start_method == DEFAULT_START_METHOD
    if DEFAULT_START_METHOD == "fork":
        assert ProcessChild(lambda info: None).start_method == "fork"
    else:
        expected = "start_method='spawn' \\(the default on this Python\\).*module level"
        with pytest.raises(TypeError, match=expected):
            ProcessChild(lambda info: None)
    assert ProcessChild(lambda info: None, start_method="fork").start_method == "fork"


# ------------------------------------------------------------------------------------------
# Thread children


def test_thread_child_stops_when_term_ends():
    term, exits, box = make_term(60), Exits(), {}
    running = ThreadChild(wait_for_stop, kwargs={"box": box}).start(term, exits)
    assert wait_for(lambda: "thread" in box)
    assert box["thread"] == "crown-sync-child:kids"
    assert box["term"] is term
    assert running.alive() and running.exitcode is None and running.pid is None
    running.stop()
    assert not running.alive() and running.exitcode == 0
    assert term.stop_event.is_set()
    calls = exits.wait()
    assert len(calls) == 1 and calls[0][1] == 0 and calls[0][2] == "crown-sync-child:kids"
    running.stop()  # idempotent
    assert len(exits.calls) == 1


def test_thread_child_exception_is_logged_and_exit_code_1(caplog):
    exits = Exits()
    with caplog.at_level(logging.ERROR, logger="crown_sync.children"):
        running = ThreadChild(raises).start(make_term(60), exits)
        calls = exits.wait()
    assert running.exitcode == 1 and calls[0][1] == 1 and len(calls) == 1
    records = [r for r in caplog.records if r.name == "crown_sync.children" and r.exc_info]
    assert records and "boom in child" in str(records[0].exc_info[1])


def test_thread_child_that_ignores_stop_is_left_running_with_a_warning(caplog):
    release, exits = threading.Event(), Exits()
    running = ThreadChild(stubborn_thread, args=(release,), grace=0.2).start(make_term(60), exits)
    with caplog.at_level(logging.WARNING, logger="crown_sync.children"):
        running.stop()
    assert running.alive()  # a thread cannot be killed
    assert any("cannot be killed" in r.getMessage() for r in caplog.records)
    assert exits.calls == []
    release.set()
    calls = exits.wait()
    assert len(calls) == 1 and running.exitcode == 0


def test_thread_child_deadline_reads_as_stop():
    term, exits = make_term(0.2), Exits()
    running = ThreadChild(wait_for_stop).start(term, exits)
    exits.wait()  # the stop_event reads as set at the deadline, nobody called stop()
    assert running.exitcode == 0 and len(exits.calls) == 1


# ------------------------------------------------------------------------------------------
# Process children


def test_process_child_gets_term_info_and_stops_on_sigterm(tmp_path):
    path, exits = str(tmp_path / "journal"), Exits()
    running = ProcessChild(journal.journaled_process, args=(path, 0.005)).start(make_term(60), exits)
    assert wait_for(lambda: os.path.exists(path) and len(journal.read(path)) > 3)
    assert running.alive() and running.pid > 0 and running.exitcode is None
    running.stop()
    assert not running.alive() and running.exitcode == 0
    events = journal.read(path)
    assert events[0]["ev"] == "start" and events[-1]["ev"] == "stop"
    assert {(e["name"], e["id"], e["token"], e["pid"]) for e in events} == {
        ("kids", "me@test", 7, running.pid)
    }
    assert len(exits.wait()) == 1
    assert gone(running.pid)


def test_process_child_sigkill_after_grace(tmp_path, caplog):
    ready, exits = str(tmp_path / "ready"), Exits()
    running = ProcessChild(ignores_sigterm, args=(ready,), grace=0.5).start(make_term(60), exits)
    assert wait_for(lambda: os.path.exists(ready) and os.path.getsize(ready) > 0)
    started = clock.monotonic()
    with caplog.at_level(logging.WARNING, logger="crown_sync.children"):
        running.stop()
    waited = clock.monotonic() - started
    assert running.exitcode == -signal.SIGKILL
    assert waited >= 0.5  # it really gave the process its grace before SIGKILL
    assert gone(running.pid)
    assert any("SIGKILL" in r.getMessage() for r in caplog.records)
    assert len(exits.wait()) == 1


def test_process_child_kill_is_immediate(tmp_path):
    ready, exits = str(tmp_path / "ready"), Exits()
    running = ProcessChild(ignores_sigterm, args=(ready,), grace=30).start(make_term(60), exits)
    assert wait_for(lambda: os.path.exists(ready) and os.path.getsize(ready) > 0)
    running.kill()
    assert running.wait(10) and running.exitcode == -signal.SIGKILL
    running.stop()  # after kill: returns at once, no second on_exit
    assert len(exits.wait()) == 1


def test_process_child_exception_gives_exit_code_1():
    exits = Exits()
    running = ProcessChild(process_raises).start(make_term(60), exits)
    assert exits.wait()[0][1] == 1 and running.exitcode == 1


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("leading", [True, False])
def test_is_leader_in_a_process_child_answers_for_its_term(tmp_path, method, leading):
    path, exits = str(tmp_path / "answers.json"), Exits()
    term = Term("kids", "me@test", 7, clock.monotonic() + 60, leading=leading)
    running = ProcessChild(record_is_leader, args=(path,), start_method=method).start(term, exits)
    try:
        assert wait_for(lambda: os.path.exists(path), 30)
        with open(path) as handle:
            assert json.load(handle) == [leading, False]
    finally:
        running.kill()
        exits.wait()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_process_child_inherits_term_fds(tmp_path, method):
    lock_path = tmp_path / "lock"
    lock_path.write_text("")
    fd = os.open(str(lock_path), os.O_RDWR | os.O_CLOEXEC)
    try:
        info_path, exits = str(tmp_path / "info.json"), Exits()
        child = ProcessChild(record_info, args=(info_path,), start_method=method)
        running = child.start(make_term(60, fds=(fd,)), exits)
        assert wait_for(lambda: os.path.exists(info_path) and os.path.getsize(info_path) > 0, 30)
        with open(info_path) as handle:
            info = json.load(handle)
        assert info == {"name": "kids", "token": 7, "identity": "me@test", "type": "TermInfo"}
        targets = set()
        for entry in os.listdir(f"/proc/{running.pid}/fd"):
            try:
                targets.add(os.readlink(f"/proc/{running.pid}/fd/{entry}"))
            except OSError:
                pass
        assert str(lock_path) in targets
        running.stop()
        assert running.exitcode == -signal.SIGTERM
        assert len(exits.wait()) == 1
    finally:
        os.close(fd)


CROWN_SCRIPT = textwrap.dedent(
    """
    import logging, os, sys, time
    import crown_sync

    def work(info, path):
        with open(path + ".tmp", "w") as handle:
            handle.write(str(info.token))
        os.rename(path + ".tmp", path)
        time.sleep(60)

    if __name__ == "__main__":  # a spawned child imports this module again: the crown runs here only
        logging.basicConfig(level=logging.WARNING)
        directory, path = sys.argv[1:3]
        child = crown_sync.ProcessChild(work, args=(path,), grace=1)
        crown = crown_sync.Crown("threaded", oracle="file://" + directory, child=child)
        crown.start()
        end = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < end:
            time.sleep(0.02)
        if not os.path.exists(path):
            print("no child ran:", crown.status(), file=sys.stderr)
        crown.stop()
        print(child.start_method)
    """
)


def test_process_child_of_a_threaded_crown_starts_without_a_deprecation_warning(tmp_path):
    """A crown's process always has threads, and Python 3.12+ deprecates fork() there (a
    DeprecationWarning; a lock another thread held at the fork stays held in the child): the
    default start method must not fork it. With warnings as errors, the child of a real crown
    must still run and nothing may warn. (Below Python 3.12 the default is fork, which is silent
    there: the test then checks that the child ran.) "-W always", not "-W error": Python 3.13
    drops the error that the fork's warning would raise, and nothing would show."""
    script = tmp_path / "crowned.py"
    script.write_text(CROWN_SCRIPT)
    out = tmp_path / "ran"
    (tmp_path / "crowns").mkdir(mode=0o700)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-W", "always::DeprecationWarning", str(script), str(tmp_path / "crowns"), str(out)],
        env=env, capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stderr
    assert "DeprecationWarning" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert out.exists() and out.read_text().isdigit(), result.stderr  # the target ran, with the term's token
    expected = "spawn" if sys.version_info >= (3, 12) else "fork"
    assert result.stdout.split() == [expected]


def test_process_child_with_deadline_in_the_past_never_runs(tmp_path):
    path, exits = str(tmp_path / "ran"), Exits()
    running = ProcessChild(touch, args=(path,)).start(make_term(-1.0), exits)
    assert exits.wait()[0][1] == -signal.SIGKILL
    assert running.exitcode == -signal.SIGKILL
    assert not os.path.exists(path)


def pull_in_deadline_once_working(term, running, path, lines=10, deadline_in=0.2):
    """Keep a far deadline until the child has journaled some work, then move it close."""
    assert wait_for(lambda: os.path.exists(path) and len(journal.read(path)) >= lines, 30)
    deadline = clock.monotonic() + deadline_in
    term.extend(deadline)
    running.extend(deadline)
    return deadline


def test_process_child_killed_at_deadline(tmp_path):
    path, exits = str(tmp_path / "journal"), Exits()
    term = make_term(60)
    running = ProcessChild(journal.journaled_process, args=(path, 0.002)).start(term, exits)
    deadline = pull_in_deadline_once_working(term, running, path)
    assert exits.wait()[0][1] == -signal.SIGKILL
    events = journal.read(path)
    assert events[-1]["ev"] == "beat"  # killed while working, not stopped politely
    assert max(e["t"] for e in events) <= deadline + PROCESS_SLACK
    assert running.exitcode == -signal.SIGKILL


def test_process_child_deadline_holds_while_target_holds_the_gil(tmp_path):
    """The deadline is moved close only once the child runs (a spawned child may take longer to
    start than a close deadline leaves), and the target holds the GIL only after the watchdog has
    had time to re-arm the kernel timer to it: then only that timer can kill it."""
    path, go, exits = str(tmp_path / "journal"), tmp_path / "go", Exits()
    term = make_term(60)
    running = ProcessChild(journal_then_hog_gil, args=(path, str(go))).start(term, exits)
    pull_in_deadline_once_working(term, running, path, lines=1, deadline_in=1.0)
    time.sleep(0.3)  # the watchdog re-reads the deadline every 50 ms
    go.touch()
    assert exits.wait(timeout=20)[0][1] == -signal.SIGKILL
    assert [e["ev"] for e in journal.read(path)] == ["start"]
    assert running.exitcode == -signal.SIGKILL


def test_process_child_extend_keeps_it_alive(tmp_path):
    path, exits = str(tmp_path / "journal"), Exits()
    term = make_term(0.3)
    first_deadline = term.deadline
    running = ProcessChild(journal.journaled_process, args=(path, 0.005)).start(term, exits)
    while clock.monotonic() < first_deadline + 0.5:
        new = clock.monotonic() + 0.3
        term.extend(new)
        running.extend(new)
        time.sleep(0.05)
    assert running.alive()
    running.extend(None)  # no deadline at all
    time.sleep(0.4)
    assert running.alive()
    running.stop()
    assert running.exitcode == 0
    assert max(e["t"] for e in journal.read(path)) > first_deadline + 0.4
    assert len(exits.wait()) == 1


# ------------------------------------------------------------------------------------------
# Command children


def run_command(argv, term=None, timeout=20, **options):
    exits = Exits()
    running = CommandChild(argv, **options).start(term or make_term(60), exits)
    calls = exits.wait(timeout=timeout)
    assert len(calls) == 1
    return running


def test_command_child_environment(tmp_path, monkeypatch):
    out = tmp_path / "env.json"
    monkeypatch.setenv("CROWN_SYNC_TEST_INHERITED", "yes")
    monkeypatch.setenv("CROWN_SYNC_TEST_REMOVED", "present")
    code = (
        "import json, os, sys; json.dump({k: v for k, v in os.environ.items() "
        "if k.startswith('CROWN_SYNC')}, open(sys.argv[1], 'w'))"
    )
    running = run_command(
        [sys.executable, "-c", code, str(out)],
        env={"CROWN_SYNC_TEST_EXTRA": "x y", "CROWN_SYNC_TEST_REMOVED": None},
    )
    assert running.exitcode == 0
    env = json.loads(out.read_text())
    # What the crown's process had (CROWN_SYNC_ORACLE, say), the child's env, the term's.
    inherited = {k: v for k, v in os.environ.items() if k.startswith("CROWN_SYNC")}
    del inherited["CROWN_SYNC_TEST_REMOVED"]
    assert env == dict(inherited, **{
        "CROWN_SYNC_NAME": "kids",
        "CROWN_SYNC_TOKEN": "7",
        "CROWN_SYNC_IDENTITY": "me@test",
        "CROWN_SYNC_TEST_INHERITED": "yes",
        "CROWN_SYNC_TEST_EXTRA": "x y",
    })
    running = run_command(
        [sys.executable, "-c", code, str(out)], term=Term("kids", "other", None, None)
    )
    assert json.loads(out.read_text())["CROWN_SYNC_TOKEN"] == ""


def test_command_child_exit_codes(tmp_path, caplog):
    assert run_command(["sh", "-c", "exit 3"]).exitcode == 3
    assert run_command(["true"]).exitcode == 0
    assert run_command(["sh", "-c", "kill -USR1 $$"]).exitcode == -signal.SIGUSR1
    with caplog.at_level(logging.ERROR, logger="crown_sync.children"):
        missing = run_command(["crown-sync-no-such-binary-xyz", "--secret-arg"])
    assert missing.exitcode == 127
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("not found" in m and "crown-sync-no-such-binary-xyz" in m for m in messages)
    assert not any("--secret-arg" in m for m in messages)
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(stat.S_IRUSR | stat.S_IWUSR)
    assert run_command([str(script)]).exitcode == 126


def test_command_child_is_reaped_when_its_descriptors_are_above_1023(fds_above_1023):
    running = run_command(["sh", "-c", "exit 5"])
    assert running.exitcode == 5 and not running.alive()


def test_command_child_stop_graceful_and_after_grace(tmp_path, caplog):
    exits = Exits()
    polite = CommandChild(["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.02; done"], grace=5)
    running = polite.start(make_term(60), exits)
    assert wait_for(lambda: running.command_pid is not None)
    time.sleep(0.2)  # let sh install its trap
    running.stop()
    assert running.exitcode == 0 and gone(running.command_pid) and gone(running.pid)
    assert len(exits.wait()) == 1

    exits = Exits()
    rude = CommandChild(["sh", "-c", "trap '' TERM; while :; do sleep 0.02; done"], grace=0.5)
    running = rude.start(make_term(60), exits)
    assert wait_for(lambda: running.command_pid is not None)
    time.sleep(0.2)
    started = clock.monotonic()
    running.stop()
    assert clock.monotonic() - started >= 0.5
    assert running.exitcode == -signal.SIGKILL
    assert gone(running.command_pid) and gone(running.pid)
    assert len(exits.wait()) == 1


def test_command_child_stop_reaches_the_whole_process_group(tmp_path):
    pidfile, exits = tmp_path / "grandchild", Exits()
    # The grandchild ignores SIGTERM: only the group SIGKILL after grace can end it.
    script = f"sh -c 'trap \"\" TERM; echo $$ > {pidfile}; exec sleep 60' & wait"
    running = CommandChild(["sh", "-c", script], grace=0.3).start(make_term(60), exits)
    assert wait_for(lambda: pidfile.exists() and pidfile.read_text().strip())
    grandchild = int(pidfile.read_text())
    assert not gone(grandchild)
    running.stop()
    assert wait_for(lambda: gone(grandchild), 5)
    assert len(exits.wait()) == 1


def test_command_child_kill_is_immediate():
    exits = Exits()
    running = CommandChild(["sh", "-c", "trap '' TERM; sleep 60"], grace=30).start(make_term(60), exits)
    assert wait_for(lambda: running.command_pid is not None)
    running.kill()
    assert running.wait(10)
    assert running.exitcode == -signal.SIGKILL
    assert wait_for(lambda: gone(running.command_pid), 5)
    assert len(exits.wait()) == 1


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_command_child_starts_while_another_thread_forks():
    """A Gunicorn master forks its workers while its crown starts the job: a fork landing inside
    start() must not leave the worker holding our pipes' write ends (start() would wait for
    that worker to exit). The forked copies here live 20 s; every start must return long before."""
    stop = threading.Event()
    copies = []

    def fork_copies():
        while not stop.is_set():
            pid = os.fork()
            if pid == 0:
                time.sleep(20)
                os._exit(0)
            copies.append(pid)
            time.sleep(0.002)

    forker = threading.Thread(target=fork_copies, daemon=True)
    forker.start()
    try:
        for _ in range(15):
            exits = Exits()
            begun = time.monotonic()
            running = CommandChild(["true"]).start(make_term(60), exits)
            assert time.monotonic() - begun < 10  # hang bound: the copies live 20 s
            assert running.wait(10) and len(exits.wait()) == 1
    finally:
        stop.set()
        forker.join()
        for pid in copies:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_command_child_starts_under_a_popen_that_forks_with_os_fork(monkeypatch):
    """gevent's Popen forks with os.fork(), which runs the at-fork handlers: under the fork-safety
    hold start() took, that fork waited for the hold itself (MAX_FORK_WAIT, 30 s)."""
    import subprocess

    real = subprocess.Popen

    class ForkingPopen(real):
        __module__ = "gevent.subprocess"

        def __init__(self, *args, **kwargs):
            pid = os.fork()  # as gevent's does, through Python's at-fork handlers
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", ForkingPopen)
    exits = Exits()
    begun = time.monotonic()
    running = CommandChild(["true"]).start(make_term(60), exits)
    assert time.monotonic() - begun < 10  # hang bound: the fork's wait for the hold is 30 s
    assert running.wait(10) and len(exits.wait()) == 1


def test_command_child_inherits_term_fds(tmp_path):
    lock_path = tmp_path / "lock"
    lock_path.write_text("")
    fd = os.open(str(lock_path), os.O_RDWR | os.O_CLOEXEC)
    out = tmp_path / "link"
    try:
        code = f"import os, sys; open(sys.argv[1], 'w').write(os.readlink('/proc/self/fd/{fd}'))"
        running = run_command([sys.executable, "-c", code, str(out)], term=make_term(60, fds=(fd,)))
    finally:
        os.close(fd)
    assert running.exitcode == 0
    assert out.read_text() == str(lock_path)


def test_command_child_with_deadline_in_the_past_never_runs(tmp_path):
    out = tmp_path / "ran"
    running = run_command(["touch", str(out)], term=make_term(-1.0))
    assert running.exitcode == -signal.SIGKILL
    assert running.command_pid is None and not out.exists()


def test_command_child_killed_at_deadline(tmp_path):
    path, exits = str(tmp_path / "journal"), Exits()
    term = make_term(60)
    argv = [sys.executable, "-m", "crown_sync.testing.journal", path, "0.002"]
    running = CommandChild(argv, env={"PYTHONPATH": ROOT}).start(term, exits)
    deadline = pull_in_deadline_once_working(term, running, path)
    assert exits.wait()[0][1] == -signal.SIGKILL
    assert running.exitcode == -signal.SIGKILL
    events = journal.read(path)
    assert events[-1]["ev"] == "beat"
    assert max(e["t"] for e in events) <= deadline + COMMAND_SLACK
    assert wait_for(lambda: gone(running.command_pid), 5)


# ------------------------------------------------------------------------------------------
# on_exit exactly once, whatever the path


def test_on_exit_exactly_once_under_concurrent_stops(tmp_path):
    ready = str(tmp_path / "ready")
    specs = [
        ThreadChild(wait_for_stop, grace=2),
        ProcessChild(ignores_sigterm, args=(ready,), grace=0.3),
        CommandChild(["sh", "-c", "trap '' TERM; sleep 60"], grace=0.3),
    ]
    for spec in specs:
        exits = Exits()
        running = spec.start(make_term(60), exits)
        time.sleep(0.3)
        stoppers = [threading.Thread(target=running.stop) for _ in range(4)]
        stoppers.append(threading.Thread(target=running.kill))
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join(30)
        assert not running.alive(), spec
        running.stop()
        running.kill()
        running.extend(clock.monotonic() + 5)  # harmless after the end
        assert len(exits.wait()) == 1, spec


def test_stop_from_inside_on_exit_does_not_hang():
    for spec in (ThreadChild(lambda term: None), ProcessChild(touch, args=(os.devnull,)),
                 CommandChild(["true"])):
        done = threading.Event()

        def on_exit(running):
            running.stop()
            done.set()

        spec.start(make_term(60), on_exit)
        assert done.wait(15), spec


# ------------------------------------------------------------------------------------------
# The crown's process dies or pauses: children must not outlive it or its deadline

PARENT_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from crown_sync import clock
    from crown_sync.terms import Term
    from crown_sync.children import CommandChild, ProcessChild, ThreadChild
    from crown_sync.testing import journal

    def main(out, lease, process_journal, command_journal, thread_journal, helper_journal, method):
        deadlines = os.open(out + ".deadlines", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

        def note(deadline):
            # Written BEFORE the children see the deadline: the file's last line bounds theirs.
            os.write(deadlines, ("%r\\n" % deadline).encode())
            return deadline

        term = Term("paused", "parent", 11, note(clock.monotonic() + lease))
        exits = []
        process = ProcessChild(journal.journaled_process, args=(process_journal, 0.002), grace=1,
                               start_method=None if method == "default" else method)
        # The command starts a helper in its own process group (a worker, as daemons do), then works.
        work = sys.executable + ' -m crown_sync.testing.journal "$1" 0.002'
        command = CommandChild(
            ["sh", "-c", work.replace("$1", "$2") + " & exec " + work, "sh", command_journal, helper_journal],
            grace=1,
        )
        thread = ThreadChild(journal.journaled_work, args=(thread_journal, 0.002), grace=1)
        running = [process.start(term, exits.append), command.start(term, exits.append),
                   thread.start(term, exits.append)]
        while running[1].command_pid is None:
            time.sleep(0.01)
        with open(out + ".tmp", "w") as handle:
            json.dump({"process": running[0].pid, "supervisor": running[1].pid,
                       "command": running[1].command_pid}, handle)
        os.rename(out + ".tmp", out)
        while True:
            deadline = note(clock.monotonic() + lease)
            term.extend(deadline)
            for child in running:
                child.extend(deadline)
            time.sleep(0.05)

    if __name__ == "__main__":  # a spawned process child imports this module again
        main(sys.argv[1], float(sys.argv[2]), *sys.argv[3:8])
    """
)


CHILD_KINDS = ("process", "command", "thread", "command's helper")
# The process child's start method that this Python does not use by default, so that the tests of
# parent death and pauses cover both fork and spawn on every Python.
OTHER_START_METHOD = "fork" if DEFAULT_START_METHOD == "spawn" else "spawn"
# A journal line may be stamped just before the kill lands (process: the kernel timer; command:
# the supervisor or, when it is stopped too, its kernel timer).
CHILD_SLACK = (PROCESS_SLACK, COMMAND_SLACK, 0.0, COMMAND_SLACK)
# A thread cannot be interrupted between its check of stop_event and its action: one stopped
# there completes that one action when its process resumes (the documented limit of threads;
# the fencing token covers it), and nothing more.
IN_FLIGHT = (0, 0, 1, 0)


def start_parent(tmp_path, lease, method="default"):
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT)
    out = tmp_path / "pids.json"
    journals = tuple(str(tmp_path / f"{kind.replace(' ', '_')}.journal") for kind in CHILD_KINDS)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    parent = subprocess.Popen(  # its own process group, as a service or a shell job has
        [sys.executable, str(script), str(out), str(lease), *journals, method], env=env, start_new_session=True
    )
    try:
        assert wait_for(lambda: out.exists() or parent.poll() is not None, 30)
        assert parent.poll() is None, "parent script died"
        pids = json.loads(out.read_text())
        assert wait_for(
            lambda: all(os.path.exists(j) and len(journal.read(j)) > 10 for j in journals), 20
        )
        pids["helper"] = journal.read(journals[3])[0]["pid"]
    except BaseException:
        parent.kill()
        parent.wait()
        raise
    return parent, pids, journals, str(out) + ".deadlines"


def end_parent(parent, pids):
    """SIGKILL the parent script and whatever of its children a test left (a helper orphaned on
    purpose must not journal on for ever)."""
    for pid in [parent.pid, pids.get("helper")]:
        try:
            if pid is not None and not gone(pid):
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(parent.pid, signal.SIGCONT)  # members a test stopped
    except ProcessLookupError:
        pass  # every member of the group is gone and reaped already
    parent.wait()


@pytest.mark.parametrize("method", ["default", OTHER_START_METHOD])
def test_children_die_with_their_parent_process(tmp_path, method):
    """SIGKILL of the crown's process: every child process goes, the command's helper too (the
    supervisor, told by its parent-death signal, kills the command's whole process group)."""
    parent, pids, journals, _ = start_parent(tmp_path, lease=30.0, method=method)
    try:
        for pid in pids.values():
            assert not gone(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert wait_for(lambda: all(gone(pid) for pid in pids.values()), 15), {
            name: gone(pid) for name, pid in pids.items()
        }
        for kind, path in zip(CHILD_KINDS, journals):
            if kind == "thread":
                continue  # it died with the parent's process itself
            events = journal.read(path)  # working, then killed (no orderly "stop")
            assert events[0]["ev"] == "start" and events[-1]["ev"] != "stop"
    finally:
        end_parent(parent, pids)


def process_state(pid):
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("stopped, method", [
    ("parent", "default"), ("parent", OTHER_START_METHOD), ("parent's group", "default"),
    ("parent's group and supervisor", "default"),
])
def test_children_stop_by_the_deadline_while_the_parent_is_paused(tmp_path, stopped, method):
    """Nothing of the crown runs but the children themselves (and, unless it is stopped too, the
    command's supervisor): each child still stops by the last deadline its parent gave it, and a
    thread child resumed after that deadline does nothing more. A supervisor that is stopped
    itself dies by its kernel timer and takes the command with it, but not the command's helper
    (the documented limit): that helper dies when the crown's process runs again, by the hand of
    the command's reaper, which finds the supervisor dead without a report."""
    lease = 0.5
    parent, pids, journals, deadlines_path = start_parent(tmp_path, lease=lease, method=method)
    checked = dict(pids)
    if stopped == "parent's group and supervisor":
        journals = journals[:3]
        del checked["helper"]
    try:
        if stopped == "parent":
            parent.send_signal(signal.SIGSTOP)
        else:  # Ctrl-Z, kill -STOP -PGID: the process group the parent's children were born in
            os.killpg(parent.pid, signal.SIGSTOP)
        if stopped == "parent's group and supervisor":
            os.kill(pids["supervisor"], signal.SIGSTOP)
        time.sleep(0.05)  # a note() in flight finishes before we read (the process is stopped)
        with open(deadlines_path) as handle:
            last_deadline = max(float(line) for line in handle if line.strip())
        assert wait_for(lambda: all(gone(pid) for pid in checked.values()), lease + 15), {
            name: gone(pid) for name, pid in checked.items()
        }
        # Gone while the parent is still paused: nobody but the children themselves acted.
        assert parent.poll() is None
        assert process_state(parent.pid) == "T"
        # The thread child's process wakes up after its deadline, and must not act then. (The
        # pause may have come between the parent's extend of the term and of its children.)
        time.sleep(max(0.0, last_deadline + 0.01 - clock.monotonic()))
        os.killpg(parent.pid, signal.SIGCONT)
        assert wait_for(lambda: gone(pids["helper"]), 15), "the command's helper outlived its crown's resume"
        time.sleep(0.3)
        assert parent.poll() is None
        for path, slack, in_flight in zip(journals, CHILD_SLACK, IN_FLIGHT):
            events = journal.read(path)
            assert len(events) > 10
            late = [e for e in events if e["t"] > last_deadline + slack]
            assert len(late) <= in_flight, (path, last_deadline, late[:3])
    finally:
        end_parent(parent, pids)


def test_deadlines_count_a_host_suspend():
    """Deadlines, the process child's kernel timer and the supervisor all read CLOCK_BOOTTIME on
    Linux: a lease on the server runs on while this host is suspended, and CLOCK_MONOTONIC would
    not (a term would look alive after waking). A suspend can't be caused here; what can be
    checked is that every reader uses that clock, and that it runs with CLOCK_MONOTONIC (which it
    equals but for suspended time)."""
    import crown_sync._supervise as supervise

    assert sys.platform.startswith("linux")
    assert clock.CLOCK_ID == supervise.CLOCK_ID == time.CLOCK_BOOTTIME
    assert clock.monotonic is supervise.monotonic
    before = time.monotonic()
    now = clock.monotonic()
    assert now >= before - 1e-3  # BOOTTIME = MONOTONIC + time suspended, never less
