"""memcached leader election: crown_sync's memcached oracle vs tooz's memcached driver.

Both run against the same throwaway memcached (started here from the system's binary), with the
same lease length, in one run. Every contender is its own process whose leader work journals
itself (crown_sync.testing.journal), so every figure comes from the journal and the server, and
the journal is checked for overlapping terms at the end.

* graceful handoff: SIGTERM to the leader's process (crown_sync: ``Crown.stop()``, i.e. stop the
  child, release by CAS; tooz: stop the work, ``coordinator.stop()``, which deletes the lock).
  Reported as the leaderless gap (last journal line of the old term to the first of the new) and
  as the latency from the signal to the new term's first line.
* crash failover: SIGKILL to the leader's process; from the kill to the new term's first line.
* requests/s at rest: ``stats`` counters of the server (gets, sets incl. add/cas, touches,
  deletes) over a quiet window, divided by the number of contenders; measured with 3 contenders
  and with the leader alone (the difference gives a follower's rate).
* safety under SIGSTOP: the leader's process is stopped for 2 x TTL, then continued; overlaps
  counted by the journal checker (crown_sync with a ProcessChild, whose deadline is kept even
  while its parent is stopped).

tooz elects only when its caller pumps ``run_watchers()``; its contenders pump every
``--pump`` seconds, the same cadence as crown_sync's follower poll (``poll_interval``). A tooz
leader checks ``get_leader()`` at every pump and stops its work when it is no longer the leader
(tooz has no fencing token: the journal gets the wall clock in microseconds instead).

A third column, ``crown_sync@0.1``, runs crown_sync with ``poll_interval=0.1`` (handoffs and
requests only) to show the trade-off between handoff time and requests at rest.

Results are printed as a table and saved to ``benchmarks/results/memcached.json`` (with the
host's load average: on a busy machine the tails grow).

Usage: ``python benchmarks/bench_memcached.py [--ttl 5] [--graceful 20] [--crash 5] [--rest 10]
[--systems crown_sync,tooz,crown_sync@0.1] [--contenders 3]``; ``--contenders N``: the handoffs
and failovers with N contender processes (the requests at rest are always with 3).
"""

import argparse
import datetime
import json
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from crown_sync import clock  # noqa: E402
from crown_sync.testing import journal  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "memcached.json")


# ------------------------------------------------------------------------ tooz contender process

def tooz_contender(args) -> int:
    """One tooz contender: pump run_watchers(), journal work while elected."""
    from tooz import coordination

    member = args.identity.encode()
    group = args.name.encode()
    coordinator = coordination.get_coordinator(args.url, member)
    coordinator.start(start_heart=True)
    try:
        coordinator.create_group(group).get()
    except coordination.GroupAlreadyExist:
        pass
    coordinator.join_group(group).get()
    elected = threading.Event()
    coordinator.watch_elected_as_leader(group, lambda event: elected.set())
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())

    work = {"thread": None, "stop": None}

    def start_work():
        stop = threading.Event()
        token = time.time_ns() // 1000  # tooz has no fencing token

        def run():
            log = journal.Journal(args.journal)
            log.write("start", args.name, args.identity, token)
            while not stop.wait(args.interval):
                log.write("beat", args.name, args.identity, token)
            log.write("stop", args.name, args.identity, token)
            log.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        work.update(thread=thread, stop=stop)

    def stop_work():
        if work["thread"] is not None:
            work["stop"].set()
            work["thread"].join()
            work.update(thread=None, stop=None)

    while not done.is_set():
        try:
            coordinator.run_watchers()
            if elected.is_set():
                if work["thread"] is None:
                    start_work()
                elif coordinator.get_leader(group).get() != member:
                    stop_work()  # a careful tooz user: stop once someone else is the leader
                    elected.clear()
        except Exception as exc:  # tooz raises on connection trouble; keep pumping
            print(f"tooz contender {args.identity}: {exc}", file=sys.stderr)
        done.wait(args.pump)
    stop_work()
    try:
        coordinator.stop()
    except Exception:
        pass
    return 0


# ------------------------------------------------------------------------------------ fleets

