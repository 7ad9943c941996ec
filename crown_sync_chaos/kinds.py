"""The registry of oracle kinds the chaos runner knows: how to start a kind's server, its URLs, the
faults it supports and how to inject the ones that act on the server, and the longest leaderless
gap its settings allow.

A kind is registered only if its oracle module and (for networked oracles) its throwaway-server
module import: an oracle that does not exist yet is simply absent, never skipped.

Generic faults, injected by the runner on contender processes (see :mod:`crown_sync_chaos.runner`):
``sigkill``, ``sigstop``, ``dismiss`` and ``partition``. Server faults, injected here:

* ``restart``: the oracle server is stopped (gracefully or by crash) and started again, possibly
  after staying down a moment;
* ``terminate`` (Postgres): ``pg_terminate_backend`` of the leader's session (the backend holding
  the advisory lock), or of every crown_sync session;
* ``expire`` (ZooKeeper): a real session expiry, done the way ZooKeeper's own tests do it: a
  second client connects with the leader's session id and password, then closes the session.
  The session id is the ``ephemeralOwner`` of the leader's node; the password is what the server
  derives from the id (``ZooKeeperServer.generatePasswd``: ``java.util.Random(id ^ 0xB3415C00)``,
  16 bytes), so no hook in the contender process is needed;
* ``flush`` (memcached): ``flush_all``, which forgets every lease record at once;
* ``revoke``: the oracle's own way of taking the crown from a live leader, as an administrator
  would (file: the lock file deleted or replaced; PostgreSQL: ``pg_terminate_backend`` of the
  leader's session or of every crown_sync session; ZooKeeper: another client deletes the
  leader's queue node; memcached: another client deletes the leader's key; NATS: an operator
  deletes or purges the leader's key). A kind supports it by listing it in ``faults`` and handling it in
  ``inject``; the base class refuses it.

The runner's ``pause-restart`` fault restarts the server through :meth:`Kind.restart_server`,
which reuses the kind's own ``restart``, so every kind with ``restart`` has it.
"""

import importlib
import json
import os
import random
import time
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["Kind", "KINDS", "available_kinds", "get_kind", "zookeeper_password"]

#: Extra seconds allowed on top of an oracle's own bound for process scheduling on a loaded host.
SLACK = 2.0


class Kind:
    """Base class: one oracle kind. A fresh instance serves one run of the runner."""

    name = ""
    #: modules that must import for the kind to be registered
    modules: Tuple[str, ...] = ()
    #: every fault this kind supports (the runner's and the server's)
    faults: Tuple[str, ...] = ("sigkill", "sigstop", "dismiss")
    #: a contender can be cut off from the oracle by a network partition
    partitionable = True

    def __init__(self, lease: float, workdir: str, netns=None):
        self.lease = float(lease)
        self.workdir = workdir
        self.netns = netns
        self.server = None

    # -- server ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the oracle's server (listening on loopback and, with a netns, its host address)."""

    def stop(self) -> None:
        if self.server is not None:
            self.server.cleanup()
            self.server = None

    def url(self, in_netns: bool = False) -> str:
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        """The settings of this run, for the report."""
        return {"lease": self.lease}

    # -- bounds ----------------------------------------------------------------------------

    def bound(self) -> float:
        """The longest leaderless gap (s) one fault may cause, beyond any server downtime."""
        raise NotImplementedError

    def pause_seconds(self, rng: random.Random) -> float:
        """How long a SIGSTOP lasts: past the lease, so that a successor can take over."""
        return self.lease * rng.uniform(1.3, 2.0) + 0.5

    def expects_new_term(self, fault: str, details: Dict[str, Any]) -> bool:
        """Whether the fault must end the leader's term (so a new term must follow)."""
        if details.get("error"):
            return False  # it was not injected
        if fault == "partition":
            # A brief cut (shorter than the lease) may or may not end the term.
            return bool(details.get("leader_partitioned")) and not details.get("short")
        return True

    # -- server faults ---------------------------------------------------------------------

    def inject(self, fault: str, rng: random.Random, leader: Optional[Dict[str, Any]], name: str) -> Dict[str, Any]:
        """Inject a server fault; returns details including ``confirmed`` (the fault was seen to
        take effect) and ``downtime`` (seconds the oracle was unavailable to everyone).

        ``revoke`` takes the crown away from the live leader the way an administrator would
        (the oracle's own revocation); a kind that supports it lists it in ``faults``."""
        if fault == "revoke":
            raise ValueError(f"{self.name}: no revocation fault here ('revoke' is not in {self.faults})")
        raise ValueError(f"{self.name}: unknown server fault {fault!r}")

    def restart_server(self, rng: random.Random, leader: Optional[Dict[str, Any]], name: str) -> Dict[str, Any]:
        """Restart the oracle's server through this kind's own ``restart`` fault (the runner's
        ``pause-restart`` does so while the leader's crown process is paused)."""
        if "restart" not in self.faults:
            raise ValueError(f"{self.name}: no server restart here ('restart' is not in {self.faults})")
        return self.inject("restart", rng, leader, name)


