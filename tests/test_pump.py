"""actors/pump.py with actors/outbox.py over a real socket pair: the pump writes while
the socket takes everything, hands a full socket to the writer task, and takes it back;
bytes arrive complete and in order whoever wrote them."""

import contextlib
import socket

import trio
import trio.testing

from actors.outbox import Outbox, write_through
from actors.pump import WritePump


async def test_pump_writer_handover_keeps_every_byte_in_order() -> None:
    left, right = trio.socket.socketpair()
    sender, receiver = trio.SocketStream(left), trio.SocketStream(right)
    pump = WritePump()
    outbox = Outbox(2**30, pump=pump, fd=left.fileno())
    writer_sends = 0
    received = bytearray()

    async def writer() -> None:  # as Connection._write does
        nonlocal writer_sends
        while batch := await outbox.next_batch():
            await sender.send_all(b"".join(batch))
            writer_sends += 1
            outbox.written(pump)

    async def read(n: int) -> None:
        while len(received) < n:
            received.extend(await receiver.receive_some(65536))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump.run)
        nursery.start_soon(writer)
        expected = bytearray()

        def append(chunk: bytes) -> None:
            outbox.append(chunk)
            expected.extend(chunk)

        append(b"small")
        await read(len(expected))
        assert (pump.writes, writer_sends) == (1, 0)  # the pump wrote it

        for i in range(300):  # 3 MB: more than the socket buffers hold
            append(bytes([i % 256]) * 10_000)
        await trio.testing.wait_all_tasks_blocked()
        assert pump.writes == 2  # one partial write, then the writer task has it
        for i in range(50):  # appended while the writer owns the outbox
            append(f"late{i}".encode())
        await read(len(expected))
        assert writer_sends >= 1

        writes = pump.writes
        append(b"after")  # the socket is empty again: back to the pump
        await read(len(expected))
        assert pump.writes == writes + 1
        assert received == expected
        outbox.close()
        nursery.cancel_scope.cancel()  # the pump runs until cancelled
    await sender.aclose()
    await receiver.aclose()


async def test_a_closed_outbox_is_never_written_by_the_pump() -> None:
    left, right = trio.socket.socketpair()
    pump = WritePump()
    outbox = Outbox(1024, pump=pump, fd=left.fileno())
    outbox.append(b"queued")
    outbox.close()  # the connection closes before the pump runs
    pump.write([outbox])
    assert pump.writes == 0
    assert await outbox.next_batch() == [b"queued"]  # the writer sends what was queued
    assert await outbox.next_batch() == []
    left.close()
    right.close()


async def test_a_reset_socket_closes_the_outbox() -> None:
    left, right = trio.socket.socketpair()
    right.close()  # the peer is gone: writing fails with EPIPE or ECONNRESET
    pump = WritePump()
    outbox = Outbox(1024, pump=pump, fd=left.fileno())
    outbox.append(b"lost")
    pump.write([outbox])
    assert outbox.closed and outbox.nbytes == 0
    outbox.append(b"dropped")  # a closed outbox takes nothing more
    assert await outbox.next_batch() == []
    left.close()


async def test_an_overflow_never_tears_a_frame_the_client_has_begun() -> None:
    left, right = trio.socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    pump = WritePump()
    overflowed: list[bool] = []
    outbox = Outbox(300_000, lambda: overflowed.append(True), pump=pump, fd=left.fileno())
    first = b"A" * 200_000
    outbox.append(first)
    pump.write([outbox])  # the socket takes a few kB of it
    assert outbox.torn
    outbox.append(b"B" * 150_000)  # over the limit: pending frames are dropped...
    assert overflowed == [True]
    sender, receiver = trio.SocketStream(left), trio.SocketStream(right)
    received = bytearray()
    async with trio.open_nursery() as nursery:

        async def read() -> None:
            while chunk := await receiver.receive_some(65536):
                received.extend(chunk)

        nursery.start_soon(read)
        while batch := await outbox.next_batch():  # ...but the begun frame is finished
            await sender.send_all(b"".join(batch))
        await sender.aclose()
    await receiver.aclose()
    assert received == first
    assert outbox.nbytes == 0


async def test_held_frames_stay_counted_while_the_pump_writes() -> None:
    left, right = trio.socket.socketpair()
    pump = WritePump()
    outbox = Outbox(1000, pump=pump, fd=left.fileno())
    outbox.hold()
    outbox.append(b"h" * 600)  # a live message, held behind a replay
    outbox.append_direct(b"r" * 100)  # the replay
    pump.write([outbox])
    assert outbox.nbytes == 600
    outbox.append(b"h" * 500)  # held too: over the limit in all
    assert outbox.overflowed
    left.close()
    right.close()


