"""`mpd`: parse the command line, load the config, bind, and run the master (or, with
`workers = 0`, serve in this one process)."""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys

from mpd import __version__
from mpd import config as configmod
from mpd import log as logmod

EX_UNAVAILABLE = 69  # sysexits.h: the address cannot be bound


def default_config_path() -> str | None:
    """/etc/mpd.toml when it exists, else None: the embedded defaults."""
    return configmod.DEFAULT_PATH if os.path.exists(configmod.DEFAULT_PATH) else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mpd", description="mpd: a multi-process TCP server daemon (master + epoll workers).",
        epilog="Exit codes: 0 stopped cleanly, 1 internal error, 69 cannot listen (address in "
               "use, or another mpd owns the control socket), 78 invalid configuration.")
    p.add_argument("--config", metavar="PATH",
                   help=f"config file (default: {configmod.DEFAULT_PATH} if it exists, "
                        "else the embedded defaults)")
    p.add_argument("--check-config", action="store_true",
                   help="validate the config and exit: 0 valid, 78 invalid")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective config as documented TOML and exit")
    p.add_argument("--version", action="version", version=f"mpd {__version__}")
    return p


def bind(config: configmod.Config) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.listen else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.listen, config.port))
    sock.listen(config.backlog)
    sock.setblocking(False)
    return sock


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = args.config if args.config is not None else default_config_path()
    logmod.configure()
    log = logmod.get_logger()
    try:
        config = configmod.load(path)
    except configmod.ConfigError as e:
        log.error("config.invalid", path=e.path, line=e.line, key=e.key, error=e.detail)
        print(f"mpd: invalid config: {e}", file=sys.stderr)
        return configmod.EX_CONFIG
    if args.check_config:
        print(f"mpd: config {path or '(embedded defaults)'} is valid")
        return 0
    if args.print_config:
        sys.stdout.write(configmod.render(config))
        return 0
    logmod.configure(config.log_level, config.log_format)
    raise_fd_limit()
    control_sock = None
    if config.worker_count > 0:  # single-process mode has no master, so no control socket
        from mpd.control import ControlError, open_socket

        try:
            control_sock = open_socket(config.socket_path, config.mode, config.allow_group)
        except ControlError as e:
            log.error("control.failed", path=config.socket_path, error=str(e))
            print(f"mpd: {e}", file=sys.stderr)
            return EX_UNAVAILABLE
    try:
        listener = bind(config)
    except OSError as e:
        log.error("mpd.bind_failed", listen=config.listen, port=config.port, error=e.strerror)
        print(f"mpd: cannot listen on {config.listen} port {config.port}: {e.strerror}",
              file=sys.stderr)
        if control_sock is not None:
            control_sock.close()
            os.unlink(config.socket_path)
        return EX_UNAVAILABLE
    if control_sock is None:
        return serve_single_process(config, listener)
    from mpd.master import Master

    return Master(config, listener, control_sock).run()


def raise_fd_limit() -> None:
    """Lift the soft RLIMIT_NOFILE to the hard one: clients, hand-offs in flight and the
    master's queues all hold fds. Workers inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve_single_process(config: configmod.Config, listener: socket.socket) -> int:
    from mpd.worker import Worker

    log = logmod.get_logger()
    logmod.set_role("single")
    log.info("mpd.started", version=__version__, config=config.path, listen=config.listen,
             port=listener.getsockname()[1], workers=0)
    log.info("mpd.ready", workers=0)
    code = Worker(config, listener, None).run()
    log.info("mpd.stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
