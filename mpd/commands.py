"""What each control command does to the master: one function per command, one table.
The control socket (control.py) carries requests here and replies back."""

from __future__ import annotations

import grp
import os
import pwd
import time
from typing import TYPE_CHECKING, Any, Callable

from mpd import __version__

if TYPE_CHECKING:
    from mpd.master import Master

STAT_FIELDS = ("clients", "accepted", "requests", "handoffs_out", "adopted", "refused")


def status(master: Master, _request: dict[str, Any]) -> dict[str, Any]:
    now = time.monotonic()
    workers = []
    for worker in sorted(master.workers.values(), key=lambda w: (w.slot, w.started)):
        history = master.history.get(worker.slot)
        workers.append({
            "slot": worker.slot, "pid": worker.pid, "state": worker.state,
            **{k: worker.stats.get(k, 0) for k in STAT_FIELDS},
            "max_clients": master.config.max_clients,
            "restarts": history.restarts if history else 0,
            "uptime": round(now - worker.started, 3),
            "heartbeat_age": round(now - worker.last_seen, 3),
        })
    totals = {k: sum(w[k] for w in workers) for k in STAT_FIELDS}
    return {"ok": True, "master": {
        "pid": os.getpid(), "version": __version__, "uptime": round(now - master.started, 3),
        "config": master.config.path, "listen": master.config.listen,
        "port": master.port, "state": master.state, "workers": master.target,
        "ready": master.ready_count(), "held": len(master.held),
        "autoscale": master.config.autoscale, "max_workers": master.config.max_workers,
    }, "workers": workers, "totals": totals}


def scale(master: Master, request: dict[str, Any]) -> dict[str, Any]:
    """{"workers": N} sets the count; {"delta": +N or -N} changes it."""
    workers, delta = request.get("workers"), request.get("delta")
    if isinstance(workers, int) and not isinstance(workers, bool) and delta is None:
        count = workers
    elif isinstance(delta, int) and not isinstance(delta, bool) and workers is None:
        count = master.target + delta
    else:
        return {"ok": False, "error": 'scale takes "workers": N or "delta": +N/-N (integers)'}
    limit = master.config.max_workers
    if not 1 <= count <= limit:
        return {"ok": False, "error": f"worker count {count} out of range: 1 to {limit} "
                "(workers.max_workers)"}
    if master.state == "stopping":
        return {"ok": False, "error": "mpd is stopping"}
    previous = master.target
    master.scale(count)
    return {"ok": True, "previous": previous, "workers": count}


def reload(master: Master, _request: dict[str, Any]) -> dict[str, Any]:
    error = master.reload()
    if error is not None:
        return {"ok": False, "error": f"reload failed, nothing changed: {error}"}
    return {"ok": True, "workers": master.target}


def stop(master: Master, request: dict[str, Any]) -> dict[str, Any]:
    graceful = request.get("graceful", True) is not False
    master.stop(graceful=graceful)
    return {"ok": True, "graceful": graceful}


def ping(master: Master, _request: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "pong": True, "pid": os.getpid(), "version": __version__}


COMMANDS: dict[str, Callable[[Master, dict[str, Any]], dict[str, Any]]] = {
    "status": status, "scale": scale, "reload": reload, "stop": stop, "ping": ping,
}


def handle(master: Master, request: dict[str, Any]) -> dict[str, Any]:
    command = COMMANDS.get(request["command"])
    if command is None:
        return {"ok": False, "error": f"unknown command {request['command']!r}; expected one "
                "of " + ", ".join(COMMANDS)}
    return command(master, request)


def allowed(master: Master, uid: int, gid: int) -> bool:
    """Root, mpd's own user, control.allow_uids, and members of control.allow_group."""
    config = master.config
    if uid in (0, os.geteuid()) or uid in config.allow_uids:
        return True
    if not config.allow_group:
        return False
    try:
        group = grp.getgrnam(config.allow_group)
    except KeyError:
        return False
    if gid == group.gr_gid:
        return True
    try:
        return pwd.getpwuid(uid).pw_name in group.gr_mem
    except KeyError:
        return False
