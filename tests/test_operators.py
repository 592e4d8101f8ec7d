"""What an operator meets (issue 14), on real processes: a reload that returns only once
every worker runs the new config and fails when nothing changed; mpdctl reaching mpd
while its config file is broken; process titles in ps, across an upgrade in place;
help that serves as a manual; shell completion; scripts/setup that sets up only when it
must; the systemd tests' box found through MPD_SDBOX."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, bash_complete

from mpd.config import schema as configmod
from mpd.ops.commands import COMMANDS, SIGNALS


def mpdctl(*args: str, env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpd.ctl", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def status(server) -> dict:
    result = mpdctl("--socket", str(server.tmp / "mpd.sock"), "--json", "status")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def title(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")[0].decode().strip()


# --- 1. reload tells the truth --------------------------------------------------------------

def test_reload_returns_once_every_worker_runs_the_new_config(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2}})
    sock = str(server.tmp / "mpd.sock")
    before = status(server)
    assert before["master"]["config_generation"] == 1
    assert [w["config_generation"] for w in before["workers"]] == [1, 1]
    server.write_config({**server.settings, "workers": {"workers": 3, "max_clients": 7}})
    result = mpdctl("--socket", sock, "reload")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "mpd: config #2 reloaded, 3 workers run it"
    # No waiting here: mpdctl returned, so every worker runs config #2 already.
    after = status(server)
    assert after["master"]["config_generation"] == 2
    assert after["master"]["ready"] == 3 and len(after["workers"]) == 3
    assert [w["config_generation"] for w in after["workers"]] == [2, 2, 2]
    assert "CONFIG" in mpdctl("--socket", sock, "status").stdout  # the column


def test_a_reload_that_changes_nothing_fails_with_the_reason(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1}})
    sock = str(server.tmp / "mpd.sock")
    server.config_path.write_text("[workers]\nworkers = 'many'\n")
    invalid = mpdctl("--socket", sock, "reload")
    assert invalid.returncode == 1
    assert invalid.stderr.startswith("mpdctl: reload failed, nothing changed: ")
    assert "workers.workers" in invalid.stderr
    server.write_config({**server.settings, "server": {**server.settings["server"],
                                                       "backlog": 7}})
    restart = mpdctl("--socket", sock, "reload")
    assert restart.returncode == 1
    assert "these settings need a restart: backlog" in restart.stderr
    assert status(server)["master"]["config_generation"] == 1


# --- 2. mpdctl finds mpd ---------------------------------------------------------------------

def test_mpdctl_reaches_mpd_while_the_config_is_broken(mpd_factory, tmp_path):
    runtime = tmp_path / "runtime"  # systemd's RuntimeDirectory, as the unit sets it
    runtime.mkdir()
    env = {"RUNTIME_DIRECTORY": str(runtime)}
    server = mpd_factory({"workers": {"workers": 1}, "control": {"socket": "auto"}}, env=env)
    assert (runtime / "mpd.sock").exists()
    server.config_path.write_text("[workers]\nworkers = 'many'\n")
    result = mpdctl("--config", str(server.config_path), "status", env=env)
    assert result.returncode == 0, result.stderr
    assert f"pid {server.pid}" in result.stdout and "workers 1/1 ready" in result.stdout
    assert result.stderr == (f"mpdctl: warning: cannot use the config ({server.config_path}:2: "
                             "workers.workers: expected \"auto\" or an integer from 0 "
                             "(single-process mode) to 1024, got 'many'); trying "
                             f"{runtime / 'mpd.sock'}\n")
    # MPDCTL_SOCKET (an operator's own setting) goes first, and needs no config at all.
    own = mpdctl("--config", str(server.config_path), "ping",
                 env={"MPDCTL_SOCKET": str(runtime / "mpd.sock")})
    assert (own.returncode, own.stderr) == (0, "")


@pytest.mark.skipif(os.path.exists(configmod.SYSTEM_SOCKET),
                    reason=f"an mpd runs on this machine ({configmod.SYSTEM_SOCKET})")
def test_a_broken_config_and_no_mpd_is_a_config_error(tmp_path):
    broken = tmp_path / "mpd.toml"
    broken.write_text("[server\n")
    result = mpdctl("--config", str(broken), "status",
                    env={"RUNTIME_DIRECTORY": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path)})
    assert result.returncode == 78
    assert result.stderr.startswith(f"mpdctl: invalid config: {broken}:1: TOML syntax error")
    assert f"and no mpd socket at {tmp_path}/mpd.sock or {configmod.SYSTEM_SOCKET}" \
        in result.stderr


# --- 7. process titles -----------------------------------------------------------------------

def test_process_titles_tell_the_master_from_its_workers_even_after_an_upgrade(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2}})
    workers = server.wait_workers(2)
    assert title(server.pid) == f"mpd: master {server.config_path}"
    by_pid = {w["pid"]: w["slot"] for w in status(server)["workers"]}
    assert {title(pid) for pid in workers} == {f"mpd: worker {by_pid[p]}" for p in workers}
    pids = ",".join(map(str, [server.pid, *workers]))
    ps = subprocess.run(["ps", "-ww", "-o", "args=", "-p", pids], capture_output=True,
                        text=True, check=True).stdout.splitlines()
    assert sorted(line.strip() for line in ps) == sorted(
        [f"mpd: master {server.config_path}", "mpd: worker 0", "mpd: worker 1"])
    # An upgrade in place execs a new command line in the master: its title is set again.
    result = mpdctl("--socket", str(server.tmp / "mpd.sock"), "upgrade")
    assert result.returncode == 0, result.stderr
    new_workers = server.wait_workers(2)
    assert not set(new_workers) & set(workers)
    assert title(server.pid) == f"mpd: master {server.config_path}"
    assert sorted(title(pid) for pid in new_workers) == ["mpd: worker 0", "mpd: worker 1"]


# --- 10. friendly edges ------------------------------------------------------------------

def test_mpd_help_is_a_manual_built_from_the_tables():
    text = subprocess.run([sys.executable, "-m", "mpd.cli", "--help"], capture_output=True,
                          text=True, cwd=ROOT, check=True).stdout
    for heading in ("signals to the master:", "exit codes:", "files:", "environment:"):
        assert heading in text
    for sig, request in SIGNALS.items():
        assert f"{sig.name:<8} as `mpdctl {request['command']}" in text
    assert "SIGTTIN  as `mpdctl scale +1`" in text and "SIGQUIT  as `mpdctl stop (immediate)`" \
        in text
    for code in ("0 ", "1 ", "69", "78"):
        assert f"\n  {code:<3} " in text
    assert "/etc/mpd.toml" in text and "NOTIFY_SOCKET" in text and "--user NAME" in text


def test_mpdctl_help_names_commands_lookup_exit_codes_and_environment():
    text = mpdctl("--help").stdout
    for name, command in COMMANDS.items():
        assert f"\n  {command.usage:<18} " in text, name
    for needle in ("finding mpd", "MPDCTL_SOCKET", "/run/mpd/mpd.sock", "exit codes:",
                   "\n  4   permission denied", "--print-completion"):
        assert needle in text


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_offers_the_commands_of_the_table():
    script = mpdctl("--print-completion", "bash")
    assert script.returncode == 0, script.stderr
    assert bash_complete(script.stdout, "") == sorted(COMMANDS)
    assert bash_complete(script.stdout, "s") == ["scale", "status", "stop"]
    assert "--socket" in bash_complete(script.stdout, "--so")


def fake_python(venv: Path) -> Path:
    """A stand-in for the venv's python that records each call: scripts/setup must call
    it (pip) only when the environment is missing or out of date."""
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f"#!/bin/sh\necho \"$@\" >> {venv / 'calls'}\n")
    python.chmod(0o755)
    return venv / "calls"


def test_scripts_setup_runs_pip_only_when_the_environment_is_out_of_date(tmp_path):
    tree = tmp_path / "tree"
    (tree / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup", tree / "scripts" / "setup")
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    shutil.copytree(ROOT / "mpd", tree / "mpd", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    calls = fake_python(venv)

    def setup(*extra: str) -> list[str]:
        subprocess.run([str(tree / "scripts" / "setup"), *extra], check=True, timeout=60,
                       env={**os.environ, "VENV": str(venv)})
        return calls.read_text().splitlines() if calls.exists() else []

    assert any("install --quiet -e .[test]" in c for c in setup("test"))  # no stamp yet
    done = len(calls.read_text().splitlines())
    assert len(setup("test")) == done  # up to date: no pip
    assert len(setup()) == done  # a plain setup is served by the "test" one
    (tree / "mpd" / "newmodule.py").write_text("")  # a new module: reinstall
    assert len(setup("test")) > done
    done = len(calls.read_text().splitlines())
    (tree / "pyproject.toml").write_text((tree / "pyproject.toml").read_text() + "\n# dep\n")
    assert len(setup("test")) > done


def test_the_systemd_tests_find_their_box_through_mpd_sdbox(tmp_path):
    probe = "import sdbox; print(sdbox.SDBOX); print(sdbox.box_unavailable())"

    def ask(env: dict[str, str]) -> list[str]:
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              cwd=ROOT / "tests", env={**os.environ, **env},
                              check=True).stdout.splitlines()

    missing = tmp_path / "no-sdbox"
    where, why = ask({"MPD_SDBOX": str(missing)})
    assert where == str(missing)
    if os.geteuid() == 0:
        assert why == f"sdbox not found at {missing}: set MPD_SDBOX=/path/to/sdbox"


def test_the_unit_documents_nothing_false_and_the_readme_warns_of_the_name_clash():
    unit = (ROOT / "packaging" / "mpd.service").read_text()
    assert "example.invalid" not in unit
    for line in unit.splitlines():
        if line.startswith("Documentation="):
            assert line.split("=", 1)[1].startswith(("man:", "file:")), line
    readme = (ROOT / "README.md").read_text()
    assert "Music Player Daemon" in readme and "/usr/bin/mpd" in readme
    assert "/opt/mpd/venv" in readme and "/usr/local/bin" in readme
    assert "203/EXEC" in readme


def test_check_config_says_what_would_keep_mpd_from_starting(tmp_path):
    config = tmp_path / "mpd.toml"
    config.write_text("[workers]\nworkers = 1\n")
    result = subprocess.run([sys.executable, "-m", "mpd.cli", "--config", str(config),
                             "--check-config"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0
    notes = result.stdout.splitlines()[1:]
    if os.geteuid() == 0:
        assert any("mpd would refuse to start: started as root without server.user" in n
                   for n in notes), notes
    hidden = os.path.realpath(sys.executable).startswith(("/root/", "/home/"))
    assert any("status=203/EXEC" in n for n in notes) == hidden, notes
