"""The relay of a room another node runs: the room's numbered broadcasts, from Redis, to
the outboxes of this node's sessions. A session that asked to attach buffers what
arrives until the room's answer says which broadcast it was sent after; a gap in the
numbers means this node missed some, and its sessions resume."""

from actors.cluster import PUB_BYTES, Relay
from actors.messages import ActorMoved, SessionEvent, SessionLink


class Outbox:
    """A session's outbox, as the relay sees one: frames appended, by identity."""

    closed = False

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def append(self, data: bytes) -> None:
        self.frames.append(data)


def session(sid: str) -> tuple[SessionLink, Outbox, list[SessionEvent]]:
    outbox, events = Outbox(), list[SessionEvent]()
    return SessionLink(sid, "u", outbox, events.append), outbox, events


def broadcast(number: int, frame: bytes) -> bytes:
    return number.to_bytes(PUB_BYTES, "big") + frame


def test_an_attaching_session_gets_what_came_after_the_rooms_answer_once() -> None:
    relay = Relay("r")
    link, outbox, _ = session("s1")
    relay.add(link)
    for number, frame in ((1, b"a"), (2, b"b"), (3, b"c")):
        relay.deliver(broadcast(number, frame))
    assert outbox.frames == []  # buffered while the attach is on its way
    relay.attached(outbox, 2)  # the room answered after broadcast 2: 1 and 2 are in it
    assert outbox.frames == [b"c"]
    relay.deliver(broadcast(4, b"d"))
    relay.attached(outbox, 4)  # a second answer changes nothing
    assert outbox.frames == [b"c", b"d"]
    assert relay.delivered == 1  # counted when delivered live; c came from the buffer
    relay.remove(outbox)
    relay.deliver(broadcast(5, b"e"))
    assert outbox.frames == [b"c", b"d"]


def test_a_missed_broadcast_makes_the_relayed_sessions_resume() -> None:
    relay = Relay("r")
    (live, live_box, live_events), (waiting, _, waiting_events) = session("s1"), session("s2")
    relay.add(live)
    relay.attached(live_box, 0)
    relay.add(waiting)
    relay.deliver(broadcast(1, b"a"))
    relay.deliver(broadcast(3, b"c"))  # 2 never came
    assert live_box.frames == [b"a"]  # nothing after the gap
    assert live_events == waiting_events == [ActorMoved("room", "r")]
    assert not relay.links and not relay.live and not relay.pending
    relay.deliver(broadcast(4, b"d"))  # counting goes on from what came last
    assert relay.last == 4
