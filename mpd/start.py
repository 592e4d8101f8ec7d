"""What mpd does as the user it starts as (root, outside systemd), before it becomes
server.user: open its sockets (the listening socket, the control socket and its file, the
agent-check and metrics ports), and check that what must still work after the drop will
(privileges.unreachable). A failure here is one line and an exit code (StartError)."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

from mpd.config import access
from mpd.config import schema as configmod
from mpd.logs import log as logmod
from mpd.ops.socketfile import ControlError, SocketFile
from mpd.system import privileges, tcp

EX_UNAVAILABLE = 69  # sysexits.h: the address cannot be bound


class StartError(Exception):
    """mpd cannot start: exit 69 (address in use, another mpd running) or 78 (the config
    cannot work here: root without server.user, ids PrivateUsers= hides, something
    server.user must reach and cannot)."""

    def __init__(self, event: str, message: str, code: int = EX_UNAVAILABLE):
        super().__init__(message)
        self.event = event
        self.code = code


def bind(config: configmod.Config) -> socket.socket:
    return tcp.listen(config.listen, config.port, config.backlog)


@dataclass
class Opened:
    """What mpd opens as the user it starts as, before any privilege drop: the listening
    socket (and whether systemd holds it too: socket activation); in a master, the
    control socket and its file, and the agent-check and metrics ports when set."""
    listener: socket.socket | None = None
    activated: bool = False
    control: socket.socket | None = None
    control_file: SocketFile | None = None
    agent: socket.socket | None = None
    metrics: socket.socket | None = None

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.listener, self.control, self.agent, self.metrics)
                if s is not None]

    def files_to_give(self, config: configmod.Config, pidfile: str) -> list[tuple[str, bool]]:
        """What the privilege drop gives to server.user: (path, keep its group)."""
        files = [(pidfile, False), (config.log_file if config.log_target == "file" else "",
                                    False)]
        if self.control_file is not None:  # its group is control.allow_group's, if set
            files += [(self.control_file.path, bool(config.allow_group)),
                      (self.control_file.made_directory, True)]
        return files

    def close(self) -> None:
        """A start that fails: close it all, and remove the control socket's file."""
        for sock in self.sockets():
            sock.close()
        if self.control_file is not None:
            self.control_file.unlink()


def open_all(config: configmod.Config) -> Opened:
    """Open the sockets; raises StartError with none of them left open."""
    opened = Opened()
    try:
        if config.worker_count > 0:  # single-process mode has no master: no control socket
            unseen = access.unseen(config)
            if unseen is not None:
                raise StartError("control.access_unmapped", unseen, configmod.EX_CONFIG)
            opened.control_file = SocketFile(config.socket_path, config.mode,
                                             config.allow_group)
            try:
                opened.control = opened.control_file.bind()
            except ControlError as e:
                opened.control_file = None  # not ours to remove
                raise StartError("control.failed", str(e)) from None
        try:
            opened.listener, opened.activated = listening_socket(config)
        except OSError as e:
            raise StartError("mpd.bind_failed", f"cannot listen on {config.listen} port "
                             f"{config.port}: {e.strerror}") from None
        if opened.control is not None:
            opened.agent, opened.metrics = open_ports(config)
    except StartError:
        opened.close()
        raise
    return opened


def open_ports(config: configmod.Config) -> tuple[socket.socket | None, socket.socket | None]:
    """The agent-check port (agent.listen) and the metrics port (metrics.listen), each
    when set; raises StartError with neither left open."""
    from mpd.ops.agent import AgentError
    from mpd.ops.agent import open_socket as open_agent
    from mpd.ops.httpmetrics import MetricsError
    from mpd.ops.httpmetrics import open_socket as open_http

    agent = None
    try:
        if config.agent_listen:
            agent = open_agent(*configmod.host_port(config.agent_listen))
        if config.metrics_listen:
            return agent, open_http(*configmod.host_port(config.metrics_listen))
    except AgentError as e:
        raise StartError("agent.failed", str(e)) from None
    except MetricsError as e:
        if agent is not None:
            agent.close()
        raise StartError("metrics.failed", str(e)) from None
    return agent, None


