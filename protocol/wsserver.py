"""The server's side of a WebSocket connection, sans-IO: the opening handshake, and the
client's frames after it.

Why not wsproto: a ``WSConnection`` and the h11 state of its handshake stayed alive for
every connection (4.6 KiB of an idle session's memory), and its frame parser went through
generators, a buffer class and an event object per frame. What a server needs of RFC 6455
after the handshake is small: unmask the client's frames, reassemble fragmented messages
within a size limit, answer pings, and the close handshake. Frames the server sends are
built by ``protocol.wsframe`` (data, ping, pong) and ``close_frame``.

``ClientFrames.feed(data)`` takes the bytes of one read and returns the events they
complete, in order. It follows wsproto's checks (tests/test_wsserver.py holds the two to
the same verdicts, and to the same events), and adds bounds: a message over the size
limit, or in more than ``MAX_FRAGMENTS`` frames, is skipped as it arrives, never buffered
(one ``TooBig`` event, then the next message). After a protocol violation (``Failed``) or
the client's close frame, nothing more is parsed: the stream can no longer be trusted, or
the client has nothing more to say.

Time is the connection's business, but only the parser knows where frames end: after each
``feed`` it tells whether a frame completed (``completed``: the client's sign of life),
and whether a frame or a message is left incomplete (``incomplete``), begun in that feed
or earlier (``started``): what the connection's deadline for a frame needs.
"""

import base64
import codecs
import hashlib
import re
import struct
import sys
from collections.abc import Sequence
from http import HTTPStatus
from urllib.parse import urlsplit

import attrs

from protocol.errors import CloseCode
from protocol.wsframe import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, server_frame

OP_CONTINUATION = 0x0
_FIN = 0x80
_RSV = 0x70
_MASKED = 0x80
_CONTROL = 0x08
_MAX_CONTROL = 125
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
# Frames in one message. Each costs a parse, and a message of many tiny or empty
# fragments is no client's honest way of sending: 64 KiB in 256 pieces is still 256 bytes
# a piece. Beyond it the message is skipped like an oversize one (1009).
MAX_FRAGMENTS = 256

# Close codes a peer may send (RFC 6455 7.4): the defined ones, 3000-4999 for libraries
# and applications. 1005, 1006 and 1015 only ever describe a close locally.
_DEFINED_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013})
NO_STATUS = 1005  # the close frame had no code
_utf8_decoder = codecs.getincrementaldecoder("utf-8")


@attrs.frozen
class Message:
    """A complete data message; ``text`` if it was sent as a text message."""

    data: bytes
    text: bool = False


@attrs.frozen
class Ping:
    payload: bytes


@attrs.frozen
class Pong:
    payload: bytes


@attrs.frozen
class Close:
    """The client's close frame; ``code`` is 1005 if it carried none."""

    code: int
    reason: str


@attrs.frozen
class TooBig:
    """A message over a limit (``reason``) was skipped; the connection should close
    with 1009."""

    reason: str


@attrs.frozen
class Failed:
    """The client broke the protocol; the connection should close with ``code``."""

    code: CloseCode
    reason: str


Event = Message | Ping | Pong | Close | TooBig | Failed


