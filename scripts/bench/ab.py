#!/usr/bin/env python3
"""Compare versions of mpd side by side on one load: the tool behind "this change costs
0.9x the CPU". Each version runs as its own server; the rounds alternate between them, and
every ratio is the median of per-round ratios against the first version given.

    python scripts/bench/ab.py HEAD~1 .                      # the hand-off load, pinned
    python scripts/bench/ab.py --spread --rounds 5 main .   # spread over every CPU
    python scripts/bench/ab.py --mode connrate --workers 1 v1 v2 v3
    python scripts/bench/ab.py --mode ping --workers 1 baseline:rawfd main .   # and a floor
    python scripts/bench/ab.py --mode splitsend --spread --workers 2 baseline:c main .

A version is a directory holding an mpd/ package (`.` is this checkout, uncommitted
changes included) or a git revision, exported with `git archive` into the results
directory; or one of the baselines, run on the same load beside them: `baseline:rawfd`
(the Python floor), `baseline:c`, `baseline:py` (one process each). Servers, the load
generator, CPU accounting and the hand-off counts (`fd.dispatched` lines, or mpd's
counters where the level hides them) are scripts/bench/run.py's; results go to
bench-results/ab-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import common
import harness
import load
import run
import splitsend

BASELINES = ("baseline:rawfd", "baseline:c", "baseline:py")


def resolve(version: str, into: Path) -> Path:
    """A source tree for `version`: an existing directory, or a git revision exported."""
    path = Path(version)
    if (path / "mpd" / "__init__.py").exists():
        return path.resolve()
    commit = subprocess.run(["git", "rev-parse", "--short", f"{version}^{{commit}}"],
                            cwd=common.ROOT, capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"ab.py: {version!r} is neither a directory with mpd/ nor a git "
                         f"revision: {commit.stderr.strip()}")
    tree = into / f"tree-{commit.stdout.strip()}"
    if not tree.exists():
        archive = into / f"{commit.stdout.strip()}.tar"
        subprocess.run(["git", "archive", "-o", str(archive), commit.stdout.strip(), "mpd"],
                       cwd=common.ROOT, check=True)
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):  # 3.12, and 3.9.17+/3.11.4+ backports
                tar.extractall(tree, filter="data")
            else:
                tar.extractall(tree)
        archive.unlink()
    return tree


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("versions", nargs="+", help="directories with mpd/, or git revisions; "
                   "the first is the baseline of every ratio")
    p.add_argument("--mode", default="handoff",
                   choices=("handoff", "connrate", "ping", "splitsend"),
                   help="splitsend: the seed's mpclient2 against each version at once, "
                   "replies counted (splitsend.py); --duration is its window")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--conns", type=int, default=32, help="connections or cycles in flight")
    p.add_argument("--spread", action="store_true",
                   help="servers and load generator on every CPU (default: all on CPU 0)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--duration", type=float, default=2.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--log-level", default="info")
    p.add_argument("--client-batch", action="store_true",
                   help="the load generator under SCHED_BATCH (see run.py --help)")
    p.add_argument("--mpd-python", help="interpreter that runs mpd (default as run.py)")
    p.add_argument("--out", default=str(common.ROOT / "bench-results"))
    args = p.parse_args(argv)
    args.keep_hist = False  # harness.Bench reads it
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp, out, workdir, _nofile, tools = run.prepare(args.out, "ab", args.mpd_python)
    trees = {version: resolve(version, workdir) for version in args.versions
             if version not in BASELINES}
    cpus = None if args.spread else common.PINNED
    bench = harness.Bench(args, tools, workdir, common.Report())
    if args.mode == "splitsend":
        return split_send(args, bench, trees, cpus, out, stamp)
    try:
        cases = [{"name": version, "mode": args.mode, "cpus": cpus,
                  "server": server(bench, args, i, version, trees.get(version), cpus).start(),
                  "collect": load.dispatched if args.mode == "handoff"
                  and version not in BASELINES else None}
                 for i, version in enumerate(args.versions)]
        results = bench.run_cases("ab", cases, args.conns, args.rounds, args.duration,
                                  args.warmup)
    finally:
        bench.stop_all()
        shutil.rmtree(bench.sockdir, ignore_errors=True)
    report(args, trees, results)
    path = out / f"ab-{stamp}.json"
    path.write_text(json.dumps({"args": vars(args), "trees": {k: str(v) for k, v in
                                                              trees.items()},
                                "runs": results}, indent=1, default=str))
    common.progress(f"results: {path}")
    return 0


def split_send(args: argparse.Namespace, bench: harness.Bench, trees: dict[str, Path],
               cpus: list[int] | None, out: Path, stamp: str) -> int:
    """The seed's mpclient2 against every version at once, round after round: replies in
    --duration seconds from each one's first (splitsend.py)."""
    client = bench.tools.build_mpclient2()
    if client is None:
        raise SystemExit(f"ab.py: splitsend needs mpclient2: {bench.tools.mpclient2_missing}")
    try:
        servers = {version: server(bench, args, i, version, trees.get(version), cpus).start()
                   for i, version in enumerate(args.versions)}
        runs: dict[str, list[int]] = {version: [] for version in servers}
        for r in range(args.rounds):
            for version, res in splitsend.run_clients(client, servers, args.duration).items():
                runs[version].append(res["replies"])
            common.progress(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{v} {runs[v][-1]}" for v in runs))
    finally:
        bench.stop_all()
        shutil.rmtree(bench.sockdir, ignore_errors=True)
    base = args.versions[0]
    print(f"splitsend: the seed's mpclient2, {splitsend.CLIENTS} clients, "
          f"{splitsend.PAUSE_MS} ms pause; replies in {args.duration:g} s from the first; "
          f"mpd with {args.workers} workers; {args.rounds} rounds\n")
    print(f"| version | replies (median) | per round | ratio to {base} (median) |")
    print("|---|---|---|---|")
    for version, counts in runs.items():
        ratios = [common.ratio(x, y) for x, y in zip(counts, runs[base])]
        print(f"| {version} | {common.median(counts)} | {' '.join(map(str, counts))} | "
              f"{common.fmt(common.median(ratios))} |")
    path = out / f"ab-{stamp}.json"
    path.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1, default=str))
    common.progress(f"results: {path}")
    return 0


