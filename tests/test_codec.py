"""protocol/codec.py: vectors from PROTOCOL.md, round trips, and hostile input."""

import re
from pathlib import Path
from typing import Any

import attrs
import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.cbor import Raw
from protocol.codec import decode_client, decode_server, encode, from_fields
from protocol.errors import CloseCode, ErrorCode, RemoteProtocolError
from protocol.frames import (
    CLIENT_FRAMES,
    FIELD_KEYS,
    SERVER_FRAMES,
    Create,
    Cursor,
    FeedChanged,
    FeedItem,
    FeedPage,
    Frame,
    Hello,
    History,
    Join,
    KvAck,
    KvChanged,
    KvChanges,
    KvEntry,
    KvPut,
    KvResult,
    KvWrite,
    Message,
    Page,
    Ping,
    Post,
    PresenceList,
    PresenceState,
    ReceiptCounts,
    ReceiptState,
    RoomKind,
    RoomList,
    Rooms,
    RoomState,
    Send,
    SeqCount,
    Status,
    Welcome,
)
from protocol.limits import Limits, direct_room_id, direct_room_users
from tests.vectors import VECTORS

PROTOCOL_MD = (Path(__file__).parent.parent / "PROTOCOL.md").read_text()
LIMITS = Limits()


def _doc_vectors() -> dict[str, str]:
    return dict(re.findall(r"^vector (\S+): ([0-9a-f]+)$", PROTOCOL_MD, re.MULTILINE))


def _decode_any(data: bytes, frame: Frame) -> Frame:
    if type(frame) in CLIENT_FRAMES:
        return loaded(decode_client(data, LIMITS))
    return decode_server(data)


def loaded(frame: Frame) -> Frame:
    """``frame`` with its payloads (kept as ``Raw`` by the server) as Python objects."""
    if isinstance(frame, Send | Post) and type(frame.data) is Raw:
        return attrs.evolve(frame, data=frame.data.load())
    if isinstance(frame, KvPut):
        items = tuple(
            attrs.evolve(w, value=w.value.load()) if type(w.value) is Raw else w
            for w in frame.items
        )
        return attrs.evolve(frame, items=items)
    return frame


# --- the document ---------------------------------------------------------------------


def test_protocol_md_has_every_vector_and_no_other() -> None:
    assert set(_doc_vectors()) == set(VECTORS)


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector_encodes_to_documented_bytes(name: str) -> None:
    assert encode(VECTORS[name]).hex() == _doc_vectors()[name]


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_documented_bytes_decode_to_vector(name: str) -> None:
    frame = VECTORS[name]
    assert _decode_any(bytes.fromhex(_doc_vectors()[name]), frame) == frame


def test_error_code_table_matches_the_code() -> None:
    section = PROTOCOL_MD.split("## 12. Errors")[1].split("## 13.")[0]
    documented = {int(c): n for c, n in re.findall(r"^\| (\d+) \| `(\w+)` \|", section, re.M)}
    assert documented == {int(c): c.name for c in ErrorCode}


def test_close_code_table_matches_the_code() -> None:
    section = PROTOCOL_MD.split("## 13. Close codes")[1].split("## 14.")[0]
    documented = {int(c): n for c, n in re.findall(r"^\| (\d+) \| `(\w+)` \|", section, re.M)}
    assert documented == {int(c): c.name for c in CloseCode}


def test_field_table_matches_the_code() -> None:
    section = PROTOCOL_MD.split("## 2. Encoding")[1].split("Rules:")[0]
    documented = {n: int(k) for k, n in re.findall(r"^\| (\d+) \| `(\w+)` \|", section, re.M)}
    assert documented == {"t": 0, **FIELD_KEYS}


def test_frame_types_are_documented() -> None:
    section = PROTOCOL_MD.split("## 4. Frames")[1].split("## 5.")[0]
    documented = {int(t): n for t, n in re.findall(r"^\| (\d+) \| `(\w+)` \|", section, re.M)}
    expected = {cls.TYPE: cls.__name__.lower() for cls in {*CLIENT_FRAMES, *SERVER_FRAMES}}
    assert documented == expected


# --- round trips ---------------------------------------------------------------------

