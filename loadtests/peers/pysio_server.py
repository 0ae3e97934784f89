"""Peer "python-socketio": python-socketio 5 as an ASGI app on uvicorn (one worker).

    CACHE/venv/bin/python pysio_server.py PORT

Run with the peers' own virtualenv (see ``ensure_installed``), not the project's. The
contract is that of ``loadtests.peers``: Engine.IO v4, WebSocket transport only, default
pings (25 s interval, 20 s timeout), no per-message compression; a socket joins the room
named by the handshake query's ``room``; event ``m`` (room, text) with an ack sends ``m``
(text) to everyone else in the room, then acks with no arguments.

uvicorn is configured with what its "auto" choices pick when ``uvicorn[standard]`` is
installed, spelled out so that a missing piece fails instead of silently changing the
stack: uvloop, httptools, and the ``websockets-sansio`` WebSocket implementation (built on
the ``websockets`` library's Sans-I/O protocol; uvicorn's older ``websockets``
implementation is deprecated).
"""

import signal
import sys
from typing import Any
from urllib.parse import parse_qs

import socketio  # type: ignore[import-not-found, import-untyped, unused-ignore]
import uvicorn  # type: ignore[import-not-found, unused-ignore]

sio = socketio.AsyncServer(
    async_mode="asgi",
    transports=["websocket"],
    max_http_buffer_size=1_000_000,
    http_compression=False,
    cors_allowed_origins=[],  # no Origin checks (the Node peer makes none either)
    logger=False,
    engineio_logger=False,
)
app = socketio.ASGIApp(sio, socketio_path="socket.io")


@sio.event  # type: ignore[untyped-decorator, unused-ignore]
async def connect(sid: str, environ: dict[str, Any], auth: object = None) -> None:
    room = parse_qs(environ.get("QUERY_STRING", "")).get("room", [""])[0]
    if room:
        await sio.enter_room(sid, room)


@sio.on("m")  # type: ignore[untyped-decorator, unused-ignore]
async def message(sid: str, room: object, text: object) -> None:
    # Returning None acks with no arguments: 43<id>[]
    if isinstance(room, str):
        await sio.emit("m", text, room=room, skip_sid=sid)


def main() -> None:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: pysio_server.py PORT")
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal under the handler
    # it found: make that an exit with status 0 (as on SIGINT) rather than death by SIGTERM.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        workers=1,
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        ws_max_size=1_000_000,
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
