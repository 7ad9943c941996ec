"""Gunicorn hooks: one job across the fleet, in at most three lines of ``gunicorn.conf.py``.

Two placements (see ``docs/integrations.rst`` for which one to pick):

**The crown in the master** (arbiter)::

    import crown_sync.gunicorn
    on_starting, when_ready, on_exit = crown_sync.gunicorn.crown_in_master(
        "scheduler", child="myapp.jobs:run_scheduler", oracle="postgresql://app@db/app")

``on_starting`` creates a few bytes of shared memory (an anonymous ``MAP_SHARED`` mapping) in the
master *before any worker is forked*; ``when_ready`` starts the crown in the master (its threads
live only there: a forked worker never has them and never needs them); ``on_exit`` stops it (the
job first, then the crown abdicates, so a graceful shutdown hands over at once). The job runs as
a :class:`~crown_sync.ProcessChild` (a callable or ``"module:function"``, forked from the master,
with Gunicorn's signal handlers and listening sockets dropped) or a
:class:`~crown_sync.CommandChild`; a thread in the master is refused. The master's crown writes
its term's deadline (a :mod:`crown_sync.clock` value, one clock for every process on the host) and
fencing token into the shared memory from its callbacks (a term's start and end, a new leader)
and from a small thread that re-publishes every 50 ms and wakes at once when a term ends, with
what the crown knows (its phase, the leader: :func:`master_view`). Every worker (and the job) answers
:func:`crown_sync.is_leader` from that memory through a leadership provider
(:func:`crown_sync.registry.add_provider`): True only while the deadline is in the future *and*
the process that wrote it is still its parent. So a worker sees False once the deadline passes
even if the master is stuck (SIGSTOP, swap), and a worker orphaned by a master SIGKILL sees False
at once. With an oracle whose terms have no deadline (the file oracle: the lock is held until the
holder dies), "in the future" is "forever", which is still this host's truth: nobody else can
lead while the master lives.

**One crown per worker**::

    import crown_sync.gunicorn
    post_worker_init, worker_exit = crown_sync.gunicorn.crown_per_worker(
        "scheduler", child="myapp.jobs:run_scheduler")

Each worker starts its own crown in ``post_worker_init`` (after the app is loaded, so the job
runs in the leading worker *with the app*), and stops it in ``worker_exit`` (max_requests
recycling, HUP, graceful shutdown: the job stops, then the worker abdicates and another worker or
host takes over). A callable or ``"module:function"`` child runs as a thread in the worker.
``is_leader(name)`` is True only in the one leading worker of the fleet. Each worker arms a
parent-death signal (SIGTERM) so that a master SIGKILL stops the leading worker's job at once
rather than when Gunicorn's own orphan check notices.

Connection loss: the crown behaves as everywhere (it keeps retrying with backoff; the term and
the job end at the term's deadline; is_leader turns False by the clock). Nothing here does I/O in
a request: ``is_leader`` reads memory.

Fork: no thread, lock or oracle connection is carried across fork on purpose. The master's crown
objects and oracles inherited by a worker are inert there (the engine and oracles mark them so);
only the read-only shared memory and the provider that reads it are used in workers. The crown in
a worker is created in that worker, after the fork.

Not guaranteed: with the master placement, a worker's True can outlive the master's own term by
the time the master takes to publish an end that is not a deadline (a stop, an oracle's "lost"
signal): the time its publishing thread takes to wake on the term's end (it re-publishes every
50 ms anyway), never past the deadline. The fencing token (``leader_token(name)``)
is the last line of defence for work done on the strength of an ``is_leader`` answer. HUP
re-reads ``gunicorn.conf.py`` but keeps the running crown: a changed ``child`` or oracle takes
effect on a restart (or USR2), not on HUP. Gunicorn's arbiter reaps every child process of the
master, so a ProcessChild's exit status can read as 255 ("collected elsewhere"); prefer a
CommandChild where the job's exit code matters.
"""

import importlib
import json
import logging
import math
import mmap
import os
import signal
import struct
import threading
from typing import Any, Callable, Dict, NamedTuple, Optional

from . import clock, registry
from .children import CommandChild, ProcessChild, ThreadChild, as_child
from .crown import Crown
from .oracle import Leader

__all__ = [
    "crown_in_master",
    "crown_per_worker",
    "MasterCrown",
    "WorkerCrown",
    "MasterHooks",
    "WorkerHooks",
    "leader_token",
    "master_view",
    "MasterView",
    "running_crown",
]

logger = logging.getLogger("crown_sync.gunicorn")

