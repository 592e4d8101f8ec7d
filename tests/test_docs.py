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
