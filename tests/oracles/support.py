"""What every oracle test shares: the one Fleet and wait helper, and the registry of oracle kinds.

``Fleet``, ``wait_until``, ``process_state``, ``terms`` and ``assert_safe`` live in
:mod:`crown_sync.testing.fleet` (the benchmarks and the chaos runner can use them too) and are
re-exported here.

An **oracle kind** is what the contract suite (``test_contract.py``) needs to know about an
oracle: how to start its server from the system's binaries, the URLs to use (fast options for
quick failovers, an unreachable server, wrong credentials where the oracle has them) and which
process to freeze (SIGSTOP) for the bounded-close cases. ``KINDS`` lists them; the fixture
``served`` (tests/oracles/conftest.py) starts each kind's server once per session and hands the
test a :class:`Served`. A test marked ``@pytest.mark.needs("freeze")`` (or ``"credentials"``) runs
only on the kinds that have it.

Adding an oracle is ONE entry: write a subclass of :class:`OracleKind` and add it to ``KINDS``::

    class RedisKind(OracleKind):
        name = "redis"
        fast = {"ttl": "2", "margin": "0.5"}           # URL options for quick failovers

        def start(self):
            from crown_sync.testing.redis_server import RedisServer
            return RedisServer().start()               # a Server: stopped by cleanup()

        def url(self, server, **options):
            return with_query(server.url, options)

        def unreachable_url(self, server, secret):
            return f"redis://:{secret}@127.0.0.1:{free_port()}"

        def wrong_credentials_url(self, server, secret):   # leave out if it has none
            return f"redis://:{secret}@127.0.0.1:{server.port}"

    KINDS.append(RedisKind())

``start()`` raises :class:`~crown_sync.testing.servers.ServerMissing` when the binary is missing:
an error, never a skip. ``pid(server)`` (default ``server.pid``) is the process that
:meth:`Served.frozen` stops with its descendants; a kind without a server process returns None.
Kinds with ``server = True`` are deselected in tox's py39/py313 envs (``-m "not server_oracle"``).
A contract case the oracle fails today goes in its ``known_bugs`` (test name -> the bug): it runs
as a strict xfail, so the fix shows up as an XPASS that asks for the entry's removal.
"""

import contextlib
import os
import shutil
import signal
import tempfile
import textwrap
import urllib.parse
from typing import Any, Dict, List, Optional

from crown_sync.testing.fleet import ROOT, Fleet, assert_safe, process_state, terms, wait_until
from crown_sync.testing.servers import free_port

__all__ = ["ROOT", "Fleet", "wait_until", "terms", "assert_safe", "OracleKind", "Served", "KINDS",
           "with_query", "process_state", "FORK_SCRIPT"]


def with_query(url: str, options: Dict[str, Any]) -> str:
    """``url`` with ``options`` added to its query string."""
    if not options:
        return url
    return url + ("&" if "?" in url else "?") + urllib.parse.urlencode(options)


