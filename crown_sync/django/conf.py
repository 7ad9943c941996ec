"""``settings.CROWN_SYNC``: read, checked and cached (reset when a test overrides the setting).

Every problem names its key, as ``CROWN_SYNC["KEY"]``; :mod:`crown_sync.django.checks` turns them
into system check errors at startup, and :func:`config` raises ImproperlyConfigured with the first
one where checks were skipped.
"""

import json
import threading
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

from ..crown import check_name
from ..urls import redact

__all__ = ["Config", "DEFAULTS", "config", "problems"]

#: Every key of ``settings.CROWN_SYNC`` but ``NAME`` (required), with its default.
DEFAULTS: Dict[str, Any] = {
    "ORACLE": None,          # oracle URL; None: $CROWN_SYNC_ORACLE, else the per-user file oracle
    "START": False,          # True: this app's own crown, started on a serving process's first request
    "JOB": None,             # the own crown's leader child: a callable or "module:function", f(term)
    "METADATA": None,        # what the own crown publishes, e.g. {"url": "http://10.0.0.7:8000"}
    "OPTIONS": None,         # other crown_sync.Crown options of the own crown
    "FOLLOWER": "503",       # what leader_only answers on followers: "503" or "redirect"
    "RETRY_AFTER": 5,        # seconds in the 503's Retry-After header
    "LEADER_URL_KEY": "url",  # the leader's metadata key holding its base URL
    "LEADER_CACHE": 1.0,     # seconds a follower caches the leader it read from the oracle
}

#: Crown options the app sets itself: not accepted in OPTIONS.
_RESERVED_OPTIONS = ("name", "oracle", "child", "metadata", "on_elected", "on_deposed", "on_new_leader")


class Config(NamedTuple):
    name: str
    oracle: Optional[str]
    start: bool
    job: Any
    metadata: Optional[Dict[str, Any]]
    options: Dict[str, Any]
    follower: str
    retry_after: float
    leader_url_key: str
    leader_cache: float


def _key(key: str) -> str:
    return f'CROWN_SYNC["{key}"]'


def _number_problem(key: str, value: Any) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return f"{_key(key)} must be a number of seconds >= 0, got {value!r}"
    return None


