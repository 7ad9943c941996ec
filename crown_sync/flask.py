"""Flask extension: leadership in request handlers, signals, a CLI command, a status endpoint.

::

    from crown_sync.flask import CrownSync, leader_only

    crown = CrownSync()                       # app factories: crown.init_app(app) later

    def create_app():
        app = Flask(__name__)
        app.config["CROWN_SYNC_NAME"] = "scheduler"
        crown.init_app(app)
        return app

    @bp.post("/reindex")
    @leader_only                              # followers answer 503 + Retry-After (or redirect)
    def reindex(): ...

Where the crown runs. The extension itself starts nothing at import or in ``init_app``: under
Gunicorn with ``preload_app`` that would be the master, and threads do not survive fork (nor
should the master run your job); under ``flask run --debug`` it would also be the reloader's
watcher process, which never serves a request. Leadership comes from one of:

* :mod:`crown_sync.gunicorn` hooks (the crown in the master, answered in every worker through
  shared memory; or one crown per worker);
* any :class:`crown_sync.Crown` your code starts in this process;
* ``CROWN_SYNC_START = True``: the extension runs a crown of its own in each process that serves
  requests, started on that process's first request (or by :meth:`CrownSync.start`), after any
  fork; ``job`` (if given) is its leader child, run in a thread inside an app context. It is
  stopped at interpreter exit (so the reloader's restart and a normal exit abdicate).

In every case :func:`crown_sync.is_leader` is the answer, with no I/O.

Configuration (``app.config``), read by ``init_app``:

``CROWN_SYNC_NAME``            the election name (required)
``CROWN_SYNC_ORACLE``          oracle URL; None: ``$CROWN_SYNC_ORACLE`` or the file oracle
``CROWN_SYNC_START``           False; True: run this extension's own crown (see above)
``CROWN_SYNC_METADATA``        metadata the own crown publishes, e.g. ``{"url": "http://a:8000"}``
``CROWN_SYNC_OPTIONS``         other :class:`crown_sync.Crown` options for the own crown
``CROWN_SYNC_FOLLOWER``        ``"503"`` (default) or ``"redirect"``: what ``leader_only`` does
``CROWN_SYNC_RETRY_AFTER``     seconds in the 503's ``Retry-After`` header (default 5)
``CROWN_SYNC_LEADER_URL_KEY``  the leader's metadata key holding its base URL (default ``"url"``)
``CROWN_SYNC_LEADER_CACHE``    seconds a follower caches the leader read from the oracle (1.0)
``CROWN_SYNC_STATUS_URL``      None (default: no endpoint) or a path such as ``"/_crown_sync"``

Signals (blinker, as Flask's own): :data:`elected`, :data:`deposed`, :data:`new_leader`, sent with
the app as sender, from the crown's thread, through that crown's callbacks
(:mod:`crown_sync.callbacks`): for the extension's own crown, for the crown that
:mod:`crown_sync.gunicorn`'s hooks start for ``CROWN_SYNC_NAME`` in a process where they find
this app loaded (a worker; the master with ``preload_app``), and for any crown you give
``state.callbacks_for(name)`` (``app.extensions["crown_sync"]``) with ``Crown.add_callbacks``.

Connection loss: nothing here blocks a request on the oracle except a follower's redirect and
the status endpoint, which read the leader from the oracle at most once per
``CROWN_SYNC_LEADER_CACHE`` per process (errors are cached too, but the one read that fails takes
as long as the oracle's client takes to give up); an oracle error there gives the plain 503
(redirect) or ``"leader": null`` (status). Fork: the oracle used for those reads is created per process (a
copy inherited across fork is dropped, never closed, so the parent's connection is untouched).
"""

import atexit
import functools
import os
import threading
import time
import weakref
from typing import Any, Callable, Dict, Optional

import click
import flask
from blinker import Namespace
from flask.cli import AppGroup

import crown_sync
from .crown import check_name
from ._web import LeaderReads, leader_summary, status_body
from .urls import default_oracle, oracle_from_url

__all__ = ["CrownSync", "leader_only", "elected", "deposed", "new_leader", "crown_cli"]

