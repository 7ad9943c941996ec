"""ZooKeeper oracle: ephemeral sequential nodes, one queue per election, SUSPENDED is loss.

Layout: election ``NAME`` lives under ``<path_prefix>/NAME`` (default ``/crown_sync/NAME``, inside
the URL's chroot if any). Every contender creates one ephemeral sequential node there, named
``<32 hex of a per-contender uuid>-<10-digit sequence>``, holding a JSON record ``{identity,
metadata, since}``. The node with the lowest sequence leads, and a node hosts at most one term:
after its term the contender deletes it and queues again with a fresh one.

Each follower watches only the node just before its own (an ``exists`` watch), so a leader's exit
wakes one contender, not the herd. A follower whose predecessor leads (it saw it first in the
queue) knows, when that node goes, that it is now first, since nodes are only ever added at the
back: it takes over without asking the server anything (see "deadline" below). Other followers,
woken because the follower before them left, ask for the queue at once from kazoo's thread.
Every contender also watches the data of its own node: ``dismiss()`` writes a dismissal request
(naming the node's token) into the record of the node first in the queue, and its owner ends its
term, stops its child and only then deletes its node; a node dismissed before it led never leads.
``dismiss()`` does not delete the node itself: the successor would start at once, while the
dismissed leader's child still runs. A deletion of our node by anyone else ends our term too.

Next to its queue node every contender keeps one ephemeral *guard* node, ``<uuid>-guard``
(created right after its queue node, pipelined with the reads that follow; a term never starts
without it), holding ``{identity, session_timeout}``. A contender deletes its guard only when no
child of its runs: just before it deletes a spent node (abdicate, close, a dismissed node), or at
once when a node that never hosted a term is deleted under it; the end of its session deletes it
too. So a guard without its contender's queue node (an *orphan*) means that someone else deleted
the node, under a contender whose child may still run. A leader record is at most
``MAX_RECORD_BYTES`` of JSON (with ``since`` and a dismissal request in it: ZooKeeper refuses
requests over its 1 MiB ``jute.maxbuffer``); bigger metadata is a ValueError when the contender is
built, as is an election name or path ZooKeeper refuses.
kazoo's ``Lock``/``Election`` recipes are not used: a non-blocking ``Lock.acquire`` gives up its
queue position, ``Election.run`` never interrupts the function, and ``Lock.is_acquired`` stays
True after the session is gone; we compose kazoo's primitives instead (ephemeral sequential
``create``, ``get_children``, one-shot watches, state listeners, KazooRetry for reconnection).

Safety argument:

* ZooKeeper deletes an ephemeral node when its owner deletes it, when its session expires (only
  after the server heard nothing from it for the negotiated session timeout ``T``), or when
  someone else deletes it (see "revocation" below). A new node always sorts after every existing one, so while our node exists and is lowest
  nobody else can be lowest: at most one contender sees itself first.
* A term's deadline is ``t0 + 0.75 T - 50 ms`` where ``t0`` is the start of a request on our
  session that the server answered (the claim's ``get_children``, a refresh's ``exists``, or, for
  the round-trip-free takeover, the latest answered request of the session: while a contender is
  next in line the oracle makes sure there is one every T/4, and the takeover falls back to asking
  when the latest is more than T/3 old). The
  server had the session after ``t0``, so it cannot expire it, delete our node and let a successor
  in before ``t0 + T``; the engine stops our child by the deadline even if this process is paused
  (SIGSTOP, swap) and this module never runs again. ``T`` is the timeout the server actually
  negotiated (lower than requested when the server's ``maxSessionTimeout`` is lower): we read it
  from kazoo's connection handshake, falling back to the requested value.
* kazoo reports SUSPENDED when it stops hearing the server (after 2/3 T) and LOST only once it
  reconnects to learn that the session expired, which during a partition never happens before the
  server has handed the crown on. So SUSPENDED ends the term at once (``on_change(lost=True)``),
  and ``refresh()`` answers ``won=False`` whenever the client is not CONNECTED or the connection
  has dropped since the term began. After a reconnect with the same session, a node is used again
  only if it still exists, its ``ephemeralOwner`` is our session and it has not hosted a term yet
  (a follower keeps its place); a leader's node is deleted and the contender queues again. A
  term's win re-checks the connection under the contender's lock, so a SUSPENDED that lands
  between the claim's last look and its win fails the claim instead of starting a term that no
  loss signal would end. A spent node that ``abdicate()`` could not delete while cut off is
  deleted as soon as the same session is back (asynchronously, from kazoo's state listener, only
  if its ``ephemeralOwner`` is still our session), so the next in line does not wait for our next
  claim.
* Revocation. A watcher cannot tell who deleted a node: its owner after its child stopped, the
  server at its session's expiry (its deadlines have passed: above), or an administrator
  (``delete`` in zkCli) under a live leader whose child runs on. The guard tells them apart. The
  round-trip-free takeover happens only if the leader's guard was seen deleted before its node
  (the next in line watches the leader's guard too; an owner deletes its guard and its node in
  one transaction, the guard first, and a client sees the watch events of a ``multi`` in the
  order of its operations, checked on the real server); otherwise the claim lists the
  election. A contender first in the queue starts only if the listing shows no orphan guard.
  Else it holds back: it watches each orphan guard and claims again when one goes (its owner saw
  its node deleted, which ended its term, stopped its child, then dropped the guard; or its
  session expired) or when ``0.75 T'`` (``lease_for(T')`` plus its 50 ms margin, for the child's
  kill to land) has passed since the END of the first listing that showed the orphan, ``T'``
  being the session timeout in the guard's record (the owner's requested one: its leases use
  the negotiated one when lower, never more).
  Every confirmation of the revoked term was answered while its node existed, so it started
  before the deletion, which the listing's end follows: by then the term's deadline has passed.
  Costs: a release and a crash failover are as fast as before (a session's expiry deletes node
  and guard in one transaction; if the node's event comes first the takeover costs one listing);
  a revocation costs the time the revoked leader's child takes to stop (never past its
  deadline), or, if its process is paused, the earlier of ``0.75 T'`` and the expiry of
  its session.
* Dismissal never hands the crown over by itself: the successor still waits for the leader's
  node to go, which the leader does after its child stopped (or its session expires). The request
  is never moved on to another node: if its target left before it was written, it stepped down
  already.
* Fencing token: the leader node's ``czxid`` (the zxid of its creation). Nodes lead in the order
  they were created, each at most once, and zxids rise across the whole ensemble and survive
  re-creation of the election's node (sequence numbers do not; they are never tokens). So tokens
  rise from term to term, and ``find_leader`` reports the current term's token exactly.

What is NOT guaranteed:

* The ensemble must satisfy ``syncLimit x tickTime <= T / 4`` (so ``T >= 4 x tickTime``;
  ZooKeeper's default ``tickTime`` is 2 s: use sessions of 10 s or more). Checked once per
  connection from the member's ``conf`` (a four-letter word: it must be in the server's
  ``4lw.commands.whitelist``): a violation makes ``claim()`` raise ZooKeeperMisconfigured with the
  numbers, which the engine reports (``status().last_error``) and retries like an unreachable
  server; an unreadable ``conf`` is logged once and not checked. The ZooKeeper leader
  (which expires sessions) tracks them in ``tickTime`` steps and hears of our requests to another
  member at that member's next ping: both make an expiry later, not earlier. But a member cut off
  from the quorum keeps answering our reads for up to ``syncLimit x tickTime`` before it notices
  and drops our connection; a refresh it answers never reaches the ZooKeeper leader, whose expiry
  counts from the last request it heard of (we send one at least every ``T / 3``, and the member
  passes it on within ``tickTime / 2``), so it may expire the session ``2/3 T - tickTime / 2``
  after the cut, at least about ``0.54 T`` with the condition. With the condition, the dropped
  connection (SUSPENDED) ends a running leader's term by ``T / 4`` after the cut, so its child has
  about ``0.29 T`` to honour SIGTERM; a child slower than that (its grace is bounded only by the
  term's deadline, which such a refresh may have carried past the expiry), or a leader process
  paused at that same moment, is not covered (the fencing token is the defence).
* Clock rates: the deadline is local time (:func:`crown_sync.clock.monotonic`, which counts a
  host suspend) against the server's idea of ``T``.
* Tokens rise only while the ensemble keeps its data (a wiped data directory restarts zxids;
  ``forceSync=no`` servers can lose acknowledged writes in a power failure: not checkable).
* Deleting a leader's guard by hand as well as its node (``deleteall`` of the election, say)
  voids the revocation proof: the successor starts as after a release. So does a fleet mixing
  this version with older ones (their nodes have no guards). Use ``dismiss``.
* Work in flight when a deadline passes can land after a successor started: pass ``term.token``
  to the protected resource and let it reject stale tokens.

Connection loss: SUSPENDED ends a leader's term at once; followers keep their nodes and are
nudged to look again after the reconnect. A refresh waits for its answer no longer than the
term's deadline (after it, the answer is of no use), which bounds a ``stop()`` against a frozen
server. Unreachable servers make ``claim()`` raise after ``CLAIM_CONNECT_WAIT`` (the engine backs
off and retries) while kazoo keeps reconnecting in the background with its own KazooRetry. ``close()`` deletes our node
when it can and stops the client when the last contender of a closed oracle goes, bounded in time
even on a dead server.

Fork: the client is created lazily, in the process that uses it. A forked child that inherits an
oracle gets its sockets replaced by ``/dev/null`` (``dup2``), so nothing it does can send a
goodbye on the parent's session; its inherited contenders become unusable and the oracle builds a
fresh client if the child uses it.
"""

