"""Which WebSocket transport the Locust users should use: the load generator's CPU per
round trip under gevent, websocket-client against wsproto over a gevent socket.

    .venv/bin/python -m loadtests.locust_transport [--round-trips 20000] [--server-cpu 0]

Starts its own server (SQLite in a temporary folder, no rate limit), says hello on one
connection at a time per transport, on ``--sessions`` connections at once (a greenlet
each, as Locust users are), then times ``ping`` → ``pong`` round trips: this process's
CPU time (user + system) per round trip, which bounds how many requests a Locust worker
can make. The server's own time is not in the figure.
"""

from gevent import monkey

monkey.patch_all()  # before anything imports socket: what Locust does

import argparse  # noqa: E402
import functools  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import gevent  # noqa: E402
import websocket  # noqa: E402
import wsproto  # noqa: E402
from wsproto.events import AcceptConnection, BytesMessage, Request  # noqa: E402

from loadtests.cli import free_port, start_server  # noqa: E402
from protocol.codec import decode_server, encode  # noqa: E402
from protocol.frames import PROTOCOL_VERSION, Hello, Ping, Pong, Welcome  # noqa: E402
from server.tokens import issue_token  # noqa: E402

RoundTrip = Callable[[bytes], bytes]


def websocket_client(url: str) -> RoundTrip:
    ws = websocket.create_connection(url, enable_multithread=True, skip_utf8_validation=True)

    def round_trip(payload: bytes) -> bytes:
        ws.send_bytes(payload)
        _, data = ws.recv_data()
        return bytes(data)

    return round_trip


def wsproto_socket(host: str, port: int) -> RoundTrip:
    sock = socket.create_connection((host, port))
    conn = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    sock.sendall(conn.send(Request(host=f"{host}:{port}", target="/ws")))
    events: list[object] = []

    def receive() -> object:
        while not events:
            conn.receive_data(sock.recv(65536))
            events.extend(conn.events())
        return events.pop(0)

    if not isinstance(receive(), AcceptConnection):
        raise RuntimeError("the server refused the WebSocket upgrade")

    def round_trip(payload: bytes) -> bytes:
        sock.sendall(conn.send(BytesMessage(data=payload)))
        event = receive()
        assert isinstance(event, BytesMessage)
        return bytes(event.data)

    return round_trip


def measure(
    make: Callable[[], RoundTrip], token: Callable[..., str], count: int, sessions: int
) -> float:
    """CPU µs of this process per round trip, ``sessions`` connections at once (a busy
    load generator: a lone connection would measure this machine's wake-ups instead)."""
    trips = []
    for i in range(sessions):
        round_trip = make()
        hello = Hello(v=PROTOCOL_VERSION, token=token(user=f"bench{i}"))
        welcome = decode_server(round_trip(encode(hello)))
        assert isinstance(welcome, Welcome), welcome
        trips.append(round_trip)
    frames = [encode(Ping(id=i + 1)) for i in range(count // sessions)]

    def drive(round_trip: RoundTrip) -> None:
        for frame in frames:
            pong = decode_server(round_trip(frame))
            assert type(pong) is Pong

    cpu = time.process_time()
    gevent.joinall([gevent.spawn(drive, trip) for trip in trips], raise_error=True)
    return (time.process_time() - cpu) / (len(frames) * sessions) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-trips", type=int, default=20_000)
    parser.add_argument("--server-cpu", type=int, default=None, help="pin the server here")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=50, help="connections at once")
    args = parser.parse_args()
    port, secret = free_port(), "locust-transport-bench-secret-0123456789"
    with (
        tempfile.TemporaryDirectory(prefix="parley-bench-") as tmp,
        start_server(port, secret, f"sqlite:///{tmp}/bench.db", args.server_cpu),
    ):
        token = functools.partial(issue_token, secret, ttl=3600)
        url = f"ws://127.0.0.1:{port}/ws"
        transports: list[tuple[str, Callable[[], RoundTrip]]] = [
            ("websocket-client", functools.partial(websocket_client, url)),
            ("wsproto + gevent socket", functools.partial(wsproto_socket, "127.0.0.1", port)),
        ]
        for run in range(args.runs):
            for name, make in transports:
                cpu = measure(make, token, args.round_trips, args.sessions)
                print(f"run {run + 1}: {name:24} {cpu:5.1f} µs of CPU per round trip")


if __name__ == "__main__":
    main()
