"""Guard nodes (see "Revocation" in :mod:`crown_sync.oracles.zookeeper`): our own guard, and the
wait a contender first in the queue makes while another contender's guard is an orphan."""

import json
import threading
from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple

from kazoo.client import KazooClient
from kazoo.exceptions import NodeExistsError, NoNodeError
from kazoo.protocol.states import EventType

from ...clock import monotonic as _monotonic
from ...oracle import Claim, Leader
from .._base import Phase
from ._common import _GUARD, _NODE, LEASE_FRACTION, _parse_record, _session_timeout_of, logger

if TYPE_CHECKING:  # pragma: no cover
    from .contender import ZooKeeperContender


class _OwnGuard:
    """Our guard node, ``<uuid>-guard``, next to our queue node: created right after it, and
    deleted only when no child of ours runs. State guarded by the contender's lock."""

    def __init__(self, contender: "ZooKeeperContender", name: str):
        self._c = contender
        self.name = name
        self.held: Optional[int] = None  # the session that owns our guard, when it exists
        self.gen = 0  # bumped whenever we delete our guard
        self.pending = None  # (session, gen, AsyncResult) of a guard create sent with our node's

    def record(self) -> bytes:
        # What a successor needs to wait out a term of ours that it cannot prove ended: the
        # longest lease we may give a term (the requested timeout bounds the negotiated one).
        return json.dumps(
            {"identity": self._c.identity, "session_timeout": self._c.oracle.session_timeout},
            separators=(",", ":"),
        ).encode("utf-8")

    def drop(self, client: Optional[KazooClient], node_path: Optional[str] = None):
        """Delete our guard: no child of ours runs any more. With ``node_path``, that node too, in
        one transaction, the guard first: a watcher sees the two deletions in that order (a
        release: _fast_win), for one write. Sent under our lock, so that a claim's _win either
        sees the guard dropped or we see it leading (then the guard stays and only the node
        goes). Returns the request's AsyncResult (a list of results for a transaction), or None."""
        c = self._c
        if client is None:
            return None
        with c._lock:
            if c.phase is Phase.FORKED:
                return None
            keep = c.phase is Phase.LEADING
            if not keep:
                self.held = None
                self.gen += 1
                self.pending = None
            try:
                if keep:
                    return client.delete_async(node_path) if node_path is not None else None
                if node_path is None:
                    return client.delete_async(c._path(self.name))  # NoNode is fine
                transaction = client.transaction()
                transaction.delete(c._path(self.name))
                transaction.delete(node_path)
                return transaction.commit_async()
            except Exception as exc:  # a closed client: the guard went with the session
                logger.debug("could not delete our guard in %s: %s", c._election, type(exc).__name__)
                return None

    def create_with_node(self, client: KazooClient, session: int) -> None:
        """Right after our queue node is created (under the contender's lock): send our guard's
        create unless this session holds it already. It comes after our node, so that a guard
        without its node means the node was deleted under us; pipelined with the reads that
        follow, and a win waits for it (ensure)."""
        if self.held == session:
            return
        c = self._c
        request = client.create_async(c._path(self.name), self.record(), acl=c.oracle.acl, ephemeral=True)
        self.pending = (session, self.gen, request)
        request.rawlink(lambda result, gen=self.gen: self._created(result, session, gen))

    def _created(self, result, session: int, gen: int) -> None:
        """kazoo's thread: the guard create sent with our node came back."""
        try:
            result.get_nowait()
        except Exception:
            return  # NodeExists or trouble: ensure() finds out before any win
        with self._c._lock:
            if self.gen == gen:
                self.held = session

    def ensure(self, client: KazooClient, session: int, listed: Sequence[str], timeout: float) -> bool:
        """Make sure our guard exists, owned by ``session``, before a term starts. ``listed``: the
        election's children as just read. False if a concurrent drop made the answer stale."""
        c = self._c
        with c._lock:
            pending, self.pending = self.pending, None
        if pending is not None and pending[0] == session:
            try:
                pending[2].get(timeout)
                with c._lock:
                    if self.gen == pending[1]:
                        self.held = session
            except NodeExistsError:
                pass  # ours from before (checked below)
        with c._lock:
            if self.name in listed and self.held == session:
                return True
            gen = self.gen
        path = c._path(self.name)
        owned = False
        if self.name not in listed:
            try:
                client.create_async(path, self.record(), acl=c.oracle.acl, ephemeral=True).get(timeout)
                owned = True
            except NodeExistsError:
                pass
        if not owned:
            stat = client.exists_async(path).get(timeout)
            owned = stat is not None and stat.ephemeralOwner == session
        with c._lock:
            if owned and self.gen == gen:
                self.held = session
                return True
        return False


