"""SIGTERM drains: goaway, stored acks delivered, 1001, exit 0; the next start resumes."""

import signal
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed

from protocol.client import Disconnected, ParleyClient, ServerError, open_client
from protocol.errors import CloseCode, ErrorCode
from protocol.frames import Frame, Goaway, Joined, Message
from tests.helpers import server_process

WINDOW = 16


async def test_sigterm_drains_and_a_clean_restart_resumes(tmp_path: Path) -> None:
    # No rate limit: the sender pipelines as fast as acks come, and what this test is
    # about is the drain, not error 104.
    async with server_process(tmp_path, "--rate", "100000", "--burst", "100000") as server:
        await server.start()
        acked: dict[str, int] = {}
        async with open_client(server.url, server.token("alice")) as alice:
            await alice.create("r")
            for i in range(5):
                await alice.send("r", "early", cid=f"early{i}")
            positions = dict(alice.positions)
        async with open_client(server.url, server.token("bob")) as bob:
            await bob.join("r")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_until_closed, bob, acked)
                with trio.fail_after(30):
                    while len(acked) < 40:  # noqa: ASYNC110 - counting acks
                        await trio.sleep(0.01)
                with trio.fail_after(30):
                    assert await server.signal(signal.SIGTERM) == 0
            goaways = [e for e in drain(bob) if isinstance(e, Goaway)]
            assert goaways and goaways[0].delay is not None
            assert bob.close_code == CloseCode.GOING_AWAY
        assert "stopped cleanly" in server.log()

        await server.start()
        async with open_client(server.url, server.token("alice"), resume=positions) as alice:
            joined = await alice.next_event(Joined)
            assert joined.recovered is True  # a clean stop keeps the epoch
            replay = [await alice.next_event(Message) for _ in range(joined.seq - 5)]
            assert [m.seq for m in replay] == list(range(6, joined.seq + 1))
            stored = {m.cid: m.seq for m in replay}
            assert all(stored[cid] == seq for cid, seq in acked.items())  # every ack kept


async def send_until_closed(client: ParleyClient, acked: dict[str, int]) -> None:
    """Pipelined sends, at most WINDOW awaiting their ack, until the server goes."""
    window = trio.Semaphore(WINDOW)

    async def one(cid: str) -> None:
        try:
            acked[cid] = (await client.send("r", "late", cid=cid)).seq
        except ServerError as exc:  # refused once the node is going away
            assert exc.code is ErrorCode.TRY_LATER
        except (Disconnected, ConnectionClosed):
            pass  # the connection closed before the answer
        finally:
            window.release()

    async with trio.open_nursery() as nursery:
        i = 0
        while client.close_code is None:
            await window.acquire()
            nursery.start_soon(one, f"late{i}")
            i += 1


def drain(client: ParleyClient) -> list[Frame]:
    events = []
    while True:
        try:
            events.append(client.events.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return events
