"""What the ZooKeeper oracle's modules share: constants, errors, node names, option parsing, the
record format and small kazoo helpers (see :mod:`crown_sync.oracles.zookeeper`)."""

import json
import logging
import re
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from kazoo.client import KazooClient
from kazoo.exceptions import BadVersionError, NoNodeError

from .._base import Phase

logger = logging.getLogger("crown_sync.oracles.zookeeper")

_OPTIONS = {
    "session_timeout": float,
    "connect_timeout": float,
    "path_prefix": str,
    "acl": str,
    "tls": bool,
    "tls_ca": str,
    "tls_cert": str,
    "tls_key": str,
}

#: Fraction of the negotiated session timeout a term may last after its last confirmation, and a
#: fixed margin below that (see the module docstring).
LEASE_FRACTION = 0.75
LEASE_MARGIN = 0.05
#: A leader refreshes its term every T / REFRESHES_PER_TIMEOUT seconds, from a proof of its
#: session at most that old.
REFRESHES_PER_TIMEOUT = 3.0
#: While leaders refresh, the session's one probe (its proof) goes out every T / PROOFS_PER_TIMEOUT.
PROOFS_PER_TIMEOUT = 6.0
#: Claims one session runs at a time (the others wait for a slot: _SharedSession.claim_slot).
CLAIMS_IN_FLIGHT = 16
#: How long claim() waits for a connection before failing (the engine retries with backoff).
CLAIM_CONNECT_WAIT = 1.0
#: A new term's first refresh comes this soon (seconds): it publishes ``since`` in the record.
PUBLISH_DELAY = 0.05
#: Bound on the requests made by close()/abdicate(), and on stopping the client.
CLOSE_TIMEOUT = 2.0
#: Largest leader record (JSON bytes, with ``since`` and a dismissal request written in): the
#: server refuses any request over its ``jute.maxbuffer`` (1 MiB - 1 byte by default) and drops
#: the connection, so a bigger record could never be published; 48 KiB are left for the
#: request's path, ACLs and header.
MAX_RECORD_BYTES = 1_000_000
#: How long reading the server's ``conf`` (a four-letter word) may take.
CONF_TIMEOUT = 2.0

_NODE = re.compile(r"^([0-9a-f]{32})-(\d{10})$")
_GUARD = re.compile(r"^([0-9a-f]{32})-guard$")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(\d{1,5}))?$")
_ELECTION = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

#: The phases in which a contender never acts again.
_ENDED = (Phase.CLOSED, Phase.FORKED)


class ZooKeeperUnavailable(ConnectionError):
    """No usable connection to ZooKeeper (not connected yet, or a request failed)."""


class ZooKeeperMisconfigured(ZooKeeperUnavailable):
    """The ensemble's configuration (read from its ``conf``) voids the deadline arithmetic: the
    oracle refuses to claim, as if unreachable, and says why (``status().last_error``)."""


def _sequence(node: str) -> int:
    return int(node[-10:])


def _guard_of(node: str) -> str:
    """The guard node of the contender that owns queue node ``node`` (same uuid prefix)."""
    return node[:33] + "guard"


def _parse_hosts(hosts: Union[str, Sequence[str]]) -> Tuple[str, Optional[str]]:
    """Normalise ``hosts`` to ``"h1:2181,h2:2181"`` and split off a ``/chroot`` suffix."""
    chroot = None
    if isinstance(hosts, str):
        text = hosts.strip()
        if "/" in text:
            text, _, rest = text.partition("/")
            chroot = "/" + rest
        items = [item.strip() for item in text.split(",")]
    elif isinstance(hosts, (list, tuple)) and all(isinstance(item, str) for item in hosts):
        items = [item.strip() for item in hosts]
    else:
        raise TypeError(f"hosts must be a string 'host:port,...' or a list of them, got {type(hosts).__name__}")
    if not items or any(not item for item in items):
        raise ValueError(f"hosts must name at least one host:port, got {hosts!r}")
    normal = []
    for item in items:
        match = _HOST.match(item)
        if not match:
            raise ValueError(f"hosts: invalid host:port {item!r}")
        port = int(match.group(2) or 2181)
        if not 0 < port < 65536:
            raise ValueError(f"hosts: invalid port in {item!r}")
        normal.append(f"{match.group(1)}:{port}")
    return ",".join(normal), chroot


def _check_path(value: Any, what: str, allow_none: bool) -> Optional[str]:
    if value is None or (allow_none and value in ("", "/")):
        if allow_none:
            return None
        raise ValueError(f"{what} is required")
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}")
    path = value.rstrip("/")
    parts = path.split("/")
    if not value.startswith("/") or not path or any(p in ("", ".", "..") for p in parts[1:]):
        raise ValueError(f"{what} must be an absolute ZooKeeper path like '/crown_sync', got {value!r}")
    if any(_refused_by_zookeeper(ch) for ch in path):
        raise ValueError(f"{what} contains characters ZooKeeper refuses in a path (control or private-use)")
    return path


def _refused_by_zookeeper(ch: str) -> bool:
    """Characters ZooKeeper's ``PathUtils.validatePath`` refuses (besides '/' structure rules)."""
    code = ord(ch)
    return (code < 0x20 or 0x7F <= code <= 0x9F or 0xD800 <= code <= 0xF8FF or 0xFFF0 <= code <= 0xFFFF)


