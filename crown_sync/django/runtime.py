"""This process's own crown (``CROWN_SYNC["START"]``) and the leader as seen from here.

The own crown is started by the first request a process serves (Django's ``request_started``, sent
by the WSGI and the ASGI handlers alike) or by :func:`start`; never at import, in ``ready()`` or in
a management command (not by the test client's requests either: ``manage.py test``). So under ``runserver`` only the serving child contends (the autoreloader's
watcher never serves a request), under an ASGI server each serving worker does, after any fork.
The crown is kept per process id: a copy inherited across fork is not this process's, and a new
one is started there. It is stopped at interpreter exit (a reload, a normal exit): the job first,
then the crown abdicates.
"""

import atexit
import logging
import os
import threading
from typing import Optional

import crown_sync

from .._web import LeaderReads
from . import signals
from .conf import Config, config

__all__ = ["start", "stop", "crown", "leader", "leader_url", "is_leader"]

logger = logging.getLogger("crown_sync.django")

_lock = threading.Lock()
_own = None  # (pid, Crown)
_failed_in = None  # the pid whose own crown could not be made (said once, not retried per request)
_reader = None  # (pid, ORACLE setting, Oracle) for follower reads
_reads = LeaderReads()  # the oracle's answer, cached per Config


def crown() -> Optional[crown_sync.Crown]:
    """This process's own crown, or None if it has not been started here."""
    current = _own
    return current[1] if current is not None and current[0] == os.getpid() else None


def _run_job(term, job) -> None:
    from django.db import connections

    from ..gunicorn import _resolve

    try:
        _resolve(job)(term)
    finally:
        connections.close_all()  # this thread's own database connections: nobody else closes them


def start() -> crown_sync.Crown:
    """Start this process's own crown for ``CROWN_SYNC["NAME"]`` (idempotent per process; after
    a fork, a new one). Returns it. Never blocks on the oracle."""
    global _own
    settings = config()
    with _lock:
        running = crown()
        if running is not None:
            return running
        child = crown_sync.ThreadChild(_run_job, args=(settings.job,)) if settings.job is not None else None
        running = crown_sync.Crown(settings.name, oracle=settings.oracle, child=child, metadata=settings.metadata,
                                   **settings.options, **signals.callbacks(settings.name))
        _own = (os.getpid(), running)
        atexit.register(_stop_if_ours, os.getpid(), running)
    return running.start()


def stop(timeout: Optional[float] = None) -> None:
    """Stop this process's own crown (the job first, then abdicate, then close), if any."""
    global _own
    with _lock:
        running = crown()
        if running is not None:
            _own = None
    if running is not None:
        running.stop(timeout)


def _stop_if_ours(pid: int, running) -> None:
    if os.getpid() == pid:  # atexit handlers are inherited by forked processes
        running.stop(10.0)


def start_on_request(sender=None, **kwargs) -> None:
    """``request_started`` receiver: the first request a process serves starts its own crown.

    A crown that cannot be made (its oracle's library missing, the default file oracle's
    directory impossible to create) is logged once per process and not tried again: Django
    sends this signal outside its error handling, so raising would fail every request."""
    global _failed_in
    if crown() is not None or _failed_in == os.getpid():
        return
    if getattr(sender, "__module__", None) == "django.test.client":
        return  # Django's test client: "manage.py test" is a management command, it never leads
    try:
        if config().start:  # config() too: it checks the settings by making a crown
            start()
    except Exception:
        _failed_in = os.getpid()
        logger.exception("crown_sync: this process's own crown could not be started; it will not lead")


def is_leader() -> bool:
    """:func:`crown_sync.is_leader` for ``CROWN_SYNC["NAME"]``: no I/O."""
    return crown_sync.is_leader(config().name)


def _oracle_for_reads(settings: Config):
    global _reader
    current = _reader
    if current is None or current[:2] != (os.getpid(), settings.oracle):
        from ..urls import default_oracle, oracle_from_url

        oracle = oracle_from_url(settings.oracle) if settings.oracle else default_oracle()
        # One inherited across fork is dropped, never closed: the parent's connection is untouched.
        current = _reader = (os.getpid(), settings.oracle, oracle)
    return current[2]


def leader():
    """The current leader of ``CROWN_SYNC["NAME"]`` (a :class:`crown_sync.Leader`) or None: from a
    crown in this process, else from the Gunicorn master that runs the crown (shared memory), else
    read from the oracle at most once per ``LEADER_CACHE`` seconds. Raises what the oracle raised
    (that is cached too)."""
    settings = config()
    return _reads.leader(settings.name, crown(), lambda: _oracle_for_reads(settings).find_leader(settings.name),
                         settings.leader_cache, key=settings)


def leader_url() -> Optional[str]:
    """The leader's base URL from its metadata (``LEADER_URL_KEY``), or None."""
    try:
        found = leader()
    except Exception:
        return None
    if found is None:
        return None
    url = (found.metadata or {}).get(config().leader_url_key)
    return url if isinstance(url, str) and url.startswith(("http://", "https://")) else None
