"""The Redis client against a real, private redis-server (tests/redis_server.py).

Fault tests (restart, SIGSTOP, output-buffer disconnects) take a server of their own
(``own_redis``); the others share one, flushed before each test (``redis_url``). Short
timeouts make failures quick; no test asserts how long anything took.
"""

import socket
import threading
import tracemalloc

import hiredis
import pytest
import trio
import trio.testing

from storage import redis_link
from storage.redis_conn import (
    RedisError,
    RedisUnavailable,
    ReplyError,
    Script,
    open_redis,
    parse_url,
)
from storage.redis_link import RedisAddress
from tests.helpers import PATIENCE, until
from tests.redis_server import PrivateRedis


def test_url_forms() -> None:
    assert parse_url("redis://localhost") == RedisAddress(host="localhost")
    assert parse_url("redis://:s%40cret@10.0.0.1:6380/3") == RedisAddress(
        host="10.0.0.1", port=6380, password="s@cret", db=3
    )
    assert parse_url("redis://alice:pw@[::1]/0") == RedisAddress(
        host="::1", username="alice", password="pw"
    )
    assert parse_url("unix:///run/redis.sock?db=2") == RedisAddress(path="/run/redis.sock", db=2)
    assert parse_url("unix://:pw@/run/redis.sock") == RedisAddress(
        path="/run/redis.sock", password="pw"
    )


@pytest.mark.parametrize(
    "url",
    [
        "rediss://localhost",
        "http://localhost",
        "localhost:6379",
        "redis://localhost/zero",
        "redis://localhost/0?timeout=1",
        "redis://alice@localhost",
        "redis:///0",
        "redis://localhost:99999",
        "unix://host/run/redis.sock",
        "unix:///run/redis.sock?timeout=1",
        "redis://localhost/0#db",
    ],
)
def test_url_refused(url: str) -> None:
    with pytest.raises(ValueError):
        parse_url(url)


@pytest.mark.parametrize("name", ["", "two words"])
async def test_a_client_name_redis_would_refuse_is_refused_here(name: str) -> None:
    with pytest.raises(ValueError, match="client name"):
        async with open_redis("redis://127.0.0.1:1", name=name):
            pass


async def test_call_round_trip(redis_url: str) -> None:
    async with open_redis(redis_url, timeout=5) as (redis, _):
        assert redis.connected and redis.error is None
        assert await redis.call("SET", b"k\x00", 1.5) == b"OK"
        assert await redis.call("GET", "k\x00") == b"1.5"
        assert await redis.call("INCRBY", "n", 3) == 3
        assert await redis.call("GET", "missing") is None
        with pytest.raises(ReplyError) as caught:
            await redis.call("INCR", "k\x00")
        assert caught.value.message.startswith("ERR")
        # The name and database were set on connect.
        info = await redis.call("CLIENT", "INFO")
        assert b" name=parley " in info and b" db=1 " in info


async def test_pipeline_returns_error_replies(redis_url: str) -> None:
    async with open_redis(redis_url, timeout=5) as (redis, _):
        replies = await redis.pipeline([["SET", "a", "x"], ["INCR", "a"], ["GET", "a"]])
        assert replies[0] == b"OK" and replies[2] == b"x"
        assert isinstance(replies[1], ReplyError)
        assert await redis.pipeline([]) == []


async def test_concurrent_calls_are_batched_and_matched(redis_url: str) -> None:
    async with open_redis(redis_url, timeout=5) as (redis, _):
        batches, commands = redis.batches, redis.commands
        answers: dict[int, object] = {}

        async def one(i: int) -> None:
            answers[i] = await redis.call("ECHO", f"task {i}")

        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(one, i)
        assert answers == {i: f"task {i}".encode() for i in range(100)}
        assert redis.commands - commands == 100
        assert redis.batches - batches < 100


async def test_send_is_fire_and_forget(redis_url: str) -> None:
    async with open_redis(redis_url, timeout=5) as (redis, _):
        for i in range(1000):
            redis.send("RPUSH", "list", i)
        redis.send("INCR", "list")  # an error reply: counted, not raised
        # Replies come in order: once this one is back, every send before it ran.
        assert await redis.call("LLEN", "list") == 1000
        assert await redis.call("LINDEX", "list", -1) == b"999"
        assert redis.send_errors == 1
        assert redis.dropped == 0
        assert redis.connected


async def test_send_is_bounded(redis_url: str) -> None:
    async with open_redis(redis_url, timeout=5, max_pending=1000) as (redis, _):
        with pytest.raises(RedisUnavailable):
            for _ in range(100):
                redis.send("PUBLISH", "bounded", b"x" * 100)
        # What was queued is still sent, and the connection goes on.
        assert await redis.call("PING") == b"PONG"


