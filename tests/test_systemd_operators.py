"""Issue 14 under a real systemd 252 (sdbox), installed as the README says: a reload that
tells the truth, mpdctl on PATH that reaches mpd while /etc/mpd.toml is broken, process
titles in `systemctl status`, a venv the unit cannot reach failing without a restart
loop, and access control for operators who are not root, with the shipped drop-in."""

from __future__ import annotations

import json
import time

from conftest import ROOT, toml_config
from sdbox import BASE, Box, install, needs_box, ping_inside, prop

SETTLE = 3.0  # seconds to watch for a restart that must not come (RestartSec=1)


def status_json(box: Box, *runner: str) -> dict:
    result = box.run(*runner, "mpdctl", "--json", "status", check=True)
    return json.loads(result.stdout)


def no_restart(box: Box, unit: str = "mpd") -> None:
    """Watch NRestarts stay 0 for SETTLE seconds: a restart loop would show within 1 s."""
    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline:  # watching for something that must not happen
        assert prop(box, "NRestarts", unit) == "0"
        time.sleep(0.25)


@needs_box
def test_reload_tells_the_truth_and_mpdctl_finds_mpd(box, system_venv):
    install(box, system_venv, BASE)
    box.run("systemctl", "start", "mpd", check=True)
    # mpdctl is on PATH (/usr/local/bin), and the CGroup list tells master from workers.
    cgroup = box.run("systemctl", "status", "mpd", "--no-pager", "-l").stdout
    assert "mpd: master /etc/mpd.toml" in cgroup
    assert "mpd: worker 0" in cgroup and "mpd: worker 1" in cgroup
    # A good change: `systemctl reload` returns once every worker runs it.
    box.copy(toml_config({**BASE, "workers": {"workers": 3, "max_clients": 9}}),
             "/etc/mpd.toml")
    box.run("systemctl", "reload", "mpd", check=True)
    status = status_json(box)
    assert status["master"]["config_generation"] == 2
    assert status["master"]["ready"] == 3
    assert [w["config_generation"] for w in status["workers"]] == [2, 2, 2]
    assert all(w["max_clients"] == 9 for w in status["workers"])
    # An invalid file: the reload fails, the reason is in `systemctl status`, mpd serves on.
    box.copy("[workers]\nworkers = 'many'\n", "/etc/mpd.toml")
    failed = box.run("systemctl", "reload", "mpd")
    assert failed.returncode != 0
    shown = box.run("systemctl", "status", "mpd", "--no-pager", "-l", "-n", "20").stdout
    assert "ExecReload=/usr/local/bin/mpdctl" in shown and "status=1/FAILURE" in shown
    assert "mpdctl: reload failed, nothing changed: /etc/mpd.toml:2: workers.workers" in shown
    assert prop(box, "ActiveState") == "active" and ping_inside(box, system_venv)
    # mpdctl still reaches mpd, with a one-line warning: /etc/mpd.toml names no socket now.
    ctl = box.run("mpdctl", "status")
    assert ctl.returncode == 0, ctl.stderr
    assert "workers 3/3 ready" in ctl.stdout
    assert ctl.stderr.startswith("mpdctl: warning: cannot use the config (/etc/mpd.toml:2:")
    assert ctl.stderr.endswith("; trying /run/mpd/mpd.sock\n") and ctl.stderr.count("\n") == 1
    # A change that needs a restart fails the reload too.
    box.copy(toml_config({**BASE, "server": {"port": 1991}}), "/etc/mpd.toml")
    assert box.run("systemctl", "reload", "mpd").returncode != 0
    shown = box.run("systemctl", "status", "mpd", "--no-pager", "-l", "-n", "20").stdout
    assert "these settings need a restart: port" in shown
    assert status_json(box)["master"]["config_generation"] == 2
    assert prop(box, "NRestarts") == "0" and prop(box, "ActiveState") == "active"


