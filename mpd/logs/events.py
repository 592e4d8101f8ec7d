"""The catalogue of log events: every `event` name mpd writes, its level and meaning.
The README's catalogue is generated from it (`python -m mpd.events`), and a test checks
that every event the code logs is listed here."""

from __future__ import annotations

# name: (level, who logs it, what it means and its own fields)
EVENTS: dict[str, tuple[str, str, str]] = {
    "mpd.started": ("info", "master", "bound and starting: version, config, listen, port "
                    "(the real one when port = 0), workers, control"),
    "mpd.ready": ("info", "master", "every initial worker serves: workers"),
    "mpd.draining": ("info", "master", "graceful stop with the agent on: the agent says drain "
                     "for agent.drain_delay while mpd still serves and accepts, so HAProxy "
                     "sends no new clients before the listeners close: drain_delay"),
    "mpd.stopping": ("info", "master", "graceful stop begun (SIGTERM, SIGINT, mpdctl stop): "
                     "workers, graceful_timeout"),
    "mpd.halting": ("warning", "master", "immediate stop: SIGKILL to every worker; reason "
                    "(quit, graceful_timeout)"),
    "mpd.stopped": ("info", "master", "the master exits 0: uptime"),
    "mpd.crashed": ("error", "master", "an unexpected exception ended mpd (a bug): error, "
                    "traceback"),
    "mpd.stop_incomplete": ("error", "master", "killed workers not reaped in time: workers"),
    "mpd.socket_activated": ("info", "master", "systemd passed the listening socket: listen, "
                             "port"),
    "mpd.socket_mismatch": ("warning", "master", "the passed socket is not the configured "
                            "address (it is used anyway): listen, port, config_listen, "
                            "config_port"),
    "mpd.already_running": ("error", "master", "--daemon: a live mpd holds the pidfile (exit "
                            "69): error"),
    "mpd.bind_failed": ("error", "master", "cannot listen: error (exit 69)"),
    "mpd.privileges_dropped": ("info", "master", "started as root, mpd opened its sockets and "
                               "files and became server.user: user, uid, group, gid"),
    "mpd.privileges_failed": ("error", "master", "started as root without server.user, or "
                              "server.user names another user and mpd is not root, or "
                              "server.user cannot reach what mpd needs once it runs as that "
                              "user (the config, the code, the log's directory); checked "
                              "before the drop, nothing is left open (exit 78): error"),
    "mpd.privileges_limited": ("warning", "master", "started as root, mpd checked what "
                               "server.user can reach: it cannot do something that only a "
                               "later operation needs, and mpd starts all the same: user, "
                               "path, need, consequence"),
    "mpd.max_clients_capped": ("warning", "master", "workers.max_clients is more than the fd "
                               "limit allows (the limit less its headroom: an eighth of it, "
                               "16 to 128); each worker serves at most max_clients: "
                               "configured, max_clients, fd_limit"),
    "mpd.stats": ("info", "master", "every log.stats_interval seconds (default 60), when "
                  "anything was counted: the interval's seconds, accepted, requests, handoffs "
                  "(adopted), spilled, refused, protocol_errors, overflows, timeouts, lost, "
                  "proxy_rejected, over_budget, restarts, log_dropped; clients and workers "
                  "(ready) now; "
                  "when the interval had hand-offs, handoff_p50_us and handoff_p99_us "
                  "(estimated within the latency histogram's buckets) and handoff_max_us "
                  "(exact)"),
    "mpd.signal_refused": ("warning", "master", "a signal's command could not be done (SIGTTIN "
                           "at max_workers, SIGTTOU at one worker): signal, command, error"),
    "upgrade.started": ("info", "master", "mpdctl upgrade or SIGUSR2: the pre-flight check of "
                        "the code on disk runs: generation, preflight_pid"),
    "upgrade.exec": ("info", "master", "the check passed; the master executes the new code "
                     "in place (same pid): generation, inherited (fds)"),
    "upgrade.waiting": ("info", "master", "the check passed; the exec waits for the key "
                        "groups' moves under way to end (none starts meanwhile): generation, "
                        "moves"),
    "upgrade.adopted": ("info", "master", "the new code runs as the master and took over the "
                        "old one's workers: generation, version, from_version, workers, held"),
    "upgrade.slot_replaced": ("info", "master", "a new-code worker took a slot and the old one "
                              "retired into it (every client handed over) and exited: "
                              "worker_slot, old_pid, seconds"),
    "upgrade.done": ("info", "master", "every slot runs the new generation: generation, slots, "
                     "seconds"),
    "upgrade.failed": ("error", "master", "the upgrade stopped; what runs keeps serving: "
                       "generation, error"),
    "config.invalid": ("error", "master", "the config file is invalid at start: path, line, "
                       "key, error (exit 78)"),
    "config.reloaded": ("info", "master", "SIGHUP or mpdctl reload applied: path, workers, "
                        "changed (the keys whose value changed: the workers or the master "
                        "apply each, as the config reference says)"),
    "config.reload_failed": ("error", "master", "reload refused, nothing changed: error"),
    "worker.spawned": ("info", "master", "forked a worker: worker_pid, worker_slot, restarts"),
    "worker.spawn_failed": ("error", "master", "fork or socketpair failed (EAGAIN, ENOMEM, "
                            "EMFILE); retried with back-off: worker_slot, error"),
    "worker.serving": ("info", "worker", "the worker's loop runs: max_clients"),
    "worker.ready": ("info", "master", "the worker said HELLO: worker_pid, worker_slot, "
                     "boot_ms"),
    "worker.exited": ("info/warning", "master", "a worker ended (warning if unexpected): "
                      "worker_pid, worker_slot, uptime, exit_code or signal"),
    "worker.respawned": ("info", "master", "a slot is refilled after a death: worker_slot, "
                         "restarts"),
    "worker.backoff": ("warning", "master", "a slot keeps crashing soon after start; the "
                       "respawn waits: worker_slot, failures, delay"),
    "worker.timeout": ("error", "master", "no heartbeat for worker_timeout; SIGKILL: "
                       "worker_pid, worker_slot, silent_for"),
    "worker.scaled": ("info", "master", "the worker count changed: previous, workers"),
    "worker.scale_queued": ("info", "master", "a scale (mpdctl scale, SIGTTIN/SIGTTOU, a "
                            "reload, autoscale) during an upgrade's roll waits for the roll to "
                            "end: previous, workers"),
    "worker.autoscaled": ("info", "master", "every worker was full; one added: previous, "
                          "workers, max_clients"),
    "worker.accept_paused": ("warning", "worker", "the worker stopped accepting (logged when "
                             "a pause begins): reason (max_clients, EMFILE, ENFILE, ENOBUFS, "
                             "ENOMEM), clients, max_clients"),
    "worker.accept_resumed": ("info", "worker", "accepting again after a pause (logged "
                              "once a pause is over, however often it repeated): reason, "
                              "pauses, paused_for, clients"),
    "worker.fd_limit": ("warning", "worker", "the worker's fd limit changed (prlimit); it "
                        "follows within a second: fd_limit, max_clients, clients"),
    "worker.retiring": ("info", "worker", "retiring (a scale-down, an upgrade's roll): it "
                        "hands its clients that are in no group to their keys' owners; the "
                        "master moves its groups away: clients, groups"),
    "worker.stopping": ("info", "worker", "graceful stop: finishing its clients: clients"),
    "worker.stopped": ("info", "worker", "the worker exits: its counters"),
    "worker.quit": ("info", "worker", "SIGQUIT: the worker exits at once"),
    "worker.orphaned": ("warning", "worker", "the master is gone (channel closed); exiting"),
    "worker.crashed": ("error", "worker", "an exception ended the worker: error, traceback"),
    "worker.test_crash": ("error", "worker", "test hook MPD_TEST_CRASH_FILE made it exit"),
    "app.error": ("error", "worker", "the application's code raised: where (data_received, "
                  "connection_made, eof_received, state_restored, export_state, "
                  "member_joined, member_left, timer, ...), fd and key (for a connection) or "
                  "key and members (for a group), error, traceback. That connection or that "
                  "group ended (connection_lost \"error\" or \"group_error\"); nothing else"),
    "group.moved": ("info", "worker", "a key group moved here whole from another worker (a "
                    "scale, an upgrade's roll, mpdctl move or drain): key, move, members, "
                    "bytes (the transfer), pause_ms (its members neither read nor written: "
                    "from the freeze on the old worker to the restore here)"),
    "group.move_started": ("debug", "master", "a key group's move began: key, move, "
                           "from_slot, from_pid, to_slot, to_pid"),
    "group.move_failed": ("error/warning", "both", "a key group's move was refused (its state "
                          "over workers.max_group_state, export_state raised, ...) or called off "
                          "(the new owner died, a deadline): move, key, error. The group "
                          "serves on where it was"),
    "group.move_aborted": ("warning", "worker", "the master called a move off: the group "
                           "serves on here, as if nothing happened: key, move, members"),
    "client.accepted": ("debug", "worker", "a client connected: fd, peer, clients"),
    "client.bound": ("debug", "worker", "a client named a key this worker owns: fd, key, "
                     "client (with server.proxy_protocol, the real client's address and port; "
                     "else null)"),
    "client.closed": ("debug", "worker", "a client is gone: fd, reason, clients, client"),
    "client.timed_out": ("info", "worker", "clients closed by a round of upkeep (at most one "
                         "line a second): first_frame (no whole frame within "
                         "first_frame_timeout), idle (nothing for idle_timeout), clients"),
    "client.error": ("error", "worker", "handling a client raised (a bug); that client is "
                     "closed, the others are served on: fd, key, error, traceback"),
    "client.protocol_error": ("warning", "worker", "a client broke the protocol and was "
                              "closed: fd, error, client"),
    "client.overflow": ("warning", "worker", "a client left too many replies unread and was "
                        "closed: fd, buffered, max_output_buffer"),
    "client.proxied": ("debug", "worker", "a client's PROXY header is complete: fd, client (the "
                       "real one it names; null for the proxy's own LOCAL check), proxy, "
                       "command (PROXY, LOCAL, UNKNOWN), version"),
    "client.proxy_rejected": ("warning", "worker", "server.proxy_protocol: a client was closed "
                              "before its first byte was served: fd, peer, reason (untrusted: "
                              "not in server.proxy_from; malformed; timeout), error"),
    "fd.dispatched": ("debug", "worker", "a handed-off client was adopted by its key's owner: "
                      "key, from_slot, from_pid, to_slot, to_pid, carried (bytes), latency_us "
                      "(HANDOFF sent to ADOPT taken), client (the real client, carried along "
                      "with the hand-off; null without server.proxy_protocol)"),
    "fd.spilled": ("info", "both", "a handed-off client goes to the next slot in its key's "
                   "ranking: from a worker that was full when it came (key, rank (0: the "
                   "owner), clients, max_clients), or from the master, when the owner cannot "
                   "take it (key, worker_slot (the owner), rank, to_slot, reason: full by its "
                   "heartbeat, respawning, or stalled: its channel holds its share of the "
                   "master's fd budget)"),
    "fd.refused": ("warning", "worker", "the client came as the last try (every slot was "
                   "full for as long as the master holds a client, or the master could not "
                   "hold it) and this worker was full too, or it had no key: it got the "
                   "refusal reply: key, from_slot, reason, clients, max_clients"),
    "fd.handoff_failed": ("error", "worker", "HANDOFF could not be sent; the client is served "
                          "where it is: fd, key, error"),
    "fd.over_budget": ("warning", "master", "the master could not hold a handed-off client "
                       "within its fd budget (fds it holds for clients: its fd limit less its "
                       "own and a reserve): it went at once to a worker as the last, to take "
                       "or refuse, or was closed when no worker's channel had room: key, "
                       "worker_slot (the owner), to_slot (null: closed), holding, budget"),
    "fd.dropped": ("error/warning", "master", "a held hand-off could not be delivered: key, "
                   "reason"),
    "fd.lost": ("error", "both", "a client's fd was cut from a HANDOFF or ADOPT: this process "
                "had no free fd to receive it, and the client is gone: kind, key, peer, lost "
                "(so far)"),
    "channel.message": ("debug", "worker", "a channel message arrived: kind, size"),
    "channel.error": ("error/warning", "both", "a malformed, unexpected or failed channel "
                      "message, or one whose handling raised (a bug: with kind and traceback); "
                      "its fds are closed: error, peer, kind, fds"),
    "loop.error": ("error", "both", "reacting to an event raised (a bug) and the loop goes on: "
                   "where (signal SIGHUP, timers, duties with the duty, accept, channel, "
                   "reap), error, traceback; a worker whose channel fails so is killed and "
                   "replaced"),
    "control.command": ("info/debug", "master", "a control request (debug for status and "
                        "ping, which change nothing): command, peer_uid, peer_pid"),
    "control.denied": ("warning", "master", "a control peer not on the allow-list: peer_uid, "
                       "peer_pid"),
    "control.bad_request": ("warning", "master", "an oversized or stalled control request; "
                            "closed: peer_uid, error"),
    "control.evicted": ("info", "master", "the control table was full: the connection that "
                        "had waited longest without a request (whatever its age) got an error "
                        "line and was closed to let a new one in: peer_uid, peer_pid, "
                        "waited_for"),
    "control.recreated": ("warning", "master", "the control socket's file was gone, or a "
                          "stale socket had taken its place: mpd bound a new one there (its "
                          "connected peers stay): path, reason (gone, replaced), trigger "
                          "(check: the look every 2 s; reload)"),
    "control.recreate_failed": ("error", "master", "mpd cannot put its control socket back "
                                "(a file that is not a socket, another process's socket, a "
                                "directory out of reach): path, error; once per cause, tried "
                                "again every 2 s and at each reload"),
    "ops.accept_paused": ("warning", "master", "accept on the control socket, the metrics or "
                          "the agent port failed for want of fds or memory: it stops "
                          "accepting for retry_in seconds at a time, not spinning (one line "
                          "per pause): server, error, retry_in"),
    "ops.accept_resumed": ("info", "master", "accepting went on for a second without a "
                           "shortage: the pause is over: server, pauses (retries), "
                           "paused_for"),
    "ops.error": ("error", "master", "handling a peer of the control socket, the metrics or "
                  "the agent port raised (a bug): that peer is closed: server, error, "
                  "traceback"),
    "control.error": ("error", "master", "a control command raised (a bug); its request "
                      "fails with the error: command, error, traceback"),
    "control.access_unmapped": ("error", "master", "control.allow_uids or allow_group name "
                                "ids that mpd's user namespace does not map (systemd's "
                                "PrivateUsers=yes) (exit 78): error"),
    "control.failed": ("error", "master", "cannot create the control socket (exit 69): error"),
    "agent.failed": ("error", "master", "cannot open the agent-check port (at start: exit 69; "
                     "after an upgrade from a release without it: mpd serves on without the "
                     "agent): error"),
    "metrics.failed": ("error", "master", "cannot open the metrics port (metrics.listen; at "
                       "start: exit 69; after an upgrade from a release without it: mpd serves "
                       "on without it): error"),
    "metrics.bad_request": ("debug", "master", "a request to the metrics port other than GET "
                            "/metrics, or malformed; it got an HTTP error: status, error"),
    "metrics.error": ("error", "master", "rendering the metrics, or handling a scraper, raised "
                      "(a bug); that scrape fails: error, traceback"),
    "log.dropped": ("warning", "both", "the log sink (stdout, journald, syslog, file) did not "
                    "keep up and this process's queue was full: dropped (lines lost since the "
                    "last report), total (since the process started); logged once the queue "
                    "empties"),
    "log.reopened": ("info", "both", "SIGUSR1 or mpdctl reopen-logs (logrotate's postrotate): "
                     "this process opened the log file anew at its path; the first line in the "
                     "new file: file"),
    "log.reopen_failed": ("error", "both", "the log file could not be opened anew; this "
                          "process logs on to the old file: file, error"),
}


def markdown() -> str:
    rows = ["| event | level | from | meaning and fields |", "| --- | --- | --- | --- |"]
    rows += [f"| `{name}` | {level} | {role} | {text} |"
             for name, (level, role, text) in EVENTS.items()]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
