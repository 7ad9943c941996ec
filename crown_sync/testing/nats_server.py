"""A throwaway NATS server with JetStream for tests and benchmarks, from the system's ``nats-server``.

``NatsServer()`` writes a config file into its own temp dir and runs ``nats-server -js`` on
127.0.0.1 and a free port, with a file store in that dir (so ``restart()`` keeps every KV bucket
and revision, as a real restart does) and two users: ``crown`` (every right) and ``reader`` (may
subscribe and ask JetStream's API, may not publish into KV buckets). Stopped by pid (SIGTERM, then
SIGKILL); ``pause()``/``resume()`` (the base's) SIGSTOP/SIGCONT it. ``varz()`` reads the monitoring endpoint
(messages in and out: the requests the clients made).
"""

import json
import os
import secrets
import signal
import ssl
import subprocess
import time
import urllib.request
from typing import Any, Dict, Optional

from .servers import Server, ServerMissing, find_binary, free_port

__all__ = ["NatsServer", "ServerMissing"]

_CONFIG = """\
listen: "{host}:{port}"
http: "{host}:{http_port}"
server_name: "crown_sync_test"
jetstream {{
  store_dir: "{store}"
  max_memory_store: 64MB
  max_file_store: 256MB
}}
authorization {{
  users = [
    {{user: "crown", password: "{password}"}}
    {{user: "reader", password: "{reader_password}",
      permissions: {{publish: {{deny: ["$KV.>"]}}}}}}
  ]
}}
"""


_TLS = """\
tls {{
  cert_file: "{cert}"
  key_file: "{key}"
}}
"""


class NatsServer(Server):
    """``nats-server -js`` on 127.0.0.1:<free port> with a file store in its temp dir.

    tls: clients must speak TLS (``tls://`` URLs); the server's self-signed certificate for
        127.0.0.1 is :attr:`certificate` (made with ``openssl``).
    """

    user = "crown"
    reader = "reader"

    def __init__(self, tls: bool = False):
        self.binary = find_binary(["nats-server", "/usr/sbin/nats-server", "/usr/bin/nats-server"], "nats-server")
        super().__init__()
        self.host = "127.0.0.1"
        self.http_port = free_port()
        # Random passwords: a test that finds one in a log found a leak, not a coincidence.
        self.password = "pw-" + secrets.token_hex(8)
        self.reader_password = "rd-" + secrets.token_hex(8)
        self.store = os.path.join(self.tmpdir, "jetstream")
        self.config = os.path.join(self.tmpdir, "nats.conf")
        self.log_path = os.path.join(self.tmpdir, "nats.log")
        self.scheme = "tls" if tls else "nats"
        self.certificate = os.path.join(self.tmpdir, "server.crt") if tls else None
        config = _CONFIG.format(host=self.host, port=self.port, http_port=self.http_port, store=self.store,
                                password=self.password, reader_password=self.reader_password)
        if tls:
            key = os.path.join(self.tmpdir, "server.key")
            subprocess.run([
                find_binary(["openssl"], "openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                "-keyout", key, "-out", self.certificate,
            ], check=True, capture_output=True)
            config += _TLS.format(cert=self.certificate, key=key)
        with open(self.config, "w") as f:
            f.write(config)

    def url_for(self, user: Optional[str] = None, password: Optional[str] = None, **options: Any) -> str:
        """``nats://user:password@127.0.0.1:PORT?options`` (the ``crown`` user by default; with
        TLS, ``tls://`` and the server's certificate as ``tls_ca``)."""
        user = self.user if user is None else user
        if password is None:
            password = self.reader_password if user == self.reader else self.password
        if self.certificate is not None:
            options.setdefault("tls_ca", self.certificate)
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"{self.scheme}://{user}:{password}@{self.host}:{self.port}" + (f"?{query}" if query else "")

    @property
    def url(self) -> str:
        """``nats://crown:PASSWORD@127.0.0.1:PORT`` (add ``?ttl=...`` etc. yourself)."""
        return self.url_for()

    def command(self) -> list:
        return [self.binary, "-js", "-c", self.config, "-l", self.log_path]

    def start(self, timeout: float = 30.0) -> "NatsServer":
        if self.process is not None and self.process.poll() is None:
            return self
        self.spawn(self.command(), f"nats-server did not serve JetStream on {self.host}:{self.port}",
                   self.log_path, timeout, ready=self._wait_jetstream)
        return self

    def _wait_jetstream(self, timeout: float) -> None:
        # The client port opens before JetStream has recovered its streams from the store.
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if self.jsz().get("config") is not None:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError("JetStream not ready")

    def restart(self, down_for: float = 0.0, crash: bool = False) -> "NatsServer":
        """Stop (SIGTERM, or SIGKILL with ``crash``), stay down ``down_for`` seconds, start again
        on the same port with the same store: buckets and revisions survive."""
        self.kill() if crash else self.stop()
        return self.start_again(down_for)

    def stop(self, timeout: float = 10.0, signum: int = signal.SIGTERM) -> None:
        self.resume()  # a paused server cannot act on SIGTERM
        super().stop(timeout, signum)

    def _monitor(self, path: str) -> Dict[str, Any]:
        with urllib.request.urlopen(f"http://{self.host}:{self.http_port}/{path}", timeout=5) as reply:
            return json.loads(reply.read())

    def varz(self) -> Dict[str, Any]:
        return self._monitor("varz")

    def jsz(self) -> Dict[str, Any]:
        return self._monitor("jsz")

    def request_count(self) -> int:
        """Messages the server has received from clients so far (every KV read, write and API
        request is one; PINGs are not)."""
        return int(self.varz().get("in_msgs", 0))

    def version(self) -> str:
        return str(self.varz().get("version", ""))

    def log_tail(self, chars: int = 4000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    # ------------------------------------------------------------------ an administrator's hand

    def admin(self, action: str, bucket: str = "crown_sync", key: Optional[str] = None) -> Any:
        """Do what an operator would with the ``nats`` CLI, over a short-lived connection:
        ``delete`` or ``purge`` a key, ``get`` it (an Entry, None if it has no value),
        ``delete_bucket``, or ``info`` (the bucket stream's StreamInfo)."""
        import asyncio

        import nats
        import nats.js.errors

        async def act():
            tls = ssl.create_default_context(cafile=self.certificate) if self.certificate else None
            nc = await nats.connect(f"{self.scheme}://{self.host}:{self.port}", user=self.user,
                                    password=self.password, allow_reconnect=False, connect_timeout=5, tls=tls)
            try:
                js = nc.jetstream(timeout=5)
                if action == "delete_bucket":
                    return await js.delete_key_value(bucket)
                if action == "info":
                    return await js.stream_info(f"KV_{bucket}")
                kv = await js.key_value(bucket)
                if action == "get":
                    try:
                        return await kv.get(key)
                    except nats.js.errors.KeyNotFoundError:
                        return None
                return await getattr(kv, action)(key)  # delete, purge
            finally:
                await nc.close()

        if action not in ("delete", "purge", "get", "delete_bucket", "info"):
            raise ValueError(f"unknown action {action!r}")
        return asyncio.run(act())