uint = st.integers(min_value=0, max_value=2**53 - 1)
room_ids = st.from_regex(r"[A-Za-z0-9_.@+=~-][A-Za-z0-9_.@+=~:-]{0,20}", fullmatch=True).filter(
    lambda r: not r.startswith("dm:")
)
user_ids = st.from_regex(r"[A-Za-z0-9_.@+=~-]{1,20}", fullmatch=True)
texts = st.text(max_size=50)
json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | texts
    | st.binary(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False)
)
data_maps = st.dictionaries(
    texts,
    st.recursive(
        json_leaf,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
        max_leaves=10,
    ),
    max_size=5,
)
kv_values = json_leaf | data_maps | st.lists(json_leaf, max_size=3)
kv_entries = st.lists(
    st.builds(
        KvEntry,
        key=texts,
        rev=uint,
        hlc=uint,
        dev=user_ids,
        value=kv_values,
        deleted=st.booleans(),
    ),
    max_size=4,
).map(tuple)
finite = st.floats(allow_nan=False, allow_infinity=False)
feed_items = st.lists(
    st.builds(
        FeedItem,
        post=uint,
        user=user_ids,
        ts=uint,
        lat=finite,
        lon=finite,
        category=texts,
        likes=uint,
        comments=uint,
        score=finite,
        parts=st.lists(finite, max_size=5).map(tuple),
        text=st.none() | texts,
        data=st.none() | data_maps,
    ),
    max_size=3,
).map(tuple)


def _frames_of(cls: type[Frame]) -> st.SearchStrategy[Frame]:
    overrides: dict[type[Frame], st.SearchStrategy[Frame]] = {
        Send: st.builds(
            Send,
            id=uint,
            room=room_ids,
            cid=st.text(min_size=1, max_size=64),
            text=texts,
            data=st.none() | data_maps,
            retry=st.booleans(),
        ),
        Join: st.one_of(
            st.builds(Join, id=uint, room=room_ids),
            st.builds(Join, id=uint, room=room_ids, seq=uint, epoch=st.text(max_size=32)),
        ),
        History: st.builds(
            History,
            id=uint,
            room=room_ids,
            before=st.none() | uint,
            limit=st.none() | st.integers(1, 100),
        ),
        Hello: st.builds(
            Hello,
            v=uint,
            token=texts,
            resume=st.none()
            | st.dictionaries(room_ids, st.tuples(uint, st.text(max_size=32)), max_size=5),
        ),
        Create: st.builds(Create, id=uint, room=room_ids),
        Page: room_ids.flatmap(
            lambda room: st.builds(
                Page,
                id=uint,
                room=st.just(room),
                epoch=texts,
                more=st.booleans(),
                items=st.lists(
                    st.builds(
                        Message,
                        room=st.just(room),
                        seq=uint,
                        ts=uint,
                        cid=texts,
                        user=st.none() | user_ids,
                        text=st.none() | texts,
                    ),
                    max_size=4,
                ).map(tuple),
            )
        ),
        RoomList: st.builds(
            RoomList,
            id=uint,
            more=st.booleans(),
            items=st.lists(
                st.builds(
                    RoomState,
                    room=room_ids,
                    kind=st.sampled_from(RoomKind),
                    seq=uint,
                    epoch=texts,
                    owner=st.none() | user_ids,
                ),
                max_size=4,
            ).map(tuple),
        ),
        Rooms: st.builds(
            Rooms, id=uint, room=st.none() | room_ids, limit=st.none() | st.integers(1, 500)
        ),
        Welcome: st.builds(
            Welcome,
            session=texts,
            user=user_ids,
            v=uint,
            ping=uint,
            ts=uint,
            limits=st.dictionaries(texts, uint, max_size=5),
        ),
        ReceiptState: st.builds(
            ReceiptState,
            room=room_ids,
            id=st.none() | uint,
            more=st.booleans(),
            items=st.lists(
                st.builds(Cursor, user=user_ids, delivered=uint, read=uint), max_size=4
            ).map(tuple),
        ),
        ReceiptCounts: st.builds(
            ReceiptCounts,
            room=room_ids,
            members=uint,
            id=st.none() | uint,
            items=st.lists(
                st.builds(SeqCount, seq=uint, delivered=uint, read=uint), max_size=4
            ).map(tuple),
        ),
        PresenceList: st.builds(
            PresenceList,
            id=st.none() | uint,
            items=st.lists(
                st.builds(
                    PresenceState,
                    user=user_ids,
                    status=st.sampled_from(Status),
                    ts=st.none() | uint,
                ),
                max_size=4,
            ).map(tuple),
        ),
        KvPut: st.builds(
            KvPut,
            id=uint,
            dev=user_ids,
            items=st.lists(
                st.builds(
                    KvWrite,
                    key=texts,
                    hlc=uint,
                    value=kv_values,
                    deleted=st.booleans(),
                    expect=st.none() | uint,
                ),
                max_size=4,
            ).map(tuple),
        ),
        KvAck: st.builds(
            KvAck,
            id=uint,
            hlc=uint,
            rev=uint,
            items=st.lists(
                st.builds(
                    KvResult,
                    key=texts,
                    rev=uint,
                    code=st.none() | uint,
                    msg=st.none() | texts,
                    hlc=st.none() | uint,
                    dev=st.none() | user_ids,
                    value=kv_values,
                    deleted=st.booleans(),
                ),
                max_size=4,
            ).map(tuple),
        ),
        KvChanges: st.builds(
            KvChanges,
            id=uint,
            rev=uint,
            more=st.booleans(),
            reset=st.booleans(),
            items=kv_entries,
        ),
        KvChanged: st.builds(KvChanged, rev=uint, items=kv_entries),
        FeedPage: st.builds(
            FeedPage, id=uint, view=uint, ts=uint, items=feed_items, more=st.booleans()
        ),
        FeedChanged: st.builds(
            FeedChanged,
            view=uint,
            ts=uint,
            posts=st.lists(uint, max_size=5).map(tuple),
            items=feed_items,
        ),
        Message: st.builds(
            Message,
            room=room_ids,
            seq=uint,
            ts=uint,
            cid=texts,
            user=st.none() | user_ids,
            text=st.none() | texts,
            data=st.none() | data_maps,
        ),
    }
    if cls in overrides:
        return overrides[cls]
    fields: dict[str, Any] = {}
    for a in attrs.fields(cls):  # type: ignore[arg-type]
        name = a.name
        if name in ("room",):
            fields[name] = room_ids
        elif name in ("user", "by", "owner"):
            fields[name] = user_ids if a.default is attrs.NOTHING else st.none() | user_ids
        elif a.type in (int, int | None) or name in ("id", "code", "seq", "ts", "delay"):
            fields[name] = uint if a.default is attrs.NOTHING else st.none() | uint
    return st.builds(cls, **fields)


