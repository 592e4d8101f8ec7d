"""The one reload path of the master and of single-process mode: re-read the config,
refuse it as a whole when it is invalid, needs a restart or names a log it cannot open,
and log which it was. The process's own logging is switched here; applying the rest is
the caller's part (the master tells its workers; a single process applies it itself)."""

from __future__ import annotations

from mpd.config import access
from mpd.config import schema as configmod
from mpd.logs import log as logmod

log = logmod.get_logger()


def reload_config(current: configmod.Config) -> configmod.Config | str:
    """The new config, or why not (logged as config.reload_failed; nothing changed)."""
    try:
        new = configmod.reload(current)
        # Logging first: a log file that cannot be opened refuses the whole reload
        # (LogSetupError is a ConfigError), and the old logging stays in place.
        logmod.configure_from(new)
    except configmod.ConfigError as e:
        log.error("config.reload_failed", error=str(e))
        return str(e)
    unseen = access.unseen(new)
    if unseen is not None:
        log.error("config.reload_failed", error=unseen)
        return unseen
    changed = [key.dotted for key in configmod.SCHEMA
               if getattr(new, key.attr) != getattr(current, key.attr)]
    log.info("config.reloaded", path=new.path, workers=new.worker_count, changed=changed)
    return new
