"""ZooKeeper candidacies (see :doc:`ranking`): an ephemeral sequential node
``<election>/candidate-<sequence>`` holding the candidate as JSON, made on the oracle's shared
session. Live by construction: the server deletes it with the session. Reading is one
``get_children`` plus the nodes' data, pipelined. The name never matches a queue node's, so the
election's queue ignores it.
"""

import json
from typing import Any, List, Optional, Tuple

from kazoo.exceptions import KazooException, NoNodeError

from ...oracle import Candidate
from .._base import bounded
from .._candidacy import CandidacyBase
from ._common import _unavailable

__all__ = ["ZooKeeperCandidacy"]

PREFIX = "candidate-"


class ZooKeeperCandidacy(CandidacyBase):
    def __init__(self, oracle: Any, name: str, candidate: Candidate):
        super().__init__()
        self._oracle, self._me = oracle, candidate
        self._election = oracle.election_path(name)
        self._node: Optional[Tuple[int, str]] = None  # (session id, path) of our node

    def candidates(self) -> List[Candidate]:
        client, _epoch, session = self._oracle._connection()
        timeout = self._oracle._op_timeout()
        try:
            with self._open():
                children = self._publish(client, session, timeout)
                if self._closed:  # closed meanwhile (close() could not wait): no node may outlive it
                    self._delete()
                    raise RuntimeError("candidacy closed")
            reads = [client.get_async(f"{self._election}/{child}") for child in children if child.startswith(PREFIX)]
            found = []
            for read in reads:
                try:
                    data, _stat = read.get(timeout)
                except NoNodeError:
                    continue  # its session ended meanwhile
                candidate = _parse(data)
                if candidate is not None:
                    found.append(candidate)
            return found
        except KazooException as exc:
            raise _unavailable("reading the candidates", exc) from exc

    def _publish(self, client: Any, session: int, timeout: float) -> List[str]:
        """The election's children, after making our node if this session has none (a new
        session, or the first call)."""
        made = self._node is None or self._node[0] != session
        if made:
            data = json.dumps(self._me.to_dict()).encode()
            path = client.create_async(f"{self._election}/{PREFIX}", data, acl=self._oracle.acl, ephemeral=True,
                                       sequence=True, makepath=True).get(timeout)
            self._node = (session, path)
        children = client.get_children_async(self._election).get(timeout)
        if self._node[1].rsplit("/", 1)[1] not in children:  # gone with an earlier session
            self._node = None
            if made:
                raise KazooException("our candidate node vanished as it was made")
            return self._publish(client, session, timeout)
        return children

    def close(self) -> None:
        self._closed = True
        # a publish under way holds the lock for at most one request's timeout
        bounded(self._lock, self._oracle._op_timeout(), self._delete, lambda: None)

    def _delete(self) -> None:
        node, self._node = self._node, None
        client, connected, _epoch = self._oracle._connected_now()
        if node is None or client is None or not connected:
            return  # the node goes with the session
        try:
            client.delete_async(node[1]).get(self._oracle._op_timeout())
        except Exception:  # gone already, or the session is going: it ends with it
            pass


def _parse(data: bytes) -> Optional[Candidate]:
    try:
        return Candidate.from_dict(json.loads(data))
    except (ValueError, UnicodeDecodeError):
        return None
