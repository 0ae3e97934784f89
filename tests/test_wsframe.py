"""protocol/wsframe.py against wsproto, the reference implementation."""

from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping

from protocol.wsframe import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    client_frame,
    parse_server_frames,
    server_frame,
)

SIZES = st.sampled_from([0, 1, 125, 126, 127, 65535, 65536, 70000])


@settings(max_examples=40, deadline=None)
@given(SIZES, st.binary(max_size=16))
def test_server_frames_parse_in_wsproto_client(size: int, seed: bytes) -> None:
    payload = (seed or b"x") * (size // max(1, len(seed or b"x")) + 1)
    payload = payload[:size]
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(server_frame(payload))
    received = b""
    for event in client.events():
        assert isinstance(event, BytesMessage)
        received += event.data
    assert received == payload


@settings(max_examples=40, deadline=None)
@given(SIZES)
def test_client_frames_parse_in_wsproto_server(size: int) -> None:
    payload = bytes(range(256)) * (size // 256 + 1)
    payload = payload[:size]
    server = Connection(ConnectionType.SERVER)
    server.receive_data(client_frame(payload))
    assert b"".join(e.data for e in server.events() if isinstance(e, BytesMessage)) == payload


def test_control_frames() -> None:
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(server_frame(b"hi", OP_PING) + server_frame(b"\x0f\xa5bye", OP_CLOSE))
    ping, close = list(client.events())
    assert isinstance(ping, Ping) and ping.payload == b"hi"
    assert isinstance(close, CloseConnection) and (close.code, close.reason) == (4005, "bye")


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([OP_BINARY, OP_PING]), st.binary(max_size=300)), max_size=6),
    st.integers(1, 50),
)
def test_parse_server_frames_reassembles_any_split(
    frames: list[tuple[int, bytes]], chunk: int
) -> None:
    wire = b"".join(server_frame(p, op) for op, p in frames)
    buffer = bytearray()
    parsed: list[tuple[int, bytes]] = []
    for i in range(0, len(wire), chunk):
        buffer += wire[i : i + chunk]
        got, used = parse_server_frames(buffer)
        del buffer[:used]
        parsed.extend(got)
    assert parsed == frames and not buffer


def test_a_split_inside_a_long_header_waits_for_the_rest() -> None:
    """Frames of a 16-bit and of a 64-bit length, cut at every byte of their headers:
    nothing is parsed until the frame is whole."""
    for size, head in ((300, 4), (70000, 10)):
        wire = server_frame(b"y" * size)
        for cut in range(1, head + 1):
            assert parse_server_frames(wire[:cut]) == ([], 0)
        assert parse_server_frames(wire[:-1]) == ([], 0)
        assert parse_server_frames(wire + wire[:cut]) == ([(OP_BINARY, b"y" * size)], len(wire))
