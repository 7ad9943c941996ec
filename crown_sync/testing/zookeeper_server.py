"""Throwaway ZooKeeper servers (single node or a 3-node ensemble) from the Debian package's jars.

``ZooKeeperServer()`` runs ``java -cp ... org.apache.zookeeper.server.quorum.QuorumPeerMain
zoo.cfg`` with a generated config in its temp dir, listening on a free loopback port. Defaults
suit tests: a fast ``tickTime`` (200 ms) so that sessions of one to a few seconds are allowed and
expire on time (the server checks expiry once per tick), a small heap, four-letter-word commands
enabled (``srvr`` tells readiness and the member's mode, ``cons`` lists sessions), the admin HTTP
server off. ``ZooKeeperEnsemble(3)`` starts members that know each other; each member can be
stopped, killed and started again on the same ports and data directory.

An ensemble's ``syncLimit`` (how long a member cut off from the quorum keeps serving) is derived
from ``session_timeout``, the shortest session timeout its clients will use, so that the test
servers meet the ZooKeeper oracle's own condition: ``syncLimit x tickTime <= T / 4`` and
``T >= 4 x tickTime`` (see docs/oracles/zookeeper.rst).

Nothing here is mocked: these are the real server processes, stopped by pid.
"""

import os
import re
import signal
import socket
import subprocess
import time
from typing import Dict, List, Optional

from .servers import Server, ServerMissing, find_binary, free_port, self_signed

__all__ = ["ZooKeeperServer", "ZooKeeperEnsemble", "four_letter_word", "zookeeper_classpath"]

_MAIN = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
_JAR_DIRS = ("/usr/share/java", "/usr/share/zookeeper", "/usr/share/zookeeper/lib")


def zookeeper_classpath() -> str:
    """The server's classpath from the system installation, or ServerMissing.

    Debian's ``zookeeper.jar`` names its dependencies in its manifest's Class-Path, so it is
    enough on its own; slf4j-simple (if present) makes the server log to stderr (our log file).
    """
    jar = None
    for directory in _JAR_DIRS:
        names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        # zookeeper.jar, else a versioned zookeeper-3.x.y.jar (not -jute, -recipes, -tests...)
        found = [n for n in names if n == "zookeeper.jar"] or [
            n for n in names if re.fullmatch(r"zookeeper-\d[\d.]*\.jar", n)
        ]
        if found:
            jar = os.path.join(directory, found[-1])
            break
    if jar is None:
        raise ServerMissing(
            "ZooKeeper's server jar was not found under /usr/share/java or /usr/share/zookeeper: "
            "install the Debian package 'zookeeper' (as root: scripts/install-servers)"
        )
    parts = [jar]
    # Netty's codec, resolver and native glue are missing from the manifest: the TLS port
    # (NettyServerCnxnFactory) needs them.
    extras = ("slf4j-simple.jar", "netty-codec.jar", "netty-resolver.jar", "netty-transport-native-unix-common.jar")
    for extra in extras:
        path = os.path.join(os.path.dirname(jar), extra)
        if os.path.exists(path):
            parts.append(path)
    return os.pathsep.join(parts)


def four_letter_word(port: int, word: str = "srvr", host: str = "127.0.0.1", timeout: float = 2.0) -> str:
    """Send a four-letter-word command and return the reply ('' if nothing answers)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(word.encode())
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks).decode("utf-8", "replace")
    except OSError:
        return ""


def _die_with_parent() -> None:
    """In the server's process: get SIGKILL if the test process dies, so no JVM is orphaned."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux or no libc: the tests still stop servers by pid
        pass