#: How often the master re-publishes its crown's state (catches ends that emit no event at once).
PUBLISH_INTERVAL = 0.05


# ------------------------------------------------------------------------- shared memory


class _Slot:
    """Anonymous shared memory, created in the master before fork.

    Layout: sequence (int64, odd while being written), deadline (double: -inf not leading, +inf
    leading with no deadline), token (int64, -1 for none), then the master's view (uint32 length
    and that many bytes of JSON: its crown's phase, the leader it knows, its last error's type).
    A seqlock: readers retry while a write is in progress, so they never see a deadline with
    another term's token, nor half a view. The mapping is sized for the largest leader record an
    oracle accepts; the kernel gives it pages only as they are written.
    """

    _FORMAT = "qdq"
    _VIEW_AT = struct.calcsize("qdqI")
    _VIEW_MAX = 1024 * 1024

    def __init__(self):
        self.owner = os.getpid()  # the master: workers trust the slot only while it is their parent
        self._map = mmap.mmap(-1, self._VIEW_AT + self._VIEW_MAX)  # MAP_SHARED | MAP_ANONYMOUS
        self._lock = threading.Lock()  # writers: the crown's callbacks and the publisher
        self._seq = 0
        self._store(-math.inf, -1, b"")

    def _store(self, deadline: float, token: int, view: Optional[bytes] = None) -> None:
        """Write the term's deadline and token, and ``view`` if given (None: keep the last)."""
        self._seq += 1
        struct.pack_into("q", self._map, 0, self._seq)  # odd: write in progress
        struct.pack_into("dq", self._map, 8, deadline, token)
        if view is not None:
            struct.pack_into("I", self._map, self._VIEW_AT - 4, len(view))
            self._map[self._VIEW_AT:self._VIEW_AT + len(view)] = view
        self._seq += 1
        struct.pack_into("q", self._map, 0, self._seq)

    def _stable(self, read: Callable[[], Any], failed: Any) -> Any:
        """``read()`` of a state no write was under way in (seqlock); ``failed`` if none came."""
        for _ in range(1000):
            before = struct.unpack_from("q", self._map, 0)[0]
            if before % 2:
                continue
            value = read()
            if struct.unpack_from("q", self._map, 0)[0] == before:
                return value
        return failed

    def read(self):
        """(deadline, token) as last published; (-inf, None) if it can't get a stable read."""
        deadline, token = self._stable(lambda: struct.unpack_from("dq", self._map, 8), (-math.inf, -1))
        return deadline, (None if token < 0 else token)

    def read_view(self) -> bytes:
        """The master's view as last published (b"" before the first, or without a stable read)."""
        def read() -> bytes:
            (length,) = struct.unpack_from("I", self._map, self._VIEW_AT - 4)
            return self._map[self._VIEW_AT:self._VIEW_AT + min(length, self._VIEW_MAX)]
        return self._stable(read, b"")


_slots: Dict[str, _Slot] = {}


def _trusted_slot(name: str) -> Optional[_Slot]:
    """The master's shared memory for ``name``, if this process may believe it."""
    slot = _slots.get(name)
    if slot is None or os.getpid() == slot.owner or os.getppid() != slot.owner:
        # No slot; or we are the master (its own crown answers); or our master is gone (orphaned
        # worker after a master SIGKILL): never trust what a dead master last wrote.
        return None
    return slot


def _slot_answer(name: str):
    """(leading, token) as this process may see it from the master's shared memory."""
    slot = _trusted_slot(name)
    if slot is None:
        return False, None
    deadline, token = slot.read()
    if clock.monotonic() < deadline:
        return True, token
    return False, None


def _provider(name: str) -> bool:
    return _slot_answer(name)[0]


class MasterView(NamedTuple):
    """What the Gunicorn master's crown knows, as a worker reads it (:func:`master_view`)."""

    #: The master crown's phase ("claiming", "leading", "following", ...).
    phase: str
    #: The leader it knows of (itself while leading), or None.
    leader: Optional[Leader]
    #: The type of its last oracle error (e.g. "OperationalError"), None while the oracle answers.
    error: Optional[str]


def master_view(name: str) -> Optional[MasterView]:
    """In a worker (or the job) of a master that runs the crown for ``name``: that crown's phase,
    the leader it knows and its oracle error, from the master's shared memory. No I/O. None in
    any other process, and in a worker whose master is gone."""
    slot = _trusted_slot(name)
    view = slot.read_view() if slot is not None else b""
    if not view:
        return None
    data = json.loads(view)
    leader = data["leader"]
    if leader is not None:
        leader = Leader(leader["identity"], leader["metadata"], leader["token"], leader["since"])
    return MasterView(data["phase"], leader, data["error"])


