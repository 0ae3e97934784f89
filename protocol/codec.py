"""Stateless CBOR codec: frames to bytes and back, with validation.

``encode`` is deterministic (key 0 first, then ascending field keys; a field equal to
its default is left out), so the same frame always has the same bytes; the hex
vectors in PROTOCOL.md rely on it. ``decode_client`` is what the server runs on untrusted
input: it never raises anything but ``RemoteProtocolError``, whose code says what was
wrong. Semantic tags are refused outright (they would let a peer build datetimes, regexes,
sets or cyclic structures inside our process); so are duplicate keys and trailing bytes.
"""

import io
import math
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import cattrs
import cbor2

from protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocol.frames import (
    CLIENT_FRAMES,
    FIELD_KEYS,
    SERVER_FRAMES,
    TYPE_KEY,
    Block,
    Create,
    Cursor,
    Direct,
    Frame,
    Hello,
    History,
    Invite,
    Join,
    KvAck,
    KvChanged,
    KvChanges,
    KvEntry,
    KvPut,
    KvResult,
    KvSync,
    KvWrite,
    Leave,
    MemberOp,
    Message,
    Page,
    PresenceList,
    PresenceState,
    Receipt,
    ReceiptCounts,
    Receipts,
    ReceiptState,
    RoomKind,
    RoomList,
    Rooms,
    RoomState,
    Send,
    SeqCount,
    SetStatus,
    Status,
    Typing,
    TypingOp,
    Unblock,
    Unsubscribe,
    Unwatch,
    Watch,
    Who,
)
from protocol.limits import (
    DIRECT_PREFIX,
    MAX_CID_CHARS,
    MAX_DATA_DEPTH,
    MAX_EPOCH_CHARS,
    MAX_KV_PAGE,
    MAX_RECEIPT_RANGE,
    MAX_ROOM_PAGE,
    MAX_UINT,
    MAX_USERS_PER_REQUEST,
    Limits,
    is_device_id,
    is_room_id,
    is_user_id,
)

MAX_TOKEN_CHARS = 4096
F = TypeVar("F", bound=Frame)
# cbor2's built-in semantic tags; each is refused, as is any other tag (tag_hook).
_SEMANTIC_TAGS: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100)
_SEMANTIC_TAGS += (256, 258, 260, 261, 1004, 43000, 55799)


def _refuse_tag(*_: object) -> Any:
    raise ValueError("CBOR tags are not allowed")


_REFUSE_TAGS = {tag: _refuse_tag for tag in _SEMANTIC_TAGS}


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


def encode(frame: Frame) -> bytes:
    """Serialize ``frame``; raises ``LocalProtocolError`` if it cannot be."""
    try:
        return cbor2.dumps(to_map(frame))
    except (KeyError, TypeError, ValueError, cbor2.CBOREncodeError) as exc:
        raise LocalProtocolError(ErrorCode.INVALID, f"cannot encode {frame!r}: {exc}") from exc


# --- decoding -----------------------------------------------------------------------


def _strict(kind: type, check: Any = None) -> Any:
    def hook(value: Any, _: type) -> Any:
        if type(value) is not kind:
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        if check is not None and not check(value):
            raise ValueError(f"{value!r} is out of range")
        return value

    return hook


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=False, detailed_validation=True)
    conv.register_structure_hook(str, _strict(str))
    # Every integer in the protocol is unsigned and fits a JavaScript number.
    conv.register_structure_hook(int, _strict(int, lambda v: 0 <= v <= MAX_UINT))
    conv.register_structure_hook(bool, _strict(bool))
    conv.register_structure_hook_func(lambda t: t == dict[str, Any], _strict(dict))
    for enum in (RoomKind, MemberOp, TypingOp, Status):
        conv.register_structure_hook(enum, lambda v, t: t(_strict(int)(v, int)))
    # cattrs would turn a string into a tuple of its characters.
    conv.register_structure_hook_func(
        lambda t: t == tuple[str, ...],
        lambda v, _: tuple(_strict(str)(u, str) for u in _strict(list)(v, list)),
    )
    return conv


_converter = _make_converter()

_CLIENT_TYPES = {cls.TYPE: cls for cls in CLIENT_FRAMES}
_SERVER_TYPES = {cls.TYPE: cls for cls in SERVER_FRAMES}
_NAMES_BY_CLASS = {cls: {f.key: f.name for f in fields} for cls, fields in _FIELDS.items()}
# The converter's generated function per class, looked up once rather than per frame.
_STRUCTURE = {cls: _converter.get_structure_hook(cls) for cls in _FIELDS}


class _Decoder(threading.local):
    """One strict decoder per thread, pointed at each payload in turn: constructing a
    ``CBORDecoder`` (and its tag table) per frame cost as much as decoding the frame."""

    def __init__(self) -> None:
        self.decoder = cbor2.CBORDecoder(
            io.BytesIO(),
            semantic_decoders=_REFUSE_TAGS,
            tag_hook=_refuse_tag,
            max_depth=MAX_DATA_DEPTH + 4,
            allow_duplicate_keys=False,
        )


