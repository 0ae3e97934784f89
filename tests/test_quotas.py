"""actors/quotas.py and the session's rooms-per-minute quota, end to end."""

from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed

from actors.metrics import Metrics
from actors.quotas import SWEEP_EVERY, QuotaSettings, UserQuotas
from protocol.client import ServerError
from protocol.codec import encode
from protocol.errors import CloseCode, ErrorCode
from protocol.frames import Error, Hello, Welcome
from tests.helpers import RunningServer, next_frame, run_server


async def refusals(server: RunningServer) -> dict[str, float]:
    async with server.http(admin=False) as http:
        text = (await http.get("/metrics")).text
    return {
        s.labels["quota"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "parley_quota_refusals_total"
    }


async def test_sessions_per_user(tmp_path: Path) -> None:
    async with run_server(tmp_path, max_sessions_per_user=2) as server:
        async with server.client("alice"), server.client("alice"):
            async with server.raw() as ws:
                await ws.send_message(encode(Hello(v=1, token=server.token("alice"))))
                error = await next_frame(ws)
                assert isinstance(error, Error) and error.code == ErrorCode.QUOTA_EXCEEDED
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                reason = closed.value.reason
                assert reason is not None and reason.code == CloseCode.TOO_MANY_SESSIONS
            async with server.client("bob"):  # another user is not concerned
                pass
        with trio.fail_after(5):  # the count follows sessions that end
            while server.node.services.quotas.sessions("alice"):  # noqa: ASYNC110 - closes
                await trio.sleep(0.01)
        async with server.raw() as ws:
            await ws.send_message(encode(Hello(v=1, token=server.token("alice"))))
            assert isinstance(await next_frame(ws), Welcome)
        assert (await refusals(server))["sessions_per_user"] == 1


async def test_rooms_created_per_user(tmp_path: Path) -> None:
    async with run_server(tmp_path, room_creation_burst=2, room_creations_per_hour=1) as server:
        async with server.client("alice") as alice, server.client("bob") as bob:
            await alice.create("one")
            await alice.direct("bob")  # a new direct room is a creation too
            for request in (alice.create("three"), alice.direct("carol")):
                with pytest.raises(ServerError) as refused:
                    await request
                assert refused.value.code is ErrorCode.QUOTA_EXCEEDED
            await alice.direct("bob")  # an existing one is not
            await alice.join("one")
            with pytest.raises(ServerError) as refused:
                await alice.create("one")  # exists: that is the answer, not the quota
            assert refused.value.code is ErrorCode.ROOM_EXISTS
            await bob.create("bobs")  # bob has his own quota
        # Out of creations, a new room's name started no actor: the session refused it.
        assert (await refusals(server))["room_creations"] == 2
        assert len(server.node.services.rooms) == 2  # looked up, found missing, refused


async def test_distinct_rooms_named_per_minute(tmp_path: Path) -> None:
    """Per user, over sessions and reconnects: a client reconnecting with a new resume
    list of made-up rooms each time must not get a new allowance of storage reads."""
    async with run_server(tmp_path, rooms_per_minute=3) as server:
        async with server.client("alice") as alice:
            for room in ("a", "b", "c"):
                await alice.create(room)
            for _ in range(3):
                await alice.send("a", "named again: free")
            with pytest.raises(ServerError) as refused:
                await alice.history("d")
            assert refused.value.code is ErrorCode.QUOTA_EXCEEDED
        resume = {"e": (1, "x"), "f": (1, "x")}
        async with server.client("alice", resume=resume) as again:  # a reconnect
            with pytest.raises(ServerError) as refused:
                await again.history("d")
            assert refused.value.code is ErrorCode.QUOTA_EXCEEDED
            await again.send("b", "named already: free")
        async with server.client("bob") as bob:  # another user is not concerned
            await bob.create("d")
        found = await refusals(server)
        assert found["rooms_per_minute"] == 4  # d, the two resumed, d again
        async with server.http(admin=False) as http:
            text = (await http.get("/metrics")).text
        missing = [
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "parley_room_lookups_total" and s.labels["result"] == "missing"
        ]
        assert missing in ([], [0])  # none of the refused names was looked up in storage


async def test_rooms_named_are_forgotten_after_their_minute(
    autojump_clock: trio.abc.Clock,
) -> None:
    quotas = UserQuotas(QuotaSettings(rooms_per_minute=2), Metrics())
    assert quotas.name_room("alice", "a") and quotas.name_room("alice", "b")
    assert not quotas.name_room("alice", "c")
    assert quotas.name_room("alice", "a")  # named already
    await trio.sleep(60)
    assert quotas.name_room("alice", "c")
    await trio.sleep(60)
    for i in range(SWEEP_EVERY):  # new minutes for others: the ended ones are swept
        quotas.name_room(f"u{i}", "r")
    assert "alice" not in quotas._named


async def test_creation_buckets_are_forgotten_once_full(autojump_clock: trio.abc.Clock) -> None:
    quotas = UserQuotas(
        QuotaSettings(room_creations_per_hour=3600, room_creation_burst=1), Metrics()
    )
    for i in range(SWEEP_EVERY - 1):
        assert quotas.create_room(f"u{i}")
    assert not quotas.create_room("u0")  # its one room this second is made
    await trio.sleep(1.0)  # every bucket is full again
    assert quotas.create_room("last")  # the creation that sweeps
    assert list(quotas._creations) == ["last"]


async def test_blocks_per_user(tmp_path: Path) -> None:
    async with run_server(tmp_path, max_blocks_per_user=2) as server:
        async with server.client("alice") as alice:
            await alice.block("m1")
            await alice.block("m2")
            with pytest.raises(ServerError) as refused:
                await alice.block("m3")
            assert refused.value.code is ErrorCode.QUOTA_EXCEEDED
            await alice.block("m2")  # blocked already: nothing new
            await alice.unblock("m1")
            await alice.block("m3")
            assert await alice.blocks() == ("m2", "m3")
        assert (await refusals(server))["blocks"] == 1
