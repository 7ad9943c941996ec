"""A leader's refresh: its term's new deadline, from the session's one proof when it can.

Every leader of a session used to confirm its node with an ``exists`` of its own every T/3. Now
the session sends one probe (:meth:`._session._SharedSession._heartbeat`) and publishes its
start, once every watch event that came before its answer has been handled, as the session's
*proof*. A leader whose own-node watch was armed before that start (:class:`._watches._OwnNodeWatch`)
and has not fired since knows its node was still there, still its session's, when the server
answered the probe: a deletion or a change of the node would have come first, as a watch event.
So its deadline counts from the proof's start, as it counted from its own ``exists``'s start.
A leader whose watch is being re-armed (its node just changed: the ``since`` its term's first
refresh publishes, a dismissal) asks on its own, as before.
"""

from typing import TYPE_CHECKING, Optional, Tuple

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException

from ...clock import monotonic as _monotonic
from ...oracle import Claim
from .._base import Phase
from ._common import REFRESHES_PER_TIMEOUT, ZooKeeperUnavailable, _unavailable, oracle_timeout

if TYPE_CHECKING:  # pragma: no cover
    from .contender import ZooKeeperContender


class _TermRefresh:
    """The refresh of a contender's running term (its refresh() calls it)."""

    def __init__(self, contender: "ZooKeeperContender"):
        self._c = contender

    def refresh(self) -> Claim:
        c = self._c
        oracle = c.oracle
        client, connected, epoch = c._session.connected_now()
        with c._lock:
            node = c._node
            ok = (c.phase is Phase.LEADING and node is not None and not c._node_gone
                  and c._dismissed != node and c._term_epoch == epoch)
            session = c._node_session
            leader = c._leader
            deadline = c._deadline
            if not ok or not connected or client is None:
                c._stop_leading()
            publish, c._publish = c._publish, None
        if not ok or not connected or client is None or node is None:
            return Claim(won=False)
        if publish is not None and publish[0] == node:
            c._publish_record(client, *publish)  # pipelined with the confirmation below
        now = _monotonic()
        # A reply after the term's deadline is of no use (the term is over by then), so wait no
        # longer: against a frozen server this bounds how long a stop() waits for this call.
        op_timeout = c._session.op_timeout()
        wait = op_timeout if deadline is None else min(op_timeout, max(0.01, deadline - now))
        # Our write of since re-arms our watch: this refresh asks on its own.
        t0 = None if publish is not None else self._shared(node, epoch, now, wait)
        gone = False
        if t0 is None:
            t0, gone = self._own(client, node, session, wait)
        with c._lock:
            if c._session.connected_now()[2] != c._term_epoch or c.phase is not Phase.LEADING:
                c._stop_leading()
                return Claim(won=False)
            if gone or c._node_gone or c._dismissed == node:
                c._stop_leading()
                c._node_gone = c._node_gone or gone
                return Claim(won=False)
            timeout_now = oracle.effective_timeout()
            c._deadline = t0 + oracle.lease_for(timeout_now)
        c._session.confirm(t0, epoch)
        return Claim(
            won=True,
            leader=leader,
            token=leader.token,
            deadline=t0 + oracle.lease_for(timeout_now),
            refresh_in=timeout_now / REFRESHES_PER_TIMEOUT,
        )

    def _shared(self, node: str, epoch: int, now: float, wait: float) -> Optional[float]:
        """The start of a proof of the session that counts for our node (see the module
        docstring), at most T/3 old; None if our watch is not armed (then we ask on our own)."""
        c = self._c
        with c._lock:
            armed = c._own_watch.armed
        if armed is None or armed[0] != node or armed[1] != epoch:
            return None
        not_before = max(armed[2], now - c.oracle.effective_timeout() / REFRESHES_PER_TIMEOUT)
        t0 = c._session.term_proof(epoch, not_before, wait)
        with c._lock:
            # Published after every watch event that came before its answer was handled: had our
            # node changed or gone before the server answered it, armed would show it now.
            if c._own_watch.armed != armed:
                return None
        return t0

    def _own(self, client: KazooClient, node: str, session: Optional[int], wait: float) -> Tuple[float, bool]:
        """Confirm our node with an ``exists`` of our own: (the start of the request, whether
        the node is gone or no longer our session's)."""
        c = self._c
        t0 = _monotonic()
        try:
            stat = client.exists_async(c._path(node)).get(wait)
        except KazooException as exc:
            raise _unavailable("refreshing", exc) from exc
        except oracle_timeout(client) as exc:
            raise ZooKeeperUnavailable(
                f"no reply from ZooKeeper at {c.oracle.description} while refreshing") from exc
        return t0, stat is None or stat.ephemeralOwner != session