@needs_box
def test_a_venv_the_unit_cannot_reach_fails_once_and_says_why(box, system_venv):
    # A venv under /root (copied inside the box only): ProtectHome= hides it from the unit.
    box.run("cp", "-a", str(system_venv), "/root/mpd-venv", check=True)
    install(box, system_venv, BASE)
    box.run("ln", "-sf", "/root/mpd-venv/bin/mpd", "/usr/local/bin/mpd", check=True)
    assert box.run("systemctl", "start", "mpd").returncode != 0
    assert prop(box, "ExecMainStatus") == "203"
    no_restart(box)  # RestartPreventExitStatus=203: no loop
    assert prop(box, "ActiveState") == "failed"
    note = box.run("/root/mpd-venv/bin/python", "-m", "mpd.cli", "--config", "/etc/mpd.toml",
                   "--check-config").stdout
    assert "this mpd runs from /root/mpd-venv" in note and "203/EXEC" in note


ACCESS = {**BASE, "control": {"allow_group": "mpdops"}}


@needs_box
def test_operators_in_the_group_steer_mpd_others_are_told_why_not(box, system_venv):
    box.run("groupadd", "mpdops", check=True)
    for user, groups in (("alice", ["-G", "mpdops"]), ("bob", []), ("carol", [])):
        box.run("useradd", *groups, user, check=True)
    carol = int(box.run("id", "-u", "carol", check=True).stdout)
    bob = int(box.run("id", "-u", "bob", check=True).stdout)
    # The shipped unit alone (PrivateUsers=yes) cannot honour allow_group: mpd says so and
    # exits 78, which the unit does not restart.
    install(box, system_venv, ACCESS)
    assert box.run("systemctl", "start", "mpd").returncode != 0
    assert prop(box, "ExecMainStatus") == "78"
    no_restart(box)
    shown = box.run("systemctl", "status", "mpd", "--no-pager", "-l", "-n", "10").stdout
    assert "PrivateUsers=yes" in shown and "access drop-in" in shown
    # With the drop-in: alice (in mpdops) and carol (allow_uids) steer mpd, bob does not.
    box.run("mkdir", "-p", "/etc/systemd/system/mpd.service.d", check=True)
    box.copy((ROOT / "packaging" / "access.conf").read_text(),
             "/etc/systemd/system/mpd.service.d/access.conf")
    box.copy(toml_config({**ACCESS, "control": {"allow_group": "mpdops", "mode": 0o666,
                                                "allow_uids": [carol]}}), "/etc/mpd.toml")
    box.run("systemctl", "daemon-reload", check=True)
    box.run("systemctl", "reset-failed", "mpd", check=True)
    box.run("systemctl", "start", "mpd", check=True)
    as_alice = ("runuser", "-u", "alice", "--")
    assert status_json(box, *as_alice)["master"]["ready"] == 2  # found /run/mpd/mpd.sock
    scaled = box.run(*as_alice, "mpdctl", "scale", "3")
    assert scaled.returncode == 0, scaled.stderr
    assert status_json(box, "runuser", "-u", "carol", "--")["master"]["ready"] == 3
    denied = box.run("runuser", "-u", "bob", "--", "mpdctl", "status")
    assert denied.returncode == 4
    assert denied.stderr == (f"mpdctl: permission denied on /run/mpd/mpd.sock: uid {bob} is "
                             f"not allowed: only root and uid "
                             f"{status_json(box)['master']['uid']} (mpd's own), uids {carol}, "
                             "members of group mpdops may steer mpd\n")
    # With the socket's mode closed again, the file itself keeps bob out, and says how in.
    box.copy(toml_config(ACCESS), "/etc/mpd.toml")
    box.run("systemctl", "restart", "mpd", check=True)
    denied = box.run("runuser", "-u", "bob", "--", "mpdctl", "status")
    assert denied.returncode == 4
    assert "with mode 660" in denied.stderr and "join group mpdops" in denied.stderr
    assert box.run(*as_alice, "mpdctl", "ping").returncode == 0
    # A config alice may not read: mpdctl says so in one line and reaches mpd all the same.
    box.run("chmod", "600", "/etc/mpd.toml", check=True)
    unread = box.run(*as_alice, "mpdctl", "status")
    assert unread.returncode == 0 and "workers 2/2 ready" in unread.stdout
    assert unread.stderr == ("mpdctl: warning: cannot use the config (/etc/mpd.toml: cannot "
                             "read the config file: Permission denied); trying "
                             "/run/mpd/mpd.sock\n")
    # The drop-in keeps the exposure score low.
    out = box.run("systemd-analyze", "security", "mpd.service").stdout
    level = float(out.strip().splitlines()[-1].split("level for mpd.service:")[1].split()[0])
    assert level <= 2.0, out[-800:]
