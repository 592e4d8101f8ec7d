"""Control commands: one table (COMMANDS) that the daemon dispatches on and that mpdctl
builds its help, its argument parsing and its output from; and the signals that stand for
commands (SIGNALS), as nginx keeps one table for its signals and `nginx -s`.

Commands see the daemon only through the narrow Daemon interface below."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from mpd import __version__
from mpd.logs import log as logmod
from mpd.ops import keycommands, tables, top
from mpd.wire import counters

Reply = dict[str, Any]


class Daemon(Protocol):
    """What a control command may see of and do to the master."""

    @property
    def target(self) -> int: ...

    def snapshot(self, usage: bool = False) -> dict[str, Any]: ...

    def scale(self, count: int) -> str | None: ...  # each returns why not, or None

    def reload(self) -> str | None: ...

    def stop(self, graceful: bool = True) -> str | None: ...

    def upgrade(self) -> str | None: ...

    def reopen_logs(self) -> str | None: ...


def error(message: str) -> Reply:
    return {"ok": False, "error": message}


def done(why_not: str | None, **fields: Any) -> Reply:
    return error(why_not) if why_not is not None else {"ok": True, **fields}


# --- what each command does in the daemon -------------------------------------------------

def status(daemon: Daemon, request: dict[str, Any]) -> Reply:
    """Each worker's own counters; `slots` and `totals` count since mpd started, reaped
    workers included (tally.py), as the metrics do. {"usage": true} adds CPU seconds and
    resident bytes of each process."""
    snapshot = daemon.snapshot(usage=request.get("usage") is True)
    workers = [{"slot": w["slot"], "pid": w["pid"], "state": w["state"],
                **{k: w["stats"].get(k, 0) for k in counters.reported()},
                # before its first heartbeat, the master's figure
                "max_clients": w["stats"].get("max_clients", snapshot["master"]["max_clients"]),
                **{k: w[k] for k in ("restarts", "uptime", "heartbeat_age", "generation",
                                     "version", "config_generation", "cpu_seconds", "rss")
                   if k in w}}
               for w in snapshot["workers"]]
    totals = {**snapshot["totals"], "clients": sum(w["clients"] for w in workers)}
    return {"ok": True, "master": snapshot["master"], "workers": workers,
            "slots": snapshot["slots"], "totals": totals}


def metrics(daemon: Daemon, request: dict[str, Any]) -> Reply:
    """The Prometheus text format of what `status` counts (metrics.py); the same text
    that the metrics endpoint serves."""
    from mpd.ops.metrics import render  # its prometheus_client is imported on first use

    body, content_type = render(daemon.snapshot(usage=True))
    return {"ok": True, "content_type": content_type, "text": body.decode()}


def scale(daemon: Daemon, request: dict[str, Any]) -> Reply:
    """{"workers": N} sets the count; {"delta": +N or -N} changes it."""
    workers, delta = request.get("workers"), request.get("delta")
    if is_int(workers) and delta is None:
        count = workers
    elif is_int(delta) and workers is None:
        count = daemon.target + delta
    else:
        return error('scale takes "workers": N or "delta": +N/-N (integers)')
    previous = daemon.target
    return done(daemon.scale(count), previous=previous, workers=count)


def reload(daemon: Daemon, _request: dict[str, Any]) -> Reply:
    why_not = daemon.reload()
    if why_not is not None:
        return error(f"reload failed, nothing changed: {why_not}")
    master = daemon.snapshot()["master"]
    return {"ok": True, "workers": daemon.target, "config_generation":
            master["config_generation"]}


def stop(daemon: Daemon, request: dict[str, Any]) -> Reply:
    graceful = request.get("graceful", True) is not False
    return done(daemon.stop(graceful=graceful), graceful=graceful)


def upgrade(daemon: Daemon, _request: dict[str, Any]) -> Reply:
    why_not = daemon.upgrade()
    if why_not is not None:
        return error(f"upgrade refused, nothing changed: {why_not}")
    return {"ok": True, "generation": daemon.snapshot()["master"]["upgrade"]["generation"]}


def reopen_logs(daemon: Daemon, _request: dict[str, Any]) -> Reply:
    """The master reopens its log file, then tells every worker to (logrotate's
    postrotate); `file` is None when logs do not go to a file."""
    why_not = daemon.reopen_logs()
    if why_not is not None:
        return error(why_not)
    return {"ok": True, "file": logmod.log_file(), "workers": daemon.target}


def show_reopen_logs(reply: Reply) -> str:
    if reply["file"] is None:
        return "mpd: logs do not go to a file (log.target): nothing to reopen"
    return f"mpd: {reply['file']} reopened by the master, and {reply['workers']} workers told to"


def ping(_daemon: Daemon, _request: dict[str, Any]) -> Reply:
    return {"ok": True, "pong": True, "pid": os.getpid(), "version": __version__}


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- mpdctl's side: the argument each command takes, and how its reply is shown ------------

def no_argument(arg: str | None) -> dict[str, Any]:
    if arg is not None:
        raise ValueError("takes no argument")
    return {}


def scale_argument(arg: str | None) -> dict[str, Any]:
    """N sets the count, +N or -N changes it."""
    if arg is None:
        raise ValueError("takes a count: N, +N or -N")
    try:
        number = int(arg)
    except ValueError:
        raise ValueError(f"{arg!r} is not N, +N or -N") from None
    return {"delta": number} if arg[:1] in "+-" else {"workers": number}


def upgrade_done(reply: Reply, status: Reply) -> bool | str:
    """The new generation's master rolled every slot onto it, or says why it could not."""
    upgrade = status["master"].get("upgrade", {})
    if upgrade.get("generation") != reply["generation"]:
        return False
    if upgrade.get("state") == "failed":
        return f"upgrade failed: {upgrade.get('error')}"
    return upgrade.get("state") == "done"


