#!/usr/bin/env python3
"""Plots from a run.py result file (needs matplotlib; the benchmark itself does not):

    python3 -m venv bench-results/tools-venv
    bench-results/tools-venv/bin/pip install matplotlib
    bench-results/tools-venv/bin/python scripts/bench/plot.py [bench-results/latest.json]

Writes, beside the result file: ping-throughput.png (requests/s and server CPU per request
against the connection count) and ping-latency.png (latency CDF per server at one
connection count). Latency needs a run with --keep-hist.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent


def line_style(name: str) -> str:
    """Solid for the pinned cases, dashed for the spread ones (c-2p, py-2p, mpd-2w, ...)."""
    return "--" if re.search(r"-\d+[pw]$", name) and name != "mpd-1w" else "-"


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench-results" / "latest.json"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else path.parent
    data = json.loads(path.read_text())
    ping = data["scenarios"].get("ping")
    if not ping:
        print("plot: no ping scenario in", path)
        return 1
    per = {int(k): v for k, v in ping["per_conns"].items()}
    counts = sorted(per)
    servers = list(per[counts[0]]["summary"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in servers:
        style = line_style(name)
        ax1.plot(counts, [per[c]["summary"][name]["rate"] / 1000 for c in counts], style,
                 marker="o", label=name)
        ax2.plot(counts, [per[c]["summary"][name]["server_cpu_us_per_op"] for c in counts],
                 style, marker="o", label=name)
    for ax, title in ((ax1, "requests/s (thousands)"), (ax2, "server CPU per request (us)")):
        ax.set_xscale("log")
        ax.set_xlabel("connections (closed loop, one ping in flight each)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    ax1.legend(fontsize=8, title="solid: pinned to CPU 0\ndashed: any CPU", title_fontsize=7)
    fig.suptitle(f"mpd ping throughput vs baselines ({data['meta']['cpu_model']}, "
                 f"{data['meta']['nproc']} CPUs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "ping-throughput.png", dpi=110)
    print("plot: wrote", out / "ping-throughput.png")

    count = 100 if 100 in per else counts[0]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = 0
    for name, runs in per[count]["runs"].items():
        hist = runs[0].get("hist_us")
        if not hist:
            continue
        total = sum(n for _, n in hist)
        xs, ys, seen = [], [], 0
        for us, n in hist:
            seen += n
            xs.append(us)
            ys.append(seen / total)
        ax.plot(xs, ys, line_style(name), label=name)
        drawn += 1
    if drawn:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("latency (us), log scale")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"ping latency CDF at {count} connections (first round)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "ping-latency.png", dpi=110)
        print("plot: wrote", out / "ping-latency.png")
    else:
        print("plot: no histograms (run with --keep-hist)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
