"""The Debian package, installed as operators do: `scripts/deb` builds mpd-tcp, and in a
clean sdbox (a real systemd 252) `apt install ./mpd-tcp_*.deb` leaves a unit that starts,
an mpdctl that root and members of mpdops may use, a journal and a server that answers;
`apt remove` stops it and `apt purge` leaves no file, user or group behind.

The box's root is an overlay of the host's /, and it has no network: the runtime
dependencies come from the host (scripts/deb installs them there as build dependencies),
so apt in the box resolves Depends against them and would fail on a wrong name. The box's
unit path leaves /lib/systemd/system out (tools/sdbox/README.md), so each test links the
package's units into /etc/systemd/system, as `systemctl link` does, and unlinks them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, bash_complete, wait_until
from sdbox import CLIENT, VENV_ROOT, Box, box_unavailable, prop

pytestmark = pytest.mark.slow
needs_box = pytest.mark.skipif(box_unavailable() is not None, reason=box_unavailable() or "")

PACKAGE = "mpd-tcp"
UNIT_LINKS = ("/etc/systemd/system/mpd.service", "/etc/systemd/system/mpd.socket",
              "/etc/systemd/system/mpd.service.d")
OPERATOR, STRANGER = "mpdtester", "mpdstranger"
# Paths that apt and dpkg themselves keep up to date on any install or purge (their logs,
# caches and state), not the package's: left out of the before/after comparison.
BOOKKEEPING = ("/var/lib/dpkg/", "/var/lib/apt/", "/var/cache/apt/", "/var/log/apt/",
               "/var/cache/debconf/", "/var/log/dpkg.log", "/var/cache/ldconfig/",
               "/var/cache/man/")  # man-db's index, rebuilt by its trigger


def source_digest() -> str:
    digest = hashlib.sha256()
    tracked = subprocess.run(["git", "ls-files", "mpd", "packaging", "etc", "pyproject.toml",
                              "README.md", "scripts/deb"], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    if not tracked:  # not a git checkout: every file of those places
        tracked = [str(p.relative_to(ROOT)) for place in ("mpd", "packaging", "etc", "scripts")
                   for p in (ROOT / place).rglob("*") if "__pycache__" not in p.parts]
        tracked += ["pyproject.toml", "README.md"]
    for name in sorted(tracked):
        path = ROOT / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def deb() -> Path:
    """scripts/deb's package, built once per source (under /opt: the box sees it)."""
    out = VENV_ROOT / f"deb-{source_digest()}"
    built = sorted(out.glob(f"{PACKAGE}_*_all.deb"))
    if built:
        return built[-1]
    result = subprocess.run([str(ROOT / "scripts" / "deb"), str(out)], capture_output=True,
                            text=True, timeout=1200,
                            env={**os.environ, "MPD_DEB_LINTIAN": "0"})  # a test runs it
    if result.returncode == 69:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    path = Path(result.stdout.strip().splitlines()[-1])
    os.chmod(out, 0o755)
    return path


@pytest.fixture
def clean_box() -> Iterator[Box]:
    b = Box()
    try:
        # A Docker-built host may carry a policy-rc.d that forbids every service start and
        # stop (exit 101): a server has none, and deb-systemd-invoke honours it.
        b.run("rm", "-f", "/usr/sbin/policy-rc.d", check=True)
        for user in (OPERATOR, STRANGER):
            b.run("useradd", "--no-create-home", user, check=True)
        yield b
    finally:
        b.down()


