"""The configuration: one schema table, the TOML loader that checks a file against it,
and the renderer that writes the documented example config from the same table."""

from __future__ import annotations

import dataclasses
import os
import re
import resource
import sys
from dataclasses import dataclass
from typing import Any, Callable

from mpd.config import checks
from mpd.config.tomllines import key_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 in CI
    import tomli as tomllib

EX_CONFIG = 78  # sysexits.h: configuration error; systemd's RestartPreventExitStatus uses it
DEFAULT_PATH = "/etc/mpd.toml"
SYSTEM_SOCKET = "/run/mpd/mpd.sock"  # the system daemon's control socket (root, systemd)
# fds a worker keeps from clients: its own (about 10: stdio, epoll, listener, channel, signal
# pair, a log sink) and hand-offs in flight. An eighth of the fd limit, at least 16 and at
# most 128: a fixed 128 left a worker with a limit of 64 one client (issue 20).
FD_HEADROOM_MIN, FD_HEADROOM_MAX, FD_HEADROOM_SHARE = 16, 128, 8
MAX_CLIENTS = checks.MAX_CLIENTS  # the most max_clients may be, "auto" included


host_port = checks.host_port  # "address:port" -> (address, port), for the agent's socket


class ConfigError(Exception):
    """A config problem, already phrased for the operator: file, line, key, what was expected."""

    def __init__(self, path: str, message: str, line: int | None = None, key: str | None = None):
        self.path, self.line, self.key, self.detail = path, line, key, message
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


def default_socket_path() -> str:
    """systemd's RuntimeDirectory= when it set one, /run/mpd for root, else under
    XDG_RUNTIME_DIR (or /tmp/mpd-UID)."""
    runtime_dirs = os.environ.get("RUNTIME_DIRECTORY", "")
    if runtime_dirs:
        return os.path.join(runtime_dirs.split(":")[0], "mpd.sock")
    if os.geteuid() == 0:
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/mpd-{os.geteuid()}"
    return os.path.join(runtime, "mpd", "mpd.sock")


APP_SECTION = "app"  # free-form: the application's options, passed to its factory
APP_DOC = ("The application's own options (any keys), given to its factory as keyword\n"
           "arguments; the application says what it takes. A restart applies a change.")
# What a reload does with each key (Key.applies): every key is one of these.
LIVE = "live"  # the master sends it to running workers in CONFIG (and keeps its own copy)
MASTER = "master"  # only the master reads it: its copy is all there is to change
RESTART = "restart"  # bound to a socket, a file or the start: a reload that changes it fails
# How the config reference says each (README: Configuration).
APPLIES = {LIVE: "workers", MASTER: "master", RESTART: "restart"}
PREFIXED_SECTIONS = ("log", "agent", "metrics")  # their keys are Config fields named section_key


def settings(applies: str) -> tuple[str, ...]:
    """The Config attributes of the keys that a reload applies so."""
    return tuple(key.attr for key in SCHEMA if key.applies == applies)


def live_settings(config: Config) -> dict[str, Any]:
    """What a reload sends to running workers: the live settings and the config's number
    (each worker reports the number it runs, so `mpdctl reload` knows when all do)."""
    return {**{k: getattr(config, k) for k in LIVE_SETTINGS}, "generation": config.generation}


@dataclass(frozen=True)
class Key:
    section: str
    name: str
    default: Any
    check: Callable[[Any], Any]
    applies: str  # LIVE, MASTER or RESTART: what a reload does with it
    doc: str
    toml_default: str = ""  # how the default is written in the example file, when repr() won't do

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def attr(self) -> str:
        if self.section in PREFIXED_SECTIONS:
            return f"{self.section}_{self.name}"
        return self.name


