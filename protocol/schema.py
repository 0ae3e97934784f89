"""Reading frames by schema: each frame class's fields, and a reader for each.

How this works: each frame class has a schema: for each field key, the field's name and
a reader made from the field's type (``_reader_for``). A reader takes ``(buf, pos, end,
limits)`` and returns the value and the position after it, on top of the strict CBOR
reader of ``protocol.cbor``; ``limits`` is None on the client side, where payloads are
loaded as Python objects instead of kept as ``Raw``. A reader checks a length before it
reads a single element, unknown keys are walked over, and the first refusal ends the
decode: one pass over the frame (``protocol.codec`` has the entry points).
"""

import math
import struct
import typing
from collections.abc import Callable
from enum import IntEnum
from typing import Any, NoReturn

import attrs
import cbor2

from protocol.cbor import (
    ARRAY,
    FRAME_LEVELS,
    MAP,
    NULL,
    TEXT,
    Raw,
    Truncated,
    bad_frame,
    container_size,
    head,
    read_text,
    skip,
    walk_payload,
)
from protocol.errors import ErrorCode, RemoteProtocolError
from protocol.frames import (
    CLIENT_FRAMES,
    FIELD_KEYS,
    SERVER_FRAMES,
    TYPE_KEY,
    Frame,
    Hello,
    Interests,
    KvPut,
    Message,
    Page,
    Unwatch,
    Watch,
    Who,
)
from protocol.limits import (
    MAX_DATA_DEPTH,
    MAX_INTERESTS,
    MAX_UINT,
    MAX_USERS_PER_REQUEST,
    Limits,
)

Reader = Callable[[bytes, int, int, Limits | None], tuple[Any, int]]


class _Refused(Exception):
    """A value the schema refuses; ``reason`` reads after the field's name."""

    def __init__(self, reason: str, code: ErrorCode = ErrorCode.INVALID) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


@attrs.frozen
class _Schema:
    cls: type
    name: str  # the frame's name, or the item's class
    readers: dict[int, tuple[str, Reader]]
    required: tuple[str, ...]
    levels: int  # arrays and maps an unknown field may nest
    shared: str | None = None  # items of a page take this field from the frame


def _wrong(major: int, expected: str) -> NoReturn:
    """Refuse a value of the wrong type: 102, but a tag is refused as such (100)."""
    if major == 6:
        bad_frame("CBOR tags are not accepted")
    raise _Refused(expected)


def _uint(buf: bytes, pos: int, end: int, limits: Limits | None) -> tuple[int, int]:
    b = buf[pos] if pos < end else -1
    if 0 <= b < 24:
        return b, pos + 1
    if b == 0x1B and pos + 9 <= end:  # 8 bytes: a kv clock, a timestamp in ms << 10
        value = int.from_bytes(buf[pos + 1 : pos + 9], "big")
        if value > MAX_UINT:
            raise _Refused("must be an unsigned integer up to 2^53-1")
        return value, pos + 9
    major, value, pos = head(buf, pos, end)
    if major or value > MAX_UINT:
        _wrong(major, "must be an unsigned integer up to 2^53-1")
    return value, pos


def _text(buf: bytes, pos: int, end: int, limits: Limits | None) -> tuple[str, int]:
    if pos < end and 0x60 <= buf[pos] < 0x78:  # under 24 bytes (ids, cids): no head
        return read_text(buf, pos + 1, end, buf[pos] - 0x60)
    major, n, pos = head(buf, pos, end)
    if major != TEXT:
        _wrong(major, "must be text")
    return read_text(buf, pos, end, n)


_FLOATS = {25: ">e", 26: ">f", 27: ">d"}