def _unmask(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the repeated 4-byte ``key``, through one big-integer XOR:
    C speed without a per-byte Python loop."""
    n = len(payload)
    if not n:
        return b""
    mask = (key * ((n + 3) >> 2))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(mask, "little")).to_bytes(
        n, "little"
    )


def close_frame(code: int, reason: str = "") -> bytes:
    """Our close frame; code 1005 (none received) answers with an empty one."""
    if code == NO_STATUS:
        return server_frame(b"", OP_CLOSE)
    if code in (1006, 1015):  # local-only codes never go on the wire
        code = CloseCode.NORMAL
    data = reason.encode()
    if len(data) > _MAX_CONTROL - 2:  # cut at a character boundary
        data = data[: _MAX_CONTROL - 2].decode("utf-8", "ignore").encode()
    return server_frame(_U16.pack(code) + data, OP_CLOSE)


def pong_frame(payload: bytes) -> bytes:
    return server_frame(payload, OP_PONG)


class ClientFrames:
    """Parse what a client sends after the handshake into ``Event``s."""

    __slots__ = (
        "_buffer",
        "_done",
        "_fragments",
        "_limit",
        "_opcode",
        "_parts",
        "_skip",
        "_skipping",
        "_utf8",
        "completed",
        "started",
    )

    def __init__(self, max_message: int) -> None:
        self._limit = max_message
        self._buffer = b""  # the start of an incomplete frame
        self._opcode: int | None = None  # of the fragmented message in progress
        # Its payload so far. One buffer, not a list of pieces: a piece in a list cost
        # ~43 bytes more than its payload, so 64 KiB sent as one-byte fragments held
        # 2.8 MB, and empty fragments grew the list without bound.
        self._parts: bytearray | None = None
        self._fragments = 0  # frames of the message in progress so far
        self._skip = 0  # bytes of an oversize frame still to discard
        self._skipping = False  # in an oversize message: its frames are discarded
        # Checks a text message, fragment by fragment; made as one begins (88 B that an
        # idle binary-only connection need not hold).
        self._utf8: codecs.IncrementalDecoder | None = None
        self._done = False  # closed or failed: nothing more is parsed
        self.completed = False  # the last feed completed a frame, of any kind
        self.started = False  # what is incomplete after the last feed began in it

    @property
    def incomplete(self) -> bool:
        """A frame, or a fragmented message, has begun and not ended."""
        return not self._done and bool(
            self._buffer or self._skip or self._opcode is not None or self._skipping
        )

    @property
    def buffered(self) -> int:
        """Bytes held for incomplete frames and messages, as allocated."""
        held = sys.getsizeof(self._buffer)
        return held if self._parts is None else held + sys.getsizeof(self._parts)

    def feed(self, data: bytes) -> list[Event]:
        self.completed = False
        if self._done:
            return []
        # Whatever is incomplete at the end began here if nothing was before, or once a
        # message (or a control frame between messages) ends below.
        self.started = not self.incomplete
        if self._skip:
            if len(data) < self._skip:
                self._skip -= len(data)
                return []
            data = data[self._skip :]
            self._skip = 0
            self._frame_done()
        buffer = self._buffer + data if self._buffer else data
        events: list[Event] = []
        pos = 0
        end = len(buffer)
        while end - pos >= 2:
            b0 = buffer[pos]
            b1 = buffer[pos + 1]
            opcode = b0 & 0x0F
            n = b1 & 0x7F
            head = 2
            if b0 & _RSV:
                return self._fail(events, CloseCode.PROTOCOL_ERROR, "reserved bit set")
            if opcode & _CONTROL:
                if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                    return self._fail(events, CloseCode.PROTOCOL_ERROR, f"opcode {opcode:#x}")
                if not b0 & _FIN:
                    return self._fail(events, CloseCode.PROTOCOL_ERROR, "fragmented control")
                if n > _MAX_CONTROL:
                    return self._fail(events, CloseCode.PROTOCOL_ERROR, "control frame over 125")
            elif opcode not in (OP_CONTINUATION, OP_TEXT, OP_BINARY):
                return self._fail(events, CloseCode.PROTOCOL_ERROR, f"opcode {opcode:#x}")
            if n == 126:
                if end - pos < 4:
                    break
                n = _U16.unpack_from(buffer, pos + 2)[0]
                head = 4
                if n < 126:
                    return self._fail(events, CloseCode.PROTOCOL_ERROR, "length not minimal")
            elif n == 127:
                if end - pos < 10:
                    break
                n = _U64.unpack_from(buffer, pos + 2)[0]
                head = 10
                if n < 65536 or n >> 63:
                    return self._fail(events, CloseCode.PROTOCOL_ERROR, "bad 64-bit length")
            if not b1 & _MASKED:
                return self._fail(events, CloseCode.PROTOCOL_ERROR, "unmasked client frame")
            if end - pos < head + 4:
                break  # the masking key is still to come
            if not opcode & _CONTROL:
                if opcode == OP_CONTINUATION:
                    if self._opcode is None and not self._skipping:
                        return self._fail(events, CloseCode.PROTOCOL_ERROR, "stray continuation")
                elif self._opcode is not None or self._skipping:
                    return self._fail(events, CloseCode.PROTOCOL_ERROR, "expected continuation")
                # Checked before the payload is read: an oversize message is skipped as
                # it arrives, never buffered.
                if not self._skipping:
                    size = 0 if self._parts is None else len(self._parts)
                    if size + n > self._limit:
                        too_big = f"over {self._limit} bytes"
                    elif self._fragments >= MAX_FRAGMENTS:
                        too_big = f"over {MAX_FRAGMENTS} fragments"
                    else:
                        too_big = ""
                    if too_big:
                        events.append(TooBig(too_big))
                        self._parts, self._fragments, self._opcode = None, 0, None
                        self._utf8 = None
                        self._skipping = True
                if self._skipping:
                    if b0 & _FIN:
                        self._skipping = False
                    start = pos + head + 4
                    if end - start < n:
                        self._skip = n - (end - start)
                        pos = end
                        break
                    pos = start + n
                    self._frame_done()
                    continue
            frame_end = pos + head + 4 + n
            if frame_end > end:
                break
            key = buffer[pos + head : pos + head + 4]
            payload = _unmask(buffer[pos + head + 4 : frame_end], key)
            pos = frame_end
            self.completed = True
            if opcode == OP_PING:
                events.append(Ping(payload))
            elif opcode == OP_PONG:
                events.append(Pong(payload))
            elif opcode == OP_CLOSE:
                events.append(self._close(payload))
                self._done = True
                self._buffer = b""
                return events
            else:
                fin = bool(b0 & _FIN)
                if self._opcode is None:
                    self._opcode = opcode
                    if opcode == OP_TEXT:
                        self._utf8 = _utf8_decoder()
                text = self._opcode == OP_TEXT
                if text:
                    assert self._utf8 is not None  # made as the text message began
                    try:
                        self._utf8.decode(payload, fin)  # fails on the first bad fragment
                    except UnicodeDecodeError:
                        return self._fail(events, CloseCode.INVALID_DATA, "text not UTF-8")
                if fin:
                    if self._parts is not None:
                        self._parts += payload
                        payload = bytes(self._parts)
                        self._parts, self._fragments = None, 0
                    self._opcode = self._utf8 = None
                    events.append(Message(payload, text))
                else:
                    if self._parts is None:
                        self._parts = bytearray(payload)
                    else:
                        self._parts += payload
                    self._fragments += 1
            if self._opcode is None and not self._skipping:
                self.started = True  # between messages: what follows begins here
        self._buffer = buffer[pos:] if pos < end else b""
        return events

    def _frame_done(self) -> None:
        """A skipped frame ended."""
        self.completed = True
        if not self._skipping:
            self.started = True

    def _close(self, payload: bytes) -> Event:
        if not payload:
            return Close(NO_STATUS, "")
        if len(payload) == 1:
            return Failed(CloseCode.PROTOCOL_ERROR, "close frame of 1 byte")
        code = _U16.unpack_from(payload)[0]
        if not (code in _DEFINED_CODES or 3000 <= code <= 4999):
            return Failed(CloseCode.PROTOCOL_ERROR, f"close code {code}")
        try:
            reason = payload[2:].decode()
        except UnicodeDecodeError:
            return Failed(CloseCode.INVALID_DATA, "close reason not UTF-8")
        return Close(code, reason)

    def _fail(self, events: list[Event], code: CloseCode, reason: str) -> list[Event]:
        events.append(Failed(code, reason))
        self._done = True
        self._buffer = b""
        self._parts = None
        return events


# --- the opening handshake (RFC 6455 4.2) ----------------------------------------------
#
# Why not wsproto's (h11): it was a quarter of the server's CPU per session connect, and
# it allocates hundreds of short-lived objects per request for the cyclic collector to
# walk. An upgrade request is one GET with a handful of headers; this checks what
# wsproto checks, with the same messages. (wsproto also dropped bytes a client sent
# right behind its request; they are kept here: ``Upgrade.rest``.)

MAX_HEAD = 16384  # bytes of request line and headers, as h11's default
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(rb"\r?\n")
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f-\xff]")
_UPGRADE_REQUIRED = (426, [("upgrade", "websocket")])  # RFC 9110 15.5.22
_VERSIONS = (400, [("sec-websocket-version", "13")])  # the versions we speak: RFC 6455 4.4


class HandshakeError(Exception):
    """The request is no WebSocket upgrade we accept: answer it with ``status`` and
    ``headers`` (``response``)."""

    def __init__(
        self, message: str, status: int = 400, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers

    def response(self, request: bytes | bytearray) -> bytes:
        """The answer to ``request``, the bytes that raised this."""
        head = request.lstrip(b"\r\n").startswith(b"HEAD ")  # its answer has no body
        return http_response(self.status, f"{self}\n", self.headers, body=not head)


def http_response(
    status: int, text: str, headers: Sequence[tuple[str, str]] = (), *, body: bool = True
) -> bytes:
    """An HTTP answer after which the server closes the connection: ``text`` as its
    plain-text body."""
    data = text.encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    lines += [f"{name}: {value}" for name, value in headers]
    # A sender of Upgrade names it in Connection too (RFC 9110 7.8).
    closing = "upgrade, close" if any(name == "upgrade" for name, _ in headers) else "close"
    lines += [
        "content-type: text/plain; charset=utf-8",
        f"content-length: {len(data)}",
        f"connection: {closing}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (data if body else b"")


@attrs.frozen
class Upgrade:
    """An acceptable upgrade request: ``target`` as sent, the client's ``key`` and
    ``subprotocols``, and ``rest``: bytes that followed the request (frames)."""

    target: str
    key: bytes
    subprotocols: tuple[str, ...]
    rest: bytes


def parse_upgrade(
    data: bytes | bytearray, path: str | None = None, searched: int = 0
) -> Upgrade | None:
    """The upgrade request at the start of ``data``; None while it is incomplete.
    ``searched``: bytes of ``data`` a call before looked at already (a head arriving in
    many reads is not searched from its start each time). Raises ``HandshakeError`` for
    anything else: a request for another ``path`` than the one given is answered 404
    whatever it is, a request for it that is no upgrade 426 (400 for a broken one)."""
    end = _HEAD_END.search(data, max(0, searched - 3))
    if (end.end() if end else len(data)) > MAX_HEAD:  # complete or not
        raise HandshakeError("request head too large", 431)
    if end is None:
        return None
    lines = _LINE_END.split(bytes(data[: end.start()]).lstrip(b"\r\n"))
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise HandshakeError("Bad HTTP message")
    method, target, version = parts
    if not target or _BAD_TARGET.search(target):
        raise HandshakeError("Bad HTTP message")
    if path is not None:  # first: any other path is 404, whatever the rest
        try:
            asked = urlsplit(target.decode("ascii")).path
        except ValueError:
            raise HandshakeError("bad request target") from None
        if asked != path:
            raise HandshakeError(f"not found: connect to {path}", 404)
    if version != b"HTTP/1.1":
        raise HandshakeError("Bad HTTP message")
    headers: dict[bytes, bytes] = {}
    connection: list[bytes] = []
    subprotocols: list[str] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HandshakeError("Bad HTTP message")  # folded lines included
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise HandshakeError("Bad HTTP message")
        name = name.lower()
        if name == b"connection":
            connection.extend(t.strip(b" \t").lower() for t in value.split(b","))
        elif name == b"sec-websocket-protocol":
            subprotocols.extend(p.strip(b" \t").decode("latin-1") for p in value.split(b","))
        headers[name] = value
    if b"host" not in headers:  # HTTP/1.1 requires it (h11 refused such a request)
        raise HandshakeError("Bad HTTP message")
    if method != b"GET":
        raise HandshakeError("Request method must be GET", 405, [("allow", "GET")])
    if b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0":
        raise HandshakeError("Bad HTTP message")  # an upgrade request has no body
    if b"upgrade" not in connection:
        raise HandshakeError("Missing header, 'Connection: Upgrade'", *_UPGRADE_REQUIRED)
    if headers.get(b"sec-websocket-version") != b"13":
        raise HandshakeError("Missing header, 'Sec-WebSocket-Version'", *_VERSIONS)
    key = headers.get(b"sec-websocket-key")
    if key is None:
        raise HandshakeError("Missing header, 'Sec-WebSocket-Key'")
    if headers.get(b"upgrade", b"").lower() != b"websocket":
        raise HandshakeError("Missing header, 'Upgrade: websocket'", *_UPGRADE_REQUIRED)
    return Upgrade(target.decode("ascii"), key, tuple(subprotocols), bytes(data[end.end() :]))


def accept_response(key: bytes, subprotocol: str | None) -> bytes:
    """The 101 answer to an upgrade with ``key``, choosing ``subprotocol``."""
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    protocol = (
        b""
        if subprotocol is None
        else b"Sec-WebSocket-Protocol: %s\r\n" % (subprotocol.encode("ascii"))
    )
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: %s\r\n%s\r\n" % (accept, protocol)
    )