def _oracle_problem(value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        return f"{_key('ORACLE')} must be an oracle URL or None, got {type(value).__name__}"
    from ..urls import oracle_from_url

    try:
        oracle_from_url(value).close()  # parses the URL and options; connects to nothing
    except (ValueError, TypeError, ImportError) as exc:
        # The message may quote the URL: never show its password.
        return f"{_key('ORACLE')} {redact(value)!r} is not usable: {_redacted(str(exc), value)}"
    return None


def _redacted(message: str, url: Optional[str]) -> str:
    from ..cli import _scrub

    return _scrub(message, url)


def _job_problem(job: Any, start: Any) -> Optional[str]:
    if job is None:
        return None
    if start is not True:
        return f"{_key('JOB')} runs in the app's own crown only: set {_key('START')} to True, or remove JOB"
    from ..gunicorn import _check_spec, _resolve

    if not callable(job) and not isinstance(job, str):
        return f"{_key('JOB')} must be a callable or 'package.module:function', got {type(job).__name__}"
    try:
        _check_spec(job, _key("JOB"))
        _resolve(job)  # imported now, at startup, so a typo is found before the first term
    except (ValueError, TypeError, ImportError, AttributeError) as exc:
        return f"{_key('JOB')} {job!r} cannot be used: {exc}"
    return None


def _options_problem(name: str, oracle: Any, options: Any) -> Optional[str]:
    if options is None:
        return None
    if not isinstance(options, dict):
        return f"{_key('OPTIONS')} must be a dict or None, got {type(options).__name__}"
    reserved = sorted(set(options) & set(_RESERVED_OPTIONS))
    if reserved:
        return (f"{_key('OPTIONS')} must not set {reserved[0]!r}: the app sets it (NAME, ORACLE, JOB, "
                f"METADATA; signals for the callbacks)")
    from ..gunicorn import _probe

    try:
        _probe(name, oracle, options)  # Crown's own validation of every option
    except (ValueError, TypeError, ImportError, OSError) as exc:  # a check error, never a crash
        return f"{_key('OPTIONS')}: {_redacted(str(exc), oracle)}"
    return None


def _name_problem(raw: Dict[str, Any]) -> Optional[str]:
    if "NAME" not in raw:
        return f"{_key('NAME')} is required: the election name, e.g. \"scheduler\""
    try:
        check_name(raw["NAME"], _key("NAME"))
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None


def _metadata_problem(metadata: Any) -> Optional[str]:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        return f"{_key('METADATA')} must be a dict or None, got {type(metadata).__name__}"
    try:
        json.dumps(metadata)  # the oracle stores it as JSON
    except (TypeError, ValueError) as exc:
        return f"{_key('METADATA')} must be JSON-serialisable: {exc}"
    return None


def _value_problems(raw: Dict[str, Any], values: Dict[str, Any]) -> List[Tuple[str, str]]:
    url_key = values["LEADER_URL_KEY"]
    checks: List[Tuple[str, Callable[[], Optional[str]]]] = [
        ("NAME", lambda: _name_problem(raw)),
        ("ORACLE", lambda: _oracle_problem(values["ORACLE"])),
        ("START", lambda: None if isinstance(values["START"], bool)
         else f"{_key('START')} must be True or False, got {values['START']!r}"),
        ("JOB", lambda: _job_problem(values["JOB"], values["START"])),
        ("METADATA", lambda: _metadata_problem(values["METADATA"])),
        ("FOLLOWER", lambda: None if values["FOLLOWER"] in ("503", "redirect")
         else f"{_key('FOLLOWER')} must be '503' or 'redirect', got {values['FOLLOWER']!r}"),
        ("RETRY_AFTER", lambda: _number_problem("RETRY_AFTER", values["RETRY_AFTER"])),
        ("LEADER_URL_KEY", lambda: None if isinstance(url_key, str) and url_key
         else f"{_key('LEADER_URL_KEY')} must be a non-empty str, got {url_key!r}"),
        ("LEADER_CACHE", lambda: _number_problem("LEADER_CACHE", values["LEADER_CACHE"])),
    ]
    found = [(key, problem) for key, problem in ((key, check()) for key, check in checks) if problem]
    if not any(key in ("NAME", "ORACLE") for key, _ in found):  # the probe needs both
        problem = _options_problem(raw["NAME"], values["ORACLE"], values["OPTIONS"])
        if problem:
            found.append(("OPTIONS", problem))
    return found


def problems(raw: Any) -> Tuple[Optional[Config], List[Tuple[str, str]]]:
    """(Config or None, [(key, message), ...]) for a ``settings.CROWN_SYNC`` value."""
    if not isinstance(raw, dict):
        what = "missing" if raw is None else f"a {type(raw).__name__}"
        return None, [("CROWN_SYNC", f"settings.CROWN_SYNC must be a dict with at least NAME, got {what}")]
    found = [(key, f"{_key(key)} is not a crown_sync setting; the settings are NAME, {', '.join(DEFAULTS)}")
             for key in sorted(set(raw) - set(DEFAULTS) - {"NAME"}, key=str)]
    values = dict(DEFAULTS, **{k: v for k, v in raw.items() if k in DEFAULTS})
    found += _value_problems(raw, values)
    if found:
        return None, found
    return Config(raw["NAME"], values["ORACLE"], values["START"], values["JOB"], values["METADATA"],
                  dict(values["OPTIONS"] or {}), values["FOLLOWER"], float(values["RETRY_AFTER"]),
                  values["LEADER_URL_KEY"], float(values["LEADER_CACHE"])), []


_lock = threading.Lock()
_cached: Optional[Config] = None


def config() -> Config:
    """The checked ``settings.CROWN_SYNC`` (ImproperlyConfigured naming the first bad key)."""
    global _cached
    current = _cached
    if current is not None:
        return current
    with _lock:
        if _cached is None:
            parsed, found = problems(getattr(settings, "CROWN_SYNC", None))
            if found:
                raise ImproperlyConfigured(found[0][1])
            _cached = parsed
        return _cached


def _reset(setting: str = "", **kwargs) -> None:
    global _cached
    if setting == "CROWN_SYNC":
        with _lock:
            _cached = None


setting_changed.connect(_reset, dispatch_uid="crown_sync.django.conf.reset")
