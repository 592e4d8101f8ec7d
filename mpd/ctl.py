"""`mpdctl`: steer a running mpd over its control socket."""

from __future__ import annotations

import argparse
import contextlib
import grp
import json
import os
import pwd
import socket
import sys
import time
from typing import Any

import shtab

from mpd.config import schema as configmod
from mpd.ops import findsocket, helptext
from mpd.ops.commands import COMMANDS, Command

EXIT_OK = 0
EXIT_ERROR = 1  # the daemon answered with an error
EXIT_USAGE = 2  # bad arguments (argparse's own code)
EXIT_NOT_RUNNING = 3  # no mpd answers on the socket
EXIT_DENIED = 4  # the socket or the daemon refused us
EXIT_TIMEOUT = 5  # no answer, or scale not done, within --timeout
EXIT_UNREACHABLE = 6  # mpd runs, but its control socket is gone and did not come back
EXIT_CONFIG = configmod.EX_CONFIG  # the config that names the socket is invalid
WAIT_SAID_AFTER = 1.0  # seconds between two lines that say what mpdctl waits for

EXIT_CODES = ((EXIT_OK, "done"), (EXIT_ERROR, "mpd answered with an error (a refused reload "
                                             "or scale, a failed upgrade)"),
              (EXIT_USAGE, "bad arguments"),
              (EXIT_NOT_RUNNING, "mpd is not running (no socket, or nothing answers on it)"),
              (EXIT_DENIED, "permission denied (socket file mode/owner, or mpd's allow-list)"),
              (EXIT_TIMEOUT, "timed out (the command's wait, or no answer)"),
              (EXIT_UNREACHABLE, "mpd is running (the message names its pid), but its "
                                 "socket's file is gone and did not come back within "
                                 "--timeout"),
              (EXIT_CONFIG, "the config file is invalid, and no mpd socket was found"))


class CtlError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpdctl", description="Steer a running mpd over its "
                                "control socket.", epilog=helptext.mpdctl_epilog(EXIT_CODES),
                                formatter_class=argparse.RawTextHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--config", metavar="PATH",
                       help=f"mpd's config, to find its socket (default: {configmod.DEFAULT_PATH}"
                            " if it exists)").complete = shtab.FILE
    where.add_argument("--socket", metavar="PATH", help="the control socket itself (default: "
                       f"${findsocket.ENV}, else see below)").complete = shtab.FILE
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long to wait for an answer, or for scale to finish (default 10)")
    p.add_argument("--json", action="store_true", help="print the raw JSON reply")
    p.add_argument("command", choices=list(COMMANDS))  # the daemon's own table
    p.add_argument("argument", nargs="*", help="for scale: N, +N or -N; for where: KEY; for "
                   "move: KEY SLOT; for drain and undrain: SLOT")
    p.add_argument("--interval", type=positive, default=1.0, metavar="SECONDS",
                   help="for top: seconds between two frames (default 1)")
    p.add_argument("--frames", type=int, default=1, metavar="N",
                   help="for top not on a terminal: frames to print, then exit (default 1)")
    shtab.add_argument_to(p, ["--print-completion"], help="print a completion script for "
                          "that shell, and exit")
    return p


def positive(text: str) -> float:
    value = float(text)
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds between 0 and 3600, got {text}")
    return value


class Client:
    def __init__(self, path: str, timeout: float, config: str | None = None):
        """`config`: mpd's config file, if known, to find its master when the socket is
        gone."""
        self.path = path
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        try:
            self.sock = self.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock = self.wait_for_socket(config)
        except PermissionError:
            raise CtlError(EXIT_DENIED, f"permission denied on {path}: {describe(path)}")\
                from None
        except OSError as e:
            raise CtlError(EXIT_NOT_RUNNING, f"cannot connect to {path}: {e.strerror}") from None
        self.buf = b""

    def wait_for_socket(self, config: str | None) -> socket.socket:
        """Nothing answers on the path. No mpd master alive: it is not running. One alive:
        its socket's file is gone or replaced, which mpd repairs by itself within seconds
        (and on SIGHUP): wait for that, up to the deadline."""
        masters = findsocket.running_masters(self.path, config)
        if not masters:
            raise CtlError(EXIT_NOT_RUNNING, f"mpd is not running (nothing answers on "
                           f"{self.path})")
        while time.monotonic() < self.deadline:
            time.sleep(0.05)  # a retry interval while mpd binds its socket again, bounded
            with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
                return self.connect(self.path)
        pids = ", ".join(str(pid) for pid, _title in masters)
        who = f"pid {pids} ({masters[0][1]})" if len(masters) == 1 else f"pids {pids}"
        hup = masters[0][0] if len(masters) == 1 else "PID"
        raise CtlError(EXIT_UNREACHABLE, (
            f"mpd is running ({who}), but nothing answers on {self.path}: its control socket "
            f"is gone or replaced, and mpd did not put it back within {self.timeout:g} s "
            "(its log says why: control.recreate_failed); mpdctl cannot fix that: once the "
            f"cause is gone, `kill -HUP {hup}` makes mpd bind its socket again"))

    def reconnect(self) -> None:
        """A new connection, for example after an upgrade's exec closed the old one."""
        self.sock.close()
        self.buf = b""
        try:
            self.sock = self.connect(self.path)
        except OSError as e:
            raise CtlError(EXIT_NOT_RUNNING, f"cannot connect to {self.path}: {e.strerror}")\
                from None

    def connect(self, path: str) -> socket.socket:
        """Connect, retrying while mpd's accept queue is full (EAGAIN), up to the deadline."""
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(0.1, self.deadline - time.monotonic()))
            try:
                sock.connect(path)
                return sock
            except BlockingIOError:
                sock.close()
                if time.monotonic() > self.deadline:
                    raise CtlError(EXIT_TIMEOUT, f"mpd on {path} accepts no connection "
                                   "(its queue stays full)") from None
                time.sleep(0.01)  # a retry interval, bounded by the deadline
            except BaseException:
                sock.close()
                raise

    def request(self, command: str, **fields: Any) -> dict[str, Any]:
        line = json.dumps({"version": 1, "command": command, **fields}) + "\n"
        try:
            self.sock.settimeout(max(0.05, self.deadline - time.monotonic()))
            # mpd may have turned us away already: then its reason waits to be read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.sock.sendall(line.encode())
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise CtlError(EXIT_NOT_RUNNING, "mpd closed the connection")
                self.buf += chunk
        except socket.timeout:
            raise CtlError(EXIT_TIMEOUT, f"no answer from mpd on {self.path}") from None
        except (ConnectionResetError, BrokenPipeError):
            raise CtlError(EXIT_NOT_RUNNING, "mpd closed the connection") from None
        raw, self.buf = self.buf.split(b"\n", 1)
        reply = json.loads(raw)
        if not reply.get("ok"):
            error = str(reply.get("error", "unknown error"))
            raise CtlError(EXIT_DENIED if error.startswith("permission denied") else EXIT_ERROR,
                           error)
        return reply


