"""uWSGI: one job across the fleet, from the WSGI module (see ``docs/uwsgi.rst``).

uWSGI forks its workers, mules and spoolers from C. Python's ``os.register_at_fork`` handlers run
there only with ``py-call-uwsgi-fork-hooks`` (and ``enable-threads``); without them a crown
started in the master before the fork would leave every worker a copy of its state, its oracle
connection and its lock. So:

* :class:`~crown_sync.Crown` records the pid it was made in: in any other process ``is_leader()``,
  ``term()`` and ``status()`` answer "not leader" and ``start()``/``stop()`` do nothing, at-fork
  hook or not; :mod:`crown_sync.registry` does the same for ``crown_sync.is_leader(name)``.
* :func:`check_fork_safety` (called by ``Crown.start()`` whenever uWSGI is loaded) refuses, with a
  RuntimeError naming the missing options, a crown started in a process uWSGI will fork from (the
  master, or without a master the process that loads the app) unless the at-fork hooks run there.

Two placements, one line each in the WSGI module (with ``master = true`` and ``enable-threads``):

**One crown per worker**: ``crown_sync.uwsgi.crown_per_worker("scheduler", child=...)``. Each
worker starts its own crown after the fork (a ``postfork`` hook when the module is loaded in the
master; at once with ``lazy-apps``, where the module is loaded in the worker), so nothing crosses
a fork and no fork hook is needed. The job runs as a thread in the leading worker (or a
ProcessChild/CommandChild); it is stopped and the crown abdicates in uWSGI's ``atexit`` (worker
recycling by ``max-requests``, reload, shutdown); a worker killed outright ends its term as a
crashed process does (the lock is released with the process, a lease expires).

**The crown in the master**: ``crown_sync.uwsgi.crown_in_master("scheduler", child=...)``, run in
the master before it forks (the WSGI module without ``lazy-apps``; with it, a module named in
``shared-import``). It needs ``py-call-uwsgi-fork-hooks`` so that the workers forked while the
crown runs get no copy of its oracle connection. The job runs in a process forked from the master
(a callable, ``"module:function"``, a ProcessChild or a CommandChild: a thread in the master is
refused) and dies with it. Workers answer ``crown_sync.is_leader(name)`` from a few bytes of
shared memory the master's crown keeps up to date (the Gunicorn integration's mechanism: True only
while the term's deadline is ahead and the master is still the worker's parent). uWSGI runs no
Python exit handler in the master, so a master that exits (shutdown, reload) does not abdicate:
its job dies with it by its parent-death signal, and the next leader takes over when the oracle
sees the process gone (file lock, PostgreSQL session) or its lease expire (memcached, ZooKeeper).

Outside uWSGI (a test or a command that imports the app module) both check their options and
start nothing.
"""

import logging
import os
import signal
import types
from typing import List

from . import gunicorn as _gunicorn
from .children import CommandChild, ProcessChild

__all__ = ["crown_per_worker", "crown_in_master", "check_fork_safety", "forks_this_process", "running_crown"]

logger = logging.getLogger("crown_sync.uwsgi")

running_crown = _gunicorn.running_crown

#: Signals whose handlers a job forked from the uWSGI master must not keep: uWSGI sets them in C
#: (reload, stop, stats), and in a copy of the master they would act on a process that is not one.
_MASTER_SIGNALS = ("SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCHLD", "SIGWINCH", "SIGTSTP", "SIGURG")

_FORK_HOOK_OPTIONS = "enable-threads = true\npy-call-uwsgi-fork-hooks = true"


def _module():
    """The ``uwsgi`` module, or None outside uWSGI (it exists only inside the server)."""
    try:
        import uwsgi
    except ImportError:
        return None
    return uwsgi if hasattr(uwsgi, "opt") else None


def _server(what: str):
    """The uwsgi module; None (said once in the log) where the app module is imported outside
    uWSGI (tests, a management command, another server): then nothing is started."""
    uwsgi = _module()
    if uwsgi is None:
        logger.warning("crown_sync.uwsgi.%s: not running under uWSGI, no crown started here", what)
    return uwsgi


