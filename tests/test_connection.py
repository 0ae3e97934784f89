"""server/connection.py over real sockets: handshake, bad input, limits, slow consumers."""

import socket
import struct
from pathlib import Path

import cbor2
import pytest
import trio
import trio.testing
import trio_websocket
from trio_websocket import ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.events import BytesMessage, CloseConnection, Request
from wsproto.events import Message as WsMessage
from wsproto.events import Ping as WsPing
from wsproto.events import Pong as WsPong

from loadtests.rawclient import RawClient
from protocol.codec import encode
from protocol.errors import CloseCode, ErrorCode
from protocol.frames import Error, Hello, Join, Message, Ping, Pong, Send, Welcome
from protocol.wsframe import client_frame, parse_server_frames
from server.listener import TASK_NAME
from tests.helpers import RunningServer, next_frame, run_server


async def http_get(server: RunningServer, request: bytes) -> bytes:
    """The response head (and whatever came with it)."""
    host, port = server.addresses.client
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(request)
    response = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in response and (chunk := await stream.receive_some(65536)):
            response += chunk
    await stream.aclose()
    return response


UPGRADE = (
    b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def test_other_paths_get_404(server: RunningServer) -> None:
    response = await http_get(server, UPGRADE % b"/elsewhere")
    assert response.startswith(b"HTTP/1.1 404 ") and b"connect to /ws" in response
    accepted = await http_get(server, UPGRADE % b"/ws?client=ios")
    assert accepted.startswith(b"HTTP/1.1 101 ")


async def test_a_malformed_request_target_gets_400_and_the_node_lives(
    server: RunningServer,
) -> None:
    response = await http_get(server, UPGRADE % b"//[x")
    assert response.startswith(b"HTTP/1.1 400 ")
    async with server.client("alice") as alice:  # still serving
        assert await alice.ping() >= 0


async def http_answer(
    server: RunningServer, request: bytes
) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """Status line, headers and body of the answer, read until the server hangs up."""
    host, port = server.addresses.client
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(request)
    response = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            response += chunk
    await stream.aclose()
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
    assert int(headers[b"content-length"]) == len(body) or request.startswith(b"HEAD ")
    return status, headers, body


async def test_plain_http_to_ws_gets_426_and_other_methods_405(server: RunningServer) -> None:
    status, headers, body = await http_answer(server, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == b"HTTP/1.1 426 Upgrade Required"
    assert headers[b"upgrade"] == b"websocket"
    assert headers[b"connection"] == b"upgrade, close"
    status, headers, _ = await http_answer(server, b"POST /ws HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == b"HTTP/1.1 405 Method Not Allowed" and headers[b"allow"] == b"GET"
    status, headers, body = await http_answer(server, b"HEAD /ws HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 405 ") and int(headers[b"content-length"]) > 0
    assert body == b""  # never a body in the answer to HEAD
    # A broken upgrade is a bad request; the wrong version is told which one we speak.
    no_key = UPGRADE.replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b"")
    status, _, _ = await http_answer(server, no_key % b"/ws")
    assert status == b"HTTP/1.1 400 Bad Request"
    status, headers, _ = await http_answer(server, UPGRADE.replace(b": 13", b": 8") % b"/ws")
    assert status.startswith(b"HTTP/1.1 400 ") and headers[b"sec-websocket-version"] == b"13"


async def test_any_other_path_gets_404_whatever_the_request(server: RunningServer) -> None:
    for request in (
        b"GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nAccept: text/html\r\n\r\n",
        b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
        b"GET /wss HTTP/1.1\r\nHost: x\r\n\r\n",
        UPGRADE % b"/ws/",
    ):
        status, headers, body = await http_answer(server, request)
        assert status == b"HTTP/1.1 404 Not Found", request
        assert headers[b"connection"] == b"close" and body == b"not found: connect to /ws\n"
    status, _, body = await http_answer(server, b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 404 ") and body == b""


async def test_an_oversize_request_head_gets_431_even_when_complete(server: RunningServer) -> None:
    big = UPGRADE.replace(b"Host: x\r\n", b"Host: x\r\nX-Big: " + b"a" * 60_000 + b"\r\n")
    status, _, body = await http_answer(server, big % b"/ws")
    assert status == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert body == b"request head too large\n"


async def test_the_subprotocol_is_accepted_when_offered(server: RunningServer) -> None:
    async with server.raw() as ws:  # offers parley.v1
        assert ws.subprotocol == "parley.v1"


async def hello(ws: trio_websocket.WebSocketConnection, server: RunningServer) -> None:
    await ws.send_message(encode(Hello(v=1, token=server.token("alice"))))
    assert isinstance(await next_frame(ws), Welcome)


async def close_code(ws: trio_websocket.WebSocketConnection) -> int:
    with pytest.raises(ConnectionClosed) as info, trio.fail_after(10):
        while True:
            await ws.get_message()
    assert info.value.reason is not None
    return info.value.reason.code


async def test_bad_frames_get_errors_and_the_session_survives(server: RunningServer) -> None:
    async with server.raw() as ws:
        await hello(ws, server)
        cases = [
            (b"\xff\xff", ErrorCode.BAD_FRAME, None),
            (cbor2.dumps({0: 99, 1: 7}), ErrorCode.UNKNOWN_TYPE, 7),
            (cbor2.dumps({0: 15, 1: 8, 2: "r"}), ErrorCode.INVALID, 8),
            (cbor2.dumps({0: 15, 1: 9, 2: "r", 6: "c", 7: "x" * 5000}), ErrorCode.TOO_LARGE, 9),
            (encode(Hello(v=1, token="again")), ErrorCode.ALREADY_AUTHENTICATED, None),
        ]
        for payload, code, request_id in cases:
            await ws.send_message(payload)
            error = await next_frame(ws)
            assert isinstance(error, Error) and (error.code, error.id) == (code, request_id)
        await ws.send_message("text is not the protocol")
        error = await next_frame(ws)
        assert isinstance(error, Error) and error.code == ErrorCode.BAD_FRAME
        await ws.send_message(encode(Ping(id=77)))
        assert await next_frame(ws) == Pong(id=77)


async def test_bad_token_closes_4001(server: RunningServer) -> None:
    for token in ("not-a-jwt", server.token("alice", ttl=-3600)):
        async with server.raw() as ws:
            await ws.send_message(encode(Hello(v=1, token=token)))
            error = await next_frame(ws)
            assert isinstance(error, Error) and error.code == ErrorCode.UNAUTHORIZED
            assert await close_code(ws) == CloseCode.UNAUTHORIZED


async def test_unknown_version_closes_4002(server: RunningServer) -> None:
    async with server.raw() as ws:
        await ws.send_message(encode(Hello(v=2, token=server.token("alice"))))
        error = await next_frame(ws)
        assert isinstance(error, Error) and error.code == ErrorCode.UNSUPPORTED_VERSION
        assert await close_code(ws) == CloseCode.UNSUPPORTED_VERSION


async def test_oversize_frame_closes_1009_cleanly(tmp_path: Path) -> None:
    async with run_server(tmp_path, max_frame_bytes=1000) as server, server.raw() as ws:
        await hello(ws, server)
        await ws.send_message(encode(Send(id=1, room="r", cid="c", text="x" * 2000)))
        assert await close_code(ws) == CloseCode.MESSAGE_TOO_BIG


async def test_fragmented_messages_are_reassembled(server: RunningServer) -> None:
    stream, ws = await raw_upgrade(server)
    payload = encode(Hello(v=1, token=server.token("alice")))
    first, rest = payload[:10], payload[10:]
    await stream.send_all(ws.send(WsMessage(data=first, message_finished=False)))
    await stream.send_all(ws.send(WsMessage(data=rest, message_finished=True)))
    events: list[object] = []
    with trio.fail_after(10):
        while not any(isinstance(e, BytesMessage) for e in events):
            ws.receive_data(await stream.receive_some(65536))
            events.extend(ws.events())
    message = next(e for e in events if isinstance(e, BytesMessage))
    assert cbor2.loads(message.data)[0] == Welcome.TYPE
    await stream.send_all(ws.send(CloseConnection(code=1000)))
    await stream.aclose()


async def websocket_ping(stream: trio.SocketStream, ws: WSConnection) -> None:
    """Ping and wait for the pong: the server has parsed all we sent before."""
    await stream.send_all(ws.send(WsPing(b"sync")))
    with trio.fail_after(10):
        while True:
            ws.receive_data(await stream.receive_some(65536))
            if any(isinstance(e, WsPong) for e in ws.events()):
                return


async def test_many_tiny_fragments_close_1009_and_hold_no_memory(server: RunningServer) -> None:
    for piece in (b"x", b""):
        stream, ws = await raw_upgrade(server)
        hello = encode(Hello(v=1, token=server.token("alice")))
        await stream.send_all(ws.send(WsMessage(data=hello, message_finished=True)))
        fragments = [ws.send(WsMessage(data=piece, message_finished=False)) for _ in range(5000)]
        await stream.send_all(b"".join(fragments[:200]))
        await websocket_ping(stream, ws)
        (conn,) = server.node.connections
        assert conn.frames.buffered < 1000  # 200 pieces, a few bytes each
        await stream.send_all(b"".join(fragments[200:]))
        answer = await server_close(stream, ws)
        assert (answer.code, answer.reason) == (CloseCode.MESSAGE_TOO_BIG, "over 256 fragments")
        assert conn.frames.buffered < 1000
        await stream.aclose()
        with trio.fail_after(10):
            while server.node.connections:  # noqa: ASYNC110 - the close is a network event
                await trio.sleep(0.01)


async def test_websocket_pings_are_answered(server: RunningServer) -> None:
    async with server.raw() as ws:
        await hello(ws, server)
        with trio.fail_after(10):
            await ws.ping(b"are you there")


async def test_websocket_pings_take_rate_tokens(tmp_path: Path) -> None:
    """A flood of WebSocket pings gets as many pongs as the rate allows, no more."""
    async with run_server(tmp_path, rate=0.01, burst=5) as server:
        stream, ws = await raw_upgrade(server)
        async with stream:
            await stream.send_all(b"".join(ws.send(WsPing(b"%d" % i)) for i in range(20)))
            await stream.send_all(ws.send(CloseConnection(code=1000)))
            pongs = []
            with trio.fail_after(10):
                while data := await stream.receive_some(65536):
                    ws.receive_data(data)
                    pongs += [e.payload for e in ws.events() if isinstance(e, WsPong)]
        assert pongs == [b"0", b"1", b"2", b"3", b"4"]


async def test_a_slow_consumer_is_closed_and_does_not_slow_the_room(tmp_path: Path) -> None:
    async with run_server(
        tmp_path,
        outbox_bytes=64 * 1024,
        max_text_chars=40_000,
        max_frame_bytes=65536,
        rate=10_000.0,
        burst=10_000,
    ) as server:
        host, port = server.addresses.client
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window
        await sock.connect((host, port))
        slow = await RawClient.start(trio.SocketStream(sock), "x", server.token("slow"))
        async with (
            server.client("fast") as fast,
            server.client("talker") as talker,
            slow.stream,
        ):
            await talker.create("r")
            await fast.join("r")
            await slow.send(Join(id=1, room="r"))
            text = "x" * 30_000
            count = 400  # 12 MB: more than the kernel will buffer for the slow reader

            async def publish() -> None:
                for i in range(count):
                    await talker.send("r", text, cid=f"m{i}")

            def closes() -> float | None:
                return server.node.services.metrics.registry.get_sample_value(
                    "parley_session_closes_total", {"code": str(int(CloseCode.SLOW_CONSUMER))}
                )

            async def read_once_closed() -> None:
                # The slow reader starts reading once its session is closed, and finds
                # its connection ended, not stuck, and why: the close frame comes as
                # soon as the frame the socket had begun is complete (the server gives
                # it CLOSE_TIMEOUT for that, so it reads at once).
                with trio.fail_after(60):
                    while not closes():  # noqa: ASYNC110 - a counter, no event for it
                        await trio.sleep(0.01)
                with trio.fail_after(20), pytest.raises(EOFError):
                    while True:
                        await slow.receive()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(publish)
                nursery.start_soon(read_once_closed)
                with trio.fail_after(60):
                    got = [await fast.next_event(Message) for _ in range(count)]
            assert [m.seq for m in got] == list(range(1, count + 1))
            assert closes() == 1.0
            assert slow.close_code == CloseCode.SLOW_CONSUMER
        assert len(server.node.connections) <= 2


async def raw_upgrade(server: RunningServer) -> tuple[trio.SocketStream, WSConnection]:
    host, port = server.addresses.client
    stream = await trio.open_tcp_stream(host, port)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="x", target="/ws")))
    ws.receive_data(await stream.receive_some(65536))
    list(ws.events())
    return stream, ws