def _float(buf: bytes, pos: int, end: int, limits: Limits | None) -> tuple[float, int]:
    """A finite number: a CBOR float of any width, or an integer (a whole degree)."""
    start = pos
    major, value, pos = head(buf, pos, end)
    if major == 0:
        return float(value), pos
    if major == 1:
        return float(-1 - value), pos
    fmt = _FLOATS.get(buf[start] & 31) if major == 7 else None
    if fmt is None:
        _wrong(major, "must be a number")
    number: float = struct.unpack(fmt, buf[start + 1 : pos])[0]
    if not math.isfinite(number):
        raise _Refused("must be a finite number")
    return number, pos


def _bool(buf: bytes, pos: int, end: int, limits: Limits | None) -> tuple[bool, int]:
    major, value, pos = head(buf, pos, end)
    if major != 7 or value not in (20, 21):
        _wrong(major, "must be true or false")
    return value == 21, pos


def _optional(read: Reader) -> Reader:
    def optional(buf: bytes, pos: int, end: int, limits: Limits | None) -> tuple[Any, int]:
        if pos < end and buf[pos] == NULL:
            return None, pos + 1
        return read(buf, pos, end, limits)

    return optional


def _enum(kind: type[IntEnum]) -> Reader:
    allowed = ", ".join(str(int(m)) for m in kind)

    def enum(buf: bytes, pos: int, end: int, limits: Limits | None) -> tuple[IntEnum, int]:
        value, pos = _uint(buf, pos, end, limits)
        try:
            return kind(value), pos
        except ValueError:
            raise _Refused(f"must be one of {allowed}") from None

    return enum


#: The most elements an array field may hold, checked before any is read: a function of
#: the limits, the error code, and what the elements are called.
Cap = tuple[Callable[[Limits], int], ErrorCode, str]


def _container(
    buf: bytes, pos: int, end: int, limits: Limits | None, major: int, cap: Cap | None
) -> tuple[int, int]:
    """The length of the array or map (``major``) at ``pos``, refused beyond its cap
    before any element is read; and where its elements start."""
    found, n, pos = head(buf, pos, end)
    if found != major:
        _wrong(found, "must be an array" if major == ARRAY else "must be a map")
    container_size(major, n, pos, end)
    if cap is not None and limits is not None and n > cap[0](limits):
        raise _Refused(f"holds more than {cap[0](limits)} {cap[2]}", cap[1])
    return n, pos


def _array(element: Reader, cap: Cap | None) -> Reader:
    def array(buf: bytes, pos: int, end: int, limits: Limits | None) -> tuple[Any, int]:
        n, pos = _container(buf, pos, end, limits, ARRAY, cap)
        out = []
        for i in range(n):
            try:
                value, pos = element(buf, pos, end, limits)
            except _Refused as exc:
                exc.reason = f"[{i}] {exc.reason}"
                raise
            out.append(value)
        return tuple(out), pos

    return array


def _text_map(value: Reader, cap: Cap | None) -> Reader:
    """A map with text keys, like ``resume`` and ``welcome.limits``."""

    def text_map(buf: bytes, pos: int, end: int, limits: Limits | None) -> tuple[Any, int]:
        n, pos = _container(buf, pos, end, limits, MAP, cap)
        out: dict[str, Any] = {}
        for _ in range(n):
            try:
                key, pos = _text(buf, pos, end, limits)
            except _Refused:
                raise _Refused("keys must be text") from None
            if key in out:
                bad_frame("duplicate map key")
            out[key], pos = value(buf, pos, end, limits)
        return out, pos

    return text_map


def _seq_epoch(buf: bytes, pos: int, end: int, limits: Limits | None) -> tuple[Any, int]:
    major, n, pos = head(buf, pos, end)
    if major != ARRAY or n != 2:
        _wrong(major, "values must be [seq, epoch]")
    seq, pos = _uint(buf, pos, end, limits)
    epoch, pos = _text(buf, pos, end, limits)
    return (seq, epoch), pos


