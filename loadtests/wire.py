"""What the load generator says to each server, sans-IO: one small adapter per protocol.

Every message a load generator publishes carries a marker ``~@<src>.<seq>.<t>@~`` in its
text (the sender's number, its own sequence number from 1, and ``time.monotonic_ns()``
when it was sent). A receiver finds the marker in the raw frame bytes without decoding
the frame, whatever the protocol: CBOR, Socket.IO's JSON or plain text all carry text
as its UTF-8 bytes. Everything else a server sends goes to the adapter's ``control``.

An adapter's ``opening`` is a generator: it yields the frames to send, is sent each
frame that arrives while the session is opening, and returns once the session is ready
(subscribed to its room).
"""

from collections.abc import Callable, Generator
from typing import Any, Protocol
from urllib.parse import quote

import attrs
import cbor2

from protocol.codec import encode
from protocol.errors import ErrorCode
from protocol.frames import (
    FIELD_KEYS,
    PROTOCOL_VERSION,
    TYPE_KEY,
    Create,
    Direct,
    Frame,
    Hello,
    Join,
    Pong,
    Receipt,
    Send,
)
from protocol.wsframe import OP_BINARY, OP_PING, OP_PONG, OP_TEXT, client_frame

Opening = Generator[list[bytes], tuple[int, bytes], None]


@attrs.define(slots=True, eq=False)
class Ident:
    """Who one connection is: its user, its room (or, for direct chat, its peer) and its
    sender number in markers."""

    user: str
    room: str
    src: int
    create: bool = False  # makes the room (the first connection of a room)
    peer: str | None = None  # chat with this user in a direct room
    token: str = ""


@attrs.define(slots=True)
class Control:
    """What a non-delivery frame means to the load generator."""

    reply: bytes | None = None
    ack: int | None = None  # the acked publish's seq; 0 = the oldest awaiting one
    receipt_event: bool = False
    error: str | None = None


NOTHING = Control()


def marker(src: int, seq: int, t_ns: int, size: int) -> str:
    """The marked text of a message of about ``size`` bytes on the wire."""
    mark = f"~@{src}.{seq}.{t_ns}@~"
    return mark + "x" * max(0, size - 40 - len(mark))


class Wire(Protocol):
    name: str
    acks_receipts: bool  # a receipt gets an ack too (in order with the publishes' acks)

    def request(self, ident: Ident, host: str) -> bytes: ...
    def opening(self, ident: Ident) -> Opening: ...
    def publish(self, ident: Ident, seq: int, t_ns: int, size: int) -> bytes: ...
    def receipt(self, ident: Ident, payload: bytes) -> bytes | None: ...
    def control(self, opcode: int, payload: bytes) -> Control: ...


def upgrade(host: str, target: str, extra: str = "") -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


def _pong_of(opcode: int, payload: bytes) -> Control | None:
    if opcode == OP_PING:
        return Control(reply=client_frame(payload, OP_PONG))
    return None


_SENT, _PING, _JOINED, _ERROR, _WELCOME = 21, 2, 20, 5, 4
_K_ID, _K_ROOM, _K_SEQ, _K_CODE = (FIELD_KEYS[k] for k in ("id", "room", "seq", "code"))
_ROOM_EXISTS = int(ErrorCode.ROOM_EXISTS)
_RECEIPT_EVENTS = (40, 41)