def show_upgrade(reply: Reply) -> str:
    return f"mpd: upgraded, every worker runs generation {reply['generation']}"


def scale_done(reply: Reply, status: Reply) -> bool | str:
    """Exactly the wanted number of workers serve, the retired are gone, and the key
    groups that belong to other workers now have moved there."""
    wanted = reply["workers"]
    return status["master"]["ready"] == wanted and len(status["workers"]) == wanted \
        and not moving(status)


def moving(status: Reply) -> int:
    """Key groups on their way to another worker, or waiting to start."""
    groups = status["master"].get("groups") or {}
    return groups.get("under_way", 0) + groups.get("queued", 0)


def reload_done(reply: Reply, status: Reply) -> bool:
    """Every worker runs the reloaded config (its number or a later one's), and exactly
    the configured count of them is ready: a reload that scales waits as scale does."""
    m, workers = status["master"], status["workers"]
    return (m["ready"] == m["workers"] == len(workers)
            and all(w["config_generation"] >= reply["config_generation"] for w in workers))


# --- what mpdctl says it waits for, while it waits and when it gives up ---------------------

def rolling(status: Reply) -> list[str]:
    upgrade = status["master"].get("upgrade", {})
    if upgrade.get("state") != "rolling":
        return []
    return [f"an upgrade's roll onto generation {upgrade.get('generation')} (a scale waits "
            "for its end)"]


def workers_ready(status: Reply, wanted: int) -> list[str]:
    m, workers = status["master"], status["workers"]
    if m["ready"] == wanted == len(workers):
        return []
    return [f"{m['ready']} of {wanted} workers ready ({len(workers)} running)"]


def behind(status: Reply, field: str, wanted: int, label: Callable[[Any], str]) -> list[str]:
    """The workers whose `field` (a number) is below `wanted`, each with its own."""
    workers = status["workers"]
    late = [w for w in workers if w.get(field, 0) < wanted]
    if not late:
        return []
    return [f"{label(wanted)} runs on {len(workers) - len(late)} of {len(workers)} workers; "
            + ", ".join(f"pid {w['pid']} (slot {w['slot']}) runs {label(w.get(field))}"
                        for w in late)]


