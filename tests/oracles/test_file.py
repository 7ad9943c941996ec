"""The embedded file oracle, with real contender processes, real signals and the journal checker."""

import contextlib
import ctypes
import errno
import os
import pathlib
import shutil
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest

import crown_sync
from crown_sync.oracles import FileOracle
from crown_sync.oracles import file as file_oracle
from crown_sync.testing import journal

from .support import FORK_SCRIPT, Fleet, wait_until

NAME = "billing"


@pytest.fixture
def oracle_dir(tmp_path):
    directory = tmp_path / "oracle"
    directory.mkdir(mode=0o700)
    return directory


@pytest.fixture
def url(oracle_dir):
    return f"file://{oracle_dir}"


def leader_identity(url):
    """The identity find_leader names (the oracle's word: only for what a test checks of it)."""
    found = crown_sync.find_leader(NAME, oracle=url)
    return found.identity if found is not None else None


def test_tokens_rise_and_survive_a_new_oracle_object(oracle_dir):
    url = f"file://{oracle_dir}"
    tokens = []
    for _ in range(3):
        with crown_sync.Crown(NAME, oracle=url) as crown:
            assert crown.wait_for_leadership(10)
            tokens.append(crown.status().token)
    assert tokens == sorted(tokens) and len(set(tokens)) == 3
    assert crown_sync.find_leader(NAME, oracle=url) is None  # record remains, lock is free


def test_a_torn_leader_record_is_refused_rather_than_restarting_tokens(url, oracle_dir):
    with crown_sync.Crown(NAME, oracle=url) as crown:
        assert crown.wait_for_leadership(10)
        last = crown.status().token
    (oracle_dir / f"{NAME}.leader").write_text("{not json")
    crown = crown_sync.Crown(NAME, oracle=url, monitor_delay=0.1, monitor_timeout=1).start()
    try:
        wait_until(lambda: "not a valid leader record" in (crown.status().last_error or ""))
        assert not crown.is_leader()  # a token from 1 again could be below one already used
        (oracle_dir / f"{NAME}.leader").write_text('{"identity": "restored", "token": %d}' % (last + 10))
        assert crown.wait_for_leadership(20)
        assert crown.status().token == last + 11
    finally:
        crown.stop()


def test_stopped_followers_leave_no_waiting_threads_behind(url):
    def waiters():
        return [t for t in threading.enumerate() if t.name.startswith("crown-sync-file-wait") and t.is_alive()]

    leader = crown_sync.Crown(NAME, oracle=url, identity="leader").start()
    assert leader.wait_for_leadership(10)
    before = len(waiters())
    for i in range(8):
        with crown_sync.Crown(NAME, oracle=url, identity=f"follower-{i}") as follower:
            wait_until(lambda: follower.phase == "following" and len(waiters()) > before)
    assert len(waiters()) <= before + 1  # one orphan at most, adopted by each next follower
    last = crown_sync.Crown(NAME, oracle=url, identity="last").start()
    try:
        wait_until(lambda: last.phase == "following")
        leader.stop()
        assert last.wait_for_leadership(10)  # the adopted waiter's lock became ours
        assert crown_sync.find_leader(NAME, oracle=url).identity == "last"
    finally:
        last.stop()
    wait_until(lambda: len(waiters()) == before, timeout=10)
    assert crown_sync.find_leader(NAME, oracle=url) is None


def not_roots_symlink(target, link):
    """A symlink that the oracle must never follow: only root's are (resolved once, see
    resolve_trusted_symlinks); run as root, the test gives it to nobody."""
    os.symlink(target, link)
    if os.geteuid() == 0:
        os.lchown(link, nobody().pw_uid, nobody().pw_gid)


