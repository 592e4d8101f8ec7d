"""The operating system's side: systemd, signals, privileges, sockets, /proc."""
