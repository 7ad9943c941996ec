"""A crown's options, checked at construction: every error names the option (see docs/options.rst)."""

import dataclasses
import json
import logging
import os
import re
import secrets
import socket
import threading
from typing import Any, Callable, Dict, Optional

import tenacity

__all__ = ["CrownOptions", "check_name"]

logger = logging.getLogger("crown_sync.crown")

_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")


def check_name(name: Any, option: str = "name") -> str:
    """``name`` if it is a valid election name; else TypeError/ValueError naming ``option``.

    Names become file names, keys and node paths in the oracles, so nothing else is accepted.
    """
    if not isinstance(name, str):
        raise TypeError(f"{option} must be a str, got {type(name).__name__}")
    if not _NAME.fullmatch(name) or name in (".", ".."):
        # '.' and '..' are path elements: no file or node can be named after them
        raise ValueError(f"{option} must be 1-128 characters of [A-Za-z0-9._-] (not '.' or '..'), got {name!r}")
    return name


def default_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def number(option: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{option} must be a number of seconds, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{option} must be finite, got {value}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{option} must be {'> 0' if positive else '>= 0'}, got {value}")
    if value > threading.TIMEOUT_MAX:  # a longer wait would make every wait() raise OverflowError
        raise ValueError(f"{option} must be at most {threading.TIMEOUT_MAX:g} seconds, got {value}")
    return value


def _identity(identity: Optional[str]) -> str:
    if identity is None:
        return default_identity()
    if not isinstance(identity, str):
        raise TypeError(f"identity must be a str, got {type(identity).__name__}")
    if not identity or len(identity) > 255 or not identity.isprintable():
        raise ValueError("identity must be 1-255 printable characters")
    return identity


def _metadata(metadata: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        return json.loads(json.dumps(metadata))  # a private, JSON-clean copy
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metadata must be JSON-serialisable: {exc}") from None


def _restarts(max_child_restarts: Optional[int]) -> Optional[int]:
    if max_child_restarts is not None and (
        isinstance(max_child_restarts, bool) or not isinstance(max_child_restarts, int) or max_child_restarts < 0
    ):
        raise ValueError(f"max_child_restarts must be an int >= 0 or None, got {max_child_restarts!r}")
    return max_child_restarts


def campaign_wait(backoff) -> Optional[Callable[[tenacity.RetryCallState], float]]:
    """The ``backoff`` option as a tenacity wait: a tenacity wait strategy as it is, a callable
    ``(attempt) -> seconds`` adapted; None keeps the default. TypeError names the option."""
    if backoff is None:
        return None
    if not callable(backoff):
        raise TypeError(f"backoff must be a tenacity wait strategy or a callable (attempt) -> seconds, "
                        f"got {type(backoff).__name__}")
    strategy = isinstance(backoff, tenacity.wait.wait_base)

    def wait(state: tenacity.RetryCallState) -> float:
        try:  # the user's code runs in the loop: a bad answer must not end it
            seconds = number("backoff", backoff(state) if strategy else backoff(state.attempt_number),
                             positive=False)
        except Exception:
            logger.exception("backoff %r failed; waiting 1 s", backoff)
            seconds = 1.0
        return seconds

    return wait


@dataclasses.dataclass(frozen=True)
class CrownOptions:
    """The checked timing and identity options of one crown."""

    claim_delay: float
    monitor_delay: float
    monitor_timeout: float
    monitor_leader: bool
    identity: str
    metadata: Dict[str, Any]
    max_child_restarts: Optional[int]
    child_backoff: float
    backoff: Optional[Callable[[tenacity.RetryCallState], float]]

    @classmethod
    def check(cls, claim_delay, monitor_delay, monitor_timeout, monitor_leader, identity, metadata,
              max_child_restarts, child_backoff, backoff) -> "CrownOptions":
        options = cls(
            claim_delay=number("claim_delay", claim_delay, positive=False),
            monitor_delay=number("monitor_delay", monitor_delay, positive=True),
            monitor_timeout=number("monitor_timeout", monitor_timeout, positive=True),
            monitor_leader=monitor_leader,
            identity=_identity(identity),
            metadata=_metadata(metadata),
            max_child_restarts=_restarts(max_child_restarts),
            child_backoff=number("child_backoff", child_backoff, positive=False),
            backoff=campaign_wait(backoff),
        )
        if options.monitor_timeout < options.monitor_delay:
            raise ValueError(
                f"monitor_timeout ({options.monitor_timeout}) must be >= monitor_delay "
                f"({options.monitor_delay}): the crown retries finding the leader every monitor_delay "
                f"until monitor_timeout"
            )
        if not isinstance(monitor_leader, bool):
            raise TypeError(f"monitor_leader must be a bool, got {type(monitor_leader).__name__}")
        return options