def reload_waiting(reply: Reply, status: Reply) -> str:
    return "; ".join([*behind(status, "config_generation", reply["config_generation"],
                              lambda n: f"config #{n}"),
                      *workers_ready(status, status["master"]["workers"]), *rolling(status)])


def scale_waiting(reply: Reply, status: Reply) -> str:
    groups = [f"{moving(status)} key groups to move"] if moving(status) else []
    return "; ".join([*workers_ready(status, reply["workers"]), *rolling(status), *groups])


def upgrade_waiting(reply: Reply, status: Reply) -> str:
    upgrade = status["master"].get("upgrade", {})
    return "; ".join([f"the upgrade is at {upgrade.get('state')}",
                      *behind(status, "generation", reply["generation"],
                              lambda n: f"generation {n}")])


STATUS_COLUMNS = (("slot", "SLOT"), ("pid", "PID"), ("state", "STATE"), *counters.columns(),
                  ("restarts", "RESTARTS"), ("uptime", "UPTIME"), ("heartbeat_age", "HEARTBEAT"),
                  ("generation", "GEN"), ("config_generation", "CONFIG"))


def show_status(reply: Reply) -> str:
    m = reply["master"]
    lines = [f"mpd {m['version']}  pid {m['pid']}  {m['state']}  up "
             f"{tables.duration(m['uptime'])}  listening on {m['listen']}:{m['port']}  "
             f"config {m['config'] or '(defaults)'} #{m['config_generation']}",
             f"workers {m['ready']}/{m['workers']} ready (max {m['max_workers']}, autoscale "
             f"{'on' if m['autoscale'] else 'off'})"]
    dropped = m.get("log_dropped", 0) + reply["totals"].get("log_dropped", 0)
    if dropped:
        lines.append(f"log lines dropped (the log sink fell behind): {dropped}")
    if reply["totals"].get("proxy_rejected"):
        lines.append("clients turned away for want of a valid PROXY header (server."
                     f"proxy_protocol): {reply['totals']['proxy_rejected']}")
    rows = [[cell(w, name) for name, _ in STATUS_COLUMNS] for w in reply["workers"]]
    totals = reply["totals"]
    rows.append(["total"] + [str(totals[name]) if name in totals else ""
                             for name, _ in STATUS_COLUMNS[1:]])
    return "\n".join(lines + tables.table([h for _, h in STATUS_COLUMNS], rows))


def cell(worker: dict[str, Any], name: str) -> str:
    if name in ("uptime", "heartbeat_age"):
        return tables.duration(worker[name])
    return str(worker[name])


@dataclass(frozen=True)
class Command:
    """One control command: what it does in the daemon, and how mpdctl speaks it."""
    run: Callable[[Daemon, dict[str, Any]], Reply] | None  # in the daemon: request -> reply
    usage: str  # as `mpdctl --help` shows it
    summary: str
    argument: Callable[[str | None], dict[str, Any]] = no_argument  # mpdctl's arg -> fields
    show: Callable[[Reply], str] = lambda reply: "ok"  # what mpdctl prints of the reply
    # mpdctl polls status until this says True (done) or a string (failed: why)
    done: Callable[[Reply, Reply], bool | str] | None = None
    # meanwhile, what it still waits for (said while it waits, and when it gives up)
    waiting: Callable[[Reply, Reply], str] = lambda reply, status: ""
    # mpdctl's own view over other commands (run is None): (a way to send a request,
    # mpdctl's options) -> exit code
    view: Callable[[Callable[..., Reply], Any], int] | None = None


