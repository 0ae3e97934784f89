"""The load generator's delivery check (loadtests/loadgen.py, Worker.run)."""

import socket
import time

from loadtests.loadgen import IN, Conn, Plan, Tally, Worker
from loadtests.wire import Ident, marker
from protocol.codec import encode
from protocol.frames import Message
from protocol.wsframe import server_frame

ROOM = "dm:c1a0:c1b0"


def _message(seq: int, src: int, n: int, user: str, ts: int) -> bytes:
    text = marker(src, n, time.monotonic_ns(), 100)
    return server_frame(
        encode(Message(room=ROOM, seq=seq, ts=ts, cid=str(n), user=user, text=text))
    )


def _receive(frames: list[bytes], expect: int) -> Tally:
    """One connection (user c1a0, sender number 1) receives ``frames``; its tally."""
    plan = Plan(wire="parley", host="127.0.0.1", port=0, idents=[], expect=expect, timeout=5.0)
    ident = Ident(user="c1a0", room=ROOM, src=1, peer="c1b0")
    worker = Worker(plan)
    c = Conn(ident, expect)
    c.sock.close()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    c.sock, c.fd, c.state = ours, ours.fileno(), 3
    worker.conns = [c]
    worker.by_fd[c.fd] = c
    worker.ep.register(c.fd, IN)
    theirs.sendall(b"".join(frames))
    try:
        worker.run()
    finally:
        theirs.close()
        worker.close()
    return worker.tally


def test_own_echo_with_tilde_at_in_its_timestamp_is_not_a_peer_delivery() -> None:
    """Parley sends a sender its own message back. When the message's ``ts`` (ms since
    the epoch, a CBOR uint64 just before the text) holds the bytes ``~@`` (0x7E 0x40:
    one millisecond in every 65.536 s has them as its two low bytes), the marker parse
    takes the header bytes from there on as the sender number: the echo of our own
    message 2 counts as the peer's message 2, and the peer's real one as a duplicate."""
    now = time.time_ns() // 1_000_000
    plain = now & ~0xFFFF
    unlucky = plain | 0x7E40  # ... 7e 40: "~@"
    frames = [
        _message(1, 2, 1, "c1b0", plain),  # the peer's 1
        _message(2, 1, 1, "c1a0", plain),  # our own 1, echoed: skipped
        _message(3, 1, 2, "c1a0", unlucky),  # our own 2, echoed, in the unlucky ms
        _message(4, 2, 2, "c1b0", plain),  # the peer's 2
    ]
    tally = _receive(frames, expect=2)
    assert tally.deliveries == 2
    assert tally.duplicates == 0, tally.errors


def test_unlucky_timestamp_on_the_peers_message_and_on_an_ack() -> None:
    """The same millisecond on the peer's message still counts it once, from the peer;
    on a sent-ack (no marker at all) the frame stays a control frame."""
    from protocol.frames import Sent

    now = time.time_ns() // 1_000_000
    plain, unlucky = now & ~0xFFFF, (now & ~0xFFFF) | 0x7E40
    ack = server_frame(encode(Sent(id=9, room=ROOM, cid="9", seq=5, ts=unlucky)))
    frames = [
        ack,
        _message(1, 2, 1, "c1b0", unlucky),
        _message(2, 1, 1, "c1a0", unlucky),
        _message(3, 2, 2, "c1b0", plain),
    ]
    tally = _receive(frames, expect=2)
    assert (tally.deliveries, tally.duplicates, tally.gaps, tally.reordered) == (2, 0, 0, 0)
    assert tally.errors == []
