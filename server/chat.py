"""``parley chat``: a small interactive client. Two terminals chat with each other.

It joins (or creates) one room, prints what is said there as ``[seq] user: text``,
sends each line typed, and on a lost connection (or a server too busy to take it)
reconnects with backoff and resumes from the last seq it printed, so nothing is shown
twice or skipped. End of input (Ctrl-D) quits at any time, connected or not.
"""

import random
import sys
from typing import TextIO

import trio
from trio_websocket import ConnectionRejected, HandshakeError

from protocol.client import Disconnected, ParleyClient, ServerError, TokenSource, open_client
from protocol.errors import ErrorCode
from protocol.frames import Error, Goaway, Joined, Member, MemberOp, Message

FIRST_DELAY = 0.5
MAX_DELAY = 10.0
# Errors no reconnect can fix: tell the user and stop.
FATAL = {
    ErrorCode.UNAUTHORIZED,
    ErrorCode.FORBIDDEN,
    ErrorCode.INVALID,
    ErrorCode.UNSUPPORTED_VERSION,
}


# Parley's answers to an upgrade it cannot take now (the server is full, or this address
# has too many connections): retried after their Retry-After, or the backoff if longer.
BUSY = {429, 503}
MAX_RETRY_AFTER = 300.0  # seconds: a longer Retry-After is taken as this


class ChatError(Exception):
    """Why the chat cannot go on; printed as one line."""


def _refused(reason: str) -> str:
    """Why the server refused the token, and what to do: its own words (PyJWT's) name
    no cause a user can act on."""
    if "expired" in reason:
        return f"the server refused the token ({reason}): make a new one with parley token"
    return (
        f"the server refused the token ({reason}): it was likely made with another secret "
        "than the server's; pass the server's secret as --secret=..., or run where "
        "`parley serve --dev` runs"
    )


def retry_after(headers: tuple[tuple[bytes, bytes], ...]) -> float:
    """The seconds a refusal's ``Retry-After`` asks for (0 without one we can read)."""
    for name, value in headers:
        if name.lower() == b"retry-after" and value.strip().isdigit():
            return min(float(value), MAX_RETRY_AFTER)
    return 0.0


def printable(body: bytes | None) -> str:
    """Another server's words, safe for a terminal: no control characters, one line."""
    text = (body or b"").decode("utf-8", "replace")
    return "".join(c if c.isprintable() else " " for c in text).strip()[:200]


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
        print(
            f"* history of {frame.room} changed; showing from seq {frame.seq}",
            file=out,
            flush=True,
        )


async def _enter(client: ParleyClient, room: str, private: bool) -> Joined:
    # Without a position: a room resumed by hello has replayed what was missed already
    # (a join with the old position would be answered "not recovered": it went out).
    try:
        return await client.join(room, resume=False)
    except ServerError as exc:
        if exc.code is not ErrorCode.NOT_FOUND:
            raise
    try:
        return await client.create(room, private=private)
    except ServerError as raced:
        if raced.code is not ErrorCode.ROOM_EXISTS:
            raise
        return await client.join(room)


async def _read_lines(lines: trio.MemorySendChannel[str], ended: trio.Event) -> None:
    """Typed lines, for the whole chat; closing the channel means end of input."""
    async with lines:
        while line := await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True):
            if text := line.rstrip("\n"):
                await lines.send(text)
    ended.set()


async def _converse(
    client: ParleyClient,
    room: str,
    lines: trio.MemoryReceiveChannel[str],
    out: TextIO,
    err: TextIO,
) -> bool:
    """Show events and send typed lines; True once input ends, False if the connection
    does first."""
    finished = False
    async with trio.open_nursery() as nursery:

        async def show_events() -> None:
            async for frame in client.events:
                _show(frame, out)
            nursery.cancel_scope.cancel()

        async def send_lines() -> None:
            nonlocal finished
            async for text in lines:
                try:
                    await client.send(room, text)
                except ServerError as exc:
                    print(f"! not sent: {exc.error.msg}", file=err, flush=True)
            finished = True
            nursery.cancel_scope.cancel()

        nursery.start_soon(show_events)
        nursery.start_soon(send_lines)
    return finished


