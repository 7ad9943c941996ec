"""The oracle: options, the leader's record as others read it, ``find_leader`` and ``dismiss``;
its contenders share one kazoo session (:mod:`._session`)."""

import contextlib
import json
import urllib.parse
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from kazoo.client import KazooClient
from kazoo.exceptions import BadVersionError, KazooException, NoAuthError, NoNodeError
from kazoo.security import ACL, CREATOR_ALL_ACL, OPEN_ACL_UNSAFE, READ_ACL_UNSAFE, make_digest_acl_credential

from ...oracle import Leader, OnChange
from ...urls import parse_options
from .._base import Election, OracleBase, seconds_between
from .._tls import client_context
from ._common import (
    _ELECTION,
    _NODE,
    _OPTIONS,
    LEASE_FRACTION,
    LEASE_MARGIN,
    MAX_RECORD_BYTES,
    REFRESHES_PER_TIMEOUT,
    ZooKeeperUnavailable,
    _check_path,
    _foreign_why,
    _is_dismissed,
    _parse_hosts,
    _parse_record,
    _record_size,
    _sequence,
    _unavailable,
    logger,
)
from ._notices import CHILD_RIGHTS, _Notices, foreign_writers, open_acl_text
from ._session import _SharedSession
from .contender import ZooKeeperContender

