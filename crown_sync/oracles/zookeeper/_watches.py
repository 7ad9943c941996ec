"""A contender's watches (they run in kazoo's threads: they never block): on its own node, and
the follower's watch on the node just before its own."""

from typing import TYPE_CHECKING, Optional, Tuple

from kazoo.exceptions import NoNodeError
from kazoo.protocol.states import EventType, WatchedEvent

from ...clock import monotonic as _monotonic
from ._common import _ENDED, _NODE, _guard_of, _is_dismissed, _parse_record, _sequence, logger

if TYPE_CHECKING:  # pragma: no cover
    from .contender import ZooKeeperContender


class _OwnNodeWatch:
    """The data watch on our own node: its deletion (a session end, a hand) ends our term, and so
    does a dismissal request written into it.

    ``armed`` (under the contender's lock): (node, epoch, sent) when a read that set this watch,
    sent at ``sent`` in connection ``epoch``, found the node ours, and the watch has not fired
    since. The server answers a connection's requests in order and sends a watch's event before
    the answer to any later request, so any request of ours sent after ``sent`` and answered in
    the same epoch proves the node was still ours when the server handled it, unless that event
    came first (then ``armed`` is None, or newer): what lets a leader's refresh use the session's
    one proof instead of an ``exists`` of its own (_refresh)."""

    def __init__(self, contender: "ZooKeeperContender"):
        self._c = contender
        self._watcher = None  # (node, epoch, function)
        self.armed: Optional[Tuple[str, int, float]] = None
        self.fired = 0  # events seen: an answer to a read sent before the last one arms nothing

    def arm(self, node: str, epoch: int, sent: float, stat, fired: int) -> None:
        """A read of ``node`` with this watch, sent at ``sent`` in ``epoch`` when ``fired``
        events had come, found ``stat``."""
        c = self._c
        with c._lock:
            if (node == c._node and stat.ephemeralOwner == c._node_session and not c._node_gone
                    and fired == self.fired):
                self.armed = (node, epoch, sent)

    def read(self, client, node: str, epoch: int):
        """Read our node and (re)arm this watch; ``armed`` follows the answer."""
        with self._c._lock:
            fired = self.fired
        sent = _monotonic()
        result = client.get_async(self._c._path(node), watch=self.watcher_for(node, epoch))
        result.rawlink(lambda answer: self._read(node, answer, epoch, sent, fired))
        return result

    def watcher_for(self, node: str, epoch: int):
        """One function per node and connection epoch: kazoo keeps watchers in a set, so
        re-arming with it does not pile them up."""
        c = self._c
        with c._lock:
            cached = self._watcher
            if cached is not None and cached[0] == node and cached[1] == epoch:
                return cached[2]
        path = c._path(node)

        def watcher(event) -> None:
            if event.type == EventType.NONE:
                return  # connection state: the listener deals with it
            with c._lock:
                self.armed = None  # fired: no proof counts for our node until it is read again
                self.fired += 1
                fired = self.fired
            if event.type == EventType.DELETED:
                self._deleted(node)
                return
            client, connected, now_epoch = c._session.connected_now()
            if client is not None and connected:  # read what changed, and watch on
                sent = _monotonic()
                client.get_async(path, watch=watcher).rawlink(
                    lambda result: self._read(node, result, now_epoch, sent, fired))

        with c._lock:
            self._watcher = (node, epoch, watcher)
        return watcher

    def _read(self, node: str, result, epoch: int, sent: float, fired: int) -> None:
        try:
            data, stat = result.get_nowait()
        except NoNodeError:
            self._deleted(node)
            return
        except Exception:
            return  # connection trouble: the state listener deals with it
        self._changed(node, data, stat)
        self.arm(node, epoch, sent, stat, fired)  # after _changed: a dismissal is marked first

    def _deleted(self, node: str) -> None:
        c = self._c
        with c._lock:
            if node != c._node or node == c._release.releasing or c.phase in _ENDED:
                return
            c._node_gone = True
            leading = c._stop_leading()
            won = c._won_on_node
        logger.info("node %s of %s was deleted", node, c.name)
        if not won:
            # No term on it: nothing of ours runs, so a successor need not wait for our guard.
            # After a term, abdicate() drops it once the child has stopped.
            c._guard.drop(c._session.connected_now()[0])
        c._notify(lost=leading)

    def _changed(self, node: str, data: bytes, stat) -> None:
        c = self._c
        dismissed = _is_dismissed(_parse_record(data), stat)
        with c._lock:
            if node != c._node or c.phase in _ENDED:
                return
            c._node_version = max(c._node_version, stat.version)
            if not dismissed or c._dismissed == node:
                return
            c._dismissed = node
            leading = c._stop_leading()
        logger.info("the leader of %s (node %s) was dismissed", c.name, node)
        c._notify(lost=leading)