# The one place that defines every config key, its default, its check and its documentation.
SCHEMA: tuple[Key, ...] = (
    Key("server", "listen", "127.0.0.1", checks.address, RESTART,
        "Address to listen on: IPv4 or IPv6 (\"0.0.0.0\" or \"::\" for every interface)."),
    Key("server", "port", 1990, checks.int_range(0, 65535), RESTART,
        "TCP port. 0 lets the kernel pick a free one; the chosen port is logged in mpd.started."),
    Key("server", "backlog", 1024, checks.int_range(1, 65535), RESTART,
        "listen(2) backlog: connections the kernel queues before a worker accepts them."),
    Key("server", "protocol", "ping", checks.protocol, RESTART,
        "The application the workers serve: \"ping\" (the seed's), \"rooms\" (a chat),\n"
        "\"relay\" (one publisher, many players), the name of an entry point in the group\n"
        "mpd.protocols, or \"package.module:factory\". Its options are the [app] table."),
    Key("server", "user", "", checks.user, RESTART,
        "The user mpd runs as once its sockets and files are open, when started as root\n"
        "(master and workers alike). \"\" = stay as started, but a start as root is then\n"
        "refused: say \"root\" to serve as root knowingly. Under systemd leave it \"\":\n"
        "the unit's DynamicUser= or User= decides. `mpd --user` overrides it."),
    Key("server", "group", "", checks.group, RESTART,
        "The group for server.user. \"\" = that user's primary group."),
    Key("server", "proxy_protocol", False, checks.boolean, RESTART,
        "Expect a PROXY protocol header (v1 or v2, as HAProxy's send-proxy-v2 writes it)\n"
        "before each client's bytes, and log the real client it names. Clients from\n"
        "elsewhere, or with a malformed or late header, are closed (client.proxy_rejected)."),
    Key("server", "proxy_from", ("127.0.0.0/8", "::1"), checks.networks, LIVE,
        "Addresses or networks that may send a PROXY header (the proxies), e.g.\n"
        "[\"10.0.0.5\", \"192.168.1.0/24\"]. Used when proxy_protocol = true.",
        toml_default='["127.0.0.0/8", "::1"]'),
    Key("server", "proxy_timeout", 3.0, checks.float_range(0.1, 60), LIVE,
        "Seconds a client may take to send its whole PROXY header before it is closed."),
    Key("workers", "workers", "auto", checks.workers, MASTER,
        "Number of worker processes. \"auto\" = one per CPU this process may run on;\n"
        "0 = single-process mode: the master serves clients itself."),
    Key("workers", "max_workers", 64, checks.int_range(1, 1024), MASTER,
        "Upper bound for the worker count (auto-scale, SIGTTIN and mpdctl scale stop here)."),
    Key("workers", "max_clients", "auto", checks.max_clients, LIVE,
        "Connections one worker serves at once; at the limit it stops accepting until one\n"
        "leaves, and a client handed over to it goes on to its key's next slot. \"auto\" = what\n"
        "the fd limit allows: RLIMIT_NOFILE (mpd lifts it to the hard limit) less a headroom\n"
        "for the worker's own fds and hand-offs in flight (an eighth of the limit, at least\n"
        "16 and at most 128: 48 clients at a limit of 64, 896 at 1024), up to 1000000. A\n"
        "number above that is capped the same way (mpd.max_clients_capped)."),
    Key("workers", "max_output_buffer", 262144, checks.int_range(1024, 1 << 30), LIVE,
        "Bytes of replies a worker holds for a client that does not read; past it the client\n"
        "is closed (client.overflow), so a stuck client never blocks the others."),
    Key("workers", "max_group_state", 16 * 1024 * 1024, checks.int_range(0, 1 << 31), LIVE,
        "Bytes of state a key group may export (the group's and its members' together)\n"
        "when it moves to another worker; a bigger one is refused (group.move_failed,\n"
        "naming the key) and the group stays where it is.",
        toml_default="16777216"),
    Key("workers", "idle_timeout", 300.0, checks.float_range(0, 86400), LIVE,
        "Seconds a client may go without sending a whole frame or taking any of its replies\n"
        "before it is closed (client.timed_out); 0 = never. A client that half-closed (sent\n"
        "EOF) gets its replies first, unless it stops reading them for this long."),
    Key("workers", "first_frame_timeout", 10.0, checks.float_range(0, 86400), LIVE,
        "Seconds a new client has to send its first whole frame before it is closed, so that\n"
        "connections that send nothing, or a byte now and then (slowloris), cannot hold the\n"
        "places of real clients; 0 = never."),
    Key("workers", "autoscale", False, checks.boolean, MASTER,
        "Add a worker (up to max_workers) whenever every worker is at max_clients."),
    Key("workers", "graceful_timeout", 10.0, checks.float_range(0, 3600), LIVE,
        "Seconds that workers get to finish their clients on SIGTERM before SIGKILL."),
    Key("workers", "worker_timeout", 30.0, checks.float_range(1, 3600), MASTER,
        "Seconds without a heartbeat after which a worker counts as hung and is replaced."),
    Key("workers", "backoff_max", 30.0, checks.float_range(0.1, 3600), MASTER,
        "Longest wait, in seconds, before respawning a slot whose workers keep failing before\n"
        "they serve (the wait doubles from 0.1 s with each; a worker that served is replaced\n"
        "at once, and while no other slot serves the wait is 1 s at most)."),
    Key("control", "socket", "auto", checks.socket_path, RESTART,
        "Control socket for mpdctl. \"auto\" = mpd.sock in systemd's RuntimeDirectory\n"
        "(/run/mpd), else /run/mpd/mpd.sock for root, else $XDG_RUNTIME_DIR/mpd/mpd.sock.\n"
        "With \"auto\", mpdctl tries /run/mpd/mpd.sock first, whoever runs it."),
    Key("control", "mode", 0o660, checks.mode, RESTART,
        "File mode of the control socket.", toml_default="0o660"),
    Key("control", "allow_uids", (), checks.uids, MASTER,
        "User ids allowed to use the control socket besides root and mpd's own user\n"
        "(checked with SO_PEERCRED on every connection).", toml_default="[]"),
    Key("control", "allow_group", "", checks.group, RESTART,
        "A group whose members may use the control socket; the socket is made\n"
        "group-owned by it. \"\" = none."),
    Key("log", "level", "info", checks.choice("debug", "info", "warning", "error"), LIVE,
        "Least severe level written: debug also logs every client connect and close."),
    Key("log", "format", "auto", checks.choice("auto", "json", "console"), LIVE,
        "json = one JSON object per line; console = a line for people (the time first);\n"
        "auto = console when stdout is a terminal, else json. Under journald the fields go\n"
        "to the journal either way; MESSAGE is then the JSON line only with \"json\".\n"
        "`mpd --log-format` overrides it."),
    Key("log", "target", "stdout", checks.choice("stdout", "file", "syslog"), LIVE,
        "Where logs go. stdout: under systemd, each event goes to journald with its fields\n"
        "(MPD_EVENT, MPD_SLOT, ...); file: append to log.file (reopened on reload; a file\n"
        "that cannot be opened is a config error); syslog: /dev/log, facility daemon.\n"
        "Writes never block: a sink that falls behind gets a bounded queue, then drops."),
    Key("log", "file", "", checks.path_or_empty, LIVE,
        "The log file for target = \"file\"."),
    Key("log", "buffer", 1048576, checks.int_range(4096, 1 << 30), LIVE,
        "Bytes of log lines each process holds for a sink that does not keep up (a full\n"
        "pipe, a busy journald); past it lines are dropped, counted and reported\n"
        "(log.dropped) once the sink catches up."),
    Key("log", "stats_interval", 60.0, checks.float_range(0, 86400), MASTER,
        "Seconds between two mpd.stats lines from the master: the counts of the interval\n"
        "(requests, hand-offs, refusals, errors, restarts), clients, and hand-off latency\n"
        "p50/p99/max; only when something was counted. 0 = none. Per hand-off lines\n"
        "(fd.dispatched) are at debug."),
    Key("agent", "listen", "", checks.listen_or_empty, RESTART,
        "HAProxy agent-check port, as \"address:port\" (\"[::1]:1991\" for IPv6); \"\" = off.\n"
        "Each connection gets one line: \"up ready N%\" (N = free share of capacity),\n"
        "\"drain\" while stopping, upgrading or with no ready worker, \"down\" when halting."),
    Key("agent", "drain_delay", 3.0, checks.float_range(0, 600), MASTER,
        "Seconds a graceful stop first goes on serving and accepting while the agent says\n"
        "\"drain\", so HAProxy (which asks every agent-inter: 2 s in the shipped config)\n"
        "sends no new client before the listeners close. Keep it above agent-inter.\n"
        "0 = no delay. Used when agent.listen is set."),
    Key("metrics", "listen", "", checks.listen_or_empty, RESTART,
        "Prometheus metrics over HTTP, as \"address:port\" (\"[::1]:9190\" for IPv6); \"\" =\n"
        "off (`mpdctl metrics` prints them either way). GET /metrics, served by the master's\n"
        "own loop: bounded requests, deadlines and at most 16 connections. No access\n"
        "control of its own: listen on loopback or a private address."),
    Key("daemon", "pidfile", "auto", checks.socket_path, RESTART,
        "Pidfile written by `mpd --daemon`. \"auto\" = /run/mpd/mpd.pid for root, else\n"
        "next to the control socket."),
)
LIVE_SETTINGS = settings(LIVE)  # what a CONFIG message carries (and a worker checks)
RESTART_SETTINGS = settings(RESTART)