#: ``python FORK_SCRIPT URL NAME wait|linger``: a crown leads, then the process forks. The child
#: checks that its inherited crown is not leader and stops it. ``wait``: the parent reaps the child
#: and prints child-exit, parent-leads and still-leads lines. ``linger``: each prints its role and
#: pid and sleeps (a test kills them).
FORK_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import crown_sync
    url, name, mode = sys.argv[1:4]
    crown = crown_sync.Crown(name, oracle=url).start()
    assert crown.wait_for_leadership(30), crown.status().last_error
    pid = os.fork()
    if pid == 0:
        # Inherited crown: not ours. stop() must not release the parent's crown.
        ok = (not crown.is_leader()) and not crown_sync.is_leader(name)
        crown.stop()
        if mode == "linger":
            os.write(1, b"child %d\\n" % os.getpid())  # one write: the parent prints meanwhile
            time.sleep(60)
        os._exit(0 if ok else 3)
    if mode == "linger":
        os.write(1, b"parent %d\\n" % os.getpid())
        time.sleep(60)
    _, code = os.waitpid(pid, 0)
    print("child-exit", os.waitstatus_to_exitcode(code), flush=True)
    print("parent-leads", crown.is_leader(), flush=True)
    time.sleep(0.5)
    found = crown_sync.find_leader(name, oracle=url)
    print("still-leads", crown.is_leader(), found is not None and found.identity == crown.identity, flush=True)
    crown.stop()
    """
)


def _descendants(pid: int) -> List[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(child) for child in handle.read().split()]
        except OSError:
            pass
    return found + [grandchild for child in found for grandchild in _descendants(child)]


class OracleKind:
    """One oracle, as the contract suite sees it. Subclasses fill in the methods."""

    name = ""
    #: It starts a server process (tox's py39/py313 run only the kinds without one).
    server = True
    #: URL options for quick failovers in tests (short leases, short polls).
    fast: Dict[str, Any] = {}
    #: Fleet keyword arguments that suit this oracle (e.g. a shorter grace).
    fleet_options: Dict[str, Any] = {}
    #: Option values its constructor must refuse with a ValueError or TypeError naming the option.
    bad_options: Dict[str, Any] = {}
    #: Words of ``status().last_error`` when the credentials are wrong (kinds that have them).
    wrong_credentials_error = ""
    #: Contract tests this oracle fails today, by test function name -> the bug: they run as
    #: strict xfails (so a fix shows as XPASS, a failure: remove the entry then).
    known_bugs: Dict[str, str] = {}

    def start(self) -> Any:
        """Start a server (once per session); what it returns is handed to the other methods."""
        raise NotImplementedError

    def stop(self, server: Any) -> None:
        server.cleanup()

    def url(self, server: Any, **options) -> str:
        raise NotImplementedError

    def unreachable_url(self, server: Any, secret: str) -> str:
        """A URL of a server nobody answers, carrying ``secret`` as its password where the oracle
        takes one."""
        raise NotImplementedError

    def wrong_credentials_url(self, server: Any, secret: str) -> Optional[str]:
        """A URL of the running server with the wrong password ``secret``; None: no credentials."""
        return None

    def pid(self, server: Any) -> Optional[int]:
        return server.pid

    def has(self, capability: str) -> bool:
        if capability == "freeze":
            return self.server
        if capability == "credentials":
            return type(self).wrong_credentials_url is not OracleKind.wrong_credentials_url
        raise ValueError(f"unknown capability {capability!r}")

    def __repr__(self) -> str:
        return self.name


class Served:
    """A kind with its server running: what a contract test uses."""

    def __init__(self, kind: OracleKind, server: Any):
        self.kind = kind
        self.server = server

    @property
    def name(self) -> str:
        return self.kind.name

    def url(self, **options) -> str:
        """The server's URL with the kind's fast options (``options`` override them)."""
        return self.kind.url(self.server, **dict(self.kind.fast, **options))

    def unreachable_url(self, secret: str = "Unreach-pw-1") -> str:
        return self.kind.unreachable_url(self.server, secret)

    def wrong_credentials_url(self, secret: str) -> Optional[str]:
        return self.kind.wrong_credentials_url(self.server, secret)

    def fleet(self, directory, name: str, **options) -> Fleet:
        return Fleet(self.url(), directory, name, **dict(self.kind.fleet_options, **options))

    @contextlib.contextmanager
    def frozen(self):
        """SIGSTOP the server and its child processes (PostgreSQL's backends too) for the block:
        connected as far as its clients know, but no answers."""
        pid = self.kind.pid(self.server)
        pids = [pid] + _descendants(pid)
        for each in pids:
            os.kill(each, signal.SIGSTOP)
        try:
            wait_until(lambda: all(process_state(p) == "T" for p in pids), timeout=10,
                       message="the server stopped")
            yield pids
        finally:
            for each in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(each, signal.SIGCONT)


# ------------------------------------------------------------------------------------ kinds


class FileKind(OracleKind):
    name = "file"
    server = False
    bad_options = {"check_interval": 0}

    def start(self) -> str:
        directory = tempfile.mkdtemp(prefix="crown-sync-file-kind-")
        os.chmod(directory, 0o700)
        return directory

    def stop(self, server: str) -> None:
        shutil.rmtree(server, ignore_errors=True)

    def url(self, server: str, **options) -> str:
        return with_query(f"file://{server}", options)

    def unreachable_url(self, server: str, secret: str) -> str:
        # A directory below a regular file can never be made: the oracle's "server" is unusable.
        blocker = os.path.join(server, "a-file-not-a-directory")
        with open(blocker, "w") as handle:
            handle.write("x")
        return f"file://{blocker}/sub"

    def pid(self, server: str) -> Optional[int]:
        return None


class PostgresKind(OracleKind):
    name = "postgres"
    # lease 2 s -> margin 0.2 s, confirmations every 0.4 s
    fast = {"lease": 2, "wait_timeout": 1}
    bad_options = {"lease": 0}
    wrong_credentials_error = "password authentication failed"
    settled = 3.0  # a claim on a server younger than the longest lease here waits it out

    def start(self):
        from crown_sync.testing.postgres_server import PostgresServer

        server = PostgresServer(fsync=False)
        server.start()
        server.settle(self.settled)
        return server

    def url(self, server, **options) -> str:
        return server.url_for(**options)

    def unreachable_url(self, server, secret: str) -> str:
        return f"postgresql://app:{secret}@127.0.0.1:{free_port()}/app?connect_timeout=1&lease=2"

    def wrong_credentials_url(self, server, secret: str) -> Optional[str]:
        user = "crown_contract"
        if not server.sql("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,)):
            server.create_role(user, "Right-pw-" + os.urandom(4).hex())
        return server.url_for(user, secret, lease=2, connect_timeout=2)


class ZooKeeperKind(OracleKind):
    name = "zookeeper"
    fast = {"session_timeout": 3}  # the test server ticks every 200 ms
    fleet_options = {"grace": 1.0, "monitor_delay": 0.5}
    bad_options = {"session_timeout": 0.2}

    def start(self):
        from crown_sync.testing.zookeeper_server import ZooKeeperServer

        server = ZooKeeperServer()
        server.start()
        return server

    def url(self, server, **options) -> str:
        return with_query(server.url, options)

    def unreachable_url(self, server, secret: str) -> str:
        return f"zookeeper://app:{secret}@127.0.0.1:{free_port()}?session_timeout=2&connect_timeout=1"


class MemcachedKind(OracleKind):
    name = "memcached"
    # Renewals every 0.5 s, failover ~2.5 s; a whole second of margin keeps a busy machine's
    # scheduling delays from turning into journal overlaps.
    fast = {"ttl": 2.5, "margin": 1, "poll_interval": 0.05}
    bad_options = {"ttl": -1}

    def start(self):
        from crown_sync.testing.memcached_server import MemcachedServer

        server = MemcachedServer(memory_mb=16)
        server.start()
        return server

    def url(self, server, **options) -> str:
        return with_query(server.url, options)

    def unreachable_url(self, server, secret: str) -> str:
        return f"memcached://127.0.0.1:{free_port()}?ttl=2"


#: Every oracle the contract suite runs on. A new oracle: one entry (see the module docstring).
KINDS: List[OracleKind] = [FileKind(), PostgresKind(), ZooKeeperKind(), MemcachedKind()]


class NatsKind(OracleKind):
    name = "nats"
    # Renewals every 0.5 s, failover ~2.5 s; changes are pushed, so polls can be rare.
    fast = {"ttl": 2.5, "margin": 1, "poll_interval": 1}
    bad_options = {"ttl": -1}
    wrong_credentials_error = "authorization violation"

    def start(self):
        from crown_sync.testing.nats_server import NatsServer

        return NatsServer().start()

    def url(self, server, **options) -> str:
        return with_query(server.url, options)

    def unreachable_url(self, server, secret: str) -> str:
        return f"nats://crown:{secret}@127.0.0.1:{free_port()}?ttl=2&connect_timeout=0.5"

    def wrong_credentials_url(self, server, secret: str) -> Optional[str]:
        return server.url_for(password=secret, ttl=2)


KINDS.append(NatsKind())


class RedisKind(OracleKind):
    name = "redis"
    # Renewals every 0.5 s, failover ~2.5 s; releases are pushed over pub/sub, so polls can be rare.
    fast = {"ttl": 2.5, "margin": 1, "poll_interval": 1}
    bad_options = {"ttl": -1}
    wrong_credentials_error = "wrong user or password"

    def start(self):
        from crown_sync.testing.redis_server import RedisServer

        return RedisServer(user="crown").start()

    def url(self, server, **options) -> str:
        return server.url(**options)

    def unreachable_url(self, server, secret: str) -> str:
        return f"redis://crown:{secret}@127.0.0.1:{free_port()}/0?ttl=2&connect_timeout=0.5"

    def wrong_credentials_url(self, server, secret: str) -> Optional[str]:
        return server.url(password=secret, ttl=2)


KINDS.append(RedisKind())
