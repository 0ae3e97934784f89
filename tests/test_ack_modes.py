"""``--ack-mode``: when the sender's sent-ack leaves, against when its message is stored.

durable (the default): only once the message is committed; sequenced: as soon as the
room gave it a seq. Members get the message at once in both modes: the fan-out never
waits for storage. The database is held locked by another connection so that the
write-behind's commits fail, and retry, until the test lets them through.
"""

import sqlite3
from collections.abc import Awaitable
from pathlib import Path

import pytest
import trio

from protocol.frames import Message, Sent
from tests.helpers import run_server


async def _into(acks: list[Sent], send: Awaitable[Sent]) -> None:
    acks.append(await send)


@pytest.mark.parametrize("mode", ["durable", "sequenced"])
async def test_a_sent_ack_waits_for_the_commit_only_when_durable(tmp_path: Path, mode: str) -> None:
    async with run_server(tmp_path, ack_mode=mode) as server:
        write_behind = server.node.write_behind
        async with server.client("alice") as alice, server.client("bob") as bob:
            await alice.create("r")
            await bob.join("r")
            lock = sqlite3.connect(tmp_path / "parley.db", isolation_level=None, timeout=10)
            lock.execute("BEGIN IMMEDIATE")  # every commit of the node's fails meanwhile
            acks: list[Sent] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_into, acks, alice.send("r", "hello"))
                with trio.fail_after(10):
                    got = await bob.next_event(Message)
                    while write_behind.statistics().failing_since is None:  # noqa: ASYNC110 - the commit fails on a timer of SQLite's
                        await trio.sleep(0.01)
                # A commit of the message has failed: it is not stored.
                if mode == "durable":
                    assert acks == []
                else:
                    with trio.fail_after(10):
                        while not acks:  # noqa: ASYNC110 - the ack is a network event
                            await trio.sleep(0.01)
                lock.execute("ROLLBACK")
                lock.close()
            assert [a.seq for a in acks] == [got.seq]
            with trio.fail_after(10):
                await write_behind.wait_flushed()
            assert write_behind.statistics().failing_since is None  # stored after all
