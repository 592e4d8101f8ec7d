"""Where mpdctl finds the daemon's control socket, in this order:

1. `--socket PATH`;
2. `$MPDCTL_SOCKET` (a per-user setting: an operator who runs an mpd of their own);
3. the config's `control.socket` (`--config`, else /etc/mpd.toml when it exists): a path
   is taken as it is; "auto" means the first socket that exists of $RUNTIME_DIRECTORY's
   (under the unit's ExecReload), /run/mpd/mpd.sock (the system daemon's, whoever asks)
   and this user's own ($XDG_RUNTIME_DIR/mpd/mpd.sock, for an mpd that this user runs);
4. a config that cannot be read or is invalid does not keep mpdctl from a running mpd:
   it warns in one line and tries the "auto" sockets.

The daemon resolves "auto" by who it runs as (config.default_socket_path); mpdctl, run by
any operator, looks for the system daemon first, so a non-root operator reaches it."""

from __future__ import annotations

import os

from mpd.config import schema as configmod

ENV = "MPDCTL_SOCKET"


class NotFound(Exception):
    """No socket to try; the message says where mpdctl looked."""

    def __init__(self, message: str, candidates: list[str]):
        super().__init__(message)
        self.candidates = candidates  # where an "auto" socket would be


def auto_candidates() -> list[str]:
    """Where an "auto" socket may be, most likely first, without duplicates."""
    found: list[str] = []
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    for path in (os.path.join(runtime, "mpd.sock") if runtime else "",
                 configmod.SYSTEM_SOCKET, user_socket()):
        if path and path not in found:
            found.append(path)
    return found


def user_socket() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/mpd-{os.geteuid()}"
    return os.path.join(runtime, "mpd", "mpd.sock")


def first_existing(paths: list[str]) -> str | None:
    return next((p for p in paths if os.path.exists(p)), None)


def control_socket(socket: str | None, config: str | None) -> tuple[str, str | None]:
    """The socket to connect to, and a warning to print (or None). Raises NotFound when
    there is none; configmod.ConfigError when the config is invalid and no mpd is found."""
    if socket:
        return socket, None
    if os.environ.get(ENV):
        return os.environ[ENV], None
    path = config
    if path is None and os.path.exists(configmod.DEFAULT_PATH):
        path = configmod.DEFAULT_PATH
    try:
        loaded = configmod.load(path)
    except configmod.ConfigError as e:
        fallback = first_existing(auto_candidates())
        if fallback is None:
            raise
        return fallback, f"cannot use the config ({e}); trying {fallback}"
    if loaded.socket != "auto":
        return loaded.socket, None
    candidates = auto_candidates()
    found = first_existing(candidates)
    if found is None:
        raise NotFound("mpd is not running: no control socket at " + " or ".join(candidates),
                       candidates)
    return found, None


TITLE = "mpd: master "  # proctitle.master()'s prefix, as /proc/PID/cmdline shows it
ACCEPTING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags: a listening socket


def running_masters(path: str, config: str | None) -> list[tuple[int, str]]:
    """Nothing answers on `path`: the mpd masters, as (pid, process title), that still
    listen on a socket bound to that name (/proc/net/unix keeps a socket's name after its
    file is gone), so that mpdctl tells "not running" from "running, but its control
    socket is gone". None when no socket listens there. Which master: the one holding
    that socket; if their fds cannot be read (another user's), the one `config`'s
    pidfile names, else those whose title names `config`, else every mpd master."""
    inodes = unix_listeners().get(path)
    if not inodes:
        return []
    masters = [(pid, t) for pid in pids() if (t := title(pid)).startswith(TITLE)]
    holders = [(pid, t) for pid, t in masters if holds(pid, inodes)]
    if holders or config is None:
        return holders or masters
    from mpd.system.daemonize import running_pid

    try:
        pidfile = running_pid(configmod.load(config).pidfile_path)
    except (configmod.ConfigError, OSError):
        pidfile = None
    wanted = os.path.realpath(config)
    return ([m for m in masters if m[0] == pidfile]
            or [m for m in masters if os.path.realpath(m[1][len(TITLE):]) == wanted]
            or masters)


def unix_listeners() -> dict[str, set[str]]:
    """The path of each listening unix socket, with the inodes of the sockets bound to it."""
    found: dict[str, set[str]] = {}
    try:
        with open("/proc/net/unix") as f:
            lines = f.readlines()[1:]
    except OSError:
        return found
    for line in lines:
        fields = line.split()  # Num RefCount Protocol Flags Type St Inode [Path]
        if len(fields) >= 8 and int(fields[3], 16) & ACCEPTING:
            found.setdefault(fields[7], set()).add(fields[6])
    return found


def listening_at(candidates: list[str]) -> str | None:
    """The first of `candidates` that a socket listens on, its file there or not."""
    listeners = unix_listeners()
    return next((path for path in candidates if path in listeners), None)


def holds(pid: int, inodes: set[str]) -> bool:
    """Whether the process holds one of these sockets (False when its fds are not ours to
    read)."""
    wanted = {f"socket:[{inode}]" for inode in inodes}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                return True
        except OSError:
            continue
    return False


def pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def title(pid: int) -> str:
    """The process's command line as it shows itself (setproctitle's title), or ""."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").strip().decode("utf-8", "replace")
