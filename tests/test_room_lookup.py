"""actors/room_lookup.py end to end: naming a room that does not exist costs no actor,
and every refusal counts against the error budget, whoever raised it."""

from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from actors.directory import ActorKind, Directory
from actors.metrics import Metrics
from actors.room_lookup import RoomLookup
from protocol.client import ServerError
from protocol.codec import encode
from protocol.errors import CloseCode, ErrorCode
from protocol.frames import Error, Hello, Send
from storage.sqlite import open_sqlite_store
from tests.helpers import RunningServer, next_frame, run_server


def rooms_running(server: RunningServer) -> int:
    return server.node.directory.count(ActorKind.ROOM)


async def lookups(server: RunningServer) -> dict[str, float]:
    async with server.http(admin=False) as http:
        text = (await http.get("/metrics")).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "parley_room_lookups_total":
                out[s.labels["result"]] = s.value
            elif s.name == "parley_unknown_rooms_cached":
                out["cached"] = s.value
    return out


async def test_requests_about_made_up_rooms_start_no_actor(server: RunningServer) -> None:
    for i in range(8):  # a session per room: each one earns 8 errors of its budget's 20
        async with server.client("alice") as alice:
            room = f"nowhere-{i}"
            for request in (
                alice.send(room, "x"),
                alice.join(room),
                alice.history(room),
                alice.receipt(room, read=1),
                alice.receipt_state(room),
                alice.typing(room),
                alice.leave(room),
                alice.invite(room, "bob"),
            ):
                with pytest.raises(ServerError) as refused:
                    await request
                assert refused.value.code is ErrorCode.NOT_FOUND
    assert rooms_running(server) == 0
    found = await lookups(server)
    # One storage read per made-up name; every later request was answered from cache.
    assert (found["missing"], found["cached_missing"], found["cached"]) == (8, 56, 8)
    async with server.client("alice") as alice:
        await alice.create("real")  # a creation is no lookup
        await alice.send("real", "here")
        assert rooms_running(server) == 1


async def test_resuming_made_up_rooms_starts_no_actor(tmp_path: Path) -> None:
    """The amplification found: hellos resuming many made-up rooms made an actor each,
    which lived 30 s. They are refused, uncharged (the client may have lost nothing but
    its server's database), and cost one storage read per name."""
    async with run_server(tmp_path) as server:
        resume = {f"ghost-{i}": (5, "e") for i in range(100)}
        for _ in range(5):
            async with server.raw() as ws:
                hello = Hello(v=1, token=server.token("mallory"), resume=resume)
                await ws.send_message(encode(hello))
                frames = [await next_frame(ws) for _ in range(101)]
                errors = [f for f in frames[1:] if isinstance(f, Error)]
                assert [e.code for e in errors] == [ErrorCode.NOT_FOUND] * 100
        assert rooms_running(server) == 0
        found = await lookups(server)
        assert (found["missing"], found["cached_missing"]) == (100, 400)


async def test_room_refusals_count_against_the_error_budget(server: RunningServer) -> None:
    """A send refused by the room (not a member) is an error like any other: 21 in a
    burst close the session, as 21 bad frames would."""
    async with server.client("alice") as alice:
        await alice.create("private", private=True)
    async with server.raw() as ws:
        await ws.send_message(encode(Hello(v=1, token=server.token("mallory"))))
        await next_frame(ws)  # welcome
        for i in range(21):
            await ws.send_message(encode(Send(id=i, room="private", cid=f"c{i}", text="x")))
        codes = []
        with pytest.raises(Exception) as closed:
            while True:
                frame = await next_frame(ws)
                if isinstance(frame, Error):
                    codes.append(frame.code)
        assert codes == [ErrorCode.FORBIDDEN] * 21
        reason = getattr(closed.value, "reason", None)
        assert reason is not None and reason.code == CloseCode.TOO_MANY_ERRORS


async def test_a_room_that_does_not_come_to_exist_retires_at_once(server: RunningServer) -> None:
    async with server.client("alice") as alice, server.client("mallory") as mallory:
        await alice.block("mallory")
        with pytest.raises(ServerError):
            await mallory.direct("alice")  # the direct room's actor started, refused
        with trio.fail_after(5):
            while rooms_running(server):  # noqa: ASYNC110 - the actor's own decision
                await trio.sleep(0.01)


@asynccontextmanager
async def lookup_over_sqlite(tmp_path: Path, **options: Any) -> AsyncIterator[RoomLookup]:
    metrics = Metrics()
    async with (
        open_sqlite_store(f"sqlite:///{tmp_path / 'rooms.db'}") as store,
        trio.open_nursery() as nursery,
    ):
        yield RoomLookup(Directory(nursery, metrics, mailbox_size=8), store, metrics, **options)
        nursery.cancel_scope.cancel()


async def test_a_miss_read_while_a_room_was_created_is_not_cached(tmp_path: Path) -> None:
    """The read began before the room was created (and stored): its "no" may be stale."""
    async with lookup_over_sqlite(tmp_path, concurrent_reads=1) as lookup:
        answers: list[bool] = []
        async with trio.open_nursery() as nursery:
            async with lookup._reads:  # the one read slot is taken: the lookup waits
                nursery.start_soon(lambda: _append(answers, lookup.exists("r")))
                await trio.testing.wait_all_tasks_blocked()
                lookup.created("r")
        assert answers == [False]  # storage has no such room yet, and said so
        assert lookup.known("r") is None and len(lookup) == 0  # but that was not kept
        assert not await lookup.exists("other")
        assert lookup.known("other") is False  # a read with no creation meanwhile is


async def test_a_cached_miss_expires(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with lookup_over_sqlite(tmp_path, ttl=60.0) as lookup:
        assert not await lookup.exists("r")
        await trio.sleep(59)
        assert lookup.known("r") is False
        await trio.sleep(1)
        assert lookup.known("r") is None and len(lookup) == 0


async def test_the_cache_keeps_the_newest_misses(tmp_path: Path) -> None:
    async with lookup_over_sqlite(tmp_path, cache_size=3) as lookup:
        for room in "abcd":
            assert not await lookup.exists(room)
        assert [lookup.known(r) for r in "abcd"] == [None, False, False, False]


async def _append(out: list[bool], answer: Awaitable[bool]) -> None:
    out.append(await answer)