class ZooKeeperOracle(OracleBase):
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
    ``tls``: connect to the servers' TLS port (``secureClientPort``), the server's certificate
    verified against ``tls_ca`` (a PEM file) or the system's store, its name or IP checked;
    ``tls_cert``/``tls_key``: a client certificate. Digest credentials cross the network in clear
    without it.
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
        tls: bool = False,
        tls_ca: Optional[str] = None,
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
    ):
        self.hosts, hosts_chroot = _parse_hosts(hosts)
        if hosts_chroot is not None and chroot is not None:
            raise ValueError("chroot given twice (in hosts and as chroot=)")
        self.chroot = _check_path(chroot if chroot is not None else hosts_chroot, "chroot", True)
        self.session_timeout = seconds_between("session_timeout", session_timeout, 1.0, 3600.0)
        self.connect_timeout = seconds_between("connect_timeout", connect_timeout, 0.01, 3600.0)
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
        # Built to check the options (a ValueError naming the one whose file is unusable); kazoo
        # builds its own context from the same files.
        client_context(tls, tls_ca, tls_cert, tls_key, "tls=true (zookeeper://host?tls=true)")
        # kazoo loads a client certificate only with a keyfile: one PEM holding both is its own key.
        tls_options = dict(use_ssl=True, ca=tls_ca, certfile=tls_cert, keyfile=tls_key or tls_cert,
                           verify_certs=True, check_hostname=True) if tls else {}
        # Timings must leave the leader time to confirm before its deadline (client-go style).
        if self.lease_for(self.session_timeout) <= self.session_timeout / REFRESHES_PER_TIMEOUT:
            raise ValueError("session_timeout too short for the refresh interval")

        userinfo = f"{urllib.parse.quote(self._user, safe='')}:***@" if self._user else ""
        query = {"session_timeout": f"{self.session_timeout:g}"}
        if self.path_prefix != "/crown_sync":
            query["path_prefix"] = self.path_prefix
        if tls:
            query["tls"] = "true"
        self.description = (
            f"zookeeper://{userinfo}{self.hosts}{self.chroot or ''}?" + urllib.parse.urlencode(query, safe="/")
        )
        self._session = _SharedSession(
            self.hosts + (self.chroot or ""), self.session_timeout, self.connect_timeout, self._auth, self.acl,
            self.description, self.path_prefix, tls_options,
        )
        self._notices = _Notices(self.description)
        said = open_acl_text(self.acl)
        if said:
            self._notices.add(None, said)
        super().__init__()  # after the session: from here a fork's handler may forget it

    def notices(self, name: str) -> Tuple[str, ...]:
        """What this oracle cannot protect ``name`` against, each said once: an open ACL, nodes
        planted in the election (ignored), parents others may write to."""
        return self._notices.of(name)

    def _check_parents(self, client: KazooClient, name: str) -> None:
        """Once per election, without waiting: with credentials, say so if the election's node or
        ``path_prefix`` lets other ids create or delete children (created by us they carry our
        ACL; one made earlier by someone else may be open)."""
        if open_acl_text(self.acl) or not self._notices.first_parent_check(name):
            return
        mine = {(entry.id.scheme, entry.id.id) for entry in self.acl if entry.perms & CHILD_RIGHTS}
        if self._auth:
            mine.add(("digest", make_digest_acl_credential(*self._auth.split(":", 1))))

        def checked(path: str, result) -> None:
            try:
                acl, _stat = result.get_nowait()
            except Exception:
                return  # gone or unreachable: checked again by no one (best effort, said once)
            others = foreign_writers(acl, mine)
            if others:
                self._notices.add(name, (
                    f"{path} lets {', '.join(others)} create or delete its children: they can plant "
                    f"or delete nodes of the election; set its ACL to the crowns' credentials (setAcl)"
                ))

        for path in (self.path_prefix, self.election_path(name)):
            client.get_acls_async(path).rawlink(lambda result, path=path: checked(path, result))

    def _foreign(self, name: str, node: str, why: str) -> None:
        self._notices.add(name, (
            f"ignored node {self.election_path(name)}/{node}: {why}; not a contender's, some client "
            f"with create rights there planted it (docs: Sharing a server)"
        ))

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
        return self._session.effective_timeout()

    def election_path(self, name: str) -> str:
        return f"{self.path_prefix}/{name}"

    def candidacy(self, name: str, candidate):
        """This contender's published candidacy, for ranking strategies (see docs/ranking.rst)."""
        from ._candidacy import ZooKeeperCandidacy
        return ZooKeeperCandidacy(self, name, candidate)

    @property
    def _client(self) -> Optional[KazooClient]:
        return self._session.client

    def _connection(self, cancelled=lambda: False, wait: Optional[float] = None) -> Tuple[KazooClient, int, int]:
        """The shared session's connection, in this process: (client, epoch, session id)."""
        self._check_process()
        return self._session.connection(cancelled, wait)

    def _connected_now(self) -> Tuple[Optional[KazooClient], bool, int]:
        return self._session.connected_now()

    def _op_timeout(self) -> float:
        return self._session.op_timeout()

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
        self._check_process()
        if not callable(on_change):
            raise TypeError("on_change must be callable")
        contender = ZooKeeperContender(self, name, identity, metadata, on_change)
        self._session.register(contender)
        return contender

    def _read_leader(self, client: KazooClient, election: str, node: str) -> Optional[Leader]:
        """The leader record of ``node``; None if it is gone, or not a contender's (then noted)."""
        try:
            data, stat = client.get_async(f"{election}/{node}").get(self._op_timeout())
        except NoNodeError:
            return None
        return self._leader_if_contender(election, node, data, stat)

    def _leader_if_contender(self, election: str, node: str, data: bytes, stat) -> Optional[Leader]:
        why = _foreign_why(stat, _parse_record(data))
        if why is not None:
            self._foreign(election.rsplit("/", 1)[1], node, why)
            return None
        return self._leader_from(data, stat)

    @staticmethod
    def _leader_from(data: bytes, stat) -> Leader:
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

    def elections(self) -> List[Election]:
        """The children of ``path_prefix``, each with its queue (contenders: its live nodes) and
        the record of the first: three pipelined rounds of requests, whatever the count."""
        client, _epoch, _session = self._connection()
        timeout = self._op_timeout()
        try:
            try:
                names = client.get_children_async(self.path_prefix).get(timeout)
            except NoNodeError:
                return []
            asked = {name: client.get_children_async(self.election_path(name))
                     for name in names if _ELECTION.match(name)}
            queues = {}
            for name, pending in asked.items():
                with contextlib.suppress(NoNodeError):  # removed meanwhile: no election
                    children = pending.get(timeout)
                    queues[name] = sorted((c for c in children if _NODE.match(c)), key=_sequence)
            heads = {name: client.get_async(f"{self.election_path(name)}/{queue[0]}")
                     for name, queue in queues.items() if queue}
            found = []
            for name, queue in sorted(queues.items()):
                try:
                    election = self.election_path(name)
                    leader = self._leader_if_contender(election, queue[0], *heads[name].get(timeout)) if queue else None
                except NoNodeError:  # the leader left meanwhile: ask as find_leader does
                    leader = None
                if queue and leader is None:  # left, or not a contender's node: the next one leads
                    leader = self.find_leader(name)
                found.append(Election(name, leader, len(queue)))
            return found
        except KazooException as exc:
            raise _unavailable("listing the elections", exc) from exc

    def _first_contender(self, client: KazooClient, election: str, queue: List[str]) -> Optional[str]:
        """The first node of ``queue`` that is a contender's (or that left meanwhile), or None."""
        for node in queue:
            try:
                data, stat = client.get_async(f"{election}/{node}").get(self._op_timeout())
            except NoNodeError:
                return node  # it left: the caller finds out
            if self._leader_if_contender(election, node, data, stat) is not None:
                return node
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
            target = self._first_contender(client, election, self._queue(client, election))
            if target is None:
                return False
            path = f"{election}/{target}"
            for _attempt in range(10):
                try:
                    data, stat = client.get_async(path).get(self._op_timeout())
                except NoNodeError:
                    logger.info("the leader of %s (node %s) left before the dismissal", name, target)
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
                    logger.info("the leader of %s (node %s) left before the dismissal", name, target)
                    return True
                logger.info("asked the leader of %s (node %s, token %s) to step down", name, target, stat.czxid)
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
        self._session.close()

    def _forget_after_fork(self) -> None:
        self._session.forget_after_fork()
