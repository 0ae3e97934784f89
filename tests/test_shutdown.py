"""SIGTERM drains: goaway, stored acks delivered, 1001, exit 0; the next start resumes."""

import signal
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed

from protocol.client import Disconnected, ServerError, open_client
from protocol.errors import CloseCode, ErrorCode
from protocol.frames import Goaway, Joined, Message
from tests.helpers import server_process


async def test_sigterm_drains_and_a_clean_restart_resumes(tmp_path: Path) -> None:
    async with server_process(tmp_path) as server:
        await server.start()
        acked: dict[str, int] = {}
        async with open_client(server.url, server.token("alice")) as alice:
            await alice.create("r")
            for i in range(5):
                acked[f"early{i}"] = (await alice.send("r", "x", cid=f"early{i}")).seq
            positions = dict(alice.positions)

            async with trio.open_nursery() as nursery:

                async def send(cid: str) -> None:
                    try:
                        acked[cid] = (await alice.send("r", "x", cid=cid)).seq
                    except ServerError as exc:  # refused once the node is going away
                        assert exc.code is ErrorCode.TRY_LATER
                    except (Disconnected, ConnectionClosed):
                        pass  # the connection closed before the answer

                for i in range(50):
                    nursery.start_soon(send, f"late{i}")
                with trio.fail_after(30):
                    status = await server.signal(signal.SIGTERM)
            assert status == 0
            events = []
            while True:
                try:
                    events.append(alice.events.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            assert any(isinstance(e, Goaway) for e in events)
            assert alice.close_code == CloseCode.GOING_AWAY
            positions = {"r": (max(acked.values()), positions["r"][1])}
        assert "stopped cleanly" in server.log()

        await server.start()
        async with open_client(server.url, server.token("alice"), resume=positions) as alice:
            joined = await alice.next_event(Joined)
            assert joined.recovered is True  # a clean stop keeps the epoch
            history = await alice.history("r", after=0, limit=100)
            stored = {m.cid: m.seq for m in history.items}
            assert all(stored.get(cid) == seq for cid, seq in acked.items())
            replayed = []
            for _ in range(joined.seq - positions["r"][0]):
                replayed.append((await alice.next_event(Message)).seq)
            assert replayed == list(range(positions["r"][0] + 1, joined.seq + 1))
