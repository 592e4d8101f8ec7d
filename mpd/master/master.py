"""The master: forks workers into numbered slots and keeps them serving.

One single-threaded event loop over the signal wake-up fd, every worker's channel and the
fds of its services. It never blocks and never parses the client protocol. Each turn, as
in gunicorn's arbiter: react to what happened, kill the hung, top up the slots, then each
service's timed duties. The master owns its parts, each a class in a file of its own:
the slot table (slots.py), its end of the channels (channels.py), the stop (stopping.py),
the hand-off broker (broker.py), upgrades (upgrade.py); and its services, which the loop
iterates as one list (services.py). What control commands (and the signals that stand
for them) do is commands.py."""

from __future__ import annotations

import contextlib
import functools
import os
import selectors
import signal
import socket
import time
from typing import Any, Callable

from mpd import __version__
from mpd.apps.interface import Application
from mpd.config import access
from mpd.config.schema import Config, fd_soft_limit, live_settings
from mpd.logs import log as logmod
from mpd.master import moves as movesmod
from mpd.master import tally
from mpd.master.broker import Broker
from mpd.master.channels import Channels
from mpd.master.directory import Directory
from mpd.master.services import HeldClients, Service
from mpd.master.slots import Slots, WorkerProc
from mpd.master.spawn import WorkerMain, fork_worker
from mpd.master.stopping import Shutdown
from mpd.master.upgrade import Upgrades
from mpd.ops import commands, metrics
from mpd.ops.agent import AgentServer, agent_line
from mpd.ops.control import ControlServer
from mpd.ops.httpmetrics import MetricsServer
from mpd.ops.server import Server
from mpd.ops.socketfile import SocketFile
from mpd.ops.statsline import StatsLine
from mpd.reloading import reload_config
from mpd.system import testhooks as hooks
from mpd.system.signals import SignalQueue, signal_name
from mpd.system.systemd import Notifier
from mpd.wire import messages as msg
from mpd.wire.exits import EXIT_BOOT_ERROR
from mpd.wire.routing import Key

SPAWN_BATCH = 8  # forks per loop turn (each costs a few ms of the master's time)
TURN_AT_LEAST = 1.0  # seconds: the loop turns at least this often (heartbeats, slots)

log = logmod.get_logger()


