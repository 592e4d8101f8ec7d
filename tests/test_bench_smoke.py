"""The benchmark suite runs: every scenario, in its quick form, prints its figures. (No
timing is asserted here; the figures are for BENCHMARKS.md, not for pass or fail.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

HEADINGS = ("### ping", "### connrate", "### handoff", "### splitsend", "### respawn",
            "### memory", "### scale")


def test_every_benchmark_scenario_runs_and_prints_its_figures(tmp_path):
    # -S: no site-packages, so the driver proves it needs the standard library alone (it
    # runs mpd and the baselines with interpreters it finds).
    result = subprocess.run(
        [sys.executable, "-S", str(ROOT / "scripts" / "bench" / "run.py"), "--quick",
         "--scenarios", "all", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    for heading in HEADINGS + ("### issue 13's targets",):
        assert heading in result.stdout, f"{heading} missing:\n{result.stdout[-3000:]}"
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest["failed"] == {}
    assert set(latest["scenarios"]) == {h.split()[1] for h in HEADINGS}
    assert "`mpdctl scale" in result.stdout
    ping = latest["scenarios"]["ping"]["per_conns"]["10"]["runs"]
    assert {"c", "py-rawfd", "py", "asyncio", "mpd-1w"} <= set(ping)
    assert "uvloop" in ping or "uvloop: skipped" in result.stdout
    splitsend = latest["scenarios"]["splitsend"]
    assert "skipped" in splitsend or all(
        run["answered"] and not run["errors"] for runs in splitsend["runs"].values()
        for run in runs)


def test_ab_compares_a_git_revision_with_the_working_tree(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench" / "ab.py"), "--rounds", "1",
         "--duration", "0.3", "--warmup", "0.1", "--out", str(tmp_path), "HEAD", "."],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| HEAD |" in result.stdout and "| . |" in result.stdout, result.stdout
    assert "hand-offs/s (medians): HEAD " in result.stdout
    (saved,) = tmp_path.glob("ab-*.json")
    runs = json.loads(saved.read_text())["runs"]
    assert all(r[0]["handoffs"] > 0 for r in runs.values())


def test_ab_runs_the_seeds_split_sender_against_a_baseline_and_the_working_tree(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench" / "ab.py"), "--mode", "splitsend",
         "--rounds", "1", "--duration", "1", "--workers", "2", "--spread", "--out",
         str(tmp_path), "baseline:rawfd", "."],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    if "splitsend needs mpclient2" in result.stderr:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| baseline:rawfd |" in result.stdout and "| . |" in result.stdout, result.stdout
    (saved,) = tmp_path.glob("ab-*.json")
    runs = json.loads(saved.read_text())["runs"]
    assert runs["."][0] > 0 and runs["baseline:rawfd"][0] > 0  # both answered


def test_the_haproxy_comparison_runs_and_prints_its_figures(tmp_path):
    from haproxy_support import haproxy

    haproxy()  # installed, or the test skipped saying why
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench" / "haproxy.py"), "--rounds", "1",
         "--duration", "0.5", "--warmup", "0.2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in ("| ping (requests) | straight |", "| ping (requests) | haproxy |",
                "| handoff (connections) | haproxy |", "| hand-offs (fd.dispatched) | haproxy |"):
        assert row in result.stdout, result.stdout
    (saved,) = tmp_path.glob("haproxy-*.json")
    runs = json.loads(saved.read_text())["runs"]
    assert all(r[0]["handoffs"] > 0 for name, r in runs.items() if "handoff" in name)


def colocation_quick(tmp_path, targets: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    # -S, as above: the driver needs the standard library alone.
    result = subprocess.run(
        [sys.executable, "-S", str(ROOT / "scripts" / "bench" / "colocation.py"), "--quick",
         "--targets", targets, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    (saved,) = tmp_path.glob("colo-*.json")
    return result, json.loads(saved.read_text())


def assert_ran_clean(saved: dict, target: str) -> None:
    """Every load of the run reached `target`, which delivered something and got nothing
    wrong: no loss, duplicate, reordering, misrouting or corruption."""
    for key, placements in saved["loads"].items():
        for placement, entry in placements.items():
            runs = entry["runs"].get(target)
            assert runs, f"{target} did not run {key} {placement}: {entry['skipped']}"
            for run in runs:
                assert run["deliveries"] > 0, (key, target, run)
                wrong = {k: run[k] for k in ("lost", "duplicates", "out_of_order",
                                             "misrouted", "corrupt", "errors",
                                             "join_errors", "ack_mismatch") if run[k]}
                assert not wrong, (key, target, wrong)
                assert run["drained"], (key, target, run)


def test_the_colocation_benchmark_runs_every_baseline_and_finds_nothing_wrong(tmp_path):
    result, saved = colocation_quick(tmp_path, "asyncio,uvloop,rawfd,c,mpd:1,mpd:2")
    assert saved["failed"] == {}
    assert set(saved["loads"]) == {"rooms/10/100", "rooms/10/100@5000", "relay/10/16384"}
    for target in ("asyncio", "rawfd", "c"):
        assert_ran_clean(saved, target)
    for target in ("uvloop", "mpd:1", "mpd:2"):  # or skipped, saying why
        skipped = [entry["skipped"].get(target) for placements in saved["loads"].values()
                   for entry in placements.values()]
        if all(skipped):
            assert all(why for why in skipped)
        else:
            assert_ran_clean(saved, target)
    assert "### issue 24's targets" in result.stdout
    handoff = saved["handoff"]["pinned"]
    assert "skipped" in handoff or handoff["per_round"], handoff


def test_the_colocation_benchmark_runs_the_redis_design_and_finds_nothing_wrong(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    import colo_redis
    from tools import find_mpd_python, find_python_with

    if colo_redis.redis_server_binary() is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run "
                    "tries)")
    if find_python_with("hiredis", None, find_mpd_python(None)) is None:
        pytest.skip("hiredis is not installed in the venv (pip install -e '.[bench]'; "
                    ".ci/run tries)")
    _result, saved = colocation_quick(tmp_path, "redis:1,redis:2")
    assert saved["failed"] == {}
    for target in ("redis:1", "redis:2"):
        assert_ran_clean(saved, target)


def test_the_move_pause_benchmark_runs_and_prints_its_figures(tmp_path):
    """A room moved between two workers with its members probing it, against the hand-off
    of the same connections; a scale that moves rooms. (No timing asserted.)"""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench" / "move_pause.py"), "--quick",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| 10 | 1024 B |" in result.stdout, result.stdout
    assert "| `mpdctl scale 4` |" in result.stdout and "| `mpdctl scale 2` |" in result.stdout
    (saved,) = tmp_path.glob("move_pause-*.json")
    figures = json.loads(saved.read_text())
    (case,) = figures["cases"]
    assert case["pause"]["n"] == 2 and case["wait"]["n"] == 2 * 10
    assert case["handoff"]["count"] > 0
    scale = figures["scale"]
    assert scale["scale_4"]["moved"] > 0 and scale["scale_2"]["moved"] > 0