class ZooKeeperServer(Server):
    """One ZooKeeper server process: standalone, or member ``myid`` of an ensemble.

    ``tick_time`` is in milliseconds (ZooKeeper's unit); sessions may last from
    ``min_session_timeout`` to ``max_session_timeout`` milliseconds. ``session_timeout`` (seconds)
    is the shortest session timeout the clients will use: ``syncLimit`` is the largest number of
    ticks within a quarter of it (``sync_limit`` overrides), and it must be at least 4 ticks.
    Digest ACLs work on any ZooKeeper: no auth provider is configured. ``tls=True`` adds a TLS
    client port, :attr:`tls_port` (Netty, a self-signed PEM certificate for 127.0.0.1:
    :attr:`certificate`), beside the plain one; :attr:`tls_url` names it with ``tls_ca``.
    ``client_certificate=True`` makes that port require a client certificate (:attr:`client_pem`).
    """

    def __init__(
        self,
        tick_time: int = 200,
        min_session_timeout: Optional[int] = None,
        max_session_timeout: int = 60000,
        heap: str = "128m",
        myid: Optional[int] = None,
        peers: Optional[Dict[int, tuple]] = None,
        port: Optional[int] = None,
        extra_config: Optional[Dict[str, str]] = None,
        start_timeout: float = 60.0,
        session_timeout: float = 3.0,
        sync_limit: Optional[int] = None,
        tls: bool = False,
        client_certificate: bool = False,
    ):
        self.tick_time = int(tick_time)
        if self.tick_time <= 0:
            raise ValueError(f"tick_time must be > 0 ms, got {tick_time!r}")
        if session_timeout * 1000 < 4 * self.tick_time:
            raise ValueError(
                f"session_timeout ({session_timeout} s) must be at least 4 x tick_time ({self.tick_time} ms)"
            )
        if sync_limit is None:
            sync_limit = int(session_timeout * 1000 / 4 // self.tick_time)
        if not isinstance(sync_limit, int) or sync_limit < 1:
            raise ValueError(f"sync_limit must be an int >= 1, got {sync_limit!r}")
        self.session_timeout = float(session_timeout)
        self.sync_limit = sync_limit
        super().__init__()
        if port is not None:
            self.port = port
        self.min_session_timeout = int(min_session_timeout or 2 * self.tick_time)
        self.max_session_timeout = int(max_session_timeout)
        self.heap = heap
        self.myid = myid
        self.peers = peers  # {myid: (client_port, quorum_port, election_port)}
        self.extra_config = dict(extra_config or {})
        self.start_timeout = start_timeout
        self.data_dir = os.path.join(self.tmpdir, "data")
        self.config_path = os.path.join(self.tmpdir, "zoo.cfg")
        self.log_path = os.path.join(self.tmpdir, "zookeeper.log")
        self._java = None
        self._classpath = None
        self.tls_port = free_port() if tls else None
        self.certificate = self_signed(self.tmpdir, "server") if tls else None
        #: With ``client_certificate``: the TLS port requires one, and this PEM (certificate, then
        #: key, in one file) is the one it trusts; :attr:`tls_url` gives it as ``tls_cert``.
        self.client_pem = None
        if tls and client_certificate:
            self.client_pem = os.path.join(self.tmpdir, "client.pem")
            self._concatenate(self.client_pem, [self_signed(self.tmpdir, "client"), "client.key"])

    # -- addresses -------------------------------------------------------------------------

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"zookeeper://{self.hosts}"

    @property
    def tls_url(self) -> str:
        """The TLS port's URL, the server's certificate as ``tls_ca`` (add ``&...`` options)."""
        url = f"zookeeper://127.0.0.1:{self.tls_port}?tls=true&tls_ca={self.certificate}"
        return url + (f"&tls_cert={self.client_pem}" if self.client_pem else "")

    def _concatenate(self, target: str, parts: List[str]) -> None:
        with open(target, "w") as out:
            for part in parts:
                with open(os.path.join(self.tmpdir, part)) as handle:
                    out.write(handle.read())

    def _tls_config(self) -> List[str]:
        keystore = os.path.join(self.tmpdir, "server.pem")  # ZooKeeper's PEM key store: key, then certificate
        self._concatenate(keystore, ["server.key", "server.crt"])
        trusted = self.certificate
        if self.client_pem is not None:
            trusted = os.path.join(self.tmpdir, "trusted.pem")
            self._concatenate(trusted, ["server.crt", "client.crt"])
        return [
            f"secureClientPort={self.tls_port}",
            "secureClientPortAddress=127.0.0.1",
            "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory",
            f"ssl.keyStore.location={keystore}",
            "ssl.keyStore.type=PEM",
            f"ssl.trustStore.location={trusted}",
            "ssl.trustStore.type=PEM",
            f"ssl.clientAuth={'need' if self.client_pem else 'none'}",
        ]

    # -- lifecycle -------------------------------------------------------------------------

    def _write_config(self) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        lines = [
            f"tickTime={self.tick_time}",
            "initLimit=50",
            f"syncLimit={self.sync_limit}",
            f"dataDir={self.data_dir}",
            f"clientPort={self.port}",
            "clientPortAddress=127.0.0.1",
            f"minSessionTimeout={self.min_session_timeout}",
            f"maxSessionTimeout={self.max_session_timeout}",
            "admin.enableServer=false",
            "4lw.commands.whitelist=*",
            "autopurge.purgeInterval=0",
            "maxClientCnxns=0",  # no per-IP cap: every test client comes from 127.0.0.1
            # fsync on every write is ZooKeeper's durability promise; throwaway servers on a
            # shared CI disk keep it (the benchmarks compare peers on the same server anyway).
            "forceSync=yes",
        ]
        if self.peers:
            lines.append("standaloneEnabled=false")
            lines.append("reconfigEnabled=false")
            lines.append("quorumListenOnAllIPs=false")
            for myid, (_client, quorum, election) in sorted(self.peers.items()):
                lines.append(f"server.{myid}=127.0.0.1:{quorum}:{election}:participant")
            with open(os.path.join(self.data_dir, "myid"), "w") as handle:
                handle.write(f"{self.myid}\n")
        if self.tls_port is not None:
            lines.extend(self._tls_config())
        for key, value in self.extra_config.items():
            lines.append(f"{key}={value}")
        with open(self.config_path, "w") as handle:
            handle.write("\n".join(lines) + "\n")

    def command(self) -> List[str]:
        if self._java is None:
            self._java = find_binary(
                ["java", "/usr/lib/jvm/default-java/bin/java"], "default-jre-headless"
            )
            self._classpath = zookeeper_classpath()
        return [
            self._java,
            f"-Xmx{self.heap}",
            "-Xss512k",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",  # faster start; these servers live for seconds
            "-Djava.net.preferIPv4Stack=true",
            "-Dzookeeper.jmx.log4j.disable=true",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=info",
            "-Dorg.slf4j.simpleLogger.showDateTime=true",
            "-cp",
            self._classpath,
            _MAIN,
            self.config_path,
        ]

    def spawn(self) -> None:
        """Start the process without waiting for it to serve (ensembles start members together)."""
        if self.process is not None and self.process.poll() is None:
            return
        self._write_config()
        command = self.command()
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                command,
                cwd=self.tmpdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                close_fds=True,
            )
        finally:
            log.close()

    def mode(self) -> Optional[str]:
        """'standalone', 'leader' or 'follower' when serving; None otherwise."""
        reply = four_letter_word(self.port, "srvr", timeout=1.0)
        match = re.search(r"^Mode: (\w+)", reply, re.M)
        return match.group(1) if match else None

    def wait_serving(self, timeout: Optional[float] = None) -> None:
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        while True:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(
                    f"ZooKeeper on port {self.port} exited at start; see {self.log_path}:\n"
                    + self.log_tail()
                )
            if self.mode():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"ZooKeeper on port {self.port} not serving after {timeout}s; "
                    f"see {self.log_path}:\n" + self.log_tail()
                )
            time.sleep(0.05)

    def start(self) -> None:
        self.spawn()
        self.wait_serving()

    def restart(self) -> None:
        self.stop()
        self.start()

    def sessions(self) -> List[int]:
        """Session ids of the clients connected to this server (from ``cons``)."""
        reply = four_letter_word(self.port, "cons")
        return [int(sid, 16) for sid in re.findall(r"sid=0x([0-9a-fA-F]+)", reply)]

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "r", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return ""


