"""memcached oracle: a lease record claimed with ``add`` and renewed and released only by CAS.

For apps whose only shared service is memcached. One key per election, ``<key_prefix><name>``,
holds a JSON lease record; how a lease lives and dies, and why no two terms overlap, is the
argument of :mod:`crown_sync.oracles._lease`, which this oracle runs on memcached's ``add``
(create only if absent), ``gets`` (read with a CAS id) and ``cas`` (replace only that version).

memcached's one-second expiry granularity and its clock do not enter that argument: its expiry of
a record only collects abandoned records. A revocation (the key deleted by someone else,
``flush_all``, a restart, an eviction) leaves no record: the next claimant's quarantine (one
``ttl``) waits it out, and the revoked child, however slow to honour SIGTERM, is killed at its
deadline.

Fencing tokens
--------------
``token = max(previous token + 1, clock() in microseconds)``, computed when the term starts, where
``clock`` is the oracle's wall clock (:func:`time.time` unless given). While the record survives
(clean handoffs, crash takeovers, dismissals) tokens rise strictly with no assumption at all. When
memcached loses the record, the next token is the new leader's wall clock in microseconds, read at
least ``ttl`` after the previous term's token was issued (the quarantine): it is larger as long as
no host's wall clock is behind the previous leader's clock by ``ttl`` or more (skew between
hosts, or a clock stepped backwards). That is an assumption, stated plainly; keep clocks in sync
(NTP) and ``ttl`` generous.

What is NOT guaranteed
----------------------
* memcached is a cache: it may lose the record at any time. That costs liveness (a ``ttl`` of
  quarantine, and the dismissed leader runs until its next renewal or deadline), never overlap by
  the argument above; but tokens across such a loss rest on the clock assumption.
* A paused or partitioned leader stops by its deadline only if the engine's deadline machinery
  runs (it does, see ``crown_sync.crown``); work already in flight when the deadline passes can
  land after a successor started: pass ``term.token`` to the resource and let it reject stale
  tokens.
* Monotonic clocks must run at about the same rate on every host (they do; NTP slews).
* Anyone who can write to the memcached server can write the lease, unless the server requires a
  TLS client certificate (``tls_cert``; SASL needs the binary protocol, which pymemcache does not
  speak). A delete or a foreign record only ends the term (the quarantine and the deadline hold),
  but a forged ``released`` record lets a follower start while the leader's child still runs,
  until the leader's next renewal: keep memcached on a trusted network or require client
  certificates. Said once per server as a warning; see docs/sharing.rst.

Connection loss: every call has ``timeout``; a failed call raises (the engine retries until the
deadline, then stops the child). pymemcache reconnects on the next call.

Requests at rest: a follower makes one ``gets`` (as cheap as a ``get``) per ``poll_interval``
(default 0.2 s: at most 5/s); a leader one meta-protocol ``ms`` (a CAS that returns the new CAS
id, memcached 1.6+; before: a ``gets`` and a ``cas``) per ``renew_interval`` (0.33/s
with the default ttl). memcached cannot push a change, so a graceful handoff waits for the
quickest follower's next poll: half a poll interval on average with one follower, a third with
two; lower ``poll_interval`` for faster handoffs at more requests. Crash failover: a follower
takes over ``ttl`` after it first saw the leader's last renewal, i.e. at most ``ttl +
poll_interval`` after the crash (and as little as ``ttl - renew_interval`` when the leader died
just before renewing).

Connections: one per oracle object (its contenders' calls take turns on it) and one poller thread
for all its followers (see :mod:`crown_sync.oracles._lease`).

Fork safety: in a forked child, inherited sockets get /dev/null dup2'ed over them (so nothing the
child does can write into the parent's connection) and inherited contenders become unusable.
"""

import logging
import socket
import threading
import time
import urllib.parse
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import tenacity
from pymemcache.client.base import Client
from pymemcache.exceptions import (MemcacheClientError, MemcacheError, MemcacheUnexpectedCloseError,
                                   MemcacheUnknownCommandError)

from .. import _forksafe
from ._tls import client_context
from ..urls import one_server, parse_options, redact
from ._base import ListingUnsupported
from ._lease import MIN_MARGIN_RATIO, URL_OPTIONS, LeaseContender, LeaseOracle, LeaseStore, default_margin

