"""ZooKeeper leader election: crown_sync vs kazoo's Election recipe vs tooz's ZooKeeper driver.

All three run against the same throwaway ZooKeeper server (started here from the system's
installation), with the same session timeout, in one run. Two scenarios, each with 3 and with 50
contenders (every contender has its own client and session, as separate processes would):

* graceful handoff: the leader leaves cleanly (crown_sync: ``Crown.stop()``; kazoo: the leader
  function returns so ``Election.run`` releases its lock, then the client stops; tooz: the
  coordinator stops). Measured from the moment the leader is asked to leave to the moment the
  successor's leader code starts (crown_sync: its child; kazoo: the election function; tooz: the
  elected-as-leader callback). Contenders run in this process; the one who left rejoins at the
  back of the queue so the number of contenders stays the same.
* crash failover: the leader runs alone in a worker process and is SIGKILLed; the other
  contenders run in a second worker process. Measured from the kill to the successor's leader
  code starting (both processes write ``clock.monotonic()``, one clock for every process).

tooz elects only when its caller pumps ``run_watchers()``; its contenders pump every
``--tooz-pump`` seconds (each pump of a follower is a non-blocking lock attempt: create, list,
delete). Results are printed as a table and saved to ``benchmarks/results/zookeeper.json``.

Usage: ``python benchmarks/bench_zookeeper.py [--sizes 3,50] [--graceful-samples 20]
[--crash-samples 5] [--session-timeout 4]``.
"""

import argparse
import datetime
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from crown_sync import clock  # noqa: E402  (the clock of the journal's and the deadlines' times)

SYSTEMS = ("crown_sync", "kazoo", "tooz")


# ------------------------------------------------------------------------------ the contenders


class Contenders:
    """Base: ``join(idx)`` starts one contender with its own session; ``leave(handle)`` stops it
    cleanly. ``on_elected(idx, t)`` is called when a contender's leader code starts."""

    def __init__(self, hosts, name, session_timeout, on_elected, pump=0.05):
        self.hosts = hosts
        self.name = name
        self.session_timeout = session_timeout
        self.on_elected = on_elected
        self.pump = pump

    def queue_path(self):
        """The ZooKeeper path holding one node per queued contender (None: not observable)."""
        return None


class CrownSyncContenders(Contenders):
    def join(self, idx):
        import crown_sync
        from crown_sync.oracles.zookeeper import ZooKeeperOracle

        oracle = ZooKeeperOracle(self.hosts, session_timeout=self.session_timeout)

        def work(term):
            self.on_elected(idx, clock.monotonic())
            term.stop_event.wait()

        crown = crown_sync.Crown(self.name, oracle=oracle, child=work, identity=f"c{idx}")
        crown.start()
        return crown, oracle

    def leave(self, handle):
        crown, oracle = handle
        crown.stop()
        oracle.close()

    def queue_path(self):
        return f"/crown_sync/{self.name}"


class KazooContenders(Contenders):
    def join(self, idx):
        from kazoo.client import KazooClient

        client = KazooClient(hosts=self.hosts, timeout=self.session_timeout)
        client.start(timeout=30)
        election = client.Election(self.queue_path(), f"k{idx}")
        done = threading.Event()

        def work():
            self.on_elected(idx, clock.monotonic())
            done.wait()

        thread = threading.Thread(target=election.run, args=(work,), daemon=True)
        thread.start()
        return client, election, done, thread

    def leave(self, handle):
        client, election, done, thread = handle
        done.set()  # the function returns: Election.run releases the lock
        election.cancel()
        thread.join(30)
        client.stop()
        client.close()

    def queue_path(self):
        return f"/bench-kazoo/{self.name}"


class ToozContenders(Contenders):
    def join(self, idx):
        from tooz import coordination

        member = f"t{idx}-{uuid.uuid4().hex[:6]}".encode()
        timeout = max(1, int(round(self.session_timeout)))  # tooz takes whole seconds
        coordinator = coordination.get_coordinator(f"zookeeper://{self.hosts}?timeout={timeout}", member)
        coordinator.start()
        group = self.name.encode()
        try:
            coordinator.create_group(group).get()
        except coordination.GroupAlreadyExist:
            pass
        coordinator.watch_elected_as_leader(group, lambda event: self.on_elected(idx, clock.monotonic()))
        stop = threading.Event()

        active = getattr(self, "active", None)  # set: pump; clear: wait (no spinning)

        def pump():
            while not stop.is_set():
                if active is not None and not active.wait(0.5):
                    continue
                try:
                    coordinator.run_watchers()
                except Exception:
                    pass
                stop.wait(self.pump)

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        return coordinator, stop, thread

    def leave(self, handle):
        coordinator, stop, thread = handle
        stop.set()
        thread.join(30)
        coordinator.stop()