def check_needs(config: configmod.Config, who: privileges.Identity, opened: Opened) -> None:
    """What mpd needs as server.user, checked before it becomes that user: raises
    StartError (exit 78, one line) when it cannot do what it must; logs a warning that
    says what will fail later for each thing it cannot do that only later needs."""
    try:
        missing = privileges.unreachable(who, needs_after_drop(config, opened))
    except privileges.PrivilegeError as e:
        opened.close()
        raise StartError("mpd.privileges_failed", str(e), configmod.EX_CONFIG) from None
    log = logmod.get_logger()
    for need in missing:
        if not need.required:
            log.warning("mpd.privileges_limited", user=who.user, path=need.path,
                        need=need.what, consequence=need.why)
    required = [n for n in missing if n.required]
    if required:
        opened.close()
        raise StartError("mpd.privileges_failed", f"server.user {who.user} cannot " + "; nor ".join(
            f"{n.what} {n.path} ({n.why})" for n in required) + f": let {who.user} reach "
            "it (and search each directory above it), or move it", configmod.EX_CONFIG)


def needs_after_drop(config: configmod.Config, opened: Opened) -> list[privileges.Need]:
    """What mpd does as server.user: re-read the config, import its own code and run
    the interpreter again (an upgrade), reopen the log file, bind the control socket
    again (a directory that mpd made is given to the user)."""
    import importlib.util

    Need, R, W, X = privileges.Need, os.R_OK, os.W_OK, os.X_OK
    code = "mpd imports its own modules as it runs, and an upgrade in place all of them"
    needs = [Need(sys.executable, X, "run the interpreter", "an upgrade in place runs it"),
             Need(os.path.dirname(os.__file__), R | X, "read the standard library in", code),
             Need(os.path.dirname(os.path.abspath(__file__)), R | X, "read mpd's code in",
                  code)]
    spec = importlib.util.find_spec("prometheus_client")
    if spec is not None and spec.origin:
        needs.append(Need(os.path.dirname(spec.origin), R | X, "read prometheus_client in",
                          "the metrics import it on first use"))
    if config.path:
        needs.append(Need(config.path, R, "read the config", "a reload reads it again"))
    if config.log_target == "file":
        logs = os.path.dirname(os.path.abspath(config.log_file))
        needs += [Need(logs, X, "reach the log file's directory",
                       "each reload reopens the log file"),
                  Need(logs, W | X, "write the log file's directory", "after the log file "
                       "is rotated by renaming, a reload cannot create a new one, and is "
                       "refused", required=False)]
    control = opened.control_file
    if control is not None and not control.made_directory:
        needs.append(Need(os.path.dirname(control.path), W | X,
                          "write the control socket's directory", "if the socket's file is "
                          "removed, mpd cannot bind it again, nor remove it at exit: mpdctl "
                          "cannot reach mpd until it restarts", required=False))
    return needs


def listening_socket(config: configmod.Config) -> tuple[socket.socket, bool]:
    """The socket systemd passed (socket activation; True: systemd holds it too), else a
    freshly bound one."""
    from mpd.system import systemd

    log = logmod.get_logger()
    for sock in systemd.listen_fds():
        if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6):
            address = sock.getsockname()
            log.info("mpd.socket_activated", listen=address[0], port=address[1])
            if (address[0], address[1]) != (config.listen, config.port):
                log.warning("mpd.socket_mismatch", listen=address[0], port=address[1],
                            config_listen=config.listen, config_port=config.port)
            sock.setblocking(False)
            tcp.no_delay(sock)  # systemd's .socket sets no NoDelay= by default
            return sock, True
        sock.close()
    return bind(config), False
