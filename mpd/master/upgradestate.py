"""The master's state across an upgrade's exec, both ways: what the old master writes
(capture) and what the new one takes back (restore). One module knows the layout, which
carries STATE_VERSION (upgrade.py) so that a master can tell state it cannot read.

Every fd named here stays open across the exec: the listening socket, the control
socket, the agent-check socket, the metrics socket, each worker's channel (with what is
still queued on it, and the channel version its worker speaks) and each held client.
With the control socket goes the inode of its file, so that the new master knows its
file without looking at the path (which may be gone: it is put back by the control
server's checks, never needed to start).

A field added later is optional, and STATE_VERSION stays: state written by a release
before it lacks it, and is adopted all the same. Without the channel versions the
workers speak version 1; without the agent and metrics sockets the new master opens them
itself (cli.resume); without the tally the totals of reaped workers (tally.py) start from
zero, and without the moves' counts (moves.py) so do the moves and their pauses; without
the control socket's inode the control server asks the socket at the path who listens
there (socketfile.py)."""

from __future__ import annotations

import base64
import dataclasses
import socket
import time
from typing import Any, Protocol

from mpd import __version__
from mpd.config.schema import Config
from mpd.master.broker import Broker, HeldClient
from mpd.master.directory import Directory
from mpd.master.moves import Moves
from mpd.master.slots import SlotHistory, Slots, WorkerProc
from mpd.master.stopping import Shutdown
from mpd.master.tally import Tally
from mpd.ops.agent import AgentServer
from mpd.ops.control import ControlServer
from mpd.ops.httpmetrics import MetricsServer
from mpd.ops.socketfile import SocketFile
from mpd.system import tcp
from mpd.wire.channel import Channel
from mpd.wire.messages import Client, Kind, decode

STATE_VERSION = 2  # the layout below; a master refuses to exec code that cannot read it
STATE_VERSIONS = (1, 2)  # what restore() reads: the release before wrote 1


class StateView(Protocol):
    """What of the master its state is made of."""
    config: Config
    listener: socket.socket
    control: ControlServer | None
    agent: AgentServer | None
    metrics: MetricsServer | None
    slots: Slots
    broker: Broker
    generation: int
    started: float
    port: int
    pidfile: str | None
    shutdown: Shutdown
    tally: Tally
    directory: Directory | None
    moves: Moves


def capture(master: StateView) -> tuple[dict[str, Any], list[int]]:
    """The state and the fds it names (to keep open across the exec)."""
    assert master.control is not None  # single-process mode does not upgrade in place
    fds = [master.listener.fileno(), master.control.sock.fileno()]
    workers = []
    for w in master.slots.workers.values():
        fds.append(w.channel.fileno())
        queued = [{"data": _b64(data), "fds": list(qfds)} for data, qfds in w.channel.queue]
        fds += [fd for item in queued for fd in item["fds"]]
        workers.append({"pid": w.pid, "slot": w.slot, "channel_fd": w.channel.fileno(),
                        "state": w.state, "started": w.started, "stats": w.stats,
                        "generation": w.generation, "version": w.version,
                        "config_generation": w.config_generation, "latency": w.latency,
                        "channel_version": w.channel.version,
                        "serving": master.slots.serving.get(w.slot) is w, "queued": queued})
    held = [{"fds": list(h.client.fds), "client": _b64(h.client.encode()), "since": h.since}
            for h in master.broker.held]
    fds += master.broker.held_fds()
    agent_fd = master.agent.sock.fileno() if master.agent is not None else None
    metrics_fd = master.metrics.sock.fileno() if master.metrics is not None else None
    inode = master.control.file.inode
    fds += [fd for fd in (agent_fd, metrics_fd) if fd is not None]
    state = {
        "state_version": STATE_VERSION, "from_version": __version__,
        "generation": master.generation, "started": master.started, "port": master.port,
        "config": {k: v for k, v in dataclasses.asdict(master.config).items()},
        "listener_fd": master.listener.fileno(), "control_fd": master.control.sock.fileno(),
        "control_inode": list(inode) if inode is not None else None,
        "agent_fd": agent_fd, "metrics_fd": metrics_fd, "tally": master.tally.dump(),
        "table": master.slots.target, "epoch": master.slots.epoch,
        "drained": sorted(master.slots.drained), "workers": workers, "held": held,
        "directory": master.directory.dump() if master.directory is not None else [],
        "moves": master.moves.dump(),
        "retired_restarts": master.slots.retired_restarts,
        "history": {str(slot): dataclasses.asdict(h) for slot, h in master.slots.history.items()},
        "pidfile": master.pidfile, "listener_shared": master.shutdown.listener_shared,
    }
    return state, fds


