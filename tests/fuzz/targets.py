"""What must hold for any input: the fuzz targets, shared by the fuzzer and the replay.

Each target takes the fuzzer's bytes and raises ``AssertionError`` (or anything but the
protocol's own refusals) when a property breaks.
"""

from collections.abc import Callable

import attrs

from protocol.codec import decode_client, decode_server, encode, peek
from protocol.errors import ErrorCode, RemoteProtocolError
from protocol.frames import CLIENT_FRAMES, Frame
from protocol.limits import MAX_UINT, Limits
from protocol.wsserver import ClientFrames, Close, Failed, Message

LIMITS = Limits()
_WITHOUT_ID = {c.TYPE for c in CLIENT_FRAMES if "id" not in attrs.fields_dict(c)}  # type: ignore[arg-type]
WS_LIMIT = 4096  # a small message limit, so inputs reach it


def decoder(data: bytes) -> None:
    """``decode_client`` and its neighbours on any bytes: refusals are protocol errors
    with short messages; what is accepted encodes, and decodes back to the same frame."""
    kind, request_id = peek(data)
    assert request_id is None or 0 <= request_id <= MAX_UINT
    try:
        frame: Frame = decode_client(data, LIMITS)
    except RemoteProtocolError as exc:
        assert len(exc.message) < 300, exc.message
        # The id named is the frame's: what peek reads, unless the decode stopped at a
        # fault in the CBOR before reaching it, or the frame's type has no id (hello).
        assert exc.request_id in (request_id, None), (exc.request_id, request_id)
        if exc.code is not ErrorCode.BAD_FRAME and kind not in _WITHOUT_ID:
            assert exc.request_id == request_id, (exc.request_id, request_id)
    else:
        assert kind == frame.TYPE
        again = encode(frame)
        assert decode_client(again, LIMITS) == frame
        assert encode(decode_client(again, LIMITS)) == again
    try:
        decode_server(data)
    except RemoteProtocolError:
        pass


def wsframes(data: bytes) -> None:
    """``ClientFrames`` on any bytes, cut into reads by the first byte: never more held
    than a message (and its frame) allows, no message over the limit, nothing after the
    end."""
    if not data:
        return
    step = data[0] % 64 + 1
    frames = ClientFrames(WS_LIMIT)
    ended = False
    for i in range(1, len(data), step):
        events = frames.feed(data[i : i + step])
        if ended:
            assert events == []
        for event in events:
            if isinstance(event, Message):
                assert len(event.data) <= WS_LIMIT
            ended = ended or isinstance(event, Close | Failed)
        assert frames.buffered <= 2 * WS_LIMIT + 1024


TARGETS: dict[str, Callable[[bytes], None]] = {"decoder": decoder, "wsframes": wsframes}
