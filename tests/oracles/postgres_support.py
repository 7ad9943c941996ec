"""Shared by the PostgreSQL tests and benchmark: a minimal transaction-pooling proxy (round-robin,
or PgBouncer's default most-recently-freed). The Fleet and wait helper are tests/oracles/support.py's.
"""

import random
import socket
import struct
import threading
from typing import List, Optional

from crown_sync.testing.servers import free_port


# ------------------------------------------------------------------ a transaction pooler


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return data


def _read_message(sock: socket.socket):
    kind = _read_exact(sock, 1)
    length = struct.unpack("!I", _read_exact(sock, 4))[0]
    return kind, _read_exact(sock, length - 4)


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


class TransactionPooler:
    """What a transaction pooler (PgBouncer's ``pool_mode = transaction``) does to session state.

    Clients connect to ``port`` and are answered by the proxy itself (trust authentication). Each
    transaction (everything up to a ReadyForQuery in the idle state) runs on an idle server
    session taken from the pool and goes back to it afterwards. ``reuse`` picks which one:

    * ``"round_robin"``: the least recently freed, so consecutive autocommit statements of one
      client run in different sessions (given ``size >= 2``). With ``backend_key="forward"`` the
      client is told, in the startup BackendKeyData, the pid of the session its first
      transaction will get, as if the proxy were transparent: only the later statements can
      give it away.
    * ``"lifo"``: the most recently freed, as PgBouncer does by default (``server_round_robin =
      0``). A quiet client keeps getting the same session, and so does the next client: two
      clients share one session (and its re-entrant advisory locks) without any statement ever
      seeing a different pid or marker. With ``backend_key="own"`` the proxy sends its own
      BackendKeyData, as PgBouncer does.

    ``used`` lists the index of the server session of every transaction. Only what psycopg needs
    is implemented (no SSL, no COPY, no cancel requests).
    """

    def __init__(self, host: str, port: int, user: str, database: str, size: int = 2,
                 reuse: str = "round_robin", backend_key: str = "forward"):
        if reuse not in ("round_robin", "lifo"):
            raise ValueError(f"reuse must be 'round_robin' or 'lifo', got {reuse!r}")
        if backend_key not in ("forward", "own"):
            raise ValueError(f"backend_key must be 'forward' or 'own', got {backend_key!r}")
        self.target = (host, port)
        self.user = user
        self.database = database
        self.size = size
        self.reuse = reuse
        self.backend_key = backend_key
        self.port = free_port()
        self.used: List[int] = []
        self._listener: Optional[socket.socket] = None
        self._servers: List[socket.socket] = []
        self._keys: List[bytes] = []  # each server session's BackendKeyData body (pid, secret)
        self._idle: List[int] = []  # indexes of idle server sessions, least recently freed first
        self._cond = threading.Condition()
        self._closed = False

    def _server_connection(self):
        sock = socket.create_connection(self.target, timeout=10)
        sock.settimeout(None)
        params = f"user\0{self.user}\0database\0{self.database}\0\0".encode()
        body = struct.pack("!I", 196608) + params
        sock.sendall(struct.pack("!I", len(body) + 4) + body)
        key = None
        while True:
            kind, body = _read_message(sock)
            if kind == b"E":
                raise ConnectionError(body.decode(errors="replace"))
            if kind == b"K":
                key = body
            if kind == b"Z":
                return sock, key

    def start(self) -> "TransactionPooler":
        for _ in range(self.size):
            sock, key = self._server_connection()
            self._servers.append(sock)
            self._keys.append(key)
        self._idle = list(range(self.size))
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def url(self, **params) -> str:
        import urllib.parse

        query = urllib.parse.urlencode(dict(params, sslmode="disable"))
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}?{query}"

    def backend_pids(self) -> List[int]:
        """The server pid of each pooled session (from its BackendKeyData)."""
        return [struct.unpack("!I", key[:4])[0] for key in self._keys]

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _next_index(self) -> int:
        """The session the next transaction will get (waiting while all are busy)."""
        with self._cond:
            self._cond.wait_for(lambda: self._idle or self._closed)
            if self._closed:
                raise ConnectionError("pooler closed")
            return self._idle[-1] if self.reuse == "lifo" else self._idle[0]

    def _take(self) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self._idle or self._closed)
            if self._closed:
                raise ConnectionError("pooler closed")
            index = self._idle.pop() if self.reuse == "lifo" else self._idle.pop(0)
            self.used.append(index)
            return index

    def _give_back(self, index: int) -> None:
        with self._cond:
            self._idle.append(index)
            self._cond.notify_all()

    def _serve(self, client: socket.socket) -> None:
        index = None
        try:
            self._handshake(client)
            while True:
                kind, body = _read_message(client)
                if kind == b"X":
                    return
                if index is None:  # a transaction starts: take a server session
                    index = self._take()
                server = self._servers[index]
                server.sendall(_message(kind, body))
                if kind not in (b"S", b"Q"):  # Parse/Bind/Describe/Execute wait for Sync
                    continue
                while True:
                    reply, data = _read_message(server)
                    client.sendall(_message(reply, data))
                    if reply == b"Z":
                        if data == b"I":  # idle: the transaction is over, the session goes back
                            self._give_back(index)
                            index = None
                        break
        except (OSError, ConnectionError):
            return
        finally:  # a session left mid-transaction stays out of the pool (not reusable)
            client.close()

    def _handshake(self, client: socket.socket) -> None:
        while True:
            length = struct.unpack("!I", _read_exact(client, 4))[0]
            body = _read_exact(client, length - 4)
            code = struct.unpack("!I", body[:4])[0]
            if code in (80877103, 80877104):  # SSLRequest, GSSENCRequest: not here
                client.sendall(b"N")
                continue
            break
        client.sendall(_message(b"R", struct.pack("!I", 0)))  # AuthenticationOk
        for key, value in (("server_version", "15.0"), ("client_encoding", "UTF8"),
                           ("standard_conforming_strings", "on"), ("DateStyle", "ISO, MDY"),
                           ("integer_datetimes", "on"), ("TimeZone", "UTC")):
            client.sendall(_message(b"S", f"{key}\0{value}\0".encode()))
        if self.backend_key == "forward":
            key = self._keys[self._next_index()]
        else:  # PgBouncer makes up a pid and secret of its own for every client
            key = struct.pack("!II", random.randint(1, 2 ** 31 - 1), random.getrandbits(32))
        client.sendall(_message(b"K", key))
        client.sendall(_message(b"Z", b"I"))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._listener is not None:
            self._listener.close()
        for server in self._servers:
            try:
                server.close()
            except OSError:
                pass


# ------------------------------------------------------------------ the contract suite, sessions=shared


def shared_kind():
    """The contract suite's PostgreSQL kind in sessions=shared mode (tests/oracles/conftest.py)."""
    from .support import PostgresKind

    class PostgresSharedKind(PostgresKind):
        name = "postgres-shared"
        fast = dict(PostgresKind.fast, sessions="shared", poll_interval=0.05)
        bad_options = {"lease": 0, "sessions": "both", "poll_interval": 0}

        def unreachable_url(self, server, secret: str) -> str:
            return super().unreachable_url(server, secret) + "&sessions=shared"

        def wrong_credentials_url(self, server, secret: str) -> Optional[str]:
            return super().wrong_credentials_url(server, secret) + "&sessions=shared"

    return PostgresSharedKind()
