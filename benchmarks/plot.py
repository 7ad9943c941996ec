"""Plot the failover distributions of the last benchmark run: ``python benchmarks/plot.py``.

Reads ``benchmarks/results/summary.json`` (written by ``benchmarks/run.py``) and draws, per oracle,
the graceful handoff and crash failover samples of crown_sync and of the peers (box plots with
every sample shown as a dot, log scale) into ``docs/_static/failover.png``. Needs matplotlib.
Every point is a measured sample; nothing is typed in.
"""

import argparse
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def series(summary, oracle, scenario):
    """[(label, samples_ms)] for one oracle and scenario ("graceful" or "crash")."""
    out = []
    for row in summary.get("failover", []):
        if row.get("oracle") != oracle:
            continue
        if scenario == "graceful":
            stat, how = row.get("graceful_signal"), ""
            if not stat:
                stat, how = row.get("graceful_gap"), " (gap)"
        else:
            stat, how = row.get("crash"), ""
        samples = (stat or {}).get("samples_ms")
        if not samples:
            continue
        label = f"{row['system']}\n{row.get('contenders', '?')} contenders{how}"
        out.append((label, samples))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", default=os.path.join(HERE, "results", "summary.json"))
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "_static", "failover.png"))
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.input) as handle:
        summary = json.load(handle)
    oracles = [o for o in summary.get("oracles", []) if series(summary, o, "graceful") or series(summary, o, "crash")]
    if not oracles:
        print("no failover samples in", args.input, file=sys.stderr)
        return 1
    scenarios = (("graceful", "graceful handoff (signal to new term)"), ("crash", "crash failover (SIGKILL to new term)"))
    widths = [max(1, len(series(summary, o, "graceful")), len(series(summary, o, "crash"))) for o in oracles]
    figure, axes = plt.subplots(len(scenarios), len(oracles), squeeze=False,
                                figsize=(max(8, 1.6 * sum(widths) + 2), 9),
                                gridspec_kw={"width_ratios": widths})
    jitter = random.Random(0)  # fixed: the same data always gives the same picture
    for row, (scenario, title) in enumerate(scenarios):
        for column, oracle in enumerate(oracles):
            ax = axes[row][column]
            data = series(summary, oracle, scenario)
            if not data:
                ax.set_axis_off()
                continue
            labels = [label for label, _ in data]
            values = [samples for _, samples in data]
            ax.boxplot(values, whis=(5, 95), showfliers=False, widths=0.6)
            for index, samples in enumerate(values, start=1):
                xs = [index + jitter.uniform(-0.18, 0.18) for _ in samples]
                colour = "tab:blue" if labels[index - 1].startswith("crown_sync") else "tab:orange"
                ax.scatter(xs, samples, s=10, alpha=0.7, color=colour, zorder=3)
            ax.set_xticks(range(1, len(labels) + 1))
            ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
            ax.set_yscale("log")
            ax.grid(axis="y", which="both", alpha=0.3)
            ax.set_title(f"{oracle}: {title}", fontsize=9)
            if column == 0:
                ax.set_ylabel("milliseconds (log scale)")
    machine = summary.get("machine", {})
    figure.suptitle(f"crown_sync and peers, run {summary.get('date', '?')} on {machine.get('cpu', '?')}, "
                    f"{machine.get('cpus', '?')} CPUs (boxes: p5-p95 whiskers; dots: every sample)", fontsize=10)
    figure.tight_layout()
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    figure.savefig(args.output, dpi=110)
    print(f"saved {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
