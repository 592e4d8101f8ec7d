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
        raise NotFound("mpd is not running: no control socket at " + " or ".join(candidates))
    return found, None