KINDS = {"crown_sync": CrownSyncContenders, "kazoo": KazooContenders, "tooz": ToozContenders}


# ------------------------------------------------------------------------------ helpers


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summarise(samples_s):
    ms = [s * 1000.0 for s in samples_s]
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p95_ms": round(percentile(ms, 0.95), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "max_ms": round(max(ms), 2),
        "samples_ms": [round(v, 2) for v in ms],
    }


def wait_until(predicate, timeout, message):
    end = clock.monotonic() + timeout
    while clock.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.002)
    raise TimeoutError(message)


def drain(monitor):
    """Return once the server has committed every write queued before now (it orders all
    writes): so a tooz herd's backlog doesn't spill into the next system's sample."""
    monitor.ensure_path("/bench-drain")
    monitor.set("/bench-drain", b"x")


def queued(monitor, path):
    try:
        # queue nodes only (crown_sync's guard nodes end in "guard", not a sequence number)
        return sum(1 for child in monitor.get_children(path) if child[-10:].isdigit())
    except Exception:
        return 0


# ------------------------------------------------------------------------------ graceful


class GracefulGroup:
    """``size`` contenders of one system in one process; ``handoff()`` measures one graceful
    handoff, after which the contender that left joins again at the back."""

    def __init__(self, system, hosts, name, size, session_timeout, pump, monitor):
        self.system = system
        self.size = size
        self.monitor = monitor
        self.pump = pump
        self.elected = []  # (idx, t)
        self.cond = threading.Condition()
        self.kind = KINDS[system](hosts, name, session_timeout, self._on_elected, pump)
        self.kind.active = threading.Event()  # tooz pumps only during this group's samples
        self.kind.active.set()
        self.handles = {}
        self.next_idx = 0

    def _on_elected(self, idx, t):
        with self.cond:
            self.elected.append((idx, t))
            self.cond.notify_all()

    def _join(self):
        idx = self.next_idx
        self.next_idx += 1
        self.handles[idx] = self.kind.join(idx)

    def _settle(self):
        path = self.kind.queue_path()
        if path is not None:
            try:
                wait_until(lambda: queued(self.monitor, path) >= self.size, 30, f"{self.system}: queue full")
            except TimeoutError:  # a contender lost its node (e.g. its session expired under load)
                print(f"warning: {self.system}: queue not full after 30 s; going on", file=sys.stderr)
        else:
            time.sleep(max(0.3, 3 * self.pump))

    def setup(self):
        self._join()
        with self.cond:
            if not self.cond.wait_for(lambda: self.elected, 60):
                raise TimeoutError(f"{self.system}: no first leader")
        for _ in range(self.size - 1):
            self._join()
        self._settle()
        self.kind.active.clear()

    def handoff(self):
        self.kind.active.set()
        if self.kind.queue_path() is None:
            time.sleep(3 * self.pump)  # pumping again: back to its steady state first
        with self.cond:
            leader_idx, _t = self.elected[-1]
            count = len(self.elected)
        t0 = clock.monotonic()
        self.kind.leave(self.handles.pop(leader_idx))
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.elected) > count, 60):
                raise TimeoutError(f"{self.system}: no successor")
            _idx, t1 = self.elected[count]
        self._join()  # the one who left comes back, at the back of the queue
        self._settle()
        self.kind.active.clear()
        if self.kind.queue_path() is None:
            time.sleep(2 * self.pump)  # the last pumps finish
        drain(self.monitor)
        return t1 - t0

    def teardown(self):
        self.kind.active.set()
        for handle in list(self.handles.values()):
            try:
                self.kind.leave(handle)
            except Exception:
                pass
        self.handles.clear()