COMMANDS: dict[str, Command] = {
    "status": Command(status, "status", "workers, clients and counters (--json: the raw "
                      "reply)", show=show_status),
    "scale": Command(scale, "scale N|+N|-N", "set or change the worker count; waits until "
                     "that many are ready", argument=scale_argument, done=scale_done,
                     waiting=scale_waiting,
                     show=lambda r: f"mpd: {r['workers']} workers ready (was {r['previous']})"),
    "reload": Command(reload, "reload", "re-read the config (as SIGHUP); an invalid file, or "
                      "a change that needs a restart, changes nothing and fails; waits until "
                      "every worker runs the new config", done=reload_done,
                      waiting=reload_waiting,
                      show=lambda r: f"mpd: config #{r['config_generation']} reloaded, "
                      f"{r['workers']} workers run it"),
    "stop": Command(stop, "stop", "graceful stop (as SIGTERM); a second stop is immediate",
                    show=lambda r: "mpd: stopping"),
    "upgrade": Command(upgrade, "upgrade", "run the mpd now installed, moving every client "
                       "to new workers (as SIGUSR2); waits until done", done=upgrade_done,
                       waiting=upgrade_waiting,
                       show=show_upgrade),
    "reopen-logs": Command(reopen_logs, "reopen-logs", "reopen the log file in every "
                           "process (as SIGUSR1), after logrotate renamed it; no line is "
                           "lost", show=show_reopen_logs),
    "ping": Command(ping, "ping", "check that mpd answers",
                    show=lambda r: f"mpd {r['version']} (pid {r['pid']}) answers"),
    "metrics": Command(metrics, "metrics", "the counters and gauges in the Prometheus text "
                       "format (as the [metrics] listen endpoint serves them)",
                       show=lambda r: r["text"].rstrip("\n")),
    "top": Command(None, "top", "a live view of every slot (over status), refreshed every "
                   "--interval; q or Ctrl-C quits. Not on a terminal: --frames frames (1), "
                   "then exit", view=top.view),
    "where": Command(keycommands.where, "where KEY", "the slot and worker that serve KEY, and "
                     "its group's members (KEY: an int, else text; text:..., hex:...)",
                     argument=keycommands.key_argument, view=keycommands.where_view),
    "move": Command(keycommands.move, "move KEY SLOT", "move KEY's group, with its members "
                    "and state, to SLOT, and keep it there while it lives; waits until done",
                    argument=keycommands.key_and_slot_argument, view=keycommands.move_view),
    "drain": Command(keycommands.drain, "drain SLOT", "move every group off SLOT and route "
                     "no key to it, without scaling; waits until none is left",
                     argument=keycommands.slot_argument, done=keycommands.drain_done,
                     show=lambda r: f"mpd: slot {r['slot']} drained: it serves no key group"),
    "undrain": Command(keycommands.undrain, "undrain SLOT", "route keys to SLOT again (its "
                       "keys' groups move back)", argument=keycommands.slot_argument,
                       show=lambda r: f"mpd: slot {r['slot']} takes keys again"),
}

# Signals that stand for a command: the master runs the command as if mpdctl had sent it.
SIGNALS: dict[signal.Signals, dict[str, Any]] = {
    signal.SIGTERM: {"command": "stop"},
    signal.SIGINT: {"command": "stop"},
    signal.SIGQUIT: {"command": "stop", "graceful": False},
    signal.SIGHUP: {"command": "reload"},
    signal.SIGTTIN: {"command": "scale", "delta": 1},
    signal.SIGTTOU: {"command": "scale", "delta": -1},
    signal.SIGUSR2: {"command": "upgrade"},
    signal.SIGUSR1: {"command": "reopen-logs"},
}


def handle(daemon: Daemon, request: dict[str, Any]) -> Reply:
    command = COMMANDS.get(request["command"])
    if command is None or command.run is None:
        return error(f"unknown command {request['command']!r}; expected one of "
                     + ", ".join(name for name, c in COMMANDS.items() if c.run is not None))
    return command.run(daemon, request)
