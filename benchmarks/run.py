"""One command for every benchmark: ``python benchmarks/run.py`` (or ``tox -e bench``).

It starts the servers itself (a throwaway PostgreSQL, ZooKeeper and memcached from the system's
binaries, and a directory for the file oracle), then:

1. **Head to head with the peers**, on the same server per oracle and in the same run: the
   per-oracle scripts ``benchmarks/bench_{postgres,zookeeper,memcached}.py`` (crown_sync vs a
   hand-written ``pg_try_advisory_lock`` poller; vs kazoo's ``Election`` and tooz; vs tooz), each
   run as a child process that starts its own server; their JSON (``benchmarks/results/<oracle>.json``)
   is read back and normalised here.
2. **crown_sync on every oracle with 3 and with 50 contender processes** (``python -m
   crown_sync.testing.contender``, a journaling thread child): graceful handoff (SIGTERM to the
   leader's process: stop the child, abdicate, exit) and crash failover (SIGKILL), measured from the
   signal to the first journal line of the next term; the journal is checked for overlaps. With
   each handoff the server's own request counter (below) is read at the signal and again 0.5 s
   after the next term was seen; less what the fleet sends at rest in as long, that is what one
   handoff costs the server (``--sizes 3,200``: whether it grows with the number of followers).
3. **Requests per second per contender at rest**, counted by the server during a quiet window
   with 3 contenders: PostgreSQL statements (``log_statement = all``: the server log's
   ``statement:`` and ``execute`` lines), ZooKeeper packets received (``srvr``; pings included), memcached commands (``stats``).
   The peers on ZooKeeper (kazoo ``Election``, tooz) are counted the same way through the ZooKeeper
   script's worker; the other peers' figures come from their scripts.
4. **``is_leader()`` cost**: ``timeit`` on a leading crown of each oracle, in nanoseconds per call.
5. **1,000 crowns in one process** (file oracle): resident memory and threads, for 1,000
   elections led by one process each (one loop thread per crown plus the shared warden), and for
   1,000 crowns of one election (999 followers, each also blocked in ``flock`` in a waiter thread).

Results are printed, saved to ``benchmarks/results/summary.json`` and rendered as
``benchmarks/results/summary.md`` (Markdown) and ``summary.rst`` (included by docs/benchmarks.rst);
``benchmarks/plot.py`` draws the failover distributions from the JSON. Nothing here is typed in:
every figure comes from the run.

Options: ``--quick`` (few samples, for trying it out), ``--skip-peers``, ``--reuse-peers`` (read
the scripts' last JSON instead of running them; the notes say so), ``--oracles file,postgres``,
``--sizes 3,50``, ``--graceful N``, ``--crash N``, ``--rest S``, ``--crowns N``. The summary JSON is
rewritten after every phase, with ``"complete": true`` only at the end.
"""

import argparse
import datetime
import json
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from crown_sync import clock  # noqa: E402  (the clock of the journal's and the deadlines' times)

ORACLES = ("file", "postgres", "zookeeper", "memcached")
ORACLES += ("redis",)
ORACLES += ("nats",)
PEER_SCRIPTS = {
    "postgres": "bench_postgres.py",
    "zookeeper": "bench_zookeeper.py",
    "memcached": "bench_memcached.py",
    "redis": "bench_redis.py",
    "nats": "bench_nats.py",
}
#: Smaller sample counts for --quick, by script (flags each script accepts).
QUICK_PEER_ARGS = {
    "postgres": ["--graceful", "3", "--crash", "3", "--rest", "5"],
    "zookeeper": ["--sizes", "3", "--graceful-samples", "3", "--crash-samples", "2"],
    "memcached": ["--graceful", "3", "--crash", "2", "--rest", "5"],
    "redis": ["--contenders", "3", "--graceful", "3", "--crash", "2", "--rest", "5"],
    "nats": ["--contenders", "3", "--graceful", "3", "--crash", "2", "--rest", "5"],
}
#: The oracle settings crown_sync runs with here: the same as in the per-oracle scripts.
SETTINGS = {
    "file": {},
    "postgres": {},  # PostgresOracle defaults: lease 10 s
    "zookeeper": {"session_timeout": 4},
    "memcached": {"ttl": 5},
    "redis": {"ttl": 5},
    "nats": {"ttl": 5},
}


_STATEMENT = re.compile(r" LOG:  (?:statement|execute [^:]*): ")


def log(text: str) -> None:
    print(text, flush=True)


# ------------------------------------------------------------------------------ statistics


