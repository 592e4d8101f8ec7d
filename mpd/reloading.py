"""The one reload path of the master and of single-process mode: re-read the config,
refuse it as a whole when it is invalid or needs a restart, and log which it was.
Applying the new settings is the caller's part (the master tells its workers; a single
process applies them to itself)."""

from __future__ import annotations

from mpd import config as configmod
from mpd import log as logmod

log = logmod.get_logger()


def reload_config(current: configmod.Config) -> configmod.Config | str:
    """The new config, or why not (logged as config.reload_failed; nothing changed)."""
    try:
        new = configmod.reload(current)
    except configmod.ConfigError as e:
        log.error("config.reload_failed", error=str(e))
        return str(e)
    log.info("config.reloaded", path=new.path, workers=new.worker_count)
    return new
