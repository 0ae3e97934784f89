"""``parley chat``: a small interactive client. Two terminals chat with each other.

It joins (or creates) one room, prints what is said there as ``[seq] user: text``,
sends each line typed, and on a lost connection reconnects and resumes from the last
seq it printed, so nothing is shown twice or skipped.
"""

import sys
from typing import TextIO

import trio
from trio_websocket import HandshakeError

from protocol.client import Disconnected, ParleyClient, ServerError, open_client
from protocol.errors import ErrorCode
from protocol.frames import Error, Goaway, Joined, Member, MemberOp, Message

RECONNECT_DELAY = 1.0


def _show(frame: object, out: TextIO) -> None:
    if isinstance(frame, Message):
        who = frame.user or "(server)"
        body = frame.text if frame.text is not None else repr(frame.data)
        print(f"[{frame.seq}] {who}: {body}", file=out, flush=True)
    elif isinstance(frame, Member):
        verb = "joined" if frame.op is MemberOp.ADDED else "left"
        print(f"* {frame.user} {verb} {frame.room}", file=out, flush=True)
    elif isinstance(frame, Error):
        print(f"! error {frame.code}: {frame.msg}", file=out, flush=True)
    elif isinstance(frame, Goaway):
        print(f"* server going away: {frame.msg}", file=out, flush=True)
    elif isinstance(frame, Joined) and frame.recovered is False:
        print(f"* history of {frame.room} changed; showing from seq {frame.seq}", file=out)


async def _enter(client: ParleyClient, room: str, private: bool) -> Joined:
    try:
        return await client.join(room)
    except ServerError as exc:
        if exc.code is not ErrorCode.NOT_FOUND:
            raise
    try:
        return await client.create(room, private=private)
    except ServerError as raced:
        if raced.code is not ErrorCode.ROOM_EXISTS:
            raise
        return await client.join(room)


async def _type_lines(client: ParleyClient, room: str, err: TextIO) -> None:
    while True:
        line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line:
            return  # end of input
        text = line.rstrip("\n")
        if text:
            try:
                await client.send(room, text)
            except ServerError as exc:
                print(f"! not sent: {exc.error.msg}", file=err, flush=True)


async def _converse(client: ParleyClient, room: str, out: TextIO, err: TextIO) -> bool:
    """Show events and send typed lines; True once input ends, False if the connection
    does first."""
    finished = False
    async with trio.open_nursery() as nursery:

        async def show_events() -> None:
            async for frame in client.events:
                _show(frame, out)
            nursery.cancel_scope.cancel()

        async def type_lines() -> None:
            nonlocal finished
            await _type_lines(client, room, err)
            finished = True
            nursery.cancel_scope.cancel()

        nursery.start_soon(show_events)
        nursery.start_soon(type_lines)
    return finished


async def run_chat(
    url: str, token: str, user: str, room: str, *, private: bool = False, history: int = 20
) -> int:
    out, err = sys.stdout, sys.stderr
    positions: dict[str, tuple[int, str]] = {}
    while True:
        try:
            async with open_client(url, token, resume=positions) as client:
                first = room not in positions
                positions = client.positions  # kept up to date for the next resume
                joined = await _enter(client, room, private)
                if first:
                    print(f"* {user} in {room} (seq {joined.seq}); Ctrl-D quits", file=err)
                    if history and joined.seq:
                        page = await client.history(room, limit=min(history, 100))
                        for message in page.items:
                            _show(message, out)
                if await _converse(client, room, out, err):
                    return 0
            print("* disconnected; reconnecting", file=err)
        except ServerError as exc:
            print(f"! {exc.error.msg}", file=err)
            if exc.code in (ErrorCode.UNAUTHORIZED, ErrorCode.FORBIDDEN):
                return 1
        except (OSError, HandshakeError, Disconnected) as exc:
            print(f"* disconnected ({exc}); reconnecting", file=err)
        await trio.sleep(RECONNECT_DELAY)