class _Successor:
    """A follower's watch on the node just before its own, and what it learns from it: whether
    that node leads (we are next in line), whether its guard went first (then its exit lets us take
    over without a round trip), or a prefetched listing after a wake-up."""

    def __init__(self, contender: "ZooKeeperContender"):
        self._c = contender
        self.predecessor: Optional[str] = None
        self.predecessor_epoch = -1
        self.next_in_line: Optional[Tuple[int, str]] = None  # (epoch, predecessor) if it leads
        self.fast: Optional[int] = None  # epoch in which the leader just before us left
        self.gen = 0  # bumped by each new watch: an older one's events are ignored
        self._watcher = None  # (predecessor, epoch, function)
        self.prefetch = None  # (epoch, sent at, AsyncResult of get_children) after a wake-up
        self._guard_gone: Optional[Tuple[int, str]] = None  # (epoch, predecessor) guard deleted
        self._guard_watcher = None  # (predecessor, epoch, function)

    def watcher_for(self, predecessor: str, epoch: int):
        """The watch on the node just before ours; a newer one replaces it."""
        c = self._c
        with c._lock:
            cached = self._watcher
            if cached is not None and cached[0] == predecessor and cached[1] == epoch:
                return cached[2]
            self.gen += 1
            gen = self.gen

        def watcher(event) -> None:
            self._on_event(event, predecessor, epoch, gen, watcher)

        with c._lock:
            self._watcher = (predecessor, epoch, watcher)
        return watcher

    def _on_event(self, event, predecessor: str, epoch: int, gen: int, watcher) -> None:
        c = self._c
        if event.type == EventType.NONE:
            return
        with c._lock:
            if gen != self.gen or c.phase in _ENDED:
                return
            if event.type == EventType.DELETED:
                self._watcher = None
                # It led (it was first when we last looked): now we are first. Nodes are
                # only ever added behind the last one, so no look is needed, provided its
                # guard went first (a release, or its session's end): else someone else
                # deleted its node, maybe under a running child, and the claim must look.
                fast = self.next_in_line == (epoch, predecessor) and self._guard_gone == (epoch, predecessor)
                if fast:
                    self.fast = epoch
        if event.type == EventType.DELETED:
            if fast or not self.prefetch_queue(epoch):
                c._notify()  # else once the queue is in
            return
        # Its record changed: it just won (its first refresh publishes since), or was
        # dismissed. Keep watching for its exit, and look whether it now leads: then we are
        # next in line and can take over without a round trip when it goes.
        client, connected, now_epoch = c._session.connected_now()
        if client is not None and connected and now_epoch == epoch:
            sent = _monotonic()
            path = c._path(predecessor)
            client.get_children_async(c._election).rawlink(
                lambda result: self._listed(result, sent, predecessor, epoch, gen))
            client.exists_async(path, watch=watcher).rawlink(lambda result: self._checked(result, path, watcher))

    def _listed(self, result, sent: float, predecessor: str, epoch: int, gen: int) -> None:
        c = self._c
        try:
            children = result.get_nowait()
        except Exception:
            return
        c._session.confirm(sent, epoch)
        ignored = c._ignored.under(None)  # planted nodes never lead
        queue = sorted((n for n in children if _NODE.match(n) and not n.startswith(c._prefix) and n not in ignored),
                       key=_sequence)
        with c._lock:
            leads = gen == self.gen and bool(queue) and queue[0] == predecessor
            if leads:
                self.next_in_line = (epoch, predecessor)
        if leads:
            self.watch_guard(predecessor, epoch)

    @staticmethod
    def _checked(result, path: str, watcher) -> None:
        try:
            stat = result.get_nowait()
        except Exception:
            return  # connection trouble: the state listener deals with it
        if stat is None:
            watcher(WatchedEvent(EventType.DELETED, None, path))

    def watch_guard(self, predecessor: str, epoch: int) -> None:
        """Watch the guard of the leader just before us: its deletion, seen before its node's,
        proves the leader's child stopped (or its session ended), which allows _fast_win.
        Asynchronous: the fast path is merely unavailable until the watch is in place."""
        c = self._c
        with c._lock:
            cached = self._guard_watcher
            if cached is not None and cached[0] == predecessor and cached[1] == epoch:
                watcher = cached[2]
            else:
                def watcher(event) -> None:
                    if event.type == EventType.DELETED:
                        with c._lock:
                            self._guard_gone = (epoch, predecessor)

                self._guard_watcher = (predecessor, epoch, watcher)
        client, connected, now_epoch = c._session.connected_now()
        if client is not None and connected and now_epoch == epoch:
            client.exists_async(c._path(_guard_of(predecessor)), watch=watcher)

    def prefetch_queue(self, epoch: int) -> bool:
        """A predecessor that did not lead left: ask for the queue at once, from here, and wake
        the engine when the answer is in (waking it first would have its thread compete for the
        GIL with the kazoo thread that sends the request). The claim then uses the answer, with
        the time of asking as the (conservative) start of the term's deadline. False if nothing
        was sent."""
        c = self._c
        client, connected, now_epoch = c._session.connected_now()
        if client is None or not connected or now_epoch != epoch:
            return False
        sent = _monotonic()
        result = client.get_children_async(c._election, include_data=True)
        with c._lock:
            self.prefetch = (epoch, sent, result)
        result.rawlink(lambda _result: c._notify())
        return True
