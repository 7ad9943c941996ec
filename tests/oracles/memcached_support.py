"""Shared by the memcached tests: a fault proxy. The Fleet and wait helper are
tests/oracles/support.py's.
"""

import socket
import threading
from typing import Callable, List, Optional, Tuple


class FaultProxy:
    """A TCP relay in front of a real memcached that cuts a connection at a chosen command.

    A real network fault at an exact point of the protocol (in the spirit of toxiproxy), so a test
    can make one call fail after the read before it succeeded: ``cut_next(predicate)`` arms it, and
    the next client-to-server chunk for which ``predicate(chunk)`` is true is dropped, never
    reaching memcached, and both ends of that connection are closed. pymemcache sends a command
    (line and data) with one ``sendall``, which loopback delivers in one piece; ``cuts`` counts the
    faults that fired, so a test can check that its fault really happened.
    """

    def __init__(self, upstream: Tuple[str, int]):
        self.upstream = tuple(upstream)
        self.cuts = 0
        self._rule: Optional[Callable[[bytes], bool]] = None
        self._lock = threading.Lock()
        self._sockets: List[socket.socket] = []
        self._closed = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.address = self._listener.getsockname()
        threading.Thread(target=self._accept, name="fault-proxy", daemon=True).start()

    def cut_next(self, predicate: Callable[[bytes], bool]) -> None:
        with self._lock:
            self._rule = predicate

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
            for source, sink, outbound in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(source, sink, outbound), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, outbound: bool) -> None:
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    break
                if outbound:
                    with self._lock:
                        cut = self._rule is not None and self._rule(chunk)
                        if cut:
                            self._rule = None
                            self.cuts += 1
                    if cut:
                        break  # dropped: memcached never sees it
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() in progress (Linux)
        except OSError:
            pass
        self._listener.close()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
