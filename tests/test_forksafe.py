"""crown_sync._forksafe: a fork while an oracle socket is being opened never copies it.

Real sockets on loopback and a real fork(); the oracles' own fork behaviour is tested with their
servers (tests/oracles) and under Gunicorn (tests/test_gunicorn.py).
"""

import os
import socket
import stat
import threading
import time
import warnings

from crown_sync import _forksafe


def _libc_fork() -> int:
    """fork() as C code calls it (uWSGI does): Python's at-fork handlers do not run."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True).fork()


def _in_child(answer, fork=os.fork) -> bytes:
    """Fork; the child writes ``answer()`` (bytes) and leaves at once. Returns what it wrote."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+: fork with threads
        pid = fork()
    if pid == 0:
        try:
            os.write(write_end, answer())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        return os.read(read_end, 64)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)


def _child_sees_socket(fd: int) -> bool:
    """Fork; in the child, report whether ``fd`` is still a socket. Returns the child's answer."""
    def answer():
        try:
            return b"1" if stat.S_ISSOCK(os.fstat(fd).st_mode) else b"0"
        except OSError:
            return b"0"
    return _in_child(answer) == b"1"


def test_a_fork_waits_for_a_socket_being_opened_and_the_child_gets_no_copy():
    listener = socket.create_server(("127.0.0.1", 0))
    opened = threading.Event()
    recorded = threading.Event()
    box = {}

    def connect():
        with _forksafe.opening() as keep:
            box["sock"] = socket.create_connection(listener.getsockname())
            opened.set()
            time.sleep(0.3)  # a fork now must wait: nobody could blind this socket yet
            keep(box["sock"])
            recorded.set()

    thread = threading.Thread(target=connect)
    thread.start()
    try:
        assert opened.wait(10)
        fd = box["sock"].fileno()
        assert not _child_sees_socket(fd)
        assert recorded.is_set()  # the fork went ahead only after the socket was recorded
        assert stat.S_ISSOCK(os.fstat(fd).st_mode)  # the parent's socket is untouched
    finally:
        thread.join()
        box["sock"].close()
        listener.close()


def test_a_reused_descriptor_number_is_left_alone():
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        with _forksafe.opening() as keep:
            sock = socket.create_connection(listener.getsockname())
            keep(sock)
        number = sock.fileno()
        sock.close()
        other = socket.create_connection(listener.getsockname())  # likely the same number
        try:
            if other.fileno() == number:
                assert _child_sees_socket(number)  # not ours any more: not blinded
            assert _child_sees_socket(other.fileno())
        finally:
            other.close()
    finally:
        listener.close()


class _Tracked:
    forked = False

    def _after_fork_in_child(self) -> None:
        self.forked = True


def test_a_fork_without_pythons_handlers_is_caught_up_by_check_process():
    """uWSGI forks from C: no at-fork handler runs. The first check_process() in the child runs
    them all: recorded sockets blinded, tracked objects told; in the parent it does nothing."""
    listener = socket.create_server(("127.0.0.1", 0))
    with _forksafe.opening() as keep:
        sock = socket.create_connection(listener.getsockname())
        keep(sock)
    tracked = _Tracked()
    _forksafe.track(tracked)

    def answer():
        before = stat.S_ISSOCK(os.fstat(sock.fileno()).st_mode) and not tracked.forked
        caught = _forksafe.check_process()
        after = not stat.S_ISSOCK(os.fstat(sock.fileno()).st_mode) and tracked.forked
        again = _forksafe.check_process()
        return b"%d%d%d%d" % (before, caught, after, again)

    try:
        assert _in_child(answer, fork=_libc_fork) == b"1110"
        assert not _forksafe.check_process() and not tracked.forked
        assert stat.S_ISSOCK(os.fstat(sock.fileno()).st_mode)
    finally:
        sock.close()
        listener.close()


def test_what_a_process_forked_from_c_makes_itself_is_its_own(tmp_path):
    """A uWSGI worker (forked from C, no at-fork handler run) makes its crown with an oracle object
    its master made: the catch-up treats the oracle as inherited, never the crown made since."""
    from crown_sync import Crown
    from crown_sync.oracles.file import FileOracle

    directory = tmp_path / "oracle"
    directory.mkdir(mode=0o700)
    oracle = FileOracle(str(directory))  # the master's

    def answer():
        crown = Crown("worker-job", oracle=oracle, child=lambda term: term.stop_event.wait())
        crown.start()
        led = crown.wait_for_leadership(20) and crown.is_leader()
        crown.stop(20)
        return b"%d%d" % (led, crown.status().phase == "stopped")

    assert _in_child(answer, fork=_libc_fork) == b"11"
