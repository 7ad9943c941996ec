"""Plot the failover distributions of the last benchmark run: ``python benchmarks/plot.py``.

Reads ``benchmarks/results/summary.json`` (written by ``benchmarks/run.py``) and draws one panel per
oracle, one row per system and fleet size, every measured graceful handoff and crash failover as a
dot (medians as bars) on one logarithmic time axis, into ``docs/_static/failover.png``. Sized to be
read at the width of a documentation page. Needs matplotlib. Every point is a measured sample;
nothing is typed in.
"""

import argparse
import json
import os
import random
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (what, key in summary.json, legend label, marker style). A row shows the leaderless gap only
# where the time from the signal was not measured (the peers' scripts time the gap alone).
SCENARIOS = (
    ("graceful", "graceful_signal", "graceful handoff: signal \u2192 successor's first work",
     dict(marker="o", color="tab:blue")),
    ("gap", "graceful_gap", "graceful handoff, leaderless gap (rows without the above)",
     dict(marker="o", facecolors="none", edgecolors="tab:blue")),
    ("crash", "crash", "crash failover: SIGKILL \u2192 successor's first work",
     dict(marker="^", color="tab:red")),
)
TICKS = {1: "1 ms", 3: "3 ms", 10: "10 ms", 30: "30 ms", 100: "100 ms", 300: "300 ms", 1000: "1 s",
         3000: "3 s", 10000: "10 s"}
OFFSET = {"graceful": 0.18, "gap": 0.18, "crash": -0.18}  # within a row: handoffs above, crashes below


def rows(summary, oracle):
    """[(label, {what: samples_ms})] for one oracle, in the order of the run's table."""
    out = []
    for row in summary.get("failover", []):
        if row.get("oracle") != oracle:
            continue
        found = {}
        for what, key, _, _ in SCENARIOS:
            samples = (row.get(key) or {}).get("samples_ms")
            if samples and not (what == "gap" and "graceful" in found):
                found[what] = samples
        if found:
            out.append((f"{row['system']}, {row.get('contenders', '?')} contenders", found))
    return out


def draw_panel(ax, oracle, data, jitter) -> None:
    for y, (_, found) in enumerate(data):
        for what, samples in found.items():
            style = dict(SCENARIOS[[s[0] for s in SCENARIOS].index(what)][3])
            centre = -y + OFFSET[what]  # first row on top
            ys = [centre + jitter.uniform(-0.07, 0.07) for _ in samples]
            ax.scatter(samples, ys, s=14, alpha=0.75, linewidths=0.8, zorder=3, **style)
            median = statistics.median(samples)
            ax.plot([median, median], [centre - 0.14, centre + 0.14], color="black", lw=1.6, zorder=4)
    ax.set_yticks([-y for y in range(len(data))])
    ax.set_yticklabels([label for label, _ in data], fontsize=8)
    for label in ax.get_yticklabels():
        if label.get_text().startswith("crown_sync"):
            label.set_fontweight("bold")
    ax.set_ylim(-len(data) + 0.5, 0.5)
    for y in range(1, len(data)):
        ax.axhline(-y + 0.5, color="0.85", lw=0.6)
    ax.set_xscale("log")
    ax.set_xticks(list(TICKS))
    ax.set_xticklabels(list(TICKS.values()), fontsize=8)
    ax.tick_params(axis="x", labelbottom=True)  # every panel keeps its scale in view
    ax.grid(axis="x", which="major", alpha=0.4)
    ax.grid(axis="x", which="minor", alpha=0.12)
    ax.set_title(oracle, fontsize=10, loc="left", fontweight="bold")


def legend(figure) -> None:
    import matplotlib.lines as mlines

    handles = [
        mlines.Line2D([], [], linestyle="none", markersize=6,
                      marker=style["marker"], markerfacecolor=style.get("color", style.get("facecolors")),
                      markeredgecolor=style.get("color", style.get("edgecolors")), label=label)
        for _, _, label, style in SCENARIOS
    ]
    handles.append(mlines.Line2D([], [], color="black", lw=1.6, marker="|", markersize=0, label="median"))
    figure.legend(handles=handles, loc="upper center", ncol=2, fontsize=8, frameon=False,
                  bbox_to_anchor=(0.5, 0.975))


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
    panels = [(o, rows(summary, o)) for o in summary.get("oracles", [])]
    panels = [(o, data) for o, data in panels if data]
    if not panels:
        print("no failover samples in", args.input, file=sys.stderr)
        return 1
    heights = [len(data) + 0.6 for _, data in panels]  # a row's height is the same in every panel
    # 8 inches: a documentation page's width, so that the 8-point labels stay readable there.
    figure, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False,
                                figsize=(8, 0.34 * sum(heights) + 2.6),
                                gridspec_kw={"height_ratios": heights})
    jitter = random.Random(0)  # fixed: the same data always gives the same picture
    for ax, (oracle, data) in zip(axes[:, 0], panels):
        draw_panel(ax, oracle, data, jitter)
    axes[-1][0].set_xlabel("time (logarithmic scale)", fontsize=9)
    machine = summary.get("machine", {})
    figure.suptitle(f"Handoff and failover times, run {str(summary.get('date', '?'))[:10]} on "
                    f"{machine.get('cpus', '?')} CPUs (each dot: one measured sample)", fontsize=10)
    legend(figure)
    figure.tight_layout(rect=(0, 0, 1, 0.955))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    figure.savefig(args.output, dpi=150)
    print(f"saved {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
