"""Telemetry events: one list, and the code is held to it.

Every event a crown emits is named in :data:`EVENTS` (the tests check the code against this
list, both ways). Names follow Elixir Crown's ``[:crown, group, event]`` shape as dotted strings.
A handler is called as ``handler(event, metadata)`` in the thread that emitted the event; the
metadata dict always has ``name``, ``identity``, ``phase``, ``oracle`` (never with a password) and
``leader`` (the leader's identity as last known, or None), plus what the event adds. A handler that
raises is logged and detached from nothing: it simply doesn't disturb the crown.
"""

import itertools
import logging
import threading
from typing import Callable, Dict, Iterable, Optional, Tuple

__all__ = ["EVENTS", "attach", "detach", "attach_default_logger", "emit"]

logger = logging.getLogger("crown_sync")

#: Every event name, with what it adds to the metadata.
EVENTS: Tuple[str, ...] = (
    "crown.process.initialized",  # crown started
    "crown.process.terminating",  # stop() began; +reason
    "crown.process.stopped",  # loop ended, oracle closed
    "crown.leadership.claimed",  # a term began; +token, +deadline_in
    "crown.leadership.refreshed",  # the oracle confirmed the term; +token, +deadline_in
    "crown.leadership.rejected",  # a claim found another leader (or none yet visible)
    "crown.leadership.lost",  # the term ended without our asking; +token, +reason
    "crown.leadership.abdicated",  # we gave the crown up (stop, child exit, ...); +token, +reason
    "crown.monitor.started",  # watching the current leader
    "crown.monitor.failed",  # could not watch (oracle error); +error
    "crown.monitor.timeout",  # monitor_timeout passed: claiming again
    "crown.monitor.leader_down",  # the watched leader may be gone: claiming now
    "crown.child.started",  # +kind ("leader"/"follower"), +pid, +restarts
    "crown.child.stopped",  # we stopped it; +kind, +exitcode
    "crown.child.exited",  # it ended by itself; +kind, +exitcode
    "crown.oracle.error",  # an oracle call failed; +operation, +error
    "crown.oracle.notice",  # the oracle cannot protect against something (said once); +notice
)

_EVENT_SET = frozenset(EVENTS)
_handlers: Dict[int, Tuple[Callable, Optional[Tuple[str, ...]]]] = {}
_handlers_lock = threading.Lock()
_ids = itertools.count(1)


def attach(handler: Callable[[str, dict], None], prefixes: Optional[Iterable[str]] = None) -> int:
    """Call ``handler(event, metadata)`` for every event (or those starting with a prefix).

    Returns a handle for :func:`detach`.
    """
    if not callable(handler):
        raise TypeError("handler must be callable")
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    prefix_tuple = tuple(prefixes) if prefixes is not None else None
    if prefix_tuple is not None and not all(isinstance(prefix, str) for prefix in prefix_tuple):
        raise TypeError("prefixes must be a str or an iterable of str")
    with _handlers_lock:
        handle = next(_ids)
        _handlers[handle] = (handler, prefix_tuple)
    return handle


def detach(handle: int) -> bool:
    """Remove a handler; True if it was attached."""
    with _handlers_lock:
        return _handlers.pop(handle, None) is not None


def emit(event: str, metadata: dict) -> None:
    """Deliver an event to the handlers. Unknown names are a bug in crown_sync: ValueError."""
    if event not in _EVENT_SET:
        raise ValueError(f"telemetry event {event!r} is not in crown_sync.telemetry.EVENTS")
    handlers = list(_handlers.values())  # a snapshot: handlers may attach/detach concurrently
    for handler, prefixes in handlers:
        if prefixes is not None and not event.startswith(prefixes):
            continue
        try:
            handler(event, dict(metadata))
        except Exception:  # a handler must never disturb the crown
            logger.exception("telemetry handler %r failed on %s", handler, event)


_LOG_KEYS = ("token", "reason", "exitcode", "kind", "pid", "operation", "error", "deadline_in", "notice")


def attach_default_logger(level: int = logging.INFO, prefixes: Optional[Iterable[str]] = None) -> int:
    """Log every event through the ``crown_sync`` logger at ``level``; returns the handle."""

    def log_event(event: str, metadata: dict) -> None:
        if not logger.isEnabledFor(level):
            return
        extras = " ".join(
            f"{key}={metadata[key]}" for key in _LOG_KEYS if metadata.get(key) is not None
        )
        logger.log(
            level,
            "%s name=%s identity=%s phase=%s leader=%s oracle=%s %s",
            event,
            metadata.get("name"),
            metadata.get("identity"),
            metadata.get("phase"),
            metadata.get("leader"),
            metadata.get("oracle"),
            extras,
        )

    return attach(log_event, prefixes)
