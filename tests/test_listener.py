"""server/listener.py over real sockets: connection limits and running out of descriptors."""

import os
import re
import socket
import struct
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket

from server.listener import ACCEPT_RETRY, ACCEPT_RETRY_MAX, accept_backoff
from tests.helpers import RunningServer, run_server, server_process

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def connect_from(address: tuple[str, int], source: str = "127.0.0.1") -> trio.SocketStream:
    """A TCP connection from ``source``, any address of the loopback range."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(address)
    return trio.SocketStream(sock)


async def upgraded(address: tuple[str, int], source: str = "127.0.0.1") -> trio.SocketStream:
    stream = await connect_from(address, source)
    await stream.send_all(UPGRADE)
    with trio.fail_after(10):
        assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 101 ")
    return stream


async def answer(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it hangs up."""
    data = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            data += chunk
    await stream.aclose()
    return data


def refused(server: RunningServer, reason: str) -> float | None:
    return server.node.services.metrics.registry.get_sample_value(
        "parley_connections_refused_total", {"reason": reason}
    )


async def settled(server: RunningServer, open_sockets: int) -> None:
    with trio.fail_after(10):
        while server.node.admission.open != open_sockets:  # noqa: ASYNC110 - network events
            await trio.sleep(0.01)


async def test_connections_over_the_limits_get_429_and_503(tmp_path: Path) -> None:
    limits = {"max_connections": 3, "max_connections_per_address": 2}
    async with run_server(tmp_path, **limits) as server:
        address = server.addresses.client
        kept = [await upgraded(address), await connect_from(address)]  # mid-handshake counts
        await settled(server, 2)
        response = await answer(await connect_from(address))
        assert response.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
        assert b"\r\nretry-after: 10\r\n" in response and b"\r\nconnection: close\r\n" in response
        assert response.endswith(b"\r\n\r\ntoo many connections from your address\n")
        kept.append(await upgraded(address, "127.0.0.2"))  # another address: the third
        await settled(server, 3)
        assert server.node.readiness().status == "Failed"
        response = await answer(await connect_from(address, "127.0.0.3"))
        assert response.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert b"\r\nretry-after: 10\r\n" in response
        # A WebSocket client that sent its request is told too.
        with pytest.raises(trio_websocket.ConnectionRejected) as info:
            async with server.raw():
                pass
        assert info.value.status_code == 503
        assert (refused(server, "per_address"), refused(server, "max_connections")) == (1, 2)
        assert server.node.admission.open == 3  # the refused were never counted
        async with server.http() as http:
            assert (await http.get("/readyz")).status_code == 503
            metrics = (await http.get("/metrics")).text
        assert "parley_client_sockets 3.0" in metrics
        for stream in kept:
            await stream.aclose()
        await settled(server, 0)
        assert server.node.readiness().status == "OK"


async def test_the_per_address_count_follows_every_way_a_connection_ends(tmp_path: Path) -> None:
    async with run_server(tmp_path, max_connections_per_address=4) as server:
        address = server.addresses.client
        reset = struct.pack("ii", 1, 0)  # SO_LINGER 0: close() resets the connection
        for _ in range(10):
            async with server.client("alice"):  # hello done
                upgrade = await upgraded(address)
                partial = await connect_from(address)
                await partial.send_all(UPGRADE[:20])
                rejected = await connect_from(address)
                await settled(server, 4)
                assert (await answer(await connect_from(address))).startswith(b"HTTP/1.1 429 ")
                await rejected.send_all(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await answer(rejected)).startswith(b"HTTP/1.1 404 ")
                upgrade.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
                await upgrade.aclose()
                await partial.aclose()
            await settled(server, 0)
            assert server.node.admission.by_address == {}
        assert refused(server, "per_address") == 10


def test_accept_backs_off_exponentially_to_a_second() -> None:
    pauses = [accept_backoff(0.0)]
    while len(pauses) < 7:
        pauses.append(accept_backoff(pauses[-1]))
    assert pauses == [ACCEPT_RETRY, 0.2, 0.4, 0.8, ACCEPT_RETRY_MAX, 1.0, 1.0]


@pytest.mark.slow
async def test_out_of_descriptors_accept_backs_off_and_logs_once(tmp_path: Path) -> None:
    """A server with 64 open files at most: fill them with connections, then two more
    wait in the listen queue while accept fails with EMFILE."""
    extra = ("--hello-timeout", "600", "--storage-probe-interval", "0")
    async with server_process(tmp_path, *extra) as server:
        server.nofile = 64
        await server.start()
        assert server.proc is not None
        fds = Path(f"/proc/{server.proc.pid}/fd")
        address = ("127.0.0.1", server.port)
        kept = []
        with trio.fail_after(30):
            while len(os.listdir(fds)) < 64:
                kept.append(await upgraded(address))
        assert len(kept) > 20
        waiting = [await connect_from(address) for _ in range(2)]  # in the listen queue
        for stream in waiting:
            await stream.send_all(UPGRADE)
        with trio.fail_after(30):
            while "accept failed: EMFILE" not in server.log():  # noqa: ASYNC110 - its log
                await trio.sleep(0.05)
        await trio.sleep(3)  # some more attempts fail meanwhile
        for stream in kept[:4]:
            await stream.aclose()
        for stream in waiting:  # accepted as soon as descriptors are free
            with trio.fail_after(10):
                assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 101 ")
        with trio.fail_after(10):
            while "accept recovered" not in server.log():  # noqa: ASYNC110 - its log
                await trio.sleep(0.05)
        log = server.log()
        assert log.count("accept failed") == 1, log
        recovered = re.search(r"accept recovered after (\d+) failed attempts", log)
        assert recovered is not None and int(recovered[1]) >= 2
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"http://127.0.0.1:{server.ops_port}/metrics")).text
        assert f'parley_accept_errors_total{{errno="EMFILE"}} {recovered[1]}.0' in metrics
        for stream in kept[4:] + waiting:
            await stream.aclose()