def _payload(*, must_be_map: bool) -> Reader:
    """``data`` (a map) or a kv value (any item), walked no further than its size limit."""

    def payload(buf: bytes, pos: int, end: int, limits: Limits | None) -> tuple[Any, int]:
        if pos >= end:
            raise Truncated
        if must_be_map and buf[pos] >> 5 != MAP:
            _wrong(buf[pos] >> 5, "must be a map")
        start = pos
        if limits is None:
            pos = walk_payload(buf, pos, end, MAX_DATA_DEPTH)
            return cbor2.loads(buf[start:pos]), pos
        most = limits.max_data_bytes if must_be_map else limits.kv_value_bytes
        cut = min(end, start + most)
        try:
            pos = walk_payload(buf, pos, cut, MAX_DATA_DEPTH)
        except Truncated:
            if cut == end:
                raise
            raise _Refused(f"larger than {most} bytes", ErrorCode.TOO_LARGE) from None
        return Raw(buf[start:pos]), pos

    return payload


def _read_map(
    buf: bytes, pos: int, end: int, schema: _Schema, limits: Limits | None
) -> tuple[dict[str, Any], int]:
    """The fields of an item map (``items`` elements), by ``schema``."""
    n, pos = _container(buf, pos, end, limits, MAP, None)
    fields: dict[str, Any] = {}
    seen: set[int] = set()
    for _ in range(n):
        pos = _read_field(buf, pos, end, schema, limits, fields, seen)
    _check_required(schema, fields)
    return fields, pos


def _read_field(
    buf: bytes,
    pos: int,
    end: int,
    schema: _Schema,
    limits: Limits | None,
    fields: dict[str, Any],
    seen: set[int],
) -> int:
    """Read one key and its value into ``fields``; the position after them. ``seen``:
    the keys met so far that ``fields`` does not show (unknown ones, and any before the
    type), to refuse a second of them."""
    b = buf[pos] if pos < end else -1
    if 0 <= b < 24:  # keys 0-23 are one byte, 24-255 two: no head for them
        key = b
        pos += 1
    elif b == 0x18 and pos + 1 < end:
        key = buf[pos + 1]
        pos += 2
    else:
        major, key, pos = head(buf, pos, end)
        if major:
            bad_frame("map keys of a frame must be unsigned integers")
    found = schema.readers.get(key)
    if found is None:
        if key in seen:
            bad_frame("duplicate map key")
        seen.add(key)
        return skip(buf, pos, end, schema.levels)  # unknown keys are ignored
    name, read = found
    if name in fields or (seen and key in seen):
        bad_frame("duplicate map key")
    try:
        fields[name], pos = read(buf, pos, end, limits)
    except _Refused as exc:
        exc.reason = f"{name} {exc.reason}"
        raise
    return pos


def _check_required(schema: _Schema, fields: dict[str, Any]) -> None:
    for name in schema.required:
        if name not in fields:
            raise _Refused(f"{name} is missing")


