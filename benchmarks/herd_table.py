"""Render the many-contenders runs of ``benchmarks/run.py`` side by side:
``python benchmarks/herd_table.py`` reads the ``benchmarks/results/herd_*.json`` of RUNS (each
written by ``run.py --skip-peers --sizes 3,200 --output ...``) and of PEERS, and writes ``herd.rst``
(included by docs/benchmarks.rst). Nothing is typed in: every cell comes from those files."""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run as bench  # noqa: E402  (run.py's cell formats)

RUNS = (("before", "herd_before.json"), ("after", "herd_after.json"),
        ("after, sessions=shared", "herd_postgres_shared.json"), ("after, NATS heir fixes", "herd_nats.json"),
        ("heirs (Redis, NATS)", "herd_heirs.json"), ("heirs, final Redis", "herd_heirs_redis_final.json"),
        ("PostgreSQL line", "herd_postgres_line.json"))
COLUMNS = ("run", "oracle", "contenders", "graceful handoff p50 / p95", "crash failover p50 / p95",
           "server requests per handoff / per failover", "overlaps")


def rows(results: str):
    for label, filename in RUNS:
        path = os.path.join(results, filename)
        if not os.path.exists(path):
            continue
        with open(path) as handle:
            summary = json.load(handle)
        for row in summary["failover"]:
            per = [row.get("requests_per_graceful"), row.get("requests_per_crash")]
            yield [f"{label} ({summary['machine'].get('commit', '?')})", row["oracle"], str(row["contenders"]),
                   bench._cell(row.get("graceful_signal")), bench._cell(row.get("crash")),
                   " / ".join("–" if v is None else f"{v:g}" for v in per), str(row["journal"]["overlaps"])]


#: The peers with many contender processes, each next to crown_sync on one server in one run:
#: ``bench_zookeeper.py --sizes 3,200`` (kazoo's Election, tooz; each system's contenders in one process),
#: ``bench_redis.py --contenders 200`` (redis-py's Lock, tooz), ``bench_nats.py --contenders 200``
#: (the hand-written KV loop), ``bench_memcached.py --contenders 200 --systems crown_sync,tooz``
#: (tooz), ``bench_postgres.py --contenders 200 --terminate 0 --rest 0 --systems crown_sync,poller``
#: (the hand-written pg_try_advisory_lock poller), each with
#: ``--output benchmarks/results/herd_peers_<oracle>.json``.
PEERS = ("zookeeper", "redis", "nats", "memcached", "postgres")
PEER_COLUMNS = ("oracle", "system", "contenders", "graceful handoff p50 / p95", "crash failover p50 / p95")
#: The scripts whose results are per system for one fleet size: their graceful and crash figures
#: (bench_postgres.py's graceful figure is the leaderless gap; bench_memcached.py's, from the signal).
_FLEET_LAYOUT = {"memcached": ("graceful_from_signal", "crash_failover"), "postgres": ("graceful", "crash")}


def peer_rows(results: str):
    for oracle in PEERS:
        path = os.path.join(results, f"herd_peers_{oracle}.json")
        if not os.path.exists(path):
            continue
        with open(path) as handle:
            summary = json.load(handle)
        if oracle in _FLEET_LAYOUT:  # one fleet size per run, a result per system
            graceful, crash = _FLEET_LAYOUT[oracle]
            contenders = summary["params"]["contenders"]
            for system, r in summary["systems"].items():
                yield [oracle, system, str(contenders), bench._cell(r.get(graceful)),
                       bench._cell(r.get(crash) if r.get(crash, {}).get("n") else None)]
            continue
        found = {(r["system"], r["contenders"], r["scenario"]): r for r in summary["results"] if "p50_ms" in r}
        for system, contenders in sorted({(s, c) for s, c, _ in found}, key=lambda k: (k[1], k[0])):
            yield [oracle, system, str(contenders), bench._cell(found.get((system, contenders, "graceful"))),
                   bench._cell(found.get((system, contenders, "crash")))]


def table(title: str, columns, body) -> list:
    lines = [f".. list-table:: {title}", "   :header-rows: 1", ""]
    for cells in [list(columns), *body]:
        lines.append("   * - " + cells[0])
        lines.extend("     - " + cell for cell in cells[1:])
    return lines


def main() -> int:
    results = os.path.join(HERE, "results")
    lines = table("3 and 200 contender processes on one election", COLUMNS, rows(results))
    peers = list(peer_rows(results))
    if peers:
        lines += [""] + table("The peers with many contender processes (each oracle: one run, one server)",
                              PEER_COLUMNS, peers)
    with open(os.path.join(results, "herd.rst"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
