"""A throwaway memcached for tests and benchmarks, from the system's ``memcached`` binary.

``MemcachedServer(memory_mb=8)`` listens on 127.0.0.1 and a free port, in its own temp dir, and is
stopped by pid (SIGTERM, then SIGKILL). ``restart()`` brings it back on the same port with an
empty cache, which is exactly what a real memcached restart does. ``flush_all()`` and ``stats()``
talk to it over a short-lived connection of their own.

``MemcachedServer(tls=True)`` serves TLS only (``-Z``) with a self-signed certificate for
127.0.0.1; ``client_certificates=True`` also requires a client certificate (``ssl_verify_mode=2``),
:attr:`client_certificate`/:attr:`client_key`, the only way memcached keeps other clients out.
"""

import os
import socket
import ssl
from typing import Dict, Iterable, Optional, Sequence

from .servers import Server, ServerMissing, find_binary, self_signed

__all__ = ["MemcachedServer", "ServerMissing"]


class MemcachedServer(Server):
    """A memcached process on 127.0.0.1:<free port>.

    memory_mb: ``-m`` (memcached refuses less than 2 MB with the default 1 MB item size).
    extra_args: more memcached options, e.g. ``["-o", "no_lru_maintainer"]`` for the flat LRU
        of memcached 1.4 that evicts a busy key as readily as an idle one.
    """

    def __init__(self, memory_mb: int = 16, extra_args: Sequence[str] = (), tls: bool = False,
                 client_certificates: bool = False):
        if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 2:
            raise ValueError(f"memory_mb must be an int >= 2, got {memory_mb!r}")
        self.binary = find_binary(["memcached", "/usr/bin/memcached", "/usr/local/bin/memcached"], "memcached")
        super().__init__()
        self.memory_mb = memory_mb
        self.extra_args = list(extra_args)
        self.host = "127.0.0.1"
        self._log = None
        self.tls = tls or client_certificates
        #: With TLS: the server's certificate (for ``tls_ca``); with client certificates, the one
        #: the server accepts and its key (for ``tls_cert``/``tls_key``).
        self.certificate = self._self_signed("server") if self.tls else None
        self.client_certificate = self._self_signed("client") if client_certificates else None
        self.client_key = os.path.join(self.tmpdir, "client.key") if client_certificates else None

    def _self_signed(self, role: str) -> str:
        return self_signed(self.tmpdir, role)

    @property
    def url(self) -> str:
        """``memcached://127.0.0.1:PORT`` (add ``?ttl=...`` etc. yourself; with TLS the query
        already names the certificates: add ``&ttl=...``)."""
        url = f"memcached://{self.host}:{self.port}"
        if self.tls:
            url += f"?tls=true&tls_ca={self.certificate}"
        if self.client_certificate:
            url += f"&tls_cert={self.client_certificate}&tls_key={self.client_key}"
        return url

    def tls_context(self, client_certificate: bool = True) -> Optional[ssl.SSLContext]:
        """A client's context for this server (None without TLS)."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.certificate)
        if client_certificate and self.client_certificate:
            context.load_cert_chain(self.client_certificate, self.client_key)
        return context

    @property
    def address(self):
        return (self.host, self.port)

    def command(self) -> list:
        argv = [
            self.binary,
            "-l", self.host,
            "-p", str(self.port),
            "-U", "0",  # no UDP
            "-m", str(self.memory_mb),
            "-c", "1024",
            "-t", "2",
        ]
        if os.geteuid() == 0:
            argv += ["-u", "root"]  # memcached refuses to run as root without -u
        if self.tls:
            tls = f"ssl_chain_cert={self.certificate},ssl_key={os.path.join(self.tmpdir, 'server.key')}"
            if self.client_certificate:
                tls += f",ssl_ca_cert={self.client_certificate},ssl_verify_mode=2"  # 2: required
            argv += ["-Z", "-o", tls]
        return argv + self.extra_args

    def start(self, timeout: float = 20.0) -> "MemcachedServer":
        if self.process is not None and self.process.poll() is None:
            return self
        if self._log is None:
            self._log = open(os.path.join(self.tmpdir, "memcached.log"), "ab")
        self.spawn(self.command(), f"memcached did not listen on {self.host}:{self.port}",
                   os.path.join(self.tmpdir, "memcached.log"), timeout, output=self._log)
        return self

    def restart(self, down_for: float = 0.0) -> "MemcachedServer":
        """Stop (SIGTERM), stay down ``down_for`` seconds, start again on the same port: empty."""
        self.stop()
        return self.start_again(down_for)

    def crash_restart(self, down_for: float = 0.0) -> "MemcachedServer":
        """SIGKILL, then start again on the same port."""
        self.kill()
        return self.start_again(down_for)

    def cleanup(self) -> None:
        super().cleanup()
        if self._log is not None:
            self._log.close()
            self._log = None

    # ------------------------------------------------------------------ talking to the server

    def _request(self, line: bytes, until: Iterable[bytes], timeout: float = 5.0) -> bytes:
        with socket.create_connection((self.host, self.port), timeout=timeout) as raw:
            context = self.tls_context()
            sock = context.wrap_socket(raw, server_hostname=self.host) if context else raw
            sock.sendall(line)
            data = b""
            while not any(data.endswith(end) for end in until):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data

    def flush_all(self) -> None:
        reply = self._request(b"flush_all\r\n", [b"OK\r\n", b"ERROR\r\n"])
        if not reply.endswith(b"OK\r\n"):
            raise RuntimeError(f"flush_all failed: {reply!r}")

    def stats(self, group: Optional[str] = None) -> Dict[str, str]:
        """``stats`` (or ``stats GROUP``) as a dict of strings."""
        line = b"stats\r\n" if not group else f"stats {group}\r\n".encode()
        reply = self._request(line, [b"END\r\n", b"ERROR\r\n"])
        result = {}
        for row in reply.decode(errors="replace").splitlines():
            parts = row.split(" ", 2)
            if len(parts) == 3 and parts[0] == "STAT":
                result[parts[1]] = parts[2]
        return result

    def request_count(self) -> int:
        """Commands the server has answered so far that a client sent on purpose: gets, sets
        (including add and cas), deletes, touches, incr/decr and flushes. ``stats`` not counted."""
        stats = self.stats()
        keys = ("cmd_get", "cmd_set", "cmd_touch", "cmd_flush", "delete_hits", "delete_misses",
                "incr_hits", "incr_misses", "decr_hits", "decr_misses")
        return sum(int(stats.get(key, 0)) for key in keys)
