"""The config keys for several hosts behind HAProxy: server.proxy_protocol, proxy_from,
proxy_timeout and [agent] listen. A bad value is one line naming the file, the line, the
key and what was expected, as for every other key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from mpd.config import schema as configmod
from mpd.config.schema import Config, ConfigError

BAD = {
    "proxy_protocol not a bool": ('[server]\nproxy_protocol = "yes"\n', 2,
                                  "server.proxy_protocol", "expected true or false"),
    "proxy_from not a list": ('[server]\nproxy_from = "127.0.0.1"\n', 2, "server.proxy_from",
                              'expected a list of IP addresses or networks such as '
                              '["127.0.0.0/8", "::1"], got \'127.0.0.1\''),
    "proxy_from with a name": ('[server]\nproxy_from = ["127.0.0.1", "haproxy.local"]\n', 2,
                               "server.proxy_from",
                               "('haproxy.local' is not an IP address or network)"),
    "proxy_from with host bits": ('[server]\nproxy_from = ["10.1.2.3/8"]\n', 2,
                                  "server.proxy_from",
                                  "('10.1.2.3/8' has host bits set; the network is 10.0.0.0/8)"),
    "proxy_from empty while on": ("[server]\nproxy_protocol = true\nproxy_from = []\n", 3,
                                  "server.proxy_from",
                                  "expected at least one address when server.proxy_protocol "
                                  "= true"),
    "proxy_timeout zero": ("[server]\nproxy_timeout = 0\n", 2, "server.proxy_timeout",
                           "expected a number of seconds from 0.1 to 60, got 0"),
    "agent listen without a port": ('[agent]\nlisten = "127.0.0.1"\n', 2, "agent.listen",
                                    'expected "address:port" such as "127.0.0.1:1991"'),
    "agent listen with a name": ('[agent]\nlisten = "localhost:1991"\n', 2, "agent.listen",
                                 'expected "address:port"'),
    "agent listen IPv6 without brackets": ('[agent]\nlisten = "::1:1991"\n', 2, "agent.listen",
                                           'or "[::1]:1991"'),
    "agent listen port 0": ('[agent]\nlisten = "127.0.0.1:0"\n', 2, "agent.listen",
                            'expected "address:port"'),
    "agent listen on the server's port": ('[server]\nport = 2000\n[agent]\n'
                                          'listen = "127.0.0.1:2000"\n', 4, "agent.listen",
                                          "expected a port other than server.port (2000)"),
    "agent listen on every address, server's port": (
        '[server]\nlisten = "127.0.0.2"\n[agent]\nlisten = "0.0.0.0:1990"\n', 4,
        "agent.listen", "the agent check needs its own"),
    "unknown agent key": ('[agent]\nport = 1991\n', 2, "agent.port",
                          "unknown key; [agent] takes listen, drain_delay"),
    "drain_delay negative": ('[agent]\ndrain_delay = -1\n', 2, "agent.drain_delay",
                             "expected a number of seconds from 0 to 600, got -1"),
    "agent in single-process mode": ('[workers]\nworkers = 0\n[agent]\n'
                                     'listen = "127.0.0.1:1991"\n', 4, "agent.listen",
                                     "single-process mode (workers = 0) has none"),
}


@pytest.mark.parametrize("name", BAD)
def test_a_bad_value_names_file_line_key_and_what_was_expected(name: str):
    text, line, key, expected = BAD[name]
    with pytest.raises(ConfigError) as error:
        configmod.parse(text, "/etc/mpd.toml")
    assert (error.value.line, error.value.key) == (line, key)
    assert expected in error.value.detail
    assert str(error.value).startswith(f"/etc/mpd.toml:{line}: {key}: ")


def test_the_defaults_are_off_and_loopback_only():
    config = Config()
    assert config.proxy_protocol is False
    assert config.proxy_from == ("127.0.0.0/8", "::1")
    assert config.proxy_timeout == 3.0
    assert config.agent_listen == ""


def test_a_full_multihost_config_is_taken():
    config = configmod.parse(
        '[server]\nlisten = "10.0.0.5"\nproxy_protocol = true\n'
        'proxy_from = ["10.0.0.1", "192.168.0.0/24", "fd00::/8"]\nproxy_timeout = 1.5\n'
        '[agent]\nlisten = "10.0.0.5:1991"\n', "/etc/mpd.toml")
    assert config.proxy_protocol is True
    assert config.proxy_from == ("10.0.0.1", "192.168.0.0/24", "fd00::/8")
    assert config.proxy_timeout == 1.5
    assert config.agent_listen == "10.0.0.5:1991"
    assert configmod.host_port(config.agent_listen) == ("10.0.0.5", 1991)
    assert configmod.host_port("[::1]:1991") == ("::1", 1991)


def test_a_rendered_config_reads_back_the_same():
    """--print-config of a non-default config (lists included) is a valid file."""
    config = Config(proxy_protocol=True, proxy_from=("10.0.0.0/8", "::1"), proxy_timeout=2.0,
                    agent_listen="[::1]:1991", allow_uids=(1000, 1001))
    again = configmod.parse(configmod.render(config), "rendered")
    assert again.replace(path=None) == config


def test_proxy_protocol_and_the_agent_port_need_a_restart_the_rest_reloads(tmp_path: Path):
    path = tmp_path / "mpd.toml"
    path.write_text("[server]\nport = 2000\n")
    current = configmod.load(str(path))
    path.write_text('[server]\nport = 2000\nproxy_from = ["10.0.0.0/8"]\nproxy_timeout = 1\n')
    reloaded = configmod.reload(current)
    assert (reloaded.proxy_from, reloaded.proxy_timeout) == (("10.0.0.0/8",), 1.0)
    assert {"proxy_from", "proxy_timeout"} <= set(configmod.LIVE_SETTINGS)
    for text in ("[server]\nport = 2000\nproxy_protocol = true\n",
                 '[server]\nport = 2000\n[agent]\nlisten = "127.0.0.1:2001"\n'):
        path.write_text(text)
        with pytest.raises(ConfigError) as error:
            configmod.reload(current)
        assert "need a restart" in str(error.value)


def test_mpd_check_config_refuses_a_bad_proxy_from_with_exit_78(tmp_path: Path):
    path = tmp_path / "mpd.toml"
    path.write_text('[server]\nproxy_protocol = true\nproxy_from = ["10.0.0.300"]\n')
    run = subprocess.run([sys.executable, "-m", "mpd.cli", "--check-config", "--config",
                          str(path)], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert run.returncode == configmod.EX_CONFIG
    assert run.stderr.strip().splitlines()[-1] == (
        f"mpd: invalid config: {path}:3: server.proxy_from: expected a list of IP addresses "
        "or networks such as [\"127.0.0.0/8\", \"::1\"] ('10.0.0.300' is not an IP address "
        "or network), got ['10.0.0.300']")
