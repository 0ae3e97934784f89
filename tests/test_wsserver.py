"""protocol/wsserver.py against wsproto, the reference: the same verdict on any client
byte stream, however it is split into reads."""

import itertools
import struct
import sys
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from protocol import wsserver
from protocol.errors import CloseCode
from protocol.wsframe import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT

KEY = b"\x37\xfa\x21\x3d"
BIG = 1 << 30


def raw(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    width: int = 0,
) -> bytes:
    """A client frame with any header, valid or not; ``width`` forces a 16 or 64-bit
    length."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    mask_bit = 0x80 if masked else 0
    if width == 64 or n > 65535:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    elif width == 16 or n > 125:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | n])
    if not masked:
        return head + payload
    return head + KEY + bytes(b ^ KEY[i % 4] for i, b in enumerate(payload))


def split(wire: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    return [wire[a:b] for a, b in itertools.pairwise(points) if b > a] or [b""]


def reference(chunks: list[bytes]) -> list[tuple[object, ...]]:
    """What wsproto makes of the stream, as whole messages."""
    conn = Connection(ConnectionType.SERVER)
    out: list[tuple[object, ...]] = []
    parts: list[bytes] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        for event in conn.events():
            if isinstance(event, BytesMessage | TextMessage):
                data = event.data
                parts.append(data.encode() if isinstance(data, str) else bytes(data))
                if event.message_finished:
                    out.append(("message", b"".join(parts), isinstance(event, TextMessage)))
                    parts = []
            elif isinstance(event, Ping):
                out.append(("ping", bytes(event.payload)))
            elif isinstance(event, Pong):
                out.append(("pong", bytes(event.payload)))
            elif isinstance(event, CloseConnection):
                if conn.state is ConnectionState.REMOTE_CLOSING:
                    out.append(("close", int(event.code), event.reason))
                else:
                    out.append(("failed", int(event.code)))
                return out
    return out


def ours(chunks: list[bytes], limit: int = BIG) -> list[tuple[object, ...]]:
    frames = wsserver.ClientFrames(limit)
    out: list[tuple[object, ...]] = []
    for chunk in chunks:
        for event in frames.feed(chunk):
            if isinstance(event, wsserver.Message):
                out.append(("message", event.data, event.text))
            elif isinstance(event, wsserver.Ping):
                out.append(("ping", event.payload))
            elif isinstance(event, wsserver.Pong):
                out.append(("pong", event.payload))
            elif isinstance(event, wsserver.Close):
                out.append(("close", event.code, event.reason))
                return out
            elif isinstance(event, wsserver.Failed):
                out.append(("failed", int(event.code)))
                return out
            else:
                out.append(("toobig",))
    return out


frame_specs = st.tuples(
    st.sampled_from([0x0, OP_TEXT, OP_BINARY, 0x3, OP_CLOSE, OP_PING, OP_PONG, 0xB]),
    st.one_of(
        st.binary(max_size=140),
        st.text(max_size=40).map(str.encode),
        st.sampled_from([b"", b"\x03\xe8", b"\x03\xe8bye", b"\x0f\xa5", b"\x03\xed", b"\x01"]),
        st.integers(0, 70000).map(lambda n: b"z" * n),
    ),
    st.booleans(),  # fin
    st.sampled_from([0, 0, 0, 0, 1, 4]),  # rsv
    st.sampled_from([True] * 15 + [False]),  # masked
    st.sampled_from([0] * 8 + [16, 64]),  # forced length width
)


@settings(max_examples=400, deadline=None)
@given(st.lists(frame_specs, max_size=6), st.lists(st.integers(0, 200_000), max_size=8))
def test_same_verdict_as_wsproto_on_any_stream(
    specs: list[tuple[int, bytes, bool, int, bool, int]], cuts: list[int]
) -> None:
    wire = b"".join(
        raw(op, payload, fin=fin, rsv=rsv, masked=masked, width=width)
        for op, payload, fin, rsv, masked, width in specs
    )
    chunks = split(wire, cuts)
    assert ours(chunks) == reference(chunks)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), min_size=2, max_size=5), st.lists(st.integers(0, 500)))
def test_fragmented_text_with_a_ping_between(pieces: list[str], cuts: list[int]) -> None:
    data = [p.encode() for p in pieces]
    frames = [
        raw(OP_TEXT if i == 0 else 0x0, d, fin=i == len(data) - 1) for i, d in enumerate(data)
    ]
    frames.insert(1, raw(OP_PING, b"between"))
    chunks = split(b"".join(frames), cuts)
    assert ours(chunks) == reference(chunks)
    assert ours(chunks)[-1] == ("message", b"".join(data), True)


def test_invalid_utf8_text_fails_1007() -> None:
    for wire in (raw(OP_TEXT, b"\xff\xfe"), raw(OP_CLOSE, b"\x03\xe8\xff")):
        assert ours([wire]) == reference([wire]) == [("failed", CloseCode.INVALID_DATA)]


def test_a_text_messages_utf8_checker_lives_only_while_it_is_read() -> None:
    """An idle connection holds no decoder (88 B each): one is made as a text message
    begins and dropped as it ends, whole or skipped for its size."""
    frames = wsserver.ClientFrames(100)
    checker = lambda: frames._utf8  # noqa: E731 - read anew each time, not narrowed
    assert checker() is None
    assert frames.feed(raw(OP_TEXT, "h\u00e9".encode()[:2], fin=False)) == []
    assert checker() is not None
    assert frames.feed(raw(0x0, "h\u00e9".encode()[2:])) == [wsserver.Message("hé".encode(), True)]
    assert checker() is None
    events = frames.feed(raw(OP_TEXT, b"a" * 60, fin=False) + raw(0x0, b"b" * 60))
    assert events == [wsserver.TooBig("over 100 bytes")]
    assert checker() is None


def test_close_codes() -> None:
    for code in (999, 1000, 1004, 1005, 1006, 1012, 1013, 1014, 1015, 1016, 2999, 3000, 4999, 5000):
        wire = raw(OP_CLOSE, struct.pack("!H", code) + b"why")
        assert ours([wire]) == reference([wire]), code


def test_an_oversize_message_is_skipped_as_it_arrives() -> None:
    frames = wsserver.ClientFrames(1000)
    big = raw(OP_BINARY, b"a" * 600, fin=False) + raw(0x0, b"b" * 50_000)
    wire = raw(OP_BINARY, b"ok") + big + raw(OP_PING, b"p") + raw(OP_BINARY, b"next")
    events = []
    for i in range(0, len(wire), 7):  # in small reads
        events.extend(frames.feed(wire[i : i + 7]))
        assert len(frames._buffer) < 700  # the oversize frame is never held
    assert events == [
        wsserver.Message(b"ok"),
        wsserver.TooBig("over 1000 bytes"),
        wsserver.Ping(b"p"),
        wsserver.Message(b"next"),
    ]


def test_a_message_at_the_limit_passes() -> None:
    frames = wsserver.ClientFrames(1000)
    wire = raw(OP_BINARY, b"a" * 400, fin=False) + raw(0x0, b"b" * 600)
    assert frames.feed(wire) == [wsserver.Message(b"a" * 400 + b"b" * 600)]


def test_nothing_is_parsed_after_the_close_frame() -> None:
    frames = wsserver.ClientFrames(BIG)
    wire = raw(OP_CLOSE, b"\x03\xe8") + raw(OP_BINARY, b"late")
    assert frames.feed(wire) == [wsserver.Close(1000, "")]
    assert frames.feed(raw(OP_BINARY, b"later")) == []


def test_close_frames_we_send_parse_in_wsproto() -> None:
    cases = [
        (1000, "", (1000, "")),
        (4005, "slow consumer", (4005, "slow consumer")),
        (wsserver.NO_STATUS, "", (1005, "")),  # an empty close answers an empty close
        (1002, "é" * 100, (1002, "é" * 61)),  # cut to 125 bytes at a character boundary
    ]
    for code, reason, expected in cases:
        client = Connection(ConnectionType.CLIENT)
        client.receive_data(wsserver.close_frame(code, reason))
        (event,) = list(client.events())
        assert isinstance(event, CloseConnection)
        assert (event.code, event.reason) == expected


# --- the handshake ----------------------------------------------------------------------

UPGRADE_HEADERS = [
    b"Host: x",
    b"Upgrade: websocket",
    b"Connection: Upgrade",
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    b"Sec-WebSocket-Version: 13",
]


def request(
    *, line: bytes = b"GET /ws HTTP/1.1", drop: str = "", add: Sequence[bytes] = ()
) -> bytes:
    headers = [h for h in UPGRADE_HEADERS if not (drop and h.lower().startswith(drop.encode()))]
    return b"\r\n".join([line, *headers, *add]) + b"\r\n\r\n"


def wsproto_verdict(data: bytes) -> tuple[object, ...]:
    from wsproto import WSConnection
    from wsproto.events import Request
    from wsproto.utilities import RemoteProtocolError

    ws = WSConnection(ConnectionType.SERVER)
    try:
        ws.receive_data(data)
        events = list(ws.events())
    except RemoteProtocolError as exc:
        return ("refused", str(exc))
    for event in events:
        if isinstance(event, Request):
            return ("upgrade", event.target, tuple(event.subprotocols))
    return ("incomplete",)


def our_verdict(data: bytes) -> tuple[object, ...]:
    try:
        upgrade = wsserver.parse_upgrade(data)
    except wsserver.HandshakeError as exc:
        return ("refused", str(exc))
    if upgrade is None:
        return ("incomplete",)
    return ("upgrade", upgrade.target, upgrade.subprotocols)


def test_the_handshake_verdicts_match_wsproto() -> None:
    cases = [
        request(),
        request(line=b"GET /ws?client=ios HTTP/1.1"),
        request(add=[b"Sec-WebSocket-Protocol: parley.v1, other", b"Sec-WebSocket-Protocol: x"]),
        request(add=[b"X-Anything:   spaced   "]),
        request(drop="connection"),
        request(drop="connection", add=[b"Connection: keep-alive, Upgrade"]),
        request(drop="connection", add=[b"Connection: keep-alive"]),
        request(drop="sec-websocket-version"),
        request(drop="sec-websocket-version", add=[b"Sec-WebSocket-Version: 12"]),
        request(drop="sec-websocket-key"),
        request(drop="upgrade", add=[b"Upgrade: h2c"]),
        request(drop="host"),
        request(line=b"POST /ws HTTP/1.1"),
        request(line=b"GET /ws"),
        request(add=[b"no colon here"]),
        request(add=[b"Bad Name: x"]),
        request(add=[b"X-Bad: a\x00b"]),
        request(line=b"GET /w\x7fs HTTP/1.1"),
        request(add=[b"Content-Length: 0"]),
        b"GET /ws HTTP/1.1\r\nHost: x\r\n",  # incomplete
        b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n",  # plain HTTP
    ]
    for data in cases:
        assert our_verdict(data) == wsproto_verdict(data), data


def test_where_the_handshake_is_stricter_than_wsproto() -> None:
    """A control character in a header value (h11 lets all but NUL, CR and LF through),
    and a request with a body: an upgrade has none, and bytes after the head are frames."""
    for data in (
        request(add=[b"X-Bad: a\x01b"]),
        request(add=[b"Content-Length: 5"]),
        request(add=[b"Transfer-Encoding: chunked"]),
    ):
        assert wsproto_verdict(data)[0] == "upgrade"
        assert our_verdict(data) == ("refused", "Bad HTTP message"), data


def test_bytes_after_the_request_are_kept_and_an_overlong_head_refused() -> None:
    frame = raw(OP_BINARY, b"hello")
    upgrade = wsserver.parse_upgrade(request() + frame)
    assert upgrade is not None and upgrade.rest == frame
    incomplete = b"GET /ws HTTP/1.1\r\n" + b"X: y\r\n" * 5000
    for data in (incomplete, incomplete + b"\r\n", request(add=[b"X: " + b"y" * 60_000])):
        with pytest.raises(wsserver.HandshakeError) as info:
            wsserver.parse_upgrade(data)
        assert info.value.status == 431


def test_the_head_limit_counts_the_whole_head_and_only_it() -> None:
    filler = b"X: " + b"y" * 100
    head = request(add=[filler])
    pad = wsserver.MAX_HEAD - len(head)
    at_limit = request(add=[filler + b"y" * pad])
    assert len(at_limit) == wsserver.MAX_HEAD
    frames = raw(OP_BINARY, b"z" * 50_000)  # frames behind the head do not count
    assert wsserver.parse_upgrade(at_limit + frames) is not None
    with pytest.raises(wsserver.HandshakeError):
        wsserver.parse_upgrade(request(add=[filler + b"y" * (pad + 1)]))


def status_of(data: bytes) -> tuple[int, str, dict[str, str]]:
    with pytest.raises(wsserver.HandshakeError) as info:
        wsserver.parse_upgrade(data, "/ws")
    return info.value.status, str(info.value), dict(info.value.headers)


def test_the_path_is_checked_before_what_the_request_is() -> None:
    for line in (b"GET /other HTTP/1.1", b"POST /other HTTP/1.1", b"GET /ws/x HTTP/1.1"):
        for data in (request(line=line), line + b"\r\nHost: x\r\n\r\n"):
            assert status_of(data) == (404, "not found: connect to /ws", {})
    assert wsserver.parse_upgrade(request(line=b"GET /ws?client=ios HTTP/1.1"), "/ws")
    assert wsserver.parse_upgrade(request(line=b"GET http://x/ws HTTP/1.1"), "/ws")
    assert status_of(request(line=b"GET //[x HTTP/1.1"))[:2] == (400, "bad request target")
    # Whatever the rest of the request: no Host, HTTP/1.0, a broken header line.
    assert status_of(request(drop="host", line=b"GET /other HTTP/1.1"))[0] == 404
    assert status_of(b"GET /other HTTP/1.0\r\n\r\n")[0] == 404
    assert status_of(b"GET /other HTTP/1.1\r\nno colon here\r\n\r\n")[0] == 404
    assert status_of(b"GET /ws HTTP/1.0\r\nHost: x\r\n\r\n")[0] == 400


def test_a_head_trickled_in_is_searched_from_where_the_last_search_stopped() -> None:
    """The end of the head is looked for in what arrived since the last read, and the 3
    bytes before it: an end split across two reads is still found."""
    data = request()
    assert wsserver.parse_upgrade(data[:-1], "/ws", 0) is None
    assert wsserver.parse_upgrade(data, "/ws", len(data) - 1) is not None  # \n\r\n|\n
    assert wsserver.parse_upgrade(data, "/ws", len(data) - 2) is not None


def test_statuses_of_refused_requests_for_the_path() -> None:
    plain = b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n"
    assert status_of(plain)[0::2] == (426, {"upgrade": "websocket"})
    assert status_of(request(drop="upgrade", add=[b"Upgrade: h2c"]))[0] == 426
    assert status_of(request(line=b"POST /ws HTTP/1.1"))[0::2] == (405, {"allow": "GET"})
    assert status_of(request(drop="sec-websocket-key"))[0::2] == (400, {})
    wrong = request(drop="sec-websocket-version", add=[b"Sec-WebSocket-Version: 8"])
    assert status_of(wrong)[0::2] == (400, {"sec-websocket-version": "13"})


def test_the_accept_response_satisfies_a_wsproto_client() -> None:
    from wsproto import WSConnection
    from wsproto.events import AcceptConnection
    from wsproto.events import Request as WsRequest

    for offered, chosen in ((["parley.v1"], "parley.v1"), ([], None)):
        client = WSConnection(ConnectionType.CLIENT)
        data = client.send(WsRequest(host="x", target="/ws", subprotocols=offered))
        upgrade = wsserver.parse_upgrade(data)
        assert upgrade is not None and upgrade.subprotocols == tuple(offered)
        client.receive_data(wsserver.accept_response(upgrade.key, chosen))
        (event,) = list(client.events())
        assert isinstance(event, AcceptConnection) and event.subprotocol == chosen


# --- bounds on fragmented messages ------------------------------------------------------


def fragmented(sizes: Sequence[int], opcode: int = OP_BINARY) -> bytes:
    """One message in frames of ``sizes`` bytes (0: an empty frame)."""
    last = len(sizes) - 1
    return b"".join(
        raw(opcode if i == 0 else 0x0, b"f" * n, fin=i == last) for i, n in enumerate(sizes)
    )


def test_a_message_in_more_than_max_fragments_frames_is_skipped() -> None:
    cap = wsserver.MAX_FRAGMENTS
    frames = wsserver.ClientFrames(65536)
    assert frames.feed(fragmented([1] * cap)) == [wsserver.Message(b"f" * cap)]
    wire = fragmented([1] * (cap + 1)) + raw(OP_PING, b"p") + raw(OP_BINARY, b"next")
    assert frames.feed(wire) == [
        wsserver.TooBig(f"over {cap} fragments"),
        wsserver.Ping(b"p"),
        wsserver.Message(b"next"),
    ]


def test_empty_continuation_frames_count_and_hold_nothing() -> None:
    frames = wsserver.ClientFrames(65536)
    events = frames.feed(raw(OP_BINARY, b"start", fin=False))
    empty = raw(0x0, b"", fin=False)
    for _ in range(100):  # 600,000 empty frames: what used to grow a list of pieces
        events += frames.feed(empty * 6000)
        assert frames.buffered < 200
    assert events == [wsserver.TooBig(f"over {wsserver.MAX_FRAGMENTS} fragments")]
    assert frames.incomplete  # still skipping that message: it has no end yet
    assert frames.feed(raw(0x0, b"") + raw(OP_BINARY, b"x")) == [wsserver.Message(b"x")]
    assert not frames.incomplete


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 300), min_size=1, max_size=300), min_size=1, max_size=4),
    st.integers(0, 4000),
    st.lists(st.integers(0, 1 << 20), max_size=30),
)
def test_fragmented_messages_stay_within_the_bounds(
    messages: list[list[int]], limit: int, cuts: list[int]
) -> None:
    """Whatever the fragments, what the parser holds is bounded by the limit, not by
    their number; a message passes if it is within both bounds, else one ``TooBig``."""
    frames = wsserver.ClientFrames(limit)
    events: list[wsserver.Event] = []
    for chunk in split(b"".join(fragmented(sizes) for sizes in messages), cuts):
        events += frames.feed(chunk)
        # A partial frame and the message so far (a bytearray grows by 1/8 at most).
        assert frames.buffered <= 2 * sys.getsizeof(b"") + 64 + limit * 9 // 8 + 14 + 300
    expected: list[wsserver.Event] = []
    for sizes in messages:
        if sum(sizes) > limit:
            expected.append(wsserver.TooBig(f"over {limit} bytes"))
        elif len(sizes) > wsserver.MAX_FRAGMENTS:
            expected.append(wsserver.TooBig(f"over {wsserver.MAX_FRAGMENTS} fragments"))
        else:
            expected.append(wsserver.Message(b"f" * sum(sizes)))
    assert events == expected
    assert not frames.incomplete and frames.completed


def test_completed_and_started_tell_where_frames_and_messages_end() -> None:
    frames = wsserver.ClientFrames(65536)
    ping = raw(OP_PING, b"p")
    frames.feed(ping[:3])
    assert (frames.completed, frames.incomplete, frames.started) == (False, True, True)
    frames.feed(ping[3:])
    assert (frames.completed, frames.incomplete) == (True, False)
    first, last = raw(OP_BINARY, b"ab", fin=False), raw(0x0, b"cd")
    frames.feed(first + ping + last[:2])  # a fragment and a ping: the message goes on
    assert (frames.completed, frames.incomplete, frames.started) == (True, True, True)
    frames.feed(last[2:4])  # no frame ends; the message began in an earlier feed
    assert (frames.completed, frames.incomplete, frames.started) == (False, True, False)
    frames.feed(last[4:] + ping[:1])  # the message ends, a ping begins: a new start
    assert (frames.completed, frames.incomplete, frames.started) == (True, True, True)
    frames.feed(ping[1:] + first)  # a ping ends, a message begins
    assert (frames.completed, frames.incomplete, frames.started) == (True, True, True)
    frames.feed(ping)  # between fragments: the message began earlier
    assert (frames.completed, frames.incomplete, frames.started) == (True, True, False)