class Master:
    def __init__(self, config: Config, app: Application, listener: socket.socket,
                 control_sock: socket.socket | None = None,
                 agent_sock: socket.socket | None = None, listener_shared: bool = False,
                 metrics_sock: socket.socket | None = None,
                 control_file: SocketFile | None = None, *, worker_main: WorkerMain):
        """Only state: signal handlers, selector, notifier and the services come in run().
        `listener_shared`: another process (systemd, for socket activation) holds the
        listening socket too, and it must go on listening after we stop. `control_file`:
        the control socket's file as bound (its inode), else it is taken from the socket."""
        self.config = config
        self.app = app  # forked workers inherit it, loaded
        self.worker_main = worker_main  # what a forked worker runs: worker.run_worker
        self.listener = listener
        # The operator ports' listening sockets (control; agent.listen and metrics.listen
        # when set), until run() makes their servers.
        self.sockets = {"control": control_sock, "agent": agent_sock, "metrics": metrics_sock}
        if control_sock is not None and control_file is None:
            control_file = SocketFile(control_sock.getsockname(), config.mode,
                                      config.allow_group)
        self.control_file = control_file
        self.control: ControlServer | None = None
        self.agent: AgentServer | None = None
        self.metrics: MetricsServer | None = None
        self.tally = tally.Tally()  # what the workers did, never going backwards
        self.stats_line = StatsLine(self)  # mpd.stats, every log.stats_interval
        self.slots = Slots(config.worker_count)
        # Where each key group is, and their moves: an application with groups only.
        self.directory = Directory() if app.group is not None else None
        self.moves = movesmod.Moves(self.slots, self.directory, self.send, self.routes_changed)
        self.broker = Broker(self.slots, self.send, self.tally.count, self.directory,
                             self.moves)
        # starting -> running -> (draining ->) stopping -> stopped: see stopping.py
        self.state = "starting"
        self.shutdown = Shutdown(self, listener, listener_shared, agent_sock is not None)
        self.started = time.monotonic()
        self.port: int = listener.getsockname()[1]
        self.spawn_pending = False  # more slots to fill than one turn spawned
        self.generation = 1  # one more with each upgrade in place (its workers' too)
        self.pidfile: str | None = None  # --daemon's, removed by whoever exits last
        self.upgrades = Upgrades(self)  # upgrade in place: its pre-flight, exec and roll
        self.max_clients = config.clients_per_worker()

    @property
    def target(self) -> int:
        """The worker count wanted: the slot table's, or a scale's that waits for a roll."""
        queued = self.upgrades.queued_count
        return self.slots.target if queued is None else queued

    # --- the loop -------------------------------------------------------------------------

    def run(self, adopt: dict[str, Any] | None = None) -> int:
        """Serve until stopped. `adopt`: an old master's state after an upgrade's exec."""
        self.start(adopt)
        while self.state != "stopped":
            self.turn()
        self.close()
        log.info("mpd.stopped", uptime=round(time.monotonic() - self.started, 3))
        return 0

    def turn(self) -> None:
        """Each fd that is ready runs the reaction it was registered with, inside a
        boundary: the signal wake-up fd runs the signal table (signal_table), a worker's
        channel the table of message reactions (start), each service's fds its own. Then
        the timed duties: kill the hung, top up the slots, each service's tick."""
        logmod.watch(self.selector)  # wait writable on a log sink that fell behind
        for key, events in self.selector.select(self.timeout()):
            try:
                key.data(events)
            except Exception as e:  # noqa: BLE001 - the master exits only on purpose
                self.contain(key.data, e)
        now = time.monotonic()
        for duty in self.duties:
            try:
                duty(now)
            except Exception as e:  # noqa: BLE001 - the other duties run still
                log.exception("loop.error", where="duties", duty=duty.__qualname__,
                              error=repr(e))

    def timeout(self) -> float:
        """Seconds until the next timed duty: a respawn, a service's deadline."""
        if self.spawn_pending:
            return 0.0
        now = time.monotonic()
        due = [now + TURN_AT_LEAST, self.slots.next_respawn(),
               *(service.deadline() for service in self.services)]
        return max(0.0, min(d for d in due if d) - now)

    def contain(self, reaction: Callable[[int], Any], error: Exception) -> None:
        """A bug met in reacting to one fd: log it with what it was about and end that one
        peer. A worker whose channel fails so is killed (its slot is refilled at once):
        left in the selector, its channel would fail on every turn. Messages, control
        peers and signals have boundaries of their own, inside."""
        worker = getattr(reaction, "args", (None,))[0]
        if isinstance(worker, WorkerProc):
            log.exception("loop.error", where="channel", worker_pid=worker.pid,
                          worker_slot=worker.slot, error=repr(error))
            self.channels.forget(worker)
            self.kill(worker)
        else:
            log.exception("loop.error", where=getattr(reaction, "__name__", repr(reaction)),
                          error=repr(error))

    def start(self, adopt: dict[str, Any] | None = None) -> None:
        self.selector = selectors.DefaultSelector()
        self.signals = SignalQueue(self.signal_table())
        self.selector.register(self.signals, selectors.EVENT_READ, self.on_signals)
        self.channels = Channels(self.selector, self.slots, {
            msg.Kind.HANDOFF: self.broker.dispatch, msg.Kind.STATS: self.on_stats,
            msg.Kind.HELLO: self.on_hello, msg.Kind.GROUP_ENDED: self.on_group_ended,
            **self.moves.reactions()}, self.broker.receive_room)
        self.notifier = Notifier(lambda: self.status_line() if self.state == "running" else None)
        servers = self.open_servers()
        self.services: list[Service] = [self.shutdown, HeldClients(self.broker), self.upgrades,
                                        self.stats_line, *servers, self.notifier, self.moves,
                                        self.channels]
        self.duties = [self.murder_workers, self.manage_workers,
                       *(service.tick for service in self.services)]
        if adopt is not None:
            self.upgrades.adopt(adopt)
        else:
            log.info("mpd.started", version=__version__, config=self.config.path,
                     listen=self.config.listen, port=self.port, workers=self.target,
                     control=self.control_file.path if self.control_file else None)
        self.stats_line.start()  # after adopt: it counts from the old totals
        if self.metrics is not None:
            self.metrics.render("")  # imports prometheus_client now, not in a scraper's turn
        self.set_max_clients()
        self.manage_workers(time.monotonic())

    def open_servers(self) -> list[Server]:
        """The operator ports' servers in the selector: control, metrics, agent."""
        if self.sockets["control"] is not None and self.control_file is not None:
            self.control = ControlServer(
                self.sockets["control"], self.control_file, self.selector,
                functools.partial(commands.handle, self),
                lambda uid, gid: access.why_denied(self.config, uid, gid))
        if self.sockets["metrics"] is not None:
            self.metrics = MetricsServer(self.sockets["metrics"], self.selector,
                                         lambda accept: metrics.render(
                                             self.snapshot(usage=True), accept))
        if self.sockets["agent"] is not None:
            self.agent = AgentServer(self.sockets["agent"], self.selector, self.agent_line)
        return [s for s in (self.control, self.metrics, self.agent) if s is not None]

    def close(self) -> None:
        for service in self.services:
            service.close()
        self.selector.close()
        self.signals.close(signal.SIG_IGN)  # stopped: a late SIGTERM must not turn exit 0 to -15

    def closed_in_child(self) -> list[Callable[[], None]]:
        """What a forked worker must close first, of what is the master's: the signal
        handlers, the selector, the other workers' channels, each service's fds."""
        return [self.signals.close, self.selector.close,
                *(service.in_child for service in self.services)]

    def status_line(self) -> str:
        return (f"{self.slots.ready_count()}/{self.target} workers ready, "
                f"{self.slots.clients()} clients")

    def agent_line(self) -> str:
        """What HAProxy's agent check hears (agent.py): the state, and the load against
        the capacity (with autoscale, what max_workers could take)."""
        state = self.state
        if self.shutdown.halting:
            state = "halting"
        elif state in ("starting", "running") and self.upgrades.job is not None:
            state = "upgrading"
        workers = self.config.max_workers if self.config.autoscale else self.target
        return agent_line(state, self.slots.ready_count(), self.slots.clients(),
                          workers * self.max_clients)

    # --- signals: one table ------------------------------------------------------------------

    def signal_table(self) -> dict[signal.Signals, Callable[[], Any]]:
        """SIGCHLD reaps; every other signal is the control command it stands for
        (commands.SIGNALS), run as if mpdctl had sent it."""
        table: dict[signal.Signals, Callable[[], Any]] = {signal.SIGCHLD: self.reap_workers}
        for sig, request in commands.SIGNALS.items():
            table[sig] = functools.partial(self.signal_command, sig, request)
        return table

    def on_signals(self, _events: int) -> None:
        self.signals.dispatch()

    def signal_command(self, sig: signal.Signals, request: dict[str, Any]) -> None:
        reply = commands.handle(self, dict(request))
        if not reply.get("ok"):
            log.warning("mpd.signal_refused", signal=sig.name, command=request["command"],
                        error=reply.get("error"))

    # --- channel messages: the master's reactions (channels.py reads and sends) -----------

    def send(self, worker: WorkerProc, message: msg.Message, fds: list[int] | None = None
             ) -> bool:
        """Send or queue; False if the worker's channel is gone (fds stay the caller's)."""
        return self.channels.send(worker, message, fds)

    def on_stats(self, worker: WorkerProc, message: msg.Stats) -> None:
        """The heartbeat: counters, and the number of the config the worker runs."""
        hooks.fault("master.stats")
        values = dict(message.values)
        worker.config_generation = values.pop("config_generation", worker.config_generation)
        self.tally.heard(worker, values.pop("latency", None))
        worker.stats = {k: v for k, v in values.items() if isinstance(v, int)}
        if self.config.autoscale:
            self.autoscale()

    def on_hello(self, worker: WorkerProc, message: msg.Hello) -> None:
        worker.version = message.version
        if worker.state == "starting":
            worker.state = "ready"
        self.upgrades.on_ready(worker)
        self.moves.plan()  # a new worker (a roll's, a respawn's, a scale's) takes groups
        log.info("worker.ready", worker_pid=worker.pid, worker_slot=worker.slot,
                 boot_ms=round((worker.last_seen - worker.started) * 1000, 1))
        if self.state == "starting" and self.slots.ready_count() >= self.target:
            self.state = "running"
            log.info("mpd.ready", workers=self.slots.ready_count())
            self.notifier.ready(self.status_line())

    # --- workers ----------------------------------------------------------------------------

    def spawn_worker(self, slot: int, serving: bool = True) -> WorkerProc | None:
        """A new worker for `slot`: it takes the slot now, or (an upgrade's) once ready."""
        try:
            pid, channel = fork_worker(slot, self.config, self.app, self.listener,
                                       self.slots.routes, self.closed_in_child(),
                                       self.worker_main)
        except OSError as e:  # out of processes, memory or fds: try again later
            log.error("worker.spawn_failed", worker_slot=slot, error=e.strerror)
            if serving:
                self.schedule_respawn(slot, served=False)
            return None
        worker = WorkerProc(slot=slot, pid=pid, channel=channel, generation=self.generation,
                            config_generation=self.config.generation)
        history = self.slots.add(worker, serving)
        self.channels.watch(worker)
        log.info("worker.spawned", worker_pid=pid, worker_slot=slot, restarts=history.restarts,
                 generation=self.generation)
        return worker

    # --- supervision: reap, respawn, kill the hung, top up -------------------------------

    def reap_workers(self) -> None:
        """Collect every child that ended (several may end at once) and schedule respawns."""
        while True:
            try:  # wait4: with the child's CPU seconds, for the metrics
                pid, status, rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.slots.remove(pid)
            try:
                if worker is None:
                    self.upgrades.reaped(pid, status)
                else:
                    self.worker_exited(worker, status, rusage.ru_utime + rusage.ru_stime)
            except Exception as e:  # noqa: BLE001 - the other children are reaped still
                log.exception("loop.error", where="reap", worker_pid=pid, error=repr(e))

    def worker_exited(self, worker: WorkerProc, status: int, cpu_seconds: float = 0.0) -> None:
        self.channels.forget(worker)
        self.channels.read_last_words(worker)
        worker.channel.close()
        if self.directory is not None:  # its groups died with it
            self.directory.worker_gone(worker, self.moves.worker_gone(worker))
        self.tally.keep_reaped(worker, cpu_seconds)  # its last counts, kept for the totals
        uptime = time.monotonic() - worker.started
        how: dict[str, Any] = {}
        if os.WIFSIGNALED(status):
            how["signal"] = signal_name(os.WTERMSIG(status))
        else:
            how["exit_code"] = os.WEXITSTATUS(status)
        expected = worker.state == "stopping" or self.state == "stopping"
        log.log(20 if expected else 30, "worker.exited", worker_pid=worker.pid,
                worker_slot=worker.slot, uptime=round(uptime, 3), **how)
        if self.upgrades.on_exit(worker):
            return  # a new-code worker that never got ready: its slot's old one serves on
        if not expected:
            # Served: it said HELLO, and did not end as a boot error.
            served = worker.state == "ready" and how.get("exit_code") != EXIT_BOOT_ERROR
            self.schedule_respawn(worker.slot, served)

    def schedule_respawn(self, slot: int, served: bool) -> None:
        delay = self.slots.schedule_respawn(slot, served, self.config.backoff_max)
        if delay:
            log.warning("worker.backoff", worker_slot=slot,
                        failures=self.slots.history[slot].failures, delay=delay)

    def murder_workers(self, now: float) -> None:
        """SIGKILL workers whose heartbeat stopped; reap_workers() respawns them."""
        for worker in list(self.slots.workers.values()):
            if worker.state != "stopping" and now - worker.last_seen > self.config.worker_timeout:
                log.error("worker.timeout", worker_pid=worker.pid, worker_slot=worker.slot,
                          silent_for=round(now - worker.last_seen, 3))
                self.slots.retire(worker)  # killed on purpose: its slot is refilled at once
                self.kill(worker)
                self.slots.respawn_now(worker.slot)

    def manage_workers(self, now: float) -> None:
        """Top up: spawn wanted slots that have no worker and whose back-off is over, at
        most SPAWN_BATCH per turn, so that a big scale-up never stalls hand-offs."""
        self.spawn_pending = False
        if self.state == "stopping":
            if not self.slots.workers:
                self.state = "stopped"
            return
        empty = self.slots.empty_slots(now)
        for slot in empty[:SPAWN_BATCH]:
            restarts = self.slots.restarts(slot)
            if restarts:
                log.info("worker.respawned", worker_slot=slot, restarts=restarts)
            self.spawn_worker(slot)
        self.spawn_pending = len(empty) > SPAWN_BATCH  # the loop comes back at once

    def kill(self, worker: WorkerProc) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)

    def set_max_clients(self) -> None:
        """What one worker serves at most: max_clients, "auto" resolved by the fd limit
        (which workers inherit); say so when the fd limit cuts a configured number."""
        self.max_clients = self.config.clients_per_worker()
        if self.config.max_clients not in ("auto", self.max_clients):
            log.warning("mpd.max_clients_capped", configured=self.config.max_clients,
                        max_clients=self.max_clients, fd_limit=fd_soft_limit())

    def autoscale(self) -> None:
        """Add a worker when every worker is full, one at a time (the last must be ready)."""
        serving = list(self.slots.serving.values())
        if (self.state != "running" or self.target >= self.config.max_workers
                or len(serving) < self.target or any(w.state != "ready" for w in serving)):
            return
        if all(w.clients >= w.stats.get("max_clients", self.max_clients) for w in serving):
            log.info("worker.autoscaled", previous=self.target, workers=self.target + 1,
                     max_clients=self.max_clients)
            self.scale(self.target + 1)

    # --- what control commands do (commands.Daemon) -------------------------------------

    def snapshot(self, usage: bool = False) -> dict[str, Any]:
        """The master and every worker, for `status` and `metrics`; with `usage`, CPU
        seconds and resident memory of each process (from /proc)."""
        now = time.monotonic()
        figures = tally.figures(self.tally, self.slots, usage)
        workers = [{
            "slot": w.slot, "pid": w.pid, "state": w.state, "stats": dict(w.stats),
            "restarts": self.slots.restarts(w.slot), "uptime": round(now - w.started, 3),
            "heartbeat_age": round(now - w.last_seen, 3), "generation": w.generation,
            "version": w.version, "config_generation": w.config_generation,
            **figures["usage"].get(w.pid, {}),
        } for w in sorted(self.slots.workers.values(), key=lambda w: (w.slot, w.started))]
        return {"master": {
            "pid": os.getpid(), "uid": os.geteuid(), "version": __version__,
            "uptime": round(now - self.started, 3),
            "config": self.config.path, "listen": self.config.listen, "port": self.port,
            "state": self.state, "workers": self.target, "ready": self.slots.ready_count(),
            "held": len(self.broker.held), "holding": self.broker.holding(),
            "fd_budget": self.broker.budget.total, "autoscale": self.config.autoscale,
            "max_workers": self.config.max_workers, "max_clients": self.max_clients,
            "generation": self.generation, "upgrade": dict(self.upgrades.status),
            "log_dropped": logmod.dropped_total(),
            "config_generation": self.config.generation, "protocol": self.app.name,
            "groups": self.moves.status(),
            **(dict(zip(("cpu_seconds", "rss"), tally.usage(os.getpid()))) if usage else {}),
        }, "workers": workers, **{k: figures[k] for k in ("slots", "totals", "latency")}}

    def scale(self, count: int) -> str | None:
        """Set the worker count; why not, when it cannot be done."""
        limit = self.config.max_workers
        if not 1 <= count <= limit:
            return f"worker count {count} out of range: 1 to {limit} (workers.max_workers)"
        if self.state == "stopping":
            return "mpd is stopping"
        if self.upgrades.rolling:  # slots change only between rolls (README: upgrading)
            return self.upgrades.queue_scale(count)
        if count == self.target:
            return None
        log.info("worker.scaled", previous=self.target, workers=count)
        retiring = self.slots.resize(count)
        self.routes_changed()
        routes = self.slots.routes
        for worker in retiring:  # it hands its clients to their new owners
            self.send(worker, msg.Retire(epoch=routes.epoch, table=list(routes.table)))
        return None

    def routes_changed(self) -> None:
        """Every worker learns the new routes; groups whose key now belongs elsewhere move
        (once that worker is ready)."""
        routes = self.slots.routes
        self.channels.broadcast(msg.Routes(epoch=routes.epoch, table=list(routes.table)))
        self.moves.plan()

    def on_group_ended(self, worker: WorkerProc, message: msg.GroupEnded) -> None:
        if self.directory is not None:
            key = msg.key_from_json(message.key)
            if key is not None:
                self.directory.ended(worker, key, message.gseq)

    def reload(self) -> str | None:
        """Re-read the config and apply it; on any problem change nothing and return why."""
        self.notifier.reloading()
        if self.control is not None:
            self.control.keep_socket("reload")  # whatever the file says: it is mpd's
        try:
            hooks.fault("master.reload")
            new = reload_config(self.config)
            if isinstance(new, str):
                return new
            self.config = new
            self.set_max_clients()
            self.channels.broadcast(msg.Config(settings=live_settings(new)))
            return self.scale(new.worker_count)
        finally:
            self.notifier.ready(self.status_line())

    def stop(self, graceful: bool = True) -> str | None:
        return self.shutdown.stop(graceful)

    def where(self, key: Key) -> dict[str, Any]:
        return self.moves.where(key)

    def move(self, key: Key, slot: int) -> str | None:
        return self.moves.move_key(key, slot)

    def drain(self, slot: int, drained: bool) -> str | None:
        return self.moves.drain(slot, drained)

    def upgrade(self) -> str | None:
        return self.upgrades.start()

    def reopen_logs(self) -> str | None:
        """The log file anew in the master, then in every worker (mpdctl reopen-logs)."""
        why_not = logmod.reopen()
        if why_not is None and logmod.log_file() is not None:
            for worker in list(self.slots.workers.values()):  # retiring ones log too
                self.send(worker, msg.ReopenLogs())
        return why_not

