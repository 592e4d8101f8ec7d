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

from mpd import config as configmod
from mpd.commands import COMMANDS

EXIT_OK = 0
EXIT_ERROR = 1  # the daemon answered with an error
EXIT_USAGE = 2  # bad arguments (argparse's own code)
EXIT_NOT_RUNNING = 3  # no mpd answers on the socket
EXIT_DENIED = 4  # the socket or the daemon refused us
EXIT_TIMEOUT = 5  # no answer, or scale not done, within --timeout
EXIT_CONFIG = configmod.EX_CONFIG  # the config that names the socket is invalid

EPILOG = f"""commands:
  status             workers, clients and counters (--json for the raw reply)
  scale N|+N|-N      set or change the worker count; waits until that many are ready
  reload             re-read the config (as SIGHUP); an invalid file changes nothing
  stop               graceful stop (as SIGTERM)
  ping               check that mpd answers

exit codes:
  {EXIT_OK}  done
  {EXIT_ERROR}  mpd answered with an error
  {EXIT_USAGE}  bad arguments
  {EXIT_NOT_RUNNING}  mpd is not running (no socket, or nothing answers on it)
  {EXIT_DENIED}  permission denied (socket file mode/owner, or mpd's allow-list)
  {EXIT_TIMEOUT}  timed out
  {EXIT_CONFIG} the config file is invalid"""


class CtlError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpdctl", description="Steer a running mpd.",
                                epilog=EPILOG, formatter_class=argparse.RawTextHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--config", metavar="PATH",
                       help=f"mpd's config, to find its socket (default: {configmod.DEFAULT_PATH}"
                            " if it exists, else the embedded defaults)")
    where.add_argument("--socket", metavar="PATH", help="the control socket itself")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long to wait for an answer, or for scale to finish (default 10)")
    p.add_argument("--json", action="store_true", help="print the raw JSON reply")
    p.add_argument("command", choices=list(COMMANDS))  # the daemon's own table
    p.add_argument("count", nargs="?", help="for scale: N, +N or -N")
    return p


class Client:
    def __init__(self, path: str, timeout: float):
        self.path = path
        self.deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(max(0.1, timeout))
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise CtlError(EXIT_NOT_RUNNING, f"mpd is not running (nothing answers on {path})")\
                from None
        except PermissionError:
            raise CtlError(EXIT_DENIED, f"permission denied on {path}: {describe(path)}")\
                from None
        except OSError as e:
            raise CtlError(EXIT_NOT_RUNNING, f"cannot connect to {path}: {e.strerror}") from None
        self.buf = b""

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
    if args.socket:
        return args.socket
    path = args.config
    if path is None and os.path.exists(configmod.DEFAULT_PATH):
        path = configmod.DEFAULT_PATH
    try:
        return configmod.load(path).socket_path
    except configmod.ConfigError as e:
        raise CtlError(EXIT_CONFIG, f"invalid config: {e}") from None


def print_status(reply: dict[str, Any]) -> None:
    m = reply["master"]
    print(f"mpd {m['version']}  pid {m['pid']}  {m['state']}  up {m['uptime']:.0f}s  "
          f"listening on {m['listen']}:{m['port']}  config {m['config'] or '(defaults)'}")
    print(f"workers {m['ready']}/{m['workers']} ready (max {m['max_workers']}, autoscale "
          f"{'on' if m['autoscale'] else 'off'})")
    columns = ("slot", "pid", "state", "clients", "max_clients", "accepted", "requests",
               "handoffs_out", "adopted", "refused", "restarts", "uptime", "heartbeat_age")
    heads = ("SLOT", "PID", "STATE", "CLIENTS", "MAX", "ACCEPTED", "REQUESTS", "HANDOFF",
             "ADOPTED", "REFUSED", "RESTARTS", "UPTIME", "HEARTBEAT")
    rows = [[str(w[c]) for c in columns] for w in reply["workers"]]
    totals = reply["totals"]
    rows.append(["total", "", "", *(str(totals[c]) for c in columns[3:4]), "",
                 *(str(totals[c]) for c in columns[5:10]), "", "", ""])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    for row in [list(heads), *rows]:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)).rstrip())


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if (args.command == "scale") != (args.count is not None):
        parser.error("scale takes a count (N, +N or -N); other commands take none")
    fields: dict[str, int] = {}
    if args.command == "scale":
        try:
            number = int(args.count)
        except ValueError:
            parser.error(f"scale: {args.count!r} is not N, +N or -N")
        fields = {"delta": number} if args.count[0] in "+-" else {"workers": number}
    client = Client(socket_path(args), args.timeout)
    if args.command == "scale":
        reply = client.request("scale", **fields)
        wanted = reply["workers"]
        while True:  # done when exactly `wanted` workers serve and the retired are gone
            status = client.request("status")
            if status["master"]["ready"] == wanted and len(status["workers"]) == wanted:
                break
            if time.monotonic() > client.deadline:
                raise CtlError(EXIT_TIMEOUT, f"scale: {status['master']['ready']} of {wanted} "
                               f"workers ready after {args.timeout:g} s")
            time.sleep(0.02)  # a poll interval against the daemon, bounded by the deadline
        reply = {**reply, "ready": wanted}
    else:
        reply = client.request(args.command)
    if args.json:
        print(json.dumps(reply, indent=2))
    elif args.command == "status":
        print_status(reply)
    elif args.command == "scale":
        print(f"mpd: {reply['ready']} workers ready (was {reply['previous']})")
    elif args.command == "ping":
        print(f"mpd {reply['version']} (pid {reply['pid']}) answers")
    elif args.command == "reload":
        print(f"mpd: config reloaded, {reply['workers']} workers")
    else:
        print("mpd: stopping")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args, parser)
    except CtlError as e:
        print(f"mpdctl: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
