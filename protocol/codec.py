"""Stateless CBOR codec: frames to bytes and back.

``encode`` is deterministic (key 0 first, then ascending field keys; a field equal to
its default is left out), so the same frame always has the same bytes; the hex vectors
in PROTOCOL.md rely on it. A payload kept as ``Raw`` (``data``, kv values, as the server
holds them) is written as the bytes it came in.

``decode_client`` is what the server runs on untrusted input. It reads the frame
straight from its bytes by the schema of its type (``protocol.schema``, on the strict
CBOR reader of ``protocol.cbor``): each length is checked before any element is read,
unknown keys are walked over without building anything, payloads are checked and kept
as their bytes, and the first refusal ends it.
So its cost is one pass over the frame, and its memory what the frame holds
(BENCHMARKS.md, "Decoding"). It raises ``RemoteProtocolError`` only: the code says what
was wrong (PROTOCOL.md section 12), the message is short and never repeats the input.
``protocol.validate`` then checks what types cannot say. ``peek`` reads the type and the
request id alone, for a frame the server will not decode (before ``hello``).
"""

from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import cbor2

from protocol.cbor import Raw
from protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocol.frames import (
    CLIENT_FRAMES,
    FIELD_KEYS,
    SERVER_FRAMES,
    TYPE_KEY,
    Cursor,
    FeedChanged,
    FeedItem,
    FeedPage,
    Frame,
    KvAck,
    KvChanged,
    KvChanges,
    KvEntry,
    KvPut,
    KvResult,
    KvWrite,
    Message,
    Page,
    PresenceList,
    PresenceState,
    ReceiptCounts,
    ReceiptState,
    RoomList,
    RoomState,
    SeqCount,
)
from protocol.limits import Limits
from protocol.schema import CLIENT_SCHEMAS, SERVER_SCHEMAS, decode_frame, peek

__all__ = ["decode_client", "decode_server", "encode", "from_fields", "peek", "to_map"]
from protocol.validate import validate

F = TypeVar("F", bound=Frame)


# --- encoding -----------------------------------------------------------------------


@attrs.frozen
class _Field:
    name: str
    key: int
    optional: bool  # has a default; left out of the map when equal to it
    default: object  # None, False or an enum member: compared by identity


def _fields_of(cls: type) -> tuple[_Field, ...]:
    fields = []
    for a in attrs.fields(cls):
        optional = a.default is not attrs.NOTHING
        fields.append(_Field(a.name, FIELD_KEYS[a.name], optional, a.default))
    return tuple(sorted(fields, key=lambda f: f.key))


_FIELDS: dict[type[Frame], tuple[_Field, ...]] = {
    cls: _fields_of(cls) for cls in {*CLIENT_FRAMES, *SERVER_FRAMES}
}


@attrs.frozen
class _Items:
    """How a frame's ``items`` are encoded: maps of ``cls`` without the ``shared`` field,
    which the frame names once for all of them."""

    cls: type
    fields: tuple[_Field, ...]
    names: dict[int, str]
    shared: str | None
    to_map: Callable[[Any], dict[int, Any]]


def _compile_to_map(
    fields: tuple[_Field, ...], type_id: int | None
) -> Callable[[Any], dict[int, Any]]:
    """The map-building loop unrolled for one class, as attrs and cattrs generate their
    methods: the generic loop (``getattr`` and a default test per field) was a third of
    ``encode``'s time in the 1:1 chat benchmark (BENCHMARKS.md). Same keys, same order."""
    lines = [
        "def to_map(obj):",
        "    out = {}" if type_id is None else f"    out = {{{TYPE_KEY}: {type_id}}}",
    ]
    namespace: dict[str, Any] = {}
    for i, f in enumerate(fields):
        if f.optional:
            namespace[f"default{i}"] = f.default
            lines.append(f"    value = obj.{f.name}")
            lines.append(f"    if value is not default{i}:")
            lines.append(f"        out[{f.key}] = value")
        else:
            lines.append(f"    out[{f.key}] = obj.{f.name}")
    lines.append("    return out")
    exec("\n".join(lines), namespace)
    compiled: Callable[[Any], dict[int, Any]] = namespace["to_map"]
    return compiled