def _with_query(url: str, **options) -> str:
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return url + ("&" if "?" in url else "?") + query if query else url


class FileKind(Kind):
    """flock in a directory: one host, no server, no lease (a paused leader keeps the crown)."""

    name = "file"
    modules = ("crown_sync.oracles.file",)
    faults = ("sigkill", "sigstop", "dismiss", "revoke")
    partitionable = False

    def start(self) -> None:
        self.directory = os.path.join(self.workdir, "file-oracle")
        os.makedirs(self.directory, mode=0o700, exist_ok=True)

    def url(self, in_netns: bool = False) -> str:
        return f"file://{self.directory}?check_interval=0.1"

    def describe(self) -> Dict[str, Any]:
        return {"lease": None, "note": "flock: no lease; a paused leader keeps the crown"}

    def bound(self) -> float:
        # The kernel wakes a waiter the moment the holder's last descriptor closes.
        return SLACK

    def pause_seconds(self, rng: random.Random) -> float:
        return rng.uniform(1.0, 2.0)

    def expects_new_term(self, fault: str, details: Dict[str, Any]) -> bool:
        # A paused leader keeps its lock, and one whose lock file was deleted or replaced leads
        # on (nobody may lead on the new file while the old one is locked).
        return fault not in ("sigstop", "revoke") and super().expects_new_term(fault, details)

    def inject(self, fault, rng, leader, name):
        """``revoke``: the lock file deleted (a tmp cleaner, ``rm``) or replaced (``mv`` over it)
        while the leader holds it, the one way to take a flock away from a live process."""
        if fault != "revoke":
            return super().inject(fault, rng, leader, name)
        path = os.path.join(self.directory, f"{name}.lock")
        before = os.stat(path).st_ino
        how = rng.choice(("delete", "replace"))
        if how == "delete":
            os.unlink(path)
        else:
            with open(path + ".new", "w"):
                pass
            os.replace(path + ".new", path)
        after = os.stat(path).st_ino if os.path.exists(path) else None
        return {"chosen": how, "downtime": 0.0, "confirmed": after != before}


