"""The test vectors of PROTOCOL.md, as frames.

``python -m tests.vectors`` prints the vector section of PROTOCOL.md; ``test_codec``
checks every vector there both ways (hex -> frame, frame -> hex).
"""

from typing import Any

from protocol.codec import encode, to_map
from protocol.errors import ErrorCode
from protocol.frames import (
    Block,
    BlockList,
    Blocks,
    Create,
    Cursor,
    Direct,
    Error,
    FeedChanged,
    FeedClose,
    FeedItem,
    FeedMore,
    FeedOpen,
    FeedPage,
    Follow,
    Frame,
    Goaway,
    Hello,
    History,
    Interests,
    Invite,
    Join,
    Joined,
    KvAck,
    KvChanged,
    KvChanges,
    KvEntry,
    KvPut,
    KvResult,
    KvSync,
    KvWrite,
    Leave,
    Like,
    Member,
    MemberOp,
    Message,
    Ok,
    Online,
    Page,
    Ping,
    Pong,
    Post,
    Posted,
    Presence,
    PresenceList,
    PresenceState,
    Receipt,
    ReceiptCounts,
    Receipts,
    ReceiptState,
    Refresh,
    RoomKind,
    RoomList,
    Rooms,
    RoomState,
    Send,
    Sent,
    SeqCount,
    SetStatus,
    Status,
    Typing,
    TypingOp,
    Unblock,
    Unfollow,
    Unlike,
    Unpost,
    Unsubscribe,
    Unwatch,
    Watch,
    Welcome,
    Who,
)
from protocol.hlc import pack
from protocol.limits import Limits
from protocol.ranking import distance_m, parts_of, score

EPOCH = "9f1c2e7a55d0b3e4"
TS = 1700000000123
HLC = pack(TS)

# A feed vector: a viewer at the Louvre, 2 km around, following "bob" and interested in
# food, at ranking instant AT; bob's post 300 m away, made 3 hours before, 12 likes and 3
# comments. Its parts and score are those of protocol.ranking (PROTOCOL.md, "Feeds").
AT = 1700000040000
POST_ID = 7 * 16384 + 12510
_PARTS = parts_of(
    distance=distance_m(48.8606, 2.3376, 48.8584, 2.3400),
    radius=2000,
    age_ms=3 * 3600 * 1000,
    likes=12,
    comments=3,
    followed=True,
    interesting=True,
)
FEED_ITEM = FeedItem(
    post=POST_ID,
    user="bob",
    ts=AT - 3 * 3600 * 1000,
    lat=48.8584,
    lon=2.34,
    category="food",
    likes=12,
    comments=3,
    score=score(_PARTS),
    parts=_PARTS,
    text="best croissant in town",
)