@pytest.mark.parametrize("cls", CLIENT_FRAMES, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_client_frames_round_trip(cls: type[Frame], data: st.DataObject) -> None:
    frame = data.draw(_frames_of(cls))
    if isinstance(frame, Page | Message):
        return
    try:
        decoded = decode_client(encode(frame), Limits(max_frame_bytes=2**20))
    except RemoteProtocolError as exc:
        # Only the semantic checks may refuse a well-typed frame.
        assert exc.code in (ErrorCode.INVALID, ErrorCode.TOO_LARGE)
        return
    assert loaded(decoded) == frame
    assert encode(decoded) == encode(frame)  # a payload kept as Raw goes out as it came


@pytest.mark.parametrize("cls", SERVER_FRAMES, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_server_frames_round_trip(cls: type[Frame], data: st.DataObject) -> None:
    frame = data.draw(_frames_of(cls))
    assert decode_server(encode(frame)) == frame


def test_defaults_are_omitted_and_restored() -> None:
    frame = Send(id=1, room="r", cid="c", text="x")
    assert cbor2.loads(encode(frame)) == {0: 15, 1: 1, 2: "r", 6: "c", 7: "x"}
    decoded = decode_client(encode(frame), LIMITS)
    assert isinstance(decoded, Send) and decoded.retry is False


def test_unknown_keys_are_ignored() -> None:
    payload = cbor2.dumps({0: 15, 1: 1, 2: "r", 6: "c", 7: "x", 99: "future", 1000: [1]})
    assert decode_client(payload, LIMITS) == Send(id=1, room="r", cid="c", text="x")


# --- refusals ------------------------------------------------------------------------


def refused(payload: bytes, limits: Limits = LIMITS) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode_client(payload, limits)
    return info.value


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"", ErrorCode.BAD_FRAME),
        (b"\xff", ErrorCode.BAD_FRAME),
        (cbor2.dumps([0, 15]), ErrorCode.BAD_FRAME),  # an array, not a map
        (cbor2.dumps({1: 2}), ErrorCode.BAD_FRAME),  # no type
        (cbor2.dumps({0: "send"}), ErrorCode.BAD_FRAME),  # type is not a uint
        (cbor2.dumps({0: 99, 1: 5}), ErrorCode.UNKNOWN_TYPE),
        (cbor2.dumps({0: 22, 2: "r"}), ErrorCode.UNKNOWN_TYPE),  # a server frame
        (cbor2.dumps({0: 15, 1: 1, 2: "r", 6: "c"}), ErrorCode.INVALID),  # no body
        (cbor2.dumps({0: 15, 1: 1, 2: "r", 6: 5, 7: "x"}), ErrorCode.INVALID),  # cid int
        (cbor2.dumps({0: 15, 1: -1, 2: "r", 6: "c", 7: "x"}), ErrorCode.INVALID),
        (cbor2.dumps({0: 15, 1: True, 2: "r", 6: "c", 7: "x"}), ErrorCode.INVALID),
        (cbor2.dumps({0: 15, 1: 2**53, 2: "r", 6: "c", 7: "x"}), ErrorCode.INVALID),
        (cbor2.dumps({0: 15, 1: 1, 2: "bad room!", 6: "c", 7: "x"}), ErrorCode.INVALID),
        (cbor2.dumps({0: 15, 1: 1, 2: "r", 6: "c" * 65, 7: "x"}), ErrorCode.INVALID),
        (cbor2.dumps({0: 15, 1: 1, 2: "r", 6: "c", 7: "x" * 4097}), ErrorCode.TOO_LARGE),
        (cbor2.dumps({0: 15, 1: 1, 2: "r", 6: "c", 7: "a\x00b"}), ErrorCode.INVALID),  # NUL
        (cbor2.dumps({0: 15, 1: 1, 2: "r", 6: "c\x00", 7: "x"}), ErrorCode.INVALID),
        (cbor2.dumps({0: 15, 1: 1, 2: "r", 6: "c", 8: {1: 2}}), ErrorCode.INVALID),
        (cbor2.dumps({0: 15, 1: 1, 2: "r", 6: "c", 8: {"x": "y" * 9000}}), ErrorCode.TOO_LARGE),
        (cbor2.dumps({0: 15, 1: 1, 2: "r", 6: "c", 8: {"f": float("nan")}}), ErrorCode.INVALID),
        (cbor2.dumps({0: 10, 1: 1, 2: "dm:a:b"}), ErrorCode.INVALID),
        (cbor2.dumps({0: 10, 1: 1, 2: "r", 18: 2}), ErrorCode.INVALID),  # create direct
        (cbor2.dumps({0: 10, 1: 1, 2: "r", 18: 7}), ErrorCode.INVALID),  # no such kind
        (cbor2.dumps({0: 11, 1: 1, 2: "r", 3: 5}), ErrorCode.INVALID),  # seq without epoch
        (cbor2.dumps({0: 16, 1: 1, 2: "r", 14: 5, 15: 1}), ErrorCode.INVALID),
        (cbor2.dumps({0: 16, 1: 1, 2: "r", 16: 0}), ErrorCode.INVALID),
        (cbor2.dumps({0: 16, 1: 1, 2: "r", 16: 101}), ErrorCode.INVALID),
        (cbor2.dumps({0: 14, 1: 1, 5: "has:colon"}), ErrorCode.INVALID),
    ],
)
def test_refusals(payload: bytes, code: ErrorCode) -> None:
    assert refused(payload).code is code


