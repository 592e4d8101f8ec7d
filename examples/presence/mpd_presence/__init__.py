"""mpd-presence: channels with nicknames, an example application for mpd (see app.py)."""

from mpd_presence.app import application

__all__ = ["application"]
