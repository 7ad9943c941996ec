"""Redis leader election: crown_sync's Redis oracle vs redis-py's ``Lock`` and tooz's Redis driver.

All run against the same throwaway redis-server (started here from the system's binary, with a
password and an append-only file), with the same lease length, in one run. Every contender is its
own process whose leader work journals itself (crown_sync.testing.journal), so every figure comes
from the journal and the server, and each journal is checked for overlapping terms at the end.

* ``redis-lock``: redis-py's ``Lock`` as users write it: ``lock.acquire(blocking=True)`` (a
  ``SET NX PX`` every ``sleep`` = 0.1 s while someone else holds it), the work, ``reacquire()``
  every ``ttl / 3``, ``release()`` on SIGTERM. Its "token" is the wall clock (no fencing).
* ``tooz``: tooz's Redis driver through tooz's election (``watch_elected_as_leader``), pumped
  every 0.1 s by the contender of ``bench_memcached.py``.

* graceful handoff: SIGTERM to the leader's process (crown_sync: stop the child, CAS release,
  PUBLISH; redis-lock: stop the work, ``release()``; tooz: stop the work, ``coordinator.stop()``);
  from the signal to the new term's first journal line, and the leaderless gap (the old term's
  last line to the new term's first).
* crash failover: SIGKILL to the leader's process group; from the kill to the new term's first line.
* pause: the leader's whole process group stopped (SIGSTOP) for twice the lease, then continued;
  the overlaps its journal shows afterwards (``pause_overlaps``).
* requests/s at rest: commands clients sent (``MONITOR``, which leaves out what scripts run inside
  the server) over a quiet window, per contender.

Results are printed and saved to ``benchmarks/results/redis.json`` (with the host's load average:
on a busy machine the tails grow).

Usage: ``python benchmarks/bench_redis.py [--ttl 5] [--contenders 3,50] [--graceful 10] [--crash 3]
[--pause 1] [--rest 10] [--systems crown_sync,redis-lock,tooz]``
"""

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from crown_sync import clock  # noqa: E402
from crown_sync.testing import journal  # noqa: E402
from crown_sync.testing.fleet import Fleet, wait_until  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "redis.json")
SYSTEMS = ("crown_sync", "redis-lock", "tooz")


# ------------------------------------------------------------------ the peers' contenders