@dataclass(frozen=True)
class Config:
    listen: str = "127.0.0.1"
    port: int = 1990
    backlog: int = 1024
    protocol: str = "ping"
    user: str = ""
    group: str = ""
    proxy_protocol: bool = False
    proxy_from: tuple[str, ...] = ("127.0.0.0/8", "::1")
    proxy_timeout: float = 3.0
    workers: int | str = "auto"
    max_workers: int = 64
    max_clients: int | str = "auto"
    max_output_buffer: int = 262144
    max_group_state: int = 16 * 1024 * 1024
    idle_timeout: float = 300.0
    first_frame_timeout: float = 10.0
    autoscale: bool = False
    graceful_timeout: float = 10.0
    worker_timeout: float = 30.0
    backoff_max: float = 30.0
    socket: str = "auto"
    mode: int = 0o660
    allow_uids: tuple[int, ...] = ()
    allow_group: str = ""
    log_level: str = "info"
    log_format: str = "auto"
    log_target: str = "stdout"
    log_file: str = ""
    log_buffer: int = 1048576
    log_stats_interval: float = 60.0
    pidfile: str = "auto"
    agent_listen: str = ""
    agent_drain_delay: float = 3.0
    metrics_listen: str = ""
    app: tuple[tuple[str, Any], ...] = ()  # the [app] table: the application's options
    path: str | None = None  # the file it came from; None = embedded defaults
    generation: int = 1  # the config's number: one more with each reload the master applies
    # Settings from the command line (mpd --log-format, --daemon): they win over the
    # file, on every reload too. ((attribute, value), ...)
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def worker_count(self) -> int:
        """The configured worker count with "auto" resolved, never above max_workers."""
        if self.workers == "auto":
            return min(len(os.sched_getaffinity(0)), self.max_workers)
        return min(int(self.workers), self.max_workers)

    def clients_per_worker(self, fd_limit: int | None = None) -> int:
        """max_clients with "auto" resolved: never more than the fd limit (the soft
        RLIMIT_NOFILE, read now unless given) leaves for clients after fd_headroom()."""
        if fd_limit is None:
            fd_limit = fd_soft_limit()
        room = max(1, fd_limit - fd_headroom(fd_limit))
        wanted = MAX_CLIENTS if self.max_clients == "auto" else int(self.max_clients)
        return min(wanted, room)

    @property
    def socket_path(self) -> str:
        return default_socket_path() if self.socket == "auto" else self.socket

    @property
    def pidfile_path(self) -> str:
        if self.pidfile == "auto":
            return os.path.join(os.path.dirname(default_socket_path()), "mpd.pid")
        return self.pidfile

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def override(self, **changes: Any) -> Config:
        """Settings from the command line, kept over reloads (see reload())."""
        kept = dict(self.overrides)
        kept.update(changes)
        return dataclasses.replace(self, overrides=tuple(kept.items()), **kept)


