"""Issue 13's targets, each read from this run's results: the summary table at the end."""

from __future__ import annotations

import operator
from typing import Any, Callable

from common import Report, cpu_of, median, rate_of, ratio, round_ratios

Row = tuple[str, float, str, Callable[[float, float], bool], float]


def target_rows(scenarios: dict[str, Any]) -> list[Row]:
    """(what, figure, goal as text, comparison, goal) for each target this run measured."""
    le, ge = operator.le, operator.ge
    rows: list[Row] = []
    for conns in ("10", "100", "1000"):
        runs = scenarios.get("ping", {}).get("per_conns", {}).get(conns, {}).get("runs")
        if runs:
            rows += [
                (f"ping {conns} conns, pinned: mpd-1w server CPU/request / c",
                 round_ratios(runs, "mpd-1w", "c", cpu_of), "<= 1.15", le, 1.15),
                (f"ping {conns} conns, pinned: mpd-1w server CPU/request / py-rawfd",
                 round_ratios(runs, "mpd-1w", "py-rawfd", cpu_of), "<= 1.05", le, 1.05),
                (f"ping {conns} conns, pinned: mpd-1w requests/s / c",
                 round_ratios(runs, "mpd-1w", "c", rate_of), ">= 0.95", ge, 0.95)]
    runs = scenarios.get("connrate", {}).get("runs")
    if runs:
        rows.append(("connrate, pinned: mpd-1w connections/s / c",
                     round_ratios(runs, "mpd-1w", "c", rate_of), ">= 0.95", ge, 0.95))
    runs = scenarios.get("handoff", {}).get("runs")
    if runs:
        rows.append(("handoff, pinned: mpd-4w connections/s / c on the same traffic",
                     round_ratios(runs, "mpd-4w handoff", "c handoff-traffic", rate_of),
                     ">= 0.4", ge, 0.4))
        unloaded = runs.get("mpd-4w handoff 1-in-flight pinned", [])
        rows.append(("handoff, 1 in flight, pinned: server latency_us p99",
                     median([r["handoff_p99_us"] for r in unloaded if "handoff_p99_us" in r]),
                     "< 200 us", operator.lt, 200.0))
    runs = scenarios.get("splitsend", {}).get("runs")
    if runs and "mpd" in runs and "c" in runs:
        rows.append(("splitsend (mpclient2, 10 clients, 10 ms): mpd replies / c",
                     median([ratio(x["replies"], y["replies"])
                             for x, y in zip(runs["mpd"], runs["c"])]),
                     ">= 4", ge, 4.0))
    return rows


def report_targets(report: Report, scenarios: dict[str, Any]) -> list[dict[str, Any]]:
    rows = target_rows(scenarios)
    if not rows:
        return []
    report.heading("issue 13's targets against this run (ratios: median of per-round ratios)")
    report.table(["target", "this run", "goal", "met"],
                 [[what, figure, goal, "-" if figure != figure else
                   ("yes" if compare(figure, bound) else "no")]
                  for what, figure, goal, compare, bound in rows])
    return [{"target": what, "figure": figure, "goal": goal} for what, figure, goal, _c, _b
            in rows]
