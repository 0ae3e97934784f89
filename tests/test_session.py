"""actors/session.py through server/connection.py on memory streams, in virtual time.

The node is real (SQLite included); only the network is a memory stream, so the trio
clock can be a MockClock: a 10-second timeout is asserted as exactly 10.0 and takes no
wall time. Nothing here touches storage after start-up, so no thread runs while the
clock jumps.
"""

from pathlib import Path
from typing import Any

import cbor2
import jwt
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto import WSConnection
from wsproto.events import BytesMessage, CloseConnection
from wsproto.events import Message as WsMessage

from actors.messages import RoomDropped
from actors.outbox import Outbox
from protocol.codec import decode_server, encode
from protocol.errors import CloseCode, ErrorCode
from protocol.frames import Error, Goaway, Hello, Ok, Ping, Pong, Refresh, Send, Welcome
from server.tokens import issue_token
from tests.helpers import SECRET, memory_node, next_frame


async def hello(ws: WebSocketConnection, user: str = "alice") -> Welcome:
    await ws.send_message(encode(Hello(v=1, token=issue_token(SECRET, user, 3600))))
    welcome = await next_frame(ws)
    assert isinstance(welcome, Welcome)
    return welcome


async def closed_with(ws: WebSocketConnection) -> int:
    """Read until the server closes; its close code."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await ws.get_message()
    assert info.value.reason is not None
    return info.value.reason.code


async def test_hello_timeout_is_exact(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with memory_node(tmp_path, hello_timeout=10.0) as mem, mem.connect() as ws:
        start = trio.current_time()
        assert await closed_with(ws) == CloseCode.HELLO_TIMEOUT
        assert trio.current_time() - start == 10.0


async def test_silent_client_is_pinged_then_closed(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with memory_node(tmp_path, ping_interval=25.0, pong_timeout=10.0) as mem:
        async with mem.connect() as ws:
            await hello(ws)
            quiet = trio.current_time()
            assert await next_frame(ws) == Ping()
            assert trio.current_time() - quiet == 25.0
            assert await closed_with(ws) == CloseCode.IDLE_TIMEOUT
            assert trio.current_time() - quiet == 35.0


async def test_a_pong_keeps_the_session(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with memory_node(tmp_path, ping_interval=25.0, pong_timeout=10.0) as mem:
        async with mem.connect() as ws:
            await hello(ws)
            for _ in range(3):
                assert await next_frame(ws) == Ping()
                answered = trio.current_time()
                await ws.send_message(encode(Pong()))
                assert await next_frame(ws) == Ping()  # not a close
                assert trio.current_time() - answered == 25.0
                await ws.send_message(encode(Pong()))


async def test_frames_before_hello_are_refused(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with memory_node(tmp_path) as mem, mem.connect() as ws:
        await ws.send_message(encode(Ping(id=1)))
        error = await next_frame(ws)
        assert isinstance(error, Error) and (error.code, error.id) == (
            ErrorCode.NOT_AUTHENTICATED,
            1,
        )
        await ws.send_message(encode(Pong()))  # a pong is a frame like any other
        error = await next_frame(ws)
        assert isinstance(error, Error) and error.code == ErrorCode.NOT_AUTHENTICATED
        await ws.send_message(b"\xff")
        error = await next_frame(ws)
        assert isinstance(error, Error) and (error.code, error.id) == (ErrorCode.BAD_FRAME, None)
        await hello(ws)
        await ws.send_message(encode(Ping(id=2)))
        assert await next_frame(ws) == Pong(id=2)


async def test_nothing_but_hello_is_decoded_before_hello(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A kvput of 60,000 zeros (a 60 KB frame): decoded, it would be refused as too
    large, with a long message; before hello only its type and id are read."""
    huge = b"\xa4\x00\x18\x32\x01\x07\x18\x27\x61d\x11\x9a" + (60000).to_bytes(4, "big")
    async with memory_node(tmp_path) as mem, mem.connect() as ws:
        await ws.send_message(huge + b"\x00" * 60000)
        reply = await ws.get_message()
        assert isinstance(reply, bytes) and len(reply) < 64
        error = decode_server(reply)
        assert isinstance(error, Error) and (error.code, error.id) == (
            ErrorCode.NOT_AUTHENTICATED,
            7,
        )
        await hello(ws)
        await ws.send_message(huge + b"\x00" * 60000)  # now decoded: refused by its length
        error = await next_frame(ws)
        assert isinstance(error, Error) and (error.code, error.id) == (ErrorCode.TOO_LARGE, 7)
        assert len(error.msg) < 200


