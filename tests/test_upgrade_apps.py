"""`mpdctl upgrade` with the application's new code broken: the same config, but the module
now fails to import, or its factory raises, or its groups could not read the running
groups' state. The pre-flight (a fresh interpreter that loads the application) refuses
it in one line, and every client stays where it is, chatting on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import wait_until
from test_apps import Member
from test_upgrade import mpdctl, status

from mpd import ctl

GOOD = '''"""rooms, as an application package of its own would ship it."""
from mpd.apps import rooms


def application():
    return rooms.application()
'''

BROKEN = {
    "import": (GOOD + "\nimport a_module_that_is_not_installed\n",
               "cannot import chatapp (for 'chatapp:application'): "
               "ModuleNotFoundError(\"No module named 'a_module_that_is_not_installed'\")"),
    "factory": (GOOD.replace("return rooms.application()",
                             "return rooms.application(max_line=0)"),
                "chatapp:application() raised ValueError('max_line must be an integer"),
    "state": (GOOD.replace("return rooms.application()",
                           "from dataclasses import replace\n"
                           "    return replace(rooms.application(), state_version=2, "
                           "reads_state=(2,))"),
              "the new code's application 'rooms' reads state versions [2], and the running "
              "groups' is 1"),
}


@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_an_upgrade_to_a_broken_application_is_refused_and_keeps_every_client(
        mpd_factory, tmp_path: Path, breakage: str):
    package = tmp_path / "site"
    package.mkdir()
    (package / "chatapp.py").write_text(GOOD)
    server = mpd_factory({"server": {"protocol": "chatapp:application"},
                          "workers": {"workers": 2}}, env={"PYTHONPATH": str(package)})
    before = status(server)
    rooms = {name: [Member(server.port, name) for _ in range(3)]
             for name in (b"red", b"green", b"blue", b"gold")}
    for members in rooms.values():  # in whatever order they reached the room's worker
        assert sorted(member.line() for member in members) == [b"ok 1", b"ok 2", b"ok 3"]
    source, expected = BROKEN[breakage]
    (package / "chatapp.py").write_text(source)
    result = mpdctl(server, "upgrade")
    assert result.returncode == ctl.EXIT_ERROR
    (line,) = result.stderr.splitlines()
    if breakage == "state":  # the new code loads, but could not take the groups' state
        assert line.startswith("mpdctl: upgrade failed: the new code's application"), line
    else:  # the pre-flight's own line: the config's server.protocol cannot be loaded
        assert line.startswith("mpdctl: upgrade failed: the new code failed its pre-flight "
                               "check: mpd: invalid config: "), line
        assert "server.protocol: cannot load the application: " in line
    assert expected in line, line
    after = status(server)
    assert [(w["slot"], w["pid"], w["generation"]) for w in after["workers"]] \
        == [(w["slot"], w["pid"], w["generation"]) for w in before["workers"]]
    assert after["master"]["generation"] == 1 and after["master"]["upgrade"]["state"] == "failed"
    assert not server.events("upgrade.exec")
    # Every member is still there, in its room, and hears the others.
    for name, members in rooms.items():
        where = json.loads(mpdctl(server, "--json", "where", name.decode()).stdout)
        assert where["members"] in (None, 3), where
        members[0].sock.sendall(b"still here\n")
        assert [m.line() for m in members[1:]] == [b"still here"] * 2
    wait_until(lambda: sum(w["members"] for w in status(server)["workers"]) == 12,
               what="12 members in the workers")
    assert not server.events("client.closed")
    for members in rooms.values():
        for member in members:
            member.close()
