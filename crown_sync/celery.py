"""Celery beat on every host, sending due tasks only while its crown leads.

The way celery-redbeat's ``RedBeatScheduler`` holds a Redis lock, with crown_sync's terms instead::

    celery -A proj beat -S crown_sync.celery:LeaderScheduler

(or ``beat_scheduler = "crown_sync.celery:LeaderScheduler"``). Every beat contends for the
election ``crown_sync_name`` on ``crown_sync_oracle`` (Celery settings). All of them keep ticking
their schedule; only the leader sends, and it checks its term right before each send, so no task
leaves a beat after its term's deadline has passed. A follower *skips* the entries that fall due
(it advances them as if sent), so a beat that takes over sends at its next slot and not a burst
of overdue ones. Each task sent carries the term's fencing token in a message header
(``crown_sync_token``; a task reads it as ``self.request.get("crown_sync_token")``).

Settings: ``crown_sync_name`` (default ``"celery-beat"``), ``crown_sync_oracle`` (an oracle URL;
default ``$CROWN_SYNC_ORACLE``, else the local file lock), ``crown_sync_options`` (a dict of more
:class:`crown_sync.Crown` keyword options, e.g. ``{"monitor_delay": 1}``) and
``crown_sync_token_header`` (the header's name; ``None`` sends no header). See docs/celery.rst.
"""

import copy
import inspect
import logging
from typing import Any, Dict, Optional

from celery.beat import PersistentScheduler

import crown_sync

__all__ = ["LeaderScheduler", "crown_from_config"]

logger = logging.getLogger("crown_sync.celery")

DEFAULT_NAME = "celery-beat"
DEFAULT_TOKEN_HEADER = "crown_sync_token"
# What the scheduler itself decides: the beat sends, so it runs no child of its own.
_NOT_OPTIONS = {"self", "name", "oracle", "child", "follower_child"}


def _options(value: Any) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"crown_sync_options must be a dict of Crown options, got {type(value).__name__}")
    accepted = set(inspect.signature(crown_sync.Crown).parameters) - _NOT_OPTIONS
    unknown = sorted(set(value) - accepted)
    if unknown:
        raise ValueError(f"crown_sync_options: unknown option(s) {', '.join(map(repr, unknown))}; "
                         f"accepted: {', '.join(sorted(accepted))}")
    return dict(value)


def crown_from_config(conf) -> crown_sync.Crown:
    """A crown (not started) from Celery settings ``crown_sync_name``, ``crown_sync_oracle`` and
    ``crown_sync_options``. Bad values raise here, naming the setting."""
    name = conf.get("crown_sync_name") or DEFAULT_NAME
    oracle = conf.get("crown_sync_oracle")
    if oracle is not None and not isinstance(oracle, str):
        raise TypeError(f"crown_sync_oracle must be an oracle URL (str), got {type(oracle).__name__}")
    crown = crown_sync.Crown(name, oracle=oracle or None, **_options(conf.get("crown_sync_options")))
    crown.add_callbacks(on_elected=_on_elected, on_deposed=_on_deposed,
                        on_new_leader=lambda leader: _on_new_leader(crown, leader))
    return crown


def _on_elected(term) -> None:
    logger.info("crown_sync: this beat leads %s (token %s): it sends due tasks", term.name, term.token)


def _on_deposed(term, reason) -> None:
    logger.info("crown_sync: this beat no longer leads %s (%s): due tasks are skipped", term.name, reason)


def _on_new_leader(crown, leader) -> None:
    if leader is not None and leader.identity != crown.identity:
        logger.info("crown_sync: %s is led by %s: this beat skips due tasks", crown.name, leader.identity)


class LeaderScheduler(PersistentScheduler):
    """A :class:`celery.beat.PersistentScheduler` that sends only while its crown leads."""

    #: seconds ``close()`` waits for the crown to stop its term and abdicate
    stop_timeout = 10.0

    def __init__(self, app, *args, **kwargs):
        header = app.conf.get("crown_sync_token_header", DEFAULT_TOKEN_HEADER)
        if header is not None and not (isinstance(header, str) and header):
            raise TypeError(f"crown_sync_token_header must be a non-empty str or None, got {header!r}")
        self.token_header: Optional[str] = header
        self._last_error: Optional[str] = None
        # Made before the base class's __init__, which runs setup_schedule() (where it starts).
        self.crown = crown_from_config(app.conf)
        try:
            super().__init__(app, *args, **kwargs)
        except BaseException:
            self.crown.stop(self.stop_timeout)
            raise

    def setup_schedule(self):
        super().setup_schedule()
        self.crown.start()  # never blocks on the oracle; a lazy scheduler (no setup) never contends

    def apply_entry(self, entry, producer=None):
        if self.crown.term() is None:
            # tick() has already advanced the entry: a follower skips the slot, never saves it up.
            logger.debug("crown_sync: not leading, %s skipped", entry.name)
            self._log_oracle_error()
            return
        super().apply_entry(entry, producer=producer)

    def _log_oracle_error(self) -> None:
        """Say once why the oracle cannot be used (the crown itself logs it at debug only)."""
        error = self.crown.status().last_error  # passwords already redacted
        if error != self._last_error:
            self._last_error = error
            if error is not None:
                logger.warning("crown_sync: %s: oracle unavailable, not leading: %s", self.crown.name, error)

    def apply_async(self, entry, producer=None, advance=True, **kwargs):
        if advance:
            entry = self.reserve(entry)  # before the header is added: the schedule keeps no token
        term = self.crown.term()  # right before the send: none starts after the term's deadline
        if term is None:
            logger.info("crown_sync: no longer leading, %s not sent", entry.name)
            return None
        if self.token_header is not None:
            entry = copy.copy(entry)
            headers = dict(entry.options.get("headers") or {}, **{self.token_header: term.token})
            entry.options = dict(entry.options, headers=headers)
        return super().apply_async(entry, producer=producer, advance=False, **kwargs)

    def close(self):
        try:
            super().close()
        finally:
            self.crown.stop(self.stop_timeout)  # its term ends, then it abdicates

    @property
    def info(self):
        return f"{super().info}\n    . crown -> {self.crown.name} on {self.crown.status().oracle}"