def config_of(state: dict[str, Any]) -> Config:
    """The running config, as the old master had it (an upgrade changes code, not config:
    a reload reads the file). Fields this code does not know are left out; new ones take
    their defaults."""
    known = {f.name: f for f in dataclasses.fields(Config)}
    values = {k: _tuples(v) for k, v in state["config"].items() if k in known}
    return Config(**values)


def _tuples(value: Any) -> Any:
    """JSON's lists back to the tuples a Config holds (allow_uids, overrides)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def sockets_of(state: dict[str, Any]) -> tuple[socket.socket, socket.socket]:
    """The inherited listening socket and control socket."""
    listener = socket.socket(fileno=state["listener_fd"])
    control = socket.socket(fileno=state["control_fd"])
    for sock in (listener, control):
        sock.set_inheritable(False)
        sock.setblocking(False)
    tcp.no_delay(listener)  # an mpd before TCP_NODELAY may have bound it
    return listener, control


def control_file_of(state: dict[str, Any], config: Config,
                    control: socket.socket) -> SocketFile:
    """The control socket's file: where the inherited socket is bound, and its inode if
    the old master recorded it. The path is not looked at."""
    inode = state.get("control_inode")
    return SocketFile(control.getsockname(), config.mode, config.allow_group,
                      (inode[0], inode[1]) if inode else None)


def agent_socket_of(state: dict[str, Any]) -> socket.socket | None:
    """The inherited agent-check socket; None when the old master had none."""
    return inherited_socket(state, "agent_fd")


def inherited_socket(state: dict[str, Any], name: str) -> socket.socket | None:
    """An inherited listening socket (agent_fd, metrics_fd); None when the old master had
    none (or was of a release without it)."""
    if state.get(name) is None:
        return None
    sock = socket.socket(fileno=state[name])
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


def restore(master: StateView, state: dict[str, Any]) -> None:
    """Put the old master's workers, histories and held clients into this master."""
    master.generation = state["generation"] + 1  # this code is the next generation
    master.started = state["started"]
    master.pidfile = state.get("pidfile")
    master.tally.restore(state.get("tally"))  # none from a release without metrics
    master.slots.resize(state["table"])
    master.slots.retired_restarts = state.get("retired_restarts", 0)
    now = time.monotonic()
    known = {f.name for f in dataclasses.fields(SlotHistory)}  # an older master's too
    for slot, history in state["history"].items():
        master.slots.history[int(slot)] = SlotHistory(
            **{k: v for k, v in history.items() if k in known})
    for w in state["workers"]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, w["channel_fd"])
        sock.set_inheritable(False)
        channel = Channel(sock, f"slot {w['slot']}", w.get("channel_version", 1))
        for item in w["queued"]:
            channel.queue.append((base64.b64decode(item["data"]), item["fds"]))
        worker = WorkerProc(slot=w["slot"], pid=w["pid"], channel=channel,
                            started=w["started"], last_seen=now, state=w["state"],
                            stats=w["stats"], generation=w["generation"], version=w["version"],
                            config_generation=w.get("config_generation", 1))
        master.tally.heard_before(worker, w.get("latency"))
        master.slots.add(worker, serving=w["serving"])
    master.slots.drained = set(state.get("drained", [])) & set(master.slots.table)
    # A new epoch in any case: the routes (Slots.routes) are made again with the drained.
    master.slots.epoch = max(master.slots.epoch + 1, state.get("epoch", 0) + 1)
    for h in state["held"]:
        master.broker.held.append(HeldClient(held_client(h), h["since"]))
    if master.directory is not None:
        master.directory.restore(state.get("directory"),
                                 {w.pid: w for w in master.slots.workers.values()})
    master.moves.restore(state.get("moves"))


def held_client(item: dict[str, Any]) -> Client:
    """A held client as the old master wrote it: an encoded HANDOFF, or (state version 1)
    the release before's meta, an int key and raw bytes."""
    if "client" in item:
        client = decode(base64.b64decode(item["client"]), list(item["fds"]))
        assert isinstance(client, Client)
        return client
    meta = item["meta"]
    key = meta.get("key")
    client = Client(Kind.HANDOFF, key, key & 0xFFFFFFFF if key is not None else 0,
                    base64.b64decode(item["raw"]), b"",
                    tuple(meta["peer"]) if meta.get("peer") else None,  # type: ignore[arg-type]
                    meta.get("sent_ns") or 0, None, 0, meta.get("rank") or 0,
                    bool(meta.get("last")), bool(meta.get("rank")), 0, meta.get("from_slot"),
                    meta.get("from_pid"))
    client.fds = [item["fd"]]
    return client


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