async def test_unauthenticated_frames_count_against_the_limits(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Before hello as after: every frame takes a token (pongs too), and every error
    counts against the error budget."""
    async with memory_node(tmp_path, rate=10.0, burst=5) as mem, mem.connect() as ws:
        for _ in range(6):
            await ws.send_message(encode(Pong()))
        codes = [(await next_frame(ws)).code for _ in range(6)]  # type: ignore[attr-defined]
        assert codes == [ErrorCode.NOT_AUTHENTICATED] * 5 + [ErrorCode.RATE_LIMITED]
        for _ in range(30):
            await ws.send_message(encode(Pong()))
        assert await closed_with(ws) == CloseCode.TOO_MANY_ERRORS


async def test_rate_limit_refills_at_the_configured_rate(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with memory_node(tmp_path, rate=10.0, burst=5) as mem, mem.connect() as ws:
        await hello(ws)  # the hello took one token

        async def pings(first: int, n: int) -> list[Any]:
            for i in range(first, first + n):
                await ws.send_message(encode(Ping(id=i)))
            return [await next_frame(ws) for _ in range(n)]

        replies = await pings(1, 5)
        assert replies[:4] == [Pong(id=i) for i in range(1, 5)]
        assert isinstance(replies[4], Error) and replies[4].code == ErrorCode.RATE_LIMITED
        assert replies[4].id == 5
        await trio.sleep(0.3)  # three tokens come back
        replies = await pings(10, 4)
        assert replies[:3] == [Pong(id=i) for i in range(10, 13)]
        assert isinstance(replies[3], Error) and replies[3].code == ErrorCode.RATE_LIMITED


async def test_a_frame_costs_a_token_per_4_kib(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Reading a frame is linear in its size: the rate limit counts its bytes too."""
    big = cbor2.dumps({0: 2, 1: 1, 99: b"x" * 40_000})  # 1 + 9 tokens
    async with memory_node(tmp_path, rate=10.0, burst=20) as mem, mem.connect() as ws:
        await hello(ws)  # 19 left
        await ws.send_message(big)
        assert await next_frame(ws) == Pong(id=1)  # 9 left
        await ws.send_message(big)
        error = await next_frame(ws)
        assert isinstance(error, Error) and (error.code, error.id) == (ErrorCode.RATE_LIMITED, 1)
        await ws.send_message(encode(Ping(id=2)))
        assert await next_frame(ws) == Pong(id=2)


async def test_too_many_errors_close_the_session(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with memory_node(tmp_path) as mem, mem.connect() as ws:
        await hello(ws)
        for _ in range(21):
            await ws.send_message(b"\xff")
        codes = []
        with pytest.raises(ConnectionClosed) as info:
            while True:
                frame = await next_frame(ws)
                assert isinstance(frame, Error)
                codes.append(frame.code)
        assert codes == [ErrorCode.BAD_FRAME] * 21
        assert info.value.reason is not None
        assert info.value.reason.code == CloseCode.TOO_MANY_ERRORS


async def test_refusals_while_going_away_do_not_close_the_session(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """3xx errors are the server's doing: a client sending through a drain keeps its
    session until the node closes it with 1001, however many sends it pipelines."""
    async with memory_node(tmp_path) as mem, mem.connect() as ws:
        await hello(ws)
        for conn in list(mem.node.connections):
            conn.session.goaway("draining", 1000)
        assert isinstance(await next_frame(ws), Goaway)
        for i in range(40):
            await ws.send_message(encode(Send(id=i, room="r", cid=f"c{i}", text="x")))
        for i in range(40):
            frame = await next_frame(ws)
            assert isinstance(frame, Error) and (frame.code, frame.id) == (ErrorCode.TRY_LATER, i)
        await ws.send_message(encode(Ping(id=99)))
        assert await next_frame(ws) == Pong(id=99)


async def test_errors_spread_over_time_are_forgiven(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with memory_node(tmp_path) as mem, mem.connect() as ws:
        await hello(ws)
        for _ in range(40):
            await ws.send_message(b"\xff")
            frame = await next_frame(ws)
            assert isinstance(frame, Error) and frame.code == ErrorCode.BAD_FRAME
            await trio.sleep(1.0)
        await ws.send_message(encode(Ping(id=1)))
        assert await next_frame(ws) == Pong(id=1)


async def test_pings_start_from_hello_not_from_the_hello_timeout(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with memory_node(tmp_path, ping_interval=3.0, hello_timeout=10.0) as mem:
        async with mem.connect() as ws:
            await hello(ws)
            quiet = trio.current_time()
            assert await next_frame(ws) == Ping()
            assert trio.current_time() - quiet == 3.0


async def test_no_ping_while_a_request_runs(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """A request that takes longer than the ping interval (the reader reads nothing
    meanwhile, pongs included) neither gets the client pinged nor closed; pings resume
    an interval after it ends."""
    async with memory_node(tmp_path, ping_interval=25.0, pong_timeout=10.0) as mem:
        async with mem.connect() as ws:
            await hello(ws)
            (conn,) = mem.node.connections
            conn.session.busy = True  # what on_message does around a request
            with trio.move_on_after(100):
                frame = await next_frame(ws)
                raise AssertionError(f"got {frame!r} while a request ran")
            conn.session.busy = False
            conn.session.last_inbound = done = trio.current_time()
            assert await next_frame(ws) == Ping()
            assert trio.current_time() - done == 25.0
            assert await closed_with(ws) == CloseCode.IDLE_TIMEOUT
            assert trio.current_time() - done == 35.0


async def test_a_bug_handling_an_event_closes_only_that_session(
    tmp_path: Path, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events from rooms and users run synchronously in the sender's task: a failing
    handler must close its own session (1011), not crash the sender."""
    async with memory_node(tmp_path) as mem:
        async with mem.connect() as ws:
            await hello(ws)
            (conn,) = mem.node.connections

            def broken(self: object, event: object) -> None:
                raise RuntimeError("bug")

            monkeypatch.setattr(type(conn.session), "_on_event", broken)
            conn.session.notify(RoomDropped("r"))  # returns: the sender goes on
            assert await closed_with(ws) == CloseCode.INTERNAL_ERROR


async def test_a_bug_in_the_writer_closes_only_its_connection(
    tmp_path: Path, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer runs in the node's connections nursery, not one of its own: a bug in
    it must close its connection with 1011 and leave the others alone."""
    async with memory_node(tmp_path) as mem:
        async with mem.connect() as other, mem.connect() as ws:
            await hello(other, "bob")
            await hello(ws)
            conn = next(c for c in mem.node.connections if c.session.user == "alice")

            written = Outbox.written

            def broken(outbox: Outbox, pump: Any) -> bool:
                if outbox is conn.outbox:
                    raise RuntimeError("bug")
                return written(outbox, pump)

            monkeypatch.setattr(Outbox, "written", broken)
            await ws.send_message(encode(Ping(id=1)))  # the pong goes through the writer
            assert await closed_with(ws) == CloseCode.INTERNAL_ERROR
            await other.send_message(encode(Ping(id=2)))
            assert await next_frame(other) == Pong(id=2)


# --- frames must arrive in full in time (--frame-timeout) ------------------------------


async def raw_hello(stream: trio.abc.Stream, ws: WSConnection) -> None:
    hello = encode(Hello(v=1, token=issue_token(SECRET, "alice", 3600)))
    await stream.send_all(ws.send(WsMessage(data=hello)))
    assert isinstance(await raw_frame(stream, ws), Welcome)


async def raw_frame(stream: trio.abc.Stream, ws: WSConnection) -> object:
    """The server's next Parley frame, or its close frame."""
    while True:
        for event in ws.events():
            if isinstance(event, BytesMessage):
                return decode_server(bytes(event.data))
            if isinstance(event, CloseConnection):
                return event
        data = await stream.receive_some(65536)
        assert data, "the server hung up without a close frame"
        ws.receive_data(bytes(data))


async def raw_close(stream: trio.abc.Stream, ws: WSConnection) -> CloseConnection:
    while not isinstance(frame := await raw_frame(stream, ws), CloseConnection):
        pass
    return frame


async def trickle(stream: trio.abc.Stream, data: bytes, every: float) -> None:
    for i in range(len(data)):
        await stream.send_all(data[i : i + 1])
        await trio.sleep(every)


async def test_a_frame_trickled_in_is_closed_at_the_frame_timeout(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with memory_node(tmp_path, frame_timeout=30.0, ping_interval=1000.0) as mem:
        async with mem.raw() as (stream, ws), trio.open_nursery() as nursery:
            await raw_hello(stream, ws)
            first_byte = trio.current_time()
            nursery.start_soon(trickle, stream, ws.send(WsMessage(data=encode(Ping(id=1)))), 20)
            close = await raw_close(stream, ws)
            assert (close.code, close.reason) == (
                CloseCode.IDLE_TIMEOUT,
                "frame not completed in time",
            )
            assert trio.current_time() - first_byte == 30.0
            nursery.cancel_scope.cancel()


async def test_a_fragmented_message_that_never_ends_is_closed(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Each fragment is a complete frame, a sign of life: the keep-alive stays quiet,
    but the message must still end within the frame timeout."""

    async def fragments() -> None:
        for _ in range(100):
            await stream.send_all(ws.send(WsMessage(data=b"\xa1", message_finished=False)))
            await trio.sleep(20)

    async with memory_node(tmp_path, frame_timeout=30.0) as mem:
        async with mem.raw() as (stream, ws), trio.open_nursery() as nursery:
            await raw_hello(stream, ws)
            start = trio.current_time()
            nursery.start_soon(fragments)
            close = await raw_close(stream, ws)
            assert (close.code, close.reason) == (
                CloseCode.IDLE_TIMEOUT,
                "frame not completed in time",
            )
            assert trio.current_time() - start == 30.0
            nursery.cancel_scope.cancel()


async def test_slow_frames_that_end_in_time_keep_the_session(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with memory_node(tmp_path, frame_timeout=30.0, ping_interval=1000.0) as mem:
        async with mem.raw() as (stream, ws):
            await raw_hello(stream, ws)
            # One frame in pieces over 29 s.
            wire = ws.send(WsMessage(data=encode(Ping(id=1))))
            for piece, pause in ((wire[:1], 10), (wire[1:3], 10), (wire[3:5], 9), (wire[5:], 0)):
                await stream.send_all(piece)
                await trio.sleep(pause)
            assert await raw_frame(stream, ws) == Pong(id=1)
            # A message in fragments over 29 s.
            payload = encode(Ping(id=2))
            await stream.send_all(ws.send(WsMessage(data=payload[:1], message_finished=False)))
            await trio.sleep(29)
            await stream.send_all(ws.send(WsMessage(data=payload[1:], message_finished=True)))
            assert await raw_frame(stream, ws) == Pong(id=2)
            # Back to back, each read ending inside the next frame: for 100 s something is
            # incomplete, but no frame takes more than 20 s. Each has its own deadline.
            wire = b"".join(ws.send(WsMessage(data=encode(Ping(id=i)))) for i in range(3, 9))
            cuts = range(0, len(wire), len(wire) // 6 + 1)
            for i in cuts:
                await stream.send_all(wire[i : i + len(wire) // 6 + 1])
                await trio.sleep(20)
            assert [await raw_frame(stream, ws) for _ in range(3, 9)] == [
                Pong(id=i) for i in range(3, 9)
            ]
            await trio.sleep(900)  # then quiet, short of the ping: no deadline left
            await stream.send_all(ws.send(WsMessage(data=encode(Ping(id=9)))))
            assert await raw_frame(stream, ws) == Pong(id=9)


async def test_bytes_of_an_incomplete_frame_are_no_sign_of_life(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """The keep-alive counts complete frames: a trickle is pinged, then closed."""
    settings = {"frame_timeout": 1000.0, "ping_interval": 25.0, "pong_timeout": 10.0}
    async with memory_node(tmp_path, **settings) as mem:
        async with mem.raw() as (stream, ws), trio.open_nursery() as nursery:
            await raw_hello(stream, ws)
            quiet = trio.current_time()
            wire = ws.send(WsMessage(data=encode(Ping(id=1))))
            assert len(wire) * 5 > 35  # it would end after the close
            nursery.start_soon(trickle, stream, wire, 5)
            assert await raw_frame(stream, ws) == Ping()
            assert trio.current_time() - quiet == 25.0
            close = await raw_close(stream, ws)
            assert (close.code, close.reason) == (CloseCode.IDLE_TIMEOUT, "no pong")
            assert trio.current_time() - quiet == 35.0
            nursery.cancel_scope.cancel()


# --- token lifetime -------------------------------------------------------------------


async def test_a_session_ends_when_its_token_expires(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Closed 4007 at exp + the 30 s leeway (exp is whole seconds of wall time, so the
    trio clock sees it within a second of the token's 60 s)."""
    async with memory_node(tmp_path, ping_interval=1000.0) as mem, mem.connect() as ws:
        start = trio.current_time()
        await ws.send_message(encode(Hello(v=1, token=issue_token(SECRET, "alice", 60))))
        welcome = await next_frame(ws)
        assert isinstance(welcome, Welcome) and welcome.expires is not None
        error = await next_frame(ws)
        assert isinstance(error, Error) and error.code == ErrorCode.UNAUTHORIZED
        assert await closed_with(ws) == CloseCode.TOKEN_EXPIRED
        assert trio.current_time() - start == pytest.approx(90.0, abs=1.5)


async def test_a_refresh_keeps_the_session_past_the_first_token(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with memory_node(tmp_path, ping_interval=1000.0) as mem, mem.connect() as ws:
        start = trio.current_time()
        await ws.send_message(encode(Hello(v=1, token=issue_token(SECRET, "alice", 60))))
        assert isinstance(await next_frame(ws), Welcome)
        await trio.sleep(50)
        new = issue_token(SECRET, "alice", 600)
        await ws.send_message(encode(Refresh(id=1, token=new)))
        ok = await next_frame(ws)
        assert isinstance(ok, Ok) and ok.id == 1 and ok.expires is not None
        await trio.sleep(100)  # past the first token's end
        await ws.send_message(encode(Ping(id=2)))
        assert await next_frame(ws) == Pong(id=2)
        assert isinstance(await next_frame(ws), Error)  # token expired
        assert await closed_with(ws) == CloseCode.TOKEN_EXPIRED
        assert trio.current_time() - start == pytest.approx(50 + 630.0, abs=1.5)


async def test_a_refused_refresh_changes_nothing(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with memory_node(tmp_path, ping_interval=1000.0) as mem, mem.connect() as ws:
        await hello(ws, "alice")
        for i, token in enumerate(
            (
                issue_token(SECRET, "bob", 600),  # another user
                issue_token("another-secret-0123456789-abcdefghijklmnop", "alice", 600),
                "not-a-token",
            )
        ):
            await ws.send_message(encode(Refresh(id=i, token=token)))
            error = await next_frame(ws)
            assert isinstance(error, Error) and (error.code, error.id) == (
                ErrorCode.UNAUTHORIZED,
                i,
            )
        await ws.send_message(encode(Ping(id=9)))
        assert await next_frame(ws) == Pong(id=9)  # the session goes on


async def test_tokens_without_expiry_are_refused_unless_allowed(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    forever = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
    async with memory_node(tmp_path) as mem, mem.connect() as ws:
        await ws.send_message(encode(Hello(v=1, token=forever)))
        error = await next_frame(ws)
        assert isinstance(error, Error) and error.code == ErrorCode.UNAUTHORIZED
        assert "exp" in error.msg
        assert await closed_with(ws) == CloseCode.UNAUTHORIZED
    async with memory_node(tmp_path, allow_tokens_without_exp=True) as mem:
        async with mem.connect() as ws:
            await ws.send_message(encode(Hello(v=1, token=forever)))
            welcome = await next_frame(ws)
            assert isinstance(welcome, Welcome) and welcome.expires is None


async def test_text_messages_take_rate_tokens_too(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with memory_node(tmp_path, rate=0.01, burst=3) as mem, mem.connect() as ws:
        for _ in range(4):
            await ws.send_message("not CBOR")
        codes = [(await next_frame(ws)).code for _ in range(4)]  # type: ignore[attr-defined]
        assert codes == [ErrorCode.BAD_FRAME] * 3 + [ErrorCode.RATE_LIMITED]
