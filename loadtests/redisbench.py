"""The Redis client benchmark: ``storage.redis_conn`` against redis-py's asyncio client.

Run by hand from the project folder (redis-py is the ``bench`` extra, not a dependency:
``.venv/bin/pip install -c constraints.txt -e '.[bench]'``)::

    taskset -c 1 .venv/bin/python -m loadtests.redisbench --server-cpu 0 [--rounds 3]

It starts its own private redis-server (tests/redis_server.py) and measures, for each
client, the median of ``--rounds`` rounds of: a PUBLISH round trip awaited one after the
other (µs), 1000 SETs in one pipeline (µs per command), an EVALSHA round trip (µs), and
subscriber throughput: messages per second delivered to a callback from a backlog of
200-byte payloads that ``redis-cli --pipe`` published as fast as Redis took them (the
subscriber stalls on the first message until the publisher is done, so the figure is
the subscriber's speed, not the publisher's).

redis-py runs twice: inside Trio through trio-asyncio (each await crosses from Trio to
asyncio, as Parley would use it), and in plain asyncio, to tell the bridge's cost from
the client's. redis-py uses hiredis's parser too when it is installed, as here.
"""

import argparse
import asyncio
import os
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
import trio_asyncio  # type: ignore[import-untyped]

from storage.redis_conn import Script, open_redis
from storage.redis_link import Arg
from tests.redis_server import PrivateRedis, private_redis

SEQUENTIAL = 2000
PIPELINE = 1000
PAYLOAD = b"p" * 200
BACKLOG = 200_000
LUA = "return redis.call('INCRBY', KEYS[1], ARGV[1])"

Result = dict[str, float]


def backlog_file(server: PrivateRedis, channel: str) -> bytes:
    """A protocol stream of BACKLOG PUBLISH commands, ended by a marker message."""
    import hiredis

    one = hiredis.pack_command(("PUBLISH", channel, PAYLOAD))  # type: ignore[arg-type]
    last = hiredis.pack_command(("PUBLISH", channel, b"end"))  # type: ignore[arg-type]
    data: bytes = one * (BACKLOG - 1) + last
    return data