async def server_close(stream: trio.SocketStream, ws: WSConnection) -> CloseConnection:
    """The server's close frame; then it ends the connection."""
    with trio.fail_after(10):
        while True:
            data = await stream.receive_some(65536)
            assert data, "ended without a close frame"
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, CloseConnection):
                    return event


async def test_a_client_close_is_answered_with_its_code(server: RunningServer) -> None:
    stream, ws = await raw_upgrade(server)
    await stream.send_all(ws.send(CloseConnection(code=4000, reason="bye")))
    answer = await server_close(stream, ws)
    assert (answer.code, answer.reason) == (4000, "bye")
    with trio.fail_after(10):
        assert await stream.receive_some(65536) == b""  # and the server hangs up
    await stream.aclose()


async def test_a_protocol_violation_closes_1002(server: RunningServer) -> None:
    stream, ws = await raw_upgrade(server)
    await stream.send_all(b"\x82\x02hi")  # an unmasked client frame
    answer = await server_close(stream, ws)
    assert answer.code == CloseCode.PROTOCOL_ERROR
    await stream.send_all(ws.send(CloseConnection(code=1000)))
    with trio.fail_after(10):
        assert await stream.receive_some(65536) == b""
    await stream.aclose()


async def test_a_hello_sent_with_the_upgrade_request_is_answered(server: RunningServer) -> None:
    """Bytes right behind the request are frames already (wsproto used to drop them)."""
    host, port = server.addresses.client
    stream = await trio.open_tcp_stream(host, port)
    hello = client_frame(encode(Hello(v=1, token=server.token("alice"))))
    await stream.send_all(UPGRADE % b"/ws" + hello)
    received = b""
    with trio.fail_after(10):
        while True:
            received += await stream.receive_some(65536)
            head, _, rest = received.partition(b"\r\n\r\n")
            frames, _used = parse_server_frames(rest)
            if frames:
                break
    assert head.startswith(b"HTTP/1.1 101 ")
    assert cbor2.loads(frames[0][1])[0] == Welcome.TYPE
    await stream.aclose()