class Fleet:
    """Contender processes of one system, each in its own process group."""

    def __init__(self, system, url, name, directory, pump, child="thread"):
        self.system = system
        self.url = url
        self.name = name
        self.child = child
        self.pump = pump
        self.journal = os.path.join(directory, f"{system}-{name}.jsonl")
        self.processes = {}
        self.count = 0

    def spawn(self):
        identity = f"{self.system}-{self.count}"
        self.count += 1
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if self.system == "crown_sync":
            argv = [sys.executable, "-m", "crown_sync.testing.contender", "--name", self.name,
                    "--oracle", self.url, "--journal", self.journal, "--identity", identity,
                    "--child", self.child, "--grace", "2"]
        else:
            argv = [sys.executable, os.path.abspath(__file__), "--tooz-contender", "--url", self.url,
                    "--name", self.name, "--journal", self.journal, "--identity", identity,
                    "--pump", str(self.pump)]
        self.processes[identity] = subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True)
        return identity

    def terms(self):
        if not os.path.exists(self.journal):
            return []
        return journal._terms(journal.read(self.journal), self.name)

    def running(self, fresh=0.25):
        now = clock.monotonic()
        live = [t for t in self.terms() if not t.stopped and now - t.end < fresh and t.beats > 0]
        return live[-1] if live else None

    def wait_for(self, predicate, timeout=120.0):
        end = clock.monotonic() + timeout
        while clock.monotonic() < end:
            value = predicate()
            if value:
                return value
            time.sleep(0.005)
        raise RuntimeError(f"{self.system}: timed out waiting")

    def wait_new_term(self, after, other_than=None, timeout=120.0):
        def found():
            for term in self.terms():
                if term.start > after and term.identity != other_than:
                    return term
            return None
        return self.wait_for(found, timeout)

    def settle(self, leader_needed=True, timeout=120.0):
        if leader_needed:
            return self.wait_for(lambda: (lambda t: t if t and t.beats >= 3 else None)(self.running()), timeout)
        return None

    def stop_all(self):
        for process in self.processes.values():
            if process.poll() is None:
                try:
                    os.kill(process.pid, signal.SIGCONT)
                    process.terminate()
                except ProcessLookupError:
                    pass
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def percentile(values, q):
    if not values:
        return None
    ordered = sorted(values)
    index = (len(ordered) - 1) * q
    low, high = int(index), min(int(index) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (index - low)


def summary(values):
    values = [v * 1000 for v in values]
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 0.5), 1) if values else None,
        "p95_ms": round(percentile(values, 0.95), 1) if values else None,
        "max_ms": round(max(values), 1) if values else None,
        "samples_ms": [round(v, 1) for v in values],
    }


# ---------------------------------------------------------------------------------- scenarios

