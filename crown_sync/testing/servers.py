"""Throwaway servers for tests, benchmarks and the chaos runner.

Each server runs from the system's binaries in a private temporary directory, listens on a free
loopback port, and is stopped by pid. A missing binary is an error that says what to install
(``scripts/install-servers`` does it as root); it is never a silent skip.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import IO, Callable, List, Optional, Union

__all__ = ["ServerMissing", "free_port", "wait_for_port", "find_binary", "self_signed", "Server"]


class ServerMissing(RuntimeError):
    """A server binary needed by the tests is not installed."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")
            time.sleep(0.05)


def find_binary(candidates: List[str], package: str) -> str:
    """The first existing executable among names/paths, or ServerMissing naming the package."""
    for candidate in candidates:
        path = candidate if os.path.isabs(candidate) else shutil.which(candidate)
        if path and os.access(path, os.X_OK):
            return path
    raise ServerMissing(
        f"none of {candidates} found: install the Debian package {package!r} "
        f"(as root: scripts/install-servers)"
    )


def self_signed(directory: str, role: str) -> str:
    """A self-signed certificate for 127.0.0.1 made with ``openssl`` in ``directory``:
    ``<role>.crt`` (returned) and its key ``<role>.key``."""
    certificate = os.path.join(directory, f"{role}.crt")
    subprocess.run([
        find_binary(["openssl"], "openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        "-keyout", os.path.join(directory, f"{role}.key"), "-out", certificate,
    ], check=True, capture_output=True)
    return certificate


class Server:
    """Base: a process in its own temp dir, stopped by pid (SIGTERM, then SIGKILL)."""

    def __init__(self):
        self.tmpdir = tempfile.mkdtemp(prefix=f"crown-sync-{type(self).__name__.lower()}-")
        self.port = free_port()
        self.process: Optional[subprocess.Popen] = None

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process else None

    def stop(self, timeout: float = 10.0, signum: int = signal.SIGTERM) -> None:
        """Send ``signum`` (SIGTERM: a clean stop), wait up to ``timeout``, then SIGKILL."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.kill(self.process.pid, signum)
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        self.process = None

    def pause(self) -> None:
        """SIGSTOP the server process (it stops answering but keeps its sockets)."""
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the server (a crash), keeping its data directory."""
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.cleanup()

    def start(self) -> None:
        raise NotImplementedError

    def start_again(self, down_for: float = 0.0):
        """After a stop or kill: stay down ``down_for`` seconds, then start on the same port."""
        if down_for:
            time.sleep(down_for)
        last = None
        for _ in range(50):  # the port was ours; a few retries cover a TIME_WAIT or a slow exit
            try:
                return self.start()
            except RuntimeError as exc:
                last = exc
                time.sleep(0.1)
        raise last

    def spawn(self, argv: List[str], what: str, see: str, timeout: float,
              ready: Optional[Callable[[float], None]] = None,
              output: Union[int, IO[bytes]] = subprocess.DEVNULL) -> None:
        """Start ``argv`` in the server's directory, in a session of its own (a Ctrl-C in the test
        run is not the server's business), and wait for its port and then ``ready(timeout)``; a
        RuntimeError saying ``what`` did not happen and where to look (``see``) otherwise."""
        self.process = subprocess.Popen(
            argv, cwd=self.tmpdir, stdin=subprocess.DEVNULL, stdout=output,
            stderr=subprocess.DEVNULL if output == subprocess.DEVNULL else subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for_port(self.port, timeout=timeout, host=getattr(self, "host", "127.0.0.1"))
            if ready is not None:
                ready(timeout)
        except (TimeoutError, RuntimeError):
            code = self.process.poll()
            self.kill()
            raise RuntimeError(f"{what} (exit code {code}); see {see}") from None
