"""A rooms client to try the chat with: join ROOM, send it what you type (stdin, line by
line), print what the other members say (stdout). At the end of stdin it leaves, once the
server has written what was due to it.

    python -m mpd.apps.rooms_client lobby [--host 127.0.0.1] [--port 1990]

Several terminals, or mpd's workers and hosts: members of one room meet whichever worker
or host (through HAProxy, packaging/haproxy/rooms.cfg) each of them reached first."""

from __future__ import annotations

import sys

from mpd.apps import client
from mpd.apps.rooms import JOIN

PROG = "python -m mpd.apps.rooms_client"


def main(argv: list[str] | None = None) -> int:
    p = client.parser(PROG, "Join a room of mpd's rooms application: stdin lines to the "
                            "room, the room's lines to stdout.")
    p.add_argument("room", help="the room's name (1 to 255 bytes of UTF-8)")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="do not say on stderr how many members the room has")
    args = p.parse_args(argv)

    def body() -> int:
        frame = client.first_frame(bytes([JOIN]), args.room)
        sock, line, rest = client.join(args.host, args.port, frame)
        with sock:
            if not args.quiet:  # "ok N": the members now, this one included
                count = int(line.split()[-1])
                print(f"joined {args.room!r} ({count} member{'s' if count > 1 else ''})",
                      file=sys.stderr, flush=True)
            client.copy(sock, rest, sys.stdin.fileno(), sys.stdout.fileno(), whole_lines=True)
        return 0

    return client.run(body, PROG)


if __name__ == "__main__":
    sys.exit(main())
