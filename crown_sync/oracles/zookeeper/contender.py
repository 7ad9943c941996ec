"""A crown's place in an election's queue: claim, refresh, watch, abdicate, close (the safety
argument is in :mod:`crown_sync.oracles.zookeeper`)."""

import json
import time
import uuid
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoAuthError, NoNodeError
from kazoo.protocol.states import KazooState

from ...clock import monotonic as _monotonic
from ...oracle import Claim, Leader, OnChange
from .._base import ContenderBase, Phase
from ._common import (
    _ENDED,
    _NODE,
    CLAIM_CONNECT_WAIT,
    PUBLISH_DELAY,
    REFRESHES_PER_TIMEOUT,
    ZooKeeperUnavailable,
    _is_dismissed,
    _parse_record,
    _sequence,
    _unavailable,
    oracle_timeout,
)
from ._guard import _HoldBack, _OwnGuard
from ._notices import _Ignored
from ._refresh import _TermRefresh
from ._release import _Release
from ._watches import _OwnNodeWatch, _Successor

if TYPE_CHECKING:  # pragma: no cover
    from .oracle import ZooKeeperOracle


class ZooKeeperContender(ContenderBase):
    """One crown's node in the election's queue. A node hosts at most one term.

    Its phase (:class:`~crown_sync.oracles._base.Phase`): FOLLOWING (queued, or about to queue),
    PENDING (first in the queue but held back by an orphan guard: :class:`._guard._HoldBack`),
    LEADING (a term runs on our node), CLOSED, FORKED. Beside it: our guard node
    (:class:`._guard._OwnGuard`), the watches on our node and on our predecessor
    (:mod:`._watches`), and the deletion of spent nodes (:class:`._release._Release`).
    """

    def __init__(self, oracle: "ZooKeeperOracle", name: str, identity: str, metadata: Dict[str, Any],
                 on_change: OnChange):
        super().__init__(oracle, name, identity, metadata, on_change)
        self._session = oracle._session
        self._election = oracle.election_path(name)
        self._prefix = uuid.uuid4().hex + "-"
        self._node: Optional[str] = None  # our node's name (not path)
        self._node_session: Optional[int] = None
        self._node_czxid: Optional[int] = None  # the token of the term this node may host
        self._node_version = 0  # data version of our node as we last wrote or read it
        self._verified_epoch = -1  # connection epoch in which our node was checked and watched
        self._node_gone = False  # our own watch saw our node deleted
        self._dismissed: Optional[str] = None  # our node carries a dismissal request
        self._pending_create = False  # a create may have succeeded without our hearing of it
        self._won_on_node = False  # the current node has hosted a term: never another one
        self._publish = None  # (node, since) to write into our record at the next refresh
        self._term_epoch = -1
        self._deadline: Optional[float] = None  # the deadline we last gave the current term
        self._leader: Optional[Leader] = None
        self._ignored = _Ignored(self)  # nodes in the election that are not contenders'
        self._guard = _OwnGuard(self, self._prefix + "guard")
        self._holdback = _HoldBack(self)
        self._own_watch = _OwnNodeWatch(self)
        self._successor = _Successor(self)
        self._release = _Release(self)
        self._refresher = _TermRefresh(self)

    def __repr__(self) -> str:
        return f"<ZooKeeperContender {self.name} {self.identity} node={self._node}>"

    def _path(self, node: str) -> str:
        return f"{self._election}/{node}"

    def _record(self, since: Optional[float]) -> bytes:
        return json.dumps(
            {"identity": self.identity, "metadata": self.metadata, "since": since},
            separators=(",", ":"),
        ).encode("utf-8")

    def _stop_leading(self) -> bool:
        """Under our lock: a running term ends (LEADING becomes FOLLOWING). True if one ran."""
        if self.phase is Phase.LEADING:
            self._enter(Phase.FOLLOWING)
            return True
        return False

    def _connection_changed(self, state: str) -> None:
        with self._lock:
            if self.phase in _ENDED:
                return
            leading = self.phase is Phase.LEADING
            if state != KazooState.CONNECTED:
                self._stop_leading()
                self._successor.prefetch = None
                self._successor.fast = None
        if state == KazooState.SUSPENDED:
            if leading:
                self._notify(lost=True)  # the server may expire us while we can't hear it
        elif state == KazooState.LOST:
            self._notify(lost=leading)  # our node is gone with the session
        else:
            self._release.release_stale()
            self._notify()  # watches were dropped while disconnected: look again

    # -- Contender ---------------------------------------------------------------------------

    def claim(self) -> Claim:
        self._check_open()
        # A short wait: the engine retries with backoff, and its stop() waits for this call.
        client, epoch, session = self.oracle._connection(lambda: self.phase is Phase.CLOSED, CLAIM_CONNECT_WAIT)
        self._session.check_ensemble(client, epoch)
        with self._lock:
            if self.phase in (Phase.LEADING, Phase.PENDING):
                self._enter(Phase.FOLLOWING)
            self._holdback.epoch = None
        try:
            won = self._fast_win(epoch, session)  # no request: needs no slot
            if won is not None:
                return won
            with self._session.claim_slot(lambda: self.phase is Phase.CLOSED):
                return self._claim(client, epoch, session)
        except NoAuthError:
            raise PermissionError(f"not allowed to create a node in {self._election} (or its parents) with "
                                  "these credentials: another application's; use a path_prefix of your own") from None
        except KazooException as exc:
            raise _unavailable("claiming", exc) from exc
        except oracle_timeout(client) as exc:
            raise ZooKeeperUnavailable(f"no reply from ZooKeeper at {self.oracle.description} while claiming") from exc

    def _fast_win(self, epoch: int, session: int) -> Optional[Claim]:
        """The leader just before us left and nothing else changed: win without a round trip.

        The term's deadline starts from the last request this session had answered (the oracle
        keeps one going every T/4), so it is at most T/3 old here or we take the slow path."""
        successor = self._successor
        with self._lock:
            fast, successor.fast = successor.fast, None
            node = self._node
            usable = (
                fast == epoch and node is not None and not self._node_gone and self._dismissed != node
                and not self._won_on_node and self._verified_epoch == epoch
                and successor.next_in_line is not None and successor.next_in_line[0] == epoch
                and self._guard.held == session
            )
        if not usable:
            return None
        confirmed = self._session.confirmed_since(epoch)
        if confirmed is None or _monotonic() - confirmed > self.oracle.effective_timeout() / REFRESHES_PER_TIMEOUT:
            return None
        return self._win(node, confirmed, epoch, session)

    def _claim(self, client: KazooClient, epoch: int, session: int) -> Claim:
        timeout = self._session.op_timeout()
        for _attempt in range(5):
            with self._lock:
                node = self._node
                if node is not None and (self._node_session != session or self._node_gone):
                    node = self._node = None  # expired with an old session, or deleted
                spent = node is not None and (self._dismissed == node or self._won_on_node)
                verify = node is not None and self._verified_epoch != epoch
                prefetch, self._successor.prefetch = self._successor.prefetch, None
                self._successor.next_in_line = None
            if spent:
                # Dismissed, or its term is over (the engine could not delete it then): a node
                # hosts one term only, so leave the queue and join it again at its back.
                self._guard.drop(client)
                self._release.delete_own(client, node, timeout)
                continue
            if verify:
                node = self._verify(client, node, session, epoch, timeout)
                if node is not None and self._dismissed == node:
                    continue
            if node is None and not self._pending_create:
                node = self._create(client, session, epoch, timeout)
                prefetch = None  # asked before our node existed
            children, t0, parent = self._list(client, prefetch if node is not None else None, epoch, timeout)
            listed_at = _monotonic()  # after the server applied anything this listing shows
            self._session.confirm(t0, epoch)
            ignored = self._ignored.under(parent)
            queue = sorted((c for c in children if _NODE.match(c) and c not in ignored), key=_sequence)
            mine = [c for c in queue if c.startswith(self._prefix)]
            if node is None:  # a create whose reply we missed: adopt its node if it is ours
                node = self._adopt(client, mine, session, epoch, timeout)
                if node is None:
                    continue
            if node not in queue:
                with self._lock:
                    if self._node == node:
                        self._node = None
                continue
            for zombie in mine:
                if zombie != node:  # a duplicate from a retried create: not a real contender
                    client.delete_async(self._path(zombie))
            queue = [c for c in queue if c == node or not c.startswith(self._prefix)]
            if self._session.connected_now()[2] != epoch:
                raise ZooKeeperUnavailable("the ZooKeeper connection dropped during the claim")
            claim = self._first_or_queued(client, children, queue, node, listed_at, t0, epoch, session, timeout)
            if claim is not None:
                return claim
        raise ZooKeeperUnavailable(f"our node in {self._election} kept changing during the claim")

    def _first_or_queued(self, client: KazooClient, children: List[str], queue: List[str], node: str,
                         listed_at: float, t0: float, epoch: int, session: int, timeout: float) -> Optional[Claim]:
        """What the claim's listing means for our ``node``: a win, a hold-back or a place in the
        queue behind a leader; None to look again. A head that is not a contender's is skipped."""
        queue, leader = self._ignored.first_contender(client, queue, node)
        position = queue.index(node)
        if position == 0:
            held_back = self._holdback.check(client, children, listed_at, epoch, timeout)
            if held_back is not None:
                return held_back
            if not self._guard.ensure(client, session, children, timeout):
                return None
            return self._win(node, t0, epoch, session)  # None: dismissed or deleted meanwhile
        with self._lock:
            self._successor.predecessor = queue[position - 1]
            self._successor.predecessor_epoch = epoch
            if position == 1:
                self._successor.next_in_line = (epoch, queue[0])
        return Claim(won=False, leader=leader)

    def _verify(self, client: KazooClient, node: str, session: int, epoch: int, timeout: float) -> Optional[str]:
        """After a reconnect: is our node still there, still our session's, not dismissed (then
        marked so)? Returns it, or None if it is gone."""
        with self._lock:
            fired = self._own_watch.fired
        sent = _monotonic()
        try:
            data, stat = client.get_async(self._path(node), watch=self._own_watch.watcher_for(node, epoch)).get(timeout)
        except NoNodeError:
            stat = None
        with self._lock:
            if stat is None or stat.ephemeralOwner != session:
                self._node = None
                return None
            self._verified_epoch = epoch
            self._node_version = stat.version
        if _is_dismissed(_parse_record(data), stat):
            with self._lock:
                self._dismissed = node
        self._own_watch.arm(node, epoch, sent, stat, fired)
        return node

    def _list(self, client: KazooClient, prefetch, epoch: int, timeout: float) -> Tuple[List[str], float, int]:
        """The election's children, the start of the request that read them and the election
        node's czxid: a fresh prefetched answer (asked by a watch when woken) if there is one,
        else asked now."""
        if prefetch is not None and prefetch[0] == epoch and _monotonic() - prefetch[1] < 1.0:
            try:
                children, parent = prefetch[2].get(timeout)
                return children, prefetch[1], parent.czxid
            except Exception:
                pass  # ask afresh
        t0 = _monotonic()
        children, parent = client.get_children_async(self._election, include_data=True).get(timeout)
        return children, t0, parent.czxid

    def _create(self, client: KazooClient, session: int, epoch: int, timeout: float) -> str:
        with self._lock:
            self._pending_create = True
        path, stat = client.create_async(
            f"{self._election}/{self._prefix}",
            self._record(None),
            acl=self.oracle.acl,
            ephemeral=True,
            sequence=True,
            makepath=True,
            include_data=True,
        ).get(timeout)
        node = path.rsplit("/", 1)[1]
        self._take(node, stat, -1)
        if stat.ephemeralOwner != session:
            raise ZooKeeperUnavailable("the ZooKeeper session changed during the claim")
        with self._lock:
            self._guard.create_with_node(client, session)
        # Watch our own node from now on; pipelined with the listing that follows.
        self._own_watch.read(client, node, epoch)
        self.oracle._check_parents(client, self.name)
        with self._lock:
            self._verified_epoch = epoch
        return node

    def _take(self, node: str, stat, epoch: int) -> None:
        with self._lock:
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
            with self._lock:
                fired = self._own_watch.fired
            sent = _monotonic()
            try:
                watch = self._own_watch.watcher_for(candidate, epoch)
                _data, stat = client.get_async(self._path(candidate), watch=watch).get(timeout)
            except NoNodeError:
                continue
            if stat.ephemeralOwner == session:
                self._take(candidate, stat, epoch)
                self._own_watch.arm(candidate, epoch, sent, stat, fired)
                return candidate
        with self._lock:
            self._pending_create = False  # nothing of ours there: create afresh next time round
        return None

    def _win(self, node: str, t0: float, epoch: int, session: int) -> Optional[Claim]:
        oracle = self.oracle
        since = time.time()
        with self._lock:
            if self.phase in _ENDED:
                raise RuntimeError("the ZooKeeper contender is closed")
            # The caller checked the connection epoch before calling us, but SUSPENDED may have
            # come since: _connection_changed then saw no term running and sent no loss signal,
            # so winning now would start a term nobody ends. Checked under our lock, which
            # _connection_changed takes after the session bumped the epoch: either we see the new
            # epoch here, or it sees us LEADING below and signals the loss.
            _client, connected, now_epoch = self._session.connected_now()
            if not connected or now_epoch != epoch:
                raise ZooKeeperUnavailable("the ZooKeeper connection dropped during the claim")
            if self._node != node or self._node_gone or self._dismissed == node or self._won_on_node:
                return None
            if self._guard.held != session:
                return None  # dropped meanwhile: a term never starts without our guard
            token = self._node_czxid
            leader = Leader(self.identity, dict(self.metadata), token, since)
            self._enter(Phase.LEADING)
            self._won_on_node = True
            self._term_epoch = epoch
            self._leader = leader
            self._successor.next_in_line = None
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
        with self._lock:
            version = self._node_version

        def published(result) -> None:
            try:
                stat = result.get_nowait()
            except Exception:
                return  # a dismissal got there first (BadVersion), or connection trouble
            with self._lock:
                if self._node == node:
                    self._node_version = max(self._node_version, stat.version)

        client.set_async(self._path(node), self._record(since), version=version).rawlink(published)

    def refresh(self) -> Claim:
        self._check_open()
        return self._refresher.refresh()

    def watch(self, leader: Optional[Leader]) -> bool:
        self._check_open()
        client, connected, epoch = self._session.connected_now()
        successor = self._successor
        with self._lock:
            if self.phase is Phase.PENDING and self._holdback.epoch == epoch:
                return True  # first, held back: an orphan guard's watch or the timer wakes us
            predecessor = successor.predecessor
            stale = self._node is None or self._node_gone or successor.predecessor_epoch != epoch
            leads = successor.next_in_line == (epoch, predecessor)
        if predecessor is None or stale:
            return False  # claim again first
        if client is None or not connected:
            # Disconnected: the state listener calls on_change() on reconnect (or LOST), which
            # is exactly when looking again makes sense.
            return True
        watcher = successor.watcher_for(predecessor, epoch)
        if leads:
            successor.watch_guard(predecessor, epoch)
        sent = _monotonic()
        try:
            # A get, not an exists: one request still, and the data tells a planted ephemeral
            # node (not a leader record) from a contender's, as the claim does for the head.
            data, stat = client.get_async(self._path(predecessor), watch=watcher).get(self._session.op_timeout())
        except NoNodeError:
            data = stat = None  # gone already (no watch is left on a missing node): claim again
        except KazooException as exc:
            if self._session.connected_now()[2] != epoch:
                return True  # the connection dropped meanwhile: same as above
            raise _unavailable("watching", exc) from exc
        except oracle_timeout(client) as exc:
            raise ZooKeeperUnavailable(f"no reply from ZooKeeper at {self.oracle.description} while watching") from exc
        self._session.confirm(sent, epoch)
        if stat is not None and self._ignored.planted(predecessor, stat, _parse_record(data)):
            return False  # it may never leave: the claim looks past it to the real predecessor
        return stat is not None

    def abdicate(self) -> None:
        if not self.usable:  # closed (no node left), or inherited across fork (the parent's node)
            return
        with self._lock:
            self._stop_leading()
            node = self._node if self._won_on_node else None  # a follower keeps its place
        if node is None:
            return
        if self._release.delete(node):
            self._release.forget(node)  # delete() dropped the guard already
            return
        with self._lock:
            if self._node == node:
                self._release.stale = node  # deleted as soon as the same session reconnects
        client, connected, _epoch = self._session.connected_now()
        if client is not None and connected:
            self._release.release_stale()  # the connection came back while we tried

    def close(self) -> None:
        if not self.usable:  # closed already, or inherited across fork: the parent's node
            return
        with self._lock:
            if self.phase is Phase.CLOSED:
                return
            self._enter(Phase.CLOSED)
            node, self._node = self._node, None
            session = self._node_session
            stale = node is not None and node == self._release.stale  # abdicate() already tried in vain
            pending = self._pending_create
            self._successor.gen += 1
            self._successor.prefetch = None
            self._holdback.cancel()
        if node is None:
            client, connected, _epoch = self._session.connected_now()
            if connected:
                self._guard.drop(client)  # a guard may outlive a node deleted by someone else
        if node is not None and (stale or not self._release.delete(node)):
            self._release.later(node, session)
        if pending:
            self._release.sweep()
        self._session.unregister(self)