class PostgresKind(Kind):
    """Session advisory locks; the server enforces the lease with ``idle_session_timeout``.

    A primary and an asynchronous hot standby on two fixed ports; every URL lists both
    (``target_session_attrs=read-write``), so contenders follow whichever is the primary."""

    name = "postgres"
    modules = ("crown_sync.oracles.postgres", "crown_sync.testing.postgres_server")
    faults = ("sigkill", "sigstop", "dismiss", "restart", "terminate", "partition", "revoke", "promote")

    def __init__(self, lease: float, workdir: str, netns=None):
        super().__init__(lease, workdir, netns)
        self.standby = None
        self.ports: Tuple[int, ...] = ()

    def _settings(self) -> Dict[str, Any]:
        if self.netns is None:
            return {}
        return {"listen_addresses": f"127.0.0.1,{self.netns.host_ip}"}

    def start(self) -> None:
        from crown_sync.testing.postgres_server import PostgresServer

        self.server = PostgresServer(settings=self._settings(), fsync=False)
        if self.netns is not None:
            # initdb's pg_hba.conf admits loopback only; admit the namespace's /30 too (a
            # standby's base backup copies it).
            self.server.initdb()
            with open(os.path.join(self.server.datadir, "pg_hba.conf"), "a") as handle:
                handle.write(f"host all all {self.netns.network} trust\n")
        self.server.start()
        self.standby = self._new_standby(port=None)
        self.ports = (self.server.port, self.standby.port)

    def _new_standby(self, port: Optional[int]):
        """A hot standby of the current primary, started and streaming."""
        standby = self.server.create_standby(port=port, settings=self._settings())
        try:
            standby.start()
            standby.wait_streaming()
        except BaseException:
            standby.cleanup()
            raise
        return standby

    def stop(self) -> None:
        if self.standby is not None:
            self.standby.cleanup()
            self.standby = None
        super().stop()

    def url(self, in_netns: bool = False) -> str:
        host = self.netns.host_ip if in_netns else "127.0.0.1"
        hosts = ",".join(f"{host}:{port}" for port in self.ports)
        url = f"postgresql://{self.server.superuser}@{hosts}/{self.server.database}"
        return _with_query(url, target_session_attrs="read-write", lease=self.lease, wait_timeout=1)

    def describe(self) -> Dict[str, Any]:
        return {"lease": self.lease, "note": "PostgresOracle lease (idle_session_timeout); a primary and "
                                             "an asynchronous hot standby"}

    def bound(self) -> float:
        # The server frees a silent session's lock at most `lease` after its last statement; a
        # waiter blocked in pg_advisory_lock gets it at once (wait_timeout only re-queues it).
        # After a termination (a revocation; a follower that reconnects after its own session
        # was ended too, in a database that counted one), or on a server younger than a lease
        # (a restart or a promotion: the runner adds the downtime, the time without a primary),
        # the new leader's child waits a lease from its grant.
        return self.lease + 1.0 + SLACK

    def inject(self, fault, rng, leader, name):
        if fault == "restart":
            mode = rng.choice(["immediate", "fast"])
            down = round(rng.uniform(0.0, 1.0), 2)
            old = self.server.pid
            t0 = time.monotonic()
            self.server.restart(mode=mode, down=down)
            return {"mode": mode, "down": down, "downtime": time.monotonic() - t0,
                    "confirmed": self.server.pid != old and self.server.pid is not None}
        if fault == "terminate":
            everyone = rng.random() < 0.25
            if everyone:
                rows = self.server.sql(
                    "SELECT pid FROM pg_stat_activity WHERE application_name LIKE %s"
                    " AND pid <> pg_backend_pid()", ("crown_sync%",)
                )
                pids = [row[0] for row in rows]
            else:
                pids = sorted({row[0] for row in self.server.advisory_holders()})
            done = [pid for pid in pids if self.server.terminate(pid)]
            return {"target": "all sessions" if everyone else "leader session", "backends": done,
                    "downtime": 0.0, "confirmed": bool(done)}
        if fault == "revoke":
            return self._revoke(rng)
        if fault == "promote":
            return self._promote(rng, leader)
        return super().inject(fault, rng, leader, name)

    def _promote(self, rng, leader):
        """A failover to an asynchronous standby that missed WAL: the standby stops receiving WAL
        (if it still does), the primary runs a few transactions it never gets, then crashes
        (SIGQUIT), and the standby is promoted. Then a new standby takes the old primary's port,
        ready for the next failover: one time in two a base backup of the new primary, streaming;
        otherwise a copy of the standby taken before the promotion that receives no WAL
        (replication broken, unnoticed), so that every term until the next failover, the
        promoted server's first included, takes a token the next promoted server never saw. It
        is given the timelines' history files (as a ``restore_command`` archive would): a
        standby that never learnt of a promotion picks the same timeline again when promoted
        itself, and tokens repeat (the PostgreSQL oracle cannot tell)."""
        old, new = self.server, self.standby
        new.stop_wal_receipt()
        missed = self._missed(new, leader)  # asked before anyone can use the promoted server
        before = old.timeline()
        for _ in range(5):  # xids the promoted server will hand out again (on a higher timeline)
            last_xid = int(old.sql("SELECT pg_current_xact_id()")[0][0])
        lagging = rng.random() < 0.5
        spare = None
        if lagging:  # copied now, before the promotion it will never hear of
            spare = new.create_standby(port=old.port, settings=self._settings(), receive=False)
        try:
            t0 = time.monotonic()
            old.stop(mode="immediate")
            promoted = new.promote()
            downtime = time.monotonic() - t0
            after = new.timeline()
            primary = new.sql("SELECT pg_is_in_recovery()") == [(False,)]
            # Roles swap before the rebuild, so that stop() cleans up whatever exists if it fails.
            self.server, self.standby = new, None
            old.cleanup()
            if spare is not None:
                spare.adopt_history(new)
                spare.start()
        except BaseException:
            if spare is not None:
                spare.cleanup()
            raise
        self.standby = spare if spare is not None else self._new_standby(port=old.port)
        return {"timeline": [before, after], "old_primary_last_xid": last_xid, "leader_xid_missed": missed,
                "downtime": downtime, "next_standby": "lagging" if lagging else "streaming",
                "confirmed": promoted and primary and after > before}

    @staticmethod
    def _missed(server, leader) -> Optional[bool]:
        """Whether the standby ``server`` never received the transaction of the leader's token
        (its xid, the token's low 48 bits, epoch 0 here, is in its future): once promoted, it
        hands that xid out again."""
        import psycopg

        if leader is None or leader.get("token") is None:
            return None
        try:
            server.sql("SELECT pg_xact_status(%s::text::xid8)", (str(leader["token"] & (2 ** 48 - 1)),))
        except psycopg.errors.InvalidParameterValue:  # "transaction ID ... is in the future"
            return True
        return False

    def _revoke(self, rng):
        """An administrator ends the leader's session (``pg_terminate_backend`` of the backend
        holding the advisory lock) or, half the time, every crown_sync session of the database in
        one statement (a connection killer): then no follower's wait is queued when the lock is
        freed, and the one that wins after reconnecting must still hold its child back."""
        everyone = rng.random() < 0.5
        holders = {row[0] for row in self.server.advisory_holders()
                   if (row[3] or "").startswith("crown_sync")}
        where = "application_name LIKE 'crown_sync%%'" if everyone else "pid = ANY(%s)"
        rows = self.server.sql(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE pid <> pg_backend_pid() AND " + where, () if everyone else (sorted(holders),),
        )
        done = [pid for pid, ended in rows if ended]
        return {"target": "all sessions" if everyone else "leader session", "backends": done,
                "downtime": 0.0, "confirmed": bool(holders & set(done))}


