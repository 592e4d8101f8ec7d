"""A relay client to try streaming with: publish stdin to STREAM, or play STREAM to
stdout, byte for byte.

    python -m mpd.apps.relay_client publish --rate 2M cam1 < recording.ts
    python -m mpd.apps.relay_client play cam1 > copy.ts      [--host ...] [--port ...]

A publisher sends until the end of stdin, then the stream ends: each player gets all
that was published since it joined, then the end of its stdout. A second publisher of a
stream is refused (exit 1), and so is a player that fell too far behind (cut off: the
relay never slows its publisher down for a player). A live source sends at its own rate;
a recording on stdin goes as fast as it can be read, unless `--rate` plays it at so many
bytes a second."""

from __future__ import annotations

import sys

from mpd.apps import client
from mpd.apps.relay import PLAY, PUBLISH

PROG = "python -m mpd.apps.relay_client"


def main(argv: list[str] | None = None) -> int:
    p = client.parser(PROG, "Publish stdin to a stream of mpd's relay application, or "
                            "play a stream to stdout.")
    p.add_argument("action", choices=("publish", "play"))
    p.add_argument("stream", help="the stream's name (1 to 255 bytes of UTF-8)")
    p.add_argument("--rate", type=client.rate_argument, metavar="BYTES_PER_S",
                   help="publish: send stdin at most this fast (2M, 500k, 250000), as a "
                        "live source would; default: as fast as stdin is read")
    args = p.parse_args(argv)

    def body() -> int:
        publish = args.action == "publish"
        frame = client.first_frame(bytes([PUBLISH if publish else PLAY]), args.stream)
        sock, _line, rest = client.join(args.host, args.port, frame)
        with sock:
            if publish:  # what comes back after "ok" is nothing: thrown away
                pace = client.Pace(args.rate) if args.rate else None
                client.copy(sock, b"", sys.stdin.fileno(), None, pace=pace)
            else:
                client.copy(sock, rest, None, sys.stdout.fileno())
        return 0

    return client.run(body, PROG)


if __name__ == "__main__":
    sys.exit(main())
