"""The kazoo session an oracle's contenders share: connecting, connection epochs, the negotiated
timeout, the latest answered request (for the round-trip-free takeover), the session's one
confirmation for all its leaders' terms (the *proof*), the ensemble check, and stopping the client
within a bound. One per :class:`~crown_sync.oracles.zookeeper.ZooKeeperOracle`."""

import contextlib
import ssl
import threading
import weakref
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from kazoo.client import KazooClient
from kazoo.exceptions import ConnectionDropped
from kazoo.handlers.threading import SequentialThreadingHandler
from kazoo.protocol.states import Callback, KazooState
from kazoo.retry import KazooRetry
from kazoo.security import ACL

from ... import _forksafe
from ...clock import monotonic as _monotonic
from ._common import (
    CLAIMS_IN_FLIGHT,
    CLOSE_TIMEOUT,
    PROOFS_PER_TIMEOUT,
    ZooKeeperMisconfigured,
    ZooKeeperUnavailable,
    _ensemble_problem,
    _read_conf,
    logger,
)

if TYPE_CHECKING:  # pragma: no cover
    from .contender import ZooKeeperContender

# Clients abandoned by forked children stay referenced, so that their sockets (blinded by
# crown_sync._forksafe) are never closed behind our back: the numbers may be reused by then.
_ABANDONED: List[KazooClient] = []