async def test_evalsha_loads_the_script_again_after_a_flush(
    redis_url: str, redis_server: PrivateRedis
) -> None:
    script = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    async with open_redis(redis_url, timeout=5) as (redis, _):
        assert await redis.evalsha(script, ["counter"], [2]) == 2
        assert await redis.call("SCRIPT", "EXISTS", script.sha) == [1]
        redis_server.command("SCRIPT", "FLUSH")
        assert await redis.call("SCRIPT", "EXISTS", script.sha) == [0]
        assert await redis.evalsha(script, ["counter"], [3]) == 5
        failing = Script("return redis.error_reply('boom')")
        with pytest.raises(ReplyError, match="boom"):
            await redis.evalsha(failing, [], [])


async def test_unreachable_at_open_then_connects(own_redis: PrivateRedis) -> None:
    own_redis.stop()
    async with open_redis(own_redis.url, timeout=0.5) as (redis, subscriber):
        assert not redis.connected and not subscriber.connected
        assert redis.error is not None and subscriber.error is not None
        with pytest.raises(RedisUnavailable):
            await redis.call("PING")
        redis.send("PUBLISH", "x", "y")
        assert redis.dropped == 1
        resynced = trio.Event()
        subscriber.on_reconnect = resynced.set
        got: list[bytes] = []
        subscriber.subscribe(b"early", got.append)
        own_redis.start()
        await until(lambda: redis.connected)
        with trio.fail_after(PATIENCE):
            await resynced.wait()
        assert await redis.call("PUBLISH", "early", "hello") == 1
        await until(lambda: got == [b"hello"])


async def test_a_paused_server_fails_calls_then_recovers(own_redis: PrivateRedis) -> None:
    async with open_redis(own_redis.url, timeout=0.2) as (redis, _):
        assert await redis.call("SET", "k", "v") == b"OK"
        own_redis.pause()
        try:
            with pytest.raises(RedisUnavailable):
                await redis.call("GET", "k")
            # Reconnecting to a stopped server fails too: the handshake times out.
            await until(lambda: not redis.connected)
            with pytest.raises(RedisUnavailable):
                await redis.call("GET", "k")
        finally:
            own_redis.resume()
        await until(lambda: redis.connected)
        assert await redis.call("GET", "k") == b"v"
        assert redis.reconnects >= 1


async def test_a_silent_idle_connection_is_found_dead(
    own_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_link, "KEEPALIVE", 0.05)
    async with open_redis(own_redis.url, timeout=0.2) as (redis, subscriber):
        own_redis.pause()
        try:
            # Nobody calls: the keepalive PING finds out.
            await until(lambda: not redis.connected and not subscriber.connected)
        finally:
            own_redis.resume()
        await until(lambda: redis.connected and subscriber.connected)


async def test_messages_are_delivered_in_order(redis_url: str) -> None:
    async with open_redis(redis_url, timeout=5) as (redis, subscriber):
        got: list[bytes] = []
        subscriber.subscribe(b"ordered", got.append)
        await subscriber.subscribed(b"ordered")
        for i in range(2000):
            redis.send("PUBLISH", "ordered", str(i))
        await until(lambda: len(got) == 2000)
        assert got == [str(i).encode() for i in range(2000)]
        assert subscriber.messages == 2000


async def test_unsubscribe_tells_redis(redis_url: str) -> None:
    async with open_redis(redis_url, timeout=5) as (redis, subscriber):
        subscriber.subscribe(b"quiet", lambda payload: None)
        await subscriber.subscribed(b"quiet")
        assert await redis.call("PUBSUB", "NUMSUB", "quiet") == [b"quiet", 1]
        subscriber.unsubscribe(b"quiet")
        # Redis handles one connection's commands in order: once this is confirmed,
        # the UNSUBSCRIBE sent before it was handled.
        subscriber.subscribe(b"marker", lambda payload: None)
        await subscriber.subscribed(b"marker")
        assert await redis.call("PUBSUB", "NUMSUB", "quiet") == [b"quiet", 0]
        assert await redis.call("PUBSUB", "CHANNELS") == [b"marker"]
        assert await redis.call("PUBLISH", "quiet", "x") == 0


async def test_one_deliver_per_channel(redis_url: str) -> None:
    async with open_redis(redis_url, timeout=5) as (redis, subscriber):
        first: list[bytes] = []
        second: list[bytes] = []
        subscriber.subscribe(b"one", first.append)
        with pytest.raises(ValueError):
            subscriber.subscribe(b"one", second.append)
        # Unsubscribe and subscribe again at once: only the new deliver gets messages,
        # and subscribed() waits for the second SUBSCRIBE.
        subscriber.unsubscribe(b"one")
        subscriber.subscribe(b"one", second.append)
        await subscriber.subscribed(b"one")
        assert await redis.call("PUBLISH", "one", "m") == 1
        await until(lambda: second == [b"m"])
        assert first == []


