"""actors/outbox.py: batching, holds, overflow, closing."""

import trio
import trio.testing

from actors.outbox import Outbox


async def test_appends_come_out_in_order_as_one_batch() -> None:
    outbox = Outbox(limit=1000)
    for chunk in (b"a", b"bb", b"ccc"):
        outbox.append(chunk)
    assert outbox.nbytes == 6
    assert await outbox.next_batch() == [b"a", b"bb", b"ccc"]
    assert outbox.nbytes == 0


async def test_writer_sleeps_until_an_append() -> None:
    outbox = Outbox(limit=1000)
    batches: list[list[bytes]] = []
    async with trio.open_nursery() as nursery:

        async def writer() -> None:
            while batch := await outbox.next_batch():
                batches.append(batch)

        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert batches == []
        outbox.append(b"x")
        await trio.testing.wait_all_tasks_blocked()
        assert batches == [[b"x"]]
        outbox.close(b"bye")
    assert batches == [[b"x"], [b"bye"]]


async def test_hold_parks_appends_behind_direct_ones() -> None:
    outbox = Outbox(limit=1000)
    outbox.append(b"before")
    outbox.hold()
    outbox.append(b"live-1")
    outbox.append_direct(b"joined")
    outbox.append_direct(b"replay")
    outbox.append(b"live-2")
    assert await outbox.next_batch() == [b"before", b"joined", b"replay"]
    outbox.release()
    assert await outbox.next_batch() == [b"live-1", b"live-2"]


async def test_nested_holds_release_at_the_last() -> None:
    outbox = Outbox(limit=1000)
    outbox.hold()
    outbox.hold()
    outbox.append(b"x")
    outbox.release()
    outbox.append_direct(b"first")
    assert await outbox.next_batch() == [b"first"]
    outbox.release()
    assert await outbox.next_batch() == [b"x"]


async def test_overflow_drops_everything_and_closes() -> None:
    outbox = Outbox(limit=10)
    outbox.append(b"12345")
    outbox.hold()
    outbox.append(b"67890")
    assert (outbox.overflowed, outbox.nbytes) == (False, 10)
    outbox.append(b"!")
    assert (outbox.overflowed, outbox.closed, outbox.nbytes) == (True, True, 0)
    outbox.append(b"ignored")
    assert await outbox.next_batch() == []


def test_the_limit_itself_fits_on_every_path() -> None:
    """``--outbox-bytes`` is the most an outbox holds: exactly that much is kept, one byte
    more overflows, whichever way the bytes came."""
    for put in (Outbox.append, Outbox.append_direct):
        outbox = Outbox(limit=10)
        put(outbox, b"1234")
        put(outbox, b"567890")
        assert (outbox.overflowed, outbox.nbytes) == (False, 10), put
        put(outbox, b"!")
        assert (outbox.overflowed, outbox.closed, outbox.nbytes) == (True, True, 0), put


async def test_close_flushes_held_frames_then_the_final_one() -> None:
    outbox = Outbox(limit=100)
    outbox.hold()
    outbox.append(b"held")
    outbox.close(b"close-frame")
    outbox.append(b"too late")
    assert await outbox.next_batch() == [b"held"]
    assert await outbox.next_batch() == [b"close-frame"]
    assert await outbox.next_batch() == []