def percentile(values: List[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in [0, 1])."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(seconds: List[float]) -> Optional[Dict[str, Any]]:
    if not seconds:
        return None
    ms = [s * 1000.0 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p95_ms": round(percentile(ms, 0.95), 2),
        "max_ms": round(max(ms), 2),
        "samples_ms": [round(v, 3) for v in ms],
    }


# ------------------------------------------------------------------------------ the machine


def _first_line(argv: List[str]) -> Optional[str]:
    try:
        out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
        text = out.stdout.decode(errors="replace").strip()
        return text.splitlines()[0] if text else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def machine() -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        with open("/proc/cpuinfo") as handle:
            match = re.search(r"^model name\s*:\s*(.+)$", handle.read(), re.M)
            info["cpu"] = match.group(1).strip() if match else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        with open("/proc/meminfo") as handle:
            match = re.search(r"^MemTotal:\s*(\d+) kB", handle.read(), re.M)
            info["memory_gb"] = round(int(match.group(1)) / 1024 / 1024, 1) if match else None
    except OSError:
        pass
    versions: Dict[str, Any] = {}
    try:
        from importlib import metadata

        for dist in ("crown_sync", "psycopg", "kazoo", "pymemcache", "tooz"):
            try:
                versions[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass
    except ImportError:
        pass
    try:
        from crown_sync.testing.postgres_server import postgres_bindir

        versions["postgresql"] = _first_line([os.path.join(postgres_bindir(), "postgres"), "--version"])
    except Exception:
        pass
    versions["memcached"] = _first_line(["memcached", "-V"])
    versions["redis-server"] = _first_line(["redis-server", "--version"])
    versions["nats-server"] = _first_line(["nats-server", "--version"])
    java = _first_line(["java", "-version"])
    versions["java"] = java
    try:
        from crown_sync.testing.zookeeper_server import zookeeper_classpath

        import glob

        jar = os.path.realpath(zookeeper_classpath().split(os.pathsep)[0])
        numbered = sorted(glob.glob(os.path.join(os.path.dirname(jar), "zookeeper-[0-9]*.jar")))
        match = re.search(r"zookeeper-([\d.]+)\.jar", os.path.basename(numbered[-1] if numbered else jar))
        versions["zookeeper"] = f"ZooKeeper {match.group(1)}" if match else os.path.basename(jar)
    except Exception:
        pass
    info["versions"] = {k: v for k, v in versions.items() if v}
    # --dirty: a run of uncommitted code must not be credited to the last commit.
    commit = _first_line(["git", "-C", ROOT, "describe", "--always", "--dirty", "--abbrev=7"])
    if commit and re.fullmatch(r"[0-9A-Za-z._-]{4,80}", commit):
        info["commit"] = commit
    return info


# ------------------------------------------------------------------------------ servers


class Servers:
    """The servers crown_sync's own measurements run on, started once for the whole run."""

    def __init__(self, oracles, workdir: str):
        self.oracles = oracles
        self.workdir = workdir
        self.postgres = self.zookeeper = self.memcached = None
        self.redis = None
        self.nats = None

    def __enter__(self):
        if "postgres" in self.oracles:
            from crown_sync.testing.postgres_server import PostgresServer

            # log_statement = all: the server itself counts the statements at rest.
            # 600 connections: 200 contender processes with a session each, and room for more.
            self.postgres = PostgresServer(settings={"log_statement": "all", "max_connections": "600"},
                                           fsync=True)
            self.postgres.start()
        if "zookeeper" in self.oracles:
            from crown_sync.testing.zookeeper_server import ZooKeeperServer

            self.zookeeper = ZooKeeperServer(heap="512m")
            self.zookeeper.start()
        if "memcached" in self.oracles:
            from crown_sync.testing.memcached_server import MemcachedServer

            self.memcached = MemcachedServer(memory_mb=64)
            self.memcached.start()
        if "redis" in self.oracles:
            from crown_sync.testing.redis_server import RedisServer

            self.redis = RedisServer(persistence="aof").start()
        if "nats" in self.oracles:
            from crown_sync.testing.nats_server import NatsServer

            self.nats = NatsServer().start()
        self.file_dir = os.path.join(self.workdir, "file-oracle")
        os.makedirs(self.file_dir, mode=0o700, exist_ok=True)
        return self

    def __exit__(self, *exc):
        for server in (self.postgres, self.zookeeper, self.memcached, self.nats):
            if server is not None:
                server.cleanup()
        if self.redis is not None:
            self.redis.cleanup()

    def url(self, oracle: str) -> str:
        options = "&".join(f"{k}={v}" for k, v in SETTINGS[oracle].items())
        if oracle == "file":
            base = f"file://{self.file_dir}"
        else:
            base = self.redis.url() if oracle == "redis" else getattr(self, oracle).url
        return base + (f"?{options}" if options else "")

    def requests(self, oracle: str) -> Optional[int]:
        """The server's running count of requests from clients (None: not countable)."""
        if oracle == "memcached":
            return self.memcached.request_count()
        if oracle == "redis":
            return self.redis.request_count()  # commands clients sent (MONITOR: not a script's own)
        if oracle == "nats":
            return self.nats.request_count()  # messages received (/varz in_msgs)
        if oracle == "zookeeper":
            from crown_sync.testing.zookeeper_server import four_letter_word

            reply = four_letter_word(self.zookeeper.port, "srvr", host=self.zookeeper.hosts.split(":")[0])
            match = re.search(r"^Received: (\d+)", reply, re.M)
            return int(match.group(1)) if match else None
        if oracle == "postgres":
            try:
                with open(self.postgres.logfile, "r", errors="replace") as handle:
                    # simple protocol: "statement: ..."; extended protocol: "execute <name>: ..."
                    return sum(1 for line in handle if _STATEMENT.search(line))
            except OSError:
                return None
        return None


# ------------------------------------------------------------------------------ contender fleets


class Fleet:
    """N ``python -m crown_sync.testing.contender`` processes on one election."""

    def __init__(self, url: str, name: str, workdir: str):
        from crown_sync_chaos.runner import EventTail, JournalTail

        self.url = url
        self.name = name
        self.workdir = workdir
        self.journal = os.path.join(workdir, f"{name}.journal")
        self.events_path = os.path.join(workdir, f"{name}.events")
        self.tail = JournalTail(self.journal)
        self.events = EventTail(self.events_path)
        self.procs: Dict[str, subprocess.Popen] = {}
        self.count = 0

    def spawn(self, how_many: int = 1) -> List[str]:
        identities = []
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for _ in range(how_many):
            self.count += 1
            identity = f"{self.name}-{self.count}"
            log_path = os.path.join(self.workdir, f"{identity}.log")
            with open(log_path, "ab") as handle:
                self.procs[identity] = subprocess.Popen(
                    [sys.executable, "-m", "crown_sync.testing.contender", "--name", self.name,
                     "--oracle", self.url, "--journal", self.journal, "--child", "thread",
                     "--interval", "0.005", "--identity", identity, "--events", self.events_path,
                     "--monitor-delay", "1"],
                    cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            identities.append(identity)
        return identities

    def wait_ready(self, identities: List[str], timeout: float = 180.0) -> None:
        deadline = clock.monotonic() + timeout
        while True:
            self.events.poll()
            if all(i in self.events.ready for i in identities):
                return
            if clock.monotonic() > deadline:
                late = [i for i in identities if i not in self.events.ready]
                raise TimeoutError(f"contenders not contending after {timeout}s: {late[:5]}")
            time.sleep(0.05)

    def leader(self, timeout: float = 120.0, after: Optional[float] = None, exclude: Optional[str] = None):
        deadline = clock.monotonic() + timeout
        while True:
            self.tail.poll()
            term = self.tail.leader()
            if term is not None and (after is None or term["start"] > after) and term["identity"] != exclude:
                return term
            if clock.monotonic() > deadline:
                raise TimeoutError(f"no leader of {self.name} after {timeout}s")
            time.sleep(0.005)

    def stop(self) -> None:
        for process in self.procs.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.procs.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.procs.clear()

    def check(self) -> Dict[str, Any]:
        from crown_sync.testing import journal

        report = journal.check(self.journal)
        return {"terms": len(report.terms), "overlaps": len(report.overlaps),
                "token_violations": len(report.token_violations)}


def fleet_benchmark(servers: Servers, oracle: str, size: int, graceful: int, crash: int, rest: float,
                    workdir: str) -> Dict[str, Any]:
    """Handoffs, failovers and (for 3) requests at rest, with ``size`` contender processes."""
    name = f"bench-{oracle}-{size}-{int(time.time() * 1000) % 100000}"
    fleet = Fleet(servers.url(oracle), name, workdir)
    result: Dict[str, Any] = {"oracle": oracle, "system": "crown_sync", "contenders": size,
                              "url": servers.url(oracle).split("?")[0].split("://")[0] + "://...",
                              "settings": SETTINGS[oracle]}
    try:
        started = clock.monotonic()
        fleet.wait_ready(fleet.spawn(size))
        fleet.leader()
        result["startup_s"] = round(clock.monotonic() - started, 2)
        rest_rate = None
        if rest:
            time.sleep(2.0)
            window = rest if size == 3 else min(rest, 5.0)
            before = servers.requests(oracle)
            if before is not None:
                time.sleep(window)
                rest_rate = (servers.requests(oracle) - before) / window
                if size == 3:
                    result["requests_per_s_per_contender"] = round(rest_rate / size, 3)
                    result["requests_window_s"] = rest
        handoffs, gaps, crashes = [], [], []
        extra: Dict[str, List[float]] = {"graceful": [], "crash": []}
        for scenario, samples in (("graceful", graceful), ("crash", crash)):
            for _ in range(samples):
                term = fleet.leader()
                time.sleep(0.3)  # followers at rest
                process = fleet.procs[term["identity"]]
                counted = servers.requests(oracle)
                t0 = clock.monotonic()
                process.send_signal(signal.SIGTERM if scenario == "graceful" else signal.SIGKILL)
                new = fleet.leader(timeout=120, after=t0, exclude=term["identity"])
                if counted is not None and rest_rate is not None:
                    extra[scenario].append(handoff_requests(servers, oracle, counted, t0, rest_rate))
                process.wait(60)
                fleet.tail.poll()
                old = fleet.tail.terms.get((term["identity"], term["token"], term["pid"]), term)
                if scenario == "graceful":
                    handoffs.append(new["start"] - t0)
                    gaps.append(new["start"] - old["last"])
                else:
                    crashes.append(new["start"] - t0)
                fleet.wait_ready(fleet.spawn(1))  # keep `size` contenders
        result["graceful_signal"] = summarise(handoffs)
        result["graceful_gap"] = summarise(gaps)
        result["crash"] = summarise(crashes)
        if rest_rate is not None:
            result["requests_per_s_at_rest"] = round(rest_rate, 1)
            for scenario, counts in extra.items():
                if counts:
                    result[f"requests_per_{scenario}"] = round(statistics.median(counts), 1)
    finally:
        fleet.stop()
    result["journal"] = fleet.check()
    return result


HANDOFF_SETTLE = 0.5  #: seconds after the new term's start during which a handoff's requests count


def handoff_requests(servers: Servers, oracle: str, counted: int, t0: float, rest_rate: float) -> float:
    """Requests the server received from ``t0`` (the signal) until HANDOFF_SETTLE after the new
    term was seen, minus what the contenders send at rest in as long: what one handoff costs the
    server, whatever the number of followers it woke (the leader's release, the followers'
    reactions, the new leader's claim and first renewal)."""
    time.sleep(HANDOFF_SETTLE)
    elapsed = clock.monotonic() - t0
    return max(0.0, servers.requests(oracle) - counted - rest_rate * elapsed)


# ------------------------------------------------------------------------------ peers at rest (ZooKeeper)


def zookeeper_peers_at_rest(servers: Servers, rest: float, workdir: str) -> List[Dict[str, Any]]:
    """kazoo Election and tooz on ZooKeeper, 3 contenders in a worker of bench_zookeeper.py:
    packets received by the server per second per contender."""
    rows = []
    script = os.path.join(HERE, PEER_SCRIPTS["zookeeper"])
    for system in ("kazoo", "tooz"):
        events = os.path.join(workdir, f"rest-{system}.events")
        process = subprocess.Popen(
            [sys.executable, script, "worker", "--system", system, "--hosts", servers.zookeeper.hosts,
             "--name", f"rest-{system}", "--count", "3", "--session-timeout",
             str(SETTINGS["zookeeper"]["session_timeout"]), "--events", events, "--label", "rest"],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            deadline = clock.monotonic() + 120
            while not (os.path.exists(events) and '"ready"' in open(events).read()):
                if process.poll() is not None or clock.monotonic() > deadline:
                    raise RuntimeError(f"{system} worker did not start: "
                                       f"{process.stderr.read().decode(errors='replace')[-500:]}")
                time.sleep(0.1)
            time.sleep(2.0)
            before = servers.requests("zookeeper")
            time.sleep(rest)
            after = servers.requests("zookeeper")
            rows.append({"oracle": "zookeeper", "system": system, "contenders": 3,
                         "requests_per_s_per_contender": round((after - before) / rest / 3, 3),
                         "requests_window_s": rest, "source": "run.py via bench_zookeeper.py worker"})
        except Exception as exc:  # a peer's failure is reported, not fatal
            rows.append({"oracle": "zookeeper", "system": system, "contenders": 3, "error": str(exc)[:300]})
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return rows


# ------------------------------------------------------------------------------ is_leader() cost


def is_leader_cost(servers: Servers, oracle: str) -> Dict[str, Any]:
    import timeit

    import crown_sync

    name = f"bench-is-leader-{oracle}"
    crown = crown_sync.Crown(name, oracle=servers.url(oracle), monitor_delay=1.0).start()
    try:
        if not crown.wait_for_leadership(120):
            raise RuntimeError(f"{oracle}: no leadership for the is_leader() benchmark")
        number = 200000
        method = min(timeit.repeat(crown.is_leader, number=number, repeat=5)) / number
        by_name = min(timeit.repeat(lambda: crown_sync.is_leader(name), number=number, repeat=5)) / number
        status = min(timeit.repeat(crown.status, number=20000, repeat=3)) / 20000
        return {"oracle": oracle, "is_leader_ns": round(method * 1e9, 1),
                "crown_sync_is_leader_name_ns": round(by_name * 1e9, 1),
                "status_ns": round(status * 1e9, 1), "leading": crown.is_leader()}
    finally:
        crown.stop()


def peers_is_leader_cost(servers: Servers, oracles: List[str]) -> List[Dict[str, Any]]:
    """What "do I lead?" costs with the peers, asked the way their users ask it, on our servers.

    kazoo's ``Election`` has no such question; users of its ``Lock`` read ``is_acquired`` (an
    attribute: cheap, and still True after the session is lost). tooz answers with
    ``get_leader(group).get()``, a round trip to the server each time.
    """
    import timeit
    import uuid

    rows: List[Dict[str, Any]] = []
    if "zookeeper" in oracles:
        try:
            from kazoo.client import KazooClient

            client = KazooClient(hosts=servers.zookeeper.hosts, timeout=10)
            client.start(timeout=30)
            try:
                lock = client.Lock(f"/bench-is-leader/{uuid.uuid4().hex[:8]}")
                lock.acquire(timeout=30)
                number = 200000
                cost = min(timeit.repeat(lambda: lock.is_acquired, number=number, repeat=5)) / number
                rows.append({"oracle": "zookeeper", "system": "kazoo", "call": "Lock.is_acquired",
                             "ns": round(cost * 1e9, 1), "io": False,
                             "note": "an attribute: stays True after the session is lost"})
                lock.release()
            finally:
                client.stop()
                client.close()
        except Exception as exc:
            rows.append({"oracle": "zookeeper", "system": "kazoo", "error": str(exc)[:200]})
    for oracle, url in (("zookeeper", lambda: f"zookeeper://{servers.zookeeper.hosts}?timeout=10"),
                        ("memcached", lambda: servers.memcached.url)):
        if oracle not in oracles:
            continue
        try:
            from tooz import coordination

            group = f"bench-is-leader-{uuid.uuid4().hex[:8]}".encode()
            coordinator = coordination.get_coordinator(url(), b"bench-member")
            coordinator.start()
            try:
                try:
                    coordinator.create_group(group).get()
                except coordination.GroupAlreadyExist:
                    pass
                elected = []
                coordinator.watch_elected_as_leader(group, lambda event: elected.append(event))
                give_up = clock.monotonic() + 60
                while not elected and clock.monotonic() < give_up:
                    coordinator.run_watchers()
                    time.sleep(0.05)
                number = 500
                cost = min(timeit.repeat(lambda: coordinator.get_leader(group).get(), number=number,
                                         repeat=3)) / number
                rows.append({"oracle": oracle, "system": "tooz", "call": "get_leader(group).get()",
                             "ns": round(cost * 1e9, 1), "io": True,
                             "note": "a round trip to the server" + ("" if elected else "; NOT elected")})
            finally:
                coordinator.stop()
        except Exception as exc:
            rows.append({"oracle": oracle, "system": "tooz", "error": str(exc)[:200]})
    return rows


# ------------------------------------------------------------------------------ 1,000 crowns


def _proc_status() -> Dict[str, int]:
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "Threads"):
                values[key] = int(rest.split()[0])
    values["fds"] = len(os.listdir("/proc/self/fd"))
    return values


#: How long the 1,000-crown probe waits for the crowns to settle, and again to stop (s).
SETTLE_LIMIT = 180.0


def crowns_probe(count: int, mode: str, directory: str) -> Dict[str, Any]:
    """Run in a fresh process: ``count`` crowns on the file oracle; print what they cost."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import crown_sync
    from crown_sync.oracles.file import FileOracle

    oracle = FileOracle(directory)
    before = _proc_status()
    started = clock.monotonic()
    crowns = []
    for i in range(count):
        name = f"crown-{i}" if mode == "distinct" else "one-election"
        crowns.append(crown_sync.Crown(name, oracle=oracle, identity=f"probe-{i}", monitor_delay=5.0).start())
    deadline = clock.monotonic() + SETTLE_LIMIT
    if mode == "distinct":
        while sum(c.is_leader() for c in crowns) < count and clock.monotonic() < deadline:
            time.sleep(0.05)
    else:
        while (sum(c.phase in ("leading", "following") for c in crowns) < count
               and clock.monotonic() < deadline):
            time.sleep(0.05)
    settled = clock.monotonic() - started
    time.sleep(2.0)
    after = _proc_status()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    window_start = clock.monotonic()
    time.sleep(5.0)
    usage_end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage_end.ru_utime + usage_end.ru_stime - usage.ru_utime - usage.ru_stime) / (clock.monotonic() - window_start)
    leaders = sum(c.is_leader() for c in crowns)
    names = {t.name.split(":")[0] for t in threading.enumerate()}
    stop_started = clock.monotonic()
    for crown in crowns:
        crown.stop(timeout=0)  # every crown starts stopping at once
    give_up = stop_started + SETTLE_LIMIT
    for crown in crowns:
        crown.stop(timeout=max(0.0, give_up - clock.monotonic()))
    stopped = sum(1 for c in crowns if c.phase == "stopped")
    stop_s = clock.monotonic() - stop_started
    return {
        "mode": mode, "crowns": count, "leaders": leaders,
        "rss_before_mb": round(before["VmRSS"] / 1024, 1), "rss_after_mb": round(after["VmRSS"] / 1024, 1),
        "rss_per_crown_kb": round((after["VmRSS"] - before["VmRSS"]) / count, 1),
        "threads_before": before["Threads"], "threads_after": after["Threads"],
        "fds_after": after["fds"], "thread_kinds": sorted(names),
        "settle_s": round(settled, 2), "settle_limit_s": SETTLE_LIMIT,
        "stopped": stopped, "stop_s": round(stop_s, 2),
        "cpu_percent_at_rest": round(cpu * 100, 1),
    }


def thousand_crowns(count: int, workdir: str) -> List[Dict[str, Any]]:
    rows = []
    for mode in ("distinct", "same"):
        directory = os.path.join(workdir, f"crowns-{mode}")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        try:
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--crowns-probe", str(count), "--probe-mode", mode,
                 "--probe-dir", directory],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=4 * SETTLE_LIMIT + 120,
            )
        except subprocess.TimeoutExpired:
            rows.append({"mode": mode, "crowns": count, "error": f"the probe did not finish in "
                                                                 f"{4 * SETTLE_LIMIT + 120:.0f} s"})
            continue
        if out.returncode != 0:
            lines = out.stderr.decode(errors="replace").strip().splitlines() or ["(no output)"]
            rows.append({"mode": mode, "crowns": count, "error": lines[-1][-300:]})
            log(f"  {count} crowns ({mode}) FAILED:\n" + "\n".join(lines[-20:]))
            continue
        rows.append(json.loads(out.stdout.decode().strip().splitlines()[-1]))
        log(f"  {count} crowns ({mode}): {rows[-1]}")
    return rows


# ------------------------------------------------------------------------------ the peers' scripts


def run_peer_script(oracle: str, quick: bool) -> Dict[str, Any]:
    script = os.path.join(HERE, PEER_SCRIPTS[oracle])
    output = os.path.join(RESULTS, f"{oracle}.json")
    if not os.path.exists(script):
        return {"oracle": oracle, "error": f"{PEER_SCRIPTS[oracle]} does not exist"}
    attempts = [QUICK_PEER_ARGS[oracle], []] if quick else [[]]
    for extra in attempts:
        started = time.time()
        log(f"== {PEER_SCRIPTS[oracle]} {' '.join(extra)}")
        run = subprocess.run([sys.executable, script] + extra, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, timeout=7200)
        text = run.stdout.decode(errors="replace")
        for line in text.splitlines()[-25:]:
            log("   " + line)
        if run.returncode == 2 and "usage:" in text and extra:
            continue  # the script does not take these flags: run it with its defaults
        if run.returncode != 0:
            return {"oracle": oracle, "error": f"exit {run.returncode}: {text[-800:]}"}
        if not os.path.exists(output) or os.path.getmtime(output) < started - 1:
            return {"oracle": oracle, "error": f"{output} was not written"}
        with open(output) as handle:
            return {"oracle": oracle, "raw": json.load(handle), "file": os.path.relpath(output, ROOT)}
    return {"oracle": oracle, "error": "could not run"}


def read_peer_results(oracle: str) -> Dict[str, Any]:
    """The last results of a per-oracle script (``--reuse-peers``), as run_peer_script returns."""
    output = os.path.join(RESULTS, f"{oracle}.json")
    if not os.path.exists(output):
        return {"oracle": oracle, "error": f"{output} does not exist"}
    with open(output) as handle:
        return {"oracle": oracle, "raw": json.load(handle), "file": os.path.relpath(output, ROOT)}


def _stat(block: Any) -> Optional[Dict[str, Any]]:
    if isinstance(block, dict) and block.get("p50_ms") is not None and block.get("p95_ms") is not None:
        return {k: block[k] for k in ("n", "p50_ms", "p95_ms", "samples_ms") if k in block}
    return None


def normalise_peer(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Rows {oracle, system, contenders, graceful_gap, graceful_signal, crash, requests} from a
    per-oracle script's JSON, whatever its layout (the scripts differ)."""
    oracle, raw = result["oracle"], result.get("raw")
    rows = []
    if not raw:
        return rows
    source = result.get("file")
    if isinstance(raw.get("systems"), dict):
        contenders = (raw.get("params") or {}).get("contenders", 3)
        for system, data in raw["systems"].items():
            row = {"oracle": oracle, "system": system, "contenders": contenders, "source": source}
            if oracle == "postgres":
                row["graceful_gap"] = _stat(data.get("graceful"))
            else:
                row["graceful_gap"] = _stat(data.get("graceful_gap")) or _stat(data.get("graceful"))
            row["graceful_signal"] = _stat(data.get("graceful_from_signal"))
            row["crash"] = _stat(data.get("crash_failover")) or _stat(data.get("crash"))
            seen = []
            for key, label in (("journal", "handoffs"), ("handoff_journal", "handoffs"), ("sigstop", "SIGSTOP"),
                               ("terminate_overlaps", "pg_terminate_backend")):
                value = data.get(key)
                count = value.get("overlaps") if isinstance(value, dict) else value
                if isinstance(count, int) and not isinstance(count, bool):
                    seen.append((count, label))
            if seen:
                total = sum(c for c, _ in seen)
                row["overlaps"] = total
                row["overlaps_text"] = str(total) + (
                    " (" + ", ".join(f"{c} {l}" for c, l in seen if c) + ")" if total else "")
            rest = data.get("requests_per_s") or data.get("at_rest") or {}
            for key in ("per_contender_of_3", "per_contender_per_s"):
                if key in rest:
                    row["requests_per_s_per_contender"] = rest[key]
            rows.append(row)
    elif isinstance(raw.get("results"), list):
        grouped: Dict[tuple, Dict[str, Any]] = {}
        for item in raw["results"]:
            key = (item.get("system"), item.get("contenders"))
            row = grouped.setdefault(key, {"oracle": oracle, "system": key[0], "contenders": key[1],
                                           "source": source})
            if item.get("scenario") == "graceful":
                row["graceful_signal"] = _stat(item)
            elif item.get("scenario") == "crash":
                row["crash"] = _stat(item)
        rows.extend(grouped.values())
    return rows


# ------------------------------------------------------------------------------ tables


def _cell(stat: Optional[Dict[str, Any]]) -> str:
    if not stat:
        return "–"
    return f"{_fmt(stat['p50_ms'])} / {_fmt(stat['p95_ms'])} (n={stat.get('n', '?')})"


def _fmt(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 10:
        return f"{ms:.0f} ms"
    return f"{ms:.1f} ms"


def tables(summary: Dict[str, Any]) -> Dict[str, List[List[str]]]:
    out: Dict[str, List[List[str]]] = {}
    header = ["oracle", "system", "contenders", "graceful handoff p50 / p95 (signal → new term)",
              "leaderless gap at handoff p50 / p95", "crash failover p50 / p95",
              "requests/s per contender at rest", "server requests per handoff / per failover",
              "overlapping terms in its journal", "source"]
    rows = [header]
    for row in summary["failover"]:
        rest = row.get("requests_per_s_per_contender")
        per = [row.get("requests_per_graceful"), row.get("requests_per_crash")]
        per_text = "–" if per == [None, None] else " / ".join("–" if v is None else f"{v:g}" for v in per)
        if row.get("journal") and "overlaps_text" not in row:
            overlaps = str(row["journal"]["overlaps"])
        else:
            overlaps = row.get("overlaps_text", "–")
        rows.append([row["oracle"], row["system"], str(row.get("contenders", "")),
                     _cell(row.get("graceful_signal")), _cell(row.get("graceful_gap")), _cell(row.get("crash")),
                     "–" if rest is None else f"{rest:g}", per_text, overlaps, row.get("source", "")])
    out["failover"] = rows
    rows = [["oracle", "is_leader() ns/call", "crown_sync.is_leader(name) ns/call", "status() ns/call"]]
    for row in summary["is_leader"]:
        if "error" in row:
            rows.append([row["oracle"], "error", row["error"][:80], ""])
        else:
            rows.append([row["oracle"], f"{row['is_leader_ns']:.0f}", f"{row['crown_sync_is_leader_name_ns']:.0f}",
                         f"{row['status_ns']:.0f}"])
    out["is_leader"] = rows
    rows = [["oracle", "system", "call", "ns/call", "does I/O", "note"]]
    for row in summary.get("peer_is_leader", []):
        if "error" in row:
            rows.append([row["oracle"], row["system"], "error", row["error"][:80], "", ""])
        else:
            rows.append([row["oracle"], row["system"], row["call"], f"{row['ns']:.0f}",
                         "yes" if row["io"] else "no", row["note"]])
    if len(rows) > 1:
        out["peer_is_leader"] = rows
    rows = [["crowns in one process", "leaders", "RSS before → after (MB)", "RSS per crown (kB)",
             "threads", "open fds", "CPU at rest (% of a core)", "all settled in (s)"]]
    for row in summary["thousand_crowns"]:
        if "error" in row:
            rows.append([f"{row['crowns']} ({row['mode']})", "error", row["error"][:80], "", "", "", "", ""])
            continue
        what = "distinct elections" if row["mode"] == "distinct" else "one election"
        settle = f"{row['settle_s']}"
        if row.get("settle_limit_s") and row["settle_s"] >= row["settle_limit_s"]:
            settle = f"not within {row['settle_limit_s']:.0f}"
        rows.append([f"{row['crowns']}, {what}", str(row["leaders"]),
                     f"{row['rss_before_mb']} → {row['rss_after_mb']}", f"{row['rss_per_crown_kb']}",
                     f"{row['threads_before']} → {row['threads_after']}", str(row["fds_after"]),
                     f"{row.get('cpu_percent_at_rest', '–')}", settle])
    out["thousand_crowns"] = rows
    return out


def markdown(summary: Dict[str, Any]) -> str:
    parts = [f"Benchmarks run {summary['date']} on {describe_machine(summary['machine'])}.", ""]
    titles = {"failover": "Handoff, failover and requests at rest",
              "is_leader": "is_leader() cost", "peer_is_leader": "The peers' \"do I lead?\"",
              "thousand_crowns": "1,000 crowns in one process (file oracle)"}
    for key, rows in tables(summary).items():
        parts += [f"### {titles[key]}", ""]
        parts.append("| " + " | ".join(rows[0]) + " |")
        parts.append("|" + "|".join("---" for _ in rows[0]) + "|")
        parts += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        parts.append("")
    parts += notes(summary)
    return "\n".join(parts) + "\n"


def rst(summary: Dict[str, Any]) -> str:
    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace("*", "\\*").replace("|", "\\|").replace("`", "\\`")

    parts = [f"Run {summary['date']} on {escape(describe_machine(summary['machine']))}.", ""]
    titles = {"failover": "Handoff, failover and requests at rest",
              "is_leader": "``is_leader()`` cost", "peer_is_leader": "The peers' \"do I lead?\"",
              "thousand_crowns": "1,000 crowns in one process (file oracle)"}
    for key, rows in tables(summary).items():
        parts += [f".. list-table:: {titles[key]}", "   :header-rows: 1", ""]
        for row in rows:
            parts.append("   * - " + (escape(row[0]) or " "))
            for cell in row[1:]:
                parts.append("     - " + (escape(cell) or " "))
        parts.append("")
    parts += [escape(line) if not line.startswith("* ") else "* " + escape(line[2:]) for line in notes(summary)]
    return "\n".join(parts) + "\n"


def describe_machine(info: Dict[str, Any]) -> str:
    versions = info.get("versions", {})
    pieces = [f"{info.get('cpu', '?')}, {info.get('cpus', '?')} CPUs, {info.get('memory_gb', '?')} GB RAM",
              info.get("platform", ""), f"Python {info.get('python', '?')}"]
    for key in ("postgresql", "zookeeper", "memcached"):
        if versions.get(key):
            pieces.append(str(versions[key]))
    if info.get("commit"):
        pieces.append(f"commit {info['commit']}")
    pieces.append(f"load average at start {info.get('loadavg_at_start')}")
    return "; ".join(p for p in pieces if p)


def peer_comparison(summary: Dict[str, Any]) -> List[str]:
    """Say, from the numbers, where a peer's median beats crown_sync's measured the same way
    (same script, same server, same contender count)."""
    lines = []
    for oracle in summary["oracles"]:
        rows = [r for r in summary["failover"] if r["oracle"] == oracle and "error" not in r]
        ours = [r for r in rows if r["system"] == "crown_sync (script)"]
        fleet = next((r for r in rows if r["system"] == "crown_sync" and r.get("contenders") == 3), None)
        peers = [r for r in rows if not r["system"].startswith("crown_sync")]
        for peer in peers:
            mine = next((r for r in ours if r.get("contenders") == peer.get("contenders")), None) or {}
            for metric, label in (("graceful_signal", "graceful handoff"), ("graceful_gap", "handoff gap"),
                                  ("crash", "crash failover")):
                a, b = mine.get(metric), peer.get(metric)
                if a and b and b["p50_ms"] < a["p50_ms"] and _fmt(b["p50_ms"]) != _fmt(a["p50_ms"]):
                    lines.append(f"* {oracle}: {peer['system']} is faster than crown_sync at {label} with "
                                 f"{peer.get('contenders')} contenders (p50 {_fmt(b['p50_ms'])} vs "
                                 f"{_fmt(a['p50_ms'])}).")
            a = mine.get("requests_per_s_per_contender")
            if a is None and fleet is not None and peer.get("contenders") == 3:
                a = fleet.get("requests_per_s_per_contender")
            b = peer.get("requests_per_s_per_contender")
            if a is not None and b is not None and b < a:
                lines.append(f"* {oracle}: {peer['system']} sends fewer requests at rest than crown_sync "
                             f"({b:g}/s vs {a:g}/s per contender).")
    for row in summary["failover"]:
        if not row["system"].startswith("crown_sync") and row.get("overlaps"):
            lines.append(f"* {row['oracle']}: {row['system']}'s journal shows overlapping terms: "
                         f"{row['overlaps_text']}.")
    return lines or ["* In this run no peer had a lower median than crown_sync measured the same way."]


#: The issues' targets, per oracle: (metric, bound in ms or requests/s, what it says). Bounds that
#: depend on a setting are computed from SETTINGS, so they follow the settings of the run.
TARGETS = {
    "file": [("crash", 100.0, "crash failover p50 in tens of ms")],
    "postgres": [("graceful_signal", 5.0, "graceful handoff p50 <= 5 ms"),
                 ("crash", 20.0, "crash failover p50 <= 20 ms"),
                 ("requests_per_s_per_contender", 1.0, "<= 1 query/s per contender at rest")],
    "zookeeper": [("graceful_signal", 5.0, "graceful handoff p50 <= 5 ms"),
                  ("crash", SETTINGS["zookeeper"]["session_timeout"] * 1000 + 50.0,
                   "crash failover p50 <= session timeout + 50 ms")],
    "memcached": [("graceful_signal", 100.0, "graceful handoff p50 <= 100 ms"),
                  ("crash", SETTINGS["memcached"]["ttl"] * 1000 + 250.0, "crash failover p50 <= ttl + 250 ms"),
                  ("requests_per_s_per_contender", 5.0, "<= 5 requests/s per contender at rest")],
    # <= 1 request/s per contender at rest is a target of the defaults (ttl 10), not of ttl 5 here.
    "redis": [("graceful_signal", 5.0, "graceful handoff p50 <= 5 ms"),
              ("crash", SETTINGS["redis"]["ttl"] * 1000 + 250.0, "crash failover p50 <= ttl + 250 ms")],
    "nats": [("graceful_signal", 5.0, "graceful handoff p50 <= 5 ms"),
             ("crash", SETTINGS["nats"]["ttl"] * 1000 + 250.0, "crash failover p50 <= ttl + 250 ms")],
}


def target_lines(summary: Dict[str, Any]) -> List[str]:
    """Each target against crown_sync's fleet of 3, met or MISSED: as run.py measures it (signal
    to the next term's first journal line) and, where the oracle's script measured it too, as the
    script measures the peers (its own server, its own method)."""
    lines = []
    for oracle in summary["oracles"]:
        rows = [r for r in summary["failover"] if r["oracle"] == oracle and r.get("contenders") == 3
                and "error" not in r]
        sources = [("run.py", next((r for r in rows if r["system"] == "crown_sync"), None)),
                   ("script", next((r for r in rows if r["system"] == "crown_sync (script)"), None))]
        for metric, bound, label in TARGETS.get(oracle, []):
            verdicts = []
            for source, row in sources:
                value = None if row is None else row.get(metric)
                if metric == "graceful_signal" and value is None and row is not None:
                    value = row.get("graceful_gap")  # a script that measures the handoff gap only
                if isinstance(value, dict):
                    measured, shown = value["p50_ms"], _fmt(value["p50_ms"])
                elif value is not None:
                    measured, shown = value, f"{value:g}/s"
                else:
                    continue
                verdicts.append(f"{source}: {'met' if measured <= bound else 'MISSED'} ({shown})")
            lines.append(f"* Target {oracle}: {label}: " + ("; ".join(verdicts) or "not measured in this run") + ".")
    return lines


def notes(summary: Dict[str, Any]) -> List[str]:
    lines = ["Notes:", ""]
    lines.append("* crown_sync settings: " + "; ".join(
        f"{o}: " + (", ".join(f"{k}={v}" for k, v in SETTINGS[o].items()) or "defaults")
        for o in summary["oracles"]) + ". Peers' settings: see their scripts' JSON.")
    lines.append("* Rows with source run.py: contender processes (python -m crown_sync.testing.contender, "
                 "thread child journaling every 5 ms); times from the signal (SIGTERM: graceful; SIGKILL: "
                 "crash) to the next term's first journal line.")
    bad = [r for r in summary["failover"] if r.get("journal") and r["journal"]["overlaps"]]
    lines.append("* Journal check of every run.py fleet: " + (
        "0 overlapping terms." if not bad else f"OVERLAPS in {[(r['oracle'], r['contenders']) for r in bad]}."))
    for oracle, run in sorted(summary.get("peer_runs", {}).items()):
        lines.append(f"* {oracle} script results: {run['file']}, dated {run['date']} ({run['how']}).")
    lines += peer_comparison(summary)
    lines += target_lines(summary)
    for error in summary.get("errors", []):
        lines.append(f"* Not measured: {error}")
    return lines


# ------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--oracles", default=",".join(ORACLES))
    parser.add_argument("--sizes", default="3,50", help="contender counts for the fleet failovers")
    parser.add_argument("--graceful", type=int, default=20, help="graceful handoffs per fleet")
    parser.add_argument("--crash", type=int, default=5, help="crash failovers per fleet")
    parser.add_argument("--rest", type=float, default=20.0, help="quiet window for request counts (s)")
    parser.add_argument("--crowns", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="few samples everywhere (a trial run)")
    parser.add_argument("--skip-peers", action="store_true", help="don't run the per-oracle scripts")
    parser.add_argument("--reuse-peers", action="store_true",
                        help="read the per-oracle scripts' last results instead of running them")
    parser.add_argument("--output", default=os.path.join(RESULTS, "summary.json"))
    parser.add_argument("--setting", action="append", default=[], metavar="ORACLE.OPTION=VALUE",
                        help="an oracle URL option added to SETTINGS, e.g. postgres.sessions=shared")
    parser.add_argument("--crowns-probe", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--probe-mode", default="distinct", help=argparse.SUPPRESS)
    parser.add_argument("--probe-dir", help=argparse.SUPPRESS)
    parser.add_argument("--render", action="store_true",
                        help="only write summary.md and summary.rst again from the summary JSON")
    args = parser.parse_args(argv)
    if args.render:
        with open(args.output) as handle:
            summary = json.load(handle)
        write_tables(summary, args.output)
        return 0
    if args.crowns_probe:
        print(json.dumps(crowns_probe(args.crowns_probe, args.probe_mode, args.probe_dir)), flush=True)
        os._exit(0)  # crowns that did not stop in time must not hold the exit up
    if args.quick:
        args.graceful, args.crash, args.rest = min(args.graceful, 3), min(args.crash, 2), min(args.rest, 5.0)
    for setting in args.setting:  # e.g. postgres.sessions=shared: measure an oracle's other mode
        target, _, value = setting.partition("=")
        oracle_name, _, option = target.partition(".")
        SETTINGS[oracle_name][option] = value

    oracles = [o for o in args.oracles.split(",") if o]
    unknown = set(oracles) - set(ORACLES)
    if unknown:
        parser.error(f"unknown oracles {sorted(unknown)}; choose from {', '.join(ORACLES)}")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    for directory in (RESULTS, os.path.dirname(os.path.abspath(args.output))):
        os.makedirs(directory, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="crown-sync-bench-")
    summary: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "oracles": oracles,
        "options": {"sizes": sizes, "graceful": args.graceful, "crash": args.crash, "rest_s": args.rest,
                    "crowns": args.crowns, "quick": args.quick},
        "failover": [], "peers": [], "is_leader": [], "thousand_crowns": [], "errors": [],
    }
    log(f"machine: {describe_machine(summary['machine'])}")
    started = clock.monotonic()

    def save(final: bool = False) -> None:
        """Write what we have (after every phase: a late failure loses nothing)."""
        summary["complete"] = final
        summary["duration_s"] = round(clock.monotonic() - started, 1)
        with open(args.output, "w") as handle:
            json.dump(summary, handle, indent=2)
            handle.write("\n")

    # 1. The peers, head to head (each script starts its own server).
    if not args.skip_peers:
        for oracle in oracles:
            if oracle in PEER_SCRIPTS:
                result = read_peer_results(oracle) if args.reuse_peers else run_peer_script(oracle, args.quick)
                if "error" in result:
                    summary["errors"].append(f"{PEER_SCRIPTS[oracle]}: {result['error'][:300]}")
                summary["peers"].extend(normalise_peer(result))
                if result.get("raw"):
                    summary.setdefault("peer_runs", {})[oracle] = {
                        "file": result.get("file"), "date": result["raw"].get("date"),
                        "how": "reused from an earlier run" if args.reuse_peers else "run by this command"}
                save()

    # 2-4. crown_sync on our own servers.
    with Servers(oracles, workdir) as servers:
        for oracle in oracles:
            for size in sizes:
                log(f"== crown_sync on {oracle}, {size} contenders")
                try:
                    row = fleet_benchmark(servers, oracle, size, args.graceful, args.crash,
                                          args.rest if oracle != "file" else 0.0, workdir)
                    row["source"] = "run.py"
                    summary["failover"].append(row)
                    save()
                    log(f"   graceful {_cell(row['graceful_signal'])}, crash {_cell(row['crash'])}, "
                        f"requests/s/contender {row.get('requests_per_s_per_contender', '–')}, "
                        f"requests per handoff/failover {row.get('requests_per_graceful', '–')}"
                        f"/{row.get('requests_per_crash', '–')}, "
                        f"journal {row['journal']}")
                except Exception as exc:
                    summary["errors"].append(f"crown_sync on {oracle} with {size}: {exc}")
                    log(f"   FAILED: {exc}")
            try:
                summary["is_leader"].append(is_leader_cost(servers, oracle))
                log(f"   is_leader: {summary['is_leader'][-1]}")
            except Exception as exc:
                summary["is_leader"].append({"oracle": oracle, "error": str(exc)})
        if not args.skip_peers:
            log("== the peers' \"do I lead?\"")
            summary["peer_is_leader"] = peers_is_leader_cost(servers, oracles)
            for row in summary["peer_is_leader"]:
                log(f"   {row}")
            save()
        if "zookeeper" in oracles and not args.skip_peers:
            log("== kazoo and tooz at rest on ZooKeeper")
            for rest_row in zookeeper_peers_at_rest(servers, args.rest, workdir):
                log(f"   {rest_row}")
                if "error" in rest_row:
                    summary["errors"].append(f"{rest_row['system']} at rest on ZooKeeper: {rest_row['error']}")
                    continue
                # Into the script's row for the same system and contender count, else a row of its own.
                target = next((r for r in summary["peers"] if r["oracle"] == "zookeeper"
                               and r["system"] == rest_row["system"] and r.get("contenders") == 3), None)
                if target is not None:
                    target["requests_per_s_per_contender"] = rest_row["requests_per_s_per_contender"]
                    target["source"] = f"{target.get('source')} + run.py (requests)"
                else:
                    summary["peers"].append(rest_row)

    # The peers' rows after ours, oracle by oracle.
    ordered = []
    for oracle in oracles:
        ordered += [r for r in summary["failover"] if r["oracle"] == oracle]
        ordered += [dict(r, system=r["system"] if r["system"] != "crown_sync" else "crown_sync (script)")
                    for r in summary["peers"] if r["oracle"] == oracle]
    summary["failover"] = ordered

    # 5. A thousand crowns.
    log(f"== {args.crowns} crowns in one process")
    save()
    summary["thousand_crowns"] = thousand_crowns(args.crowns, workdir)
    save(final=True)
    write_tables(summary, args.output)
    log(f"({summary['duration_s']} s)")
    return 0


def write_tables(summary: Dict[str, Any], output: str) -> None:
    base = os.path.splitext(output)[0]
    with open(base + ".md", "w") as handle:
        handle.write(markdown(summary))
    with open(base + ".rst", "w") as handle:
        handle.write(rst(summary))
    print()
    print(markdown(summary))
    log(f"saved {output}, {base}.md, {base}.rst")


if __name__ == "__main__":
    sys.exit(main())