def graceful_worker(args):
    """One system's contenders in their own process (as in real deployments, and so that one
    library's threads don't slow another's down); handoffs on command, one line each."""
    from kazoo.client import KazooClient

    monitor = KazooClient(hosts=args.hosts)
    monitor.start(timeout=30)
    group = GracefulGroup(args.system, args.hosts, args.name, args.count, args.session_timeout,
                          args.tooz_pump, monitor)
    try:
        group.setup()
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() != "handoff":
                break
            print(f"{group.handoff():.6f}", flush=True)
    finally:
        group.teardown()
        monitor.stop()
        monitor.close()
    return 0


def bench_graceful(systems, hosts, size, samples, session_timeout, pump, monitor):
    """Samples of every system, interleaved (one handoff of each in turn), so that all of them
    see the same background: the load of a shared machine drifts over a run."""
    workers = {}
    results = {system: [] for system in systems}
    try:
        for system in systems:
            workers[system] = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "worker", "--mode", "graceful",
                 "--system", system, "--hosts", hosts, "--name", f"g-{system}-{size}-{uuid.uuid4().hex[:6]}",
                 "--count", str(size), "--session-timeout", str(session_timeout), "--events", os.devnull,
                 "--label", "graceful", "--tooz-pump", str(pump)],
                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            )
            if workers[system].stdout.readline().strip() != "ready":
                raise RuntimeError(f"{system}: graceful worker failed to start")
        for sample in range(samples + 1):  # the first round is a warm-up
            for system in systems[sample % len(systems):] + systems[:sample % len(systems)]:
                worker = workers[system]
                worker.stdin.write("handoff\n")
                worker.stdin.flush()
                answer = worker.stdout.readline().strip()
                if not answer:
                    raise RuntimeError(f"{system}: graceful worker died")
                if sample:
                    results[system].append(float(answer))
    finally:
        for worker in workers.values():
            try:
                worker.stdin.write("quit\n")
                worker.stdin.close()
            except OSError:
                pass
        for worker in workers.values():
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    return results


# ------------------------------------------------------------------------------ crash


def spawn_worker(system, hosts, name, count, session_timeout, events, label, pump):
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "worker", "--system", system, "--hosts", hosts,
         "--name", name, "--count", str(count), "--session-timeout", str(session_timeout),
         "--events", events, "--label", label, "--tooz-pump", str(pump)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


def read_events(path):
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def bench_crash(systems, hosts, size, samples, session_timeout, pump, monitor, workdir):
    """Crash samples of every system, interleaved like the graceful ones."""
    results = {system: [] for system in systems}
    for sample in range(samples):
        for system in systems[sample % len(systems):] + systems[:sample % len(systems)]:
            results[system].append(crash_once(system, hosts, size, session_timeout, pump, monitor, workdir))
    return results


def crash_once(system, hosts, size, session_timeout, pump, monitor, workdir):
    for _once in (1,):
        name = f"c-{system}-{size}-{uuid.uuid4().hex[:6]}"
        events = os.path.join(workdir, f"{name}.jsonl")
        solo = spawn_worker(system, hosts, name, 1, session_timeout, events, "solo", pump)
        pool = None
        try:
            wait_until(lambda: any(e["kind"] == "elected" and e["label"] == "solo" for e in read_events(events)),
                       60, f"{system}: solo leader")
            pool = spawn_worker(system, hosts, name, size - 1, session_timeout, events, "pool", pump)
            wait_until(lambda: any(e["kind"] == "ready" and e["label"] == "pool" for e in read_events(events)),
                       120, f"{system}: pool ready")
            path = KINDS[system](hosts, name, session_timeout, None).queue_path()
            if path is not None:
                wait_until(lambda: queued(monitor, path) >= size, 60, f"{system}: queue full")
            else:
                time.sleep(max(0.5, 3 * pump))
            time.sleep(0.2)
            drain(monitor)
            t0 = clock.monotonic()
            os.kill(solo.pid, signal.SIGKILL)
            found = wait_until(
                lambda: [e for e in read_events(events) if e["kind"] == "elected" and e["label"] == "pool"],
                session_timeout * 3 + 30, f"{system}: failover")
            return found[0]["t"] - t0
        finally:
            for process in (solo, pool):
                if process is not None and process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in (solo, pool):
                if process is not None:
                    try:
                        process.wait(60)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()


