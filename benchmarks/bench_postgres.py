"""PostgreSQL leader election: crown_sync's Postgres oracle vs a hand-written poller.

Both run against the same throwaway PostgreSQL (started here from the system's binaries, fsync
on, on loopback), in one run. Every contender is its own process whose leader work journals
itself (crown_sync.testing.journal), so every latency comes from the journal, and the journal is
checked for overlapping terms at the end.

* crown_sync: ``python -m crown_sync.testing.contender`` with the oracle's default options
  (lease 10 s, confirm_interval 2 s, wait_timeout 5 s) and a thread child.
* poller: what people write by hand: ``SELECT pg_try_advisory_lock(key)`` every second on an
  autocommit connection; the winner holds the lock and works until SIGTERM (then unlocks) or
  SIGKILL. It has no deadline and no confirmation (so no lease safety) and no durable token.

Figures:

* graceful handoff: SIGTERM to the leader's process (crown_sync: ``Crown.stop()``: stop the
  child, then unlock). Reported as the leaderless gap: the old term's last journal line to the
  new term's first.
* crash failover: SIGKILL to the leader's process; from the kill to the new term's first line.
  crown_sync's woken follower waits ``takeover_delay`` (50 ms) only when its predecessor's
  session may have been terminated under it, not after a crash; the ``crown_sync/td0`` fleet
  (``takeover_delay=0``) is the same fleet without that protection, for comparison.
* session killed under a live leader: ``pg_terminate_backend`` of the leader's session (from a
  connection opened beforehand); how long until the old term's last journal line (the leader's
  reaction) and until the new term's first line. The journal check shows whether the two
  overlapped. Not run for the poller, whose leader never notices and works on forever.
* statements/s at rest, counted by the server: ``log_statement = 'all'`` with the backend pid
  in every log line, over a quiet window with 1 leader and 2 followers; the leader's and the
  followers' sessions are told apart by ``pg_locks``.

Results are printed as a table and saved to ``benchmarks/results/postgres.json``.

Usage: ``python benchmarks/bench_postgres.py [--graceful 20] [--crash 20] [--rest 30]
[--contenders 3] [--output PATH]`` (``--contenders 200 --terminate 0 --rest 0``: the many-contenders
row of docs/benchmarks.rst).
"""

import argparse
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from crown_sync import clock  # noqa: E402
from crown_sync.testing import journal  # noqa: E402
from crown_sync_chaos.runner import JournalTail  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "postgres.json")
NAME = "bench-postgres"


# -------------------------------------------------------------------- the hand-written poller


def poller_main(args) -> int:
    """A hand-written leader election: try the lock every ``--poll`` seconds."""
    import psycopg

    from crown_sync.oracles.postgres import advisory_key

    key = advisory_key("crown_sync", args.name)
    conn = psycopg.connect(args.url, autocommit=True, application_name=f"poller {args.identity}")
    log = journal.Journal(args.journal)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    leading, token = False, None
    next_poll = clock.monotonic()
    while not stopping:
        now = clock.monotonic()
        if leading:
            log.write("beat", args.name, args.identity, token)
            time.sleep(0.005)
            continue
        if now < next_poll:
            time.sleep(min(0.05, next_poll - now))
            continue
        next_poll = now + args.poll
        if conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
            token = int(conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0])
            leading = True
            log.write("start", args.name, args.identity, token)
    if leading:
        log.write("stop", args.name, args.identity, token)
        conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
    conn.close()
    return 0


# ------------------------------------------------------------------------------- the fleet


class _TermView:
    """A term as the journal tail sees it (identity, token, start, end, beats, stopped)."""

    def __init__(self, term):
        self.identity, self.token = term["identity"], term["token"]
        self.start, self.end = term["start"], term["last"]
        self.beats, self.stopped = term["lines"] - 1, term["stopped"]


