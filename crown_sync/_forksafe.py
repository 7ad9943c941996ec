"""Oracle sockets never cross fork(): opened under a guard, blinded in a forked child.

A socket an oracle opens belongs to the process that opened it. In a forked child (a Gunicorn
worker, a ProcessChild) a copy would keep the server's session, and the leadership it holds,
alive after the parent died, and anything written to it would corrupt the parent's session. The
oracles blind the sockets they know of in a forked child, but a fork that lands while a socket is
being opened, before anyone stored its number, would leak it (seen with a Gunicorn master forking
its workers while its crown connected to PostgreSQL).

So oracles open sockets inside :func:`opening`: a shared hold on a guard that ``fork()`` takes
exclusively (``os.register_at_fork``), and the socket is recorded (:func:`keep`-style, through the
function ``opening`` yields) before the hold ends. A fork waits for the sockets being opened (at
most their connect timeout, never longer than :data:`MAX_FORK_WAIT`), and in the child every
recorded socket that is still the same open socket is pointed at ``/dev/null`` with ``dup2``:
nothing the child does reaches the parent's peer, and the server sees the session end when the
parent's last descriptor closes. A recorded number that was closed and reused since (another
inode) is left alone.

The same fork handler then tells every object registered with :func:`track` (oracles, contenders,
connections) that it now lives in a forked child, so the library registers one at-fork handler,
here, instead of one per module.
"""

import contextlib
import logging
import os
import threading
import weakref
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

__all__ = ["opening", "track", "at_fork", "check_process", "MAX_FORK_WAIT"]

logger = logging.getLogger("crown_sync.forksafe")

#: Longest a fork() waits for sockets being opened (s); then it goes ahead, with a warning.
MAX_FORK_WAIT = 30.0

_cond = threading.Condition(threading.Lock())
_opening = 0  # holds in progress
_forking = 0  # forks waiting or in progress: no new hold starts meanwhile
_sockets: Dict[int, Tuple[int, int]] = {}  # fd -> (st_dev, st_ino) when recorded
# Tracked object -> the pid it was made (or last told of a fork) in: a catch-up in a process
# forked from C must not treat objects made in that process since as inherited.
_tracked: "weakref.WeakKeyDictionary[object, int]" = weakref.WeakKeyDictionary()
_pid = os.getpid()  # the process the handlers last ran for
_catching_up: Dict[int, threading.Lock] = {}  # pid -> the lock of its catch-up (never inherited)
_in_catch_up: Optional[Tuple[int, int]] = None  # (pid, thread) running the after-fork steps now


_hooks: Dict[str, list] = {"before": [], "after_in_parent": [], "after_in_child": []}


def track(obj: object) -> None:
    """Call ``obj._after_fork_in_child()`` in a forked child, after its sockets are blinded."""
    check_process()  # first catch up with a fork from C: obj is this process's own
    _tracked[obj] = os.getpid()


def check_process() -> bool:
    """In a process forked without Python's at-fork handlers (uWSGI forks its workers from C),
    run them now, once: blind the recorded sockets, run the hooks, tell the tracked objects
    made in another process. True if that happened here. Call it before using anything a parent
    process could have made (making a tracked object calls it)."""
    pid = os.getpid()
    if pid == _pid or _in_catch_up == (pid, threading.get_ident()):
        return False  # nothing to do, or called from one of the after-fork steps themselves
    # One thread catches up; the others wait for it. The lock is this pid's own: a lock copied
    # from the parent could have been held by one of its threads.
    with _catching_up.setdefault(pid, threading.Lock()):
        if _pid == pid:
            return False  # another thread did it meanwhile
        _after_fork_in_child()
    return True


def at_fork(*, before: Optional[Callable[[], None]] = None, after_in_parent: Optional[Callable[[], None]] = None,
            after_in_child: Optional[Callable[[], None]] = None) -> None:
    """:func:`os.register_at_fork` for the library's modules, run from its one registration:
    ``before`` hooks in reverse order of registration, the others in order, as Python does;
    every ``after_in_child`` hook after the sockets are blinded and before tracked objects."""
    for when, hook in (("before", before), ("after_in_parent", after_in_parent), ("after_in_child", after_in_child)):
        if hook is not None:
            _hooks[when].append(hook)


def _run(when: str) -> None:
    hooks = _hooks[when]
    for hook in reversed(hooks) if when == "before" else list(hooks):
        try:
            hook()
        except Exception:  # pragma: no cover - one module's failure must not spare the others
            logger.exception("%s-fork hook %r failed", when, hook)


def _identity(fd: int):
    try:
        info = os.fstat(fd)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _record(sock: Union[int, object]) -> None:
    fd = sock if isinstance(sock, int) else sock.fileno()
    identity = _identity(fd)
    if identity is None:
        return
    with _cond:
        if len(_sockets) >= 64:  # drop the ones closed since (their number no longer matches)
            for old, recorded in list(_sockets.items()):
                if _identity(old) != recorded:
                    del _sockets[old]
        _sockets[fd] = identity


@contextlib.contextmanager
def opening() -> Iterator[Callable[[Union[int, object]], None]]:
    """Open sockets in this block and pass each (or its fd) to the function it yields. Also for
    descriptors no forked copy may keep, unrecorded: a pipe whose end-of-file means something
    (no fork of another thread lands inside the block)."""
    global _opening
    with _cond:
        while _forking:
            _cond.wait()
        _opening += 1
    try:
        yield _record
    finally:
        with _cond:
            _opening -= 1
            if not _opening:
                _cond.notify_all()


def _before_fork() -> None:
    global _forking
    _run("before")
    with _cond:
        _forking += 1
        if not _cond.wait_for(lambda: not _opening, MAX_FORK_WAIT):
            logger.warning("fork() went ahead after %.0f s with an oracle socket still being opened: "
                           "the child may keep a copy of it", MAX_FORK_WAIT)


def _after_fork_in_parent() -> None:
    global _forking
    with _cond:
        _forking -= 1
        _cond.notify_all()
    _run("after_in_parent")


def _after_fork_in_child() -> None:
    global _pid, _in_catch_up
    pid = os.getpid()
    _in_catch_up = (pid, threading.get_ident())
    try:
        _catch_up(pid)
    finally:
        _in_catch_up = None
        _pid = pid  # last: a thread that finds it set finds the catch-up done


def _catch_up(pid: int) -> None:
    global _cond, _opening, _forking
    _cond = threading.Condition(threading.Lock())  # other threads' holds did not cross the fork
    _opening = _forking = 0
    _blind_recorded_sockets()
    _run("after_in_child")
    for obj, made_in in list(_tracked.items()):
        if made_in == pid:
            continue  # made in this process (after a fork from C, before this catch-up)
        _tracked[obj] = pid
        try:
            obj._after_fork_in_child()  # type: ignore[attr-defined]
        except Exception:  # pragma: no cover - one object's failure must not spare the others
            logger.exception("after-fork handler of %r failed", obj)


def _blind_recorded_sockets() -> None:
    sockets = dict(_sockets)
    _sockets.clear()
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
    except OSError:
        return
    try:
        for fd, recorded in sockets.items():
            if _identity(fd) == recorded:
                try:
                    os.dup2(devnull, fd)
                except OSError:
                    pass
    finally:
        os.close(devnull)


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)
