"""Peer "trio-floor": the least a server on trio can do, to measure what trio adds.

    python trio_floor_server.py PORT

The floor peer's contract and work (``floor_server.py``: the upgrade answered by hand, a
broadcast framed once and written to each member with one ``os.write``), but the way a
trio server holds its connections: an accept loop, one task per connection reading with
``SocketStream.receive_some``, the upgrade and the "ok" sent with ``send_all``. Beside
the floor, it prices trio's own share of a connect and of an idle session: a task, its
coroutines, the scheduler's wake-ups. No pings, no limits, no error handling beyond
dropping a connection: a ruler, not a server. The cyclic collector is off, as in
``parley serve``. Needs only trio (the project's venv).
"""

import gc
import os
import signal
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, by path
from loadtests.peers.floor_server import OK, frame, unmask_frames, upgrade_response


async def serve(stream: trio.SocketStream, rooms: dict[str, set[int]]) -> None:
    fd = stream.socket.fileno()
    room = ""
    upgraded = False
    buf = b""
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
            if not upgraded:
                answer, room, buf = upgrade_response(buf)
                if answer is None:
                    continue
                upgraded = True
                rooms.setdefault(room, set()).add(fd)
                await stream.send_all(answer)
            texts, buf, closed = unmask_frames(buf)
            for target, text in texts:
                out = frame(text)
                for member in rooms.get(target, ()):
                    if member != fd:
                        try:
                            os.write(member, out)
                        except OSError:
                            pass  # a full or reset socket: the delivery shows as lost
                await stream.send_all(OK)
            if closed:
                return
    except trio.BrokenResourceError:
        pass
    finally:
        rooms.get(room, set()).discard(fd)
        await trio.aclose_forcefully(stream)


async def main(port: int) -> None:
    rooms: dict[str, set[int]] = {}
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=4096)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_accept, listeners[0], rooms, nursery)
            async for _ in signals:
                nursery.cancel_scope.cancel()


async def _accept(
    listener: trio.SocketListener, rooms: dict[str, set[int]], nursery: trio.Nursery
) -> None:
    while True:
        stream = await listener.accept()
        nursery.start_soon(serve, stream, rooms)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: trio_floor_server.py PORT")
    # As parley serve runs (server/collector.py): no collector pass in the measurements.
    gc.freeze()
    gc.disable()
    trio.run(main, int(sys.argv[1]))
