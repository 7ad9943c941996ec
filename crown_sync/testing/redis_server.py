"""A throwaway Redis for tests and benchmarks, from the system's ``redis-server`` binary.

``RedisServer(password="...")`` listens on 127.0.0.1 and a free port, in its own temp dir (its
config file, log and data), and is stopped by pid (SIGTERM, then SIGKILL). It always requires a
password: the default user's (``requirepass``) and, with ``user=``, an ACL user of that name.
``persistence`` chooses what a restart keeps: ``"aof"`` (an append-only file fsynced at every
write: even a SIGKILL loses nothing), ``"rdb"`` (a snapshot written only at a clean shutdown) or
``None`` (nothing: a restart comes back empty, as a cache configured ``save ""`` does).
``restart()`` and ``crash_restart()`` bring it back on the same port with the same data dir;
``pause()``/``resume()`` freeze it with SIGSTOP/SIGCONT. ``cluster=True`` starts a node in cluster
mode (no slots assigned), which the oracle must refuse.
"""

import os
import signal
import socket
import subprocess
import threading
import time
from typing import Dict, Optional, Sequence

from .memcached_server import MemcachedServer
from .servers import Server, ServerMissing, find_binary, free_port

__all__ = ["RedisServer", "ServerMissing"]

_PERSISTENCE = {
    "aof": ["appendonly yes", "appendfsync always", 'save ""'],
    "rdb": ["appendonly no", "save 3600 1"],  # a clean SHUTDOWN writes the snapshot
    None: ["appendonly no", 'save ""'],
}


