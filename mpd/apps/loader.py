"""Finding the application that `server.protocol` names, with the options of the config's
`[app]` table:

- a built-in name: ping, rooms, relay;
- the name of an entry point in the group `mpd.protocols` (an installed package's);
- `package.module:attribute`.

The attribute is a factory called with the options as keyword arguments, returning an
Application (an Application itself is taken as it is, when there are no options).
Whatever fails (an unknown name, a module that does not import, a factory that raises or
returns something else) is an AppError saying what and where; the config check turns it
into one line and exit 78."""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Mapping
from typing import Any

from mpd.apps.interface import Application
from mpd.config.schema import Config, ConfigError
from mpd.config.tomllines import key_line

BUILTIN = {"ping": "mpd.apps.ping:application", "rooms": "mpd.apps.rooms:application",
           "relay": "mpd.apps.relay:application"}
ENTRY_POINTS = "mpd.protocols"


class AppError(Exception):
    """The application cannot be loaded; the message says why."""


def load(name: str, options: Mapping[str, Any] | None = None) -> Application:
    target = BUILTIN.get(name) or (name if ":" in name else entry_point(name))
    factory = resolve(name, target)
    options = dict(options or {})
    if isinstance(factory, Application) and not options:
        return factory
    if not callable(factory):
        raise AppError(f"{target} is neither an application factory nor an Application")
    try:
        app = factory(**options)
    except Exception as e:  # noqa: BLE001 - the application's bug, reported in one line
        raise AppError(f"{target}({', '.join(options)}) raised {e!r}{where(e)}") from None
    if not isinstance(app, Application):
        raise AppError(f"{target}() returned {type(app).__name__}, expected an "
                       "mpd.apps.Application")
    return app


def from_config(config: Config) -> Application:
    """The application server.protocol names, made with the [app] options; a ConfigError
    in one line (file, line, key, why) when it cannot be."""
    try:
        return load(config.protocol, dict(config.app))
    except AppError as e:
        line = None
        if config.path is not None:
            try:
                with open(config.path, encoding="utf-8") as f:
                    line = key_line(f.read(), "server", "protocol")
            except OSError:
                pass
        raise ConfigError(config.path or "(embedded defaults)", f"cannot load the "
                          f"application: {e}", line=line, key="server.protocol") from None


def entry_point(name: str) -> str:
    """The `module:attribute` an installed package registers under `name`."""
    from importlib.metadata import entry_points

    found = entry_points()
    group = (found.select(group=ENTRY_POINTS) if hasattr(found, "select")
             else found.get(ENTRY_POINTS, []))  # type: ignore[attr-defined]  # 3.9
    for ep in group:
        if ep.name == name:
            return str(ep.value)
    known = sorted({*BUILTIN, *(ep.name for ep in group)})
    raise AppError(f"no application {name!r}: expected a built-in name or an entry point in "
                   f"the group {ENTRY_POINTS} ({', '.join(known)}), or package.module:factory")


def resolve(name: str, target: str) -> Any:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise AppError(f"{target!r} is not package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - SyntaxError, ImportError, or the module's own bug
        raise AppError(f"cannot import {module_name} (for {name!r}): {e!r}{where(e)}") from None
    try:
        value: Any = module
        for part in attribute.split("."):
            value = getattr(value, part)
    except AttributeError:
        raise AppError(f"{module_name} has no {attribute} (for {name!r})") from None
    return value


def where(error: BaseException) -> str:
    """ at file:line of the innermost frame, for a one-line report."""
    frames = traceback.extract_tb(error.__traceback__)
    if isinstance(error, SyntaxError) and error.filename:
        return f" at {error.filename}:{error.lineno}"
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def describe(app: Application) -> dict[str, Any]:
    """What the upgrade's pre-flight reports of an application."""
    return {"name": app.name, "state_version": app.state_version,
            "reads_state": list(app.reads_state), "groups": app.group is not None,
            "python": sys.version.split()[0]}