def decode_frame(payload: bytes, schemas: dict[int, "_Schema"], limits: Limits | None) -> Frame:
    """The frame in ``payload``, of one of ``schemas``' types; raises ``RemoteProtocolError``
    (with the request's id when it could be read)."""
    buf = payload
    end = len(buf)
    if end and 0xA0 <= buf[0] < 0xB8:  # a map of under 24 keys, as every frame is
        n, pos = buf[0] - 0xA0, 1
    else:
        major, n, pos = head(buf, 0, end)
        if major != MAP:
            bad_frame("a frame must be a CBOR map")
    container_size(MAP, n, pos, end)
    schema: _Schema | None = None
    fields: dict[str, Any] = {}
    seen: set[int] = set()
    later: list[int] = []  # where fields met before the type (key 0) start: 45 at most
    try:
        while n and schema is None:
            n -= 1
            start = pos
            major, key, pos = head(buf, pos, end)
            if major:
                bad_frame("map keys of a frame must be unsigned integers")
            if key in seen:
                bad_frame("duplicate map key")
            seen.add(key)
            if key != TYPE_KEY:
                if key in _FIELD_KEYS:  # unknown keys are walked over, not remembered
                    later.append(start)
                pos = skip(buf, pos, end, FRAME_LEVELS - 1)
                continue
            major, kind, pos = head(buf, pos, end)
            if major:
                bad_frame("the frame type (key 0) must be an unsigned integer")
            schema = schemas.get(kind)
            if schema is None:
                raise RemoteProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {kind}")
        if schema is None:
            bad_frame("missing frame type (key 0)")
        for i in range(n):
            start = pos
            try:
                pos = _read_field(buf, pos, end, schema, limits, fields, seen)
            except (_Refused, RemoteProtocolError) as exc:
                # The id, if it comes later: walk the keys from here (and not again over
                # those read already), to name the request in the error; not past a
                # fault in the CBOR itself.
                bad_cbor = isinstance(exc, RemoteProtocolError) and exc.code is ErrorCode.BAD_FRAME
                if "id" not in fields and not bad_cbor:
                    fields["id"] = _find_keys(buf, start, end, n - i, (1,)).get(1)
                raise
        if pos != end:
            bad_frame("bytes after the frame's CBOR item")
        for start in later:  # a second of these was refused in the loop above
            if _key_at(buf, start, end) in schema.readers:  # else walked over already
                _read_field(buf, start, end, schema, limits, fields, set())
        _check_required(schema, fields)
        if schema.shared is not None:  # a page: its messages take the page's room
            room = fields[schema.shared]
            fields["items"] = tuple(Message(room=room, **f) for f in fields["items"])
        frame: Frame = schema.cls(**fields)
    except _Refused as exc:
        assert schema is not None
        error = RemoteProtocolError(exc.code, f"{schema.name}: {exc.reason}")
        error.request_id = _request_id(buf, end, fields, later)
        raise error from None
    except RemoteProtocolError as exc:
        exc.request_id = _request_id(buf, end, fields, later)
        raise
    return frame


def _key_at(buf: bytes, pos: int, end: int) -> int:
    return head(buf, pos, end)[1]


def _request_id(buf: bytes, end: int, fields: dict[str, Any], later: list[int]) -> int | None:
    """The id read so far: as a field, or among the keys before the type."""
    request_id: int | None = fields.get("id")
    if request_id is None:
        for start in later:
            _, key, pos = head(buf, start, end)
            if key == 1:
                return _id_at(buf, pos, end)
    return request_id


def _reader_for(cls: type, name: str, hint: Any) -> Reader:
    """The reader of field ``name`` of ``cls``, from its type."""
    if name in _PAYLOADS:  # data may be null, meaning none; a kv value null is None
        return _optional(_payload(must_be_map=name == "data"))
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if type(None) in typing.get_args(hint) and len(args) == 1:
        return _optional(_reader_for(cls, name, args[0]))
    if hint is int:
        return _uint
    if hint is str:
        return _text
    if hint is bool:
        return _bool
    if hint is float:
        return _float
    if isinstance(hint, type) and issubclass(hint, IntEnum):
        return _enum(hint)
    origin = typing.get_origin(hint)
    cap = _CAPS.get((cls, name))
    if origin is tuple and args[0] is str:
        return _array(_text, cap)
    if origin is tuple and args[0] is int:
        return _array(_uint, cap)
    if origin is tuple and args[0] is float:
        return _array(_float, cap)
    if origin is tuple:
        item = _item_schema(args[0], _SHARED.get(cls))
        if item.shared is not None:  # built by decode_frame, which has the shared field
            return _array(lambda b, p, e, lim: _read_map(b, p, e, item, lim), cap)
        return _array(lambda b, p, e, lim: _build(item, *_read_map(b, p, e, item, lim)), cap)
    if hint == dict[str, int]:
        return _text_map(_uint, None)
    if hint == dict[str, tuple[int, str]]:
        return _text_map(_seq_epoch, cap)
    raise TypeError(f"no reader for {cls.__name__}.{name}: {hint}")