def _view_bytes(status) -> bytes:
    """The master crown's :class:`MasterView` as JSON, for the shared memory."""
    leader = status.leader
    record = None if leader is None else {
        "identity": leader.identity, "token": leader.token, "since": leader.since, "metadata": leader.metadata}
    # The exception's type only: the rest of the message may name hosts.
    error = status.last_error.split(": ")[1] if status.last_error and ": " in status.last_error else None
    view = json.dumps({"phase": status.phase, "leader": record, "error": error}).encode()
    if len(view) > _Slot._VIEW_MAX and record is not None:
        record["metadata"] = {}  # larger than any oracle's record: share who leads, not what it says
        view = json.dumps({"phase": status.phase, "leader": record, "error": error}).encode()
    return view


def leader_token(name: str) -> Optional[int]:
    """The fencing token of this host's current term of ``name``, or None if it doesn't lead.

    Works in the master (its crown), in a worker or the job (the master's shared memory), and in
    a worker that runs its own crown (crown per worker). Pass it to what you write to.
    """
    for crown in registry.crowns(name):
        if crown.is_leader():
            token = crown.status().token
            if token is not None:
                return token
    leading, token = _slot_answer(name)
    return token if leading else None


def _ensure_slot(name: str) -> _Slot:
    slot = _slots.get(name)
    if slot is None or slot.owner != os.getpid():
        slot = _slots[name] = _Slot()
    registry.add_provider(_provider)
    return slot


# ------------------------------------------------------------------------- helpers


def _resolve(spec):
    """A callable, or ``"package.module:attribute"`` imported now."""
    if callable(spec):
        return spec
    module_name, _, attribute = spec.partition(":")
    target = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"child {spec!r} is not callable")
    return target


def _check_spec(child, argument: str = "child") -> None:
    if isinstance(child, str):
        module_name, colon, attribute = child.partition(":")
        if not colon or not module_name or not attribute:
            raise ValueError(f"{argument} must be 'package.module:function', got {child!r}")


#: Listening sockets of the process that forks a job (the arbiter's or the worker's).
_listeners: list = []


def _job_main(term_info, target, args, kwargs):
    """First thing in a job process forked from the master or a worker.

    Drops what the fork copied from Gunicorn: its Python signal handlers (SIGCHLD would make the
    job reap its own subprocesses behind their back; SIGHUP/SIGQUIT would act on a copy of the
    arbiter) and its listening sockets (the job must not keep the port open).
    """
    for signum in signal.valid_signals():
        if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL, signal.SIGSTOP):
            continue  # SIGTERM/SIGINT were just set by crown_sync.children
        try:
            if callable(signal.getsignal(signum)):
                signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    for listener in _listeners:
        try:
            listener.close()
        except Exception:
            pass
    _resolve(target)(term_info, *args, **kwargs)


def _configure(hooks, name: str, child, oracle, stop_timeout, crown_options: Dict[str, Any]) -> None:
    """What both placements check and keep: the job's spec, ``stop_timeout``, and (a probe
    that makes no request) that the crown could be built from these options."""
    _check_spec(child)
    if stop_timeout is not None and (isinstance(stop_timeout, bool) or not isinstance(
            stop_timeout, (int, float)) or stop_timeout < 0):
        raise ValueError(f"stop_timeout must be a number of seconds >= 0 or None, got {stop_timeout!r}")
    _probe(name, oracle, crown_options)
    hooks.name = name
    hooks.child = child
    hooks.oracle = oracle
    hooks.stop_timeout = stop_timeout
    hooks.crown_options = crown_options


def _forked_job(child: ProcessChild) -> ProcessChild:
    if child.start_method != "fork":
        return child  # a fresh interpreter inherits neither handlers nor sockets
    return ProcessChild(
        _job_main, args=(child.target, child.args, child.kwargs), grace=child.grace, start_method="fork"
    )


def _add_app_callbacks(crown: Crown, app) -> None:
    """Give ``crown`` the callbacks the loaded app offers for its name: the Flask extension's
    signals (a Flask app as Gunicorn loaded it, not wrapped in a middleware)."""
    extensions = getattr(app, "extensions", None)
    offer = getattr(extensions.get("crown_sync"), "callbacks_for", None) if isinstance(extensions, dict) else None
    if offer is not None:
        crown.add_callbacks(**offer(crown.name))


