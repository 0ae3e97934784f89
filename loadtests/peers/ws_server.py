"""Peer "websockets": a bare broadcast server on the ``websockets`` library (its asyncio
API and ``websockets.broadcast``), the ceiling for a Python WebSocket transport.

    CACHE/venv/bin/python ws_server.py PORT

Run with the peers' own virtualenv (see ``ensure_installed``). A client connects to
``/?room=NAME`` and joins that room. Each text message ``<room>\\n<text>`` is broadcast as
``text`` to every other member of ``<room>``; then the sender gets the text frame ``ok``.
No compression; the library's default pings (20 s interval, 20 s timeout). It runs on the
default asyncio event loop, as the library's documentation does.
"""

import asyncio
import signal
import sys
from urllib.parse import parse_qs, urlsplit

import websockets  # type: ignore[import-not-found, unused-ignore]
from websockets.asyncio.server import (  # type: ignore[import-not-found, unused-ignore]
    ServerConnection,
    serve,
)
from websockets.exceptions import (  # type: ignore[import-not-found, unused-ignore]
    ConnectionClosed,
)

rooms: dict[str, set[ServerConnection]] = {}


async def handler(ws: ServerConnection) -> None:
    path = ws.request.path if ws.request is not None else "/"
    room = parse_qs(urlsplit(path).query).get("room", [""])[0]
    members = rooms.setdefault(room, set())
    members.add(ws)
    try:
        async for frame in ws:
            if not isinstance(frame, str):
                continue
            target, _, text = frame.partition("\n")
            websockets.broadcast((m for m in rooms.get(target, ()) if m is not ws), text)
            await ws.send("ok")
    except ConnectionClosed:
        pass  # a client that just drops its TCP connection: no traceback per connection
    finally:
        members.discard(ws)
        if not members and rooms.get(room) is members:
            del rooms[room]


async def serve_until_signalled(port: int) -> None:
    async with serve(handler, "127.0.0.1", port, compression=None) as server:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.close)
        await server.wait_closed()


def main() -> None:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: ws_server.py PORT")
    asyncio.run(serve_until_signalled(int(sys.argv[1])))


if __name__ == "__main__":
    main()