@pytest.mark.parametrize(
    ("frame", "code", "says"),
    [
        (Hello(v=1, token="t" * 4097), ErrorCode.TOO_LARGE, "token longer than 4096"),
        (Hello(v=1, token="t", resume={"r": (1, "e" * 33)}), ErrorCode.INVALID, "epoch longer"),
        (Join(id=1, room="r", seq=1, epoch="e" * 33), ErrorCode.INVALID, "epoch longer than 32"),
        (Send(id=1, room="r", cid="c", data={"b": b"x" * 8200}), ErrorCode.TOO_LARGE, "8192"),
        (
            KvPut(id=1, dev="d", items=(KvWrite(key="k", hlc=1, value="v" * 16400),)),
            ErrorCode.TOO_LARGE,
            "value larger than 16384 bytes",
        ),
    ],
)
def test_limits_of_fields_are_refused_by_name(frame: Any, code: ErrorCode, says: str) -> None:
    error = refused(encode(frame))
    assert error.code is code and says in str(error), error


def test_refusal_names_the_request_id() -> None:
    assert refused(cbor2.dumps({0: 15, 1: 42, 2: "r", 6: "c"})).request_id == 42
    assert refused(cbor2.dumps({0: 99, 1: 43})).request_id == 43
    # Keys in any order: the id before the type, after a refused field, or before a
    # fault in the CBOR itself.
    assert refused(cbor2.dumps({1: 44, 0: 11, 2: 5})).request_id == 44
    assert refused(cbor2.dumps({0: 11, 2: 5, 99: [1, 2], 1: 45})).request_id == 45
    assert refused(bytes.fromhex("a301182e000b02c100")).request_id == 46  # a tag: 100
    assert refused(cbor2.dumps({0: 11, 2: "r", 1: 2**53})).request_id is None  # not an id


