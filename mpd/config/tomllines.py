"""Where in a TOML text a key is set: the line an error message points at."""

from __future__ import annotations

import re


def dotted(path: str) -> str:
    """A TOML key path with quotes and spaces around the dots removed."""
    return ".".join(part.strip().strip("\"'") for part in path.split("."))


def key_line(text: str, section: str, name: str | None) -> int | None:
    """Line (1-based) that sets section.name (or opens section when name is None), whether
    by a key under a [table] header, a dotted key, or a [section.name] sub-table header."""
    target = ".".join(p for p in (section, name) if p)
    current = ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        header = re.match(r"^\[\[?([^\]]+)\]", stripped)
        if header:
            current = dotted(header.group(1))
            full = current
        else:
            assignment = re.match(r"^([A-Za-z0-9_.\"' -]+?)\s*=", stripped)
            if not assignment:
                continue
            key = dotted(assignment.group(1))
            full = f"{current}.{key}" if current else key
        if full == target or full.startswith(target + "."):
            return number
    return None


def line_of(path: str | None, section: str, name: str) -> int | None:
    """The line of `path` that sets section.name, for an error found after parsing."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return key_line(f.read(), section, name)
    except (OSError, UnicodeDecodeError):
        return None