def server(bench: harness.Bench, args: argparse.Namespace, i: int, version: str,
           tree: Path | None, cpus: list[int] | None) -> harness.Server:
    """mpd from `tree`, or the baseline that `version` names."""
    if version == "baseline:rawfd":
        return bench.rawfd_baseline(f"ab-{i}-rawfd", cpus)
    if version == "baseline:py":
        return bench.py_baseline(f"ab-{i}-py", 0, cpus)
    if version == "baseline:c":
        c = bench.c_baseline(f"ab-{i}-c", 0, cpus)
        if c is None:
            raise SystemExit("ab.py: baseline:c needs a C compiler")
        return c
    assert tree is not None
    return bench.mpd(f"ab-{i}", args.workers, cpus, args.log_level, tree=tree)


def report(args: argparse.Namespace, trees: dict[str, Path],
           results: dict[str, list[dict[str, Any]]]) -> None:
    summary = common.summarise(results)
    base = args.versions[0]
    placement = "spread over every CPU" if args.spread else "server and load generator on CPU 0"
    if args.client_batch:
        placement += ", load generator under SCHED_BATCH"
    print(f"{args.mode}, mpd with {args.workers} workers, {args.conns} in flight, "
          f"{placement}; {args.rounds} rounds of {args.duration:g} s, log level "
          f"{args.log_level}\n")
    print("| version | ops/s | server CPU us/op | master us/op | client p99 us | "
          "ops/s ratio | CPU/op ratio | p99 ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for version in args.versions:
        s = summary[version]
        ratios = [common.round_ratios(results, version, base, key)
                  for key in (common.rate_of, common.cpu_of, common.p99_of)]
        print(f"| {version} | {common.fmt(s['rate'])} | {common.fmt(s['server_cpu_us_per_op'])} | "
              f"{common.fmt(s['master_cpu_us_per_op'])} | {common.fmt(s['p99_us'])} | "
              + " | ".join(common.fmt(r) for r in ratios) + " |")
    if args.mode == "handoff":
        print("\nhand-offs/s (medians): " + ", ".join(
            f"{v} {common.fmt(common.median([r['rate'] * r['handoffs'] / r['completed'] for r in results[v] if r.get('completed')]))}"  # noqa: E501
            for v in args.versions if v not in BASELINES))
    print(f"\nratios: median of per-round ratios against {base}; "
          f"CPU/op per round: " + "; ".join(
              f"{v} " + " ".join(common.fmt(common.ratio(common.cpu_of(r), common.cpu_of(b)))
                                 for r, b in zip(results[v], results[base]))
              for v in args.versions[1:]))


if __name__ == "__main__":
    sys.exit(main())
