"""A server killed with SIGKILL while clients send: every acknowledged message survives.

Clients pipeline sends (many awaiting their ack at once), the server is killed, started
again on the same database, and every client resends what was never acknowledged with
the same cid and ``retry``. Then: everything acknowledged is in history with the seq of
its ack, every message is there exactly once, each room's seqs run 1..N with no gap,
and each sender's messages are in the order sent. Rooms the crashed run had open get a
new epoch, so a resuming client is told to start over rather than trust its seqs.
"""

import signal
from pathlib import Path

import pytest
import trio

from protocol.client import ParleyClient, open_client
from protocol.frames import Joined
from tests.helpers import ServerProcess, server_process

ROOMS = ("north", "south")
SENDERS_PER_ROOM = 3
WINDOW = 16


async def all_history(client: ParleyClient, room: str) -> list[tuple[int, str | None, str]]:
    items: list[tuple[int, str | None, str]] = []
    after = 0
    while True:
        page = await client.history(room, after=after, limit=100)
        items += [(m.seq, m.user, m.cid) for m in page.items]
        if not page.more:
            return items
        after = page.items[-1].seq


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, ...]:
    """Extra ``serve`` flags: the default SQLite file, or a fresh PostgreSQL database."""
    if request.param == "postgres":
        return ("--database-url", request.getfixturevalue("postgres_url"))
    return ()


async def test_acked_messages_survive_sigkill(tmp_path: Path, database: tuple[str, ...]) -> None:
    async with server_process(tmp_path, *database) as server:
        await server.start()
        async with open_client(server.url, server.token("owner")) as owner:
            for room in ROOMS:
                await owner.create(room)
        senders = [(f"{room}-{n}", room) for room in ROOMS for n in range(SENDERS_PER_ROOM)]
        attempted: dict[str, list[str]] = {name: [] for name, _ in senders}
        acked: dict[str, dict[str, int]] = {name: {} for name, _ in senders}
        killed = trio.Event()

        async with open_client(server.url, server.token("watcher")) as watcher:
            for room in ROOMS:
                await watcher.join(room)
            positions_before = dict(watcher.positions)

            async with trio.open_nursery() as nursery:
                for name, room in senders:
                    nursery.start_soon(
                        send_until_killed, server, name, room, attempted, acked, killed
                    )
                with trio.fail_after(60):
                    while sum(map(len, acked.values())) < 300:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                killed.set()
                assert await server.signal(signal.SIGKILL) == -signal.SIGKILL

        unacked = sum(len(attempted[n]) - len(acked[n]) for n in attempted)
        assert unacked > 0, "the kill should catch sends in flight"
        acked_before = {n: dict(a) for n, a in acked.items()}

        await server.start()
        for name, room in senders:
            async with open_client(server.url, server.token(name)) as client:
                await client.join(room)
                for cid in attempted[name]:
                    sent = await client.send(room, cid, cid=cid, retry=True)
                    if cid in acked_before[name]:
                        assert sent.seq == acked_before[name][cid]  # no second copy
                    acked[name][cid] = sent.seq

        async with open_client(
            server.url, server.token("watcher"), resume=positions_before
        ) as watcher:
            resumed = [await watcher.next_event(Joined) for _ in ROOMS]
            assert all(j.recovered is False for j in resumed)  # crash: new epochs
            for room in ROOMS:
                history = await all_history(watcher, room)
                assert [seq for seq, _, _ in history] == list(range(1, len(history) + 1))
                assert len({cid for _, _, cid in history}) == len(history)  # no duplicates
                for name, r in senders:
                    if r != room:
                        continue
                    mine = [(seq, cid) for seq, user, cid in history if user == name]
                    assert [cid for _, cid in mine] == attempted[name]  # all, in order
                    assert dict((cid, seq) for seq, cid in mine) == acked[name]


async def send_until_killed(
    server: ServerProcess,
    name: str,
    room: str,
    attempted: dict[str, list[str]],
    acked: dict[str, dict[str, int]],
    killed: trio.Event,
) -> None:
    window = trio.Semaphore(WINDOW)

    async def one(client: ParleyClient, cid: str) -> None:
        try:
            sent = await client.send(room, cid, cid=cid)
            acked[name][cid] = sent.seq
        finally:
            window.release()

    try:
        async with open_client(server.url, server.token(name)) as client:
            await client.join(room)
            async with trio.open_nursery() as nursery:
                i = 0
                while True:
                    await window.acquire()
                    cid = f"{name}:{i:05d}"
                    attempted[name].append(cid)
                    nursery.start_soon(one, client, cid)
                    i += 1
    except BaseException:
        if not killed.is_set():
            raise