class _SharedSession:
    """The oracle's one kazoo client and what it knows of its connection."""

    def __init__(self, hosts: str, session_timeout: float, connect_timeout: float, auth: Optional[str],
                 acl: Sequence[ACL], description: str, probe_path: str, tls: Optional[Dict[str, Any]] = None):
        self.hosts = hosts  # with the chroot, as kazoo takes it
        self.session_timeout = session_timeout
        self.connect_timeout = connect_timeout
        self._auth = auth
        self._acl = list(acl)
        self.description = description
        self._probe_path = probe_path  # what the heartbeat reads
        self.tls = dict(tls or {})  # kazoo's TLS arguments (use_ssl, ca, certfile, ...), or none
        self._connect_error: Optional[str] = None  # why the last connection attempt failed
        self._member: Optional[str] = None  # the name of the member we connected to, as given
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._slots = threading.Condition(self._lock)  # claim_slot's waiters
        self._claiming = 0  # claims in flight (claim_slot)
        self.client: Optional[KazooClient] = None
        self._connected = False
        self._epoch = 0  # bumped whenever the client leaves CONNECTED
        self._negotiated: Optional[float] = None
        self._contenders: "weakref.WeakSet[ZooKeeperContender]" = weakref.WeakSet()
        self._closed = False
        self._state = "not started"
        self._confirmed: Tuple[int, float] = (-1, 0.0)  # (epoch, start of last answered request)
        # (epoch, start) of the last probe answered after every watch event sent before its reply
        # had been handled: what the leaders' refreshes read (see _heartbeat)
        self._proof: Tuple[int, float] = (-1, 0.0)
        self._wanted = 0.0  # a refresh waits for a proof started no earlier than this
        self._demand_until = 0.0  # leaders refreshed lately: keep a proof at most T/6 old until then
        self._heartbeat_stop: Optional[threading.Event] = None
        self._heartbeat_kick: Optional[threading.Event] = None
        self._ensemble_check: Optional[Tuple[int, Optional[str]]] = None  # (epoch, problem)
        self._conf_unreadable_logged = False

    def effective_timeout(self) -> float:
        """The session timeout the deadlines use: the negotiated one when known, never more than
        requested."""
        negotiated = self._negotiated
        if negotiated is None:
            return self.session_timeout
        return min(self.session_timeout, negotiated)

    def op_timeout(self) -> float:
        # kazoo fails pending requests itself when the connection drops (after 2/3 T of
        # silence); this bound only guards against a wedged client.
        return self.effective_timeout()

    def _new_client_locked(self) -> KazooClient:
        retry = KazooRetry(max_tries=-1, delay=0.05, backoff=1.5, max_jitter=0.2, max_delay=1.0)
        client = KazooClient(
            hosts=self.hosts,
            handler=_ForkSafeHandler(),
            timeout=self.session_timeout,
            connection_retry=retry,
            auth_data=[("digest", self._auth)] if self._auth else None,
            default_acl=self._acl,
            **self.tls,
        )
        self._read_negotiated_timeout(client)
        client.add_listener(lambda state, _client=client: self._on_state(_client, state))
        client.start_async()
        self._state = "connecting"
        stop = self._heartbeat_stop = threading.Event()
        kick = self._heartbeat_kick = threading.Event()
        threading.Thread(
            target=self._heartbeat, args=(client, stop, kick), name="crown-sync-zookeeper-heartbeat", daemon=True
        ).start()
        return client

    def _read_negotiated_timeout(self, client: KazooClient) -> None:
        connection = getattr(client, "_connection", None)
        original = getattr(connection, "_connect", None)
        if original is None:  # pragma: no cover - a kazoo without this internal
            logger.warning("cannot read the negotiated session timeout; using the requested one")
            return

        # kazoo keeps the negotiated timeout to itself; its handshake returns the read timeout
        # it derived from it (2/3 of it, in ms). A lower negotiated timeout than requested
        # would make our deadlines unsafe, so we need it.
        def _connect(host, hostip, port, _original=original):
            try:
                result = _original(host, hostip, port)
            except Exception as exc:
                self._connect_error = _connect_failure(exc, bool(self.tls))
                raise
            self._connect_error, self._member = None, host
            try:
                self._negotiated = float(result[0]) * 1.5 / 1000.0
            except (TypeError, ValueError, IndexError):
                pass
            return result

        connection._connect = _connect

    def _heartbeat(self, client: KazooClient, stop: threading.Event, kick: threading.Event) -> None:
        """The session's one probe (an ``exists`` on the path prefix), sent when due (_probe_due):
        every T/6 while leaders refresh their terms (they read its proof instead of asking the
        server each), at once when a refresh waits for a newer one, and, while a contender of
        ours is next in line, whenever no request had an answer within the last T/4 (so that it
        can take over without a round trip: ZooKeeperContender._fast_win). Nothing more: every
        extra request postpones the expiry of a crashed leader's session, hence its failover."""
        while not stop.is_set():
            kick.clear()  # before looking: a kick that comes while we look is not lost
            due, epoch = self._probe_due(client)
            if due > 0:
                kick.wait(due)
                continue
            sent = _monotonic()
            try:
                client.exists_async(self._probe_path).get(self.op_timeout())
            except Exception:
                kick.wait(self.effective_timeout() / 8)  # connection trouble: kazoo's states tell the contenders
                continue
            self.confirm(sent, epoch)
            self._prove_after_watches(client, sent, epoch)

    def _probe_due(self, client: KazooClient) -> Tuple[float, int]:
        """(seconds until the next probe is due, 0 for now; the connection epoch)."""
        timeout = self.effective_timeout()
        with self._lock:
            if client is not self.client or not self._connected:
                return timeout / 8, -1
            now, epoch = _monotonic(), self._epoch
            proof = self._proof[1] if self._proof[0] == epoch else float("-inf")
            if proof < self._wanted:
                return 0.0, epoch
            due = timeout / 8  # look again then: a contender may be next in line by that time
            if now < self._demand_until:
                due = min(due, proof + timeout / PROOFS_PER_TIMEOUT - now)
            if due > 0 and any(c._successor.next_in_line is not None for c in self._contenders):
                confirmed = self._confirmed[1] if self._confirmed[0] == epoch else float("-inf")
                due = min(due, confirmed + timeout / 4 - now)
        return due, epoch

    def _prove_after_watches(self, client: KazooClient, sent: float, epoch: int) -> None:
        """The probe sent at ``sent`` was answered: publish it as the session's proof once every
        watch event kazoo read before that answer has been handled. kazoo reads the socket in
        the server's order and queues watch events to its one callback thread in that order; the
        answer itself went the other way (its completion queue), so we queue our publication
        behind those events. A contender whose own-node watch was armed before ``sent`` has thus
        learnt of its node's deletion or change (_OwnNodeWatch) before it can read this proof."""
        done = threading.Event()

        def publish() -> None:
            with self._cond:
                if epoch == self._epoch and self._connected and (self._proof[0] != epoch or sent > self._proof[1]):
                    self._proof = (epoch, sent)
                    self._cond.notify_all()
            done.set()

        try:
            client.handler.dispatch_callback(Callback("crown-sync-proof", publish, ()))
        except Exception:  # a stopped client
            return
        done.wait(self.op_timeout())  # one probe in flight at a time, its proof published first

    def term_proof(self, epoch: int, not_before: float, wait: float) -> float:
        """The start of the session's latest proof (see _prove_after_watches) in connection
        ``epoch``, if it started at ``not_before`` or later; else asks the heartbeat for a new one
        and waits for it up to ``wait`` seconds. Raises ZooKeeperUnavailable when the connection
        dropped or no proof came in time."""
        give_up = _monotonic() + wait
        with self._cond:
            # Leaders refresh at least every T/3: while they do, the heartbeat keeps a proof fresh.
            self._demand_until = max(self._demand_until, _monotonic() + self.effective_timeout())
            while True:
                if self._epoch != epoch or not self._connected:
                    raise ZooKeeperUnavailable("the ZooKeeper connection dropped while refreshing")
                if self._proof[0] == epoch and self._proof[1] >= not_before:
                    return self._proof[1]
                if self._wanted < not_before:
                    self._wanted = not_before
                    if self._heartbeat_kick is not None:
                        self._heartbeat_kick.set()
                remaining = give_up - _monotonic()
                if remaining <= 0:
                    raise ZooKeeperUnavailable(f"no reply from ZooKeeper at {self.description} while refreshing")
                self._cond.wait(remaining)

    def confirm(self, sent: float, epoch: int) -> None:
        """A request sent at ``sent`` (monotonic) in connection ``epoch`` was answered: the server
        had our session then, so it cannot expire it before ``sent + T``."""
        with self._lock:
            if epoch == self._epoch and (self._confirmed[0] != epoch or sent > self._confirmed[1]):
                self._confirmed = (epoch, sent)

    def confirmed_since(self, epoch: int) -> Optional[float]:
        with self._lock:
            if self._confirmed[0] == epoch == self._epoch and self._connected:
                return self._confirmed[1]
            return None

    def _on_state(self, client: KazooClient, state: str) -> None:
        """kazoo's state listener (its connection thread: must not block)."""
        with self._lock:
            if client is not self.client:
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

    def connection(self, cancelled=lambda: False, wait: Optional[float] = None) -> Tuple[KazooClient, int, int]:
        """(client, epoch, session id) once connected; waits up to ``wait`` (default:
        connect_timeout)."""
        wait = self.connect_timeout if wait is None else min(wait, self.connect_timeout)
        deadline = _monotonic() + wait
        with self._cond:
            if self._closed:
                raise RuntimeError("the ZooKeeper oracle is closed")
            if self.client is None:
                self.client = self._new_client_locked()
            client = self.client
            while True:
                if cancelled():
                    raise RuntimeError("the ZooKeeper contender is closed")
                if self._closed or client is not self.client:
                    raise RuntimeError("the ZooKeeper oracle is closed")
                client_id = client.client_id if self._connected else None
                if client_id and client_id[0]:
                    return client, self._epoch, client_id[0]
                remaining = deadline - _monotonic()
                if remaining <= 0:
                    why = f"; last attempt: {self._connect_error}" if self._connect_error else ""
                    raise ZooKeeperUnavailable(
                        f"not connected to ZooKeeper at {self.description} after "
                        f"{wait:g}s (state: {self._state}{why})"
                    )
                self._cond.wait(min(remaining, 0.5))

    def connected_now(self) -> Tuple[Optional[KazooClient], bool, int]:
        with self._lock:
            return self.client, self._connected, self._epoch

    def check_ensemble(self, client: KazooClient, epoch: int) -> None:
        """Once per connection: refuse (ZooKeeperMisconfigured, which the engine reports and
        retries like an unreachable server) when the member's ``conf`` shows an ensemble that
        voids our deadlines (see _ensemble_problem). An unreadable ``conf`` is logged once."""
        with self._lock:
            checked = self._ensemble_check
        if checked is None or checked[0] != epoch:
            conf = _read_conf(client, self.tls, self._member)
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

    @contextlib.contextmanager
    def claim_slot(self, cancelled):
        """Run a claim as one of at most CLAIMS_IN_FLIGHT of this session at a time. The server
        answers a session's requests in order, a read after the writes sent before it: a burst of
        claims (1,000 crowns starting at once, each a few writes) would queue every leader's
        refresh behind seconds of writes, and their terms would lapse and claim again. Waits
        while the slots are taken, up to T (then ZooKeeperUnavailable: the engine retries, and
        its stop() waits no longer for this call) or until ``cancelled()`` (the contender closed)."""
        wait = self.effective_timeout()
        give_up = _monotonic() + wait
        with self._slots:
            while self._claiming >= CLAIMS_IN_FLIGHT:
                if cancelled():
                    raise RuntimeError("the ZooKeeper contender is closed")
                if self._closed:
                    raise RuntimeError("the ZooKeeper oracle is closed")
                remaining = give_up - _monotonic()
                if remaining <= 0:
                    raise ZooKeeperUnavailable(
                        f"{CLAIMS_IN_FLIGHT} claims through ZooKeeper at {self.description} were already "
                        f"under way for {wait:g}s (the session runs no more at a time): the server is slow")
                self._slots.wait(remaining)  # a claim's end, or unregister() when a contender closes
            self._claiming += 1
        try:
            yield
        finally:
            with self._slots:
                self._claiming -= 1
                self._slots.notify()

    def register(self, contender: "ZooKeeperContender") -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the ZooKeeper oracle is closed")
            self._contenders.add(contender)

    def unregister(self, contender: "ZooKeeperContender") -> None:
        with self._lock:
            self._contenders.discard(contender)
            self._cond.notify_all()  # wake a claim of this contender waiting for a connection
            self._slots.notify_all()  # or for a claim slot
            stop = self._closed and not self._contenders
            client = self.client if stop else None
            if stop:
                self._drop_client_locked()
        if client is not None:
            _stop_client(client)

    def close(self) -> None:
        """The client stops now if no contender uses it, else with the last one."""
        with self._lock:
            self._closed = True
            self._cond.notify_all()
            client = self.client if not self._contenders else None
            if client is not None:
                self._drop_client_locked()
        if client is not None:
            _stop_client(client)

    def _drop_client_locked(self) -> None:
        self.client = None
        self._connected = False
        if self._heartbeat_stop is not None:
            self._heartbeat_stop.set()
            self._heartbeat_stop = None
        if self._heartbeat_kick is not None:
            self._heartbeat_kick.set()  # wakes it to see the stop
            self._heartbeat_kick = None

    def forget_after_fork(self) -> None:
        """In a forked child: drop (never use or close) the parent's client; its sockets were
        blinded by crown_sync._forksafe, its contenders marked themselves forked."""
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._slots = threading.Condition(self._lock)
        self._claiming = 0  # the parent's claims stayed in the parent
        client, self.client = self.client, None
        if client is not None:
            _ABANDONED.append(client)
        self._contenders = weakref.WeakSet()
        self._connected = False
        self._epoch += 1
        self._negotiated = None
        self._ensemble_check = None
        self._state = "not started"
        self._heartbeat_stop = self._heartbeat_kick = None  # its thread stayed in the parent