VECTORS: dict[str, Frame] = {
    # client to server
    "hello": Hello(v=1, token="t0k3n"),
    "hello-resume": Hello(v=1, token="t0k3n", resume={"lobby": (41, EPOCH)}),
    "ping": Ping(id=7),
    "pong": Pong(),
    "create": Create(id=1, room="lobby"),
    "create-private": Create(id=2, room="team", kind=RoomKind.PRIVATE),
    "join": Join(id=3, room="lobby"),
    "join-resume": Join(id=4, room="lobby", seq=41, epoch=EPOCH),
    "leave": Leave(id=5, room="lobby"),
    "unsubscribe": Unsubscribe(id=6, room="lobby"),
    "invite": Invite(id=7, room="team", user="bob"),
    "direct": Direct(id=8, user="bob"),
    "send": Send(id=9, room="lobby", cid="c1", text="hi"),
    "send-data-retry": Send(id=10, room="lobby", cid="c2", data={"emoji": "wave"}, retry=True),
    "history": History(id=11, room="lobby", before=42, limit=20),
    "rooms": Rooms(id=12, limit=50),
    "rooms-after": Rooms(id=13, room="lobby", limit=50),
    "receipt": Receipt(room="lobby", delivered=43),
    "receipt-read": Receipt(room="lobby", delivered=43, read=42, id=14),
    "receipts-who": Receipts(id=15, room="lobby", seq=42),
    "receipts-counts": Receipts(id=16, room="lobby", seq=40, limit=3),
    "typing": Typing(room="lobby"),
    "typing-stop": Typing(room="lobby", op=TypingOp.STOP),
    "setstatus": SetStatus(status=Status.AWAY, id=17),
    "who": Who(id=18, users=("bob", "carol")),
    "watch": Watch(id=19, users=("bob",)),
    "unwatch": Unwatch(id=20, users=("bob",)),
    "block": Block(id=21, user="mallory"),
    "unblock": Unblock(id=22, user="mallory"),
    "blocks": Blocks(id=23),
    "refresh": Refresh(id=27, token="n3w-t0k3n"),
    # server to client
    "welcome": Welcome(
        session="5e55",
        user="alice",
        v=1,
        ping=25,
        ts=TS,
        limits=Limits().announce(),
        expires=1_700_000_900_000,
    ),
    "server-ping": Ping(),
    "pong-id": Pong(id=7),
    "error": Error(code=200, msg="not a member of this room", id=9, room="team"),
    "goaway": Goaway(msg="server shutting down", delay=1000),
    "ok": Ok(id=5),
    "ok-refresh": Ok(id=27, expires=1_700_001_800_000),
    "joined": Joined(id=3, room="lobby", kind=RoomKind.OPEN, owner="alice", seq=41, epoch=EPOCH),
    "joined-resumed": Joined(
        room="lobby", kind=RoomKind.OPEN, owner="alice", seq=43, epoch=EPOCH, recovered=True
    ),
    "sent": Sent(id=9, room="lobby", cid="c1", seq=42, ts=TS),
    "message": Message(room="lobby", seq=42, ts=TS, cid="c1", user="alice", text="hi"),
    "message-server": Message(room="lobby", seq=43, ts=TS, cid="admin-1", text="maintenance"),
    "page": Page(
        id=11,
        room="lobby",
        epoch=EPOCH,
        items=(
            Message(room="lobby", seq=40, ts=TS - 5000, cid="c0", user="bob", text="yo"),
            Message(
                room="lobby", seq=41, ts=TS - 4000, cid="c9", user="alice", data={"emoji": "wave"}
            ),
        ),
        more=True,
    ),
    "roomlist": RoomList(
        id=12,
        items=(
            RoomState(room="dm:alice:bob", kind=RoomKind.DIRECT, seq=7, epoch=EPOCH),
            RoomState(room="lobby", kind=RoomKind.OPEN, seq=43, epoch=EPOCH, owner="alice"),
        ),
        more=True,
    ),
    "member": Member(room="team", user="bob", op=MemberOp.ADDED, kind=RoomKind.PRIVATE, by="alice"),
    "joined-cursors": Joined(
        id=3, room="dm:alice:bob", kind=RoomKind.DIRECT, seq=7, epoch=EPOCH, delivered=7, read=5
    ),
    "receiptstate": ReceiptState(
        room="dm:alice:bob", items=(Cursor(user="bob", delivered=7, read=6),)
    ),
    "receiptstate-answer": ReceiptState(
        id=15,
        room="lobby",
        items=(Cursor(user="alice", delivered=43, read=43), Cursor(user="bob", delivered=42)),
    ),
    "receiptcounts": ReceiptCounts(
        room="town",
        members=500,
        items=(SeqCount(seq=41, delivered=498, read=310), SeqCount(seq=42, delivered=470, read=12)),
    ),
    "typing-event": Typing(room="lobby", user="bob"),
    "presence": Presence(user="bob", status=Status.DND),
    "presence-offline": Presence(user="bob", status=Status.OFFLINE, ts=TS),
    "presencelist": PresenceList(
        id=18,
        items=(
            PresenceState(user="bob", status=Status.ONLINE),
            PresenceState(user="carol", status=Status.OFFLINE, ts=TS - 60000),
        ),
    ),
    "online": Online(room="town", count=212),
    "blocklist": BlockList(id=23, users=("mallory",)),
    "kvput": KvPut(
        id=24,
        dev="phone-7f3a",
        items=(
            KvWrite(key="settings.theme", hlc=HLC, value="dark"),
            KvWrite(key="draft:lobby", hlc=HLC + 1, value={"text": "see you at", "at": 10}),
            KvWrite(key="day:2026-11-20", hlc=HLC + 2, deleted=True, expect=41),
        ),
    ),
    "kvack": KvAck(
        id=24,
        hlc=HLC + 5,
        rev=43,
        items=(
            KvResult(key="settings.theme", rev=42),
            KvResult(key="draft:lobby", rev=43),
            KvResult(
                key="day:2026-11-20",
                code=ErrorCode.KV_CONFLICT,
                rev=40,
                hlc=HLC - 9000,
                dev="tablet-02",
                value={"steps": 8042},
            ),
        ),
    ),
    "kvsync": KvSync(id=25, after=40, limit=100),
    "kvsync-listing": KvSync(id=26, after=1200, limit=1000, reset=True, rev=2400),
    "kvchanges": KvChanges(
        id=25,
        rev=43,
        items=(
            KvEntry(key="day:2026-11-19", rev=41, hlc=HLC - 20000, dev="tablet-02", deleted=True),
            KvEntry(key="settings.theme", rev=42, hlc=HLC, dev="phone-7f3a", value="dark"),
        ),
        more=True,
    ),
    "kvchanged": KvChanged(
        rev=43,
        items=(
            KvEntry(
                key="draft:lobby",
                rev=43,
                hlc=HLC + 1,
                dev="phone-7f3a",
                value={"text": "see you at", "at": 10},
            ),
        ),
    ),
    # feeds
    "post": Post(
        id=30, cid="p-1", lat=48.8584, lon=2.34, category="food", text="best croissant in town"
    ),
    "posted": Posted(id=30, post=POST_ID, cid="p-1", ts=AT - 3 * 3600 * 1000),
    "unpost": Unpost(id=31, post=POST_ID),
    "like": Like(id=32, post=POST_ID),
    "unlike": Unlike(id=33, post=POST_ID),
    "follow": Follow(id=34, user="bob"),
    "unfollow": Unfollow(id=35, user="bob"),
    "interests": Interests(id=36, interests=("food", "music")),
    "feedopen": FeedOpen(id=37, lat=48.8606, lon=2.3376, radius=2000, limit=10),
    "feedpage": FeedPage(id=37, view=1, ts=AT, items=(FEED_ITEM,)),
    "feedchanged": FeedChanged(
        view=1, ts=AT, posts=(POST_ID, 5 * 16384 + 12510), items=(FEED_ITEM,)
    ),
    "feedmore": FeedMore(id=38, view=1, rank=10, limit=10),
    "feedclose": FeedClose(id=39, view=1),
}


def diagnostic(value: Any) -> str:
    """CBOR diagnostic notation (RFC 8949, section 8) of a decoded value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bytes):
        return f"h'{value.hex()}'"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(diagnostic(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{diagnostic(k)}: {diagnostic(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def markdown() -> str:
    out = []
    for name, frame in VECTORS.items():
        out.append(f"`{name}`: {type(frame).__name__.lower()}\n")
        out.append("```")
        out.append(diagnostic(to_map(frame)))
        out.append(f"vector {name}: {encode(frame).hex()}")
        out.append("```\n")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown())