class RedisServer(Server):
    """A redis-server process on 127.0.0.1:<free port> that requires a password.

    password: the default user's password (``requirepass``).
    user: also create this ACL user, with the same password and every right.
    persistence: ``"aof"``, ``"rdb"`` or ``None`` (see the module docstring).
    cluster: start in cluster mode (a node of no cluster yet: a single-node oracle must refuse it).
    tls: serve TLS only, with a self-signed certificate for 127.0.0.1 made by ``openssl``
        (``certificate``: the file a client trusts); ``url()`` is then ``rediss://``.
    extra_config: more ``redis.conf`` lines, e.g. ``["notify-keyspace-events KEA"]``.
    """

    def __init__(self, password: str = "crown-sync-test-secret", user: Optional[str] = None,
                 persistence: Optional[str] = "aof", cluster: bool = False, tls: bool = False,
                 extra_config: Sequence[str] = ()):
        if persistence not in _PERSISTENCE:
            raise ValueError(f"persistence must be 'aof', 'rdb' or None, got {persistence!r}")
        if not password or any(c.isspace() or c in "\"'" for c in password):
            raise ValueError("password must be non-empty, without spaces or quotes")
        self.binary = find_binary(["redis-server", "/usr/bin/redis-server", "/usr/local/bin/redis-server"],
                                  "redis-server")
        super().__init__()
        self.password = password
        self.user = user
        self.persistence = persistence
        self.cluster = cluster
        self.tls = tls
        self.certificate = os.path.join(self.tmpdir, "server.crt")
        self.extra_config = list(extra_config)
        self.host = "127.0.0.1"
        self._log_path = os.path.join(self.tmpdir, "redis.log")
        self._monitor: Optional[threading.Thread] = None
        self._counts: Dict[str, int] = {}

    def url(self, db: int = 0, password: Optional[str] = None, **options) -> str:
        """``redis://[user]:PASSWORD@127.0.0.1:PORT/DB[?options]`` (the ACL user's with ``user``)."""
        secret = self.password if password is None else password
        query = "&".join(f"{key}={value}" for key, value in options.items())
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.user or ''}:{secret}@{self.host}:{self.port}/{db}" + (f"?{query}" if query else "")

    @property
    def address(self):
        return (self.host, self.port)

    def _config(self) -> str:
        lines = [
            f"bind {self.host}",
            *self._listen(),
            f"dir {self.tmpdir}",
            f"logfile {self._log_path}",
            "daemonize no",
            "protected-mode no",
            f"requirepass {self.password}",
            "databases 16",
        ]
        if self.user:
            lines.append(f"user {self.user} on >{self.password} ~* &* +@all")
        lines += _PERSISTENCE[self.persistence]
        if self.cluster:
            lines += [
                "cluster-enabled yes",
                f"cluster-config-file {os.path.join(self.tmpdir, 'nodes.conf')}",
                f"cluster-port {free_port()}",  # the default, port + 10000, may not exist
            ]
        path = os.path.join(self.tmpdir, "redis.conf")
        with open(path, "w") as handle:
            handle.write("\n".join(lines + self.extra_config) + "\n")
        return path

    def _listen(self) -> list:
        if not self.tls:
            return [f"port {self.port}"]
        if not os.path.exists(self.certificate):
            key = os.path.join(self.tmpdir, "server.key")
            subprocess.run(
                [find_binary(["openssl"], "openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                 "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                 "-keyout", key, "-out", self.certificate],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        return ["port 0", f"tls-port {self.port}", f"tls-cert-file {self.certificate}",
                f"tls-key-file {os.path.join(self.tmpdir, 'server.key')}", "tls-auth-clients no"]

    def start(self, timeout: float = 20.0) -> "RedisServer":
        if self.process is not None and self.process.poll() is None:
            return self
        self.spawn([self.binary, self._config()], f"redis-server did not serve on {self.host}:{self.port}",
                   self._log_path, timeout, ready=self._wait_loaded)
        return self

    def _wait_loaded(self, timeout: float) -> None:
        # The port opens before an append-only file is loaded; commands meanwhile get LOADING.
        deadline = time.monotonic() + timeout
        while self.info("persistence").get("loading", "0") != "0":
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server still loading its data")
            time.sleep(0.02)

    def restart(self, down_for: float = 0.0) -> "RedisServer":
        """Stop cleanly (SIGTERM), stay down ``down_for`` seconds, start again on the same port with
        the same data dir: what comes back depends on ``persistence``."""
        self.resume()
        return MemcachedServer.restart(self, down_for)

    # As memcached's: SIGKILL (kill() resumes a paused server first), stay down, start on the same
    # port, retrying a while; here the data dir stays, so an ``aof`` server keeps every write.
    crash_restart = MemcachedServer.crash_restart

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing is answered."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        self.resume()  # a stopped process dies of SIGKILL too, but only reaps once continued
        super().kill()

    # ------------------------------------------------------------------ talking to the server

    def client(self, **kwargs):
        """A redis-py client on the server (default user's password), for tests to act as an
        administrator would: ``DEL``, ``FLUSHALL``, ``CLIENT KILL``, ..."""
        import redis

        kwargs.setdefault("socket_timeout", 5.0)
        if self.tls:
            kwargs.update(ssl=True, ssl_ca_certs=self.certificate)
        return redis.Redis(host=self.host, port=self.port, password=self.password, **kwargs)

    def info(self, section: str) -> Dict[str, str]:
        """``INFO section`` as a dict of strings."""
        with self.client(decode_responses=True) as client:
            return {key: str(value) for key, value in client.info(section).items()}

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()

    def request_count(self) -> int:
        """Commands clients have sent since this method was first called, seen through ``MONITOR``
        (in a thread of its own from that first call on; counts go on across restarts).

        ``INFO``'s counters (``commandstats``, ``total_commands_processed``) also count the
        commands a Lua script runs inside the server (one ``EVALSHA`` shows as an ``evalsha``, a
        ``get`` and a ``set``); ``MONITOR`` tells those apart (their client is ``lua``) and counts
        only what came over the network.
        """
        return sum(self.request_counts().values())

    def request_counts(self) -> Dict[str, int]:
        """:meth:`request_count` by command name."""
        if self._monitor is None or not self._monitor.is_alive():
            ready = threading.Event()
            self._monitor = threading.Thread(target=self._count, args=(ready,), daemon=True,
                                             name="redis-server-monitor")
            self._monitor.start()
            ready.wait(5.0)
        return dict(self._counts)

    def _count(self, ready: threading.Event) -> None:
        replies = 0
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(f"AUTH {self.password}\r\nMONITOR\r\n".encode())
                buffer = b""
                while self.process is not None:
                    try:
                        chunk = sock.recv(65536)
                    except socket.timeout:
                        continue
                    if not chunk:
                        return  # the server went away: the next request_count() starts anew
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\r\n")
                    for line in lines:
                        if line == b"+OK":
                            replies += 1
                            if replies == 2:
                                ready.set()  # AUTH's and MONITOR's replies: counting from here
                        else:
                            self._tally(line.decode(errors="replace"))
        except OSError:
            pass
        finally:
            ready.set()

    def _tally(self, line: str) -> None:
        # +1796622592.123456 [0 127.0.0.1:40000] "GET" "key"; a script's: [0 lua] "get" ...
        head, _, command = line.partition("] ")
        if command and not head.endswith(" lua"):
            name = command.split(" ", 1)[0].strip('"').lower()
            self._counts[name] = self._counts.get(name, 0) + 1