def apt(box: Box, *args: str) -> subprocess.CompletedProcess:
    result = box.run("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", *args,
                     timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def install(box: Box, deb: Path) -> subprocess.CompletedProcess:
    result = apt(box, "install", str(deb))
    box.run("systemctl", "link", "/lib/systemd/system/mpd.service",
            "/lib/systemd/system/mpd.socket", check=True)
    box.run("mkdir", "-p", "/etc/systemd/system/mpd.service.d", check=True)
    box.run("ln", "-s", "/lib/systemd/system/mpd.service.d/mpdops.conf",
            "/etc/systemd/system/mpd.service.d/mpdops.conf", check=True)
    box.run("systemctl", "daemon-reload", check=True)
    return result


def unlink_units(box: Box) -> None:
    box.run("rm", "-rf", *UNIT_LINKS, check=True)
    box.run("systemctl", "daemon-reload", check=True)


def start(box: Box) -> None:
    box.run("systemctl", "start", "mpd", check=True, timeout=120)
    assert prop(box, "ActiveState") == "active"


def ping(box: Box) -> bool:
    return box.run("/usr/bin/python3", "-c", CLIENT, "1990").stdout.strip() == "True"


def mpdctl_status(box: Box, *as_user: str) -> subprocess.CompletedProcess:
    return box.run(*as_user, "mpdctl", "--json", "status")


def mpd_processes(box: Box) -> list[str]:
    return box.run("pgrep", "-f", "^mpd: ").stdout.split()


def test_scripts_deb_builds_a_lintian_clean_package_with_what_an_operator_needs(deb: Path):
    info = subprocess.run(["dpkg-deb", "--field", str(deb), "Package", "Depends",
                           "Conflicts"], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(": ", 1) for line in info.splitlines())
    assert fields["Package"] == PACKAGE and fields["Conflicts"] == "mpd"
    for dependency in ("python3-structlog", "python3-daemon", "python3-prometheus-client",
                       "python3-setproctitle", "python3-shtab"):
        assert dependency in fields["Depends"]
    listing = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True,
                             text=True, check=True).stdout
    files = {line.split()[5].lstrip(".") for line in listing.splitlines()}
    for path in ("/usr/bin/mpd", "/usr/bin/mpdctl", "/lib/systemd/system/mpd.service",
                 "/lib/systemd/system/mpd.socket", "/etc/mpd.toml",
                 "/lib/systemd/system/mpd.service.d/mpdops.conf",
                 "/etc/logrotate.d/mpd-tcp", "/usr/share/man/man1/mpd.1.gz",
                 "/usr/share/man/man1/mpdctl.1.gz",
                 "/usr/share/bash-completion/completions/mpdctl",
                 "/usr/share/zsh/vendor-completions/_mpdctl",
                 "/usr/lib/python3/dist-packages/mpd/cli.py"):
        assert path in files, path
    assert not [f for f in files if "/usr/local" in f or "site-packages" in f]
    control = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], capture_output=True,
                             check=True).stdout
    assert b"/etc/mpd.toml" in control and b"/etc/logrotate.d/mpd-tcp" in control  # conffiles
    unit = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                          check=True).stdout
    assert b"ExecStart=/usr/bin/mpd --config /etc/mpd.toml" in unit
    assert bash_completion(deb, "") == sorted(
        ["drain", "metrics", "move", "ping", "reload", "reopen-logs", "scale", "status", "stop",
         "top", "undrain", "upgrade", "where"])
    assert bash_completion(deb, "--print-completion", "") == ["bash", "tcsh", "zsh"]
    lintian = subprocess.run(["lintian", "--fail-on", "error,warning", str(deb)],
                             capture_output=True, text=True, timeout=300)
    assert lintian.returncode == 0, lintian.stdout + lintian.stderr
    assert not [line for line in lintian.stdout.splitlines() if line[:2] in ("E:", "W:")]


def bash_completion(deb: Path, *words: str) -> list[str]:
    """What the package's bash completion for mpdctl offers after `mpdctl WORDS`."""
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                         check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        member = archive.extractfile("./usr/share/bash-completion/completions/mpdctl")
        assert member is not None
        script = member.read().decode()
    return bash_complete(script, *words)


@needs_box
def test_apt_install_then_start_serves_and_root_and_mpdops_may_steer_it(clean_box, deb):
    box = clean_box
    # Something holds the port: the install must not start a second server on it.
    box.run("systemd-run", "--unit=squatter", "/usr/bin/python3", "-c",
            "import socket, time; s = socket.create_server(('127.0.0.1', 1990)); "
            "time.sleep(600)", check=True)
    wait_until(lambda: box.run("/usr/bin/python3", "-c", "import socket; socket.create_"
                               "connection(('127.0.0.1', 1990), timeout=1)").returncode == 0,
               what="the squatter listening on 1990")
    install(box, deb)
    assert prop(box, "ActiveState") == "inactive"
    assert box.run("systemctl", "is-enabled", "mpd").stdout.strip() != "enabled"
    box.run("systemctl", "stop", "squatter", check=True)

    start(box)
    wait_until(lambda: ping(box), what="a seed ping answered")
    as_root = mpdctl_status(box)
    assert as_root.returncode == 0, as_root.stderr
    assert json.loads(as_root.stdout)["master"]["ready"] >= 1
    box.run("usermod", "-aG", "mpdops", OPERATOR, check=True)
    as_operator = mpdctl_status(box, "runuser", "-u", OPERATOR, "--")
    assert as_operator.returncode == 0, as_operator.stderr
    as_stranger = mpdctl_status(box, "runuser", "-u", STRANGER, "--")
    assert as_stranger.returncode == 4, as_stranger.stderr
    assert "permission denied" in as_stranger.stderr
    journal = box.run("journalctl", "-u", "mpd", "--no-pager").stdout
    assert "mpd.ready" in journal or "every initial worker serves" in journal, journal[-2000:]
    assert box.run("man", "-w", "mpdctl").returncode == 0
    unlink_units(box)


