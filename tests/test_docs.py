"""The documents say what the code does: generated sections are in step, and every event
the code logs is in the catalogue."""

from __future__ import annotations

import re

from conftest import ROOT

from mpd.config import schema as config
from mpd.logs import events

README = (ROOT / "README.md").read_text()


def test_readme_config_reference_matches_the_schema():
    assert config.markdown() in README


def test_readme_event_catalogue_matches_events_py():
    assert events.markdown() in README


def test_every_logged_event_is_in_the_catalogue():
    pattern = re.compile(r'(?:log\.(?:debug|info|warning|error|exception|log|every)|StartError)\('
                         r'(?:[^"()]*?, )?"([a-z_]+\.[a-z_]+)"')
    logged = set()
    for path in (ROOT / "mpd").rglob("*.py"):
        logged |= set(pattern.findall(path.read_text()))
    assert len(logged) > 30
    assert sorted(logged - set(events.EVENTS)) == []
    assert sorted(set(events.EVENTS) - logged) == []


def test_example_config_is_the_rendered_default():
    assert (ROOT / "etc" / "mpd.toml").read_text() == config.render()


def layout() -> dict[str, str]:
    """The README's Layout block, by subpackage: {"mpd/worker/": its lines, ...}."""
    block = README.split("## Layout\n", 1)[1].split("```\n", 2)[1]
    parts: dict[str, str] = {}
    current = ""
    for line in block.splitlines():
        if line.startswith("mpd/"):
            current = line.split()[0] if line.split()[0].endswith("/") else "mpd/"
        elif not line.startswith(" "):
            current = ""
        if current:
            parts[current] = parts.get(current, "") + line + "\n"
    return parts


def test_the_layout_names_every_module_where_it_is():
    """A newcomer finds each part by its file name: every module of mpd/ is in the README's
    Layout under its own folder, and every file named there exists."""
    parts = layout()
    assert "mpd/worker/" in parts and "clients.py" in parts["mpd/worker/"]  # it reads
    missing, stale = [], []
    for path in sorted((ROOT / "mpd").rglob("*.py")):
        if path.name == "__init__.py":
            continue
        folder = str(path.parent.relative_to(ROOT)) + "/"
        text = parts.get(folder, "")
        if not re.search(rf"(^|[\s/(,]){re.escape(path.name)}\b", text):
            missing.append(str(path.relative_to(ROOT)))
    for folder, text in parts.items():
        for name in re.findall(r"[\w]+\.py\b", text):
            if not (ROOT / folder / name).exists():
                stale.append(folder + name)
    assert (missing, stale) == ([], [])