def worker(args):
    fd = os.open(args.events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def write(record):
        os.write(fd, (json.dumps(record) + "\n").encode())

    def on_elected(idx, t):
        write({"kind": "elected", "label": args.label, "idx": idx, "t": t, "pid": os.getpid()})

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    kind = KINDS[args.system](args.hosts, args.name, args.session_timeout, on_elected, args.tooz_pump)
    handles = [kind.join(idx) for idx in range(args.count)]
    write({"kind": "ready", "label": args.label, "t": clock.monotonic()})
    while not done.wait(0.2):
        pass
    for handle in handles:
        try:
            kind.leave(handle)
        except Exception:
            pass
    return 0


# ------------------------------------------------------------------------------ main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    work = sub.add_parser("worker")
    work.add_argument("--system", choices=SYSTEMS, required=True)
    work.add_argument("--hosts", required=True)
    work.add_argument("--name", required=True)
    work.add_argument("--count", type=int, required=True)
    work.add_argument("--session-timeout", type=float, required=True)
    work.add_argument("--events", required=True)
    work.add_argument("--label", required=True)
    work.add_argument("--tooz-pump", type=float, default=0.05)
    work.add_argument("--mode", choices=["crash", "graceful"], default="crash")
    parser.add_argument("--sizes", default="3,50")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--graceful-samples", type=int, default=20)
    parser.add_argument("--crash-samples", type=int, default=5)
    parser.add_argument("--session-timeout", type=float, default=4.0)
    parser.add_argument("--tooz-pump", type=float, default=0.05)
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "zookeeper.json"))
    args = parser.parse_args(argv)
    if args.command == "worker":
        return graceful_worker(args) if args.mode == "graceful" else worker(args)

    import tempfile

    import kazoo
    import tooz
    from kazoo.client import KazooClient

    from crown_sync.testing.zookeeper_server import ZooKeeperServer, four_letter_word

    sizes = [int(s) for s in args.sizes.split(",")]
    systems = [s for s in args.systems.split(",") if s]
    server = ZooKeeperServer(heap="512m")
    server.start()
    monitor = KazooClient(hosts=server.hosts)
    monitor.start(timeout=30)
    workdir = tempfile.mkdtemp(prefix="bench-zookeeper-")
    rows = []
    try:
        version = four_letter_word(server.port, "srvr").splitlines()[0] if four_letter_word(server.port, "srvr") else "?"
        for scenario in ("graceful", "crash"):
            for size in sizes:
                started = clock.monotonic()
                if scenario == "graceful":
                    samples = bench_graceful(systems, server.hosts, size, args.graceful_samples,
                                             args.session_timeout, args.tooz_pump, monitor)
                else:
                    samples = bench_crash(systems, server.hosts, size, args.crash_samples,
                                          args.session_timeout, args.tooz_pump, monitor, workdir)
                for system in systems:
                    row = {"scenario": scenario, "system": system, "contenders": size}
                    row.update(summarise(samples[system]))
                    rows.append(row)
                    print(f"{scenario:9} {system:11} n={size:<3} p50 {row['p50_ms']:9.2f} ms  "
                          f"p95 {row['p95_ms']:9.2f} ms", flush=True)
                print(f"  ({clock.monotonic() - started:.0f} s)", flush=True)
    finally:
        monitor.stop()
        monitor.close()
        server.cleanup()

    print()
    print("| scenario | contenders | " + " | ".join(f"{s} p50 / p95 (ms)" for s in systems) + " |")
    print("|---|---|" + "---|" * len(systems))
    for scenario in ("graceful", "crash"):
        for size in sizes:
            cells = []
            for system in systems:
                row = next(r for r in rows if (r["scenario"], r["system"], r["contenders"]) == (scenario, system, size))
                cells.append(f"{row['p50_ms']:.1f} / {row['p95_ms']:.1f}")
            print(f"| {scenario} | {size} | " + " | ".join(cells) + " |")

    result = {
        "benchmark": "zookeeper",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "server": {"version": version, "tick_time_ms": server.tick_time, "force_sync": True,
                   "nodes": 1, "address": "loopback"},
        "settings": {"session_timeout_s": args.session_timeout, "tooz_pump_s": args.tooz_pump,
                     "graceful_samples": args.graceful_samples, "crash_samples": args.crash_samples,
                     "graceful_warmup_discarded": 1},
        "versions": {"kazoo": getattr(kazoo, "__version__", None) or _dist_version("kazoo"),
                     "tooz": _dist_version("tooz")},
        "results": rows,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)
        handle.write("\n")
    print(f"\nsaved {args.output}")
    return 0


def _dist_version(name):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
