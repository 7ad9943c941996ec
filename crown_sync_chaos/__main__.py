"""``python -m crown_sync_chaos``: run the fault-injection rounds and print the summary table.

Exit status: 0 when every oracle's journal shows no overlapping terms and no token order
violation, every injected fault was confirmed, every fault that must end a term was followed by a
new term, and no contender died by itself; 1 otherwise; 2 when network partitions were required
(``CI=true`` or ``--require-partition``) but namespaces could not be made.
"""

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List

from .kinds import KINDS, available_kinds
from .netns import NetnsUnavailable
from .runner import Runner, kind_faults


def format_table(results: List[Dict[str, Any]]) -> str:
    """A Markdown table: one row per oracle."""
    header = ["oracle", "rounds", "faults by kind", "terms", "overlaps", "token violations",
              "max gap (s)", "bound (s)", "over bound", "partition"]
    rows = []
    for r in results:
        faults = ", ".join(f"{k} {v}" for k, v in r["faults"].items())
        bound = r["max_gap_bound_s"] if r["max_gap_bound_s"] is not None else r["bound_s"]
        where = f" ({r['max_gap_round']['fault']})" if r.get("max_gap_round") else ""
        rows.append([
            r["oracle"], str(r["rounds"]), faults, str(r["terms"]), str(r["overlaps"]),
            str(r["token_violations"]), f"{r['max_gap_s']:.3f}{where}", f"{bound:.1f}" if bound else "-",
            str(len(r["over_bound"])), "yes" if r["partition"].startswith("yes") else r["partition"],
        ])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def problems(result: Dict[str, Any]) -> List[str]:
    found = []
    if result["overlaps"]:
        found.append(f"{result['overlaps']} overlapping terms")
    if result["token_violations"]:
        found.append(f"{result['token_violations']} token order violations")
    if result["unconfirmed"]:
        found.append(f"faults not confirmed in rounds {result['unconfirmed']}")
    if result["missing_new_terms"]:
        found.append(f"no new term after the fault in rounds {result['missing_new_terms']}")
    if result["stalled"]:
        found.append(f"no leader within the recovery timeout in rounds {result['stalled']}")
    if result["faults"].get("partition") and not result["leader_partitions"]:
        found.append("no partition round cut off the leader")
    if result["unexpected_exits"]:
        found.append(f"contenders exited by themselves: {result['unexpected_exits']}")
    return found


def main(argv=None) -> int:
    names = [k.name for k in KINDS]
    parser = argparse.ArgumentParser(prog="python -m crown_sync_chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--oracle", default="all", help=f"one of {', '.join(names)}, or all (default)")
    parser.add_argument("--rounds", type=int, default=None, help="fault rounds per oracle")
    parser.add_argument("--seconds", type=float, default=None,
                        help="time budget per oracle: no new round starts after it")
    parser.add_argument("--soak", action="store_true",
                        help="run until --seconds (hours if you like), checking the journal in segments")
    parser.add_argument("--seed", type=int, default=None, help="RNG seed (printed when not given)")
    parser.add_argument("--contenders", type=int, default=3)
    parser.add_argument("--lease", type=float, default=2.0,
                        help="lease / session timeout / ttl given to the oracle (s)")
    parser.add_argument("--child", choices=["process", "command", "thread", "mixed"], default="process",
                        help="the contenders' journaling child (mixed: process, command, thread by slot)")
    parser.add_argument("--interval", type=float, default=None, help="journal beat interval (s)")
    parser.add_argument("--stop-delay", type=float, default=0.0,
                        help="the children keep working this long after SIGTERM, a daemon slow to stop "
                             "(s, default 0; try a little under --grace)")
    parser.add_argument("--grace", type=float, default=2.0,
                        help="the children's grace between SIGTERM and SIGKILL (s, default 2)")
    parser.add_argument("--segment-rounds", type=int, default=None,
                        help="rounds per journal segment (soak default 100)")
    parser.add_argument("--require-partition", action="store_true",
                        help="fail if network namespaces can't be made (implied by CI=true)")
    parser.add_argument("--faults", default=None,
                        help="comma-separated fault kinds to use (default: all the oracle has): sigkill, "
                             "sigstop, groupstop, dismiss, revoke, restart, pause-restart, terminate, "
                             "expire, flush, promote, pause-promote, partition (each oracle takes those "
                             "it supports)")
    parser.add_argument("--workdir", default=None, help="keep journals and logs here")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    available = available_kinds()
    if args.oracle == "all":
        selected = list(available)
    elif args.oracle in names:
        if args.oracle not in available:
            parser.error(f"the {args.oracle} oracle is not available here (its modules do not import)")
        selected = [args.oracle]
    else:
        parser.error(f"--oracle must be one of {', '.join(names)} or all")
    if args.soak and args.seconds is None:
        parser.error("--soak needs --seconds")
    if args.rounds is None and args.seconds is None:
        args.rounds = 6
    if not 0 <= args.stop_delay < float("inf"):
        parser.error(f"--stop-delay must be a finite number of seconds >= 0, got {args.stop_delay}")
    if not 0 < args.grace < float("inf"):
        parser.error(f"--grace must be a finite number of seconds > 0, got {args.grace}")
    require = args.require_partition or os.environ.get("CI", "").lower() == "true"
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    print(f"crown_sync_chaos: seed {seed} (rerun with --seed {seed}); oracles: {', '.join(selected)}",
          flush=True)

    results = []
    failed = False
    for index, name in enumerate(selected):
        workdir = None
        if args.workdir:
            workdir = os.path.join(os.path.abspath(args.workdir), name)
            os.makedirs(workdir, exist_ok=True)
        runner = Runner(
            available[name],
            contenders=args.contenders,
            rounds=args.rounds,
            seconds=args.seconds,
            seed=seed + index,
            lease=args.lease,
            workdir=workdir,
            child=args.child,
            interval=args.interval if args.interval is not None else (0.02 if args.soak else 0.005),
            soak=args.soak,
            segment_rounds=args.segment_rounds or (100 if args.soak else None),
            require_partition=require,
            faults=[f for f in args.faults.split(",") if f in kind_faults(available[name])] if args.faults else None,
            stop_delay=args.stop_delay,
            grace=args.grace,
            log=lambda text: print(text, flush=True),
        )
        try:
            result = runner.run()
        except NetnsUnavailable as exc:
            print(f"crown_sync_chaos: {exc}", file=sys.stderr)
            return 2
        results.append(result)
        for text in result["violations_text"]:
            print(text)
        found = problems(result)
        if found:
            failed = True
            print(f"[{name}] FAILED: " + "; ".join(found), flush=True)

    print()
    print(format_table(results))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seed": seed, "results": results},
                      handle, indent=2, default=str)
    print("\nFAILED" if failed else "\nOK: 0 overlaps and 0 token violations on every oracle")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