_decoders = _Decoder()


def _loads(payload: bytes) -> Any:
    decoder = _decoders.decoder
    decoder.fp = fp = io.BytesIO(payload)
    try:
        obj = decoder.decode()
    except Exception as exc:  # cbor2 raises several types on hostile input
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"not a CBOR item: {exc}") from exc
    if fp.tell() != len(payload):
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, "trailing bytes after the CBOR item")
    return obj


def _structure(obj: Any, types: dict[int, type[Frame]]) -> Frame:
    if type(obj) is not dict:
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, "a frame must be a CBOR map")
    t = obj.get(TYPE_KEY)
    if type(t) is not int:
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, "missing frame type (key 0)")
    cls = types.get(t)
    if cls is None:
        raise RemoteProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {t}")
    names = _NAMES_BY_CLASS[cls]
    fields = {names[k]: v for k, v in obj.items() if k in names}
    items = _ITEMS.get(cls)
    if items is not None and isinstance(fields.get("items"), list):
        fields["items"] = [_item(item, items, fields) for item in fields["items"]]
    try:
        frame: Frame = _STRUCTURE[cls](fields, cls)
    except Exception as exc:  # cattrs groups every field's error
        raise _invalid_fields(cls, exc) from exc
    return frame


def _invalid_fields(cls: type[Frame], exc: Exception) -> RemoteProtocolError:
    detail = "; ".join(cattrs.transform_error(exc)) if isinstance(exc, ExceptionGroup) else exc
    return RemoteProtocolError(ErrorCode.INVALID, f"{cls.__name__.lower()}: {detail}")


def _item(item: Any, items: _Items, frame_fields: dict[str, Any]) -> Any:
    if type(item) is not dict:
        return item  # the converter reports it
    named = {items.names[k]: v for k, v in item.items() if k in items.names}
    if items.shared is not None:
        named[items.shared] = frame_fields.get(items.shared)
    return named


def decode_client(payload: bytes, limits: Limits) -> Frame:
    """Decode and validate a frame a client sent. Raises ``RemoteProtocolError``."""
    if len(payload) > limits.max_frame_bytes:
        raise RemoteProtocolError(
            ErrorCode.TOO_LARGE, f"frame of {len(payload)} bytes exceeds {limits.max_frame_bytes}"
        )
    obj = _loads(payload)
    try:
        frame = _structure(obj, _CLIENT_TYPES)
        validate(frame, limits)
    except RemoteProtocolError as exc:
        request_id = obj.get(FIELD_KEYS["id"]) if type(obj) is dict else None
        if type(request_id) is int:
            exc.request_id = request_id
        raise
    return frame


def from_fields(cls: type[F], fields: dict[str, Any], limits: Limits) -> F:
    """Build and validate a client frame from named fields (JSON, forms, tests)."""
    try:
        frame: F = _converter.structure(fields, cls)
    except Exception as exc:
        raise _invalid_fields(cls, exc) from exc
    validate(frame, limits)
    return frame


def decode_server(payload: bytes) -> Frame:
    """Decode a frame the server sent (the client side). Raises ``RemoteProtocolError``."""
    return _structure(_loads(payload), _SERVER_TYPES)


# --- validation ---------------------------------------------------------------------


def _invalid(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.INVALID, message)


def _too_large(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.TOO_LARGE, message)


def _check_room(room: str) -> None:
    if not is_room_id(room):
        raise _invalid(f"bad room id {room[:140]!r}: 1-128 of A-Z a-z 0-9 _ . @ + = ~ : -")


def _check_user(user: str) -> None:
    if not is_user_id(user):
        raise _invalid(f"bad user id {user[:80]!r}: 1-64 of A-Z a-z 0-9 _ . @ + = ~ -")


def check_data(value: Any, depth: int = 0) -> None:
    """Refuse anything in ``data`` a JSON-minded client could not represent."""
    if depth > MAX_DATA_DEPTH:
        raise _invalid(f"data nests deeper than {MAX_DATA_DEPTH}")
    kind = type(value)
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise _invalid("data map keys must be text")
            check_data(item, depth + 1)
    elif kind is list:
        for item in value:
            check_data(item, depth + 1)
    elif kind is float:
        if not math.isfinite(value):
            raise _invalid("data floats must be finite")
    elif kind is int:
        if not -(2**64) <= value < 2**64:  # beyond, CBOR needs a bignum tag
            raise _invalid("data integers must be within -2^64 .. 2^64-1")
    elif kind not in (str, int, bool, bytes, type(None)):
        raise _invalid(f"data may not hold {kind.__name__}")


