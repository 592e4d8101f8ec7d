"""`mpd --help` and `mpdctl --help`, written to serve as their manual pages: commands,
signals, exit codes, files and environment, each taken from the table that defines it
(commands.COMMANDS and SIGNALS, the exit codes below), so the help cannot drift."""

from __future__ import annotations

import signal
import textwrap
from typing import Any

from mpd.config import schema as configmod
from mpd.ops.commands import COMMANDS, SIGNALS

MPD_EXIT_CODES = ((0, "stopped cleanly (SIGTERM, SIGINT, SIGQUIT, mpdctl stop), or "
                      "--check-config passed"),
                  (1, "internal error"),
                  (69, "cannot listen: the address is in use, or another mpd answers on the "
                       "control socket, or the control socket cannot be made"),
                  (78, "invalid configuration (one line on stderr names file, line and key), "
                       "or a start as root without server.user"))

MPD_FILES = ((configmod.DEFAULT_PATH, "the config, when --config is not given (else the "
                                      "embedded defaults)"),
             (configmod.SYSTEM_SOCKET, "the control socket of an mpd run by root or by "
                                       "systemd (RuntimeDirectory=mpd)"),
             ("$XDG_RUNTIME_DIR/mpd/mpd.sock", "the control socket of an mpd run by another "
                                               "user"),
             ("/run/mpd/mpd.pid", "--daemon's pidfile when run by root (daemon.pidfile)"))

MPD_ENVIRONMENT = (
    ("NOTIFY_SOCKET", "systemd's: READY=1, RELOADING=1, STATUS=, STOPPING=1 go there"),
    ("WATCHDOG_USEC", "systemd's WatchdogSec: WATCHDOG=1 from the master's loop at half of it"),
    ("LISTEN_FDS, LISTEN_PID", "socket activation: serve the passed socket instead of binding"),
    ("RUNTIME_DIRECTORY", "systemd's RuntimeDirectory: control.socket = \"auto\" goes there"),
    ("JOURNAL_STREAM", "stdout is the journal: events go through journald's native protocol"),
    ("XDG_RUNTIME_DIR", "where a non-root mpd puts an \"auto\" control socket"),
    ("MPD_TEST_CRASH_FILE, MPD_TEST_HANG_FILE, MPD_TEST_HOLD_FILE",
     "fault injection for the test suite only"),
    ("MPD_TEST_ACCEPT_SLOTS", "only these slots accept clients (tests and benchmarks only)"))

MPDCTL_ENVIRONMENT = (
    ("MPDCTL_SOCKET", "the control socket to use when --socket is not given (for an mpd of "
                      "your own)"),
    ("RUNTIME_DIRECTORY", "set by systemd for ExecReload: its mpd.sock is tried first"),
    ("XDG_RUNTIME_DIR", "your own mpd's \"auto\" socket: $XDG_RUNTIME_DIR/mpd/mpd.sock"))


def rows(title: str, items: Any, width: int = 20) -> list[str]:
    lines = ["", f"{title}:"]
    for name, meaning in items:
        name = str(name)
        lines += [f"  {name}", f"  {'':<{width}} {meaning}"] if len(name) > width else \
            [f"  {name:<{width}} {meaning}"]
    return lines


def as_mpdctl(request: dict[str, Any]) -> str:
    """A signal's request in mpdctl's words: {"command": "scale", "delta": 1} -> scale +1."""
    words = ["mpdctl", request["command"]]
    if "delta" in request:
        words.append(f"{request['delta']:+d}")
    text = " ".join(words)
    return text + " (immediate)" if request.get("graceful") is False else text


def signal_rows() -> list[tuple[str, str]]:
    table = [(sig.name, f"as `{as_mpdctl(request)}`: "
              f"{COMMANDS[request['command']].summary}") for sig, request in SIGNALS.items()]
    table.append((signal.SIGCHLD.name, "reap a worker, log worker.exited, respawn it into its "
                  "slot (with back-off for a crash loop)"))
    return table


def mpd_epilog() -> str:
    lines = ["Starts a master that forks epoll workers into numbered slots and supervises "
             "them.", "Run it in the foreground under systemd (packaging/mpd.service), or "
             "with --daemon.", "Started as root, it opens its sockets and files, then "
             "becomes server.user."]
    lines += rows("signals to the master", signal_rows(), 8)
    lines += rows("exit codes", MPD_EXIT_CODES, 3)
    lines += rows("files", MPD_FILES, 29)
    lines += rows("environment", MPD_ENVIRONMENT, 22)
    lines += ["", "See also: mpdctl --help; README.md (configuration keys, log events, "
              "troubleshooting)."]
    return "\n".join(lines)


def mpdctl_epilog(exit_codes: Any) -> str:
    lines = ["commands:"]
    for c in COMMANDS.values():
        wrapped = textwrap.wrap(c.summary, 70)
        lines += [f"  {c.usage:<18} {wrapped[0]}"] + [f"  {'':<18} {w}" for w in wrapped[1:]]
    lines += ["", "finding mpd (the first that applies):",
              "  --socket PATH, else $MPDCTL_SOCKET, else the config's control.socket",
              "  (--config, else /etc/mpd.toml if it exists). \"auto\" means the first "
              "socket that exists",
              "  of $RUNTIME_DIRECTORY/mpd.sock, /run/mpd/mpd.sock (the system mpd's, "
              "whoever you are)",
              "  and $XDG_RUNTIME_DIR/mpd/mpd.sock. A config that cannot be read or is "
              "invalid gives",
              "  a warning, and the \"auto\" sockets are tried. When nothing answers on "
              "the socket but",
              "  an mpd master still listens on that name (its file was removed), mpdctl "
              "waits up to",
              "  --timeout for mpd to bind it again (it does every 2 s, and on SIGHUP)."]
    lines += rows("exit codes", exit_codes, 3)
    lines += rows("environment", MPDCTL_ENVIRONMENT, 18)
    lines += rows("files", ((configmod.DEFAULT_PATH, "mpd's config (for control.socket)"),
                            (configmod.SYSTEM_SOCKET, "the system mpd's control socket")), 18)
    lines += ["", "shell completion: mpdctl --print-completion bash > "
              "/etc/bash_completion.d/mpdctl", "  (also zsh and tcsh)"]
    return "\n".join(lines)