class ZooKeeperEnsemble:
    """``size`` ZooKeeper members on loopback that form one ensemble.

    ``hosts`` lists every member (what a client is given); ``members[i]`` can be stopped, killed
    (SIGKILL, a crash) and started again; ``member_with_session(sid)`` tells which member a given
    client session is connected to.
    """

    def __init__(self, size: int = 3, **options):
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size!r}")
        peers = {}
        for myid in range(1, size + 1):
            peers[myid] = (free_port(), free_port(), free_port())
        self.members: List[ZooKeeperServer] = [
            ZooKeeperServer(myid=myid, peers=peers, port=peers[myid][0], **options)
            for myid in range(1, size + 1)
        ]

    @property
    def hosts(self) -> str:
        return ",".join(member.hosts for member in self.members)

    @property
    def url(self) -> str:
        return f"zookeeper://{self.hosts}"

    def start(self, timeout: float = 90.0) -> None:
        for member in self.members:
            member.spawn()
        deadline = time.monotonic() + timeout
        for member in self.members:
            member.wait_serving(max(1.0, deadline - time.monotonic()))

    def wait_quorum(self, timeout: float = 60.0) -> None:
        """Wait until every running member serves (a leader has been elected)."""
        deadline = time.monotonic() + timeout
        for member in self.members:
            if member.process is not None:
                member.wait_serving(max(1.0, deadline - time.monotonic()))

    def leader(self) -> Optional[ZooKeeperServer]:
        for member in self.members:
            if member.process is not None and member.mode() == "leader":
                return member
        return None

    def member_with_session(self, session_id: int) -> Optional[ZooKeeperServer]:
        for member in self.members:
            if member.process is not None and session_id in member.sessions():
                return member
        return None

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def cleanup(self) -> None:
        for member in self.members:
            member.cleanup()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.cleanup()
