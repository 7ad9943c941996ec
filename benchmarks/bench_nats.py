"""NATS JetStream KV leader election: crown_sync's NATS oracle vs a hand-written KV create/watch loop.

Both run against the same throwaway ``nats-server -js`` (started here from the system's binary),
with the same lease length, in one run. Every contender is its own process whose leader work
journals itself (crown_sync.testing.journal), so every figure comes from the journal and the
server, and each journal is checked for overlapping terms at the end.

The hand-written loop is what the NATS documentation and Choria's election suggest: a bucket
whose ``max_age`` is the lease, ``create`` to win, ``update(last=revision)`` every ``ttl / 3`` to
renew, a watch on the key to hear a release (``delete``) at once, and a campaign every
``ttl / 4`` (nats-server 2.9 tells no watcher when a key ages out). Its token is the revision it
won with. It has no local deadline: a leader that cannot renew stops only when a renewal fails.

* graceful handoff: SIGTERM to the leader's process (crown_sync: stop the child, CAS release;
  hand-written: stop the work, delete the key); from the signal to the new term's first line,
  and the leaderless gap (the old term's last journal line to the new term's first).
* crash failover: SIGKILL to the leader's process; from the kill to the new term's first line.
* requests/s at rest: messages the server received (``/varz`` ``in_msgs``: KV reads and writes,
  JetStream API requests, consumer flow-control replies) over a quiet window, per contender.

Results are printed and saved to ``benchmarks/results/nats.json`` (with the host's load average:
on a busy machine the tails grow).

Usage: ``python benchmarks/bench_nats.py [--ttl 5] [--contenders 3,50] [--graceful 10] [--crash 3]
[--rest 10] [--systems crown_sync,handwritten]``
"""

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from crown_sync import clock  # noqa: E402
from crown_sync.testing import journal  # noqa: E402
from crown_sync.testing.fleet import Fleet  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "nats.json")
SYSTEMS = ("crown_sync", "handwritten")


# ------------------------------------------------------------------ the hand-written contender

async def handwritten(args) -> None:
    """One contender of the hand-written loop (see the module docstring)."""
    import nats
    import nats.js.errors
    from nats.js.api import DeliverPolicy, KeyValueConfig

    nc = await nats.connect(args.url)
    js = nc.jetstream()
    try:
        kv = await js.key_value(args.bucket)
    except nats.js.errors.BucketNotFoundError:
        try:
            kv = await js.create_key_value(KeyValueConfig(bucket=args.bucket, ttl=args.ttl, history=1))
        except nats.js.errors.BadRequestError:  # made by another contender meanwhile
            kv = await js.key_value(args.bucket)
    wake, done = asyncio.Event(), asyncio.Event()

    async def changed(msg) -> None:
        wake.set()

    await js.subscribe(f"$KV.{args.bucket}.{args.name}", cb=changed, ordered_consumer=True,
                       deliver_policy=DeliverPolicy.NEW, headers_only=True)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
    revision, work = None, None
    while not done.is_set():
        try:
            if revision is None:
                revision = await kv.create(args.name, args.identity.encode())
                work = _Work(args, revision)
            else:
                revision = await kv.update(args.name, args.identity.encode(), last=revision)
        except Exception:  # lost the race, or the renewal: not (or no longer) the leader
            if work is not None:
                work.stop()
            revision, work = None, None
        wake.clear()
        pause = args.ttl / 3 if revision is not None else args.ttl / 4
        waits = [asyncio.ensure_future(done.wait())] + ([asyncio.ensure_future(wake.wait())] if revision is None else [])
        await asyncio.wait(waits, timeout=pause, return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()
    if work is not None:
        work.stop()
        await kv.delete(args.name, last=revision)
    await nc.close()


class _Work:
    """The leader's work: journal lines every 5 ms in a thread until stopped."""

    def __init__(self, args, token: int):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(args, token), daemon=True)
        self._thread.start()

    def _run(self, args, token: int) -> None:
        log = journal.Journal(args.journal)
        log.write("start", args.name, args.identity, token)
        while not self._stop.wait(0.005):
            log.write("beat", args.name, args.identity, token)
        log.write("stop", args.name, args.identity, token)
        log.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class HandwrittenFleet(Fleet):
    """The shared Fleet, with the hand-written contender as its command."""

    def __init__(self, url, directory, name, ttl, bucket="handwritten"):
        super().__init__(url, directory, name)
        self.ttl, self.bucket = ttl, bucket

    def command(self, identity):
        return [sys.executable, os.path.abspath(__file__), "--handwritten-contender", "--url", self.url,
                "--name", self.name, "--journal", self.journal, "--identity", identity,
                "--ttl", str(self.ttl), "--bucket", self.bucket]


