"""`mpd`: parse the command line, load the config, bind, and run the master (or, with
`workers = 0`, serve in this one process)."""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
from typing import Callable

from mpd import __version__
from mpd.apps import loader
from mpd.apps.interface import Application
from mpd.config import schema as configmod
from mpd.logs import log as logmod
from mpd.ops import helptext
from mpd.start import StartError, check_needs, open_all
from mpd.system import privileges, proctitle

LOG_WRITE_OUT = 1.0  # seconds the master may wait at exit for its last log lines to go out


def default_config_path() -> str | None:
    """/etc/mpd.toml when it exists, else None: the embedded defaults."""
    return configmod.DEFAULT_PATH if os.path.exists(configmod.DEFAULT_PATH) else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mpd", description="mpd: a multi-process TCP server daemon (master + epoll workers).",
        epilog=helptext.mpd_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="PATH",
                   help=f"config file (default: {configmod.DEFAULT_PATH} if it exists, "
                        "else the embedded defaults)")
    p.add_argument("--check-config", action="store_true",
                   help="validate the config and exit: 0 valid, 78 invalid; notes on what "
                        "would keep this mpd from starting (as root, under the shipped unit)")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective config as documented TOML and exit")
    p.add_argument("--log-format", choices=("auto", "console", "json"),
                   help="log as JSON lines or as console lines for people (overrides "
                        "log.format; auto = console on a terminal)")
    p.add_argument("--user", metavar="NAME",
                   help="started as root, serve as this user once the sockets are open "
                        "(overrides server.user; \"root\" to stay root)")
    p.add_argument("--daemon", action="store_true",
                   help="detach from the terminal and write a pidfile (daemon.pidfile); for "
                        "systems without systemd")
    p.add_argument("--preflight", action="store_true",
                   help="check that this mpd imports and that the config is valid, and print "
                        "what it can take over from a running one (mpdctl upgrade runs it)")
    p.add_argument("--upgrade-state", type=int, metavar="FD", help=argparse.SUPPRESS)
    p.add_argument("--version", action="version",
                   version=f"mpd {__version__} (multi-process TCP server daemon)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.upgrade_state is not None:  # an upgrade's exec: this process is the master
        return resume(args.upgrade_state)
    path = args.config if args.config is not None else default_config_path()
    logmod.configure(fmt=args.log_format or "auto")
    log = logmod.get_logger()
    try:
        config = load_config(path, args)
        if args.check_config or args.preflight:
            logmod.check_from(config)
            app = loader.from_config(config)
        if args.check_config:
            print(f"mpd: config {path or '(embedded defaults)'} is valid")
            for note in notes(config):
                print(f"mpd: note: {note}")
            return 0
        if args.preflight:
            return preflight(app)
        if args.print_config:
            sys.stdout.write(configmod.render(config))
            return 0
        logmod.configure_from(config)  # a log file that cannot be opened: exit 78 here
    except configmod.ConfigError as e:
        log.error("config.invalid", path=e.path, line=e.line, key=e.key, error=e.detail)
        print(f"mpd: invalid config: {e}", file=sys.stderr)
        return configmod.EX_CONFIG
    raise_fd_limit()
    try:
        return serve(config, args.daemon)
    except StartError as e:
        log.error(e.event, error=str(e))
        print(f"mpd: {e}", file=sys.stderr)
        return e.code
    except Exception as e:  # noqa: BLE001 - a detached daemon has only its log to tell
        log.exception("mpd.crashed", error=repr(e))
        raise
    finally:
        logmod.write_out(LOG_WRITE_OUT)  # the last lines, if the sink is slow; bounded


def load_config(path: str | None, args: argparse.Namespace) -> configmod.Config:
    """The config file with the command line's settings over it (kept on reload)."""
    config = configmod.load(path)
    if args.log_format:
        config = config.override(log_format=args.log_format)
    if args.user is not None:
        config = config.override(user=args.user)
    if args.daemon and config.log_target == "stdout":
        # A detached process has no stdout worth writing to.
        print("mpd: --daemon with log.target = \"stdout\": logging to syslog instead",
              file=sys.stderr)
        config = config.override(log_target="syslog")
    return config


UNIT_HIDES = ("/root/", "/home/", "/run/user/", "/tmp/", "/var/tmp/")


def notes(config: configmod.Config) -> list[str]:
    """What would keep this mpd from starting, beyond the config file itself."""
    found = []
    try:
        privileges.target(config)
    except privileges.PrivilegeError as e:
        found.append(f"run as uid {os.geteuid()}, mpd would refuse to start: {e} (not "
                     "under the shipped unit, whose DynamicUser is not root)")
    for where in (sys.prefix, os.path.realpath(sys.executable)):
        if where.startswith(UNIT_HIDES):
            found.append(f"this mpd runs from {where}, which the shipped unit cannot reach "
                         "(ProtectHome=yes hides /root and /home, PrivateTmp=yes /tmp; "
                         "systemd says status=203/EXEC): install mpd into a venv under "
                         "/opt (README \"Under systemd\")")
            break
    return found


def serve(config: configmod.Config, detach: bool) -> int:
    """Open the sockets (errors still reach the terminal), check what server.user will
    need, detach if asked, become server.user, then run."""
    try:
        who = privileges.target(config)
    except privileges.PrivilegeError as e:
        raise StartError("mpd.privileges_failed", str(e), configmod.EX_CONFIG) from None
    pidfile = None
    if detach:
        from mpd.system.daemonize import PidFile, PidFileError

        pidfile = PidFile(config.pidfile_path)
        try:
            pidfile.check()
        except PidFileError as e:
            raise StartError("mpd.already_running", str(e)) from None
    opened = open_all(config)
    if who is not None:
        check_needs(config, who, opened)
    if pidfile is not None:
        from mpd.system.daemonize import detach as enter_daemon

        enter_daemon(pidfile, opened.sockets())
        logmod.set_role("master" if opened.control is not None else "single")
        logmod.forget_writer()  # python-daemon closed the old log fds
        logmod.configure_from(config)
    if who is not None:
        files = opened.files_to_give(config, pidfile.path if pidfile else "")
        privileges.drop(who, files)
    try:  # after the drop: the application's code never runs as root unless it must
        app = loader.from_config(config)
    except configmod.ConfigError as e:
        opened.close()
        raise StartError("config.invalid", f"invalid config: {e}", configmod.EX_CONFIG) from None
    if opened.control is None:
        return serve_single_process(config, app, opened.listener)
    from mpd.master.master import Master
    from mpd.worker.worker import run_worker

    proctitle.master(config)
    master = Master(config, app, opened.listener, opened.control, opened.agent,
                    listener_shared=opened.activated, metrics_sock=opened.metrics,
                    control_file=opened.control_file, worker_main=run_worker)
    master.pidfile = pidfile.path if pidfile is not None else None
    return master.run()


def preflight(app: Application) -> int:
    """`--preflight`: every module of this mpd imports, and the application loads (the
    config was checked already); print what this code can take over, for the running
    master deciding on an upgrade."""
    import importlib
    import json
    import pkgutil

    import mpd
    from mpd.master.upgrade import preflight_report

    proctitle.preflight()
    for module in pkgutil.walk_packages(mpd.__path__, "mpd."):
        importlib.import_module(module.name)
    print(json.dumps(preflight_report(app)))
    return 0


def resume(state_fd: int) -> int:
    """After an upgrade's exec: take the old master's state and carry on as the master."""
    from mpd.master import upgradestate
    from mpd.master.master import Master
    from mpd.master.upgrade import read_state
    from mpd.system.daemonize import PidFile
    from mpd.worker.worker import run_worker

    state = read_state(state_fd)
    config = upgradestate.config_of(state)
    logmod.set_role("master")
    logmod.configure_from(config)
    listener, control = upgradestate.sockets_of(state)
    proctitle.master(config)
    app = loader.from_config(config)  # it loaded in the pre-flight
    # A state from a master that did not record it: assume systemd may hold the socket, and
    # never shut its listening down at a stop (only close ours).
    code = Master(config, app, listener, control, resumed_agent(config, state),
                  listener_shared=state.get("listener_shared", True),
                  metrics_sock=resumed_metrics(config, state),
                  control_file=upgradestate.control_file_of(state, config, control),
                  worker_main=run_worker).run(adopt=state)
    if state.get("pidfile"):  # --daemon's: the old image's context cannot remove it now
        PidFile(state["pidfile"]).__exit__(None, None, None)
    return code


def resumed_agent(config: configmod.Config, state: dict) -> socket.socket | None:
    """The agent-check socket the old master had; from a release that did not serve the
    agent (agent.listen was set but unused), a new one. If it cannot be opened now, mpd
    serves on without it: it is already serving clients."""
    from mpd.master import upgradestate
    from mpd.ops.agent import open_socket

    return reopened(upgradestate.agent_socket_of(state), config.agent_listen, open_socket,
                    "agent.failed")


def resumed_metrics(config: configmod.Config, state: dict) -> socket.socket | None:
    """The metrics socket the old master had; from a release without it, a new one (or,
    if it cannot be opened now, none: mpd serves on)."""
    from mpd.master import upgradestate
    from mpd.ops.httpmetrics import open_socket

    return reopened(upgradestate.inherited_socket(state, "metrics_fd"), config.metrics_listen,
                    open_socket, "metrics.failed")


def reopened(sock: socket.socket | None, listen: str,
             open_socket: Callable[[str, int], socket.socket], failed: str
             ) -> socket.socket | None:
    """An operator port after an upgrade's exec: the inherited socket, else (`listen` set) a
    new one; one that cannot be opened is logged as `failed`, and mpd serves on without."""
    from mpd.ops.server import PortError

    if sock is None and listen:
        try:
            sock = open_socket(*configmod.host_port(listen))
        except PortError as e:
            logmod.get_logger().error(failed, error=str(e))
    return sock


def raise_fd_limit() -> None:
    """Lift the soft RLIMIT_NOFILE to the hard one: clients, hand-offs in flight and the
    master's queues all hold fds. Workers inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve_single_process(config: configmod.Config, app: Application,
                         listener: socket.socket) -> int:
    from mpd.worker.worker import run_single

    log = logmod.get_logger()
    logmod.set_role("single")
    proctitle.single(config)
    log.info("mpd.started", version=__version__, config=config.path, listen=config.listen,
             port=listener.getsockname()[1], workers=0)
    code = run_single(config, app, listener)  # mpd.ready once its signal handlers are in place
    log.info("mpd.stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