def _items(cls: type, shared: str | None) -> _Items:
    fields = tuple(f for f in _fields_of(cls) if f.name != shared)
    return _Items(
        cls, fields, {f.key: f.name for f in fields}, shared, _compile_to_map(fields, None)
    )


_ITEMS = {
    Page: _items(Message, "room"),
    RoomList: _items(RoomState, None),
    ReceiptState: _items(Cursor, None),
    ReceiptCounts: _items(SeqCount, None),
    PresenceList: _items(PresenceState, None),
    KvPut: _items(KvWrite, None),
    KvAck: _items(KvResult, None),
    KvChanges: _items(KvEntry, None),
    KvChanged: _items(KvEntry, None),
    FeedPage: _items(FeedItem, None),
    FeedChanged: _items(FeedItem, None),
}


_TO_MAP = {cls: _compile_to_map(fields, cls.TYPE) for cls, fields in _FIELDS.items()}
_ITEMS_KEY = FIELD_KEYS["items"]


def to_map(frame: Frame) -> dict[int, Any]:
    """The CBOR map of ``frame``, before serialization."""
    out = _TO_MAP[type(frame)](frame)
    items = _ITEMS.get(type(frame))
    if items is not None:
        out[_ITEMS_KEY] = [items.to_map(i) for i in frame.items]  # type: ignore[attr-defined]
    return out


def _write_raw(encoder: cbor2.CBOREncoder, value: object) -> None:
    if type(value) is not Raw:
        raise TypeError(f"cannot encode {type(value).__name__}")
    encoder.write(value.cbor)


def encode(frame: Frame) -> bytes:
    """Serialize ``frame``; raises ``LocalProtocolError`` if it cannot be."""
    try:
        return cbor2.dumps(to_map(frame), default=_write_raw)
    except (KeyError, TypeError, ValueError, cbor2.CBOREncodeError) as exc:
        raise LocalProtocolError(ErrorCode.INVALID, f"cannot encode {frame!r}: {exc}") from exc


def decode_client(payload: bytes, limits: Limits) -> Frame:
    """Decode and validate a frame a client sent. Raises ``RemoteProtocolError`` only,
    whose ``request_id`` is the frame's id when it can be read."""
    if len(payload) > limits.max_frame_bytes:
        error = RemoteProtocolError(
            ErrorCode.TOO_LARGE, f"frame over {limits.max_frame_bytes} bytes"
        )
        error.request_id = peek(payload)[1]
        raise error
    try:
        frame = decode_frame(payload, CLIENT_SCHEMAS, limits)
    except RemoteProtocolError as exc:
        # The decode found the id if it could be found (a frame that is not well-formed
        # is not read past the fault), but for an unknown type it stopped at once.
        if exc.code is ErrorCode.UNKNOWN_TYPE:
            exc.request_id = peek(payload)[1]
        raise
    try:
        validate(frame, limits)
    except RemoteProtocolError as exc:
        exc.request_id = getattr(frame, "id", None)
        raise
    return frame


def from_fields(cls: type[F], fields: dict[str, Any], limits: Limits) -> F:
    """Build and validate a client frame from named fields (JSON, forms, tests): they
    are encoded as the frame and decoded as if a client had sent it, so every rule of the
    wire applies. Raises ``RemoteProtocolError``."""
    wire = {TYPE_KEY: cls.TYPE}
    for name, value in fields.items():
        key = FIELD_KEYS.get(name)
        if key is None:
            raise RemoteProtocolError(ErrorCode.INVALID, f"no field {name[:40]!r}")
        if value is not None:
            wire[key] = value
    try:
        payload = cbor2.dumps(wire)
    except (TypeError, ValueError, cbor2.CBOREncodeError):
        raise RemoteProtocolError(ErrorCode.INVALID, "a value has no CBOR form") from None
    frame = decode_client(payload, limits)
    if type(frame) is not cls:  # cannot happen: the type is ours
        raise RemoteProtocolError(ErrorCode.INVALID, f"not a {cls.__name__.lower()}")
    return frame


def decode_server(payload: bytes) -> Frame:
    """Decode a frame the server sent (the client side); payloads are loaded as Python
    objects. Raises ``RemoteProtocolError``."""
    return decode_frame(payload, SERVER_SCHEMAS, None)