def validate(frame: Frame, limits: Limits) -> None:
    """Check what types alone cannot: identifiers, lengths, combinations."""
    if isinstance(frame, Hello):
        if len(frame.token) > MAX_TOKEN_CHARS:
            raise _too_large("token too long")
        if frame.resume is not None:
            if len(frame.resume) > limits.max_rooms_per_session:
                raise _too_large(f"resume names more than {limits.max_rooms_per_session} rooms")
            for room, (_, epoch) in frame.resume.items():
                _check_room(room)
                if len(epoch) > MAX_EPOCH_CHARS:
                    raise _invalid("epoch too long")
    elif isinstance(frame, Send):
        _check_room(frame.room)
        if not 0 < len(frame.cid) <= MAX_CID_CHARS:
            raise _invalid(f"cid must be 1-{MAX_CID_CHARS} characters")
        # PostgreSQL text cannot hold NUL, and a record storage refuses would hold up
        # every write after it.
        if "\x00" in frame.cid or (frame.text is not None and "\x00" in frame.text):
            raise _invalid("cid and text may not contain NUL (U+0000)")
        if frame.text is None and frame.data is None:
            raise _invalid("send needs text, data or both")
        if frame.text is not None and len(frame.text) > limits.max_text_chars:
            raise _too_large(f"text longer than {limits.max_text_chars} characters")
        if frame.data is not None:
            check_data(frame.data)
            if len(cbor2.dumps(frame.data)) > limits.max_data_bytes:
                raise _too_large(f"data larger than {limits.max_data_bytes} bytes")
    elif isinstance(frame, Create):
        _check_room(frame.room)
        if frame.room.startswith(DIRECT_PREFIX):
            raise _invalid(f"room ids starting with {DIRECT_PREFIX!r} are for direct rooms")
        if frame.kind is RoomKind.DIRECT:
            raise _invalid("direct rooms are opened with a direct frame")
    elif isinstance(frame, Join):
        _check_room(frame.room)
        if (frame.seq is None) != (frame.epoch is None):
            raise _invalid("join resumes with both seq and epoch, or neither")
        if frame.epoch is not None and len(frame.epoch) > MAX_EPOCH_CHARS:
            raise _invalid("epoch too long")
    elif isinstance(frame, Leave | Unsubscribe):
        _check_room(frame.room)
    elif isinstance(frame, Invite):
        _check_room(frame.room)
        _check_user(frame.user)
    elif isinstance(frame, Direct):
        _check_user(frame.user)
    elif isinstance(frame, Rooms):
        if frame.room is not None:
            _check_room(frame.room)
        if frame.limit is not None and not 0 < frame.limit <= MAX_ROOM_PAGE:
            raise _invalid(f"limit must be 1-{MAX_ROOM_PAGE}")
    elif isinstance(frame, Receipt):
        _check_room(frame.room)
        if frame.delivered is None and frame.read is None:
            raise _invalid("receipt needs delivered, read or both")
    elif isinstance(frame, Receipts):
        _check_room(frame.room)
        if frame.limit is not None:
            if frame.seq is None:
                raise _invalid("receipts with a limit needs the first seq")
            if not 0 < frame.limit <= MAX_RECEIPT_RANGE:
                raise _invalid(f"limit must be 1-{MAX_RECEIPT_RANGE}")
    elif isinstance(frame, Typing):
        _check_room(frame.room)
    elif isinstance(frame, SetStatus):
        if frame.status is Status.OFFLINE:
            raise _invalid("status may be online, away or dnd; offline is the server's to say")
    elif isinstance(frame, Who | Watch | Unwatch):
        if not 0 < len(frame.users) <= MAX_USERS_PER_REQUEST:
            raise _invalid(f"name 1-{MAX_USERS_PER_REQUEST} users")
        for user in frame.users:
            _check_user(user)
    elif isinstance(frame, Block | Unblock):
        _check_user(frame.user)
    elif isinstance(frame, KvPut):
        _check_kv_put(frame, limits)
    elif isinstance(frame, KvSync):
        if frame.limit is not None and not 0 < frame.limit <= MAX_KV_PAGE:
            raise _invalid(f"limit must be 1-{MAX_KV_PAGE}")
    elif isinstance(frame, History):
        _check_room(frame.room)
        if frame.before is not None and frame.after is not None:
            raise _invalid("history takes before or after, not both")
        if frame.limit is not None and not 0 < frame.limit <= limits.max_history_limit:
            raise _invalid(f"limit must be 1-{limits.max_history_limit}")


def _check_kv_put(frame: KvPut, limits: Limits) -> None:
    if not is_device_id(frame.dev):
        raise _invalid(f"bad device id {frame.dev[:80]!r}: 1-64 of A-Z a-z 0-9 _ . @ + = ~ -")
    if not 0 < len(frame.items) <= limits.kv_batch:
        raise _too_large(f"kvput takes 1-{limits.kv_batch} writes")
    for write in frame.items:
        if not 0 < len(write.key.encode()) <= limits.kv_key_bytes or "\x00" in write.key:
            raise _invalid(f"a key is 1-{limits.kv_key_bytes} UTF-8 bytes, without NUL")
        if write.hlc == 0:
            raise _invalid(f"write of {write.key!r}: hlc must be above 0")
        if write.deleted:
            if write.value is not None:
                raise _invalid(f"delete of {write.key!r} carries a value")
            continue
        check_data(write.value)
        if len(cbor2.dumps(write.value)) > limits.kv_value_bytes:
            raise _too_large(f"value of {write.key!r} larger than {limits.kv_value_bytes} bytes")
