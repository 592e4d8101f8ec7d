"""The master: forks workers into numbered slots and keeps them serving.

One single-threaded event loop over the signal wake-up fd, every worker's channel and the
control socket. It never blocks and never parses the client protocol. Each turn, as in
gunicorn's arbiter: react to what happened, kill the hung, top up the slots, retry held
hand-offs. Who owns what lives in slots.py, routing of handed-off clients in handoff.py,
what control commands (and the signals that stand for them) do in commands.py."""

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
from mpd.config.reloading import reload_config
from mpd.config.schema import Config, live_settings
from mpd.logs import log as logmod
from mpd.master import tally
from mpd.master.broker import Broker
from mpd.master.messages import Messages
from mpd.master.slots import Slots, WorkerProc
from mpd.master.spawn import fork_worker
from mpd.master.stopping import Stopping
from mpd.master.upgrade import Upgrades
from mpd.ops import access, commands
from mpd.ops.agent import AgentServer, agent_line
from mpd.ops.control import ControlServer
from mpd.ops.observers import Observers
from mpd.system import testhooks as hooks
from mpd.system.signals import SignalQueue
from mpd.system.systemd import Notifier
from mpd.wire.channel import Kind, Message, close_fds
from mpd.worker.worker import EXIT_BOOT_ERROR

SPAWN_BATCH = 8  # forks per loop turn (each costs a few ms of the master's time)

log = logmod.get_logger()