def fd_headroom(fd_limit: int) -> int:
    """The fds a worker keeps from clients under this fd limit."""
    return min(FD_HEADROOM_MAX, max(FD_HEADROOM_MIN, fd_limit // FD_HEADROOM_SHARE))


def fd_soft_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return MAX_CLIENTS + FD_HEADROOM_MAX if soft == resource.RLIM_INFINITY else soft


def parse(text: str, path: str) -> Config:
    """Check TOML text against SCHEMA; raise ConfigError naming the first problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        line = int(m.group(1)) if m else None
        raise ConfigError(path, f"TOML syntax error: {e}", line=line) from None
    by_section: dict[str, dict[str, Key]] = {}
    for key in SCHEMA:
        by_section.setdefault(key.section, {})[key.name] = key
    values: dict[str, Any] = {}
    for section, table in data.items():
        if section == APP_SECTION and isinstance(table, dict):
            values["app"] = tuple(table.items())  # the application checks its own options
            continue
        if section not in by_section:
            expected = ", ".join(f"[{s}]" for s in by_section)
            raise ConfigError(path, f"unknown section; expected one of {expected}",
                              line=key_line(text, section, None),
                              key=section)
        if not isinstance(table, dict):
            raise ConfigError(path, "expected a [section] table",
                              line=key_line(text, section, None), key=section)
        for name, value in table.items():
            key = by_section[section].get(name)
            if key is None:
                known = ", ".join(by_section[section])
                raise ConfigError(path, f"unknown key; [{section}] takes {known}",
                                  line=key_line(text, section, name), key=f"{section}.{name}")
            try:
                values[key.attr] = key.check(value)
            except ValueError as e:
                raise ConfigError(path, f"expected {e}, got {value!r}",
                                  line=key_line(text, section, name), key=key.dotted) from None
    config = Config(path=path, **values)
    if config.log_target == "file" and not config.log_file:
        raise ConfigError(path, 'expected log.file to be set when log.target = "file"',
                          line=key_line(text, "log", "target"), key="log.file")
    if config.group and not config.user:
        raise ConfigError(path, "expected server.user to be set when server.group is",
                          line=key_line(text, "server", "group"), key="server.group")
    if isinstance(config.workers, int) and config.workers > config.max_workers:
        raise ConfigError(path, f"expected at most workers.max_workers ({config.max_workers}), "
                          f"got {config.workers}", line=key_line(text, "workers", "workers"),
                          key="workers.workers")
    _check_proxy_and_ports(config, text, path)
    return config


def _check_proxy_and_ports(config: Config, text: str, path: str) -> None:
    """Settings that are valid alone but not together."""
    if config.proxy_protocol and not config.proxy_from:
        raise ConfigError(path, "expected at least one address when server.proxy_protocol = "
                          "true (else no client could connect)",
                          line=key_line(text, "server", "proxy_from"), key="server.proxy_from")
    taken = {"server.port": (config.listen, config.port)}
    for section, what in (("agent", "the agent check"), ("metrics", "the metrics endpoint")):
        listen = getattr(config, f"{section}_listen")
        if not listen:
            continue
        line = key_line(text, section, "listen")
        if config.workers == 0:
            raise ConfigError(path, f"expected workers.workers of 1 or more (or \"auto\") "
                              f"with {section}.listen: the master serves {what}, and "
                              "single-process mode (workers = 0) has none",
                              line=line, key=f"{section}.listen")
        host, port = host_port(listen)
        for name, (other_host, other_port) in taken.items():
            if port == other_port and (host == other_host or "0.0.0.0" in (host, other_host)
                                       or "::" in (host, other_host)):
                raise ConfigError(path, f"expected a port other than {name} ({port}); "
                                  f"{what} needs its own", line=line, key=f"{section}.listen")
        taken[f"{section}.listen"] = (host, port)


def load(path: str | None) -> Config:
    """The config from `path`, or the embedded defaults when path is None."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(path, f"cannot read the config file: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, f"expected UTF-8 text: {e}") from None
    return parse(text, path)


def reload(current: Config) -> Config:
    """Re-read current.path for a reload; raise ConfigError if the file is invalid or
    changes a setting that only a restart can apply."""
    new = load(current.path).replace(generation=current.generation + 1)
    if current.overrides:
        new = new.override(**dict(current.overrides))
    fixed = [k for k in RESTART_SETTINGS if getattr(new, k) != getattr(current, k)]
    if new.app != current.app:
        fixed.append(f"[{APP_SECTION}]")
    if (new.worker_count == 0) != (current.worker_count == 0):
        fixed.append("workers (single-process mode)")
    if fixed:
        raise ConfigError(current.path or "(embedded defaults)",
                          "these settings need a restart: " + ", ".join(fixed))
    return new


def _toml_value(key: Key, value: Any) -> str:
    if key.toml_default and value == key.default:
        return key.toml_default
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(key, v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def render(config: Config | None = None) -> str:
    """The config as a documented TOML file; etc/mpd.toml is render() of the defaults."""
    config = config or Config()
    out = ["# mpd configuration. Every key is optional: a missing one takes the default shown.",
           "# Check a file with `mpd --check-config --config FILE` (exit 0 = valid, 78 = not).",
           "# Generated from the schema in mpd/config/schema.py by `mpd --print-config`."]
    section = None
    for key in SCHEMA:
        if key.section != section:
            section = key.section
            out += ["", f"[{section}]"]
        out += [f"# {line}" for line in key.doc.splitlines()]
        if key.applies == RESTART:
            out.append("# Needs a restart: a reload that changes it is refused.")
        out.append(f"{key.name} = {_toml_value(key, getattr(config, key.attr))}")
    out += ["", f"[{APP_SECTION}]", *(f"# {line}" for line in APP_DOC.splitlines())]
    out += [f"{name} = {_toml_value(SCHEMA[0], value)}" for name, value in config.app]
    return "\n".join(out) + "\n"


def markdown() -> str:
    """The config reference table for the README, from the same schema."""
    rows = ["| key | default | on reload | meaning |", "| --- | --- | --- | --- |"]
    for key in SCHEMA:
        default = _toml_value(key, key.default)
        rows.append(f"| `{key.dotted}` | `{default}` | {APPLIES[key.applies]} | "
                    f"{' '.join(key.doc.splitlines())} |")
    rows.append(f"| `[{APP_SECTION}]` | | restart | {' '.join(APP_DOC.splitlines())} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
