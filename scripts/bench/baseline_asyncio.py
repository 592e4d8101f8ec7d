#!/usr/bin/env python3
"""What a Python developer would write for the ping protocol: an asyncio `Protocol`
server (`loop.create_server`), on asyncio's own event loop or, with --uvloop, on uvloop's.
The framing is pingframes.py's, with the same test for the common case (one whole plain
frame, nothing pending) that mpd and the raw-fd floor make, so that what differs between
them is the event loop and its transports.

usage: baseline_asyncio.py [--port 0] [--uvloop]
  The port is in the first stdout line, {"event": "baseline.started", "port": P, ...}.
  --uvloop needs uvloop importable by this interpreter (exit 69 if it is not).
Listens on 127.0.0.1 only; SIGTERM ends it. Python 3.9+; the standard library, plus uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
import time
from typing import Callable, cast

from pingframes import AT_START, KEY_FRAME, REPLY, parse


class Ping(asyncio.Protocol):
    write: Callable[[bytes], None]  # the transport's, set in connection_made

    def __init__(self) -> None:
        self.state = AT_START

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but they write alike.
        self.write = cast(asyncio.Transport, transport).write

    def data_received(self, data: bytes) -> None:
        if (self.state == AT_START and data[-1] == 0 and data[0] != KEY_FRAME
                and data.find(0) == len(data) - 1):
            self.write(REPLY)
            return
        frames, self.state = parse(self.state, data)
        if frames:
            self.write(REPLY * frames)


async def serve(port: int, impl: str, version: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Ping, "127.0.0.1", port, backlog=4096)
    line = {"ts": time.time(), "event": "baseline.started", "impl": impl, "version": version,
            "port": server.sockets[0].getsockname()[1], "pid": os.getpid(),
            "python": sys.version.split()[0]}
    os.write(1, (json.dumps(line) + "\n").encode())
    await server.serve_forever()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--uvloop", action="store_true")
    args = p.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if args.uvloop:
        try:
            import uvloop
        except ImportError:
            print(f"baseline_asyncio: no uvloop for {sys.executable}", file=sys.stderr)
            return 69
        if hasattr(uvloop, "run"):  # 0.18+; install() is deprecated from Python 3.12 on
            uvloop.run(serve(args.port, "uvloop", uvloop.__version__))
        else:
            uvloop.install()
            asyncio.run(serve(args.port, "uvloop", uvloop.__version__))
    else:
        asyncio.run(serve(args.port, "asyncio", sys.version.split()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
