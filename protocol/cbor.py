"""Strict CBOR reading within bounds, sans-IO: what the codec builds frames from.

How this works: a frame is read straight from its bytes, item by item, by functions that
take ``(buf, pos, end)`` and return the position after what they read. Nothing is built
that the frame does not keep: the codec reads the fields it knows into their Python
types and walks over everything else (``skip``), and an application payload (``data``,
a kv ``value``) is walked once to check it and kept as its own bytes (``Raw``). So the
work is one pass over the bytes, each item visited once, and the memory is what the frame
holds: a frame of 60,000 zeros or of 8,000 empty maps costs a walk, not 60,000 Python
objects (cbor2's decoder materializes every item first; BENCHMARKS.md, "Decoding").

What is refused, and with which code (PROTOCOL.md section 2):

- not well-formed CBOR (truncated, reserved additional information, a length beyond the
  frame), indefinite-length items, tags, text that is not UTF-8, nesting deeper than
  allowed outside a payload: ``100 BAD_FRAME``;
- in a payload (``data``, kv values): map keys that are not text (102), duplicate keys
  (100), floats that are not finite, ``undefined`` and other simple values (102), and
  more than ``levels`` nested arrays and maps (102).

Messages are short and never echo the input.
"""

from typing import Any, NoReturn

import cbor2

from protocol.errors import ErrorCode, RemoteProtocolError

# Bytes of the argument that follows the initial byte, by its additional information;
# 0: none follows (0-23: the argument is the information itself; 28-31: refused).
_ARG_BYTES = (0,) * 24 + (1, 2, 4, 8, 0, 0, 0, 0)


def _sizes(*runs: tuple[int, int, int]) -> bytes:
    table = bytearray(256)
    for low, high, size in runs:
        table[low : high + 1] = bytes([size]) * (high + 1 - low)
    return bytes(table)


# Whole items of a fixed size, by initial byte (0: not one). The walks step over these
# without decoding a head: an array of 60,000 such items is the cheapest frame to send
# and must not be the dearest to read. Integers, empty strings, arrays and maps:
_FIXED: tuple[tuple[int, int, int], ...] = (
    *((0x00, 0x17, 1), (0x20, 0x37, 1), (0x40, 0x40, 1), (0x60, 0x60, 1), (0x80, 0x80, 1)),
    *((0xA0, 0xA0, 1), (0x18, 0x18, 2), (0x19, 0x19, 3), (0x1A, 0x1A, 5), (0x1B, 0x1B, 9)),
    *((0x38, 0x38, 2), (0x39, 0x39, 3), (0x3A, 0x3A, 5), (0x3B, 0x3B, 9)),
)
# Anywhere: also every simple value and float (0xf8 takes a second byte, checked apart).
_SKIP_SIZES = _sizes(*_FIXED, (0xE0, 0xF7, 1), (0xF9, 0xF9, 3), (0xFA, 0xFA, 5), (0xFB, 0xFB, 9))
# In a payload: also false, true and null; floats are looked at (finite), the rest refused.
_PAYLOAD_SIZES = _sizes(*_FIXED, (0xF4, 0xF6, 1))
# At the deepest level allowed, an empty array or map is one level too many.
_SKIP_LEAF_SIZES = bytes(0 if b in (0x80, 0xA0) else n for b, n in enumerate(_SKIP_SIZES))
_PAYLOAD_LEAF_SIZES = bytes(0 if b in (0x80, 0xA0) else n for b, n in enumerate(_PAYLOAD_SIZES))

FRAME_LEVELS = 12  # arrays and maps a frame may nest, its own map counted
MAP = 5
ARRAY = 4
TEXT = 3
BYTES = 2
NULL = 0xF6


class Raw:
    """A CBOR item kept as the bytes it arrived in: checked once, stored and sent on as
    they are (``protocol.codec.encode`` writes them in place)."""

    __slots__ = ("cbor",)

    def __init__(self, cbor: bytes) -> None:
        self.cbor = cbor

    def load(self) -> Any:
        """The item as Python objects (for tests and tools, never the server's path)."""
        return cbor2.loads(self.cbor)

    def __eq__(self, other: object) -> bool:
        return type(other) is Raw and other.cbor == self.cbor

    def __hash__(self) -> int:
        return hash(self.cbor)

    def __repr__(self) -> str:
        return f"Raw({self.cbor.hex()})"


def raw_cbor(value: Any) -> bytes:
    """The CBOR of a payload: its own bytes if ``Raw``, else encoded (tests, tools)."""
    return value.cbor if type(value) is Raw else cbor2.dumps(value)


class Truncated(RemoteProtocolError):
    """An item runs past the end given: the frame's, or a payload's size limit."""

    def __init__(self) -> None:
        super().__init__(ErrorCode.BAD_FRAME, "truncated CBOR item")


def bad_frame(message: str) -> NoReturn:
    raise RemoteProtocolError(ErrorCode.BAD_FRAME, message)


def invalid(message: str) -> NoReturn:
    raise RemoteProtocolError(ErrorCode.INVALID, message)