__all__ = ["MemcachedOracle", "MemcachedContender", "MemcachedError", "default_margin", "MIN_MARGIN_RATIO"]

logger = logging.getLogger("crown_sync.oracles.memcached")

_OPTIONS = URL_OPTIONS

#: TLS (memcached -Z): see MemcachedOracle.
_TLS_OPTIONS = {"tls": bool, "tls_ca": str, "tls_cert": str, "tls_key": str}

#: memcached's own limit on a key's length (bytes).
_MAX_KEY = 250

MemcachedContender = LeaseContender


class MemcachedError(ConnectionError):
    """memcached could not be reached or answered an error (the message names the server)."""


_READS = ("get", "gets", "gets_many")
_STALE = (MemcacheUnexpectedCloseError, ConnectionResetError, BrokenPipeError)


def _parse_server(server: Union[str, Tuple[str, int]]) -> Tuple[str, int]:
    if isinstance(server, (list, tuple)) and len(server) == 2 and isinstance(server[0], str) and not isinstance(
        server[1], (list, tuple, str)
    ):
        host, port = server
    elif isinstance(server, str):
        if "," in server or " " in server.strip():
            raise ValueError(
                f"server must be ONE memcached server, got {server!r}: a lease cannot be sharded "
                f"across a hash ring; give each election one server"
            )
        text = server.strip()
        if text.startswith("["):  # [::1]:11211
            host, _, rest = text[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else 11211
        elif text.count(":") == 1:
            host, port = text.split(":")
        else:
            host, port = text, 11211
    elif isinstance(server, (list, tuple)):
        raise ValueError(
            f"server must be ONE memcached server, got {len(server)}: a lease cannot be sharded "
            f"across a hash ring; give each election one server"
        )
    else:
        raise TypeError(f"server must be 'host:port' or (host, port), got {type(server).__name__}")
    if not isinstance(host, str) or not host:
        raise ValueError(f"server host must be a non-empty string, got {host!r}")
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ValueError(f"server port must be an integer, got {port!r}") from None
    if isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError(f"server port must be in 1..65535, got {port!r}")
    return host, port


class _ForkSafeSocketModule:
    """The ``socket`` module as pymemcache uses it, but every socket is recorded as it is made, so
    that a fork at any moment never leaves a copy of it in the child (see crown_sync._forksafe)."""

    def __getattr__(self, name):
        return getattr(socket, name)

    @staticmethod
    def socket(*args, **kwargs) -> socket.socket:
        with _forksafe.opening() as keep:
            sock = socket.socket(*args, **kwargs)
            keep(sock)
        return sock


_fork_safe_sockets = _ForkSafeSocketModule()


class _Connection(LeaseStore):
    """The oracle's one pymemcache client (one socket), shared by its contenders: calls take
    turns on it (memcached answers in order on a connection; one call is a fraction of a
    millisecond), each waiting at most ``timeout`` for its turn."""

    def __init__(self, oracle: "MemcachedOracle"):
        self._oracle = oracle
        self._client: Optional[Client] = None
        self._turn = threading.Lock()
        self._meta = True  # the server speaks the meta protocol (until it says otherwise)
        self._written = threading.local()  # each thread's last meta-set write and its CAS id
        self.closed = False

    def read(self, key: str) -> Tuple[Optional[bytes], Any]:
        return self.call("gets", key)

    def read_many(self, keys: List[str]) -> Dict[str, Tuple[Optional[bytes], Any]]:
        found = self.call("gets_many", keys)  # one round trip; absent keys are left out
        return {key: found.get(key, (None, None)) for key in keys}

    def create(self, key: str, value: bytes, expire: int) -> bool:
        return bool(self.call("add", key, value, expire=expire, noreply=False))

    def replace(self, key: str, value: bytes, version: Any, expire: int) -> Optional[bool]:
        if self._meta:
            # The meta protocol's set (memcached 1.6+) compares the CAS id as ``cas`` does and
            # returns the new one (flag c): a holder then renews by one request, no read first.
            command = b"ms %s %d C%d c T%d\r\n%s" % (key.encode("ascii"), len(value), int(version), int(expire), value)
            try:
                return self._stored(value, self.call("raw_command", command))
            except MemcachedError as exc:
                # Before 1.6 "ms" is unknown; 1.6.0 to 1.6.9 spoke another meta-set (the size as
                # the S flag): CLIENT_ERROR. Either way pymemcache dropped that connection.
                if not isinstance(exc.__cause__, (MemcacheUnknownCommandError, MemcacheClientError)):
                    raise
                self._meta = False
        return self.call("cas", key, value, version, expire=expire, noreply=False)

    def _stored(self, value: bytes, line: bytes) -> Optional[bool]:
        status, _, flags = line.partition(b" ")
        if status == b"HD":
            if flags.startswith(b"c") and flags[1:].isdigit():
                self._written.last = (value, flags[1:])
            return True
        return None if status == b"NF" else False  # EX: changed since; NS: not stored

    def written_version(self, value: bytes) -> Any:
        written = getattr(self._written, "last", None)
        return written[1] if written is not None and written[0] == value else None

    def entries(self, prefix: str) -> Dict[str, Optional[bytes]]:
        # memcached cannot list keys except by its LRU crawler's metadump (on unless started
        # with -o no_lru_crawler): one line per item, its key URL-encoded. "hash" walks the hash
        # table (1.6+): a renewal replaces an item in its own bucket, whereas a walk of the LRUs
        # ("all") misses a record renewed into a list it has already walked.
        retrying = tenacity.Retrying(  # BUSY: another client's crawl runs; it ends soon
            stop=tenacity.stop_after_attempt(20),
            wait=tenacity.wait_fixed(0.05),
            retry=tenacity.retry_if_result(lambda dump: dump.startswith(b"BUSY")),
            retry_error_callback=lambda state: state.outcome.result(),
        )
        # Its lines end in a bare \n, the dump in END\r\n, an error in \r\n: read to the first \r\n.
        try:
            dump = retrying(self.call, "raw_command", b"lru_crawler metadump hash", b"\r\n")
        except MemcachedError as exc:
            if not isinstance(exc.__cause__, MemcacheClientError):  # unreachable: not a refusal
                raise
            dump = str(exc.__cause__).encode()  # "lru crawler disabled" (-o no_lru_crawler)
        if not dump.endswith(b"END"):
            why = dump.decode("ascii", "replace").strip()
            raise ListingUnsupported(f"memcached at {self._oracle.description} cannot list its keys"
                                     f" (lru_crawler metadump answered {why!r})")
        keys = []
        for line in dump.splitlines():
            if line.startswith(b"key="):
                key = urllib.parse.unquote(line.split(b" ", 1)[0][4:].decode("ascii"))
                if key.startswith(prefix):
                    keys.append(key)
        return self.call("get_many", keys) if keys else {}

    def call(self, method: str, *args, **kwargs):
        if self.closed:
            raise RuntimeError("memcached connection is closed")
        try:
            if method in _READS:
                # A read on a connection the server closed meanwhile (it restarted) is retried
                # once on a fresh one: harmless for a read, unlike a write whose fate is unknown.
                retrying = tenacity.Retrying(
                    stop=tenacity.stop_after_attempt(2),
                    retry=tenacity.retry_if_exception_type(_STALE),
                    reraise=True,
                )
                return retrying(self._invoke, method, *args, **kwargs)
            return self._invoke(method, *args, **kwargs)
        except (OSError, MemcacheError, ValueError) as exc:
            raise MemcachedError(
                f"memcached at {self._oracle.description}: {method} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _invoke(self, method: str, *args, **kwargs):
        if not self._turn.acquire(timeout=self._oracle.timeout):
            raise socket.timeout(f"the shared connection stayed busy for {self._oracle.timeout:g} s")
        try:
            if self.closed:
                raise RuntimeError("memcached connection is closed")
            if self._client is None:
                self._client = self._oracle._new_client()
            try:
                return getattr(self._client, method)(*args, **kwargs)
            except Exception:
                self._client.close()
                raise
        finally:
            self._turn.release()

    def socket(self) -> Optional[socket.socket]:
        client = self._client
        return getattr(client, "sock", None) if client is not None else None

    def interrupt(self) -> None:
        self.closed = True
        sock = self.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.closed = True
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()  # just closes the socket: no goodbye on the wire
            except Exception:  # pragma: no cover - closing must never raise
                pass


class MemcachedOracle(LeaseOracle):
    """Leases on ONE memcached server (see the module docstring and :mod:`crown_sync.oracles._lease`
    for the safety argument).

    server: ``"host:port"``, ``"host"`` (port 11211) or ``(host, port)``. Several servers are
        refused: a lease cannot be sharded across a hash ring.
    ttl, margin, renew_interval, connect_timeout, timeout, clock: see
        :class:`~crown_sync.oracles._lease.LeaseOracle` (ttl default 10 s).
    poll_interval: how often a follower reads the key (default 0.2 s: at most 5 requests/s).
    key_prefix: prepended to the election name to make the key (default ``"crown_sync:"``).
    tls: speak TLS (memcached ``-Z``), the server's certificate verified against ``tls_ca`` (a
        file) or the system's store; ``tls_cert``/``tls_key``: a client certificate, for a server
        that requires one (``ssl_verify_mode=2``): the only way memcached can keep other clients
        out (see docs/sharing.rst).
    """

    def __init__(
        self,
        server: Union[str, Tuple[str, int]] = "127.0.0.1:11211",
        ttl: float = 10.0,
        renew_interval: Optional[float] = None,
        poll_interval: float = 0.2,
        margin: Optional[float] = None,
        key_prefix: str = "crown_sync:",
        connect_timeout: Optional[float] = None,
        timeout: Optional[float] = None,
        clock: Callable[[], float] = time.time,
        tls: bool = False,
        tls_ca: Optional[str] = None,
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
    ):
        self.host, self.port = _parse_server(server)
        self._tls = client_context(tls, tls_ca, tls_cert, tls_key, "tls=true (memcached://host?tls=true)")
        #: A client certificate given: the server presumably requires one, which keeps others out.
        self.authenticated = bool(tls_cert)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.description = redact(f"memcached://{host}:{self.port}" + ("?tls=true" if tls else ""))
        super().__init__(ttl, renew_interval, poll_interval, margin, key_prefix, connect_timeout, timeout, clock)

    @classmethod
    def from_url(cls, url: str) -> "MemcachedOracle":
        """``memcached://host[:port][?ttl=..&renew_interval=..&poll_interval=..&margin=..
        &key_prefix=..&connect_timeout=..&timeout=..&tls=true&tls_ca=..&tls_cert=..&tls_key=..]``;
        exactly one server."""
        parts = urllib.parse.urlsplit(url)
        # Before one_server: a password with a "/" would otherwise read as a path.
        if parts.scheme.lower() == "memcached" and "@" in parts.netloc:
            raise ValueError("memcached:// URLs take no user or password (memcached's text protocol has no auth)")
        host, port, _, _ = one_server(url, "memcached", 11211,
                                      "a lease cannot be sharded across a hash ring; give each election one server")
        return cls((host, port), **parse_options(url, {**_OPTIONS, **_TLS_OPTIONS}))

    def check_key(self, text: str, option: str) -> None:
        # memcached's text protocol: printable ASCII, no spaces, at most 250 bytes per key.
        limit = 100 if option == "key_prefix" else _MAX_KEY
        if len(text) > limit or not all(33 <= ord(c) < 127 for c in text):
            what = "key_prefix" if option == "key_prefix" else f"the key of this {option} ({text!r})"
            raise ValueError(f"{what} must be at most {limit} printable ASCII characters without spaces")

    def new_store(self) -> _Connection:
        _say_once_if_open(self)
        return _Connection(self)

    def _new_client(self) -> Client:
        return Client(
            (self.host, self.port),
            connect_timeout=self.connect_timeout,
            timeout=self.timeout,
            no_delay=True,
            default_noreply=False,  # add() would otherwise say True whatever happened
            socket_module=_fork_safe_sockets,
            tls_context=self._tls,
        )


_said_open: set = set()


def _say_once_if_open(oracle: MemcachedOracle) -> None:
    """Warn once per server and process that any client of it can overwrite or delete the lease:
    memcached has no authentication pymemcache speaks (SASL needs the binary protocol) other than
    TLS client certificates."""
    if oracle.authenticated or oracle.description in _said_open:
        return
    _said_open.add(oracle.description)
    logger.warning(
        "%s: any client that reaches this memcached can overwrite or delete a crown's lease (no"
        " client certificate, tls_cert): keep it on a trusted network (docs: Sharing a server)",
        oracle.description,
    )