def _awaiting(task: trio.lowlevel.Task) -> list[str]:
    """The names of the coroutines ``task`` is suspended in, outermost first."""
    names = []
    coro: object = task.coro
    while coro is not None and hasattr(coro, "cr_code"):
        names.append(coro.cr_code.co_name)
        coro = coro.cr_await  # type: ignore[attr-defined]
    return names


async def test_an_idle_connection_waits_in_one_short_chain(server: RunningServer) -> None:
    """An idle session's memory is mostly its reader's waiting chain (ARCHITECTURE.md,
    "An idle session"): the connection task waits in wait_readable straight from
    Connection.run, under a name trio did not format for it."""
    async with server.raw() as ws:
        await hello(ws, server)
        await trio.testing.wait_all_tasks_blocked()
        tasks = [t for t in _all_tasks() if t.name == TASK_NAME]
        assert len(tasks) == 1
        assert _awaiting(tasks[0])[:3] == ["serve_connection", "run", "wait_readable"]


def _all_tasks() -> list[trio.lowlevel.Task]:
    found, todo = [], [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if task is not None:
            found.append(task)
            todo.extend(t for n in task.child_nurseries for t in n.child_tasks)
    return found


async def test_a_client_that_ends_its_stream_without_a_close_frame_is_gone(
    server: RunningServer,
) -> None:
    """A FIN with no close frame: the connection ends, its session is detached and its
    socket no longer counts against the connection limits."""
    host, port = server.addresses.client
    stream = await trio.open_tcp_stream(host, port)
    client = await RawClient.start(stream, "x", server.token("alice"))
    assert len(server.node.connections) == 1
    await stream.send_eof()
    with trio.fail_after(10):
        while server.node.connections or server.node.admission.open:  # noqa: ASYNC110 - network events
            await trio.sleep(0.01)
    assert server.node.admission.by_address == {}
    await client.aclose()


async def test_a_client_reset_ends_its_connection(server: RunningServer) -> None:
    host, port = server.addresses.client
    sock = trio.socket.socket()
    await sock.connect((host, port))
    client = await RawClient.start(trio.SocketStream(sock), "x", server.token("alice"))
    assert len(server.node.connections) == 1
    # SO_LINGER 0: close() sends a reset, which the server's read gets as ECONNRESET.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.aclose()
    with trio.fail_after(10):
        while server.node.connections:  # noqa: ASYNC110 - the reset is a network event
            await trio.sleep(0.01)
