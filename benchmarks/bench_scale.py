"""Many elections in one process (issue #18): ``python benchmarks/bench_scale.py [--crowns 200,1000]``.

For each networked oracle it starts the server (benchmarks/run.py's ``Servers``: the same servers
and settings as the rest of the benchmarks), then runs a fresh probe process that builds
``--crowns`` crowns (200, then 1,000 by default), each on its own election, all from ONE oracle
URL (so they share one oracle, see crown_sync._shared), and waits up to 180 s until every one
leads. Measured:

* by the probe itself: time for all to lead, threads (by kind), RSS, descriptors, CPU at rest,
  time for all to stop;
* by the server: client connections (ZooKeeper: sessions listed by ``cons``; memcached:
  ``curr_connections``; Redis: ``connected_clients``; NATS: ``/varz`` connections), each minus
  the count before the probe started; requests per second at rest (run.py's counters: ZooKeeper
  packets received, memcached commands, Redis commands seen by MONITOR, NATS messages in); and
  the connections left once the probe exited.

PostgreSQL runs in its ``sessions=shared`` mode (all the crowns of the oracle object on two
server sessions; connections: the server's ``pg_stat_activity``, requests: statements in its
log): with the default one session per crown, 1,000 crowns need 1,000 connections, ten times a
default ``max_connections``.

Results go to ``benchmarks/results/scale.json`` and ``scale.rst`` (included by docs/benchmarks.rst).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run as bench  # noqa: E402  (benchmarks/run.py: the servers, their counters, the machine)

from crown_sync import clock  # noqa: E402

ORACLES = ("postgres", "zookeeper", "memcached", "redis", "nats")


def connections(servers: "bench.Servers", oracle: str) -> int:
    """Client connections (ZooKeeper: sessions) the server reports now."""
    if oracle == "postgres":
        return servers.postgres.sql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                                    " AND pid <> pg_backend_pid()")[0][0]
    if oracle == "zookeeper":
        return len(servers.zookeeper.sessions())
    if oracle == "memcached":
        return int(servers.memcached.stats()["curr_connections"])
    if oracle == "redis":
        return int(servers.redis.info("clients")["connected_clients"])
    return int(servers.nats.varz()["connections"])


# ------------------------------------------------------------------------------ the probe process


def probe(url: str, count: int) -> None:
    """In a fresh process: ``count`` crowns on distinct elections from one URL. Prints a JSON line
    once all lead, measures CPU between the parent's "mark" and "stop" lines, then stops them all
    and prints a second JSON line."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import crown_sync

    before = bench._proc_status()
    started = clock.monotonic()
    crowns = [crown_sync.Crown(f"scale-{i}", oracle=url, identity=f"probe-{i}").start() for i in range(count)]
    deadline = started + bench.SETTLE_LIMIT
    while sum(c.is_leader() for c in crowns) < count and clock.monotonic() < deadline:
        time.sleep(0.05)
    settled = clock.monotonic() - started
    time.sleep(2.0)
    after = bench._proc_status()
    kinds = Counter(t.name.split(":")[0].rstrip("-0123456789") for t in threading.enumerate())
    print(json.dumps({
        "crowns": count, "leaders": sum(c.is_leader() for c in crowns), "settle_s": round(settled, 2),
        "oracles": len({id(c.oracle) for c in crowns}),
        "rss_before_mb": round(before["VmRSS"] / 1024, 1), "rss_after_mb": round(after["VmRSS"] / 1024, 1),
        "threads_before": before["Threads"], "threads_after": after["Threads"], "fds_after": after["fds"],
        "thread_kinds": dict(kinds.most_common()),
    }), flush=True)
    sys.stdin.readline()  # "mark": the rest window starts
    usage, window = resource.getrusage(resource.RUSAGE_SELF), clock.monotonic()
    sys.stdin.readline()  # "stop"
    end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (end.ru_utime + end.ru_stime - usage.ru_utime - usage.ru_stime) / (clock.monotonic() - window)
    leaders = sum(c.is_leader() for c in crowns)
    stop_started = clock.monotonic()
    for crown in crowns:
        crown.stop(timeout=0)  # every crown starts stopping at once
    for crown in crowns:
        crown.stop(timeout=max(0.0, stop_started + bench.SETTLE_LIMIT - clock.monotonic()))
    print(json.dumps({
        "cpu_percent_at_rest": round(cpu * 100, 1), "leaders_at_end_of_rest": leaders,
        "stopped": sum(c.phase == "stopped" for c in crowns), "stop_s": round(clock.monotonic() - stop_started, 2),
    }), flush=True)


# ------------------------------------------------------------------------------ the parent


