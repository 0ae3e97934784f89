"""actors/wire.py: actor records survive the trip to another node, process-local parts
swapped for stand-ins at both ends."""

from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors import messages as m
from actors.outbox import Outbox
from actors.wire import LinkRef, ReplyRef, WireError, pack, unpack
from protocol.cbor import Raw
from protocol.errors import ErrorCode
from protocol.frames import (
    History,
    KvPut,
    KvWrite,
    Message,
    ReceiptState,
    RoomKind,
    Send,
    TypingOp,
)
from storage.write_behind import COMMITTED, Ticket


class Exits:
    def __init__(self) -> None:
        self.replies: dict[int, m.Reply[Any]] = {}

    def link(self, link: m.SessionLink) -> LinkRef:
        return LinkRef("node-a", link.id, link.user)

    def reply(self, reply: m.Reply[Any]) -> ReplyRef:
        self.replies[len(self.replies) + 1] = reply
        return ReplyRef("node-a", len(self.replies))


class Entries:
    def __init__(self) -> None:
        self.links: dict[tuple[str, str], m.SessionLink] = {}
        self.replies: list[ReplyRef] = []

    def link(self, ref: LinkRef) -> m.SessionLink:
        key = (ref.node, ref.id)
        if key not in self.links:
            self.links[key] = m.SessionLink(ref.id, ref.user, Outbox(1000), lambda e: None)
        return self.links[key]

    def reply(self, ref: ReplyRef) -> m.Reply[Any]:
        self.replies.append(ref)
        return m.Reply()


def link(sid: str = "s1", user: str = "alice") -> m.SessionLink:
    return m.SessionLink(sid, user, Outbox(1000), lambda e: None)


def trip(record: object) -> tuple[Any, Exits, Entries]:
    exits, entries = Exits(), Entries()
    return unpack(pack(record, exits), entries), exits, entries


def test_a_publish_keeps_its_send_and_finds_a_stand_in_link() -> None:
    send = Send(id=7, room="lobby", cid="c1", text="hi", data=Raw(b"\xa1\x01\x02"), retry=True)
    got, _, entries = trip(m.Publish(user="alice", send=send, link=link()))
    assert got.send == send and type(got.send.data) is Raw
    assert got.link is entries.links["node-a", "s1"]
    assert got.link.user == "alice" and got.reply is None


def test_a_request_carries_its_reply_as_an_id() -> None:
    reply: m.Reply[m.Attached] = m.Reply()
    command = m.Attach(link=link(), mode=m.AttachMode.RESUME, reply=reply, since=4, epoch="e")
    got, exits, entries = trip(command)
    assert exits.replies == {1: reply}
    assert entries.replies == [ReplyRef("node-a", 1)]
    assert got.mode is m.AttachMode.RESUME and got.since == 4 and got.kind is RoomKind.OPEN


def test_answers_keep_tuples_frozensets_and_bytes() -> None:
    attached = m.Attached(
        kind=RoomKind.PRIVATE,
        owner="alice",
        seq=9,
        epoch="e1",
        recovered=True,
        ring=(b"\x82\x01", b"\x82\x02"),
        storage=(1, 7),
        cursor=(3, 2),
        members=frozenset({"alice", "bob"}),
    )
    got, _, _ = trip(attached)
    assert got == attached
    assert type(got.ring) is tuple and type(got.members) is frozenset


def test_frames_inside_answers() -> None:
    msg = Message(room="r", seq=1, ts=5, cid="c", user="u", text="t")
    plan = m.HistoryPlan(epoch="e", items=(msg,), storage=None, more=False)
    assert trip(plan)[0] == plan
    state = ReceiptState(id=3, room="r", items=(), more=False)
    assert trip(state)[0] == state
    query = m.HistoryQuery(user="u", query=History(id=1, room="r", before=9), reply=m.Reply())
    assert trip(query)[0].query == query.query


def test_a_kv_put_keeps_raw_values() -> None:
    put = KvPut(id=1, dev="d", items=(KvWrite(key="k", hlc=5, value=Raw(b"\x01")),))
    got, _, _ = trip(m.KvRequest(link=link(), frame=put))
    assert got.frame == put


def test_a_ticket_arrives_as_stored() -> None:
    got, _, _ = trip(m.SetBlock(user="a", blocked=True, ticket=Ticket()))
    assert got.ticket is COMMITTED


def test_enums_and_events() -> None:
    refused = m.Refused(ErrorCode.BLOCKED, "no", 4, "r")
    assert trip(refused)[0] == refused
    typing = m.SetTyping(link=link(), op=TypingOp.START, hidden=frozenset({"x"}), id=2)
    got = trip(typing)[0]
    assert got.op is TypingOp.START and got.hidden == frozenset({"x"})


def test_what_cannot_cross_is_refused_at_the_sender() -> None:
    with pytest.raises(WireError, match="Outbox"):
        pack(Outbox(10), Exits())


@pytest.mark.parametrize(
    "data",
    [
        b"\xff",
        cbor2.dumps(cbor2.CBORTag(27001, ["NoSuchRecord", 1])),
        cbor2.dumps(cbor2.CBORTag(27001, ["Detach"])),  # a field missing
        cbor2.dumps(cbor2.CBORTag(27002, ["RoomKind", 99])),
        cbor2.dumps(cbor2.CBORTag(27999, None)),
    ],
)
def test_unreadable_payloads_are_a_wire_error(data: bytes) -> None:
    with pytest.raises(WireError):
        unpack(data, Entries())


@given(
    text=st.text(max_size=50),
    data=st.binary(max_size=50),
    seq=st.integers(min_value=0, max_value=2**63 - 1),
    users=st.frozensets(st.text(max_size=8), max_size=5),
)
def test_round_trip(text: str, data: bytes, seq: int, users: frozenset[str]) -> None:
    info = m.RoomInfo(
        room=text,
        kind=RoomKind.DIRECT,
        owner=None,
        epoch=text,
        seq=seq,
        members=tuple(sorted(users)),
        online=(),
    )
    assert trip(info)[0] == info
    attached = m.Attached(
        kind=RoomKind.OPEN, owner=None, seq=seq, epoch="", recovered=None, ring=(data,)
    )
    assert trip(attached)[0] == attached


def test_packing_leaves_no_cycle_for_the_collector() -> None:
    import gc

    send = Send(id=7, room="lobby", cid="c1", text="hi", data=Raw(b"\xa1\x01\x02"))
    record = m.Publish(user="alice", send=send, link=link())
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(100):
            pack(record, Exits())
        assert gc.collect() == 0  # the node's collector runs hourly
    finally:
        if enabled:
            gc.enable()
