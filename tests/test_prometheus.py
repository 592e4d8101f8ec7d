"""A real Prometheus (Debian's) scrapes mpd's [metrics] listen endpoint; promtool checks a
scrape and the shipped alert rules (packaging/prometheus/), and runs their unit tests.
Skipped, with the reason, where Debian's prometheus cannot be had (apt-get install
prometheus: CI does it)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Pingers, random_keys, wait_until
from haproxy_support import free_port

RULES = ROOT / "packaging" / "prometheus" / "mpd-alerts.yml"
RULE_TESTS = ROOT / "packaging" / "prometheus" / "mpd-alerts.test.yml"
ALERTS = {"MpdDown", "MpdNoWorkerServing", "MpdWorkersRestarting", "MpdHandoffLatencyHigh",
          "MpdLogLinesDropped", "MpdClientsRefused"}


def tool(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    if not Path(path).exists():
        pytest.skip(f"{name} is not installed (apt-get install prometheus): Debian's "
                    "Prometheus is what these tests run")
    return path


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], input=stdin, capture_output=True,
                          timeout=120)


def test_promtool_checks_the_shipped_rules_and_passes_their_unit_tests():
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout.decode()
    tested = subprocess.run([tool("promtool"), "test", "rules", RULE_TESTS.name],
                            cwd=RULE_TESTS.parent, capture_output=True, text=True, timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
    tested_alerts = {line.split(":", 1)[1].strip() for line in RULE_TESTS.read_text()
                     .splitlines() if line.strip().startswith("alertname:")}
    assert tested_alerts == ALERTS  # each alert has its test


class Prometheus:
    """Debian's prometheus on a free loopback port, with its storage in the test's tmp."""

    def __init__(self, tmp: Path, target: str):
        self.port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "mpd", "static_configs": [{"targets": [target]}]}],
        }))
        self.log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp}/tsdb",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(self.ready, 60, 0.1, what="prometheus ready")

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}{query}",
                                    timeout=10) as answer:
            return json.loads(answer.read()) if path.startswith("/api/") else answer.read()

    def ready(self) -> bool:
        assert self.proc.poll() is None, (Path(self.log.name).read_text()[-3000:])
        with contextlib.suppress(OSError):
            self.get("/-/ready")
            return True
        return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=promql)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def prometheus_and_mpd(mpd_factory, tmp_path) -> Iterator[tuple[Prometheus, Any]]:
    tool("prometheus")
    port = free_port()
    server = mpd_factory({"workers": {"workers": 3},
                          "metrics": {"listen": f"127.0.0.1:{port}"}})
    server.metrics_port = port
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{port}")
    try:
        yield prometheus, server
    finally:
        prometheus.stop()


@pytest.mark.slow
def test_prometheus_scrapes_mpd_and_sees_it_serve(prometheus_and_mpd):
    prometheus, server = prometheus_and_mpd
    wait_until(lambda: (prometheus.value('count_over_time(up{job="mpd"}[1m])') or 0) >= 2,
               30, 0.2, what="two scrapes of mpd")
    assert prometheus.value('up{job="mpd"}') == 1
    targets = prometheus.get("/api/v1/targets")["data"]["activeTargets"]
    assert [t["health"] for t in targets] == ["up"], targets
    before = prometheus.value("mpd_requests_total")
    assert before is not None
    pingers = Pingers(server.port, random_keys(6, seed=25))
    try:
        pingers.wait_progress("pings through every worker")
        wait_until(lambda: (prometheus.value("mpd_requests_total") or 0) > before + 1000,
                   30, 0.2, what="mpd_requests_total increasing in Prometheus")
        assert (prometheus.value('rate(mpd_requests_total[5s])') or 0) > 0
    finally:
        assert pingers.stop() == [None] * 6
    for slot in ("0", "1", "2"):
        series = prometheus.query(f'mpd_slot_requests_total{{slot="{slot}"}}')
        assert len(series) == 1 and series[0]["metric"]["job"] == "mpd", series
    assert prometheus.value("mpd_workers_ready") == 3
    # The shipped rules run in this Prometheus too, and none of them fires on a healthy mpd.
    groups = prometheus.get("/api/v1/rules")["data"]["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == ALERTS
    assert all(r["health"] == "ok" and r["state"] == "inactive" for r in rules.values()), rules


def test_promtool_check_metrics_passes_on_a_scrape(mpd_factory):
    tool("promtool")
    port = free_port()
    server = mpd_factory({"workers": {"workers": 2}, "metrics": {"listen": f"127.0.0.1:{port}"}})
    Pingers(server.port, random_keys(2, seed=26)).stop()  # hand-offs: histogram samples too
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                timeout=10) as answer:
        scrape = answer.read()
    assert b"mpd_slot_requests_total" in scrape
    checked = promtool("check", "metrics", stdin=scrape)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == b""  # no lint remark either