def redis_lock_contender(args) -> int:
    """redis-py's Lock in the loop its users write (see the module docstring)."""
    import redis
    from redis.exceptions import LockError

    client = redis.Redis.from_url(args.url)
    lock = client.lock(f"bench-lock:{args.name}", timeout=args.ttl, sleep=0.1)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    while not done.is_set():
        try:
            if not lock.acquire(blocking=True, blocking_timeout=0.5):
                continue  # look at `done` twice a second
        except redis.RedisError as exc:
            print(f"redis-lock contender {args.identity}: {exc}", file=sys.stderr)
            done.wait(0.1)
            continue
        stop = threading.Event()
        worker = threading.Thread(target=_work, args=(args, stop, time.time_ns() // 1000), daemon=True)
        worker.start()
        while not done.wait(args.ttl / 3):
            try:
                lock.reacquire()  # back to a full ttl, only while the token in the key is ours
            except (LockError, redis.RedisError):
                break
        stop.set()
        worker.join()
        try:
            lock.release()
        except (LockError, redis.RedisError):
            pass
    return 0


def _work(args, stop: threading.Event, token: int) -> None:
    log = journal.Journal(args.journal)
    log.write("start", args.name, args.identity, token)
    while not stop.wait(0.005):
        log.write("beat", args.name, args.identity, token)
    log.write("stop", args.name, args.identity, token)
    log.close()


class PeerFleet(Fleet):
    """The shared Fleet, with a peer's contender (this script) as its command."""

    def __init__(self, system, url, directory, name, ttl):
        super().__init__(url, directory, name)
        self.system, self.ttl = system, ttl

    def command(self, identity):
        return [sys.executable, os.path.abspath(__file__), "--peer", self.system, "--url", self.url,
                "--name", self.name, "--journal", self.journal, "--identity", identity,
                "--ttl", str(self.ttl)]


def _fleet(system, server, ttl, directory, name):
    if system == "crown_sync":
        return Fleet(server.url(ttl=ttl), directory, name)
    if system == "tooz":
        # tooz's Redis driver: a lock of ``lock_timeout`` seconds, refreshed by its heartbeat.
        url = f"redis://:{server.password}@{server.host}:{server.port}?lock_timeout={int(ttl)}&timeout={int(ttl)}"
        return PeerFleet(system, url, directory, name, ttl)
    return PeerFleet(system, server.url(), directory, name, ttl)


# ---------------------------------------------------------------------------------- measuring

def _stats(seconds):
    """The layout benchmarks/run.py reads: n, p50_ms, p95_ms, max_ms, samples_ms."""
    ordered = sorted(seconds)
    pick = (lambda q: round(ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1000, 1))
    if not ordered:
        return None
    return {"n": len(ordered), "p50_ms": pick(0.5), "p95_ms": pick(0.95), "max_ms": pick(1.0),
            "samples_ms": [round(value * 1000, 1) for value in seconds]}


def _settle(fleet, identities):
    """Wait until new contenders take part: a crown says so in its telemetry; peers, which have
    none, get 2 s to start (and a little more when many start at once). A round that signals the
    leader before its replacement runs would measure Python's start-up, not the handoff."""
    if isinstance(fleet, PeerFleet):
        time.sleep(2.0 + 0.1 * len(identities))
        return
    started = ("crown.monitor.started", "crown.leadership.claimed", "crown.leadership.rejected")
    for identity in identities:
        wait_until(lambda: any(e["event"] in started for e in fleet.events_of(identity)), timeout=180,
                   message=f"{identity} contending")


def _rounds(fleet, signum, rounds, spawn):
    """Signal the leader ``rounds`` times; (signal -> new term, old term's end -> new term)."""
    latencies, gaps = [], []
    for _ in range(rounds):
        leader = fleet.wait_for_term(timeout=120)
        at = clock.monotonic()
        if signum == signal.SIGKILL:
            os.killpg(fleet.processes[leader.identity].pid, signal.SIGKILL)  # its children too
        else:
            fleet.signal(leader.identity, signum)
        successor = fleet.wait_for_term(other_than={leader.identity}, after=at, min_beats=1, timeout=120)
        fleet.wait_exit(leader.identity)
        ended = [t for t in fleet.terms() if (t.identity, t.token) == (leader.identity, leader.token)][0]
        latencies.append(successor.start - at)
        gaps.append(successor.start - ended.end)
        _settle(fleet, [spawn()])
    return latencies, gaps


def measure(system, server, ttl, count, args, directory):
    name = f"bench-{system}-{count}"
    fleet = _fleet(system, server, ttl, directory, name)
    serial = iter(range(10 ** 6))

    def spawn():
        identity = f"{system}-{next(serial)}"
        fleet.spawn(identity)
        return identity

    result = {"system": system, "contenders": count}
    try:
        _settle(fleet, [spawn() for _ in range(count)])
        fleet.wait_for_term(timeout=180)
        before, started = server.request_counts(), clock.monotonic()
        time.sleep(args.rest)
        counts = {k: v - before.get(k, 0) for k, v in server.request_counts().items() if v > before.get(k, 0)}
        rate = sum(counts.values()) / (clock.monotonic() - started) / count
        result["requests_per_s_per_contender"], result["requests_at_rest"] = round(rate, 3), counts
        for kind, signum, rounds in (("graceful", signal.SIGTERM, args.graceful),
                                     ("crash", signal.SIGKILL, args.crash)):
            latencies, gaps = _rounds(fleet, signum, rounds, spawn)
            result[kind], result[f"{kind}_gap"] = _stats(latencies), _stats(gaps)
        before = len(journal.check(fleet.journal, name).overlaps)
        result["pause_without_successor"] = sum(not _pause(fleet, ttl) for _ in range(args.pause))
        result["pause_overlaps"] = len(journal.check(fleet.journal, name).overlaps) - before
    finally:
        fleet.stop_all()
    report = journal.check(fleet.journal, name)
    result.update(terms=len(report.terms), overlaps=len(report.overlaps),
                  token_violations=len(report.token_violations))
    return result


def _pause(fleet, ttl):
    """SIGSTOP the leader's whole process group for twice the lease, then SIGCONT: a successor
    takes over meanwhile; does the resumed leader's work go on beside it (an overlap)? False if
    no successor came within three leases (the peers' elections can stall)."""
    leader = fleet.wait_for_term(timeout=120)
    group = fleet.processes[leader.identity].pid
    os.killpg(group, signal.SIGSTOP)
    try:
        fleet.wait_for_term(other_than={leader.identity}, after=leader.start, min_beats=1, timeout=3 * ttl)
        time.sleep(max(0.0, 2 * ttl - (clock.monotonic() - leader.end)))
        succeeded = True
    except AssertionError:
        succeeded = False
    finally:
        os.killpg(group, signal.SIGCONT)
    time.sleep(ttl)  # time for the resumed one to notice, or not
    return succeeded


def _table(results) -> None:
    print(f"{'system':<12} {'n':>3} {'graceful p50':>13} {'(gap)':>10} {'crash p50':>10} "
          f"{'req/s each':>11} {'overlaps':>9} (after a pause)")
    for r in results:
        graceful, gap, crash = (r[k]["p50_ms"] if r.get(k) else None for k in ("graceful", "graceful_gap", "crash"))
        print(f"{r['system']:<12} {r['contenders']:>3} {graceful!s:>10} ms {gap!s:>7} ms {crash!s:>7} ms "
              f"{r['requests_per_s_per_contender']:>11} {r['overlaps']:>9} ({r.get('pause_overlaps')})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for option, kind, default in (("--ttl", float, 5.0), ("--contenders", str, "3,50"), ("--graceful", int, 10),
                                  ("--crash", int, 3), ("--rest", float, 10.0), ("--pause", int, 1),
                                  ("--systems", str, ",".join(SYSTEMS)), ("--output", str, RESULTS)):
        parser.add_argument(option, type=kind, default=default)
    parser.add_argument("--peer", choices=SYSTEMS[1:], help=argparse.SUPPRESS)
    for option in ("--url", "--name", "--journal", "--identity"):
        parser.add_argument(option, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer == "redis-lock":
        return redis_lock_contender(args)
    if args.peer == "tooz":
        import bench_memcached  # its tooz contender takes any tooz URL

        return bench_memcached.tooz_contender(argparse.Namespace(interval=0.005, pump=0.1, **vars(args)))
    from crown_sync.testing.redis_server import RedisServer

    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    results = []
    with RedisServer(persistence="aof") as server, tempfile.TemporaryDirectory(prefix="bench-redis-") as directory:
        server.start()
        for count in [int(c) for c in args.contenders.split(",")]:
            for system in systems:
                result = measure(system, server, args.ttl, count, args, directory)
                print(json.dumps(result), flush=True)
                results.append(result)
        version = subprocess.run([server.binary, "--version"], stdout=subprocess.PIPE, text=True).stdout.strip()
    # "results": one item per (system, contenders, scenario), as benchmarks/run.py reads them.
    scenarios = [dict(row[kind], system=row["system"], contenders=row["contenders"], scenario=kind)
                 for row in results for kind in ("graceful", "crash") if row.get(kind)]
    saved = {"benchmark": "redis", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "host": platform.node(), "load_average": os.getloadavg(), "redis_server": version,
             "ttl": args.ttl, "rows": results, "results": scenarios}
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(saved, handle, indent=1)
    _table(results)
    return 0 if all(r["overlaps"] == 0 for r in results if r["system"] == "crown_sync") else 1


if __name__ == "__main__":
    sys.exit(main())