class _NetnsZooKeeperServer:
    """Factory for a ZooKeeperServer that listens on the veth host address instead of loopback.

    ZooKeeper takes one ``clientPortAddress``; the host address is local, so contenders on the
    host reach it as well as the one in the namespace. (A subclass, made lazily so that this
    module imports without the ZooKeeper support module.)
    """

    @staticmethod
    def make(address: str, **options):
        from crown_sync.testing.zookeeper_server import ZooKeeperServer, four_letter_word
        import re

        class NetnsZooKeeperServer(ZooKeeperServer):
            @property
            def hosts(self) -> str:
                return f"{address}:{self.port}"

            def _write_config(self) -> None:
                super()._write_config()
                # java.util.Properties: the last occurrence of a key wins.
                with open(self.config_path, "a") as handle:
                    handle.write(f"clientPortAddress={address}\n")

            def mode(self):
                reply = four_letter_word(self.port, "srvr", host=address, timeout=1.0)
                match = re.search(r"^Mode: (\w+)", reply, re.M)
                return match.group(1) if match else None

            def sessions(self):
                reply = four_letter_word(self.port, "cons", host=address)
                return [int(sid, 16) for sid in re.findall(r"sid=0x([0-9a-fA-F]+)", reply)]

        return NetnsZooKeeperServer(**options)


def _java_random_bytes(seed: int, count: int) -> bytes:
    """``new java.util.Random(seed).nextBytes(byte[count])``."""
    mask = (1 << 48) - 1
    state = (seed ^ 0x5DEECE66D) & mask
    out = bytearray()
    while len(out) < count:
        state = (state * 0x5DEECE66D + 0xB) & mask
        value = state >> 16  # next(32), as an unsigned 32-bit number
        for _ in range(min(4, count - len(out))):
            out.append(value & 0xFF)
            value >>= 8
    return bytes(out)


def zookeeper_password(session_id: int) -> bytes:
    """The password a ZooKeeper server (3.x) gives session ``session_id``."""
    return _java_random_bytes(session_id ^ 0xB3415C00, 16)