async def test_the_writer_task_runs_only_while_the_pump_cannot_write() -> None:
    """As Connection does: the writer is started when the pump hands a full socket over
    (or the outbox closes), and ends when the socket takes everything again."""
    left, right = trio.socket.socketpair()
    sender, receiver = trio.SocketStream(left), trio.SocketStream(right)
    pump = WritePump()
    starts = 0
    running = False  # read through writing(): mypy would narrow the name between checks
    received = bytearray()
    expected = bytearray()

    async with trio.open_nursery() as nursery:

        async def writer() -> None:
            nonlocal running
            while batch := await outbox.next_batch():
                await sender.send_all(b"".join(batch))
                if outbox.written(pump):
                    running = False
                    return
            running = False

        def start_writer() -> None:
            nonlocal starts, running
            if not running:
                starts += 1
                running = True
                nursery.start_soon(writer)

        outbox = Outbox(2**30, pump=pump, fd=left.fileno(), start_writer=start_writer)

        def append(chunk: bytes) -> None:
            outbox.append(chunk)
            expected.extend(chunk)

        async def read() -> None:
            while len(received) < len(expected):
                received.extend(await receiver.receive_some(65536))

        def writing() -> bool:
            return running

        nursery.start_soon(pump.run)
        for _ in range(2):
            append(b"small")
            await read()
            await trio.testing.wait_all_tasks_blocked()
            assert not writing()  # the pump wrote it: no writer task
            for i in range(300):  # 3 MB: more than the socket buffers hold
                append(bytes([i % 256]) * 10_000)
            await trio.testing.wait_all_tasks_blocked()
            assert writing()  # handed over
            await read()
            await trio.testing.wait_all_tasks_blocked()
            assert not writing()  # and handed back: the writer ended
        assert starts == 2
        append(b"last")
        outbox.close(b"final")  # closing needs the writer for the final frame
        expected.extend(b"final")
        await read()
        assert starts == 3 and received == expected
        nursery.cancel_scope.cancel()
    await sender.aclose()
    await receiver.aclose()


async def test_pump_writes_a_large_fan_out_in_steps_of_a_chunk() -> None:
    from actors.pump import CHUNK

    pairs = [socket.socketpair() for _ in range(CHUNK * 2 + 10)]
    pump = WritePump()
    outboxes = [Outbox(2**20, pump=pump, fd=a.fileno()) for a, _ in pairs]

    class Steps(trio.abc.Instrument):
        def __init__(self) -> None:
            self.pump = 0

        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            if task.name.endswith("WritePump.run"):
                self.pump += 1

    steps = Steps()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.run)
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.add_instrument(steps)
            for n, outbox in enumerate(outboxes):
                outbox.append(b"frame %d" % n)
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.remove_instrument(steps)
            nursery.cancel_scope.cancel()
        assert pump.writes == len(pairs)
        assert [b.recv(100) for _, b in pairs] == [b"frame %d" % n for n in range(len(pairs))]
        assert steps.pump == 3  # woken, then two checkpoints between three chunks
    finally:
        for a, b in pairs:
            a.close()
            b.close()


async def test_write_through_writes_idle_outboxes_itself_and_keeps_order_elsewhere() -> None:
    pairs = [socket.socketpair() for _ in range(3)]
    pump = WritePump()
    idle, busy, held = (Outbox(2**20, pump=pump, fd=a.fileno()) for a, _ in pairs)
    busy.append(b"first;")  # pending: the pump has not run
    held.hold()  # a replay is being written
    write_through([idle, busy, held], b"live;")
    assert pump.writes == 0
    assert pairs[0][1].recv(100) == b"live;"  # written at once, no pump
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump.run)
        await trio.testing.wait_all_tasks_blocked()
        assert pairs[1][1].recv(100) == b"first;live;"  # after what was pending
        held.append_direct(b"replay;")
        held.release()
        await trio.testing.wait_all_tasks_blocked()
        assert pairs[2][1].recv(100) == b"replay;live;"  # after the replay
        nursery.cancel_scope.cancel()
    for a, b in pairs:
        a.close()
        b.close()


def test_write_through_hands_a_full_socket_to_the_writer_and_a_reset_one_is_broken() -> None:
    full, gone = socket.socketpair(), socket.socketpair()
    try:
        for a, _ in (full, gone):
            a.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                full[0].send(b"x" * 65536)  # until the kernel takes no more
        gone[1].close()
        waiting, broken = (
            Outbox(2**20, pump=WritePump(), fd=a.fileno(), start_writer=lambda: None)
            for a, _ in (full, gone)
        )
        write_through([waiting, broken], b"live;")
        assert waiting.torn and waiting.nbytes == len(b"live;")  # the writer task's now
        assert waiting._pump is None and not waiting.closed
        assert broken.closed and broken.nbytes == 0
    finally:
        for pair in (full, gone):
            for s in pair:
                s.close()