def publish_backlog(server: PrivateRedis, data: bytes) -> subprocess.Popen[bytes]:
    cli = subprocess.Popen(
        ["redis-cli", "-p", str(server.port), "--pipe"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    assert cli.stdin is not None
    cli.stdin.write(data)
    cli.stdin.close()
    return cli


async def per_op(n: int, op: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await op()
    return (time.perf_counter() - start) / n * 1e6


async def ours(server: PrivateRedis, backlog: bytes) -> Result:
    script = Script(LUA)
    async with open_redis(server.url, timeout=10) as (redis, subscriber):
        result: Result = {}
        result["publish_us"] = await per_op(SEQUENTIAL, lambda: redis.call("PUBLISH", "b", PAYLOAD))
        commands: list[list[Arg]] = [["SET", f"k{i}", PAYLOAD] for i in range(PIPELINE)]
        start = time.perf_counter()
        await redis.pipeline(commands)
        result["pipeline_us"] = (time.perf_counter() - start) / PIPELINE * 1e6
        result["evalsha_us"] = await per_op(SEQUENTIAL, lambda: redis.evalsha(script, ["n"], [1]))

        count = 0
        first = last = 0.0
        done = trio.Event()
        cli: subprocess.Popen[bytes]

        def deliver(payload: bytes) -> None:
            nonlocal count, first, last
            count += 1
            if count == 1:
                # Stall until the whole backlog is published, so that what follows is
                # the subscriber's speed, not the publisher's.
                cli.wait()
                first = time.perf_counter()
            if payload == b"end":
                last = time.perf_counter()
                done.set()

        subscriber.subscribe(b"backlog", deliver)
        await subscriber.subscribed(b"backlog")
        cli = publish_backlog(server, backlog)
        with trio.fail_after(120):
            await done.wait()
        assert subscriber.reconnects == 0 and count == BACKLOG, (count, subscriber.reconnects)
        result["subscriber_msgs"] = (count - 1) / (last - first)
        return result


async def redis_py(server: PrivateRedis, backlog: bytes, bridge: Callable[[Any], Any]) -> Result:
    """The same figures for redis-py; ``bridge`` turns an asyncio coroutine function into
    one this loop can await (trio-asyncio's ``aio_as_trio``, or nothing)."""
    import redis.asyncio  # type: ignore[import-not-found,unused-ignore]  # the bench extra

    client = redis.asyncio.Redis(port=server.port)
    result: Result = {}
    result["publish_us"] = await per_op(SEQUENTIAL, lambda: bridge(client.publish)("b", PAYLOAD))

    async def pipelined() -> None:
        async with client.pipeline(transaction=False) as pipe:
            for i in range(PIPELINE):
                pipe.set(f"k{i}", PAYLOAD)
            await pipe.execute()

    start = time.perf_counter()
    await bridge(pipelined)()
    result["pipeline_us"] = (time.perf_counter() - start) / PIPELINE * 1e6
    sha = await bridge(client.script_load)(LUA)
    result["evalsha_us"] = await per_op(SEQUENTIAL, lambda: bridge(client.evalsha)(sha, 1, "n", 1))

    async def subscribe_and_count() -> float:
        pubsub = client.pubsub()
        await pubsub.subscribe("backlog")
        await pubsub.get_message(timeout=5)  # the confirmation
        cli = publish_backlog(server, backlog)
        count = 0
        first = 0.0
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            count += 1
            if count == 1:
                cli.wait()  # as above
                first = time.perf_counter()
            if message["data"] == b"end":
                last = time.perf_counter()
                break
        await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
        assert count == BACKLOG, count
        return (count - 1) / (last - first)

    result["subscriber_msgs"] = await bridge(subscribe_and_count)()
    await bridge(client.aclose)()
    return result


async def in_trio_asyncio(server: PrivateRedis, backlog: bytes) -> Result:
    async with trio_asyncio.open_loop():
        return await redis_py(server, backlog, trio_asyncio.aio_as_trio)


def run(rounds: int, server_cpu: int | None) -> dict[str, list[Result]]:
    results: dict[str, list[Result]] = {
        "parley (Trio)": [],
        "redis-py in trio-asyncio": [],
        "redis-py in asyncio": [],
    }
    with private_redis() as server:
        # Throughput, not Redis's protection: a 46 MB backlog would pass the default
        # 32 MB pub/sub output limit, and Redis would cut the subscriber off.
        server.command("CONFIG", "SET", "client-output-buffer-limit", "pubsub 0 0 0")
        if server_cpu is not None:
            assert server.process is not None
            os.sched_setaffinity(server.process.pid, {server_cpu})
        backlog = backlog_file(server, "backlog")
        for _ in range(rounds):
            results["parley (Trio)"].append(trio.run(ours, server, backlog))
            results["redis-py in trio-asyncio"].append(trio.run(in_trio_asyncio, server, backlog))
            results["redis-py in asyncio"].append(
                asyncio.run(redis_py(server, backlog, lambda fn: fn))
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is shown")
    parser.add_argument(
        "--server-cpu", type=int, metavar="CORE", help="pin the redis-server to this CPU core"
    )
    args = parser.parse_args()
    results = run(args.rounds, args.server_cpu)
    print(
        f"{'client':<26} {'PUBLISH µs':>11} {'pipelined µs/op':>16} {'EVALSHA µs':>11}"
        f" {'subscriber msg/s':>17}"
    )
    for name, rows in results.items():

        def median(key: str, rows: list[Result] = rows) -> float:
            return statistics.median(r[key] for r in rows)

        print(
            f"{name:<26} {median('publish_us'):>11.1f} {median('pipeline_us'):>16.2f}"
            f" {median('evalsha_us'):>11.1f} {median('subscriber_msgs'):>17,.0f}"
        )


if __name__ == "__main__":
    main()