class ZooKeeperKind(Kind):
    """Ephemeral sequential nodes; a term lasts 0.75 of the session timeout after its last
    confirmation, and the server expires a silent session after the timeout."""

    name = "zookeeper"
    modules = ("crown_sync.oracles.zookeeper", "crown_sync.testing.zookeeper_server", "kazoo.client")
    faults = ("sigkill", "sigstop", "dismiss", "restart", "expire", "partition", "revoke")

    def start(self) -> None:
        from crown_sync.testing.zookeeper_server import ZooKeeperServer

        if self.netns is not None:
            self.server = _NetnsZooKeeperServer.make(self.netns.host_ip)
        else:
            self.server = ZooKeeperServer()
        self.server.start()

    def url(self, in_netns: bool = False) -> str:
        return f"zookeeper://{self.server.hosts}?session_timeout={self.lease}"

    def describe(self) -> Dict[str, Any]:
        return {"lease": self.lease, "note": "ZooKeeperOracle session_timeout (tickTime 200 ms)"}

    def bound(self) -> float:
        # Silent leader: its session expires `timeout` after its last heartbeat (+ a tick);
        # the successor's predecessor watch fires at once.
        return self.lease + 0.5 + SLACK

    def _client(self):
        from kazoo.client import KazooClient

        client = KazooClient(hosts=self.server.hosts, timeout=max(self.lease, 2.0))
        client.start(timeout=15)
        return client

    def inject(self, fault, rng, leader, name):
        if fault == "restart":
            crash = rng.random() < 0.5
            t0 = time.monotonic()
            old = self.server.pid
            if crash:
                self.server.kill()
            else:
                self.server.stop()
            self.server.start()
            return {"mode": "kill" if crash else "stop", "downtime": time.monotonic() - t0,
                    "confirmed": self.server.pid != old and self.server.pid is not None}
        if fault == "expire":
            return self._expire(leader, name)
        if fault == "revoke":
            return self._revoke(leader, name)
        return super().inject(fault, rng, leader, name)

    @staticmethod
    def _leader_node(client, path, leader):
        """(queue node, its session, how it was chosen) of the journal's leader, or None."""
        # Queue nodes end in a 10-digit sequence number; other children (the oracle's guards) not.
        nodes = [n for n in client.get_children(path) if n[-10:].isdigit()]
        for node in nodes:
            try:
                data, stat = client.get(f"{path}/{node}")
                identity = json.loads(data.decode()).get("identity")
            except Exception:
                continue
            if leader is not None and identity == leader["identity"]:
                return node, stat.ephemeralOwner, "node of the journal's leader"
        for node in sorted(nodes, key=lambda n: n[-10:]):
            # The record's layout is the oracle's business: fall back to the queue's head.
            stat = client.exists(f"{path}/{node}")
            if stat is not None:
                return node, stat.ephemeralOwner, "lowest sequence node"
        return None

    def _revoke(self, leader, name):
        """Another client deletes the leader's queue node (zkCli ``delete``), as an administrator
        might, while the leader's session lives on."""
        return self._end_leaders_node(leader, name, lambda client, node_path, session_id: client.delete(node_path))

    def _expire(self, leader, name):
        return self._end_leaders_node(leader, name, self._close_session)

    def _close_session(self, client, node_path, session_id):
        from kazoo.client import KazooClient

        twin = KazooClient(hosts=self.server.hosts, client_id=(session_id, zookeeper_password(session_id)),
                           timeout=max(self.lease, 2.0))
        twin.start(timeout=15)
        twin.stop()  # sends closeSession: the server ends the session and deletes its nodes
        twin.close()

    def _end_leaders_node(self, leader, name, end):
        """Find the leader's queue node, ``end(client, node path, owner session)`` it, and report
        whether it is gone."""
        from crown_sync.oracles.zookeeper import ZooKeeperOracle

        path = ZooKeeperOracle.from_url(self.url()).election_path(name)  # no I/O: connects lazily
        client = self._client()
        try:
            target = self._leader_node(client, path, leader)
            if target is None:
                return {"confirmed": False, "downtime": 0.0, "error": f"no node under {path}"}
            node, session_id, how = target
            end(client, f"{path}/{node}", session_id)
            gone = client.exists(f"{path}/{node}") is None
            return {"session": hex(session_id), "node": node, "chosen": how, "downtime": 0.0, "confirmed": gone}
        finally:
            client.stop()
            client.close()