# ---------------------------------------------------------------------------------- measuring

def percentile(values, q):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(values):
    return {"n": len(values), "p50_ms": _ms(percentile(values, 0.5)), "p95_ms": _ms(percentile(values, 0.95)),
            "max_ms": _ms(max(values) if values else None), "samples_ms": [_ms(v) for v in values]}


def scenarios(results):
    """The rows as benchmarks/run.py reads a script's results: one item per scenario."""
    items = []
    for row in results:
        for scenario in ("graceful", "crash"):
            items.append(dict(row[scenario], system=row["system"], contenders=row["contenders"], scenario=scenario))
    return items


def _ms(value):
    return None if value is None else round(value * 1000, 1)


def measure(system, server, ttl, count, args, directory):
    name = f"bench-{system}-{count}"
    if system == "crown_sync":
        fleet = Fleet(server.url_for(ttl=ttl), directory, name)
    else:
        fleet = HandwrittenFleet(server.url, directory, name, ttl)
    identities = iter(range(10 ** 6))
    for _ in range(count):
        fleet.spawn(f"{system}-{next(identities)}")
    result = {"system": system, "contenders": count}
    try:
        fleet.wait_for_term(timeout=120)
        before = server.request_count()
        started = clock.monotonic()
        time.sleep(args.rest)
        result["requests_per_s_per_contender"] = round(
            (server.request_count() - before) / (clock.monotonic() - started) / count, 3)
        for kind, signum, rounds in (("graceful", signal.SIGTERM, args.graceful), ("crash", signal.SIGKILL, args.crash)):
            latencies, gaps = [], []
            for _ in range(rounds):
                leader = fleet.wait_for_term(timeout=120)
                at = clock.monotonic()
                fleet.signal(leader.identity, signum)
                successor = fleet.wait_for_term(other_than={leader.identity}, after=at, min_beats=1, timeout=120)
                fleet.wait_exit(leader.identity)
                old = [t for t in fleet.terms() if (t.identity, t.token) == (leader.identity, leader.token)][0]
                latencies.append(successor.start - at)
                gaps.append(successor.start - old.end)  # leaderless: old child's last line to the new first
                fleet.spawn(f"{system}-{next(identities)}")
            result[kind] = summary(latencies)
            result[f"{kind}_gap"] = summary(gaps)
    finally:
        fleet.stop_all()
    report = journal.check(fleet.journal, name)
    result["terms"] = len(report.terms)
    result["overlaps"] = len(report.overlaps)
    result["token_violations"] = len(report.token_violations)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ttl", type=float, default=5.0)
    parser.add_argument("--contenders", default="3,50")
    parser.add_argument("--graceful", type=int, default=10)
    parser.add_argument("--crash", type=int, default=3)
    parser.add_argument("--rest", type=float, default=10.0)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--output", default=RESULTS)
    parser.add_argument("--handwritten-contender", action="store_true", help=argparse.SUPPRESS)
    for option in ("--url", "--name", "--journal", "--identity", "--bucket"):
        parser.add_argument(option, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.handwritten_contender:
        asyncio.run(handwritten(args))
        return 0
    from crown_sync.testing.nats_server import NatsServer

    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    results = []
    with NatsServer() as server, tempfile.TemporaryDirectory(prefix="bench-nats-") as directory:
        for count in [int(c) for c in args.contenders.split(",")]:
            for system in systems:
                result = measure(system, server, args.ttl, count, args, directory)
                print(json.dumps(result), flush=True)
                results.append(result)
        version = server.version()
    saved = {"benchmark": "nats", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "host": platform.node(), "load_average": os.getloadavg(), "nats_server": version,
             "ttl": args.ttl, "rows": results, "results": scenarios(results)}
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(saved, handle, indent=1)
    print(f"{'system':<12} {'n':>3} {'graceful p50':>13} {'(gap)':>10} {'crash p50':>10} {'req/s each':>11} "
          f"{'overlaps':>9}")
    for r in results:
        print(f"{r['system']:<12} {r['contenders']:>3} {str(r['graceful']['p50_ms']):>10} ms "
              f"{str(r['graceful_gap']['p50_ms']):>7} ms "
              f"{str(r['crash']['p50_ms']):>7} ms {r['requests_per_s_per_contender']:>11} {r['overlaps']:>9}")
    return 0 if all(r["overlaps"] == 0 for r in results if r["system"] == "crown_sync") else 1


if __name__ == "__main__":
    sys.exit(main())