def _record_size(identity: str, metadata: Dict[str, Any]) -> int:
    """The largest our leader record can get: with ``since`` and a dismissal request in it."""
    record = {"identity": identity, "metadata": metadata, "since": 9999999999.999999, "dismissed": 2**63 - 1}
    return len(json.dumps(record, separators=(",", ":")).encode("utf-8"))


def _ensemble_problem(conf: Dict[str, str], timeout: float) -> Optional[str]:
    """Why the server's ``conf`` voids our deadlines for session ``timeout`` seconds, or None.

    A member cut off from the quorum answers its clients (a leader's refresh included) for up to
    ``syncLimit x tickTime`` before it drops them, while the quorum's leader counts the session's
    expiry from the last request it heard of, which may be ``T / 3 + tickTime / 2`` older than the
    cut. A leader running on such a member learns of the cut (SUSPENDED) only when that member
    drops it: by ``T / 4`` after the cut, which leaves its child about ``0.29 T`` to stop before
    the expiry (the module docstring has the argument and what it does not cover).
    """
    try:
        tick = int(conf["tickTime"])
        sync = int(conf["syncLimit"]) if "syncLimit" in conf else None
    except (KeyError, ValueError):
        return None
    if sync is not None and sync * tick > timeout * 1000.0 / 4:
        return (
            f"the ensemble's syncLimit x tickTime = {sync} x {tick} ms = {sync * tick / 1000.0:g} s is "
            f"more than a quarter of the session timeout ({timeout:g} s / 4 = {timeout / 4:g} s): a "
            f"member cut off from the quorum could answer a leader's refresh after its session "
            f"expired; use session_timeout >= {4 * sync * tick / 1000.0:g} or lower syncLimit or "
            f"tickTime"
        )
    return None


def _parse_conf(text: str) -> Optional[Dict[str, str]]:
    """``key=value`` lines of a ``conf`` reply; None when the server did not run it (not in its
    ``4lw.commands.whitelist``) or sent nothing usable."""
    conf = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            conf[key.strip()] = value.strip()
    return conf if "tickTime" in conf else None


def _foreign_why(stat, record: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """Why a node named like a queue node is not a contender's (None if it may be one): a
    contender's node is ephemeral and holds a leader record; ``record``: its data, when read."""
    if stat.ephemeralOwner == 0:
        return "persistent (a contender's node is ephemeral: it goes with its session)"
    if record is not None and not isinstance(record.get("identity"), str):
        return "its data is not a contender's record"
    return None


def _parse_record(data: Optional[bytes]) -> Dict[str, Any]:
    try:
        record = json.loads(data.decode("utf-8")) if data else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _release_node(client: KazooClient, path: str, session: int, gone, releasing, attempts: int = 3) -> None:
    """Delete our node at ``path`` without blocking: only if its ``ephemeralOwner`` is still
    ``session`` (CURATOR-696) and at the version we saw. ``gone()`` once it no longer exists;
    ``releasing(path)`` just before the delete is sent. Connection trouble ends the attempt (the
    node goes with the session, or a later claim or reconnect deletes it)."""

    def checked(result) -> None:
        try:
            stat = result.get_nowait()
        except Exception:
            return
        if stat is None:
            gone()
            return
        if stat.ephemeralOwner != session:
            return  # not ours to delete
        releasing(path)
        client.delete_async(path, version=stat.version).rawlink(deleted)

    def deleted(result) -> None:
        try:
            result.get_nowait()
        except NoNodeError:
            pass
        except BadVersionError:  # a dismissal landed meanwhile: look again
            if attempts > 1:
                _release_node(client, path, session, gone, releasing, attempts - 1)
            return
        except Exception:
            return
        gone()

    try:
        client.exists_async(path).rawlink(checked)
    except Exception as exc:  # a closed client: the session's end removed the node
        logger.debug("could not release %s: %s", path, type(exc).__name__)


def _session_timeout_of(record: Dict[str, Any], default: float) -> float:
    """The session timeout a guard's owner requested (its leases are shorter), else ``default``."""
    value = record.get("session_timeout")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 3600:
        return float(value)
    return default


def _is_dismissed(record: Dict[str, Any], stat) -> bool:
    """Does this node's record carry a dismissal request aimed at this very node? A request names
    the token (czxid) of the node it targets; ``True`` is an older form of the same request."""
    target = record.get("dismissed")
    if target is True:
        return True
    return isinstance(target, int) and not isinstance(target, bool) and target == stat.czxid


def _read_conf(client: KazooClient, tls: Dict[str, Any], member: Optional[str]) -> Optional[Dict[str, str]]:
    """The ``conf`` of the member our session is connected to (over TLS, with ``tls``: kazoo's
    TLS arguments, on a TLS port, the certificate checked against ``member``, its name as given
    in the hosts); None if it cannot be read."""
    try:
        peer = client._connection._socket.getpeername()[:2]
        sock = client.handler.create_connection(peer, timeout=CONF_TIMEOUT, hostname=member or peer[0], **tls)
    except Exception:  # not connected any more, or a kazoo without this internal
        return None
    chunks = []
    try:
        sock.settimeout(CONF_TIMEOUT)
        sock.sendall(b"conf")
        while sum(len(c) for c in chunks) < 65536:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        sock.close()
    return _parse_conf(b"".join(chunks).decode("utf-8", "replace"))


def oracle_timeout(client: KazooClient):
    return client.handler.timeout_exception


def _unavailable(what: str, exc: BaseException) -> ZooKeeperUnavailable:
    detail = str(exc)
    return ZooKeeperUnavailable(f"ZooKeeper error while {what}: {type(exc).__name__}" + (f": {detail}" if detail else ""))


