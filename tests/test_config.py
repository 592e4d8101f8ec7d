"""The config as an operator meets it: `mpd --config FILE [--check-config]` run for real.
A bad file costs one stderr line naming the file, the line, the key and what was
expected, a config.invalid log event, and exit code 78 (EX_CONFIG)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, ping

from mpd.config import schema as configmod

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

MPD = [sys.executable, "-m", "mpd.cli"]
EXAMPLE = ROOT / "etc" / "mpd.toml"


def run_mpd(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MPD, *args], capture_output=True, text=True, cwd=ROOT,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def log_events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


# (file text, line of the problem, key named, what the message must say was expected)
BAD = {
    "toml syntax": ("[server]\nport = 1990\nlisten = \n", 3, None, "TOML syntax error"),
    "unknown section": ("[server]\nport = 1990\n\n[servers]\nport = 1\n", 4, "servers",
                        "unknown section; expected one of [server], [workers], [control], [log]"),
    "unknown key": ("[workers]\nworkers = 1\nmax_client = 5\n", 3, "workers.max_client",
                    "unknown key; [workers] takes workers, max_workers, max_clients"),
    "wrong type": ('[server]\nlisten = "127.0.0.1"\nport = "x"\n', 3, "server.port",
                   "expected an integer from 0 to 65535, got 'x'"),
    "port out of range": ("[server]\nport = 70000\n", 2, "server.port",
                          "expected an integer from 0 to 65535, got 70000"),
    "max_clients zero": ("[log]\nlevel = \"info\"\n[workers]\nmax_clients = 0\n", 4,
                         "workers.max_clients",
                         'expected "auto" or an integer from 1 to 1000000, got 0'),
    "bad listen": ('[server]\nlisten = "localhost"\n', 2, "server.listen",
                   "expected an IPv4 or IPv6 address"),
    "bad listen ipv4": ('[server]\n# listen = "127.0.0.1"\n  listen   =   "300.1.2.3"\n', 3,
                        "server.listen", "expected an IPv4 or IPv6 address"),
    "workers over max_workers": ("[workers]\nmax_workers = 2\nworkers = 3\n", 3,
                                 "workers.workers",
                                 "expected at most workers.max_workers (2), got 3"),
    "bool for an integer": ("[workers]\nmax_workers = true\n", 2, "workers.max_workers",
                            "expected an integer from 1 to 1024, got True"),
    "quoted key": ('[server]\n"port" = "x"\n', 2, "server.port",
                   "expected an integer from 0 to 65535, got 'x'"),
    "dotted key": ('# no [server] header\nserver . port = "x"\n', 2, "server.port",
                   "expected an integer from 0 to 65535, got 'x'"),
    "sub-table in a section": ('[server]\nport = 1\n[server.tls]\ncert = "x"\n', 3,
                               "server.tls", "unknown key; [server] takes listen, port"),
    "key outside any section": ("# top\nport = 1\n", 2, "port",
                                "unknown section; expected one of [server], [workers]"),
    "section that is not a table": ("# top\nserver = 5\n", 2, "server",
                                    "expected a [section] table"),
}


def check_bad(tmp_path: Path, text: str, line: int, key: str | None, expected: str,
              check_only: bool) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = run_mpd("--config", str(path), *(["--check-config"] if check_only else []))
    assert result.returncode == 78, result
    message = result.stderr.splitlines()
    assert len(message) == 1, f"expected one stderr line, got: {result.stderr!r}"
    where = f"{path}:{line}: "
    assert message[0].startswith(f"mpd: invalid config: {where}"), message[0]
    if key is not None:
        assert f"{where}{key}: " in message[0], message[0]
    assert expected in message[0], message[0]
    invalid = [e for e in log_events(result.stdout) if e["event"] == "config.invalid"]
    assert len(invalid) == 1, result.stdout
    assert invalid[0]["level"] == "error"
    assert (invalid[0]["path"], invalid[0]["line"], invalid[0]["key"]) == (str(path), line, key)
    assert expected in invalid[0]["error"]
    assert not [e for e in log_events(result.stdout) if e["event"] == "mpd.started"]


@pytest.mark.parametrize("check_only", [True, False], ids=["check-config", "run"])
@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_config_is_one_line_naming_file_line_key_and_exits_78(tmp_path, case,
                                                                   check_only):
    check_bad(tmp_path, *BAD[case], check_only=check_only)


@pytest.mark.parametrize("check_only", [True, False], ids=["check-config", "run"])
def test_a_missing_config_file_exits_78(tmp_path, check_only):
    path = tmp_path / "no-such.toml"
    result = run_mpd("--config", str(path), *(["--check-config"] if check_only else []))
    assert result.returncode == 78
    assert result.stderr == (f"mpd: invalid config: {path}: cannot read the config file: "
                             "No such file or directory\n")
    (invalid,) = [e for e in log_events(result.stdout) if e["event"] == "config.invalid"]
    assert invalid["path"] == str(path) and "No such file" in invalid["error"]


def test_check_config_accepts_a_good_file(tmp_path):
    path = tmp_path / "good.toml"
    path.write_text('[server]\nlisten = "::"\nport = 0\n[workers]\nworkers = 3\n'
                    'max_workers = 3\nmax_clients = 1\nmax_output_buffer = 1024\n'
                    '[control]\nmode = 0o600\n[log]\nlevel = "debug"\nformat = "console"\n')
    result = run_mpd("--config", str(path), "--check-config")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines()[0] == f"mpd: config {path} is valid"
    config = configmod.load(str(path))
    assert (config.listen, config.port, config.worker_count, config.max_clients,
            config.mode, config.log_level) == ("::", 0, 3, 1, 0o600, "debug")


# --- defaults and the example file -----------------------------------------------------------

def test_no_file_means_the_embedded_defaults():
    config = configmod.load(None)
    assert config == configmod.Config()
    assert (config.port, config.listen, config.max_clients) == (1990, "127.0.0.1", "auto")
    assert config.workers == "auto"
    assert config.worker_count == min(len(os.sched_getaffinity(0)), config.max_workers)
    assert config.replace(max_workers=1).worker_count == 1
    for key in configmod.SCHEMA:
        assert getattr(config, key.attr) == key.default, key.dotted


def test_auto_workers_follow_the_cpu_affinity_of_the_process():
    cpu = min(os.sched_getaffinity(0))
    code = (f"import os; os.sched_setaffinity(0, {{{cpu}}}); "
            "from mpd.config import schema; print(schema.load(None).worker_count)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True, timeout=20).stdout
    assert out == "1\n"


def _no_system_config() -> None:
    if os.path.exists(configmod.DEFAULT_PATH):
        pytest.skip(f"{configmod.DEFAULT_PATH} exists here, so mpd would not use its defaults")


def test_check_config_without_a_file_checks_the_defaults():
    _no_system_config()
    result = run_mpd("--check-config")
    assert result.returncode == 0
    assert result.stdout.splitlines()[0] == "mpd: config (embedded defaults) is valid"


def test_print_config_is_the_committed_example_and_parses_back_to_the_defaults():
    _no_system_config()
    result = run_mpd("--print-config")
    assert (result.returncode, result.stderr) == (0, "")
    assert EXAMPLE.exists(), "etc/mpd.toml is missing: `mpd --print-config > etc/mpd.toml`"
    assert result.stdout == EXAMPLE.read_text(), "etc/mpd.toml is stale: regenerate it"
    assert configmod.load(str(EXAMPLE)) == dataclasses.replace(configmod.Config(),
                                                               path=str(EXAMPLE))
    data = tomllib.loads(EXAMPLE.read_text())
    assert {(section, name) for section, table in data.items() for name in table} == {
        (key.section, key.name) for key in configmod.SCHEMA}
    assert run_mpd("--config", str(EXAMPLE), "--check-config").returncode == 0


# --- IPv6 --------------------------------------------------------------------------------

def test_listen_on_ipv6_loopback_serves_a_ping(mpd_factory):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    server = mpd_factory({"server": {"listen": "::1"}, "workers": {"workers": 1}})
    assert server.events("mpd.started")[0]["listen"] == "::1"
    with socket.create_connection(("::1", server.port), timeout=5) as sock:
        assert sock.family == socket.AF_INET6
        ping(sock)