def _probe(name: str, oracle, options: Dict[str, Any]) -> None:
    """Validate the crown's options now (config load), not when Gunicorn is already up."""
    Crown(name, oracle=oracle, **options).stop()


# ------------------------------------------------------------------------- the master placement


class MasterHooks(NamedTuple):
    on_starting: Callable
    when_ready: Callable
    on_exit: Callable


class _Running:
    """The master's crown for one name and what publishes its state to the workers: its
    callbacks (a term's start, its end, a new leader) and a thread that re-publishes every 50 ms
    and, while a term runs, wakes at once when it ends (``stop_event``), before its job is even
    stopped."""

    def __init__(self, crown: Crown, slot: _Slot):
        self.crown = crown
        self.slot = slot
        self.pid = os.getpid()
        self._stopped = threading.Event()
        self._view = None  # the view bytes last written
        published = lambda *args: self.publish()  # noqa: E731
        crown.add_callbacks(on_elected=published, on_deposed=published, on_new_leader=published)
        self._thread = threading.Thread(target=self._run, name=f"crown-sync-gunicorn:{crown.name}", daemon=True)
        self._thread.start()

    def publish(self) -> None:
        # Under the slot's lock the last write always reflects a read made after any earlier one.
        with self.slot._lock:
            status = self.crown.status()
            term = self.crown.term()
            view = _view_bytes(status)
            view, self._view = (None if view == self._view else view), view
            if term is not None and not self._stopped.is_set():
                deadline = term.deadline
                self.slot._store(math.inf if deadline is None else deadline,
                                 -1 if term.token is None else term.token, view)
            else:
                self.slot._store(-math.inf, -1, view)

    def _run(self) -> None:
        while not self._stopped.is_set():
            self.publish()
            term = self.crown.term()
            # A term's end sets its stop_event: the workers hear of it at once, not 50 ms later.
            (term.stop_event if term is not None else self._stopped).wait(PUBLISH_INTERVAL)

    def stop(self, timeout: Optional[float]) -> None:
        self._stopped.set()  # workers see False from now on, before the job is even stopped
        self.publish()
        try:
            self.crown.stop(timeout)
        finally:
            self.publish()


_running: Dict[str, _Running] = {}


def running_crown(name: str) -> Optional[Crown]:
    """The crown this process runs for ``name`` through these hooks (master or worker), or None."""
    running = _running.get(name)
    if running is not None and running.pid == os.getpid():
        return running.crown
    worker = _worker_crowns.get(name)
    if worker is not None and worker[0] == os.getpid():
        return worker[1]
    return None


class MasterCrown:
    """The crown in the Gunicorn master. Use :func:`crown_in_master`, or call these methods
    from hooks of your own (each takes the arbiter, as Gunicorn passes it).

    ``child``: a :class:`~crown_sync.ProcessChild`, a :class:`~crown_sync.CommandChild`, a
    callable ``f(term_info)`` or ``"package.module:function"`` (both run as a forked
    ProcessChild; the string is imported in the job process, so the master need not import your
    app). ``stop_timeout``: how long ``on_exit`` waits for the job and the abdication. Other
    keyword arguments go to :class:`~crown_sync.Crown`.
    """

    def __init__(self, name: str, child, oracle=None, stop_timeout: Optional[float] = 30.0, **crown_options):
        if child is None:
            raise TypeError("child is required: the job the leading master runs")
        if isinstance(child, ThreadChild) or not (
                isinstance(child, (ProcessChild, CommandChild, str)) or callable(child)):
            raise TypeError(
                "child must be a ProcessChild, a CommandChild, a callable or 'module:function' "
                f"(run in a process forked from the master), not {type(child).__name__}: a thread "
                "in the Gunicorn master could not be killed at the end of a term"
            )
        _configure(self, name, child, oracle, stop_timeout, crown_options)

    def _job(self):
        child = self.child
        if isinstance(child, CommandChild):
            return child
        if isinstance(child, ProcessChild):
            return _forked_job(child)
        return ProcessChild(_job_main, args=(child, (), {}))  # the string is imported in the job

    def on_starting(self, server=None) -> None:
        """Create the shared memory (before any fork) and register the leadership provider."""
        _ensure_slot(self.name)

    def when_ready(self, server=None) -> None:
        """Start the crown in the master (once; a HUP re-reads the config but keeps it)."""
        running = _running.get(self.name)
        if running is not None and running.pid == os.getpid():
            return
        slot = _slots.get(self.name)
        if slot is None or slot.owner != os.getpid():
            slot = _ensure_slot(self.name)  # still before the first fork: when_ready precedes it
        if server is not None:
            _listeners[:] = list(getattr(server, "LISTENERS", []) or [])
        crown = Crown(self.name, oracle=self.oracle, child=self._job(), **self.crown_options)
        # The app is loaded in the master only with preload_app (never load it here otherwise).
        _add_app_callbacks(crown, getattr(getattr(server, "app", None), "callable", None))
        _running[self.name] = _Running(crown, slot)
        crown.start()
        logger.info("crown %s started in the Gunicorn master (pid %s)", self.name, os.getpid())

    def on_exit(self, server=None) -> None:
        """Stop the job, abdicate, close: the next leader can start at once."""
        running = _running.pop(self.name, None)
        if running is None or running.pid != os.getpid():
            return
        running.stop(self.stop_timeout)
        logger.info("crown %s stopped in the Gunicorn master", self.name)

    def hooks(self) -> MasterHooks:
        return MasterHooks(self.on_starting, self.when_ready, self.on_exit)