@pytest.mark.parametrize(
    "payload",
    [
        cbor2.dumps({0: 34, 1: 1, 33: ["bob", cbor2.CBORTag(1, 0)]}),  # in an array
        cbor2.dumps({0: 1, 9: "t", 10: 1, 11: {"r": cbor2.CBORTag(1, 0)}}),  # a resume value
        cbor2.dumps({0: 1, 9: "t", 10: 1, 11: {"r": [cbor2.CBORTag(1, 0), "e"]}}),
        cbor2.dumps({0: 15, 1: 1, 2: "r", 6: "c", 8: {cbor2.CBORTag(1, 0): 1}}),  # a data key
        cbor2.dumps({0: 50, 1: 1, 39: "d", 17: [{36: cbor2.CBORTag(1, 0), 38: 1}]}),
    ],
)
def test_a_tag_is_refused_as_such_wherever_it_stands(payload: bytes) -> None:
    assert refused(payload).code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize(
    "payload",
    [
        bytes.fromhex("a2000fc11a514b67b0"),  # epoch datetime tag
        bytes.fromhex("a2000f07d8236161"),  # regex tag
        bytes.fromhex("d9d9f7a10002"),  # self-describe tag around the map
        bytes.fromhex("a2000f07d81c81d81d00"),  # shared references: a cycle
        bytes.fromhex("a2000f07d90fff01"),  # an unknown tag
        bytes.fromhex("a2000f07c249010000000000000000"),  # bignum
    ],
)
def test_tags_are_refused(payload: bytes) -> None:
    assert refused(payload).code is ErrorCode.BAD_FRAME


def test_duplicate_keys_trailing_bytes_and_deep_nesting_are_refused() -> None:
    assert refused(bytes.fromhex("a3000f0101 0102".replace(" ", ""))).code is ErrorCode.BAD_FRAME
    good = encode(Send(id=1, room="r", cid="c", text="x"))
    assert refused(good + b"\x00").code is ErrorCode.BAD_FRAME
    assert refused(b"\x81" * 10000).code is ErrorCode.BAD_FRAME


def _nested_send(depth: int) -> bytes:
    """A send whose data is ``depth`` maps, each inside the one before."""
    data: Any = 1
    for _ in range(depth):
        data = {"a": data}
    return cbor2.dumps({0: 15, 1: 1, 2: "r", 6: "c", 8: data})


def test_nesting_depth_is_counted_as_documented() -> None:
    """PROTOCOL.md section 2: data (and a kv value) nests at most 8 arrays and maps,
    its own map counted (102 beyond); elsewhere a frame nests at most 12, its own map
    counted (100 beyond)."""
    decoded = decode_client(_nested_send(8), LIMITS)
    assert isinstance(decoded, Send) and decoded.data == Raw(
        cbor2.dumps(cbor2.loads(_nested_send(8))[8])
    )
    assert refused(_nested_send(9)).code is ErrorCode.INVALID
    assert refused(_nested_send(40)).code is ErrorCode.INVALID
    value: Any = []
    for _ in range(7):
        value = [value]
    kv = {0: 50, 1: 1, 39: "d", 17: [{36: "k", 38: 1, 37: value}]}
    decode_client(cbor2.dumps(kv), LIMITS)  # 8 arrays
    kv[17] = [{36: "k", 38: 1, 37: [value]}]
    assert refused(cbor2.dumps(kv)).code is ErrorCode.INVALID  # 9 arrays
    unknown: Any = [1]
    for _ in range(10):
        unknown = [unknown]
    ping = {0: 2, 99: unknown}  # the frame's map and 11 arrays: 12 levels
    assert decode_client(cbor2.dumps(ping), LIMITS) == Ping()
    assert refused(cbor2.dumps({0: 2, 99: [unknown]})).code is ErrorCode.BAD_FRAME