class Master(Stopping, Messages):
    def __init__(self, config: Config, listener: socket.socket,
                 control_sock: socket.socket | None = None,
                 agent_sock: socket.socket | None = None, listener_shared: bool = False,
                 metrics_sock: socket.socket | None = None):
        """Only state: signal handlers, selector, notifier, control and agent servers come
        in run(). `listener_shared`: another process (systemd, for socket activation) holds
        the listening socket too, and it must go on listening after we stop."""
        self.config = config
        self.listener = listener
        self.listener_shared = listener_shared
        self.control_sock = control_sock
        self.agent_sock = agent_sock  # the HAProxy agent-check port, when agent.listen is set
        self.agent: AgentServer | None = None  # its server, from run() on
        self.tally = tally.Tally()  # what the workers did, never going backwards
        # mpd.stats lines, and the metrics endpoint (metrics.listen) from run() on
        self.observers = Observers(self, metrics_sock)
        self.slots = Slots(config.worker_count)
        self.broker = Broker(self.slots, self.send)
        # starting -> running -> (draining ->) stopping -> stopped
        self.state = "starting"
        self.drain_deadline = 0.0  # draining: the graceful stop proper begins at this time
        self.stop_deadline = 0.0
        self.kill_deadline = 0.0
        self.started = time.monotonic()
        self.port: int = listener.getsockname()[1]
        self.spawn_pending = False  # more slots to fill than one turn spawned
        self.generation = 1  # one more with each upgrade in place (its workers' too)
        self.pidfile: str | None = None  # --daemon's, removed by whoever exits last
        self.upgrades = Upgrades(self)  # upgrade in place: its pre-flight, exec and roll
        self.max_clients = config.clients_per_worker()
        self.on_message_kind: dict[Kind, Callable[[WorkerProc, Message], None]] = {
            Kind.HANDOFF: self.broker.dispatch, Kind.STATS: self.on_stats,
            Kind.HELLO: self.on_hello}

    @property
    def target(self) -> int:
        return self.slots.target

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
        """React to what happened, each fd inside a boundary; then the timed duties."""
        logmod.watch(self.selector)  # wait writable on a log sink that fell behind
        for key, events in self.selector.select(self.timeout()):
            try:
                key.data(events)  # each fd was registered with its reaction
            except Exception as e:  # noqa: BLE001 - the master exits only on purpose
                self.contain(key.data, e)
        try:
            self.murder_workers()
            self.manage_workers()
            self.broker.retry_held()
            self.upgrades.tick(time.monotonic())
            if self.control is not None:
                self.control.expire()
            if self.agent is not None:
                self.agent.tick()
            self.observers.tick(time.monotonic())
            self.notifier.tick(self.status_line if self.state == "running" else None)
        except Exception as e:  # noqa: BLE001 - at most once a turn, and turns wait
            log.exception("loop.error", where="duties", error=repr(e))

    def contain(self, reaction: Callable[[int], Any], error: Exception) -> None:
        """A bug met in reacting to one fd: log it with what it was about and end that one
        peer. A worker whose channel fails so is killed (its slot is refilled at once):
        left in the selector, its channel would fail on every turn. Messages, control
        peers and signals have boundaries of their own, inside."""
        worker = getattr(reaction, "args", (None,))[0]
        if isinstance(worker, WorkerProc):
            log.exception("loop.error", where="channel", worker_pid=worker.pid,
                          worker_slot=worker.slot, error=repr(error))
            self.forget_channel(worker)
            self.kill(worker)
        else:
            log.exception("loop.error", where=getattr(reaction, "__name__", repr(reaction)),
                          error=repr(error))

    def start(self, adopt: dict[str, Any] | None = None) -> None:
        self.selector = selectors.DefaultSelector()
        self.signals = SignalQueue(self.signal_table())
        self.selector.register(self.signals, selectors.EVENT_READ, self.on_signals)
        self.notifier = Notifier()
        self.control: ControlServer | None = None
        if self.control_sock is not None:
            self.control = ControlServer(
                self.control_sock, self.config.socket_path, self.selector,
                functools.partial(commands.handle, self),
                lambda uid, gid: access.why_denied(self.config, uid, gid))
        if self.agent_sock is not None:
            self.agent = AgentServer(self.agent_sock, self.selector, self.agent_line)
        if adopt is not None:
            self.upgrades.adopt(adopt)
        else:
            log.info("mpd.started", version=__version__, config=self.config.path,
                     listen=self.config.listen, port=self.port, workers=self.target,
                     control=self.config.socket_path if self.control else None)
        self.observers.start(self.selector)  # after adopt: it counts from the old totals
        self.set_max_clients()
        self.manage_workers()

    def close(self) -> None:
        self.broker.drop_held("stopping")
        if self.control is not None:
            self.control.close()
        if self.agent is not None:
            self.agent.close()
        self.observers.close()
        self.selector.close()
        self.signals.close(signal.SIG_IGN)  # stopped: a late SIGTERM must not turn exit 0 to -15
        self.notifier.close()

    def timeout(self) -> float:
        """Seconds until the next timed duty: a respawn, a heartbeat check, a deadline."""
        if self.spawn_pending:
            return 0.0
        now = time.monotonic()
        due = [now + 1.0, self.slots.next_respawn(), self.broker.next_deadline(now),
               self.drain_deadline, self.stop_deadline, self.kill_deadline,
               self.agent.paused_until if self.agent is not None else None,
               self.notifier.deadline(),
               self.control.next_deadline() if self.control is not None else None,
               self.observers.deadline(),
               self.upgrades.deadline()]
        return max(0.0, min(d for d in due if d) - now)

    def status_line(self) -> str:
        return (f"{self.slots.ready_count()}/{self.target} workers ready, "
                f"{self.slots.clients()} clients")

    def agent_line(self) -> str:
        """What HAProxy's agent check hears (agent.py): the state, and the load against
        the capacity (with autoscale, what max_workers could take)."""
        state = self.state
        if self.kill_deadline:
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

    # --- workers ----------------------------------------------------------------------------

    def spawn_worker(self, slot: int, serving: bool = True) -> WorkerProc | None:
        """A new worker for `slot`: it takes the slot now, or (an upgrade's) once ready."""
        try:
            pid, channel = fork_worker(slot, self.config, self.listener, self.slots.table,
                                       self.forget_in_child)
        except OSError as e:  # out of processes, memory or fds: try again later
            log.error("worker.spawn_failed", worker_slot=slot, error=e.strerror)
            if serving:
                self.schedule_respawn(slot, served=False)
            return None
        worker = WorkerProc(slot=slot, pid=pid, channel=channel, generation=self.generation,
                            config_generation=self.config.generation)
        history = self.slots.add(worker, serving)
        self.watch(worker)
        log.info("worker.spawned", worker_pid=pid, worker_slot=slot, restarts=history.restarts,
                 generation=self.generation)
        return worker

    def watch(self, worker: WorkerProc) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if worker.channel.wants_write
                                         else 0)
        # A partial, not a closure: a closure that re-registers itself refers to itself, and
        # that cycle kept every dead worker's channel alive until a full garbage collection
        # (the master grew 25 -> 52 MB over 1,500 respawns).
        self.selector.register(worker.channel, events,
                               functools.partial(self.on_channel_event, worker))

    def forget_in_child(self) -> None:
        """In a forked worker: close what is the master's."""
        self.signals.close()
        self.selector.close()
        self.notifier.close()
        if self.control is not None:
            self.control.close(unlink=False)
        if self.agent is not None:
            self.agent.sock.close()  # its selector is closed already
        self.observers.forget_in_child()
        for other in self.slots.workers.values():
            other.channel.close()  # else a sibling never sees EOF when the master dies
        close_fds(self.broker.held_fds())  # the master's to deliver, not ours

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
        self.forget_channel(worker)
        self.read_last_words(worker)
        worker.channel.close()
        self.tally.bury(worker, cpu_seconds)  # its last counts, kept for the totals
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

    def murder_workers(self) -> None:
        """SIGKILL workers whose heartbeat stopped; reap_workers() respawns them. Also the
        stop's deadlines (stopping.py): the drain, the graceful stop, the wait for the
        killed."""
        now = time.monotonic()
        for worker in list(self.slots.workers.values()):
            if worker.state != "stopping" and now - worker.last_seen > self.config.worker_timeout:
                log.error("worker.timeout", worker_pid=worker.pid, worker_slot=worker.slot,
                          silent_for=round(now - worker.last_seen, 3))
                self.slots.retire(worker)  # killed on purpose: its slot is refilled at once
                self.kill(worker)
                self.slots.respawn_now(worker.slot)
        self.check_stop_deadlines(now)

    def manage_workers(self) -> None:
        """Top up: spawn wanted slots that have no worker and whose back-off is over, at
        most SPAWN_BATCH per turn, so that a big scale-up never stalls hand-offs."""
        self.spawn_pending = False
        if self.state == "stopping":
            if not self.slots.workers:
                self.state = "stopped"
            return
        empty = self.slots.empty_slots(time.monotonic())
        for slot in empty[:SPAWN_BATCH]:
            restarts = self.slots.restarts(slot)
            if restarts:
                log.info("worker.respawned", worker_slot=slot, restarts=restarts)
            self.spawn_worker(slot)
        self.spawn_pending = len(empty) > SPAWN_BATCH  # the loop comes back at once

    def kill(self, worker: WorkerProc) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)

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
            "held": len(self.broker.held), "autoscale": self.config.autoscale,
            "max_workers": self.config.max_workers, "max_clients": self.max_clients,
            "generation": self.generation, "upgrade": dict(self.upgrades.status),
            "log_dropped": logmod.dropped_total(),
            "config_generation": self.config.generation,
            **(dict(zip(("cpu_seconds", "rss"), tally.usage(os.getpid()))) if usage else {}),
        }, "workers": workers, **{k: figures[k] for k in ("slots", "totals", "latency")}}

    def scale(self, count: int) -> str | None:
        """Set the worker count; why not, when it cannot be done."""
        limit = self.config.max_workers
        if not 1 <= count <= limit:
            return f"worker count {count} out of range: 1 to {limit} (workers.max_workers)"
        if self.state == "stopping":
            return "mpd is stopping"
        if count == self.target:
            return None
        log.info("worker.scaled", previous=self.target, workers=count)
        for worker in self.slots.resize(count):  # it hands its clients to their new owners
            self.send(worker, Kind.DRAIN, {"slots": list(self.slots.table)})
        self.broadcast(Kind.ROUTES, {"slots": list(self.slots.table)})
        return None

    def reload(self) -> str | None:
        """Re-read the config and apply it; on any problem change nothing and return why."""
        self.notifier.reloading()
        try:
            hooks.fault("master.reload")
            new = reload_config(self.config)
            if isinstance(new, str):
                return new
            self.config = new
            self.set_max_clients()
            self.broadcast(Kind.CONFIG, live_settings(new))
            return self.scale(new.worker_count)
        finally:
            self.notifier.ready(self.status_line())

    def upgrade(self) -> str | None:
        return self.upgrades.start()

    def reopen_logs(self) -> str | None:
        """The log file anew in the master, then in every worker (mpdctl reopen-logs)."""
        why_not = logmod.reopen()
        if why_not is None and logmod.log_file() is not None:
            for worker in list(self.slots.workers.values()):  # retiring ones log too
                self.send(worker, Kind.REOPEN_LOGS, {})
        return why_not


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal has no name in the enum
        return f"SIG{number}"
