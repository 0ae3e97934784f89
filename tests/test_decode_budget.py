"""The decoder's cost is bounded by the frame's size: work per byte, memory per byte.

Work is counted in Python bytecodes executed (``sys.settrace`` with opcode events), which
is exact and the same on every run, where a time would not be: the tests never assert a
duration. The C calls the decoder makes (``bytes.decode``, ``int.from_bytes``, a regex)
each take a slice it has bounded already, so they are linear too. BENCHMARKS.md
("Decoding") gives the figures in nanoseconds per byte and the command that measures
them.

The frames below are the ones an attacker would pick: the most items per byte (an
array of 60,000 zeros is the cheapest 60 KB frame to send), the deepest nesting,
the most Python objects per byte, and random ones.
"""

import sys
import tracemalloc
from collections.abc import Callable
from functools import partial
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtests import decodebench
from protocol.codec import decode_client, decode_server, peek
from protocol.errors import RemoteProtocolError
from protocol.limits import Limits
from protocol.wsserver import ClientFrames

LIMITS = Limits()
# Measured on the frames below (BENCHMARKS.md, "Decoding"): at most 100 bytecodes per
# byte (nested one-pair maps in data), and a constant for the smallest frames.
OPS_PER_BYTE = 120
OPS_CONSTANT = 2_000
# Python objects cost some 50 bytes each; the densest frames (100 two-letter user ids,
# 100 resumed rooms, 500 kv writes) hold up to 30 bytes of objects per byte of frame.
MEMORY_PER_BYTE = 40
MEMORY_CONSTANT = 16 * 1024


def opcodes(run: Callable[[], Any]) -> int:
    """Bytecodes executed by ``run()``."""
    count = 0

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        frame.f_trace_opcodes = True
        if event == "opcode":
            count += 1
        return trace

    previous = sys.gettrace()  # coverage's tracer, under ./run-tests: put it back after
    sys.settrace(trace)
    try:
        run()
    finally:
        sys.settrace(previous)
    return count


def peak_memory(run: Callable[[], Any]) -> int:
    """The most memory ``run()`` held at once, above what there was before."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        run()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def decode(payload: bytes) -> None:
    try:
        decode_client(payload, LIMITS)
    except RemoteProtocolError:
        pass


def assert_within_budget(payload: bytes) -> None:
    ops = opcodes(lambda: decode(payload))
    assert ops <= OPS_PER_BYTE * len(payload) + OPS_CONSTANT, (len(payload), ops)
    memory = peak_memory(lambda: decode(payload))
    assert memory <= MEMORY_PER_BYTE * len(payload) + MEMORY_CONSTANT, (len(payload), memory)


ITEMS = decodebench.ITEMS
HOSTILE = {
    **decodebench.hostile(2700),
    "send-small": cbor2.dumps({0: 15, 1: 1, 2: "r", 6: "c", 7: "x"}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_frames_cost_what_their_size_allows(name: str) -> None:
    assert_within_budget(HOSTILE[name])


def test_cost_grows_linearly_with_the_frame() -> None:
    for item in ITEMS.values():
        small = opcodes(partial(decode, decodebench.in_unknown_key(item, 400)))
        large = opcodes(partial(decode, decodebench.in_unknown_key(item, 3200)))
        assert large <= 8 * small * 1.05


def test_an_error_message_is_short_and_never_echoes_the_frame() -> None:
    secret = "x" * 1000
    for payload in (
        cbor2.dumps({0: 15, 1: 1, 2: secret, 6: "c", 7: "t"}),
        cbor2.dumps({0: 14, 1: 1, 5: secret}),
        cbor2.dumps({0: 34, 1: 1, 33: [secret]}),
        cbor2.dumps({0: 50, 1: 1, 39: "d", 17: [{36: secret + "\x00", 38: 1}]}),
        cbor2.dumps({0: 1, 9: "t", 10: 1, 11: {secret: [1, "e"]}}),
        cbor2.dumps({0: 15, 1: 1, 2: "r", 6: "c", 8: {secret: float("inf")}}),
        HOSTILE["kvput-60000-zeros"],
    ):
        with pytest.raises(RemoteProtocolError) as info:
            decode_client(payload, LIMITS)
        assert len(info.value.message) < 200
        assert "xxxx" not in info.value.message


# --- random frames --------------------------------------------------------------------

cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=8)
        | st.dictionaries(st.integers(0, 45) | st.text(max_size=5), inner, max_size=8)
    ),
    max_leaves=200,
)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 60), st.dictionaries(st.integers(1, 45), cbor_values, max_size=10))
def test_random_frames_of_every_type_stay_within_budget(kind: int, fields: dict[int, Any]) -> None:
    assert_within_budget(cbor2.dumps({0: kind, **fields}))


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=1, max_size=3000))
def test_random_bytes_stay_within_budget(payload: bytes) -> None:
    assert_within_budget(payload)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000))
def test_peek_and_the_client_side_decoder_stay_within_budget(payload: bytes) -> None:
    def both() -> None:
        peek(payload)
        try:
            decode_server(payload)
        except RemoteProtocolError:
            pass

    assert opcodes(both) <= 2 * (OPS_PER_BYTE * len(payload) + OPS_CONSTANT)


def test_the_websocket_parser_stays_within_budget() -> None:
    """One-byte and empty fragments, the most frames per byte a client can send."""
    frames = ClientFrames(1024)
    mask = b"\x00\x00\x00\x00"
    first = b"\x02\x81" + mask + b"x"  # binary, not final, one byte
    more = b"\x00\x81" + mask + b"x"
    empty = b"\x00\x80" + mask
    data = first + (more + empty) * 2000
    ops = opcodes(lambda: frames.feed(data))
    assert ops <= OPS_PER_BYTE * len(data) + OPS_CONSTANT
