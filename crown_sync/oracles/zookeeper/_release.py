"""Giving our node back: deleting it (with our guard, the guard first) when its term is over or
the contender closes, bounded in time, and later, from kazoo's thread, when it could not be
deleted while we were cut off."""

from typing import TYPE_CHECKING, Optional

from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from .._base import Phase
from ._common import _ENDED, CLOSE_TIMEOUT, _release_node, logger

if TYPE_CHECKING:  # pragma: no cover
    from .contender import ZooKeeperContender


class _Release:
    """Deletes a contender's spent nodes. State guarded by the contender's lock."""

    def __init__(self, contender: "ZooKeeperContender"):
        self._c = contender
        self.releasing: Optional[str] = None  # the node we are deleting ourselves
        self.stale: Optional[str] = None  # a spent node abdicate() could not delete (disconnected)

    def delete(self, node: str) -> bool:
        """Delete our node if we can do it now (bounded). True if it is gone."""
        c = self._c
        client, connected, _epoch = c._session.connected_now()
        if client is None or not connected:
            # Not now (no waiting on a reconnect): abdicate() leaves it to release_stale,
            # close() to an asynchronous request; failing those, it goes with our session.
            return False
        with c._lock:
            self.releasing = node
        path = c._path(node)
        timeout = min(CLOSE_TIMEOUT, c._session.op_timeout())
        try:
            request = c._guard.drop(client, path) or client.delete_async(path)
            outcome = request.get(timeout)
            if isinstance(outcome, list) and isinstance(outcome[0], NoNodeError):
                client.delete_async(path).get(timeout)  # our guard was gone already: the node alone
            elif isinstance(outcome, list) and isinstance(outcome[1], NoNodeError):
                # The node was deleted by someone else (a revocation): the guard alone, which
                # tells the waiting successor that our child has stopped.
                client.delete_async(c._path(c._guard.name)).get(timeout)
            elif isinstance(outcome, list) and any(isinstance(r, Exception) for r in outcome):
                raise next(r for r in outcome if isinstance(r, Exception))
        except NoNodeError:
            return True
        except Exception as exc:  # bounded best effort: the session's end removes it anyway
            logger.warning("could not delete %s: %s", c._path(node), type(exc).__name__)
            return False
        return True

    def delete_own(self, client: KazooClient, node: str, timeout: float) -> None:
        """A claim's deletion of our spent or dismissed node, before it queues again."""
        c = self._c
        with c._lock:
            self.releasing = node  # our own watch must not report this as a loss
        try:
            client.delete_async(c._path(node)).get(timeout)
        except NoNodeError:
            pass
        with c._lock:
            if c._node == node:
                c._node = None
                c._won_on_node = False

    def later(self, node: str, session: Optional[int]) -> None:
        """close() could not delete ``node`` now (cut off, or no answer in time): ask again without
        waiting, so that the node does not hold the queue for as long as a shared session lives
        (kazoo sends queued requests once it reconnects; the node goes with the session anyway)."""
        c = self._c
        client = c._session.connected_now()[0]
        if client is not None and session is not None:
            drop = lambda *_args: c._guard.drop(client)  # noqa: E731
            _release_node(client, c._path(node), session, drop, drop)

    def release_stale(self) -> None:
        """The same session is back: delete the node of a term that ended while we were cut off.

        abdicate() could not delete it then, and until it goes the next in line waits: for our
        next claim, which the engine may hold back with its retry backoff, or for our session to
        expire. Only a node abdicate() gave up counts (its term's child has stopped), and it is
        deleted only if it is still our session's (CURATOR-696) and unchanged since we looked.
        Runs from kazoo's connection thread: asynchronous requests only."""
        c = self._c
        with c._lock:
            node = self.stale
            if node is None or c.phase in _ENDED:
                return
            if node != c._node or not c._won_on_node or c.phase is Phase.LEADING:
                self.stale = None  # already dealt with (a claim deleted it, or it expired)
                return
            session = c._node_session
        client, connected, _epoch = c._session.connected_now()
        current = client.client_id if client is not None and connected else None
        if current and current[0] == session:  # else it went with the old session
            _release_node(client, c._path(node), session, lambda: self.forget(node, client), self._releasing)

    def _releasing(self, path: str) -> None:
        c = self._c
        with c._lock:
            self.releasing = path.rsplit("/", 1)[1]  # our own watch must not report this as a loss
        c._guard.drop(c._session.connected_now()[0])  # before the node: see _fast_win

    def forget(self, node: str, client: Optional[KazooClient] = None) -> None:
        """Our spent ``node`` is gone: the next claim queues with a fresh one. With ``client``,
        its guard goes too (its term's child stopped before the node was given up)."""
        c = self._c
        with c._lock:
            if self.stale == node:
                self.stale = None
            current = c._node == node
            if current:
                c._node = None
                c._won_on_node = False
        if current:
            c._guard.drop(client)

    def sweep(self) -> None:
        """Delete any node of ours a create left behind without our hearing of it (it would
        otherwise hold a place in the queue for as long as the shared session lives)."""
        c = self._c
        client, connected, _epoch = c._session.connected_now()
        if client is None or not connected:
            return
        try:
            children = client.get_children_async(c._election).get(CLOSE_TIMEOUT)
            for child in children:
                if child.startswith(c._prefix):
                    client.delete_async(c._path(child)).get(CLOSE_TIMEOUT)
        except Exception as exc:
            logger.warning("could not clean up %s: %s", c._election, type(exc).__name__)