def test_frame_size_limit() -> None:
    payload = encode(Send(id=1, room="r", cid="c", text="x" * 100))
    assert refused(payload, Limits(max_frame_bytes=50)).code is ErrorCode.TOO_LARGE


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_only_raises_protocol_errors(payload: bytes) -> None:
    try:
        decode_client(payload, LIMITS)
    except RemoteProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        json_leaf | st.just(cbor2.CBORTag(99, 1)),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.integers(0, 30) | texts, inner, max_size=6)
        ),
        max_leaves=30,
    )
)
def test_arbitrary_cbor_only_raises_protocol_errors(value: Any) -> None:
    try:
        payload = cbor2.dumps(value)
    except (ValueError, TypeError):
        return
    try:
        decode_client(payload, LIMITS)
    except RemoteProtocolError:
        pass


def _send_data(data_cbor: bytes) -> bytes:
    """A send whose data (key 8) is ``data_cbor``, as it stands."""
    return b"\xa5" + cbor2.dumps({0: 15, 1: 1, 2: "r", 6: "c"})[1:] + b"\x08" + data_cbor


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ({"a": [1, 2.5, "x", b"y", None, True, {"b": {}}]}, None),
        ({"big": 2**64 - 1, "small": -(2**64)}, None),
        ({1: "int key"}, ErrorCode.INVALID),
        ({"x": float("inf")}, ErrorCode.INVALID),
        ({"x": float("nan")}, ErrorCode.INVALID),
        ({"x": cbor2.CBORSimpleValue(99)}, ErrorCode.INVALID),
        ({"x": cbor2.undefined}, ErrorCode.INVALID),
        ({"x": 2**64}, ErrorCode.BAD_FRAME),  # a bignum is a tag
        ({"x": cbor2.CBORTag(1, 0)}, ErrorCode.BAD_FRAME),
        ([1, 2], ErrorCode.INVALID),  # data is a map
    ],
)
def test_payloads_hold_only_what_every_client_can(data: Any, code: ErrorCode | None) -> None:
    payload = _send_data(cbor2.dumps(data))
    if code is None:
        decoded = decode_client(payload, LIMITS)
        assert isinstance(decoded, Send) and decoded.data == Raw(cbor2.dumps(data))
    else:
        assert refused(payload).code is code


def test_payload_duplicate_keys_half_floats_and_indefinite_items() -> None:
    assert refused(_send_data(bytes.fromhex("a2616101616102"))).code is ErrorCode.BAD_FRAME
    assert refused(_send_data(bytes.fromhex("a16178f97c00"))).code is ErrorCode.INVALID  # inf
    decode_client(_send_data(bytes.fromhex("a16178f93c00")), LIMITS)  # 1.0 as a half float
    indefinite = bytes.fromhex("bf616101ff")
    assert refused(_send_data(indefinite)).code is ErrorCode.BAD_FRAME
    assert refused(bytes.fromhex("bf000fff")).code is ErrorCode.BAD_FRAME  # the frame itself


def test_from_fields_validates_like_the_wire() -> None:
    assert from_fields(Send, {"id": 0, "room": "r", "cid": "c", "text": "x"}, LIMITS).text == "x"
    with pytest.raises(RemoteProtocolError) as info:
        from_fields(Send, {"id": 0, "room": "r", "cid": "c", "text": 5}, LIMITS)
    assert info.value.code is ErrorCode.INVALID


def test_direct_room_ids() -> None:
    assert direct_room_id("bob", "alice") == direct_room_id("alice", "bob") == "dm:alice:bob"
    assert direct_room_users("dm:alice:bob") == ("alice", "bob")
    for bad in ("dm:bob:alice", "dm:a", "dm:a:b:c", "room", "dm:a:a"):
        assert direct_room_users(bad) is None


def test_float_fields_take_integers_and_refuse_anything_else() -> None:
    """PROTOCOL.md: a float field is read from any CBOR float or integer."""
    fields = {0: 60, 1: 1, 6: "c", 46: 48, 47: -2, 49: "news", 7: "x"}
    post = decode_client(cbor2.dumps(fields), LIMITS)
    assert isinstance(post, Post)
    assert (post.lat, post.lon) == (48.0, -2.0)
    assert type(post.lat) is float and type(post.lon) is float
    error = refused(cbor2.dumps({**fields, 46: "48"}))
    assert error.code is ErrorCode.INVALID and "must be a number" in str(error), error
