"""protocol/client.py: what the Python client does by itself (token refresh), and how
it takes what a server may send it (against a scripted WebSocket server)."""

import functools
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import cbor2
import pytest
import trio
import trio_websocket
from trio_websocket import ConnectionTimeout

from protocol.client import Disconnected, ServerError, open_client
from protocol.codec import encode
from protocol.errors import CloseCode, ErrorCode
from protocol.frames import Error, Message, Welcome
from protocol.kv import KvReplica
from server.tokens import issue_token
from tests.helpers import SECRET, memory_node, run_server


async def test_the_client_refreshes_its_token_through_the_callback(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Tokens of a minute, for ten minutes: the session lives on, refreshed each time a
    little before the end, and the client holds the newest token."""
    issued: list[str] = []

    async def new_token() -> str:
        issued.append(issue_token(SECRET, "alice", 60))
        return issued[-1]

    async with (
        memory_node(tmp_path, ping_interval=1000.0) as mem,
        mem.client("alice", ttl=60, refresh=new_token) as alice,
    ):
        await trio.sleep(600)
        assert await alice.ping() >= 0
        assert alice.close_code is None
        assert 10 <= len(issued) <= 13  # one every 48 s (a fifth of 60 s before the end)
        assert alice.token == issued[-1]


async def test_without_a_callback_the_session_ends_with_its_token(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with (
        memory_node(tmp_path, ping_interval=1000.0) as mem,
        mem.client("alice", ttl=60) as alice,
    ):
        await trio.sleep(120)
        assert alice.close_code == CloseCode.TOKEN_EXPIRED


async def test_a_failing_callback_is_tried_again(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise OSError("token service unreachable")
        return issue_token(SECRET, "alice", 3600)

    async with (
        memory_node(tmp_path, ping_interval=1000.0) as mem,
        mem.client("alice", ttl=60, refresh=flaky) as alice,
    ):
        await trio.sleep(300)
        assert (calls, alice.close_code) == (3, None)


Script = Callable[[trio_websocket.WebSocketConnection], Awaitable[None]]


@asynccontextmanager
async def scripted_server(
    script: Script, context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """A WebSocket server on a free port whose connections run ``script``, behind TLS
    with ``context``; its URL."""

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        await script(await request.accept())

    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            trio_websocket.serve_websocket, handler, "127.0.0.1", 0, ssl_context=context
        )
        server = await nursery.start(serve)
        yield f"{'ws' if context is None else 'wss'}://127.0.0.1:{server.port}/ws"
        nursery.cancel_scope.cancel()


WELCOME = encode(Welcome(session="s1", user="alice", v=1, ping=25_000, ts=0, limits={}))
UNKNOWN = cbor2.dumps({0: 250, 1: 7})  # a frame type from a newer server


async def test_frames_of_unknown_types_are_ignored_before_and_after_the_welcome() -> None:
    """PROTOCOL.md: a client ignores frame types it does not know (forward compatible)."""

    async def script(ws: trio_websocket.WebSocketConnection) -> None:
        await ws.get_message()  # the hello
        await ws.send_message(UNKNOWN)
        await ws.send_message(WELCOME)
        await ws.send_message(UNKNOWN)
        await ws.send_message(encode(Message(room="r", seq=1, ts=1, cid="c", text="hi")))
        await trio.sleep_forever()

    async with scripted_server(script) as url, open_client(url, "token") as client:
        with trio.fail_after(10):
            got = await client.next_event(Message)
        assert (got.room, got.seq, got.text) == ("r", 1, "hi")
        assert client.welcome is not None and client.welcome.session == "s1"


async def test_an_error_answering_the_hello_is_raised() -> None:
    async def script(ws: trio_websocket.WebSocketConnection) -> None:
        await ws.get_message()
        await ws.send_message(encode(Error(code=ErrorCode.UNAUTHORIZED, msg="bad token")))
        await ws.aclose(CloseCode.UNAUTHORIZED, "bad token")

    async with scripted_server(script) as url:
        with pytest.raises(ServerError) as info, trio.fail_after(10):
            async with open_client(url, "token"):
                pass
    assert info.value.code is ErrorCode.UNAUTHORIZED


async def test_a_close_before_the_welcome_is_a_disconnect() -> None:
    async def script(ws: trio_websocket.WebSocketConnection) -> None:
        await ws.get_message()
        await ws.aclose(CloseCode.GOING_AWAY, "restarting")

    async with scripted_server(script) as url:
        with pytest.raises(Disconnected, match="closed during hello"), trio.fail_after(10):
            async with open_client(url, "token"):
                pass


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with the openssl command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("these tests need the openssl command (Debian: apt install openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@asynccontextmanager
async def tls_server(tmp_path: Path, script: Script) -> AsyncIterator[tuple[str, Path]]:
    """``scripted_server`` behind TLS: its wss:// URL and the certificate to trust."""
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async with scripted_server(script, context) as url:
        yield url, cert


async def _welcome_then_wait(ws: trio_websocket.WebSocketConnection) -> None:
    await ws.get_message()
    await ws.send_message(WELCOME)
    await trio.sleep_forever()


async def test_a_wss_url_speaks_tls_and_checks_the_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with tls_server(tmp_path, _welcome_then_wait) as (url, cert):
        # Not trusted (not in the system's store): the handshake fails.
        with pytest.raises(trio.BrokenResourceError) as refused, trio.fail_after(10):
            async with open_client(url, "token"):
                pass
        assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # read by the default context
        with trio.fail_after(10):
            async with open_client(url, "token") as client:
                assert client.welcome is not None and client.welcome.session == "s1"


@pytest.mark.parametrize("url", ["http://127.0.0.1/ws", "ws:///ws", "127.0.0.1:80"])
async def test_a_url_that_is_not_a_websocket_one_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="not a WebSocket URL"):
        async with open_client(url, "token"):
            pass


async def test_the_query_goes_with_the_request_and_a_silent_server_times_out() -> None:
    """What the client sends, read by a listener of the test's own: the path and the
    query of the URL on the request line. The listener then closes without an answer:
    the client gives up after its connect timeout (it waited for ever before)."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    heads: list[bytes] = []

    async def read_one_request() -> None:
        async with await listener.accept() as stream:
            head = b""
            with trio.fail_after(10):
                while b"\r\n\r\n" not in head:
                    head += await stream.receive_some(4096)
            heads.append(head)  # and close: no answer

    async with listener, trio.open_nursery() as nursery:
        nursery.start_soon(read_one_request)
        url = f"ws://127.0.0.1:{port}/ws?client=ios&v=3"
        with pytest.raises(ConnectionTimeout, match=r"no WebSocket connection to .* in 1 s"):
            async with open_client(url, "token", connect_timeout=1):
                pass
    assert heads and heads[0].startswith(b"GET /ws?client=ios&v=3 HTTP/1.1\r\n"), heads


async def test_a_replica_with_nothing_pending_pushes_nothing(tmp_path: Path) -> None:
    async with run_server(tmp_path) as server:
        async with open_client(server.url, issue_token(SECRET, "alice", 3600)) as alice:
            assert await alice.kv_push(KvReplica("phone")) == []
            assert await alice.ping() >= 0  # nothing was sent that the server refused