def head(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """The item starting at ``pos``: (major type, argument, position after the head).
    For major type 7 the argument is the simple value or the float's bits."""
    if pos >= end:
        raise Truncated
    b = buf[pos]
    info = b & 31
    if info < 24:
        return b >> 5, info, pos + 1
    size = _ARG_BYTES[info]
    if not size:
        if info == 31:
            bad_frame("indefinite-length CBOR items are not accepted")
        bad_frame("malformed CBOR item")
    stop = pos + 1 + size
    if stop > end:
        raise Truncated
    return b >> 5, int.from_bytes(buf[pos + 1 : stop], "big"), stop


def read_text(buf: bytes, pos: int, end: int, n: int) -> tuple[str, int]:
    """The ``n`` bytes of a text string's content at ``pos``, decoded."""
    stop = pos + n
    if stop > end:
        raise Truncated
    try:
        return buf[pos:stop].decode(), stop
    except UnicodeDecodeError:
        bad_frame("text is not UTF-8")


def container_size(major: int, n: int, pos: int, end: int) -> int:
    """Items an array or map of ``n`` holds, refused at once when the frame cannot hold
    them (each item takes a byte at least): a length is never trusted beyond the bytes."""
    items = n << 1 if major == MAP else n
    if items > end - pos:
        raise Truncated
    return items


def skip(buf: bytes, pos: int, end: int, levels: int) -> int:
    """Walk over one well-formed item whose contents are ignored; nesting deeper than
    ``levels`` arrays and maps is refused (100). The position after it."""
    stack: list[int] = []  # items left in each open container
    left = 1
    sizes = _SKIP_SIZES if levels else _SKIP_LEAF_SIZES
    while True:
        while not left:
            if not stack:
                return pos
            left = stack.pop()
            sizes = _SKIP_SIZES
        left -= 1
        if pos >= end:
            raise Truncated
        size = sizes[buf[pos]]
        if size:
            pos += size
            if pos > end:
                raise Truncated
            continue
        start = pos
        major, arg, pos = head(buf, pos, end)
        if major == TEXT:
            _, pos = read_text(buf, pos, end, arg)
        elif major == BYTES:
            pos += arg
            if pos > end:
                raise Truncated
        elif major == ARRAY or major == MAP:
            items = container_size(major, arg, pos, end)
            if len(stack) >= levels:
                bad_frame(f"CBOR nested deeper than {FRAME_LEVELS} arrays and maps")
            if items:
                stack.append(left)
                left = items
                if len(stack) >= levels:
                    sizes = _SKIP_LEAF_SIZES
        elif major == 6:
            bad_frame("CBOR tags are not accepted")
        elif major == 7 and arg < 32 and buf[start] == 0xF8:
            bad_frame("malformed CBOR simple value")  # RFC 8949 3.3: 0-31 take one byte


_ONE_KEY: set[str] = set()  # stands for the keys of a map of one pair: never added to


def walk_payload(buf: bytes, pos: int, end: int, levels: int) -> int:
    """Walk over one item of an application payload (``data``, a kv value), checking it
    holds only what every client can represent: null, booleans, integers, finite floats,
    text, byte strings, and arrays and maps with text keys, at most ``levels`` of them
    nested. The position after it."""
    stack: list[tuple[int, set[str] | None]] = []
    left = 1
    keys: set[str] | None = None  # the keys of the map being read; None in an array
    sizes = _PAYLOAD_SIZES if levels else _PAYLOAD_LEAF_SIZES
    while True:
        while not left:
            if not stack:
                return pos
            left, keys = stack.pop()
            sizes = _PAYLOAD_SIZES
        is_key = keys is not None and not left & 1
        left -= 1
        if pos >= end:
            raise Truncated
        if not is_key:
            size = sizes[buf[pos]]
            if size:
                pos += size
                if pos > end:
                    raise Truncated
                continue
        start = pos
        major, arg, pos = head(buf, pos, end)
        if major == TEXT:
            text, pos = read_text(buf, pos, end, arg)
            if is_key and keys is not _ONE_KEY:
                assert keys is not None
                if text in keys:
                    bad_frame("duplicate map key in a payload")
                keys.add(text)
            continue
        if major == 6:
            bad_frame("CBOR tags are not accepted")
        if is_key:
            invalid("payload map keys must be text")
        # Integers, false, true and null never come here: the size table steps over them.
        if major == BYTES:
            pos += arg
            if pos > end:
                raise Truncated
        elif major == ARRAY or major == MAP:
            items = container_size(major, arg, pos, end)
            if len(stack) >= levels:
                invalid(f"payload nests more than {levels} arrays and maps")
            if items:
                stack.append((left, keys))
                left = items
                # A map's keys, to refuse duplicates; a set only where two keys can meet.
                keys = (set() if items > 2 else _ONE_KEY) if major == MAP else None
                if len(stack) >= levels:
                    sizes = _PAYLOAD_LEAF_SIZES
        else:
            _check_simple(buf[start] & 31, arg)


def _check_simple(info: int, arg: int) -> None:
    """A major type 7 item of a payload but false, true and null: a finite float."""
    if info == 25:
        finite = arg & 0x7C00 != 0x7C00
    elif info == 26:
        finite = arg & 0x7F800000 != 0x7F800000
    elif info == 27:
        finite = arg & 0x7FF0000000000000 != 0x7FF0000000000000
    else:
        invalid("payloads hold no undefined or other simple values")
    if not finite:
        invalid("payload floats must be finite")