def describe(path: str) -> str:
    """Say which of owner, group and mode keeps us out, so the fix is obvious."""
    try:
        st = os.stat(path)
    except OSError as e:
        return e.strerror or "cannot stat"
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return (f"the socket is owned by {owner}:{group} with mode {st.st_mode & 0o777:o}, and you "
            f"are uid {os.geteuid()}; run as {owner}, or join group {group} and set "
            "control.allow_group")


def socket_path(args: argparse.Namespace) -> str:
    """The daemon's socket (findsocket.py says where mpdctl looks, and why there)."""
    try:
        path, warning = findsocket.control_socket(args.socket, args.config)
    except findsocket.NotFound as e:
        gone = findsocket.listening_at(e.candidates)  # an mpd whose "auto" socket's file is gone
        if gone is None:
            raise CtlError(EXIT_NOT_RUNNING, str(e)) from None
        return gone
    except configmod.ConfigError as e:
        raise CtlError(EXIT_CONFIG, f"invalid config: {e}; and no mpd socket at "
                       + " or ".join(findsocket.auto_candidates())) from None
    if warning is not None:
        print(f"mpdctl: warning: {warning}", file=sys.stderr)
    return path


def config_path(args: argparse.Namespace) -> str | None:
    """mpd's config as mpdctl knows it: --config, else /etc/mpd.toml when it exists; none
    with --socket or $MPDCTL_SOCKET, which name the socket alone."""
    if args.socket or os.environ.get(findsocket.ENV):
        return None
    if args.config:
        return args.config
    return configmod.DEFAULT_PATH if os.path.exists(configmod.DEFAULT_PATH) else None


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    command = COMMANDS[args.command]
    args.argument = " ".join(args.argument) if args.argument else None
    try:
        fields = command.argument(args.argument)
    except ValueError as e:
        parser.error(f"{args.command}: {e}")
    client = Client(socket_path(args), args.timeout, config_path(args))
    if command.view is not None:
        def send(name: str, **more: Any) -> dict[str, Any]:
            client.deadline = time.monotonic() + args.timeout  # each request its own
            try:
                return client.request(name, **more)
            except CtlError as e:  # an upgrade's exec closes every control connection
                if e.code != EXIT_NOT_RUNNING:
                    raise
                client.reconnect()  # the new master answers on the same socket
                return client.request(name, **more)
        return command.view(send, args)
    reply = client.request(args.command, **fields)
    if command.done is not None:
        wait_done(client, command, reply, args.timeout)
    print(json.dumps(reply, indent=2) if args.json else command.show(reply))
    return EXIT_OK


def wait_done(client: Client, command: Command, reply: dict[str, Any], timeout: float) -> None:
    """Poll status until the command's effect is complete, or fail at the deadline, saying
    what it still waits for (on stderr after a second, then when that changed, once a
    second at most).
    An upgrade's exec closes every control connection: then connect again."""
    assert command.done is not None
    name = command.usage.split()[0]
    said, said_at = "", time.monotonic()  # what it said last, and when
    while True:
        try:
            status = client.request("status")
        except CtlError as e:
            if e.code != EXIT_NOT_RUNNING or time.monotonic() > client.deadline:
                raise
            time.sleep(0.05)  # a retry interval while mpd re-executes, bounded
            client.reconnect()
            continue
        result = command.done(reply, status)
        if isinstance(result, str):
            raise CtlError(EXIT_ERROR, result)
        if result:
            return
        waiting = command.waiting(reply, status)
        if time.monotonic() > client.deadline:
            raise CtlError(EXIT_TIMEOUT, f"{name}: not done after {timeout:g} s"
                           + (f": waiting for {waiting}" if waiting else ""))
        if waiting and waiting != said and time.monotonic() - said_at >= WAIT_SAID_AFTER:
            print(f"mpdctl: {name}: waiting for {waiting}", file=sys.stderr)
            said, said_at = waiting, time.monotonic()
        time.sleep(0.02)  # a poll interval against the daemon, bounded by the deadline


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args, parser)
    except CtlError as e:
        print(f"mpdctl: {e}", file=sys.stderr)
        return e.code
    except BrokenPipeError:  # `mpdctl status | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