@needs_box
def test_a_reinstall_while_mpd_runs_upgrades_it_in_place(clean_box, deb):
    """postinst runs `mpdctl upgrade` on an upgrade (here: the same version again) instead
    of a restart: same main PID, no restart, a new generation of workers."""
    box = clean_box
    install(box, deb)
    start(box)
    main_pid = prop(box, "MainPID")
    apt(box, "install", "--reinstall", str(deb))
    assert prop(box, "MainPID") == main_pid and prop(box, "NRestarts") == "0"
    status = json.loads(mpdctl_status(box).stdout)
    assert status["master"]["generation"] == 2
    assert {w["generation"] for w in status["workers"]} == {2}
    assert ping(box)
    unlink_units(box)


@needs_box
def test_apt_remove_stops_mpd_and_keeps_its_config(clean_box, deb):
    box = clean_box
    install(box, deb)
    start(box)
    assert mpd_processes(box)
    apt(box, "remove", PACKAGE)
    assert prop(box, "ActiveState") in ("inactive", "")
    assert mpd_processes(box) == []
    assert not ping(box)
    assert box.run("test", "-e", "/etc/mpd.toml").returncode == 0  # a conffile: kept
    unlink_units(box)


def snapshot(box: Box) -> tuple[set[str], dict[str, str]]:
    """Every path under the places a package writes to, and the account files."""
    listing = box.run("find", "/etc", "/usr", "/var", "/opt", "/srv", "/home", "/lib",
                      "-xdev", timeout=300).stdout.splitlines()
    # systemd's own parent of every DynamicUser= service's LogsDirectory=, made at the
    # first such start; the package removes only its own part (/var/log/private/mpd).
    paths = {p for p in listing if not p.startswith(BOOKKEEPING) and p != "/var/log/private"}
    accounts = {name: box.run("cat", name, check=True).stdout
                for name in ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow")}
    return paths, accounts


@needs_box
def test_apt_purge_leaves_no_file_user_or_group_behind(clean_box, deb):
    box = clean_box
    before_paths, before_accounts = snapshot(box)
    install(box, deb)
    box.run("usermod", "-aG", "mpdops", OPERATOR, check=True)
    box.copy((box.run("cat", "/etc/mpd.toml", check=True).stdout
              .replace('target = "stdout"', 'target = "file"')
              .replace('file = ""', 'file = "/var/log/mpd/mpd.log"')), "/etc/mpd.toml")
    start(box)
    assert ping(box)
    assert box.run("test", "-s", "/var/log/mpd/mpd.log").returncode == 0  # it made a log
    if shutil.which("logrotate") or os.path.exists("/usr/sbin/logrotate"):  # rotated logs too
        box.run("logrotate", "--force", "--state", "/tmp/logrotate.state",
                "/etc/logrotate.d/mpd-tcp", check=True)
        assert box.run("test", "-s", "/var/log/mpd/mpd.log.1").returncode == 0
        wait_until(lambda: box.run("test", "-s", "/var/log/mpd/mpd.log").returncode == 0,
                   what="mpd's new log file after logrotate")
        # postrotate reached mpd through mpdctl, as root (not the signal fallback)
        logged = box.run("cat", "/var/log/mpd/mpd.log.1", "/var/log/mpd/mpd.log").stdout
        assert '"command": "reopen-logs"' in logged, logged[-2000:]
    apt(box, "purge", PACKAGE)
    unlink_units(box)
    after_paths, after_accounts = snapshot(box)
    assert sorted(after_paths - before_paths) == [], "left behind"
    assert sorted(before_paths - after_paths) == [], "removed, but not ours"
    assert after_accounts == before_accounts