class _HoldBack:
    """First in the queue, but another contender's guard is an orphan (its queue node was deleted
    by someone else, maybe under its running child): the contender holds back (phase PENDING)
    until that guard goes or that contender's longest lease has passed."""

    def __init__(self, contender: "ZooKeeperContender"):
        self._c = contender
        self._holds: Dict[Tuple[str, int], float] = {}  # (orphan guard, czxid) -> start no sooner
        self.epoch: Optional[int] = None  # epoch in which a claim found us first but held back
        self._timer: Optional[threading.Timer] = None
        self._watcher = self._on_event  # one object: kazoo keeps watchers in a set

    def check(self, client: KazooClient, children: Sequence[str], listed_at: float, epoch: int,
              timeout: float) -> Optional[Claim]:
        """We are first in the queue: may we start? Not while the guard of a contender whose queue
        node is gone (an *orphan* guard) still exists, unless that contender's longest lease,
        counted from ``listed_at`` (the end of the listing that showed its node gone), has passed.
        None: start. Else a lost claim; a watch on each orphan and a timer wake the engine."""
        c = self._c
        owners = {child[:32] for child in children if _NODE.match(child)}
        orphans = [g for g in children if _GUARD.match(g) and g[:32] not in owners and g != c._guard.name]
        holds: Dict[Tuple[str, int], float] = {}
        leader = None
        requests = [(g, client.get_async(c._path(g), watch=self._watcher)) for g in orphans]
        for guard, request in requests:
            try:
                data, stat = request.get(timeout)
            except NoNodeError:
                continue  # gone since: released after its child stopped, or its session expired
            if stat.ephemeralOwner == 0:  # planted: a contender's guard goes with its session
                c.oracle._foreign(c.name, guard, "a persistent guard (a contender's is ephemeral)")
                continue
            record = _parse_record(data)
            # Its terms last lease_for(T') = 0.75 T' - 50 ms after a confirmation that started before
            # the deletion; we wait 0.75 T', those 50 ms being for its child's kill to land.
            lease = LEASE_FRACTION * _session_timeout_of(record, c.oracle.session_timeout)
            key = (guard, stat.czxid)
            holds[key] = self._holds.get(key, listed_at + lease)  # from the FIRST listing showing it
            leader = leader or Leader(str(record.get("identity", "")), {}, None, None)
        now = _monotonic()
        until = max(holds.values(), default=now)
        with c._lock:
            self._holds = holds
            self.epoch = epoch if until > now else None
            if until > now and c.phase is Phase.FOLLOWING:
                c._enter(Phase.PENDING)
        if until <= now:
            return None
        logger.info(
            "%s: the node of %s's last leader was deleted while its guard remains: its child may "
            "still run, so %s waits up to %.3gs for it to stop", c._election, c.name,
            c.identity, until - now,
        )
        self._arm_timer(until - now)
        return Claim(won=False, leader=leader)

    def _on_event(self, event) -> None:
        if event.type != EventType.NONE:
            self._c._notify()  # an orphan guard went (or changed): look again

    def _arm_timer(self, delay: float) -> None:
        c = self._c
        timer = threading.Timer(delay + 0.005, c._notify)
        timer.daemon = True
        with c._lock:
            old, self._timer = self._timer, timer
            closed = c.phase is Phase.CLOSED
        if old is not None:
            old.cancel()
        if not closed:
            timer.start()

    def cancel(self) -> None:
        """Under the contender's lock, at close: no more wake-ups."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