def _flag(uwsgi, option: str) -> bool:
    """True if uWSGI's ``option`` is on (``opt`` holds the values as given: b"true", True, b"0"...)."""
    value = uwsgi.opt.get(option)
    if isinstance(value, list):  # an option given twice: the last one counts
        value = value[-1] if value else None
    if value is None:
        return False
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).strip().lower() not in ("false", "off", "no", "0")


def _threads_enabled(uwsgi) -> bool:
    has_threads = getattr(uwsgi, "has_threads", None)  # also set by threads = N
    return bool(has_threads) if has_threads is not None else _flag(uwsgi, "enable-threads")


def forks_this_process() -> bool:
    """True in a process uWSGI forks workers from: the master, or without one the process that
    loads the app (it becomes worker 1 and forks the others). False outside uWSGI."""
    uwsgi = _module()
    if uwsgi is None:
        return False
    return uwsgi.worker_id() == 0 and uwsgi.mule_id() == 0 and not uwsgi.i_am_the_spooler()


def check_fork_safety(what: str = "a crown") -> None:
    """Refuse (RuntimeError) ``what`` in a process uWSGI will fork from, unless Python's at-fork
    handlers run at those forks. A no-op outside uWSGI and in workers, mules and spoolers."""
    if not forks_this_process():
        return
    uwsgi = _module()
    missing: List[str] = []
    if not _threads_enabled(uwsgi):
        missing.append("enable-threads")  # without it uWSGI skips the fork hooks, and threads never run
    if not _flag(uwsgi, "py-call-uwsgi-fork-hooks"):
        missing.append("py-call-uwsgi-fork-hooks")
    if missing:
        raise RuntimeError(
            f"{what} in the uWSGI master (pid {os.getpid()}) needs the uWSGI option(s) {', '.join(missing)}: "
            "uWSGI forks its workers from C and, without them, runs no Python at-fork handler, so every "
            "worker would keep a copy of the crown's oracle connection and lock. Add to the uWSGI config:\n"
            f"{_FORK_HOOK_OPTIONS}\nor start the crown in each worker instead: "
            "crown_sync.uwsgi.crown_per_worker(...), or lazy-apps = true (see docs/uwsgi.rst)"
        )


def _require_master(uwsgi, what: str) -> None:
    if not uwsgi.masterpid():
        raise RuntimeError(f"{what} needs the uWSGI master: add 'master = true' to the uWSGI config")
    if not _threads_enabled(uwsgi):
        raise RuntimeError(f"{what} needs Python threads in uWSGI (the crown runs in one): add "
                           "'enable-threads = true' to the uWSGI config")


class _ListeningFd:
    """A uWSGI listening socket (a bare descriptor) that a job forked from it closes."""

    def __init__(self, fd: int):
        self.fd = fd

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _listeners(uwsgi) -> list:
    return [_ListeningFd(fd) for fd in (getattr(uwsgi, "sockets", None) or [])]


