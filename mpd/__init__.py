"""mpd: a multi-process TCP server daemon (master + epoll workers)."""

__version__ = "0.1.0"
