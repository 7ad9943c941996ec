"""Oracle URLs: scheme registry, query options, password redaction.

Oracle modules are imported lazily by scheme, so ``import crown_sync`` needs none of the optional
client libraries, and a missing one gives an "install crown_sync[extra]" error.
"""

import importlib
import os
import re
import urllib.parse
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

__all__ = ["oracle_from_url", "redact", "redact_text", "parse_options", "default_oracle_url", "SCHEMES"]

#: scheme -> (module, class name, pip extra)
SCHEMES: Dict[str, tuple] = {
    "file": ("crown_sync.oracles.file", "FileOracle", None),
    "postgresql": ("crown_sync.oracles.postgres", "PostgresOracle", "postgres"),
    "postgres": ("crown_sync.oracles.postgres", "PostgresOracle", "postgres"),
    "zookeeper": ("crown_sync.oracles.zookeeper", "ZooKeeperOracle", "zookeeper"),
    "memcached": ("crown_sync.oracles.memcached", "MemcachedOracle", "memcached"),
    "nats": ("crown_sync.oracles.nats", "NatsOracle", "nats"),
    "tls": ("crown_sync.oracles.nats", "NatsOracle", "nats"),  # NATS over TLS, as nats-py spells it
    "redis": ("crown_sync.oracles.redis", "RedisOracle", "redis"),
    "rediss": ("crown_sync.oracles.redis", "RedisOracle", "redis"),
    # Refused by RedisOracle.from_url with the reason (Sentinel failover is not tested here).
    "redis+sentinel": ("crown_sync.oracles.redis", "RedisOracle", "redis"),
}

ENV_VAR = "CROWN_SYNC_ORACLE"

_SECRET_PARAMS = re.compile(r"(password|passwd|secret|auth|sslpassword|token)", re.I)
#: Schemes whose userinfo without a colon is itself a secret (a NATS token: nats://TOKEN@host).
_TOKEN_SCHEMES = ("nats", "tls")
_DSN_SECRET = re.compile(r"(\b\w*pass\w*\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.I)


def _mask_userinfo(scheme: str, userinfo: str) -> str:
    # A user name cannot hold an unencoded ':', so the password is everything after the first.
    user, colon, _ = userinfo.partition(":")
    if colon:
        return f"{user}:***"
    return "***" if scheme.lower() in _TOKEN_SCHEMES else userinfo


def _split_userinfo(rest: str) -> Tuple[str, str]:
    """(userinfo, remainder) of a URL's part after ``scheme://``; userinfo "" when there is none.

    The authority ends at the first '/', '?' or '#' after its '@', but an unencoded password may
    hold any of those and '@' too; so the userinfo ends at the LAST '@' of the URL unless the
    stdlib's reading is unambiguous (an '@' in the authority and none after it). A URL whose path
    or query also holds an '@' is thus masked up to that '@': too much, never too little."""
    netloc = re.match(r"[^/?#]*", rest).group(0)
    if "@" in netloc and "@" not in rest[len(netloc):]:
        userinfo, _, hostport = netloc.rpartition("@")
        return userinfo, hostport + rest[len(netloc):]
    userinfo, at, remainder = rest.rpartition("@")
    return (userinfo, remainder) if at else ("", rest)


def redact(url: str) -> str:
    """``url`` with any password (userinfo or query parameter) replaced by ``***``; a NATS token
    (``nats://TOKEN@host``) too.

    Also handles libpq key/value DSNs (``host=... password=...``). Passwords may be unencoded and
    hold '@', ':', '/', '?', '#' or any unicode character.
    """
    if not isinstance(url, str):
        return repr(type(url))
    if "://" not in url:
        return _DSN_SECRET.sub(r"\1***", url)
    scheme, _, rest = url.partition("://")
    userinfo, remainder = _split_userinfo(rest)
    if userinfo:
        rest = f"{_mask_userinfo(scheme, userinfo)}@{remainder}"
    parts = urllib.parse.urlsplit(f"{scheme}://{rest}")
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = "&".join(
            f"{k}={'***' if _SECRET_PARAMS.search(k) else v}" for k, v in pairs
        )
    # No oracle URL has a fragment: one can only be the tail of a query password holding a '#'.
    fragment = parts.fragment and "***"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, query, fragment))


