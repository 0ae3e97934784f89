"""``parley bench decode``: what reading a client frame costs, per frame and per byte.

Two sets of frames: client frames of the sizes clients send, and the costliest frames
an attacker can build for their size (``hostile``, also the frames
``tests/test_decode_budget.py`` holds to a budget). Each is decoded
over and over with ``decode_client``, as the server does; the figures are the median of
``--rounds`` rounds, and the memory is the peak tracemalloc sees in one decode.
"""

import statistics
import time
import tracemalloc
from collections.abc import Callable

import attrs
import cbor2

from protocol.codec import decode_client, encode
from protocol.errors import RemoteProtocolError
from protocol.frames import (
    Hello,
    History,
    Join,
    KvPut,
    KvSync,
    KvWrite,
    Ping,
    Pong,
    Receipt,
    Send,
    Typing,
    Who,
)
from protocol.hlc import pack
from protocol.limits import Limits

LIMITS = Limits()
FRAME = LIMITS.max_frame_bytes
HLC = pack(1_740_800_000_000)


def in_unknown_key(item: bytes, n: int) -> bytes:
    """A ping whose unknown key 99 holds an array of ``n`` copies of ``item``."""
    return b"\xa2\x00\x02\x18\x63\x9a" + n.to_bytes(4, "big") + item * n


def in_data(item: bytes, n: int) -> bytes:
    """A send whose data holds an array of ``n`` copies of ``item``."""
    head = b"\xa5\x00\x0f\x01\x01\x02\x61r\x06\x61c\x08\xa1\x61k\x9a"
    return head + n.to_bytes(4, "big") + item * n


#: The items that cost the most work per byte, each the smallest of its kind.
ITEMS = {
    "zero": b"\x00",
    "uint8": b"\x18\x20",
    "text1": b"\x61a",
    "text2": b"\x62ab",
    "array1": b"\x81\x00",
    "map1": b"\xa1\x60\x00",
    "map-key": b"\xa1\x61a\x00",
    "half-float": b"\xf9\x3c\x00",
    "empty-map": b"\xa0",
}


