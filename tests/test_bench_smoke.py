"""The benchmark suite runs: every scenario, in its quick form, prints its figures. (No
timing is asserted here; the figures are for BENCHMARKS.md, not for pass or fail.)"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

HEADINGS = ("### ping", "### connrate", "### handoff", "### respawn", "### memory",
            "### scale")


def test_every_benchmark_scenario_runs_and_prints_its_figures(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench" / "run.py"), "--quick",
         "--scenarios", "all", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    for heading in HEADINGS:
        assert heading in result.stdout, f"{heading} missing:\n{result.stdout[-3000:]}"
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest["failed"] == {}
    assert set(latest["scenarios"]) == {h.split()[1] for h in HEADINGS}
    assert "`mpdctl scale" in result.stdout


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