async def test_a_failing_deliver_does_not_stop_the_others(redis_url: str) -> None:
    async with open_redis(redis_url, timeout=5) as (redis, subscriber):
        got: list[bytes] = []

        def broken(payload: bytes) -> None:
            raise RuntimeError("a bug in a subscriber")

        subscriber.subscribe(b"broken", broken)
        subscriber.subscribe(b"fine", got.append)
        await subscriber.subscribed(b"broken")
        await subscriber.subscribed(b"fine")
        await redis.pipeline([["PUBLISH", "broken", "a"], ["PUBLISH", "fine", "b"]])
        await until(lambda: got == [b"b"])
        assert subscriber.connected and subscriber.reconnects == 0


async def test_subscriptions_survive_a_restart(own_redis: PrivateRedis) -> None:
    async with open_redis(own_redis.url, timeout=0.5) as (redis, subscriber):
        resyncs: list[frozenset[bytes]] = []
        subscriber.on_reconnect = lambda: resyncs.append(frozenset(subscriber._confirmed))
        got: list[bytes] = []
        subscriber.subscribe(b"room:1", got.append)
        subscriber.subscribe(b"room:2", got.append)
        await subscriber.subscribed(b"room:1")
        await subscriber.subscribed(b"room:2")
        own_redis.restart()
        await until(lambda: resyncs != [])
        # on_reconnect came once every channel was confirmed again.
        assert resyncs == [frozenset({b"room:1", b"room:2"})]
        await until(lambda: redis.connected)
        assert await redis.call("PUBLISH", "room:2", "after") == 1
        await until(lambda: got == [b"after"])
        assert subscriber.reconnects == 1


async def test_subscribed_fails_when_redis_hangs(own_redis: PrivateRedis) -> None:
    async with open_redis(own_redis.url, timeout=0.2) as (_, subscriber):
        own_redis.pause()
        try:
            subscriber.subscribe(b"never", lambda payload: None)
            with pytest.raises(RedisUnavailable):
                await subscriber.subscribed(b"never")
        finally:
            own_redis.resume()
        await subscriber_confirmed(subscriber, b"never")


async def subscriber_confirmed(subscriber: object, channel: bytes) -> None:
    """Wait until ``channel`` is confirmed, across reconnects."""
    from storage.redis_pubsub import Subscriber

    assert isinstance(subscriber, Subscriber)
    with trio.fail_after(PATIENCE):
        while True:
            try:
                await subscriber.subscribed(channel)
                return
            except RedisUnavailable:
                await trio.sleep(0.05)


def publish_burst(port: int, channel: bytes, count: int, size: int, done: threading.Event) -> None:
    """PUBLISH ``count`` messages from a plain blocking socket in a thread, as fast as
    Redis takes them (so while the test's loop is stalled), then set ``done``."""
    try:
        command = hiredis.pack_command((b"PUBLISH", channel, b"x" * size))  # type: ignore[arg-type]
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            reader = hiredis.Reader()
            replies = 0
            for start in range(0, count, 1000):
                n = min(1000, count - start)
                s.sendall(command * n)
                while replies < start + n:
                    data = s.recv(65536)
                    assert data
                    reader.feed(data)
                    while reader.gets() is not False:
                        replies += 1
    finally:
        done.set()


async def test_a_subscriber_cut_off_by_redis_reconnects(own_redis: PrivateRedis) -> None:
    # Redis cuts a subscriber whose unsent output passes 256 KiB.
    own_redis.command("CONFIG", "SET", "client-output-buffer-limit", "pubsub 262144 0 0")
    async with open_redis(own_redis.url, timeout=5) as (redis, subscriber):
        resynced = trio.Event()
        subscriber.on_reconnect = resynced.set
        published = threading.Event()
        got: list[bytes] = []

        def slow(payload: bytes) -> None:
            if not got:
                # Stall the whole loop, as a node too busy to read would, until a
                # 20 MB backlog has been published.
                published.wait(timeout=60)
            got.append(payload)

        subscriber.subscribe(b"busy", slow)
        await subscriber.subscribed(b"busy")
        # The thread goes on publishing while its first message stalls this loop.
        await trio.to_thread.run_sync(
            publish_burst, own_redis.port, b"busy", 20_000, 1000, published
        )
        with trio.fail_after(PATIENCE):
            await resynced.wait()
        assert subscriber.reconnects == 1
        assert 0 < len(got) < 20_000  # part of the backlog was lost with the connection
        got.clear()
        assert await redis.call("PUBLISH", "busy", "after") == 1
        await until(lambda: got == [b"after"])


