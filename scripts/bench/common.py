"""What every part of the benchmark driver shares: paths, CPUs, progress lines, the /proc
helpers (procfs.py, which needs nothing but the standard library), statistics, ratios and
the report's tables. Standard library only."""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

import procfs as procfs  # noqa: E402 - re-exported: the driver's /proc helpers

T0 = time.monotonic()
ALL_CPUS = sorted(os.sched_getaffinity(0))  # before the driver moves off the pinned CPU
NPROC = len(ALL_CPUS)
PINNED = [0]  # the CPU that server and load generator share in per-core comparisons


def progress(message: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit; servers and load generators inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --- statistics ----------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def ratio(a: float | None, b: float | None) -> float:
    """a / b for two positive figures; NaN (printed "-") when either is missing or <= 0."""
    if a is None or b is None or a != a or b != b or a <= 0 or b <= 0:
        return float("nan")
    return a / b


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


class Report:
    """Tables, printed as they are made and collected for the .md file."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def heading(self, text: str) -> None:
        self.emit(["", f"### {text}", ""])

    def note(self, text: str) -> None:
        self.emit([text, ""])

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
        self.emit(lines + [""])

    def emit(self, lines: list[str]) -> None:
        self.lines += lines
        print("\n".join(lines), flush=True)



# --- summarising ---------------------------------------------------------------------------------

def summarise(results: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    out = {}
    for name, runs in results.items():
        out[name] = {
            "rate": median([r["rate"] for r in runs]),
            "server_cpu_us_per_op": median([r.get("server_cpu_us_per_op", float("nan"))
                                            for r in runs]),
            "client_cpu_us_per_op": median([r["client_cpu_us_per_op"] for r in runs]),
            "master_cpu_us_per_op": median([r.get("master_cpu_us_per_op", float("nan"))
                                            for r in runs]),
            "server_util": median([r.get("server_util", float("nan")) for r in runs]),
            "p50_us": median([r["lat_us"]["p50"] for r in runs]),
            "p99_us": median([r["lat_us"]["p99"] for r in runs]),
            "p999_us": median([r["lat_us"]["p999"] for r in runs]),
            "errors": sum(r.get("errors", 0) + r.get("lost", 0) for r in runs),
        }
    return out


def round_ratios(results: dict[str, list[dict]], a: str, b: str,
                 key: Callable[[dict], float]) -> float:
    """Median over rounds of key(a)/key(b), each ratio taken within one round."""
    if a not in results or b not in results:
        return float("nan")
    by_round = {r["round"]: r for r in results[b]}
    return median([ratio(key(r), key(by_round[r["round"]])) for r in results[a]
                   if r["round"] in by_round])


def rate_of(r: dict) -> float:
    return r["rate"]


def cpu_of(r: dict) -> float:
    return r.get("server_cpu_us_per_op", float("nan"))


def p99_of(r: dict) -> float:
    return r["lat_us"]["p99"]

