"""Process titles, so that `ps` and `systemctl status` tell the master from its workers:
`mpd: master /etc/mpd.toml`, `mpd: worker 3`. setproctitle rewrites the memory that
/proc/PID/cmdline shows (and the 15-character name in /proc/PID/comm); an upgrade's exec
starts a new command line, so the new master sets its title again."""

from __future__ import annotations

import setproctitle

from mpd.config.schema import Config


def master(config: Config) -> None:
    setproctitle.setproctitle(f"mpd: master {config.path or '(defaults)'}")


def single(config: Config) -> None:
    setproctitle.setproctitle(f"mpd: single-process {config.path or '(defaults)'}")


def worker(slot: int) -> None:
    setproctitle.setproctitle(f"mpd: worker {slot}")


def preflight() -> None:
    setproctitle.setproctitle("mpd: upgrade pre-flight")