import json
import logging
import os
import re
import threading
import time
import urllib.parse
import uuid
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from kazoo.client import KazooClient
from kazoo.exceptions import BadVersionError, KazooException, NoAuthError, NodeExistsError, NoNodeError
from kazoo.handlers.threading import SequentialThreadingHandler
from kazoo.protocol.states import EventType, KazooState, WatchedEvent
from kazoo.retry import KazooRetry
from kazoo.security import ACL, CREATOR_ALL_ACL, OPEN_ACL_UNSAFE, READ_ACL_UNSAFE

from .. import _forksafe
from ..clock import monotonic as _monotonic
from ..oracle import Claim, Contender, Leader, OnChange, Oracle
from ..urls import parse_options

__all__ = ["ZooKeeperOracle", "ZooKeeperContender", "ZooKeeperUnavailable", "ZooKeeperMisconfigured"]

logger = logging.getLogger("crown_sync.oracles.zookeeper")

_OPTIONS = {
    "session_timeout": float,
    "connect_timeout": float,
    "path_prefix": str,
    "acl": str,
}

#: Fraction of the negotiated session timeout a term may last after its last confirmation, and a
#: fixed margin below that (see the module docstring).
LEASE_FRACTION = 0.75
LEASE_MARGIN = 0.05
#: A leader confirms its node every T / REFRESHES_PER_TIMEOUT seconds.
REFRESHES_PER_TIMEOUT = 3.0
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


