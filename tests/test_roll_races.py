"""Lifecycle commands that land during an upgrade's roll (issue 20, item 4): a reload is
applied to every worker that is not retiring, the roll's new one included; a scale waits
for the roll's end; a second upgrade is refused. No worker stays on an old config, and
mpdctl says what it waits for."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT
from test_upgrade import installed, set_version, status  # noqa: F401 - fixture

from mpd import ctl


def mpdctl(server, *args: str) -> subprocess.Popen:
    """mpdctl in the background: it waits for its command to be done."""
    return subprocess.Popen([sys.executable, "-m", "mpd.ctl", "--socket",
                             str(server.tmp / "mpd.sock"), "--timeout", "30", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_a_reload_and_a_scale_during_a_roll_leave_every_worker_on_the_newest_config(
        mpd_factory, installed, tmp_path):  # noqa: F811 - the fixture
    hold = tmp_path / "hold"
    server = mpd_factory({"workers": {"workers": 2}}, cwd=installed,
                         env={"MPD_TEST_HOLD_FILE": str(hold)})
    set_version(installed, "99.1.0")
    hold.touch()  # the roll's new worker waits before it starts: the roll stays on slot 0
    upgrade = mpdctl(server, "upgrade")
    server.wait_event("upgrade.adopted", timeout=30)
    server.wait_event("worker.spawned", generation=2)
    server.write_config({**server.settings, "workers": {"workers": 3, "idle_timeout": 99}})
    reload = mpdctl(server, "reload")  # config #2, and a scale from 2 to 3 workers
    queued = server.wait_event("worker.scale_queued")
    assert (queued["previous"], queued["workers"]) == (2, 3)
    second = subprocess.run([sys.executable, "-m", "mpd.ctl", "--socket",
                             str(server.tmp / "mpd.sock"), "upgrade"],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert second.returncode == ctl.EXIT_ERROR
    assert "an upgrade is already running (rolling, generation 2)" in second.stderr
    # mpdctl says what it waits for: the roll, and the workers on the old config.
    said = reload.stderr.readline()
    assert said.startswith("mpdctl: reload: waiting for config #2 runs on 2 of 3 workers; "
                           "pid "), said
    assert "runs config #1" in said and "an upgrade's roll onto generation 2" in said, said
    hold.unlink()  # the new worker starts: the roll goes on, then the scale
    out, err = upgrade.communicate(timeout=60)
    assert upgrade.returncode == 0, err
    out, err = reload.communicate(timeout=60)
    assert reload.returncode == 0, err
    assert out.strip() == "mpd: config #2 reloaded, 3 workers run it"
    after = status(server)
    assert after["master"]["config_generation"] == 2
    assert [(w["config_generation"], w["generation"]) for w in after["workers"]] == [(2, 2)] * 3
    assert after["master"]["ready"] == 3