class MemcachedKind(Kind):
    """A lease record renewed by CAS; the lease runs on the contenders' clocks."""

    name = "memcached"
    modules = ("crown_sync.oracles.memcached", "crown_sync.testing.memcached_server", "pymemcache")
    faults = ("sigkill", "sigstop", "dismiss", "restart", "flush", "partition", "revoke")

    def start(self) -> None:
        from crown_sync.testing.memcached_server import MemcachedServer

        extra = ["-l", self.netns.host_ip] if self.netns is not None else []
        self.server = MemcachedServer(extra_args=extra)
        self.server.start()

    def url(self, in_netns: bool = False) -> str:
        host = self.netns.host_ip if in_netns else self.server.host
        return f"memcached://{host}:{self.server.port}?ttl={self.lease}&poll_interval=0.1"

    def describe(self) -> Dict[str, Any]:
        return {"lease": self.lease, "note": "MemcachedOracle ttl, poll_interval 0.1 s"}

    def bound(self) -> float:
        # A silent leader: followers must see the same record bytes for a ttl (up to a renewal
        # interval + a poll after its last renewal); a lost record: a ttl of quarantine.
        return 2 * self.lease + 0.2 + SLACK

    def inject(self, fault, rng, leader, name):
        if fault == "restart":
            crash = rng.random() < 0.5
            down = round(rng.uniform(0.0, 1.0), 2)
            old = self.server.pid
            t0 = time.monotonic()
            if crash:
                self.server.crash_restart(down_for=down)
            else:
                self.server.restart(down_for=down)
            return {"mode": "kill" if crash else "stop", "down": down, "downtime": time.monotonic() - t0,
                    "confirmed": self.server.pid != old and self.server.pid is not None}
        if fault == "flush":
            before = int(self.server.stats().get("cmd_flush", 0))
            self.server.flush_all()
            after = int(self.server.stats().get("cmd_flush", 0))
            return {"downtime": 0.0, "confirmed": after == before + 1}
        if fault == "revoke":
            return self._revoke(leader, name)
        return super().inject(fault, rng, leader, name)

    def _revoke(self, leader, name):
        """Another client deletes the leader's lease record (the key), as an administrator might."""
        from pymemcache.client.base import Client

        from crown_sync.oracles.memcached import MemcachedOracle

        key = MemcachedOracle.from_url(self.url()).key(name)  # no I/O: connects lazily
        client = Client(self.server.address, default_noreply=False, connect_timeout=5, timeout=5)
        try:
            value = client.get(key)
            try:
                holder = json.loads(value).get("identity") if value else None
            except ValueError:
                holder = None
            deleted = client.delete(key, noreply=False)
        finally:
            client.close()
        # Confirmed: the key existed and named the journal's leader when it was deleted.
        matches = leader is None or holder == leader["identity"]
        return {"key": key, "holder": holder, "downtime": 0.0, "confirmed": bool(deleted) and matches}


class NatsKind(Kind):
    """A lease record in a JetStream KV bucket, renewed by CAS on its revision; changes pushed."""

    name = "nats"
    modules = ("crown_sync.oracles.nats", "crown_sync.testing.nats_server", "nats")
    faults = ("sigkill", "sigstop", "dismiss", "restart", "revoke")
    partitionable = False  # the test server listens on loopback only

    def start(self) -> None:
        from crown_sync.testing.nats_server import NatsServer

        self.server = NatsServer().start()

    def url(self, in_netns: bool = False) -> str:
        return self.server.url_for(ttl=self.lease, poll_interval=0.5)

    def describe(self) -> Dict[str, Any]:
        return {"lease": self.lease, "note": "NatsOracle ttl, poll_interval 0.5 s (releases are pushed)"}

    def bound(self) -> float:
        # As memcached: a silent leader's record is taken over once unchanged for a ttl; an
        # emptied key costs a ttl of quarantine.
        return 2 * self.lease + 0.5 + SLACK

    def expects_new_term(self, fault: str, details: Dict[str, Any]) -> bool:
        # The record survives a restart (file storage): a leader that renews again before its
        # deadline leads on.
        return fault != "restart" and super().expects_new_term(fault, details)

    def inject(self, fault, rng, leader, name):
        if fault == "restart":  # file storage: the record survives
            crash = rng.random() < 0.5
            down = round(rng.uniform(0.0, 1.0), 2)
            old = self.server.pid
            t0 = time.monotonic()
            self.server.restart(down_for=down, crash=crash)
            return {"mode": "kill" if crash else "stop", "down": down, "downtime": time.monotonic() - t0,
                    "confirmed": self.server.pid != old and self.server.pid is not None}
        if fault == "revoke":
            return self._revoke(rng, leader, name)
        return super().inject(fault, rng, leader, name)

    def _revoke(self, rng, leader, name):
        """An administrator deletes or purges the leader's key (``nats kv del`` / ``purge``)."""
        from crown_sync.oracles.nats import NatsOracle

        oracle = NatsOracle.from_url(self.url())  # no I/O: only for the bucket and key
        key, how = oracle.key(name), rng.choice(["delete", "purge"])
        entry = self.server.admin("get", bucket=oracle.bucket, key=key)
        try:
            holder = json.loads(entry.value).get("identity") if entry is not None else None
        except ValueError:
            holder = None
        if entry is not None:
            self.server.admin(how, bucket=oracle.bucket, key=key)
        # Confirmed: the key had a value naming the journal's leader when it was emptied.
        matches = leader is None or holder == leader["identity"]
        return {"key": key, "how": how, "holder": holder, "downtime": 0.0, "confirmed": entry is not None and matches}