@attrs.define
class ParleyWire:
    """Parley's CBOR protocol; sent-acks are durable (after the store commits)."""

    name: str = "parley"
    acks_receipts: bool = False
    _pong: bytes = attrs.field(factory=lambda: client_frame(encode(Pong())))

    def request(self, ident: Ident, host: str) -> bytes:
        return upgrade(host, "/ws", "Sec-WebSocket-Protocol: parley.v1\r\n")

    def opening(self, ident: Ident) -> Opening:
        frame = yield [client_frame(encode(Hello(v=PROTOCOL_VERSION, token=ident.token)))]
        while (reply := self._reply(frame, ident)).get(TYPE_KEY) != _WELCOME:
            frame = yield [self._pong] if reply.get(TYPE_KEY) == _PING else []
        if not ident.room and ident.peer is None:
            return  # an idle session: authenticated, in no room
        first: Frame
        if ident.peer is not None:
            first = Direct(id=1, user=ident.peer)
        elif ident.create:
            first = Create(id=1, room=ident.room)
        else:
            first = Join(id=1, room=ident.room)
        frame = yield [client_frame(encode(first))]
        while True:
            reply = self._reply(frame, ident, _ROOM_EXISTS)
            t = reply.get(TYPE_KEY)
            if t == _JOINED and (ident.peer is not None or reply[_K_ROOM] == ident.room):
                ident.room = reply[_K_ROOM]
                return
            if t == _ERROR:  # the room exists: join it
                frame = yield [client_frame(encode(Join(id=2, room=ident.room)))]
            else:
                frame = yield [self._pong] if t == _PING else []

    def _reply(self, frame: tuple[int, bytes], ident: Ident, allowed: int = 0) -> dict[Any, Any]:
        reply: dict[Any, Any] = cbor2.loads(frame[1]) if frame[0] == OP_BINARY else {}
        if reply.get(TYPE_KEY) == _ERROR and reply.get(_K_CODE) != allowed:
            raise ConnectionError(f"{ident.user}: {reply}")
        return reply

    def publish(self, ident: Ident, seq: int, t_ns: int, size: int) -> bytes:
        send = Send(id=seq, room=ident.room, cid=str(seq), text=marker(ident.src, seq, t_ns, size))
        return client_frame(encode(send))

    def receipt(self, ident: Ident, payload: bytes) -> bytes | None:
        seq = cbor2.loads(payload)[_K_SEQ]
        return client_frame(encode(Receipt(room=ident.room, delivered=seq, read=seq)))

    def control(self, opcode: int, payload: bytes) -> Control:
        if opcode != OP_BINARY:
            return _pong_of(opcode, payload) or NOTHING
        frame = cbor2.loads(payload)
        t = frame.get(TYPE_KEY)
        if t == _SENT:
            return Control(ack=frame[_K_ID])
        if t == _PING:
            return Control(reply=self._pong)
        if t in _RECEIPT_EVENTS:
            return Control(receipt_event=True)
        if t == _ERROR:
            return Control(error=repr(frame))
        return NOTHING


def _text(data: str) -> bytes:
    return client_frame(data.encode(), OP_TEXT)


@attrs.define
class SocketIOWire:
    """Socket.IO 4 (Engine.IO v4) over a plain WebSocket: the peers' contract is in
    ``loadtests/peers``. A receipt is an ``m`` event whose text has no marker."""

    name: str = "socketio"
    acks_receipts: bool = False

    def request(self, ident: Ident, host: str) -> bytes:
        return upgrade(host, f"/socket.io/?EIO=4&transport=websocket&room={quote(ident.room)}")

    def opening(self, ident: Ident) -> Opening:
        _, payload = yield []
        while not payload.startswith(b"0"):
            _, payload = yield []
        _, payload = yield [_text("40")]
        while not payload.startswith(b"40"):
            _, payload = yield [_text("3")] if payload == b"2" else []

    def publish(self, ident: Ident, seq: int, t_ns: int, size: int) -> bytes:
        text = marker(ident.src, seq, t_ns, size - 10)
        return _text(f'42{seq}["m","{ident.room}","{text}"]')

    def receipt(self, ident: Ident, payload: bytes) -> bytes | None:
        return _text(f'42["m","{ident.room}","r"]')

    def control(self, opcode: int, payload: bytes) -> Control:
        if opcode != OP_TEXT:
            return _pong_of(opcode, payload) or NOTHING
        if payload == b"2":
            return Control(reply=_PONG_TEXT)
        if payload.startswith(b"43"):
            return Control(ack=int(payload[2 : payload.index(b"[")]))
        if payload.startswith(b"42"):
            return Control(receipt_event=True)
        if payload.startswith(b"44") or payload.startswith(b"1"):
            return Control(error=payload.decode(errors="replace"))
        return NOTHING


_PONG_TEXT = _text("3")


@attrs.define
class WebsocketsWire:
    """The raw broadcast peer: a text ``<room>\\n<text>`` goes to the room's other
    members, and the sender gets ``ok`` back (acks arrive in order)."""

    name: str = "websockets"
    acks_receipts: bool = True

    def request(self, ident: Ident, host: str) -> bytes:
        return upgrade(host, f"/?room={quote(ident.room)}")

    def opening(self, ident: Ident) -> Opening:
        yield from ()  # ready as soon as the upgrade is accepted

    def publish(self, ident: Ident, seq: int, t_ns: int, size: int) -> bytes:
        return _text(f"{ident.room}\n{marker(ident.src, seq, t_ns, size)}")

    def receipt(self, ident: Ident, payload: bytes) -> bytes | None:
        return _text(f"{ident.room}\nr")

    def control(self, opcode: int, payload: bytes) -> Control:
        if opcode != OP_TEXT:
            return _pong_of(opcode, payload) or NOTHING
        if payload == b"ok":
            return Control(ack=0)
        return Control(receipt_event=True)


WIRES: dict[str, Callable[[], Wire]] = {
    "parley": ParleyWire,
    "socketio": SocketIOWire,
    "websockets": WebsocketsWire,
}