class Fleet:
    """Contender processes of one system, one journal."""

    def __init__(self, system: str, url: str, directory: str, name: str):
        self.system = system
        self.kind = "poller" if system == "poller" else "crown_sync"
        self.url = url
        self.name = name
        label = system.replace("/", "-")
        self.journal = os.path.join(directory, f"{label}.journal.jsonl")
        self.events = os.path.join(directory, f"{label}.events.jsonl")
        self.processes = {}
        self.spawned_at = {}
        self.count = 0
        self._tail = JournalTail(self.journal)

    def spawn(self) -> str:
        self.count += 1
        identity = f"{self.system.replace('/', '-')}-{self.count}"
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if self.kind == "crown_sync":
            argv = [sys.executable, "-m", "crown_sync.testing.contender", "--name", self.name,
                    "--oracle", self.url, "--journal", self.journal, "--identity", identity,
                    "--events", self.events]
        else:
            argv = [sys.executable, os.path.abspath(__file__), "--poller", "--name", self.name,
                    "--url", self.url, "--journal", self.journal, "--identity", identity]
        self.processes[identity] = subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True)
        self.spawned_at[identity] = clock.monotonic()
        return identity

    def populate(self, count: int) -> None:
        """Start ``count`` contenders at once, then wait until each contends."""
        for identity in [self.spawn() for _ in range(count)]:
            self.ready(identity)

    def ready(self, identity: str, timeout: float = 60.0) -> None:
        """Wait until ``identity`` contends (crown_sync: it watches the leader; poller: it polled)."""
        end = clock.monotonic() + timeout
        while clock.monotonic() < end:
            if self.kind == "crown_sync":
                if os.path.exists(self.events):
                    with open(self.events) as handle:
                        for line in handle:
                            event = json.loads(line)
                            if event.get("identity") == identity and event["event"] in (
                                "crown.monitor.started", "crown.leadership.claimed"
                            ):
                                return
            else:
                time.sleep(max(0.0, self.spawned_at[identity] + 1.5 - clock.monotonic()))  # it has polled
                return
            time.sleep(0.02)
        raise TimeoutError(f"{identity} did not start contending")

    def terms(self):
        """Every term so far, read incrementally (re-reading the whole journal at every poll would
        take the CPU the contenders being measured need, on a small machine)."""
        self._tail.poll()
        return [_TermView(t) for t in self._tail.terms.values()]

    def running(self, after: float = float("-inf"), min_beats: int = 5):
        now = clock.monotonic()
        for term in sorted(self.terms(), key=lambda t: t.start, reverse=True):
            if not term.stopped and term.beats >= min_beats and now - term.end < 0.25 and term.start > after:
                return term
        return None

    def wait_running(self, after: float = float("-inf"), timeout: float = 60.0):
        end = clock.monotonic() + timeout
        while clock.monotonic() < end:
            term = self.running(after)
            if term is not None:
                return term
            time.sleep(0.01)
        raise TimeoutError("no running term")

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()


def trial(fleet: Fleet, kind: str) -> float:
    """One handoff: returns seconds (graceful: leaderless gap; crash: kill to new term)."""
    old = fleet.wait_running()
    process = fleet.processes[old.identity]
    started = clock.monotonic()
    process.send_signal(signal.SIGTERM if kind == "graceful" else signal.SIGKILL)
    new = fleet.wait_running(after=started)
    process.wait(30)
    if kind == "graceful":
        ended = [t for t in fleet.terms() if t.identity == old.identity and t.token == old.token][0]
        result = new.start - ended.end
    else:
        result = new.start - started
    fleet.ready(fleet.spawn())  # back to as many contenders, the newcomer contending
    return result


def terminate_trial(fleet: Fleet, admin, key: int):
    """pg_terminate_backend of the leader's session: (old term's end, new term's start) after it."""
    from crown_sync.oracles.postgres import _key_parts

    old = fleet.wait_running()
    hi, lo = _key_parts(key)
    pid = admin.execute(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
        " AND classid::bigint = %s AND objid::bigint = %s", (hi, lo)).fetchone()[0]
    started = clock.monotonic()
    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    new = fleet.wait_running(after=started)
    time.sleep(0.1)
    ended = [t for t in fleet.terms() if t.identity == old.identity and t.token == old.token][0]
    return ended.end - started, new.start - started


