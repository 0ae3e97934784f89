"""A cluster of node processes losing one: SIGKILL of a busy room's node, and a node
paused past its lease (SIGSTOP) that comes back. Clients retry and resume on the
others; nothing acknowledged is lost, nothing is stored twice, seqs stay gap-free."""

import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed, HandshakeError

from protocol.client import Disconnected, ServerError, open_client
from protocol.errors import ErrorCode
from protocol.frames import Sent
from storage.store import open_store
from tests.helpers import ServerProcess, server_process

LEASE = "1.0"


@asynccontextmanager
async def node_processes(
    tmp_path: Path, database_url: str, redis_url: str, n: int = 3
) -> AsyncIterator[list[ServerProcess]]:
    async with AsyncExitStack() as stack:
        nodes = []
        for i in range(n):
            folder = tmp_path / f"node{i}"
            folder.mkdir()
            extra = (
                "--database-url",
                database_url,
                "--redis-url",
                redis_url,
                "--cluster-lease",
                LEASE,
            )
            node = await stack.enter_async_context(server_process(folder, *extra))
            await node.start()
            nodes.append(node)
        yield nodes


class Sender:
    """Sends ``count`` messages, each until acknowledged: reconnecting (to its own node,
    or the next one if that is gone) and resending with the same cid, as a client should."""

    def __init__(self, name: str, nodes: list[ServerProcess], home: int, count: int) -> None:
        self.name = name
        self.nodes = nodes
        self.home = home
        self.count = count
        self.acked: dict[str, int] = {}  # cid -> seq
        self.closes: list[int | None] = []
        self.attempted: set[str] = set()
        self.times: list[float] = []  # when each ack came

    async def run(self, room: str, dead: set[int]) -> None:
        i = 0
        node = self.home
        with trio.fail_after(90):
            while i < self.count:
                while node in dead:
                    node = (node + 1) % len(self.nodes)
                target = self.nodes[node]
                client = None
                try:
                    async with open_client(target.url, target.token(self.name)) as client:
                        await client.join(room, resume=False)
                        while i < self.count:
                            cid = f"{self.name}-{i}"
                            retry = cid in self.attempted
                            self.attempted.add(cid)
                            with trio.fail_after(10):
                                sent = await client.send(room, cid, cid=cid, retry=retry)
                            self.acked[cid] = sent.seq
                            self.times.append(trio.current_time())
                            i += 1
                            await trio.sleep(0.01)
                except (
                    ServerError,
                    Disconnected,
                    ConnectionClosed,
                    HandshakeError,
                    OSError,
                ) as exc:
                    code = getattr(exc, "code", None)
                    assert code in (None, ErrorCode.TRY_LATER, ErrorCode.TIMEOUT), exc
                    await trio.sleep(0.1)
                except trio.TooSlowError:
                    await trio.sleep(0.1)  # an ack that never came: resend on a new session
                if client is not None:
                    self.closes.append(client.close_code)


async def check_storage(database_url: str, room: str, senders: list[Sender]) -> int:
    async with open_store(database_url) as store:
        stored = await store.fetch_messages(room, 1, 10_000)
    seqs = [m.seq for m in stored]
    assert seqs == list(range(1, len(seqs) + 1)), "seqs gap-free"
    cids = [m.cid for m in stored]
    assert len(cids) == len(set(cids)), "no message stored twice"
    by_cid = {m.cid: m.seq for m in stored}
    for sender in senders:
        for cid, seq in sender.acked.items():
            assert by_cid.get(cid) == seq, f"acked {cid} at {seq}, stored at {by_cid.get(cid)}"
    return len(stored)


async def test_sigkill_of_a_busy_rooms_node_loses_nothing_acked(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    async with node_processes(tmp_path, postgres_url, redis_url) as nodes:
        owner = nodes[0]
        async with open_client(owner.url, owner.token("alice")) as alice:
            await alice.create("busy")
            for who in ("bob", "carol", "dave"):
                await alice.invite("busy", who)
        dead: set[int] = set()
        senders = [
            Sender(name, nodes, home, 60) for name, home in [("bob", 1), ("carol", 2), ("dave", 0)]
        ]
        async with trio.open_nursery() as nursery:
            for s in senders:
                nursery.start_soon(s.run, "busy", dead)
            with trio.fail_after(30):
                while sum(len(s.acked) for s in senders) < 40:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            dead.add(0)
            killed = trio.current_time()
            assert await owner.signal(signal.SIGKILL) == -signal.SIGKILL
        assert all(len(s.acked) == s.count for s in senders)
        first = min(t for s in senders for t in s.times if t > killed)
        print(f"SIGKILL to the first accepted send: {first - killed:.2f}s")
        # Those on the surviving nodes were told the room moved (4009), then resumed.
        assert 4009 in senders[0].closes + senders[1].closes
        stored = await check_storage(postgres_url, "busy", senders)
        survivor = nodes[1]
        async with open_client(survivor.url, survivor.token("alice")) as alice:
            joined = await alice.join("busy", resume=False)
            assert joined.seq == stored


async def test_a_paused_owner_is_fenced_when_it_comes_back(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    async with node_processes(tmp_path, postgres_url, redis_url) as nodes:
        owner = nodes[0]
        async with open_client(owner.url, owner.token("alice")) as alice:
            await alice.create("r")
            await alice.invite("r", "bob")
            await alice.send("r", "before", cid="before")
            assert owner.proc is not None
            owner.proc.send_signal(signal.SIGSTOP)
            try:
                # Meanwhile a client of another node takes the room over.
                bob_node = nodes[1]
                with trio.fail_after(30):
                    while True:
                        try:
                            async with open_client(bob_node.url, bob_node.token("bob")) as bob:
                                await bob.join("r", resume=False)
                                sent = await bob.send("r", "after", cid="after")
                                break
                        except (ServerError, Disconnected, ConnectionClosed):
                            await trio.sleep(0.2)
                # The paused owner's client sends once more, before it can know.
                stale = trio.Event()
                outcome: list[object] = []

                async def send_stale() -> None:
                    try:
                        with trio.fail_after(15):
                            outcome.append(await alice.send("r", "stale", cid="stale"))
                    except (ServerError, Disconnected, ConnectionClosed, trio.TooSlowError) as exc:
                        outcome.append(exc)
                    stale.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_stale)
                    await trio.sleep(0.2)
                    owner.proc.send_signal(signal.SIGCONT)
                    await stale.wait()
            finally:
                owner.proc.send_signal(signal.SIGCONT)
        # Whatever the paused node did, no client holds an ack for what is not stored.
        async with open_store(postgres_url) as store:
            stored = {m.cid: m.seq for m in await store.fetch_messages("r", 1, 100)}
        assert stored["after"] == sent.seq
        assert stored["before"] == 1
        result = outcome[0]
        if isinstance(result, Sent):
            assert stored.get("stale") == result.seq
        else:  # refused (the room moved), or never answered: then never stored
            assert "stale" not in stored, result