# A URL in free text runs to the next whitespace; its userinfo ends at the last '@' before that.
_URL_WITH_USERINFO = re.compile(r"\b([A-Za-z][\w+.-]*)://(\S*)@")
_QUERY_SECRET = re.compile(r"([?&][^=\s&#]*(?:pass|secret|token|auth)[^=\s&#]*=)[^&\s#'\"]*", re.I)
# key=value / key: value outside a query string (a libpq DSN, a message); a quoted value may
# hold spaces, an unquoted one runs to whitespace (a libpq password may hold '&' or ';').
_KEY_VALUE_SECRET = re.compile(
    r"((?<![?&/\w])\w*(?:pass|secret)\w*\s*[=:]\s*)('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|\S+)", re.I
)


def redact_text(text: str) -> str:
    """Any free text (an error message, a DSN) with URL passwords, NATS tokens, secret query
    parameters and ``password=...`` masked."""
    text = _URL_WITH_USERINFO.sub(lambda m: f"{m.group(1)}://{_mask_userinfo(m.group(1), m.group(2))}@", str(text))
    text = _QUERY_SECRET.sub(r"\1***", text)
    return _KEY_VALUE_SECRET.sub(r"\1***", text)


def _to_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


_CONVERTERS: Dict[Any, Callable[[str], Any]] = {bool: _to_bool, int: int, float: float, str: str}


def parse_options(url: str, accepted: Mapping[str, Any]) -> Dict[str, Any]:
    """Parse the query string of ``url`` into keyword options.

    ``accepted`` maps option name to its type (bool, int, float or str). An unknown option, a
    repeated one or a value of the wrong type is a ValueError naming the accepted options.
    """
    query = urllib.parse.urlsplit(url).query
    options: Dict[str, Any] = {}
    names = ", ".join(sorted(accepted)) or "none"
    for key, raw in urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if key not in accepted:
            raise ValueError(f"unknown oracle option {key!r} in URL; accepted options: {names}")
        if key in options:
            raise ValueError(f"oracle option {key!r} given twice in URL")
        kind = accepted[key]
        try:
            options[key] = _CONVERTERS.get(kind, kind)(raw)
        except (TypeError, ValueError):
            raise ValueError(
                f"oracle option {key!r} must be {getattr(kind, '__name__', kind)}, got {raw!r}"
            ) from None
    return options


def one_server(url: str, scheme: str, default_port: int, why: str) -> Tuple[str, int, Optional[str], Optional[str]]:
    """(host, port, user, password) of a ``scheme://`` URL that names exactly one server and no
    path, user and password percent-decoded; else a ValueError naming the problem (never the
    password). ``why`` says why one server only."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != scheme:
        raise ValueError(f"not a {scheme}:// URL: {redact(url)!r}")
    if "," in parts.netloc:
        count = len(parts.netloc.split(","))
        raise ValueError(f"{scheme}:// takes exactly one server, got {count} in {redact(url)!r}: {why}")
    if parts.path not in ("", "/"):
        raise ValueError(f"{scheme}:// URL takes no path, got {parts.path!r}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ValueError(f"bad {scheme}:// URL {redact(url)!r}: {redact_text(exc)}") from None
    if not host:
        raise ValueError(f"{scheme}:// URL needs a host, got {redact(url)!r}")
    unquote = urllib.parse.unquote
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return host, port or default_port, user, password


def missing_library(what: str, exc: ImportError, extra: Optional[str]) -> ImportError:
    """The error for an oracle whose client library does not import: a module that is missing
    (``exc.name``), or one that is there but cannot load (psycopg without libpq: its message)."""
    hint = f"pip install 'crown_sync[{extra}]'" if extra else "reinstall crown_sync"
    cause = f"is not installed: {exc.name}" if exc.name else f"cannot be loaded: {exc}"
    return ImportError(f"{what} needs a library that {cause}; {hint}")


def _load(scheme: str):
    module_name, class_name, extra = SCHEMES[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise missing_library(f"the {scheme}:// oracle", exc, extra) from exc
    return getattr(module, class_name)


def oracle_from_url(url: str):
    """Build an oracle from its URL (see the table in the docs)."""
    if not isinstance(url, str):
        raise TypeError(f"oracle URL must be a str, got {type(url).__name__}")
    scheme = urllib.parse.urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme not in SCHEMES:
        accepted = ", ".join(f"{s}://" for s in SCHEMES)
        raise ValueError(f"unknown oracle URL scheme in {redact(url)!r}; accepted: {accepted}")
    return _load(scheme).from_url(url)


def default_oracle_url() -> Optional[str]:
    """The URL in ``$CROWN_SYNC_ORACLE``, or None (meaning: the embedded file oracle)."""
    value = os.environ.get(ENV_VAR, "").strip()
    return value or None


def default_oracle():
    url = default_oracle_url()
    if url:
        return oracle_from_url(url)
    return _load("file")()