def measure(servers: "bench.Servers", oracle: str, count: int, rest: float) -> Dict[str, Any]:
    url = servers.url(oracle)
    if oracle == "postgres":  # one session per crown would need 1,000 connections
        url += ("&" if "?" in url else "?") + "sessions=shared"
    servers.requests(oracle)  # start the counter first (Redis: its MONITOR is a connection too)
    base = connections(servers, oracle)
    argv = [sys.executable, os.path.abspath(__file__), "--probe", url, "--crowns", str(count)]
    first = last = None
    child = subprocess.Popen(argv, cwd=bench.ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             universal_newlines=True)
    try:
        line = child.stdout.readline()
        if not line:
            return {"oracle": oracle, "crowns": count, "error": f"the probe exited with {child.wait()}"}
        row: Dict[str, Any] = dict(json.loads(line), oracle=oracle)
        row["server_connections"] = connections(servers, oracle) - base
        first, start = servers.requests(oracle), clock.monotonic()
        child.stdin.write("mark\n")
        child.stdin.flush()
        time.sleep(rest)
        last, elapsed = servers.requests(oracle), clock.monotonic() - start
        row["server_connections_at_rest_end"] = connections(servers, oracle) - base
        child.stdin.write("stop\n")
        child.stdin.flush()
        row.update(json.loads(child.stdout.readline()))
        child.wait(bench.SETTLE_LIMIT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if first is not None and last is not None:
        row["server_requests_per_s"] = round((last - first) / elapsed, 1)
        row["server_requests_per_s_per_crown"] = round((last - first) / elapsed / count, 3)
    give_up = clock.monotonic() + 15  # ZooKeeper closes a session when the client says so, or on expiry
    while connections(servers, oracle) > base and clock.monotonic() < give_up:
        time.sleep(0.2)
    row["server_connections_after_exit"] = connections(servers, oracle) - base
    return row


TABLE = [("oracle", "oracle"), ("crowns", "crowns (elections)"), ("leaders", "leading"),
         ("oracles", "oracle objects"), ("server_connections", "server connections (ZooKeeper: sessions)"),
         ("server_requests_per_s", "server requests/s at rest"), ("threads_after", "threads"),
         ("rss_after_mb", "RSS (MB)"), ("cpu_percent_at_rest", "CPU at rest (%)"),
         ("settle_s", "all leading after (s)"), ("stop_s", "all stopped after (s)"),
         ("server_connections_after_exit", "connections after exit")]


def rst(result: Dict[str, Any]) -> str:
    lines = [f"Run {result['date']} on {bench.describe_machine(result['machine'])}."]
    for count in sorted({row["crowns"] for row in result["rows"]}):
        rows = [row for row in result["rows"] if row["crowns"] == count]
        dates = sorted({row.get("date", result["date"]) for row in rows})
        lines += ["", f".. list-table:: {count} elections in one process, one oracle URL (run {', '.join(dates)})",
                  "   :header-rows: 1", ""]
        for row in [None] + rows:
            cells = [title for _key, title in TABLE] if row is None else [
                str(row.get(key, row.get("error", "?") if key == "leaders" else "")) for key, _title in TABLE]
            lines.append("   * - " + cells[0])
            lines += ["     - " + cell for cell in cells[1:]]
        lines += ["", f"Threads by kind ({count} elections): " + "; ".join(
            f"{row['oracle']}: " + ", ".join(f"{kind} {n}" for kind, n in row.get("thread_kinds", {}).items())
            for row in rows) + "."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crowns", default="200,1000", help="comma-separated numbers of crowns")
    parser.add_argument("--oracles", default=",".join(ORACLES))
    parser.add_argument("--rest", type=float, default=10.0, help="seconds of the window at rest")
    parser.add_argument("--keep", action="store_true",
                        help="keep the last run's rows for the other numbers of crowns (each row has its date)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        probe(args.probe, int(args.crowns))
        os._exit(0)  # crowns that did not stop in time must not hold the exit up
    oracles = [o for o in args.oracles.split(",") if o]
    counts = [int(c) for c in args.crowns.split(",") if c]
    result: Dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": bench.machine(),
                              "crowns": counts, "rest_s": args.rest, "rows": []}
    with tempfile.TemporaryDirectory(prefix="crown-sync-scale-") as workdir, bench.Servers(oracles, workdir) as servers:
        for count in counts:
            for oracle in oracles:
                bench.log(f"== {count} elections in one process on {oracle}")
                result["rows"].append(dict(measure(servers, oracle, count, args.rest), date=result["date"]))
                bench.log(f"  {json.dumps(result['rows'][-1])}")
    os.makedirs(bench.RESULTS, exist_ok=True)
    path = os.path.join(bench.RESULTS, "scale.json")
    if args.keep and os.path.exists(path):
        with open(path) as handle:
            last = json.load(handle)
        kept = [dict(row, date=row.get("date", last["date"])) for row in last["rows"] if row["crowns"] not in counts]
        result["rows"] = kept + result["rows"]
    with open(path, "w") as handle:
        json.dump(result, handle, indent=2)
    with open(os.path.join(bench.RESULTS, "scale.rst"), "w") as handle:
        handle.write(rst(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