class RedisKind(Kind):
    """A lease record replaced by a Lua compare-and-set, on a Redis without persistence (a
    restart forgets every lease, as FLUSHALL does); releases pushed over pub/sub."""

    name = "redis"
    modules = ("crown_sync.oracles.redis", "crown_sync.testing.redis_server", "redis")
    faults = ("sigkill", "sigstop", "dismiss", "restart", "flush", "partition", "revoke")

    def start(self) -> None:
        from crown_sync.testing.redis_server import RedisServer

        extra = [f"bind 127.0.0.1 {self.netns.host_ip}"] if self.netns is not None else []
        self.server = RedisServer(persistence=None, extra_config=extra).start()

    def url(self, in_netns: bool = False) -> str:
        url = self.server.url(ttl=self.lease, poll_interval=0.5)
        return url.replace("@127.0.0.1:", f"@{self.netns.host_ip}:") if in_netns else url

    def describe(self) -> Dict[str, Any]:
        return {"lease": self.lease, "note": "RedisOracle ttl, poll_interval 0.5 s, no persistence"}

    def bound(self) -> float:
        # As memcached: a silent leader's record is taken over once unchanged for a ttl; a lost
        # record (restart, FLUSHALL, DEL) costs a ttl of quarantine.
        return 2 * self.lease + 0.5 + SLACK

    def inject(self, fault, rng, leader, name):
        if fault == "restart":
            crash = rng.random() < 0.5
            down = round(rng.uniform(0.0, 1.0), 2)
            old, t0 = self.server.pid, time.monotonic()
            (self.server.crash_restart if crash else self.server.restart)(down_for=down)
            return {"mode": "kill" if crash else "stop", "down": down, "downtime": time.monotonic() - t0,
                    "confirmed": self.server.pid != old and self.server.pid is not None}
        if fault in ("flush", "revoke"):
            return self._erase(fault, leader, name)
        return super().inject(fault, rng, leader, name)

    def _erase(self, fault, leader, name):
        """``FLUSHALL``, or (revoke) an administrator's ``DEL`` of the leader's lease key."""
        key = f"crown_sync:{name}"
        with self.server.client() as client:
            value = client.get(key)
            try:
                holder = json.loads(value).get("identity") if value else None
            except ValueError:
                holder = None
            erased = client.flushall() if fault == "flush" else client.delete(key) == 1
        # Confirmed: the key named the journal's leader when it was erased.
        matches = leader is None or holder == leader["identity"]
        return {"key": key, "holder": holder, "downtime": 0.0, "confirmed": bool(erased) and matches}


KINDS: List[type] = [FileKind, PostgresKind, ZooKeeperKind, MemcachedKind]
KINDS.append(NatsKind)
KINDS.append(RedisKind)


def available_kinds() -> Dict[str, type]:
    """Kinds whose modules import, by name, in a fixed order."""
    found = {}
    for kind in KINDS:
        try:
            for module in kind.modules:
                importlib.import_module(module)
        except ImportError:
            continue
        found[kind.name] = kind
    return found


def get_kind(name: str) -> type:
    kinds = available_kinds()
    if name not in kinds:
        known = ", ".join(k.name for k in KINDS)
        raise ValueError(f"oracle kind {name!r} is not available here (known: {known}; "
                         f"available: {', '.join(kinds) or 'none'})")
    return kinds[name]