def hostile(size: int) -> dict[str, bytes]:
    """The costliest frames of about ``size`` bytes (and a few of fixed shape)."""
    frames = {
        **{f"unknown-{k}": in_unknown_key(v, size // len(v)) for k, v in ITEMS.items()},
        **{f"data-{k}": in_data(v, size // len(v)) for k, v in ITEMS.items()},
        "kvput-60000-zeros": b"\xa4\x00\x18\x32\x01\x01\x18\x27\x61d\x11\x9a"
        + (60000).to_bytes(4, "big")
        + b"\x00" * 60000,
        "kvput-500-writes": cbor2.dumps(
            {0: 50, 1: 1, 39: "d", 17: [{36: f"k{i}", 38: 2**40 + i} for i in range(500)]}
        ),
        "kvput-500-tiny-writes": cbor2.dumps(
            {0: 50, 1: 1, 39: "d", 17: [{36: "k", 38: 1, 37: {}} for _ in range(500)]}
        ),
        "who-100-users": cbor2.dumps({0: 34, 1: 1, 33: [f"u{i:02d}"[:2] for i in range(100)]}),
        "hello-resume-100-rooms": cbor2.dumps(
            {0: 1, 9: "t", 10: 1, 11: {f"r{i}": [2**40, ""] for i in range(100)}}
        ),
        "hello-resume-6000-bad": cbor2.dumps(
            {0: 1, 9: "t", 10: 1, 11: {f"r{i}": 0 for i in range(6000)}}
        ),
        "type-last": cbor2.dumps({99: list(range(2000)), 1: 5, 0: 2}),
        # Refused late, with the id after the fault: the id is looked for from there on.
        "kvput-refused-at-the-end": cbor2.dumps(
            {0: 50, 39: "d", 17: [{36: "k", 38: 1, 37: {}}] * 499 + [{36: 5}], 1: 5}
        ),
        "data-then-a-bad-room": b"\xa4\x00\x0f\x08\xa1\x61k\x9a"
        + (size // 3).to_bytes(4, "big")
        + ITEMS["map1"] * (size // 3)
        + b"\x02\x05\x01\x07",
        "deep-nesting": b"\xa2\x00\x02\x18\x63" + b"\x81" * 30000,
        "send-text-4096": cbor2.dumps({0: 15, 1: 1, 2: "r", 6: "c", 7: "€" * 4096}),
    }
    return frames


def typical() -> dict[str, bytes]:
    """Client frames of the sizes clients send."""
    token = "e" * 180  # an HS256 JWT with sub, iat and exp
    resume = {f"room-{i}": (1000 + i, "9f1c2e7a55d0b3e4") for i in range(10)}
    writes = tuple(KvWrite(key=f"settings.k{i}", hlc=HLC + i, value="v" * 40) for i in range(10))
    frames = {
        "hello": Hello(v=1, token=token),
        "hello-resume-10": Hello(v=1, token=token, resume=resume),
        "ping": Ping(id=7),
        "pong": Pong(),
        "join-resume": Join(id=3, room="team-42", seq=1234, epoch="9f1c2e7a55d0b3e4"),
        "send-100": Send(id=9, room="team-42", cid="c7d2a9e4-1", text="x" * 100),
        "send-data": Send(id=9, room="team-42", cid="c7d2a9e4-2", data={"k": [1, 2.5, "x"]}),
        "send-4096": Send(id=9, room="team-42", cid="c7d2a9e4-3", text="€" * 4096),
        "receipt": Receipt(room="team-42", delivered=1234, read=1230),
        "typing": Typing(room="team-42"),
        "history": History(id=11, room="team-42", before=1200, limit=50),
        "who-10": Who(id=18, users=tuple(f"user-{i}" for i in range(10))),
        "kvput-10": KvPut(id=24, dev="phone-7f3a", items=writes),
        "kvsync": KvSync(id=25, after=40, limit=100),
    }
    return {name: encode(f) for name, f in frames.items()}


def decode(payload: bytes) -> None:
    try:
        decode_client(payload, LIMITS)
    except RemoteProtocolError:
        pass


@attrs.frozen
class Cost:
    name: str
    size: int
    us: float  # per decode
    peak: int  # bytes of memory held at most during one decode

    @property
    def ns_per_byte(self) -> float:
        return self.us * 1000 / self.size

    HEADER = (
        f"  {'frame':<24} {'bytes':>7} {'µs/frame':>10} {'ns/byte':>8}"
        f"   {'peak memory of a decode':>24}"
    )

    def line(self) -> str:
        return (
            f"  {self.name:<24} {self.size:>7,} {self.us:>10.2f} {self.ns_per_byte:>8.1f}"
            f"   {self.peak:>11,} B = {self.peak / self.size:5.1f}x"
        )


def measure(name: str, payload: bytes, rounds: int, seconds: float = 0.05) -> Cost:
    per_round = []
    for _ in range(rounds):
        n = 0
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            decode(payload)
            n += 1
        per_round.append(elapsed / n)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        decode(payload)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return Cost(name, len(payload), statistics.median(per_round) * 1e6, peak)


def _costliest() -> dict[str, bytes]:
    return hostile(FRAME - 64)


GROUPS: dict[str, Callable[[], dict[str, bytes]]] = {
    "client frames as clients send them": typical,
    "the costliest frames of the largest size": _costliest,
}


def run_decode_bench(rounds: int, progress: Callable[[str], None] = print) -> dict[str, list[Cost]]:
    """Costs by group (``GROUPS``)."""
    costs = {}
    for group, frames_of in GROUPS.items():
        frames = frames_of()
        progress(f"{group}: {len(frames)} frames")
        costs[group] = [measure(name, payload, rounds) for name, payload in frames.items()]
    return costs