def percentile(samples, q):
    ordered = sorted(samples)
    if not ordered:
        return None
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[index]


def summary(samples):
    return {
        "n": len(samples),
        "p50_ms": round(percentile(samples, 50) * 1000, 2),
        "p95_ms": round(percentile(samples, 95) * 1000, 2),
        "mean_ms": round(statistics.mean(samples) * 1000, 2),
        "max_ms": round(max(samples) * 1000, 2),
        "samples_ms": [round(s * 1000, 3) for s in samples],
    }


def at_rest(fleet: Fleet, server, key: int, seconds: float) -> dict:
    """Statements per second per session over a quiet window, from the server's log."""
    from crown_sync.oracles.postgres import _key_parts

    fleet.wait_running()
    time.sleep(2.0)  # let start-up traffic pass
    with open(server.logfile, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        offset = handle.tell()
    time.sleep(seconds)
    with open(server.logfile, "rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    counts = {}
    pattern = re.compile(r"\[(\d+)\] (.*?) ?LOG:  (?:statement|execute [^:]*):")
    for match in pattern.finditer(text):
        if match.group(2).startswith("crown_sync reader"):
            continue
        counts[int(match.group(1))] = counts.get(int(match.group(1)), 0) + 1
    hi, lo = _key_parts(key)
    holder = server.sql(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
        " AND classid::bigint = %s AND objid::bigint = %s", (hi, lo))
    holder = holder[0][0] if holder else None
    sessions = [r[0] for r in server.sql(
        "SELECT pid FROM pg_stat_activity WHERE application_name LIKE %s",
        ("crown_sync %" if fleet.kind == "crown_sync" else "poller %",))]
    followers = [counts.get(pid, 0) / seconds for pid in sessions if pid != holder]
    return {
        "window_s": seconds,
        "sessions": len(sessions),
        "leader_per_s": round(counts.get(holder, 0) / seconds, 3),
        "follower_per_s": round(statistics.mean(followers), 3) if followers else None,
        "per_contender_per_s": round(sum(counts.get(pid, 0) for pid in sessions) / seconds / max(1, len(sessions)), 3),
    }


def run_system(system: str, server, args, directory: str) -> dict:
    import psycopg

    from crown_sync.oracles.postgres import advisory_key

    name = f"{NAME}-{system.replace('/', '-')}"
    url = server.url + ("?takeover_delay=0" if system == "crown_sync/td0" else "")
    fleet = Fleet(system, url, directory, name)
    key = advisory_key("crown_sync", name)
    result = {}
    try:
        fleet.populate(args.contenders)
        for kind, count in (("graceful", args.graceful), ("crash", args.crash)):
            samples = []
            for i in range(count):
                samples.append(trial(fleet, kind))
                print(f"  {system} {kind} {i + 1}/{count}: {samples[-1] * 1000:.1f} ms", flush=True)
            result[kind] = summary(samples)
        if fleet.kind == "crown_sync" and args.terminate:
            reactions, takeovers = [], []
            with psycopg.connect(server.superuser_dsn, autocommit=True) as admin:
                for i in range(args.terminate):
                    reaction, takeover = terminate_trial(fleet, admin, key)
                    reactions.append(reaction)
                    takeovers.append(takeover)
                    print(f"  {system} terminate {i + 1}/{args.terminate}: old ended {reaction * 1000:.1f} ms,"
                          f" new started {takeover * 1000:.1f} ms", flush=True)
            result["terminate_old_end"] = summary(reactions)
            result["terminate_new_start"] = summary(takeovers)
            result["terminate_overlaps"] = sum(1 for r, t in zip(reactions, takeovers) if t <= r)
        if system != "crown_sync/td0" and args.rest:
            server.sql("ALTER SYSTEM SET log_statement = 'all'")
            server.sql("SELECT pg_reload_conf()")
            # Fresh contenders, so every session runs with the reloaded setting from its start.
            for identity, process in list(fleet.processes.items()):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    process.wait(30)
            for _ in range(3):
                fleet.ready(fleet.spawn())
            result["at_rest"] = at_rest(fleet, server, key, args.rest)
            server.sql("ALTER SYSTEM RESET log_statement")
            server.sql("SELECT pg_reload_conf()")
    finally:
        fleet.stop_all()
    report = journal.check(fleet.journal, name)
    result["journal"] = {"terms": len(report.terms), "overlaps": len(report.overlaps),
                         "token_violations": len(report.token_violations), "ok": report.ok}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--graceful", type=int, default=20, help="graceful handoff trials")
    parser.add_argument("--crash", type=int, default=20, help="crash failover trials")
    parser.add_argument("--rest", type=float, default=30.0, help="seconds of the at-rest window")
    parser.add_argument("--terminate", type=int, default=10, help="pg_terminate_backend trials")
    parser.add_argument("--systems", default="crown_sync,crown_sync/td0,poller")
    parser.add_argument("--contenders", type=int, default=3,
                        help="contender processes per system (the at-rest window always has 3; 0 s skips it)")
    parser.add_argument("--output", default=RESULTS, help="where to save the results")
    # the poller process
    parser.add_argument("--poller", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--journal", help=argparse.SUPPRESS)
    parser.add_argument("--identity", help=argparse.SUPPRESS)
    parser.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.poller:
        return poller_main(args)

    import tempfile
    from importlib import metadata

    import psycopg

    from crown_sync.testing.postgres_server import PostgresServer

    directory = tempfile.mkdtemp(prefix="crown-sync-bench-pg-")
    server = PostgresServer(fsync=True, settings={"max_connections": str(max(200, 2 * args.contenders + 20))})
    results = {
        "benchmark": "postgres",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count()},
        "versions": {"psycopg": metadata.version("psycopg"), "libpq": psycopg.pq.version()},
        "settings": {"crown_sync": "PostgresOracle defaults (lease 10 s, confirm_interval 2 s,"
                     " wait_timeout 5 s); thread child journaling every 5 ms",
                     "crown_sync/td0": "the same with takeover_delay=0",
                     "poller": "pg_try_advisory_lock every 1 s", "server": "loopback, fsync on"},
        "params": {"contenders": args.contenders, "graceful": args.graceful, "crash": args.crash},
        "systems": {},
    }
    try:
        server.start()
        results["versions"]["postgresql"] = server.sql("SHOW server_version")[0][0]
        for system in args.systems.split(","):
            print(f"{system}:", flush=True)
            results["systems"][system] = run_system(system, server, args, directory)
    finally:
        server.cleanup()

    systems = results["systems"]
    header = f"{'':32}" + "".join(f"{s:>16}" for s in systems)
    print()
    print(header)

    def get(*path):
        def cell(r):
            for step in path:
                if not isinstance(r, dict) or step not in r:
                    return "-"
                r = r[step]
            return r
        return cell

    rows = [
        ("graceful handoff p50 (ms)", get("graceful", "p50_ms")),
        ("graceful handoff p95 (ms)", get("graceful", "p95_ms")),
        ("crash failover p50 (ms)", get("crash", "p50_ms")),
        ("crash failover p95 (ms)", get("crash", "p95_ms")),
        ("terminate: old ended p50 (ms)", get("terminate_old_end", "p50_ms")),
        ("terminate: old ended p95 (ms)", get("terminate_old_end", "p95_ms")),
        ("terminate: new began p50 (ms)", get("terminate_new_start", "p50_ms")),
        ("terminate: overlapping trials", get("terminate_overlaps")),
        ("at rest: leader stmts/s", get("at_rest", "leader_per_s")),
        ("at rest: follower stmts/s", get("at_rest", "follower_per_s")),
        ("at rest: per contender /s", get("at_rest", "per_contender_per_s")),
        ("journal: terms", get("journal", "terms")),
        ("journal: overlaps", get("journal", "overlaps")),
        ("journal: token violations", get("journal", "token_violations")),
    ]
    for label, cell in rows:
        print(f"{label:32}" + "".join(f"{cell(r)!s:>16}" for r in systems.values()))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"\nsaved {os.path.relpath(args.output, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