def _number(value: Any, what: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be between {low} and {high} seconds, got {value!r}")
    return float(value)


# Oracles alive in this process, for the at-fork handler; clients abandoned by forked children are
# kept referenced so their (neutered) sockets are never closed behind our back.
_ORACLES: "weakref.WeakSet[ZooKeeperOracle]" = weakref.WeakSet()
_ABANDONED: List[KazooClient] = []


class ZooKeeperOracle(Oracle):
    """Leader election on ZooKeeper through kazoo.

    ``hosts``: ``"h1:2181,h2:2181"`` (optionally with a ``/chroot`` suffix) or a list of
    ``"host:port"``. ``session_timeout``: requested session timeout in seconds (1 to 3600; the
    server may negotiate it into its ``[minSessionTimeout, maxSessionTimeout]``). ``chroot``: a
    path every node lives under. ``auth``: ``"user:password"`` for ZooKeeper's digest scheme.
    ``acl``: ``"open"`` (anyone may do anything; the default without ``auth``), ``"creator"``
    (readable by all, writable only by the creator's credentials; the default with ``auth``), or a
    list of ``kazoo.security.ACL``. ``path_prefix``: the parent of every election node.
    ``connect_timeout``: how long ``find_leader``/``dismiss`` wait for a connection before
    failing (``claim`` waits at most ``CLAIM_CONNECT_WAIT``: the engine retries it with backoff).
    """

    def __init__(
        self,
        hosts: Union[str, Sequence[str]] = "127.0.0.1:2181",
        session_timeout: float = 10.0,
        chroot: Optional[str] = None,
        auth: Optional[str] = None,
        acl: Union[None, str, Sequence[ACL]] = None,
        path_prefix: str = "/crown_sync",
        connect_timeout: float = 5.0,
    ):
        self.hosts, hosts_chroot = _parse_hosts(hosts)
        if hosts_chroot is not None and chroot is not None:
            raise ValueError("chroot given twice (in hosts and as chroot=)")
        self.chroot = _check_path(chroot if chroot is not None else hosts_chroot, "chroot", True)
        self.session_timeout = _number(session_timeout, "session_timeout", 1.0, 3600.0)
        self.connect_timeout = _number(connect_timeout, "connect_timeout", 0.01, 3600.0)
        self.path_prefix = _check_path(path_prefix, "path_prefix", False)
        if self.path_prefix == "/zookeeper" or self.path_prefix.startswith("/zookeeper/"):
            raise ValueError("path_prefix must not be under /zookeeper (reserved by ZooKeeper)")
        self._user = None
        self._auth = None
        if auth is not None:
            if not isinstance(auth, str):
                raise TypeError(f"auth must be a 'user:password' string, got {type(auth).__name__}")
            user, sep, password = auth.partition(":")
            if not sep or not user or not password:
                raise ValueError("auth must be 'user:password' with both parts non-empty")
            self._user = user
            self._auth = auth
        self.acl = self._build_acl(acl)
        # Timings must leave the leader time to confirm before its deadline (client-go style).
        if self.lease_for(self.session_timeout) <= self.session_timeout / REFRESHES_PER_TIMEOUT:
            raise ValueError("session_timeout too short for the refresh interval")

        userinfo = f"{urllib.parse.quote(self._user, safe='')}:***@" if self._user else ""
        query = {"session_timeout": f"{self.session_timeout:g}"}
        if self.path_prefix != "/crown_sync":
            query["path_prefix"] = self.path_prefix
        self.description = (
            f"zookeeper://{userinfo}{self.hosts}{self.chroot or ''}?" + urllib.parse.urlencode(query, safe="/")
        )

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._client: Optional[KazooClient] = None
        self._connected = False
        self._epoch = 0  # bumped whenever the client leaves CONNECTED
        self._negotiated: Optional[float] = None
        self._contenders: "weakref.WeakSet[ZooKeeperContender]" = weakref.WeakSet()
        self._closed = False
        self._state = "not started"
        self._confirmed: Tuple[int, float] = (-1, 0.0)  # (epoch, start of last answered request)
        self._heartbeat_stop: Optional[threading.Event] = None
        self._ensemble_check: Optional[Tuple[int, Optional[str]]] = None  # (epoch, problem)
        self._conf_unreadable_logged = False
        _ORACLES.add(self)

    def _build_acl(self, acl) -> List[ACL]:
        if acl is None:
            acl = "creator" if self._auth else "open"
        if isinstance(acl, str):
            if acl == "open":
                return list(OPEN_ACL_UNSAFE)
            if acl == "creator":
                if not self._auth:
                    raise ValueError("acl='creator' needs auth='user:password'")
                return list(CREATOR_ALL_ACL) + list(READ_ACL_UNSAFE)
            raise ValueError(f"acl must be 'open', 'creator' or a list of kazoo ACLs, got {acl!r}")
        if isinstance(acl, (list, tuple)) and acl and all(isinstance(item, ACL) for item in acl):
            return list(acl)
        raise TypeError("acl must be 'open', 'creator' or a non-empty list of kazoo.security.ACL")

    @classmethod
    def from_url(cls, url: str) -> "ZooKeeperOracle":
        """``zookeeper://[user:password@]h1:2181,h2:2181[/chroot][?session_timeout=10&...]``."""
        if not isinstance(url, str):
            raise TypeError(f"oracle URL must be a str, got {type(url).__name__}")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() != "zookeeper":
            raise ValueError("a ZooKeeper oracle URL starts with zookeeper://")
        userinfo, at, hostport = parts.netloc.rpartition("@")
        auth = None
        if at:
            user, sep, password = userinfo.partition(":")
            if not sep:
                raise ValueError("zookeeper URL: userinfo must be user:password (digest auth)")
            auth = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
        if not hostport:
            raise ValueError("zookeeper URL must name at least one host, e.g. zookeeper://127.0.0.1:2181")
        chroot = urllib.parse.unquote(parts.path) or None
        options = parse_options(url, _OPTIONS)
        return cls(hostport, chroot=chroot, auth=auth, **options)

    @staticmethod
    def lease_for(timeout: float) -> float:
        """How long a term lasts after the start of its last confirmation, for session ``timeout``."""
        return timeout * LEASE_FRACTION - LEASE_MARGIN

    def effective_timeout(self) -> float:
        """The session timeout the deadlines use: the negotiated one when known, never more than
        requested."""
        negotiated = self._negotiated
        if negotiated is None:
            return self.session_timeout
        return min(self.session_timeout, negotiated)

    def election_path(self, name: str) -> str:
        return f"{self.path_prefix}/{name}"

    # -- the shared client ------------------------------------------------------------------

    def _new_client_locked(self) -> KazooClient:
        retry = KazooRetry(max_tries=-1, delay=0.05, backoff=1.5, max_jitter=0.2, max_delay=1.0)
        client = KazooClient(
            hosts=self.hosts + (self.chroot or ""),
            handler=_ForkSafeHandler(),
            timeout=self.session_timeout,
            connection_retry=retry,
            auth_data=[("digest", self._auth)] if self._auth else None,
            default_acl=self.acl,
        )
        connection = getattr(client, "_connection", None)
        original = getattr(connection, "_connect", None)
        if original is not None:
            # kazoo keeps the negotiated timeout to itself; its handshake returns the read timeout
            # it derived from it (2/3 of it, in ms). A lower negotiated timeout than requested
            # would make our deadlines unsafe, so we need it.
            def _connect(host, hostip, port, _original=original):
                result = _original(host, hostip, port)
                try:
                    self._negotiated = float(result[0]) * 1.5 / 1000.0
                except (TypeError, ValueError, IndexError):
                    pass
                return result

            connection._connect = _connect
        else:  # pragma: no cover - a kazoo without this internal
            logger.warning("cannot read the negotiated session timeout; using the requested one")
        client.add_listener(lambda state, _client=client: self._on_state(_client, state))
        client.start_async()
        self._state = "connecting"
        stop = self._heartbeat_stop = threading.Event()
        threading.Thread(
            target=self._heartbeat, args=(client, stop), name="crown-sync-zookeeper-heartbeat", daemon=True
        ).start()
        return client

    def _heartbeat(self, client: KazooClient, stop: threading.Event) -> None:
        """While a contender of ours is next in line, make sure the session had a request answered
        within the last T/4 (one cheap read when nothing else did), so that it can take over
        without a round trip (see ZooKeeperContender._fast_win). Nothing more: every extra
        request postpones the expiry of a crashed leader's session, hence its failover."""
        while not stop.wait(self.effective_timeout() / 8):
            interval = self.effective_timeout() / 4
            with self._lock:
                if client is not self._client or not self._connected:
                    continue
                epoch = self._epoch
                fresh = self._confirmed[0] == epoch and _monotonic() - self._confirmed[1] < interval
                needed = any(c._next_in_line is not None for c in self._contenders)
            if fresh or not needed:
                continue
            sent = _monotonic()
            try:
                client.exists_async(self.path_prefix).get(self._op_timeout())
            except Exception:
                continue  # connection trouble: kazoo's states tell the contenders
            self._confirm(sent, epoch)

    def _confirm(self, sent: float, epoch: int) -> None:
        """A request sent at ``sent`` (monotonic) in connection ``epoch`` was answered: the server
        had our session then, so it cannot expire it before ``sent + T``."""
        with self._lock:
            if epoch == self._epoch and (self._confirmed[0] != epoch or sent > self._confirmed[1]):
                self._confirmed = (epoch, sent)

    def _confirmed_since(self, epoch: int) -> Optional[float]:
        with self._lock:
            if self._confirmed[0] == epoch == self._epoch and self._connected:
                return self._confirmed[1]
            return None

    def _on_state(self, client: KazooClient, state: str) -> None:
        """kazoo's state listener (its connection thread: must not block)."""
        with self._lock:
            if client is not self._client:
                return
            if state == KazooState.CONNECTED:
                self._connected = True
            else:
                self._connected = False
                self._epoch += 1
            self._state = state.lower()
            self._cond.notify_all()
            contenders = list(self._contenders)
        log = logger.info if state == KazooState.CONNECTED else logger.warning
        log("ZooKeeper %s: %s", self.description, state)
        for contender in contenders:
            contender._connection_changed(state)

    def _connection(self, cancelled=lambda: False, wait: Optional[float] = None) -> Tuple[KazooClient, int, int]:
        """(client, epoch, session id) once connected; waits up to ``wait`` (default:
        connect_timeout)."""
        wait = self.connect_timeout if wait is None else min(wait, self.connect_timeout)
        deadline = _monotonic() + wait
        with self._cond:
            if self._closed:
                raise RuntimeError("the ZooKeeper oracle is closed")
            if self._client is None:
                self._client = self._new_client_locked()
            client = self._client
            while True:
                if cancelled():
                    raise RuntimeError("the ZooKeeper contender is closed")
                if self._closed or client is not self._client:
                    raise RuntimeError("the ZooKeeper oracle is closed")
                client_id = client.client_id if self._connected else None
                if client_id and client_id[0]:
                    return client, self._epoch, client_id[0]
                remaining = deadline - _monotonic()
                if remaining <= 0:
                    raise ZooKeeperUnavailable(
                        f"not connected to ZooKeeper at {self.description} after "
                        f"{wait:g}s (state: {self._state})"
                    )
                self._cond.wait(min(remaining, 0.5))

    def _check_ensemble(self, client: KazooClient, epoch: int) -> None:
        """Once per connection: refuse (ZooKeeperMisconfigured, which the engine reports and
        retries like an unreachable server) when the member's ``conf`` shows an ensemble that
        voids our deadlines (see _ensemble_problem). An unreadable ``conf`` is logged once."""
        with self._lock:
            checked = self._ensemble_check
        if checked is None or checked[0] != epoch:
            conf = _read_conf(client)
            problem = None
            if conf is None:
                if not self._conf_unreadable_logged:
                    self._conf_unreadable_logged = True
                    logger.warning(
                        "cannot read the conf of ZooKeeper at %s (not in its 4lw.commands.whitelist?): "
                        "its syncLimit x tickTime is not checked against the session timeout",
                        self.description,
                    )
            else:
                problem = _ensemble_problem(conf, self.effective_timeout())
                if problem:
                    logger.error("ZooKeeper at %s: %s", self.description, problem)
            checked = (epoch, problem)
            with self._lock:
                self._ensemble_check = checked
        if checked[1]:
            raise ZooKeeperMisconfigured(f"refusing to lead through ZooKeeper at {self.description}: {checked[1]}")

    def _op_timeout(self) -> float:
        # kazoo fails pending requests itself when the connection drops (after 2/3 T of
        # silence); this bound only guards against a wedged client.
        return self.effective_timeout()

    def _register(self, contender: "ZooKeeperContender") -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the ZooKeeper oracle is closed")
            self._contenders.add(contender)

    def _unregister(self, contender: "ZooKeeperContender") -> None:
        with self._lock:
            self._contenders.discard(contender)
            self._cond.notify_all()  # wake a claim of this contender waiting for a connection
            stop = self._closed and not self._contenders
            client = self._client if stop else None
            if stop:
                self._drop_client_locked()
        if client is not None:
            _stop_client(client)

    def _drop_client_locked(self) -> None:
        self._client = None
        self._connected = False
        if self._heartbeat_stop is not None:
            self._heartbeat_stop.set()
            self._heartbeat_stop = None

    def _connected_now(self) -> Tuple[Optional[KazooClient], bool, int]:
        with self._lock:
            return self._client, self._connected, self._epoch

    # -- Oracle ------------------------------------------------------------------------------

    def check_contender(self, name: str, identity: str, metadata: Dict[str, Any]) -> Dict[str, Any]:
        """Raise (ValueError/TypeError naming the argument) for what ZooKeeper would refuse: an
        election name that is not a valid node name, a leader record over MAX_RECORD_BYTES.
        Returns a copy of ``metadata``. No I/O: callable at construction."""
        if not isinstance(name, str) or not _ELECTION.match(name) or name in (".", ".."):
            # '.' and '..' are path elements ZooKeeper refuses (PathUtils.validatePath)
            raise ValueError(f"name must be 1-128 characters of [A-Za-z0-9._-] (not '.' or '..'), got {name!r}")
        if not isinstance(identity, str):
            raise TypeError(f"identity must be a str, got {type(identity).__name__}")
        metadata = dict(metadata or {})
        try:
            size = _record_size(identity, metadata)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metadata must be JSON-serialisable: {exc}") from None
        if size > MAX_RECORD_BYTES:
            raise ValueError(
                f"metadata (with identity) too large for a ZooKeeper leader record: {size} bytes of "
                f"JSON, at most {MAX_RECORD_BYTES} (ZooKeeper's jute.maxbuffer is 1 MiB)"
            )
        return metadata

    def contender(self, name: str, identity: str, metadata: Dict[str, Any], on_change: OnChange) -> "ZooKeeperContender":
        metadata = self.check_contender(name, identity, metadata)
        if not callable(on_change):
            raise TypeError("on_change must be callable")
        contender = ZooKeeperContender(self, name, identity, metadata, on_change)
        self._register(contender)
        return contender

    def _read_leader(self, client: KazooClient, election: str, node: str) -> Optional[Leader]:
        try:
            data, stat = client.get_async(f"{election}/{node}").get(self._op_timeout())
        except NoNodeError:
            return None
        record = _parse_record(data)
        since = record.get("since")
        return Leader(
            identity=str(record.get("identity", "")),
            metadata=dict(record.get("metadata") or {}),
            token=stat.czxid,  # the term's token: the leader node's creation zxid
            since=since if isinstance(since, (int, float)) else stat.ctime / 1000.0,
        )

    def _queue(self, client: KazooClient, election: str) -> List[str]:
        try:
            children = client.get_children_async(election).get(self._op_timeout())
        except NoNodeError:
            return []
        return sorted((c for c in children if _NODE.match(c)), key=_sequence)

    def find_leader(self, name: str) -> Optional[Leader]:
        client, _epoch, _session = self._connection()
        election = self.election_path(name)
        try:
            for node in self._queue(client, election):
                leader = self._read_leader(client, election, node)
                if leader is not None:  # else it left meanwhile: the next one leads
                    return leader
        except KazooException as exc:
            raise _unavailable("reading the leader", exc) from exc
        return None

    def dismiss(self, name: str) -> bool:
        """Ask the leader to step down: write a dismissal request into its node.

        The leader's watch on its own node sees it, ends the term (child stopped first), then
        deletes its node, which is what lets the successor in: so the successor never starts
        while the dismissed leader's child still runs (deleting the leader's node directly would
        let both run for a moment). A leader that is dead or paused steps down by its deadline and
        its node goes when its session expires, as for any crash.

        The request targets the node first in the queue when we look (the leader, or the
        contender the crown is passing to: nobody else can lead) and names that node's token
        (``czxid``). It is never moved on to another node: if the target leaves before the
        request is written, it has stepped down already, and the next in line is not the leader
        the caller meant.
        """
        client, _epoch, _session = self._connection()
        election = self.election_path(name)
        try:
            queue = self._queue(client, election)
            if not queue:
                return False
            path = f"{election}/{queue[0]}"
            for _attempt in range(10):
                try:
                    data, stat = client.get_async(path).get(self._op_timeout())
                except NoNodeError:
                    logger.info("the leader of %s (node %s) left before the dismissal", name, queue[0])
                    return True
                record = _parse_record(data)
                if _is_dismissed(record, stat):
                    return True
                record["dismissed"] = stat.czxid
                try:
                    client.set_async(path, json.dumps(record).encode("utf-8"), version=stat.version).get(
                        self._op_timeout()
                    )
                except BadVersionError:
                    continue  # its owner wrote meanwhile (its first refresh publishes since): again
                except NoNodeError:
                    logger.info("the leader of %s (node %s) left before the dismissal", name, queue[0])
                    return True
                logger.info("asked the leader of %s (node %s, token %s) to step down", name, queue[0], stat.czxid)
                return True
        except NoAuthError:
            raise PermissionError(
                f"not allowed to dismiss the leader of {name!r}: its node's ACL does not give these "
                f"credentials write rights"
            ) from None
        except KazooException as exc:
            raise _unavailable("dismissing the leader", exc) from exc
        raise ZooKeeperUnavailable(f"the record of the leader of {name!r} kept changing; dismissal not written")

    def close(self) -> None:
        """Close the oracle: the client stops now if no contender uses it, else with the last one."""
        with self._lock:
            self._closed = True
            self._cond.notify_all()
            client = self._client if not self._contenders else None
            if client is not None:
                self._drop_client_locked()
        if client is not None:
            _stop_client(client)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        client, self._client = self._client, None
        if client is not None:
            _neuter(client)
        for contender in list(self._contenders):
            contender._after_fork_in_child()
        self._contenders = weakref.WeakSet()
        self._connected = False
        self._epoch += 1
        self._negotiated = None
        self._ensemble_check = None
        self._state = "not started"
        self._heartbeat_stop = None  # its thread stayed in the parent


class ZooKeeperContender(Contender):
    """One crown's node in the election's queue. A node hosts at most one term."""

    def __init__(self, oracle: ZooKeeperOracle, name: str, identity: str, metadata: Dict[str, Any], on_change: OnChange):
        self._oracle = oracle
        self._name = name
        self._election = oracle.election_path(name)
        self._identity = identity
        self._metadata = metadata
        self._on_change = on_change
        self._prefix = uuid.uuid4().hex + "-"
        self._mutex = threading.Lock()
        self._node: Optional[str] = None  # our node's name (not path)
        self._node_session: Optional[int] = None
        self._node_czxid: Optional[int] = None  # the token of the term this node may host
        self._node_version = 0  # data version of our node as we last wrote or read it
        self._verified_epoch = -1  # connection epoch in which our node was checked and watched
        self._node_gone = False  # our own watch saw our node deleted
        self._dismissed: Optional[str] = None  # our node carries a dismissal request
        self._releasing: Optional[str] = None  # the node we are deleting ourselves
        self._stale: Optional[str] = None  # a spent node abdicate() could not delete (disconnected)
        self._pending_create = False  # a create may have succeeded without our hearing of it
        self._won_on_node = False  # the current node has hosted a term: never another one
        self._predecessor: Optional[str] = None
        self._predecessor_epoch = -1
        self._next_in_line: Optional[Tuple[int, str]] = None  # (epoch, predecessor) if it leads
        self._fast: Optional[int] = None  # epoch in which the leader just before us left
        self._watch_gen = 0
        self._own_watcher = None  # (node, epoch, function)
        self._pred_watcher = None  # (predecessor, epoch, function)
        self._prefetch = None  # (epoch, sent at, AsyncResult of get_children) after a wake-up
        self._publish = None  # (node, since) to write into our record at the next refresh
        self._guard = self._prefix + "guard"  # our guard node's name (see the module docstring)
        self._guard_held: Optional[int] = None  # the session that owns our guard, when it exists
        self._guard_gen = 0  # bumped whenever we delete our guard
        self._guard_pending = None  # (session, AsyncResult) of a guard create sent with our node's
        self._pred_guard_gone: Optional[Tuple[int, str]] = None  # (epoch, predecessor) guard deleted
        self._pred_guard_watcher = None  # (predecessor, epoch, function)
        self._holds: Dict[Tuple[str, int], float] = {}  # (orphan guard, czxid) -> start no sooner
        self._hold: Optional[int] = None  # epoch in which a claim found us first but held back
        self._hold_timer: Optional[threading.Timer] = None
        self._hold_watcher = self._on_hold_event  # one object: kazoo keeps watchers in a set
        self._leading = False
        self._term_epoch = -1
        self._deadline: Optional[float] = None  # the deadline we last gave the current term
        self._leader: Optional[Leader] = None
        self._closed = False
        self._forked = False

    def __repr__(self) -> str:
        return f"<ZooKeeperContender {self._name} {self._identity} node={self._node}>"

    # -- helpers ---------------------------------------------------------------------------

    def _usable(self) -> None:
        if self._forked:
            raise RuntimeError(
                "this ZooKeeper contender was inherited across fork(); its node belongs to the "
                "parent's session: create a new crown in the child"
            )
        if self._closed:
            raise RuntimeError("the ZooKeeper contender is closed")

    def _path(self, node: str) -> str:
        return f"{self._election}/{node}"

    def _record(self, since: Optional[float]) -> bytes:
        return json.dumps(
            {"identity": self._identity, "metadata": self._metadata, "since": since},
            separators=(",", ":"),
        ).encode("utf-8")

    def _guard_record(self) -> bytes:
        # What a successor needs to wait out a term of ours that it cannot prove ended: the
        # longest lease we may give a term (the requested timeout bounds the negotiated one).
        return json.dumps(
            {"identity": self._identity, "session_timeout": self._oracle.session_timeout},
            separators=(",", ":"),
        ).encode("utf-8")

    def _drop_guard(self, client: Optional[KazooClient], node_path: Optional[str] = None):
        """Delete our guard: no child of ours runs any more. With ``node_path``, that node too, in
        one transaction, the guard first: a watcher sees the two deletions in that order (a
        release: _fast_win), for one write. Sent under our mutex, so that a claim's _win either
        sees the guard dropped or we see it leading (then the guard stays and only the node
        goes). Returns the request's AsyncResult (a list of results for a transaction), or None."""
        if client is None:
            return None
        with self._mutex:
            if self._forked:
                return None
            keep = self._leading
            if not keep:
                self._guard_held = None
                self._guard_gen += 1
                self._guard_pending = None
            try:
                if keep:
                    return client.delete_async(node_path) if node_path is not None else None
                if node_path is None:
                    return client.delete_async(self._path(self._guard))  # NoNode is fine
                transaction = client.transaction()
                transaction.delete(self._path(self._guard))
                transaction.delete(node_path)
                return transaction.commit_async()
            except Exception as exc:  # a closed client: the guard went with the session
                logger.debug("could not delete our guard in %s: %s", self._election, type(exc).__name__)
                return None

    def _guard_created(self, result, session: int, gen: int) -> None:
        """kazoo's thread: the guard create sent with our node came back."""
        try:
            result.get_nowait()
        except Exception:
            return  # NodeExists or trouble: _ensure_guard finds out before any win
        with self._mutex:
            if self._guard_gen == gen:
                self._guard_held = session

    def _ensure_guard(self, client: KazooClient, session: int, listed: Sequence[str], timeout: float) -> bool:
        """Make sure our guard exists, owned by ``session``, before a term starts. ``listed``: the
        election's children as just read. False if a concurrent drop made the answer stale."""
        with self._mutex:
            pending, self._guard_pending = self._guard_pending, None
        if pending is not None and pending[0] == session:
            try:
                pending[2].get(timeout)
                with self._mutex:
                    if self._guard_gen == pending[1]:
                        self._guard_held = session
            except NodeExistsError:
                pass  # ours from before (checked below)
        with self._mutex:
            if self._guard in listed and self._guard_held == session:
                return True
            gen = self._guard_gen
        path = self._path(self._guard)
        owned = False
        if self._guard not in listed:
            try:
                client.create_async(path, self._guard_record(), acl=self._oracle.acl, ephemeral=True).get(timeout)
                owned = True
            except NodeExistsError:
                pass
        if not owned:
            stat = client.exists_async(path).get(timeout)
            owned = stat is not None and stat.ephemeralOwner == session
        with self._mutex:
            if owned and self._guard_gen == gen:
                self._guard_held = session
                return True
        return False

    def _held_back(self, client: KazooClient, children: Sequence[str], listed_at: float, epoch: int,
                   timeout: float) -> Optional[Claim]:
        """We are first in the queue: may we start? Not while the guard of a contender whose queue
        node is gone (an *orphan* guard) still exists, unless that contender's longest lease,
        counted from ``listed_at`` (the end of the listing that showed its node gone), has passed.
        None: start. Else a lost claim; a watch on each orphan and a timer wake the engine."""
        owners = {c[:32] for c in children if _NODE.match(c)}
        orphans = [c for c in children if _GUARD.match(c) and c[:32] not in owners and c != self._guard]
        holds: Dict[Tuple[str, int], float] = {}
        leader = None
        requests = [(g, client.get_async(self._path(g), watch=self._hold_watcher)) for g in orphans]
        for guard, request in requests:
            try:
                data, stat = request.get(timeout)
            except NoNodeError:
                continue  # gone since: released after its child stopped, or its session expired
            record = _parse_record(data)
            # Its terms last lease_for(T') = 0.75 T' - 50 ms after a confirmation that started before
            # the deletion; we wait 0.75 T', those 50 ms being for its child's kill to land.
            lease = LEASE_FRACTION * _session_timeout_of(record, self._oracle.session_timeout)
            key = (guard, stat.czxid)
            holds[key] = self._holds.get(key, listed_at + lease)  # from the FIRST listing showing it
            leader = leader or Leader(str(record.get("identity", "")), {}, None, None)
        now = _monotonic()
        until = max(holds.values(), default=now)
        with self._mutex:
            self._holds = holds
            self._hold = epoch if until > now else None
        if until <= now:
            return None
        logger.info(
            "%s: the node of %s's last leader was deleted while its guard remains: its child may "
            "still run, so %s waits up to %.3gs for it to stop", self._election, self._name,
            self._identity, until - now,
        )
        self._arm_hold_timer(until - now)
        return Claim(won=False, leader=leader)

    def _on_hold_event(self, event) -> None:
        if event.type != EventType.NONE:
            self._notify()  # an orphan guard went (or changed): look again

    def _arm_hold_timer(self, delay: float) -> None:
        timer = threading.Timer(delay + 0.005, self._notify)
        timer.daemon = True
        with self._mutex:
            old, self._hold_timer = self._hold_timer, timer
            closed = self._closed
        if old is not None:
            old.cancel()
        if not closed:
            timer.start()

    def _notify(self, lost: bool = False) -> None:
        try:
            if lost:
                self._on_change(lost=True)
            else:
                self._on_change()
        except Exception:  # the engine's callback must never break kazoo's threads
            logger.exception("on_change callback failed")

    def _connection_changed(self, state: str) -> None:
        with self._mutex:
            if self._closed or self._forked:
                return
            leading = self._leading
            if state != KazooState.CONNECTED:
                self._leading = False
                self._prefetch = None
                self._fast = None
        if state == KazooState.SUSPENDED:
            if leading:
                self._notify(lost=True)  # the server may expire us while we can't hear it
        elif state == KazooState.LOST:
            self._notify(lost=leading)  # our node is gone with the session
        else:
            self._release_stale()
            self._notify()  # watches were dropped while disconnected: look again

    def _release_stale(self) -> None:
        """The same session is back: delete the node of a term that ended while we were cut off.

        abdicate() could not delete it then, and until it goes the next in line waits: for our
        next claim, which the engine may hold back with its retry backoff, or for our session to
        expire. Only a node abdicate() gave up counts (its term's child has stopped), and it is
        deleted only if it is still our session's (CURATOR-696) and unchanged since we looked.
        Runs from kazoo's connection thread: asynchronous requests only."""
        with self._mutex:
            node = self._stale
            if node is None or self._closed or self._forked:
                return
            if node != self._node or not self._won_on_node or self._leading:
                self._stale = None  # already dealt with (a claim deleted it, or it expired)
                return
            session = self._node_session
        client, connected, _epoch = self._oracle._connected_now()
        current = client.client_id if client is not None and connected else None
        if current and current[0] == session:  # else it went with the old session
            _release_node(client, self._path(node), session, lambda: self._forget(node, client), self._releasing_node)

    def _releasing_node(self, path: str) -> None:
        with self._mutex:
            self._releasing = path.rsplit("/", 1)[1]  # our own watch must not report this as a loss
        self._drop_guard(self._oracle._connected_now()[0])  # before the node: see _fast_win

    def _forget(self, node: str, client: Optional[KazooClient] = None) -> None:
        """Our spent ``node`` is gone: the next claim queues with a fresh one. With ``client``,
        its guard goes too (its term's child stopped before the node was given up)."""
        with self._mutex:
            if self._stale == node:
                self._stale = None
            current = self._node == node
            if current:
                self._node = None
                self._won_on_node = False
        if current:
            self._drop_guard(client)

    # -- watches (run in kazoo's threads: never block) --------------------------------------

    def _own_watch(self, node: str, epoch: int):
        """The data watch on our own node: its deletion (a session end, a hand) ends our term,
        and so does a dismissal request written into it. One function per node and connection
        epoch: kazoo keeps watchers in a set, so re-arming with it does not pile them up."""
        with self._mutex:
            cached = self._own_watcher
            if cached is not None and cached[0] == node and cached[1] == epoch:
                return cached[2]
        path = self._path(node)

        def watcher(event) -> None:
            if event.type == EventType.NONE:
                return  # connection state: the listener deals with it
            if event.type == EventType.DELETED:
                self._own_node_deleted(node)
                return
            client, connected, _epoch = self._oracle._connected_now()
            if client is not None and connected:  # read what changed, and watch on
                client.get_async(path, watch=watcher).rawlink(read)

        def read(result) -> None:
            try:
                data, stat = result.get_nowait()
            except NoNodeError:
                self._own_node_deleted(node)
                return
            except Exception:
                return  # connection trouble: the state listener deals with it
            self._own_node_read(node, data, stat)

        with self._mutex:
            self._own_watcher = (node, epoch, watcher)
        return watcher

    def _own_node_deleted(self, node: str) -> None:
        with self._mutex:
            if node != self._node or node == self._releasing or self._closed or self._forked:
                return
            self._node_gone = True
            leading, self._leading = self._leading, False
            won = self._won_on_node
        logger.info("node %s of %s was deleted", node, self._name)
        if not won:
            # No term on it: nothing of ours runs, so a successor need not wait for our guard.
            # After a term, abdicate() drops it once the child has stopped.
            self._drop_guard(self._oracle._connected_now()[0])
        self._notify(lost=leading)

    def _own_node_read(self, node: str, data: bytes, stat) -> None:
        dismissed = _is_dismissed(_parse_record(data), stat)
        with self._mutex:
            if node != self._node or self._closed or self._forked:
                return
            self._node_version = max(self._node_version, stat.version)
            if not dismissed or self._dismissed == node:
                return
            self._dismissed = node
            leading, self._leading = self._leading, False
        logger.info("the leader of %s (node %s) was dismissed", self._name, node)
        self._notify(lost=leading)

    def _predecessor_watch(self, predecessor: str, epoch: int):
        """The watch on the node just before ours; a newer one replaces it."""
        with self._mutex:
            cached = self._pred_watcher
            if cached is not None and cached[0] == predecessor and cached[1] == epoch:
                return cached[2]
            self._watch_gen += 1
            gen = self._watch_gen
        path = self._path(predecessor)

        def watcher(event) -> None:
            if event.type == EventType.NONE:
                return
            with self._mutex:
                if gen != self._watch_gen or self._closed or self._forked:
                    return
                if event.type == EventType.DELETED:
                    self._pred_watcher = None
                    # It led (it was first when we last looked): now we are first. Nodes are
                    # only ever added behind the last one, so no look is needed, provided its
                    # guard went first (a release, or its session's end): else someone else
                    # deleted its node, maybe under a running child, and the claim must look.
                    fast = (self._next_in_line == (epoch, predecessor)
                            and self._pred_guard_gone == (epoch, predecessor))
                    if fast:
                        self._fast = epoch
            if event.type == EventType.DELETED:
                if fast or not self._prefetch_queue(epoch):
                    self._notify()  # else once the queue is in
                return
            # Its record changed: it just won (its first refresh publishes since), or was
            # dismissed. Keep watching for its exit, and look whether it now leads: then we are
            # next in line and can take over without a round trip when it goes.
            client, connected, now_epoch = self._oracle._connected_now()
            if client is not None and connected and now_epoch == epoch:
                sent = _monotonic()
                client.get_children_async(self._election).rawlink(lambda result: listed(result, sent))
                client.exists_async(path, watch=watcher).rawlink(check)

        def listed(result, sent: float) -> None:
            try:
                children = result.get_nowait()
            except Exception:
                return
            self._oracle._confirm(sent, epoch)
            queue = sorted(
                (c for c in children if _NODE.match(c) and not c.startswith(self._prefix)), key=_sequence
            )
            with self._mutex:
                leads = gen == self._watch_gen and bool(queue) and queue[0] == predecessor
                if leads:
                    self._next_in_line = (epoch, predecessor)
            if leads:
                self._watch_pred_guard(predecessor, epoch)

        def check(result) -> None:
            try:
                stat = result.get_nowait()
            except Exception:
                return  # connection trouble: the state listener deals with it
            if stat is None:
                watcher(WatchedEvent(EventType.DELETED, None, path))

        with self._mutex:
            self._pred_watcher = (predecessor, epoch, watcher)
        return watcher

    def _watch_pred_guard(self, predecessor: str, epoch: int) -> None:
        """Watch the guard of the leader just before us: its deletion, seen before its node's,
        proves the leader's child stopped (or its session ended), which allows _fast_win.
        Asynchronous: the fast path is merely unavailable until the watch is in place."""
        with self._mutex:
            cached = self._pred_guard_watcher
            if cached is not None and cached[0] == predecessor and cached[1] == epoch:
                watcher = cached[2]
            else:
                def watcher(event) -> None:
                    if event.type == EventType.DELETED:
                        with self._mutex:
                            self._pred_guard_gone = (epoch, predecessor)

                self._pred_guard_watcher = (predecessor, epoch, watcher)
        client, connected, now_epoch = self._oracle._connected_now()
        if client is not None and connected and now_epoch == epoch:
            client.exists_async(self._path(_guard_of(predecessor)), watch=watcher)

    def _prefetch_queue(self, epoch: int) -> bool:
        """A predecessor that did not lead left: ask for the queue at once, from here, and wake
        the engine when the answer is in (waking it first would have its thread compete for the
        GIL with the kazoo thread that sends the request). The claim then uses the answer, with
        the time of asking as the (conservative) start of the term's deadline. False if nothing
        was sent."""
        client, connected, now_epoch = self._oracle._connected_now()
        if client is None or not connected or now_epoch != epoch:
            return False
        sent = _monotonic()
        result = client.get_children_async(self._election, include_data=True)
        with self._mutex:
            self._prefetch = (epoch, sent, result)
        result.rawlink(lambda _result: self._notify())
        return True

    # -- Contender ---------------------------------------------------------------------------

    def claim(self) -> Claim:
        self._usable()
        oracle = self._oracle
        # A short wait: the engine retries with backoff, and its stop() waits for this call.
        client, epoch, session = oracle._connection(lambda: self._closed, CLAIM_CONNECT_WAIT)
        oracle._check_ensemble(client, epoch)
        with self._mutex:
            self._leading = False
            self._hold = None
        try:
            return self._fast_win(epoch, session) or self._claim(client, epoch, session)
        except KazooException as exc:
            raise _unavailable("claiming", exc) from exc
        except oracle_timeout(client) as exc:
            raise ZooKeeperUnavailable(f"no reply from ZooKeeper at {oracle.description} while claiming") from exc

    def _fast_win(self, epoch: int, session: int) -> Optional[Claim]:
        """The leader just before us left and nothing else changed: win without a round trip.

        The term's deadline starts from the last request this session had answered (the oracle
        keeps one going every T/4), so it is at most T/3 old here or we take the slow path."""
        oracle = self._oracle
        with self._mutex:
            fast, self._fast = self._fast, None
            node = self._node
            usable = (
                fast == epoch and node is not None and not self._node_gone and self._dismissed != node
                and not self._won_on_node and self._verified_epoch == epoch
                and self._next_in_line is not None and self._next_in_line[0] == epoch
                and self._guard_held == session
            )
        if not usable:
            return None
        confirmed = oracle._confirmed_since(epoch)
        if confirmed is None or _monotonic() - confirmed > oracle.effective_timeout() / REFRESHES_PER_TIMEOUT:
            return None
        return self._win(node, confirmed, epoch, session)

    def _claim(self, client: KazooClient, epoch: int, session: int) -> Claim:
        oracle = self._oracle
        timeout = oracle._op_timeout()
        for _attempt in range(5):
            with self._mutex:
                node = self._node
                if node is not None and (self._node_session != session or self._node_gone):
                    node = self._node = None  # expired with an old session, or deleted
                spent = node is not None and (self._dismissed == node or self._won_on_node)
                verify = node is not None and self._verified_epoch != epoch
                prefetch, self._prefetch = self._prefetch, None
                self._next_in_line = None
            if spent:
                # Dismissed, or its term is over (the engine could not delete it then): a node
                # hosts one term only, so leave the queue and join it again at its back.
                self._drop_guard(client)
                self._delete_own(client, node, timeout)
                continue
            if verify:
                node = self._verify(client, node, session, epoch, timeout)
                if node is not None and self._dismissed == node:
                    continue
            if node is None and not self._pending_create:
                node = self._create(client, session, epoch, timeout)
                prefetch = None  # asked before our node existed
            children, t0 = self._list(client, prefetch if node is not None else None, epoch, timeout)
            listed_at = _monotonic()  # after the server applied anything this listing shows
            oracle._confirm(t0, epoch)
            queue = sorted((c for c in children if _NODE.match(c)), key=_sequence)
            mine = [c for c in queue if c.startswith(self._prefix)]
            if node is None:  # a create whose reply we missed: adopt its node if it is ours
                node = self._adopt(client, mine, session, epoch, timeout)
                if node is None:
                    continue
            if node not in queue:
                with self._mutex:
                    if self._node == node:
                        self._node = None
                continue
            for zombie in mine:
                if zombie != node:  # a duplicate from a retried create: not a real contender
                    client.delete_async(self._path(zombie))
            queue = [c for c in queue if c == node or not c.startswith(self._prefix)]
            if oracle._connected_now()[2] != epoch:
                raise ZooKeeperUnavailable("the ZooKeeper connection dropped during the claim")
            position = queue.index(node)
            if position == 0:
                held_back = self._held_back(client, children, listed_at, epoch, timeout)
                if held_back is not None:
                    return held_back
                if not self._ensure_guard(client, session, children, timeout):
                    continue
                claim = self._win(node, t0, epoch, session)
                if claim is None:
                    continue  # dismissed or deleted meanwhile: deal with it and look again
                return claim
            with self._mutex:
                self._predecessor = queue[position - 1]
                self._predecessor_epoch = epoch
                if position == 1:
                    self._next_in_line = (epoch, queue[0])
            leader = oracle._read_leader(client, self._election, queue[0])
            return Claim(won=False, leader=leader)
        raise ZooKeeperUnavailable(f"our node in {self._election} kept changing during the claim")

    def _verify(self, client: KazooClient, node: str, session: int, epoch: int, timeout: float) -> Optional[str]:
        """After a reconnect: is our node still there, still our session's, not dismissed (then
        marked so)? Returns it, or None if it is gone."""
        try:
            data, stat = client.get_async(self._path(node), watch=self._own_watch(node, epoch)).get(timeout)
        except NoNodeError:
            stat = None
        with self._mutex:
            if stat is None or stat.ephemeralOwner != session:
                self._node = None
                return None
            self._verified_epoch = epoch
            self._node_version = stat.version
        if _is_dismissed(_parse_record(data), stat):
            with self._mutex:
                self._dismissed = node
        return node

    def _list(self, client: KazooClient, prefetch, epoch: int, timeout: float) -> Tuple[List[str], float]:
        """The election's children and the start of the request that read them: a fresh
        prefetched answer (asked by a watch when woken) if there is one, else asked now."""
        if prefetch is not None and prefetch[0] == epoch and _monotonic() - prefetch[1] < 1.0:
            try:
                children, _parent = prefetch[2].get(timeout)
                return children, prefetch[1]
            except Exception:
                pass  # ask afresh
        t0 = _monotonic()
        return client.get_children_async(self._election).get(timeout), t0

    def _create(self, client: KazooClient, session: int, epoch: int, timeout: float) -> str:
        with self._mutex:
            self._pending_create = True
        path, stat = client.create_async(
            f"{self._election}/{self._prefix}",
            self._record(None),
            acl=self._oracle.acl,
            ephemeral=True,
            sequence=True,
            makepath=True,
            include_data=True,
        ).get(timeout)
        node = path.rsplit("/", 1)[1]
        self._take(node, stat, -1)
        if stat.ephemeralOwner != session:
            raise ZooKeeperUnavailable("the ZooKeeper session changed during the claim")
        with self._mutex:
            if self._guard_held != session:
                # Our guard comes after our node, so that a guard without its node means the node
                # was deleted under us; pipelined with the reads that follow, and a win waits for
                # it (_ensure_guard).
                request = client.create_async(
                    self._path(self._guard), self._guard_record(), acl=self._oracle.acl, ephemeral=True
                )
                self._guard_pending = (session, self._guard_gen, request)
                request.rawlink(lambda result, gen=self._guard_gen: self._guard_created(result, session, gen))
        # Watch our own node from now on; pipelined with the listing that follows.
        client.get_async(path, watch=self._own_watch(node, epoch))
        with self._mutex:
            self._verified_epoch = epoch
        return node

    def _take(self, node: str, stat, epoch: int) -> None:
        with self._mutex:
            self._pending_create = False
            self._node = node
            self._node_session = stat.ephemeralOwner
            self._node_czxid = stat.czxid
            self._node_version = stat.version
            self._node_gone = False
            self._won_on_node = False
            self._verified_epoch = epoch

    def _adopt(self, client: KazooClient, mine: List[str], session: int, epoch: int, timeout: float) -> Optional[str]:
        for candidate in mine:
            try:
                _data, stat = client.get_async(self._path(candidate), watch=self._own_watch(candidate, epoch)).get(timeout)
            except NoNodeError:
                continue
            if stat.ephemeralOwner == session:
                self._take(candidate, stat, epoch)
                return candidate
        with self._mutex:
            self._pending_create = False  # nothing of ours there: create afresh next time round
        return None

    def _delete_own(self, client: KazooClient, node: str, timeout: float) -> None:
        with self._mutex:
            self._releasing = node  # our own watch must not report this as a loss
        try:
            client.delete_async(self._path(node)).get(timeout)
        except NoNodeError:
            pass
        with self._mutex:
            if self._node == node:
                self._node = None
                self._won_on_node = False

    def _win(self, node: str, t0: float, epoch: int, session: int) -> Optional[Claim]:
        oracle = self._oracle
        since = time.time()
        with self._mutex:
            if self._closed:
                raise RuntimeError("the ZooKeeper contender is closed")
            # The caller checked the connection epoch before calling us, but SUSPENDED may have
            # come since: _connection_changed then saw _leading False and sent no loss signal,
            # so winning now would start a term nobody ends. Checked under our mutex, which
            # _connection_changed takes after the oracle bumped the epoch: either we see the new
            # epoch here, or it sees _leading True below and signals the loss.
            _client, connected, now_epoch = oracle._connected_now()
            if not connected or now_epoch != epoch:
                raise ZooKeeperUnavailable("the ZooKeeper connection dropped during the claim")
            if self._node != node or self._node_gone or self._dismissed == node or self._won_on_node:
                return None
            if self._guard_held != session:
                return None  # dropped meanwhile: a term never starts without our guard
            token = self._node_czxid
            leader = Leader(self._identity, dict(self._metadata), token, since)
            self._leading = True
            self._won_on_node = True
            self._term_epoch = epoch
            self._leader = leader
            self._next_in_line = None
            # since is published in our record by the first refresh, soon after: a write here
            # would cost the new term's start a thread switch to kazoo's connection thread.
            self._publish = (node, since)
            timeout_now = oracle.effective_timeout()
            self._deadline = t0 + oracle.lease_for(timeout_now)
        return Claim(
            won=True,
            leader=leader,
            token=token,
            deadline=self._deadline,
            refresh_in=min(PUBLISH_DELAY, timeout_now / REFRESHES_PER_TIMEOUT),
        )

    def _publish_record(self, client: KazooClient, node: str, since: float) -> None:
        """Write ``since`` into our record; versioned, so a dismissal written meanwhile stays."""
        with self._mutex:
            version = self._node_version

        def published(result) -> None:
            try:
                stat = result.get_nowait()
            except Exception:
                return  # a dismissal got there first (BadVersion), or connection trouble
            with self._mutex:
                if self._node == node:
                    self._node_version = max(self._node_version, stat.version)

        client.set_async(self._path(node), self._record(since), version=version).rawlink(published)

    def refresh(self) -> Claim:
        self._usable()
        oracle = self._oracle
        client, connected, epoch = oracle._connected_now()
        with self._mutex:
            node = self._node
            ok = (self._leading and node is not None and not self._node_gone
                  and self._dismissed != node and self._term_epoch == epoch)
            session = self._node_session
            leader = self._leader
            deadline = self._deadline
            if not ok or not connected or client is None:
                self._leading = False
            publish, self._publish = self._publish, None
        if not ok or not connected or client is None:
            return Claim(won=False)
        if publish is not None and publish[0] == node:
            self._publish_record(client, *publish)  # pipelined with the confirmation below
        t0 = _monotonic()
        # A reply after the term's deadline is of no use (the term is over by then), so wait no
        # longer: against a frozen server this bounds how long a stop() waits for this call.
        wait = oracle._op_timeout() if deadline is None else min(oracle._op_timeout(), max(0.01, deadline - t0))
        try:
            stat = client.exists_async(self._path(node)).get(wait)
        except KazooException as exc:
            raise _unavailable("refreshing", exc) from exc
        except oracle_timeout(client) as exc:
            raise ZooKeeperUnavailable(f"no reply from ZooKeeper at {oracle.description} while refreshing") from exc
        with self._mutex:
            if oracle._connected_now()[2] != self._term_epoch or not self._leading:
                self._leading = False
                return Claim(won=False)
            if stat is None or stat.ephemeralOwner != session:
                self._leading = False
                self._node_gone = True
                return Claim(won=False)
            timeout_now = oracle.effective_timeout()
            self._deadline = t0 + oracle.lease_for(timeout_now)
        oracle._confirm(t0, epoch)
        return Claim(
            won=True,
            leader=leader,
            token=leader.token,
            deadline=t0 + oracle.lease_for(timeout_now),
            refresh_in=timeout_now / REFRESHES_PER_TIMEOUT,
        )

    def watch(self, leader: Optional[Leader]) -> bool:
        self._usable()
        oracle = self._oracle
        client, connected, epoch = oracle._connected_now()
        with self._mutex:
            if self._hold == epoch:
                return True  # first, held back: an orphan guard's watch or the timer wakes us
            predecessor = self._predecessor
            stale = self._node is None or self._node_gone or self._predecessor_epoch != epoch
            leads = self._next_in_line == (epoch, predecessor)
        if predecessor is None or stale:
            return False  # claim again first
        if client is None or not connected:
            # Disconnected: the state listener calls on_change() on reconnect (or LOST), which
            # is exactly when looking again makes sense.
            return True
        watcher = self._predecessor_watch(predecessor, epoch)
        if leads:
            self._watch_pred_guard(predecessor, epoch)
        sent = _monotonic()
        try:
            stat = client.exists_async(self._path(predecessor), watch=watcher).get(oracle._op_timeout())
        except KazooException as exc:
            if oracle._connected_now()[2] != epoch:
                return True  # the connection dropped meanwhile: same as above
            raise _unavailable("watching", exc) from exc
        except oracle_timeout(client) as exc:
            raise ZooKeeperUnavailable(f"no reply from ZooKeeper at {oracle.description} while watching") from exc
        oracle._confirm(sent, epoch)
        return stat is not None

    def abdicate(self) -> None:
        if self._forked:
            return
        with self._mutex:
            self._leading = False
            node = self._node if self._won_on_node else None  # a follower keeps its place
        if node is None:
            return
        if self._delete(node):
            self._forget(node)  # _delete dropped the guard already
            return
        with self._mutex:
            if self._node == node:
                self._stale = node  # deleted as soon as the same session reconnects
        client, connected, _epoch = self._oracle._connected_now()
        if client is not None and connected:
            self._release_stale()  # the connection came back while we tried

    def _delete(self, node: str) -> bool:
        """Delete our node if we can do it now (bounded). True if it is gone."""
        client, connected, _epoch = self._oracle._connected_now()
        if client is None or not connected:
            # Not now (no waiting on a reconnect): abdicate() leaves it to _release_stale,
            # close() to an asynchronous request; failing those, it goes with our session.
            return False
        with self._mutex:
            self._releasing = node
        path = self._path(node)
        timeout = min(CLOSE_TIMEOUT, self._oracle._op_timeout())
        try:
            request = self._drop_guard(client, path) or client.delete_async(path)
            outcome = request.get(timeout)
            if isinstance(outcome, list) and isinstance(outcome[0], NoNodeError):
                client.delete_async(path).get(timeout)  # our guard was gone already: the node alone
            elif isinstance(outcome, list) and isinstance(outcome[1], NoNodeError):
                # The node was deleted by someone else (a revocation): the guard alone, which
                # tells the waiting successor that our child has stopped.
                client.delete_async(self._path(self._guard)).get(timeout)
            elif isinstance(outcome, list) and any(isinstance(r, Exception) for r in outcome):
                raise next(r for r in outcome if isinstance(r, Exception))
        except NoNodeError:
            return True
        except Exception as exc:  # bounded best effort: the session's end removes it anyway
            logger.warning("could not delete %s: %s", self._path(node), type(exc).__name__)
            return False
        return True

    def close(self) -> None:
        if self._forked:
            return
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._leading = False
            node, self._node = self._node, None
            session = self._node_session
            stale = node is not None and node == self._stale  # abdicate() already tried in vain
            pending = self._pending_create
            self._watch_gen += 1
            self._prefetch = None
            timer, self._hold_timer = self._hold_timer, None
        if timer is not None:
            timer.cancel()
        if node is None:
            client, connected, _epoch = self._oracle._connected_now()
            if connected:
                self._drop_guard(client)  # a guard may outlive a node deleted by someone else
        if node is not None and (stale or not self._delete(node)):
            # Not deletable now (cut off, or no answer in time): ask again without waiting, so
            # that the node does not hold the queue for as long as a shared session lives (kazoo
            # sends queued requests once it reconnects; the node goes with the session anyway).
            client = self._oracle._connected_now()[0]
            if client is not None and session is not None:
                drop = lambda *_args: self._drop_guard(client)  # noqa: E731
                _release_node(client, self._path(node), session, drop, drop)
        if pending:
            self._sweep()
        self._oracle._unregister(self)

    def _sweep(self) -> None:
        """Delete any node of ours a create left behind without our hearing of it (it would
        otherwise hold a place in the queue for as long as the shared session lives)."""
        client, connected, _epoch = self._oracle._connected_now()
        if client is None or not connected:
            return
        try:
            children = client.get_children_async(self._election).get(CLOSE_TIMEOUT)
            for child in children:
                if child.startswith(self._prefix):
                    client.delete_async(self._path(child)).get(CLOSE_TIMEOUT)
        except Exception as exc:
            logger.warning("could not clean up %s: %s", self._election, type(exc).__name__)

    def _after_fork_in_child(self) -> None:
        self._forked = True
        self._mutex = threading.Lock()


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


def _read_conf(client: KazooClient) -> Optional[Dict[str, str]]:
    """The ``conf`` of the member our session is connected to; None if it cannot be read."""
    try:
        peer = client._connection._socket.getpeername()[:2]
        sock = client.handler.create_connection(peer, timeout=CONF_TIMEOUT)
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


def _stop_client(client: KazooClient, timeout: float = CLOSE_TIMEOUT) -> None:
    """Stop a client (closing its session) without waiting more than ``timeout``.

    kazoo's stop() can wait 10 s for its connection thread when the server is unreachable, so it
    runs in a daemon thread that we stop waiting for.
    """

    def stop() -> None:
        try:
            client.stop()
            client.close()
        except Exception as exc:
            logger.debug("stopping the ZooKeeper client: %s", type(exc).__name__)

    thread = threading.Thread(target=stop, name="crown-sync-zookeeper-stop", daemon=True)
    thread.start()
    thread.join(timeout)


class _ForkSafeHandler(SequentialThreadingHandler):
    """kazoo's threading handler, but the connection to a server is opened under the fork guard
    and recorded, so a fork while kazoo's thread connects never copies it (crown_sync._forksafe)."""

    def create_connection(self, *args, **kwargs):
        with _forksafe.opening() as keep:
            sock = super().create_connection(*args, **kwargs)
            keep(sock)
        return sock


def _neuter(client: KazooClient) -> None:
    """In a forked child: point the inherited client's sockets at /dev/null, so nothing the child
    does (closing, a goodbye, a wake-up byte) can reach the parent's session or threads."""
    connection = getattr(client, "_connection", None)
    sockets = [getattr(connection, name, None) for name in ("_socket", "_read_sock", "_write_sock")]
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for sock in sockets:
            try:
                fd = sock.fileno() if sock is not None else -1
            except (OSError, ValueError):
                fd = -1
            if fd >= 0:
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)
    _ABANDONED.append(client)


def _after_fork_in_child() -> None:
    for oracle in list(_ORACLES):
        try:
            oracle._after_fork_in_child()
        except Exception:  # never break the child's start
            pass


os.register_at_fork(after_in_child=_after_fork_in_child)