def _job_main(term_info, target, args, kwargs):
    """First thing in a job forked from the uWSGI master: drop uWSGI's C signal handlers, then
    the Gunicorn integration's own preparation (Python handlers, listening sockets)."""
    for name in _MASTER_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is not None:
            try:
                signal.signal(signum, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
    target(term_info, *args, **kwargs)


class _MasterCrown(_gunicorn.MasterCrown):
    def _job(self):
        child = self.child
        if isinstance(child, CommandChild):
            return child  # its own supervisor
        if isinstance(child, ProcessChild):
            target, args, kwargs, options = child.target, child.args, child.kwargs, {"grace": child.grace}
        else:  # a callable or "module:function"
            target, args, kwargs, options = child, (), {}, {}
        # Always forked, as uWSGI forks everything: ProcessChild's spawn (its default on Python
        # 3.12+) would run sys.executable, which in uWSGI is the uwsgi binary, not a Python.
        # Gunicorn's job main then drops the inherited listening sockets and imports a string.
        return ProcessChild(_job_main, args=(_gunicorn._job_main, (target, args, kwargs), {}),
                            start_method="fork", **options)


def crown_in_master(name: str, child, oracle=None, **options) -> _gunicorn.MasterCrown:
    """Start ``name``'s crown in the uWSGI master now (call it where the master runs it before
    forking: the WSGI module without ``lazy-apps``, a ``shared-import`` module with it).

    ``child``, ``stop_timeout`` and the other options are those of
    :class:`crown_sync.gunicorn.MasterCrown`. Returns it (its ``on_exit()`` stops the crown).
    """
    master = _MasterCrown(name, child, oracle=oracle, **options)  # bad options fail first, anywhere
    uwsgi = _server("crown_in_master")
    if uwsgi is None:
        return master
    if not forks_this_process():
        raise RuntimeError(
            "crown_in_master must run in the uWSGI master, before it forks the workers; this is "
            f"worker {uwsgi.worker_id()} / mule {uwsgi.mule_id()}. With lazy-apps = true the WSGI module "
            "is loaded in each worker: call it from a module named in 'shared-import = ...' instead"
        )
    _require_master(uwsgi, "crown_in_master")
    check_fork_safety("crown_in_master")
    master.on_starting()
    master.when_ready(types.SimpleNamespace(LISTENERS=_listeners(uwsgi)))
    return master


def crown_per_worker(name: str, child, oracle=None, **options) -> _gunicorn.WorkerCrown:
    """Run one crown for ``name`` in every uWSGI worker, started after the fork.

    ``child``, ``stop_timeout``, ``die_with_master`` and the other options are those of
    :class:`crown_sync.gunicorn.WorkerCrown`: a callable or ``"module:function"`` runs as a thread
    in the leading worker. Call it once, in the WSGI module (``lazy-apps`` on or off).
    """
    worker = _gunicorn.WorkerCrown(name, child, oracle=oracle, **options)
    uwsgi = _server("crown_per_worker")
    if uwsgi is None:
        return worker
    _require_master(uwsgi, "crown_per_worker")

    def start() -> None:
        if uwsgi.worker_id() <= 0:
            return  # a mule or a spooler: not a worker
        worker.post_worker_init(types.SimpleNamespace(ppid=uwsgi.masterpid(), sockets=_listeners(uwsgi)))
        _at_exit(uwsgi, lambda: worker.worker_exit(None, None))

    if uwsgi.worker_id() > 0:
        start()  # lazy-apps: this worker is loading the app, after its fork
    else:
        _after_fork(uwsgi, start)
    return worker


def _after_fork(uwsgi, function) -> None:
    """Run ``function`` in every process uWSGI forks from now on, through uwsgidecorators' chain
    when it is there (importing it replaces ``uwsgi.post_fork_hook`` with its own chain)."""
    previous = getattr(uwsgi, "post_fork_hook", None)
    try:
        import uwsgidecorators
    except ImportError:
        uwsgidecorators = None
    if uwsgidecorators is not None:
        chain = uwsgidecorators.postfork_chain_hook
        if previous not in (None, chain):
            uwsgidecorators.postfork(previous)  # a hook set outside the chain: keep it, in the chain
        uwsgidecorators.postfork(function)
        uwsgi.post_fork_hook = chain
        return

    def chained():
        if previous is not None:
            previous()
        function()

    uwsgi.post_fork_hook = chained


def _at_exit(uwsgi, function) -> None:
    """Run ``function`` when this worker exits gracefully (uWSGI calls ``uwsgi.atexit`` in a
    worker that is not busy with a request; a busy one dies with its crown)."""
    previous = getattr(uwsgi, "atexit", None)
    pid = os.getpid()

    def chained():
        try:
            if os.getpid() == pid:
                function()
        except Exception:
            logger.exception("crown_sync: stopping the worker's crown failed")
        if previous is not None:
            previous()

    uwsgi.atexit = chained