def crown_in_master(name: str, child, oracle=None, **options) -> MasterHooks:
    """``on_starting, when_ready, on_exit = crown_in_master(name, child, oracle, ...)``."""
    return MasterCrown(name, child, oracle=oracle, **options).hooks()


# ------------------------------------------------------------------------- the worker placement


class WorkerHooks(NamedTuple):
    post_worker_init: Callable
    worker_exit: Callable


#: name -> (pid, crown) of the crown run by this worker.
_worker_crowns: Dict[str, tuple] = {}


class WorkerCrown:
    """One crown per Gunicorn worker. Use :func:`crown_per_worker`, or call these methods from
    hooks of your own.

    ``child``: a callable ``f(term)`` or ``"package.module:function"`` (imported in the worker,
    after the app is loaded), run as a thread in the leading worker; or any
    :class:`~crown_sync.ThreadChild` / ProcessChild / CommandChild. ``die_with_master``: the
    worker asks the kernel for SIGTERM when the master dies, so the job stops at once (a graceful
    worker exit: the job is stopped, then the crown abdicates). Other keyword arguments go to
    :class:`~crown_sync.Crown`.
    """

    def __init__(self, name: str, child, oracle=None, stop_timeout: Optional[float] = 30.0,
                 die_with_master: bool = True, **crown_options):
        if child is None:
            raise TypeError("child is required: the job the leading worker runs")
        if not isinstance(child, str):
            as_child(child)  # raises TypeError naming "child" for anything unusable
        if not isinstance(die_with_master, bool):
            raise TypeError(f"die_with_master must be a bool, got {type(die_with_master).__name__}")
        self.die_with_master = die_with_master
        _configure(self, name, child, oracle, stop_timeout, crown_options)

    def _job(self):
        child = self.child
        if isinstance(child, ProcessChild):
            return _forked_job(child)
        if isinstance(child, (ThreadChild, CommandChild)):
            return child
        return ThreadChild(_resolve(child))

    def post_worker_init(self, worker) -> None:
        """In the worker, app loaded: start this worker's crown."""
        current = _worker_crowns.get(self.name)
        if current is not None and current[0] == os.getpid():
            return
        if self.die_with_master:
            _die_with_parent(getattr(worker, "ppid", None))
        _listeners[:] = list(getattr(worker, "sockets", []) or [])
        crown = Crown(self.name, oracle=self.oracle, child=self._job(), **self.crown_options)
        _add_app_callbacks(crown, getattr(worker, "wsgi", None))
        _worker_crowns[self.name] = (os.getpid(), crown)
        crown.start()

    def worker_exit(self, server, worker) -> None:
        """In the exiting worker: stop the job, abdicate. (Gunicorn also calls this hook in the
        master for a worker that vanished; there is nothing to do there.)"""
        current = _worker_crowns.get(self.name)
        if current is None or current[0] != os.getpid():
            return
        del _worker_crowns[self.name]
        current[1].stop(self.stop_timeout)

    def hooks(self) -> WorkerHooks:
        return WorkerHooks(self.post_worker_init, self.worker_exit)


def _die_with_parent(expected_parent: Optional[int]) -> None:
    from ._supervise import set_parent_death_signal

    set_parent_death_signal(signal.SIGTERM)
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), signal.SIGTERM)  # the master died before the signal was armed


def crown_per_worker(name: str, child, oracle=None, **options) -> WorkerHooks:
    """``post_worker_init, worker_exit = crown_per_worker(name, child, oracle, ...)``."""
    return WorkerCrown(name, child, oracle=oracle, **options).hooks()