def test_directory_checks(tmp_path):
    target = tmp_path / "real"
    target.mkdir(mode=0o700)
    link = tmp_path / "link"
    not_roots_symlink(target, link)
    with pytest.raises(PermissionError):
        FileOracle(str(link)).find_leader(NAME)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(PermissionError):
        FileOracle(str(shared)).find_leader(NAME)
    created = tmp_path / "new" / "dir"
    FileOracle(str(created)).find_leader(NAME)
    assert (created.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize("bad", ["file://relative/dir", "file://host/abs", "file:///tmp/x?check_interval=0",
                                 "file:///tmp/x?colour=red"])
def test_bad_file_urls(bad):
    with pytest.raises(ValueError) as info:
        crown_sync.oracle_from_url(bad)
    if "colour" in bad:
        assert "check_interval" in str(info.value)  # names the accepted options


def test_a_forked_process_does_not_keep_the_lock_after_the_parent_dies(url, tmp_path):
    script = tmp_path / "fork_script.py"
    script.write_text(FORK_SCRIPT)
    process = subprocess.Popen([sys.executable, str(script), url, NAME, "linger"], stdout=subprocess.PIPE,
                               text=True)
    pids = {}
    try:
        while len(pids) < 2:
            role, pid = process.stdout.readline().split()
            pids[role] = int(pid)
        assert crown_sync.find_leader(NAME, oracle=url) is not None
        os.kill(pids["parent"], signal.SIGKILL)
        process.wait(10)
        # The lingering forked child closed its copy of the lock descriptor after fork.
        with crown_sync.Crown(NAME, oracle=url) as successor:
            assert successor.wait_for_leadership(10)
    finally:
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


DAEMONIZING_COMMAND = textwrap.dedent(
    """
    import os, sys, time
    from crown_sync.testing.journal import Journal

    # A command that leaves a daemon behind: the daemon, in its own session, escapes the group
    # signals and inherits the term's lock descriptor; it journals until 1.5 s after the command.
    read_end, write_end = os.pipe()
    if os.fork() == 0:
        os.setsid()
        os.close(write_end)
        os.set_blocking(read_end, False)
        journal = Journal(sys.argv[1])
        term = (os.environ["CROWN_SYNC_NAME"], os.environ["CROWN_SYNC_IDENTITY"],
                int(os.environ["CROWN_SYNC_TOKEN"]))
        journal.write("start", *term)
        command_gone = None
        while command_gone is None or time.monotonic() < command_gone + 1.5:
            time.sleep(0.02)
            if command_gone is None:
                try:
                    if os.read(read_end, 1) == b"":
                        command_gone = time.monotonic()
                except BlockingIOError:
                    pass
            journal.write("beat", *term)
        journal.write("stop", *term)
        os._exit(0)
    os.close(read_end)
    while True:
        time.sleep(60)  # until SIGTERM
    """
)


def test_a_child_that_outlives_abdicate_keeps_the_election_closed(url, tmp_path):
    script = tmp_path / "daemonizing.py"
    script.write_text(DAEMONIZING_COMMAND)
    path = str(tmp_path / "journal.jsonl")
    first = crown_sync.Crown(NAME, oracle=url, identity="first",
                             child=crown_sync.CommandChild([sys.executable, str(script), path], grace=5)).start()
    second = None
    try:
        assert first.wait_for_leadership(10)
        wait_until(lambda: os.path.exists(path) and journal.read(path))  # the daemon works
        second = crown_sync.Crown(NAME, oracle=url, identity="second",
                                  child=crown_sync.ThreadChild(journal.journaled_work, args=(path,))).start()
        wait_until(lambda: second.phase == "following")
        first.stop()  # the command exits at SIGTERM; its daemon still holds the lock descriptor
        assert second.wait_for_leadership(20)
        time.sleep(0.1)
    finally:
        first.stop()
        if second is not None:
            second.stop()
    report = journal.check(path, NAME)
    assert report.ok, report.summary()
    assert [term.identity for term in report.terms] == ["first", "second"], report.summary()


@pytest.mark.parametrize("fault", ["delete", "replace"])
def test_a_deleted_or_replaced_lock_file_never_yields_a_second_leader(url, oracle_dir, tmp_path, fault):
    fleet = Fleet(url, tmp_path, NAME, child="command")
    fleet.spawn("old")
    claimant = None
    try:
        assert fleet.wait_for_term(min_beats=1).identity == "old"
        fleet.spawn("waiting")  # blocked on the old file: it must not lead on it once unlinked
        lock = oracle_dir / f"{NAME}.lock"
        blocked = f":{lock.stat().st_ino} "
        wait_until(lambda: any(" -> " in line and blocked in line for line in open("/proc/locks")))
        if fault == "delete":
            lock.unlink()  # a tmp cleaner, or rm
        else:
            spare = oracle_dir / "spare"
            spare.write_text("")
            os.rename(spare, lock)
        # A new contender opens (or creates) the new file at the path, which nobody holds.
        claimant = crown_sync.Crown(NAME, oracle=url, identity="claimant", monitor_delay=0.5,
                                    child=crown_sync.ThreadChild(journal.journaled_work,
                                                                 args=(fleet.journal, 0.02))).start()
        wait_until(lambda: claimant.is_leader() or "deleted or replaced" in (claimant.status().last_error or ""))
        time.sleep(0.3)
        early = (claimant.is_leader(), leader_identity(url))
        fleet.processes["old"].send_signal(signal.SIGTERM)
        fleet.processes["old"].wait(30)
        wait_until(lambda: leader_identity(url) not in (None, "old"))
        wait_until(lambda: len(journal.check(fleet.journal, NAME).terms) >= 2)  # the successor works
        time.sleep(0.1)
    finally:
        if claimant is not None:
            claimant.stop()
        fleet.stop_all(strict=True)
    report = journal.check(fleet.journal, NAME)
    assert report.ok, report.summary()
    assert len(report.terms) >= 2 and report.terms[0].identity == "old", (report.summary(), report.terms)
    assert early == (False, "old")  # find_leader named the holder of the unlinked file meanwhile


LEADER_WITH_A_DAEMON = textwrap.dedent(
    """
    import sys, time
    import crown_sync
    child = crown_sync.CommandChild([sys.executable, sys.argv[2], sys.argv[3]])
    crown_sync.Crown("billing", oracle=sys.argv[1], identity="old", child=child).start()
    time.sleep(600)
    """
)


def test_a_deleted_lock_file_held_only_by_a_dead_leaders_daemon_is_waited_for(url, oracle_dir, tmp_path):
    # The lock's locker is dead; only a process it left behind holds it (inside a pid namespace,
    # /proc/locks hides such a lock: the oracle then finds the holder's descriptor instead).
    (tmp_path / "daemonizing.py").write_text(DAEMONIZING_COMMAND)
    (tmp_path / "leader.py").write_text(LEADER_WITH_A_DAEMON)
    path = str(tmp_path / "journal.jsonl")
    leader = subprocess.Popen([sys.executable, str(tmp_path / "leader.py"), url,
                               str(tmp_path / "daemonizing.py"), path])
    claimant = None
    try:
        wait_until(lambda: os.path.exists(path) and journal.read(path))  # the daemon works
        (oracle_dir / f"{NAME}.lock").unlink()
        leader.kill()
        leader.wait(30)
        claimant = crown_sync.Crown(NAME, oracle=url, identity="claimant", monitor_delay=0.5,
                                    child=crown_sync.ThreadChild(journal.journaled_work, args=(path, 0.02))).start()
        assert claimant.wait_for_leadership(30)
        time.sleep(0.1)
    finally:
        if leader.poll() is None:
            leader.kill()
        if claimant is not None:
            claimant.stop()
    report = journal.check(path, NAME)
    assert report.ok, report.summary()
    assert [term.identity for term in report.terms] == ["old", "claimant"], report.summary()


def test_a_claimant_in_another_pid_namespace_never_takes_over_a_deleted_lock_file(url, oracle_dir, tmp_path):
    # From inside a pid namespace, the host leader's lock on the unlinked file is invisible.
    contained = [shutil.which("unshare") or "unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM"]
    try:
        probe = subprocess.run(contained + ["true"], capture_output=True, timeout=30)
        problem = probe.stderr.decode(errors="replace").strip() if probe.returncode else None
    except OSError as exc:
        problem = str(exc)
    if problem:  # not root, or no unshare(1)
        message = f"NO PID NAMESPACE in this run: {problem}"
        assert not os.environ.get("CI"), message + " (CI=true: a pid namespace is required)"
        warnings.warn(message)
        return
    fleet = Fleet(url, tmp_path, NAME, child="command")
    fleet.spawn("host")
    try:
        assert fleet.wait_for_term(min_beats=1).identity == "host"
        (oracle_dir / f"{NAME}.lock").unlink()
        fleet.spawn("contained", prefix=contained)
        time.sleep(2.0)  # it claims the new file again and again, and must refuse each time
        fleet.processes["host"].send_signal(signal.SIGTERM)
        fleet.processes["host"].wait(30)
        fleet.spawn("host-2")  # sees every lock: takes over once the old one is released
        wait_until(lambda: len(journal.check(fleet.journal, NAME).terms) >= 2)
        time.sleep(0.1)
    finally:
        if "contained" in fleet.processes:
            # unshare(1) does not pass SIGTERM on; killed, it SIGTERMs the contender (--kill-child).
            fleet.processes["contained"].kill()
        fleet.stop_all(strict=True)
    report = journal.check(fleet.journal, NAME)
    assert report.ok, report.summary()
    assert [term.identity for term in report.terms][:2] == ["host", "host-2"], report.summary()


def mounts():
    """(mount point, fstype) of every mount this process sees, from /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            before, after = line.split(" - ", 1)
            point = before.split()[4].encode().decode("unicode_escape")  # \\040 is a space
            found.append((point, after.split()[0]))
    return found


# statfs magics of file systems mounted on most Linux hosts (linux/magic.h), by mountinfo fstype.
ACCEPTED = {"ext4": 0xEF53, "tmpfs": 0x01021994, "proc": 0x9FA0, "sysfs": 0x62656572, "xfs": 0x58465342,
            "btrfs": 0x9123683E, "overlay": 0x794C7630, "cgroup2": 0x63677270, "devpts": 0x1CD1}
REFUSED = {"nfs": 0x6969, "nfs4": 0x6969, "cifs": 0xFF534D42, "smb3": 0xFF534D42, "fuse": 0x65735546,
           "9p": 0x01021997, "ceph": 0x00C36400}


def test_the_file_system_type_of_every_mount_here_is_read_and_classified():

    checked = 0
    for point, fstype in mounts():
        kind = fstype.split(".")[0]  # fuse.sshfs is fuse
        if kind not in ACCEPTED and kind not in REFUSED:
            continue
        try:
            f_type = file_oracle.file_system_type(point)
        except OSError:
            continue  # shadowed by a later mount, or not ours to stat
        if (ACCEPTED.get(kind) or REFUSED.get(kind)) != f_type:
            continue  # a later mount on the same point
        assert (file_oracle.refused_file_system(f_type) is not None) == (kind in REFUSED), (point, fstype)
        checked += 1
    assert checked > 0
    for fstype, magic in REFUSED.items():
        assert file_oracle.refused_file_system(magic) is not None, fstype
    for fstype, magic in ACCEPTED.items():
        assert file_oracle.refused_file_system(magic) is None, fstype
    with pytest.raises(OSError):
        file_oracle.file_system_type("/no/such/directory")


@contextlib.contextmanager
def fuse_mount(point):
    """A real FUSE mount at ``point`` (root only): an empty 0700 directory of ours, served by a
    thread speaking the kernel's FUSE protocol on /dev/fuse (INIT, GETATTR, STATFS; ENOSYS else)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    options = f"fd={fd},rootmode=40000,user_id={os.geteuid()},group_id={os.getegid()}".encode()
    if libc.mount(b"crown_sync_test", os.fsencode(str(point)), b"fuse", 2 | 4, options) != 0:  # nosuid, nodev
        code = ctypes.get_errno()
        os.close(fd)
        raise OSError(code, os.strerror(code), str(point))

    def reply(unique, error=0, body=b""):
        os.write(fd, struct.pack("<IiQ", 16 + len(body), error, unique) + body)

    def serve():
        while True:
            try:
                request = os.read(fd, 1 << 18)
            except OSError:
                return  # ENODEV once unmounted
            _, opcode, unique = struct.unpack_from("<IIQ", request)
            if opcode == 26:  # INIT: protocol 7.31 (its 64-byte answer)
                reply(unique, 0, struct.pack("<IIIIHHIIHHI7I", 7, 31, 0, 0, 0, 0, 4096, 1, 0, 0, 0, *[0] * 7))
            elif opcode == 3:  # GETATTR of the root
                attr = struct.pack("<QQQQQQIIIIIIIIII", 1, 0, 0, 0, 0, 0, 0, 0, 0, stat.S_IFDIR | 0o700, 2,
                                   os.geteuid(), os.getegid(), 0, 4096, 0)
                reply(unique, 0, struct.pack("<QII", 0, 0, 0) + attr)
            elif opcode == 17:  # STATFS
                reply(unique, 0, struct.pack("<QQQQQIIII6I", 0, 0, 0, 0, 0, 4096, 255, 4096, 0, *[0] * 6))
            elif opcode not in (2, 36, 42):  # FORGET, INTERRUPT, BATCH_FORGET: no answer
                reply(unique, -errno.ENOSYS)

    server = threading.Thread(target=serve, name="test-fuse", daemon=True)
    server.start()
    try:
        yield str(point)
    finally:
        libc.umount2(os.fsencode(str(point)), 2)  # MNT_DETACH
        server.join(10)
        os.close(fd)


def test_a_directory_on_a_fuse_file_system_is_refused_with_an_error_naming_it(tmp_path):
    point = tmp_path / "fuse"
    point.mkdir()
    with contextlib.ExitStack() as stack:
        try:
            directory = stack.enter_context(fuse_mount(point))
        except OSError as exc:  # not root, or no /dev/fuse: the classifier test above still runs
            message = f"NO FUSE MOUNT in this run: {exc}"
            assert not os.environ.get("CI"), message + " (CI=true: a FUSE mount is required)"
            warnings.warn(message)
            return
        crown = stack.enter_context(crown_sync.Crown(NAME, oracle=f"file://{directory}", monitor_delay=0.1))
        wait_until(lambda: crown.status().last_error)
        error = crown.status().last_error
        assert f"{directory} is on a fuse file system" in error, error
        assert not crown.is_leader()
    FileOracle(str(tmp_path / "local")).find_leader(NAME)  # a local directory is accepted


def test_a_leader_whose_lock_file_is_deleted_leads_on_and_says_so(oracle_dir, caplog):
    url = f"file://{oracle_dir}?check_interval=0.05"
    with crown_sync.Crown(NAME, oracle=url) as crown:
        assert crown.wait_for_leadership(10)
        token = crown.status().token
        (oracle_dir / f"{NAME}.lock").unlink()
        wait_until(lambda: "deleted or replaced" in caplog.text)
        assert crown.is_leader() and crown.status().token == token  # its lock still holds
        assert crown_sync.find_leader(NAME, oracle=url).identity == crown.identity


def test_the_default_directory_is_systemds_state_directory_when_there_is_one(monkeypatch, tmp_path):
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/state:{tmp_path}/other")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert file_oracle.default_directory() == f"{tmp_path}/state/crown_sync"
    monkeypatch.delenv("STATE_DIRECTORY")
    assert file_oracle.default_directory() == f"{tmp_path}/xdg/crown_sync"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert file_oracle.default_directory() == f"{tmp_path}/home/.local/state/crown_sync"
    crown = crown_sync.Crown("job")  # the default oracle: the directory exists from here on
    assert os.path.isdir(tmp_path / "home" / ".local" / "state" / "crown_sync")
    crown.stop()


def test_a_service_account_without_a_usable_home_is_told_what_to_set(monkeypatch):
    """Like ``nobody`` (HOME=/nonexistent) or ``www-data`` (a home it may not write): a home in
    which nobody, root included, can create a directory. The error comes at construction and
    names the ways out, instead of a crown that retries for ever and never leads."""
    for name in ("STATE_DIRECTORY", "XDG_STATE_HOME", "CROWN_SYNC_ORACLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", "/proc/1/no-home")
    with pytest.raises(OSError) as info:
        crown_sync.Crown("job")
    message = str(info.value)
    assert "/proc/1/no-home/.local/state/crown_sync" in message
    assert "CROWN_SYNC_ORACLE" in message and "STATE_DIRECTORY" in message
    with pytest.raises(OSError, match="CROWN_SYNC_ORACLE"):
        with crown_sync.lead("job"):  # the same default oracle, the same error
            pass


# ------------------------------------------------------------------ hostile neighbours (issue #17)


def journaled_crown(url, path, identity):
    child = crown_sync.ThreadChild(journal.journaled_work, args=(path, 0.02))
    return crown_sync.Crown(NAME, oracle=url, identity=identity, monitor_delay=0.2, child=child).start()


def refused(crown, words):
    """Wait until ``crown`` says it is refused (last_error holding ``words``); it must not lead."""
    wait_until(lambda: crown.is_leader() or words in (crown.status().last_error or ""), timeout=60)
    time.sleep(0.5)  # a few more tries
    return not crown.is_leader() and words in (crown.status().last_error or "")


def test_a_parent_swapped_for_a_symlink_later_is_refused_never_followed(tmp_path, caplog):
    # The swap needs write access to a directory on the way, which open_directory grants to root
    # and to us only: so the swapper here is this uid (a cleaner, a deploy script gone wrong).
    base = tmp_path / "base"
    (base / "mid" / "crowns").mkdir(parents=True, mode=0o700)
    (base / "evil" / "crowns").mkdir(parents=True, mode=0o700)  # where the symlink would lead
    url, work = f"file://{base / 'mid' / 'crowns'}", str(tmp_path / "journal.jsonl")
    leader = journaled_crown(url, work, "leader")
    claimant = None
    try:
        assert leader.wait_for_leadership(30), leader.status().last_error
        os.rename(base / "mid", base / "mid.real")
        not_roots_symlink(base / "evil", base / "mid")
        claimant = journaled_crown(url, work, "claimant")
        assert refused(claimant, "symlink"), claimant.status()
        assert str(base / "mid") in claimant.status().last_error
        assert leader.is_leader()  # its lock, on the directory it walked to, still holds
        # Its process says so (the dismissal watch, which must live on).
        wait_until(lambda: any("symlink" in r.getMessage() and "leads" in r.getMessage() for r in caplog.records))
    finally:
        for crown in (claimant, leader):
            if crown is not None:
                crown.stop()
    report = journal.check(work, NAME)
    assert report.ok and [term.identity for term in report.terms] == ["leader"], report.summary()
    assert not os.listdir(base / "evil" / "crowns")  # nothing was ever made through the symlink


def nobody():
    import pwd

    return pwd.getpwnam("nobody")


def run_as_nobody(script, *args):
    """Start ``script`` as uid/gid nobody: a co-tenant with only its own rights (the system's
    Python: the test's may live where nobody may not read)."""
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    assert os.geteuid() == 0, "the hostile-tenant tests start a second uid: run them as root (CI=true)"
    return subprocess.Popen([python, "-c", textwrap.dedent(script), *map(str, args)], cwd="/",
                            user=nobody().pw_uid, group=nobody().pw_gid, extra_groups=[],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# Off CI, a run without root skips these; under CI=true they run and fail (no second uid).
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"),
    reason="a second uid needs root to start it (see docs/sharing.rst)",
)


@pytest.fixture
def shared_tmp():
    """A directory in /tmp that a co-tenant may enter (pytest's tmp_path is under a 0700 one)."""
    import tempfile

    directory = tempfile.mkdtemp(prefix="crown-sync-hostile-", dir="/tmp")
    os.chmod(directory, 0o755)
    yield pathlib.Path(directory)
    shutil.rmtree(directory, ignore_errors=True)


@needs_root
def test_a_directory_under_a_foreign_owned_parent_is_refused(tmp_path):
    # nobody makes a directory of its own in /tmp, which it may change at will later.
    helper = run_as_nobody("import os, tempfile; d = tempfile.mkdtemp(dir='/tmp'); os.chmod(d, 0o755); print(d)")
    out, err = helper.communicate(timeout=30)
    assert helper.returncode == 0, err
    theirs = pathlib.Path(out.strip())
    try:
        url, work = f"file://{theirs / 'crowns'}", str(tmp_path / "journal.jsonl")
        crown = journaled_crown(url, work, "victim")
        try:
            assert refused(crown, "belongs to uid"), crown.status()
            assert str(theirs) in crown.status().last_error
        finally:
            crown.stop()
        assert not os.path.exists(theirs / "crowns")  # refused before making anything there
    finally:
        shutil.rmtree(theirs, ignore_errors=True)
    assert not os.path.exists(work)  # no term ever began


PLANTER = """
    import fcntl, json, os, sys, time
    directory = sys.argv[1]
    lock = os.open(os.path.join(directory, "billing.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    os.fchmod(lock, 0o666)
    fcntl.flock(lock, fcntl.LOCK_EX)  # held for as long as we like: no crown leads meanwhile
    with open(os.path.join(directory, "billing.leader"), "w") as record:
        json.dump({"identity": "mallory", "metadata": {}, "token": 10 ** 15, "since": 0}, record)
    print("planted", flush=True)
    time.sleep(120)
"""


@needs_root
def test_a_lock_and_record_planted_by_another_user_are_refused_and_reported(shared_tmp):
    tmp_path = shared_tmp
    directory = tmp_path / "crowns"
    directory.mkdir()
    directory.chmod(0o777)  # a careless moment: anyone could plant files
    planter = run_as_nobody(PLANTER, directory)
    try:
        assert planter.stdout.readline().strip() == "planted", planter.stderr.read()
        directory.chmod(0o700)  # fixed, but the planted files (and the held lock) are still there
        work = str(tmp_path / "journal.jsonl")
        crown = journaled_crown(f"file://{directory}", work, "victim")
        try:
            # Not a silent follower of mallory's lock: refused, saying why.
            assert refused(crown, "planted by someone else"), crown.status()
            assert f"uid {nobody().pw_uid})" in crown.status().last_error and "billing." in crown.status().last_error
        finally:
            crown.stop()
    finally:
        planter.kill()
        planter.wait(30)
    assert not os.path.exists(work)  # no term ever began


@needs_root
def test_a_root_owned_symlink_on_the_way_is_resolved_once_and_a_later_swap_refused(tmp_path):
    # The system's layout (/var/lock -> /run/lock): root's symlinks are followed when the oracle
    # is first used, and the path they lead to is walked without symlinks from then on.
    (tmp_path / "real" / "crowns").mkdir(parents=True, mode=0o700)
    os.symlink(tmp_path / "real", tmp_path / "system-link")
    oracle = FileOracle(str(tmp_path / "system-link" / "crowns"))
    with crown_sync.Crown(NAME, oracle=oracle) as crown:
        assert crown.wait_for_leadership(30), crown.status().last_error
        assert (tmp_path / "real" / "crowns" / f"{NAME}.lock").exists()
        os.rename(tmp_path / "real", tmp_path / "real.old")
        os.symlink(tmp_path / "real.old", tmp_path / "real")  # a swap, even by root: not followed
        with pytest.raises(PermissionError, match="symlink"):
            oracle.find_leader(NAME)


def test_a_lock_file_planted_as_a_symlink_is_refused(oracle_dir, url, tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep me")
    os.symlink(target, oracle_dir / f"{NAME}.lock")
    crown = journaled_crown(url, str(tmp_path / "journal.jsonl"), "victim")
    try:
        assert refused(crown, "symlink"), crown.status()
    finally:
        crown.stop()
    assert target.read_text() == "keep me"