_signals = Namespace()
#: Sent when a crown of the app's election in this process starts a term (``name=``, ``token=``,
#: ``identity=``, ``term=``); its child runs.
elected = _signals.signal("crown-sync-elected")
#: Sent when that term ended, for any reason (also ``reason=``: see :mod:`crown_sync.callbacks`;
#: ``lost=``: True unless it was given up, by ``stop()`` or a child that exited).
deposed = _signals.signal("crown-sync-deposed")
#: Sent when the leader known to such a crown changes to another one (``leader=``: its identity;
#: ``token=``).
new_leader = _signals.signal("crown-sync-new-leader")

DEFAULTS: Dict[str, Any] = {
    "CROWN_SYNC_ORACLE": None,
    "CROWN_SYNC_START": False,
    "CROWN_SYNC_METADATA": None,
    "CROWN_SYNC_OPTIONS": None,
    "CROWN_SYNC_FOLLOWER": "503",
    "CROWN_SYNC_RETRY_AFTER": 5,
    "CROWN_SYNC_LEADER_URL_KEY": "url",
    "CROWN_SYNC_LEADER_CACHE": 1.0,
    "CROWN_SYNC_STATUS_URL": None,
}


def _config(app) -> Dict[str, Any]:
    config = {key: app.config.get(key, default) for key, default in DEFAULTS.items()}
    config["CROWN_SYNC_NAME"] = check_name(app.config.get("CROWN_SYNC_NAME"), "CROWN_SYNC_NAME")
    if config["CROWN_SYNC_FOLLOWER"] not in ("503", "redirect"):
        raise ValueError(f"CROWN_SYNC_FOLLOWER must be '503' or 'redirect', got {config['CROWN_SYNC_FOLLOWER']!r}")
    for key in ("CROWN_SYNC_RETRY_AFTER", "CROWN_SYNC_LEADER_CACHE"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{key} must be a number of seconds >= 0, got {value!r}")
    for key in ("CROWN_SYNC_METADATA", "CROWN_SYNC_OPTIONS"):
        if config[key] is not None and not isinstance(config[key], dict):
            raise TypeError(f"{key} must be a dict or None, got {type(config[key]).__name__}")
    if not isinstance(config["CROWN_SYNC_START"], bool):
        raise TypeError("CROWN_SYNC_START must be a bool")
    oracle = config["CROWN_SYNC_ORACLE"]
    if oracle is not None and not isinstance(oracle, (str, crown_sync.Oracle)):
        raise TypeError(f"CROWN_SYNC_ORACLE must be an oracle URL, an Oracle or None, got {type(oracle).__name__}")
    url = config["CROWN_SYNC_STATUS_URL"]
    if url is not None and (not isinstance(url, str) or not url.startswith("/")):
        raise ValueError(f"CROWN_SYNC_STATUS_URL must be None or a path starting with '/', got {url!r}")
    return config


class _State:
    """Per-app state, in ``app.extensions["crown_sync"]``."""

    def __init__(self, extension: "CrownSync", app, config: Dict[str, Any]):
        self.extension = extension
        self.config = config
        self.name = config["CROWN_SYNC_NAME"]
        self._app = weakref.ref(app)
        self._lock = threading.Lock()
        self._crown = None  # (pid, Crown) of the own crown
        self._oracle = None  # (pid, Oracle) for follower reads
        self._reads = LeaderReads()

    # -- signals --------------------------------------------------------------------------
    def callbacks_for(self, name: str) -> Dict[str, Callable]:
        """The callbacks that send this app's signals, for a crown of ``name`` (none for another
        name). They hold the app weakly: once it is gone they send nothing."""
        if name != self.name:
            return {}
        app_ref = self._app

        def on_elected(term) -> None:
            app = app_ref()
            if app is not None:
                elected.send(app, name=name, token=term.token, identity=term.identity, term=term)

        def on_deposed(term, reason: str) -> None:
            app = app_ref()
            if app is not None:
                deposed.send(app, name=name, token=term.token, identity=term.identity, term=term,
                             reason=reason, lost=reason not in ("stop", "child_exited"))

        def on_new_leader(leader) -> None:
            app = app_ref()
            if app is not None and leader is not None:  # "none known" is not a new leader
                new_leader.send(app, name=name, leader=leader.identity, token=leader.token)

        return {"on_elected": on_elected, "on_deposed": on_deposed, "on_new_leader": on_new_leader}

    # -- the own crown ----------------------------------------------------------------------
    def crown(self):
        current = self._crown
        return current[1] if current is not None and current[0] == os.getpid() else None

    def start(self, app):
        with self._lock:
            crown = self.crown()
            if crown is not None:
                return crown
            job = self.extension._job
            child = crown_sync.ThreadChild(_run_in_app_context, args=(app, job)) if job else None
            crown = crown_sync.Crown(
                self.name,
                oracle=self.config["CROWN_SYNC_ORACLE"],
                child=child,
                metadata=self.config["CROWN_SYNC_METADATA"],
                **(self.config["CROWN_SYNC_OPTIONS"] or {}),
            )
            crown.add_callbacks(**self.callbacks_for(self.name))  # after any of CROWN_SYNC_OPTIONS
            self._crown = (os.getpid(), crown)
            atexit.register(_stop_if_ours, os.getpid(), crown)
        return crown.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        with self._lock:
            crown, self._crown = self.crown(), None
        if crown is not None:
            crown.stop(timeout)

    # -- the leader, as seen from here ---------------------------------------------------------
    def _reader(self):
        current = self._oracle
        if current is None or current[0] != os.getpid():
            oracle = self.config["CROWN_SYNC_ORACLE"]
            if isinstance(oracle, str):
                oracle = oracle_from_url(oracle)
            elif oracle is None:
                oracle = default_oracle()
            current = self._oracle = (os.getpid(), oracle)  # an inherited one is dropped, not closed
        return current[1]

    def leader(self):
        """The current leader (Leader or None): from a crown in this process, else from the
        Gunicorn master that runs the crown (shared memory), else the oracle (read at most once
        per CROWN_SYNC_LEADER_CACHE seconds). Raises if the oracle can't be read."""
        return self._reads.leader(self.name, self.crown(), lambda: self._reader().find_leader(self.name),
                                  self.config["CROWN_SYNC_LEADER_CACHE"])

    def leader_url(self) -> Optional[str]:
        try:
            leader = self.leader()
        except Exception:
            return None
        if leader is None:
            return None
        url = (leader.metadata or {}).get(self.config["CROWN_SYNC_LEADER_URL_KEY"])
        return url if isinstance(url, str) and url.startswith(("http://", "https://")) else None


def _run_in_app_context(term, app, job) -> None:
    with app.app_context():
        job(term)


def _stop_if_ours(pid: int, crown) -> None:
    if os.getpid() == pid:  # atexit handlers are inherited by forked processes
        crown.stop(10.0)


def _state(app=None) -> _State:
    app = app if app is not None else flask.current_app
    try:
        return app.extensions["crown_sync"]
    except KeyError:
        raise RuntimeError("crown_sync.flask.CrownSync was not initialised on this app (init_app)") from None


# ------------------------------------------------------------------------------ views


def _follower_response(state: _State):
    if state.config["CROWN_SYNC_FOLLOWER"] == "redirect":
        url = state.leader_url()
        if url is not None and url.rstrip("/") != flask.request.host_url.rstrip("/"):
            target = url.rstrip("/") + flask.request.full_path.rstrip("?")
            return flask.redirect(target, code=307)  # 307: same method and body at the leader
    response = flask.jsonify(error="not the leader", name=state.name)
    response.status_code = 503
    response.headers["Retry-After"] = str(int(round(state.config["CROWN_SYNC_RETRY_AFTER"])))
    return response


def leader_only(view: Callable) -> Callable:
    """Run the view only where :func:`crown_sync.is_leader` is True for the app's election;
    elsewhere answer 503 + ``Retry-After``, or redirect (307) to the leader's URL. An ``async
    def`` view runs as Flask runs one (``ensure_sync``; needs ``flask[async]``)."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        state = _state()
        if crown_sync.is_leader(state.name):
            # ensure_sync: an ``async def`` view runs (Flask's async support, flask[async]).
            return flask.current_app.ensure_sync(view)(*args, **kwargs)
        return _follower_response(state)

    return wrapper


def _status_view():
    state = _state()
    leading = crown_sync.is_leader(state.name)
    response = flask.jsonify(status_body(state.name, state.crown(), leading, state.leader))
    if flask.request.args.get("require") == "leader" and not leading:
        response.status_code = 503  # for load balancers that route to the leader only
    response.headers["Cache-Control"] = "no-store"
    return response


# ------------------------------------------------------------------------------ CLI

crown_cli = AppGroup("crown", help="crown_sync: who leads this app's election.")


@crown_cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def _status_command(as_json: bool) -> None:
    """Print the current leader of CROWN_SYNC_NAME, read from the oracle.

    Exit code 0 if it has a leader, 1 if it has none, 3 if the oracle could not be asked (as
    ``crown-sync status``).
    """
    import json

    from . import cli

    state = _state()
    configured = state.config["CROWN_SYNC_ORACLE"]
    # The CLI's own helpers: bad URL exit 2, unreachable exit 3, never a password in the message.
    oracle = configured if isinstance(configured, crown_sync.Oracle) else cli._open_oracle(configured)
    oracle_url = configured if isinstance(configured, str) else None
    try:
        leader = cli._find_leader(state.name, oracle, oracle_url)
    finally:
        if oracle is not configured:  # ours to close, not the app's
            cli._close_quietly(oracle)
    if as_json:
        click.echo(json.dumps({"name": state.name, "leader": leader_summary(leader)}))
    elif leader is None:
        click.echo(f"{state.name}: no leader")
    else:
        url = (leader.metadata or {}).get(state.config["CROWN_SYNC_LEADER_URL_KEY"])
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(leader.since)) if leader.since else "?"
        click.echo(f"{state.name}: led by {leader.identity} (token {leader.token}, since {since})"
                   + (f" at {url}" if url else ""))
    raise SystemExit(0 if leader is not None else 1)


# ------------------------------------------------------------------------------ the extension


class CrownSync:
    """The Flask extension. ``CrownSync(app)``, or ``CrownSync()`` then ``init_app(app)`` per app.

    ``job``: the leader child of the extension's own crown (``CROWN_SYNC_START``), called as
    ``job(term)`` in a thread inside an app context; it must return soon after
    ``term.stop_event`` is set. Also settable with the :meth:`leader_job` decorator.
    """

    def __init__(self, app=None, job: Optional[Callable] = None):
        if job is not None and not callable(job):
            raise TypeError("job must be callable")
        self._job = job
        if app is not None:
            self.init_app(app)

    def init_app(self, app) -> None:
        if "crown_sync" in app.extensions:
            raise RuntimeError("crown_sync.flask.CrownSync is already initialised on this app")
        config = _config(app)
        state = _State(self, app, config)
        app.extensions["crown_sync"] = state
        if config["CROWN_SYNC_START"]:
            app.before_request(functools.partial(_start_on_request, state))
        if config["CROWN_SYNC_STATUS_URL"]:
            app.add_url_rule(config["CROWN_SYNC_STATUS_URL"], "crown_sync_status", _status_view)
        app.cli.add_command(crown_cli)

    def leader_job(self, job: Callable) -> Callable:
        """Decorator: set ``job`` (see the class docstring)."""
        self._job = job
        return job

    leader_only = staticmethod(leader_only)

    def start(self, app=None):
        """Start this process's own crown for the app (idempotent per process; after a fork it
        starts a new one). Returns the Crown."""
        app = app if app is not None else flask.current_app._get_current_object()
        return _state(app).start(app)

    def stop(self, app=None, timeout: Optional[float] = None) -> None:
        _state(app).stop(timeout)

    def is_leader(self, app=None) -> bool:
        return crown_sync.is_leader(_state(app).name)

    def leader(self, app=None):
        """The current leader (a :class:`crown_sync.Leader`) or None; may read the oracle."""
        return _state(app).leader()


def _start_on_request(state: _State) -> None:
    if state.crown() is None:
        state.start(flask.current_app._get_current_object())