def run_system(label, server, args, directory):
    """``label`` is ``crown_sync``, ``tooz``, or ``crown_sync@P`` (crown_sync polling every P s:
    graceful handoffs and requests only, to show the trade-off)."""
    system, _, poll = label.partition("@")
    poll = float(poll) if poll else args.pump
    full = label in ("crown_sync", "tooz")
    if system == "crown_sync":
        url = f"{server.url}?ttl={args.ttl:g}&poll_interval={poll:g}"
    else:
        url = f"{server.url}?timeout={int(args.ttl)}"
    result = {"url": url}
    tag = label.replace("@", "-at-")
    system = system if system == "tooz" else "crown_sync"
    print(f"== {label}: {url}", flush=True)

    # Requests at rest: leader alone, then leader + 2 followers.
    fleet = Fleet(system, url, f"rest-{tag}", directory, poll)
    try:
        fleet.spawn()
        fleet.settle()
        time.sleep(1.0)
        before = server.request_count()
        time.sleep(args.rest)
        alone = (server.request_count() - before) / args.rest
        fleet.spawn()
        fleet.spawn()
        time.sleep(2.0)  # the newcomers claim and settle as followers
        before = server.request_count()
        time.sleep(args.rest)
        three = (server.request_count() - before) / args.rest
    finally:
        fleet.stop_all()
    result["requests_per_s"] = {
        "leader_alone": round(alone, 2),
        "per_contender_of_3": round(three / 3, 2),
        "per_follower": round((three - alone) / 2, 2),
        "window_s": args.rest,
    }
    print(f"   at rest: {result['requests_per_s']}", flush=True)

    # Graceful handoffs and crash failovers, args.contenders throughout.
    fleet = Fleet(system, url, f"handoff-{tag}", directory, poll)
    gaps, latencies, failovers = [], [], []
    try:
        for _ in range(args.contenders):
            fleet.spawn()
        if args.contenders > 3:
            time.sleep(args.contenders * 0.15)  # every process started (200 on 2 CPUs: seconds)
        for scenario, rounds in (("graceful", args.graceful), ("crash", args.crash if full else 0)):
            for _ in range(rounds):
                term = fleet.settle()
                time.sleep(0.5 + random.random() * 0.5)  # followers at rest, random poll phase
                term = fleet.running() or fleet.settle()
                process = fleet.processes[term.identity]
                signalled = clock.monotonic()
                process.send_signal(signal.SIGTERM if scenario == "graceful" else signal.SIGKILL)
                new = fleet.wait_new_term(after=signalled - 0.001, other_than=term.identity)
                process.wait(30)
                old = [t for t in fleet.terms() if t.identity == term.identity and t.token == term.token][0]
                if scenario == "graceful":
                    gaps.append(new.start - old.end)
                    latencies.append(new.start - signalled)
                else:
                    failovers.append(new.start - signalled)
                fleet.spawn()  # keep args.contenders contenders
            print(f"   {scenario}: done", flush=True)
        time.sleep(0.5)
    finally:
        fleet.stop_all()
    report = journal.check(fleet.journal, fleet.name)
    result["graceful_gap"] = summary(gaps)
    result["graceful_from_signal"] = summary(latencies)
    result["crash_failover"] = summary(failovers)
    result["handoff_journal"] = {"terms": len(report.terms), "overlaps": len(report.overlaps),
                                 "token_violations": len(report.token_violations)}

    if not full:
        result["sigstop"] = None
        return result

    # Safety: SIGSTOP the leader for 2 x ttl, then SIGCONT.
    child = "process" if system == "crown_sync" else "thread"
    fleet = Fleet(system, url, f"sigstop-{tag}", directory, args.pump, child=child)
    try:
        for _ in range(3):
            fleet.spawn()
        overlaps_total = 0
        for _ in range(args.sigstop):
            term = fleet.settle()
            process = fleet.processes[term.identity]
            os.kill(process.pid, signal.SIGSTOP)
            time.sleep(2 * args.ttl)
            os.kill(process.pid, signal.SIGCONT)
            time.sleep(1.0 + 2 * args.pump)
        fleet.settle()
    finally:
        fleet.stop_all()
    report = journal.check(fleet.journal, fleet.name)
    overlaps_total = len(report.overlaps)
    result["sigstop"] = {"rounds": args.sigstop, "terms": len(report.terms), "overlaps": overlaps_total,
                         "summary": report.summary().splitlines()[:4]}
    print(f"   sigstop: {result['sigstop']['summary'][0]}", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ttl", type=float, default=5.0, help="lease length for both systems (s)")
    parser.add_argument("--pump", type=float, default=0.2,
                        help="crown_sync poll_interval and tooz run_watchers() period (s)")
    parser.add_argument("--graceful", type=int, default=20)
    parser.add_argument("--crash", type=int, default=5)
    parser.add_argument("--contenders", type=int, default=3, help="contender processes in the handoffs")
    parser.add_argument("--sigstop", type=int, default=1)
    parser.add_argument("--rest", type=float, default=10.0, help="quiet window for request counts (s)")
    parser.add_argument("--systems", default="crown_sync,tooz,crown_sync@0.1",
                        help="comma-separated: crown_sync, tooz, crown_sync@POLL_INTERVAL")
    parser.add_argument("--output", default=RESULTS)
    # internal: one tooz contender process
    parser.add_argument("--tooz-contender", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--journal", help=argparse.SUPPRESS)
    parser.add_argument("--identity", help=argparse.SUPPRESS)
    parser.add_argument("--interval", type=float, default=0.005, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tooz_contender:
        return tooz_contender(args)

    import tempfile

    import tooz

    from crown_sync.testing.memcached_server import MemcachedServer

    directory = tempfile.mkdtemp(prefix="bench-memcached-")
    results = {
        "benchmark": "memcached",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                 "loadavg_at_start": os.getloadavg()},
        "params": {"ttl_s": args.ttl, "poll_or_pump_s": args.pump, "contenders": args.contenders,
                   "graceful_rounds": args.graceful, "crash_rounds": args.crash},
        "versions": {"tooz": getattr(tooz, "__version__", None)},
        "systems": {},
    }
    try:
        import importlib.metadata as metadata

        results["versions"]["tooz"] = metadata.version("tooz")
        results["versions"]["pymemcache"] = metadata.version("pymemcache")
    except Exception:
        pass
    with MemcachedServer(memory_mb=64) as server:
        server.start()
        results["versions"]["memcached"] = server.stats().get("version")
        for system in args.systems.split(","):
            results["systems"][system] = run_system(system, server, args, directory)

    results["host"]["loadavg_at_end"] = os.getloadavg()
    print()
    header = f"{'':34}" + "".join(f"{s:>16}" for s in results["systems"])
    print(header)
    rows = [
        ("graceful gap p50 / p95 (ms)", lambda r: f"{r['graceful_gap']['p50_ms']}/{r['graceful_gap']['p95_ms']}"),
        ("signal -> new term p50 (ms)", lambda r: f"{r['graceful_from_signal']['p50_ms']}"),
        ("crash failover p50 / p95 (ms)",
         lambda r: f"{r['crash_failover']['p50_ms']}/{r['crash_failover']['p95_ms']}" if r["crash_failover"]["n"] else "-"),
        ("requests/s: leader alone", lambda r: f"{r['requests_per_s']['leader_alone']}"),
        ("requests/s: per follower", lambda r: f"{r['requests_per_s']['per_follower']}"),
        ("requests/s: per contender of 3", lambda r: f"{r['requests_per_s']['per_contender_of_3']}"),
        ("overlaps: handoff rounds", lambda r: f"{r['handoff_journal']['overlaps']}"),
        ("overlaps: SIGSTOP 2xTTL", lambda r: f"{r['sigstop']['overlaps']}" if r["sigstop"] else "-"),
    ]
    for label, cell in rows:
        print(f"{label:34}" + "".join(f"{cell(r):>16}" for r in results["systems"].values()))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
        handle.write("\n")
    print(f"\nsaved {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