async def test_a_backlog_is_not_buffered_on_our_side(own_redis: PrivateRedis) -> None:
    own_redis.command("CONFIG", "SET", "client-output-buffer-limit", "pubsub 0 0 0")
    async with open_redis(own_redis.url, timeout=10) as (_, subscriber):
        count = 40_000
        sizes = 0
        release = threading.Event()

        def take(payload: bytes) -> None:
            nonlocal sizes
            if sizes == 0:
                release.wait(timeout=60)
            sizes += len(payload)

        subscriber.subscribe(b"backlog", take)
        await subscriber.subscribed(b"backlog")
        # ~10 MB will wait in Redis and the kernel while the loop is stalled; then it
        # drains, and our allocations are traced all along.
        tracemalloc.start()
        try:
            await trio.to_thread.run_sync(
                publish_burst, own_redis.port, b"backlog", count, 250, release
            )
            await until(lambda: sizes == count * 250)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 2 * 2**20, f"peak {peak} bytes while draining 10 MB"


async def test_a_password_and_a_user_are_sent_and_a_wrong_password_is_refused(
    own_redis: PrivateRedis,
) -> None:
    assert (
        own_redis.command("ACL", "SETUSER", "alice", "on", ">alices", "~*", "&*", "+@all") == b"OK"
    )
    assert own_redis.command("CONFIG", "SET", "requirepass", "s3cret") == b"OK"  # the last
    address = own_redis.url.removeprefix("redis://")
    for url in (f"redis://:s3cret@{address}", f"redis://alice:alices@{address}"):
        async with open_redis(url, timeout=2) as (redis, subscriber):
            assert redis.connected and subscriber.connected, redis.error
            assert await redis.call("PING") == b"PONG"
    async with open_redis(f"redis://:wrong@{address}", timeout=2) as (redis, _):
        assert not redis.connected
        assert "WRONGPASS" in str(redis.error)
        with pytest.raises(RedisUnavailable):
            await redis.call("PING")


async def test_an_idle_healthy_connection_is_pinged_and_stays(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keepalive PING of a quiet connection is answered (on the pub/sub connection
    too, where the answer has its own shape) and nothing is torn down."""
    monkeypatch.setattr(redis_link, "KEEPALIVE", 0.05)
    async with open_redis(redis_url, timeout=2) as (redis, subscriber):
        got: list[bytes] = []
        subscriber.subscribe(b"idle", got.append)
        await subscriber.subscribed(b"idle")
        reconnects = subscriber.reconnects + redis.reconnects

        async def sub_pinged() -> bool:
            clients = (await redis.call("CLIENT", "LIST")).decode().splitlines()
            sub = next(c for c in clients if " name=parley-sub " in c)
            return " cmd=ping " in sub

        with trio.fail_after(PATIENCE):
            while not await sub_pinged():  # noqa: ASYNC110 - what Redis says of a connection
                await trio.sleep(0.05)
        assert subscriber.connected and redis.connected
        assert subscriber.reconnects + redis.reconnects == reconnects
        await redis.call("PUBLISH", "idle", "still heard")
        await until(lambda: got == [b"still heard"])


async def test_a_command_sent_as_the_keepalive_comes_due_gets_its_own_time(
    redis_url: str,
) -> None:
    """The reader's keepalive deadline passes in the very instant a command is queued
    (forced here; in a server it is the 10 s keepalive meeting a command by chance).
    The command gets the whole timeout for its reply: nothing is torn down. Trio runs
    the reader and the writer in either order, so the test tries it many times."""
    async with open_redis(redis_url, timeout=2) as (redis, _):
        for _ in range(30):
            await trio.testing.wait_all_tasks_blocked()  # the reader waits, idle
            scope = redis._read_scope
            assert scope is not None and redis._reply_due is None
            scope.deadline = trio.current_time()
            redis.send("PING")
            assert await redis.call("ECHO", "still here") == b"still here"
        assert redis.connected and redis.reconnects == 0, redis.error


async def test_subscribed_answers_only_for_a_channel_followed(own_redis: PrivateRedis) -> None:
    async with open_redis(own_redis.url, timeout=5) as (_, subscriber):
        with pytest.raises(RedisError, match="not subscribed"):
            await subscriber.subscribed(b"never")
        subscriber.unsubscribe(b"never")  # nothing to do
        subscriber.subscribe(b"gone", lambda payload: None)
        own_redis.pause()  # the confirmation cannot come
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(subscriber.subscribed, b"gone")  # never returns: raises
                await trio.testing.wait_all_tasks_blocked()
                assert subscriber.channels == {b"gone"}
                subscriber.unsubscribe(b"gone")
        except* RedisError as group:
            assert "unsubscribed from b'gone' while waiting" in str(group.exceptions[0])
        else:
            raise AssertionError("subscribed() returned for a channel unsubscribed")
        finally:
            own_redis.resume()
        assert subscriber.channels == frozenset()