async def _session(
    url: str,
    token: str,
    new_token: TokenSource | None,
    user: str,
    room: str,
    private: bool,
    history: int,
    positions: dict[str, tuple[int, str]],
    lines: trio.MemoryReceiveChannel[str],
    reconnecting: bool,
) -> bool:
    """One connection; True when the user is done."""
    out, err = sys.stdout, sys.stderr
    async with open_client(url, token, resume=positions, refresh=new_token) as client:
        first = room not in positions
        joined = await _enter(client, room, private)
        if reconnecting:
            print("* reconnected", file=err, flush=True)
        if first:
            print(f"* {user} in {room} (seq {joined.seq}); Ctrl-D quits", file=err, flush=True)
            if history and joined.seq:
                page = await client.history(room, limit=min(history, 100))
                for message in page.items:
                    _show(message, out)
        try:
            return await _converse(client, room, lines, out, err)
        finally:
            positions.update(client.positions)  # where to resume from


async def run_chat(
    url: str,
    token: str | TokenSource,
    user: str,
    room: str,
    *,
    private: bool = False,
    history: int = 20,
) -> int:
    """Chat until end of input; the exit status. ``token`` is a token, or a function
    that makes one: then each connection gets a new one, refreshed before it expires."""
    fixed, new_token = (token, None) if isinstance(token, str) else ("", token)
    err = sys.stderr
    positions: dict[str, tuple[int, str]] = {}
    send_lines, lines = trio.open_memory_channel[str](100)
    input_ended = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_lines, send_lines, input_ended)
        delay = FIRST_DELAY
        connected_once = False
        while True:
            wait = delay * random.uniform(0.8, 1.2)
            try:
                done = await _session(
                    url,
                    fixed if new_token is None else await new_token(),
                    new_token,
                    user,
                    room,
                    private,
                    history,
                    positions,
                    lines,
                    reconnecting=connected_once,
                )
                connected_once = True
                delay = FIRST_DELAY
                if done:
                    nursery.cancel_scope.cancel()
                    return 0
                print("* disconnected", file=err, flush=True)
            except ServerError as exc:
                if exc.code is ErrorCode.UNAUTHORIZED:
                    raise ChatError(_refused(exc.error.msg)) from None
                if exc.code in FATAL:
                    raise ChatError(exc.error.msg) from None
                print(f"* server refused ({exc.error.msg})", file=err, flush=True)
            except ConnectionRejected as exc:
                if exc.status_code not in BUSY:
                    raise ChatError(
                        f"{url} is not a Parley endpoint (HTTP {exc.status_code})"
                    ) from None
                wait = max(wait, retry_after(exc.headers))
                print(
                    f"* server busy (HTTP {exc.status_code}: {printable(exc.body)}); "
                    f"retrying in {wait:.0f} s",
                    file=err,
                    flush=True,
                )
            except (OSError, HandshakeError, Disconnected) as exc:
                if not connected_once and delay == FIRST_DELAY:
                    again = "" if input_ended.is_set() else " Retrying."
                    print(
                        f"* cannot reach {url} ({exc or type(exc).__name__}); is "
                        f"`parley serve` running?{again}",
                        file=err,
                        flush=True,
                    )
            with trio.move_on_after(wait):
                await input_ended.wait()
            if input_ended.is_set():  # Ctrl-D while disconnected: quit now
                unsent = lines.statistics().current_buffer_used
                if unsent:
                    what = "1 line was" if unsent == 1 else f"{unsent} lines were"
                    print(f"* {what} not sent: no connection", file=err)
                nursery.cancel_scope.cancel()
                return 1 if unsent else 0
            delay = min(MAX_DELAY, delay * 2)