def _build(schema: _Schema, fields: dict[str, Any], pos: int) -> tuple[Any, int]:
    return schema.cls(**fields), pos


_PAYLOADS = {"data", "value"}
_FIELD_KEYS = frozenset(FIELD_KEYS.values())
_SHARED: dict[type, str] = {Page: "room"}
_CAPS: dict[tuple[type, str], Cap] = {
    (Hello, "resume"): (lambda lim: lim.max_rooms_per_session, ErrorCode.TOO_LARGE, "rooms"),
    (KvPut, "items"): (lambda lim: lim.kv_batch, ErrorCode.TOO_LARGE, "writes"),
    (Interests, "interests"): (lambda _: MAX_INTERESTS, ErrorCode.INVALID, "categories"),
    **{
        (cls, "users"): (lambda _: MAX_USERS_PER_REQUEST, ErrorCode.INVALID, "users")
        for cls in (Who, Watch, Unwatch)
    },
}


def _schema(
    cls: type, name: str, levels: int, *, shared: str | None = None, omit: str | None = None
) -> _Schema:
    hints = typing.get_type_hints(cls)
    readers = {}
    required = []
    for a in attrs.fields(cls):
        if a.name == omit:
            continue
        readers[FIELD_KEYS[a.name]] = (a.name, _reader_for(cls, a.name, hints[a.name]))
        if a.default is attrs.NOTHING:
            required.append(a.name)
    return _Schema(cls, name, readers, tuple(required), levels, shared)


def _item_schema(cls: type, shared: str | None) -> _Schema:
    # An item map is nested in the frame's map and its items array.
    return _schema(cls, cls.__name__.lower(), FRAME_LEVELS - 3, shared=shared, omit=shared)


CLIENT_SCHEMAS = {
    cls.TYPE: _schema(cls, cls.__name__.lower(), FRAME_LEVELS - 1) for cls in CLIENT_FRAMES
}
SERVER_SCHEMAS = {
    cls.TYPE: _schema(cls, cls.__name__.lower(), FRAME_LEVELS - 1, shared=_SHARED.get(cls))
    for cls in SERVER_FRAMES
}


def _find_keys(buf: bytes, pos: int, end: int, n: int, wanted: tuple[int, ...]) -> dict[int, int]:
    """The unsigned integers under the ``wanted`` keys among the ``n`` keys from
    ``pos``, walking over the rest; what was found before anything unreadable."""
    found: dict[int, int] = {}
    try:
        for _ in range(n):
            major, key, after = head(buf, pos, end)
            pos = skip(buf, pos, end, 0) if major else after  # a key that is no uint
            if not major and key in wanted and key not in found:
                value = _id_at(buf, pos, end) if key == 1 else _uint_at(buf, pos, end)
                if value is not None:
                    found[key] = value
                if len(found) == len(wanted):
                    break
            pos = skip(buf, pos, end, FRAME_LEVELS - 1)
    except RemoteProtocolError:
        pass
    return found


def _uint_at(buf: bytes, pos: int, end: int) -> int | None:
    major, value, _ = head(buf, pos, end)
    return None if major else value


def _id_at(buf: bytes, pos: int, end: int) -> int | None:
    """A request id at ``pos``, if it is one the protocol can carry."""
    try:
        value = _uint_at(buf, pos, end)
    except RemoteProtocolError:
        return None
    return value if value is not None and value <= MAX_UINT else None


def peek(payload: bytes) -> tuple[int | None, int | None]:
    """The type (key 0) and request id (key 1) of a frame, reading nothing else: what the
    server answers a frame with before it decodes it, or when it cannot. None for what is
    not there or not readable, and for an id out of the protocol's range."""
    end = len(payload)
    try:
        major, n, pos = head(payload, 0, end)
    except RemoteProtocolError:
        return None, None
    if major != MAP:
        return None, None
    found = _find_keys(payload, pos, end, n, (TYPE_KEY, 1))
    return found.get(TYPE_KEY), found.get(1)
