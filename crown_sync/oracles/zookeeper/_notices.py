"""What a ZooKeeper oracle says once about what it cannot protect: an open ACL, nodes that are
not contenders' (ignored), election parents others may write to. Each notice is logged once, as
a warning, and kept: a crown shows its election's in ``status().notices`` and emits each once as
``crown.oracle.notice``; ``crown-sync status`` prints them."""

import threading
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Set, Tuple

from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError
from kazoo.security import ACL, Permissions

from ...oracle import Leader
from ._common import _foreign_why, logger

if TYPE_CHECKING:  # pragma: no cover
    from .contender import ZooKeeperContender

#: The rights that let a client plant or delete a node's children (ZooKeeper checks a delete
#: against the parent's ACL, not the node's).
CHILD_RIGHTS = Permissions.CREATE | Permissions.DELETE


class _Notices:
    """One oracle's notices: oracle-wide ones (``None``) and each election's, in order."""

    def __init__(self, description: str):
        self._description = description
        self._lock = threading.Lock()
        self._said: Dict[Optional[str], List[str]] = {}
        self._parents_checked: set = set()

    def add(self, election: Optional[str], text: str) -> bool:
        """Keep ``text`` (for ``election``, or every election with None) and log it, once."""
        with self._lock:
            said = self._said.setdefault(election, [])
            if text in said:
                return False
            said.append(text)
        logger.warning("ZooKeeper %s: %s", self._description, text)
        return True

    def of(self, election: str) -> Tuple[str, ...]:
        with self._lock:
            return tuple(self._said.get(None, ())) + tuple(self._said.get(election, ()))

    def first_parent_check(self, election: str) -> bool:
        """True the first time only: the election's parents are checked once per oracle."""
        with self._lock:
            if election in self._parents_checked:
                return False
            self._parents_checked.add(election)
            return True


def open_acl_text(acl: Sequence[ACL]) -> Optional[str]:
    """The notice for an ACL that lets any client change the crowns' nodes, or None."""
    if any(entry.id.scheme == "world" and entry.perms & ~Permissions.READ for entry in acl):
        return (
            "open ACL (no user:password): any client of this ZooKeeper can delete or rewrite the "
            "crowns' nodes and guards, and plant nodes in their elections; give the crowns digest "
            "credentials of their own (docs: Sharing a server)"
        )
    return None


def foreign_writers(acl: Sequence[ACL], mine: Set[Tuple[str, str]]) -> List[str]:
    """The ids, other than ``mine`` ((scheme, id) pairs), that the parent ACL ``acl`` lets create
    or delete children."""
    return sorted(
        f"{entry.id.scheme}:{entry.id.id}" for entry in acl
        if entry.perms & CHILD_RIGHTS and (entry.id.scheme, entry.id.id) not in mine
    )


class _Ignored:
    """A contender's nodes of its election found not to be contenders' (persistent, or without a
    leader record): they never lead and are never watched as a predecessor. Kept with the czxid
    of the election node they were seen under, so that names reused under a recreated election
    node count again. State guarded by the contender's lock."""

    def __init__(self, contender: "ZooKeeperContender"):
        self._c = contender
        self._seen: Tuple[int, Set[str]] = (-1, set())

    def under(self, parent_czxid: Optional[int]) -> Set[str]:
        """The names ignored under the election node of creation zxid ``parent_czxid`` (None:
        unknown, the last one seen)."""
        with self._c._lock:
            if parent_czxid is not None and self._seen[0] != parent_czxid:
                self._seen = (parent_czxid, set())
            return set(self._seen[1])

    def has(self, node: str) -> bool:
        with self._c._lock:
            return node in self._seen[1]

    def _add(self, node: str) -> None:
        with self._c._lock:
            self._seen[1].add(node)

    def head(self, client: KazooClient, node: str) -> Optional[Leader]:
        """The leader record of the node first in the queue; None if it left, or if it is not a
        contender's (then ignored from now on). The one read a claim always made."""
        c = self._c
        try:
            data, stat = client.get_async(c._path(node)).get(c._session.op_timeout())
        except NoNodeError:
            return None
        leader = c.oracle._leader_if_contender(c._election, node, data, stat)
        if leader is None:
            self._add(node)
        return leader

    def first_contender(self, client: KazooClient, queue: List[str], node: str) -> Tuple[List[str], Optional[Leader]]:
        """``queue`` from its first contender's node on (heads that are not contenders' dropped),
        and that node's leader record; None if ``node`` heads it or the head left meanwhile."""
        leader = None
        while queue.index(node) > 0:
            leader = self.head(client, queue[0])
            if leader is not None or not self.has(queue[0]):
                break  # a contender's node leads, or the head left meanwhile
            queue = queue[1:]
        return queue, leader

    def planted(self, predecessor: str, stat, record: Dict[str, Any]) -> bool:
        """Is the predecessor whose ``stat`` and ``record`` (its parsed data) the follower's watch
        just read not a contender's? Then it is noted and ignored from now on."""
        why = _foreign_why(stat, record)
        if why is None:
            return False
        self._c.oracle._foreign(self._c.name, predecessor, why)
        self._add(predecessor)
        return True