def _connect_failure(exc: BaseException, tls: bool) -> str:
    """What a failed connection attempt tells a person: a TLS handshake refused (certificate not
    trusted, not TLS at all), or a plain client whose first request the server dropped."""
    cause = exc if isinstance(exc, ssl.SSLError) else (exc.__cause__ or exc.__context__)
    if isinstance(cause, ssl.SSLError):  # kazoo wraps it in ConnectionDropped
        return f"TLS handshake failed: {type(cause).__name__}: {cause}"
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if not tls and isinstance(exc, ConnectionDropped):
        text += " (the server closed the connection at once: is this its TLS port? then use tls=true)"
    return text


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
    """kazoo's threading handler, but its sockets are opened under the fork guard and recorded
    (crown_sync._forksafe), so a forked child gets ``/dev/null`` in their place: the connection to
    the server (nothing the child does can send a goodbye on the parent's session) and the
    wake-up socket pair of kazoo's connection thread (no wake-up byte reaches the parent's)."""

    def create_connection(self, *args, **kwargs):
        with _forksafe.opening() as keep:
            sock = super().create_connection(*args, **kwargs)
            keep(sock)
        return sock

    def create_socket_pair(self):
        with _forksafe.opening() as keep:
            pair = super().create_socket_pair()
            for sock in pair:
                keep(sock)
        return pair
