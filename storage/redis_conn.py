"""A Redis client for Trio on hiredis's parser: the command connection and ``open_redis``.

How this works: ``open_redis`` runs two connections in its own nursery, ``Redis`` for
commands and ``Subscriber`` (``storage.redis_pubsub``) for pub/sub, each a ``Link``
(``storage.redis_link``) that reconnects by itself with capped exponential backoff.

Commands are pipelined without anyone asking: ``call``, ``pipeline`` and ``send`` pack
their commands and queue them synchronously, with one slot per expected reply in
``_inflight``; one writer task sends everything queued with one ``send_all``, so the
commands of a hundred concurrent callers go out in a few batches. Redis answers in order,
so the reader hands each reply to the oldest slot: a waiting caller's, or nothing for a
``send`` (fire-and-forget, for PUBLISH on a hot path). The queue of unsent bytes is
bounded by ``max_pending``.

Nothing waits without a bound. While disconnected every call fails at once with
``RedisUnavailable``. A call that gets no reply within the timeout fails the same way and
breaks the connection, since a late reply would be handed to the wrong caller; the
reconnect fails every other waiting call. A call whose caller is cancelled keeps its slot
(its reply is read and dropped), so a cancelled call may still have run.
"""

import enum
import hashlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from storage.redis_link import (
    Arg,
    Link,
    RedisAddress,
    RedisError,
    RedisUnavailable,
    ReplyError,
    pack,
    parse_url,
)
from storage.redis_pubsub import Subscriber

__all__ = [
    "Redis",
    "RedisError",
    "RedisUnavailable",
    "ReplyError",
    "Script",
    "Subscriber",
    "open_redis",
    "parse_url",
]

log = logging.getLogger(__name__)


@attrs.frozen
class Script:
    """A Lua script for ``Redis.evalsha``; its SHA1 is computed once."""

    text: str
    sha: str = attrs.field(init=False)

    @sha.default
    def _sha(self) -> str:
        return hashlib.sha1(self.text.encode()).hexdigest()


class _Fire(enum.Enum):
    """A slot whose reply nobody waits for."""

    SEND = "send"
    PING = "ping"


class _Waiter:
    """The replies one ``call`` or ``pipeline`` waits for."""

    __slots__ = ("done", "expected", "failure", "replies")

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.replies: list[Any] = []
        self.failure: str | None = None
        self.done = trio.Event()


class Redis(Link):
    """The command connection (see the module docstring)."""

    def __init__(
        self, address: RedisAddress, *, timeout: float, max_pending: int, name: str
    ) -> None:
        super().__init__(address, timeout=timeout, name=name)
        self.max_pending = max_pending
        self.dropped = 0
        self.send_errors = 0
        self._inflight: deque[_Waiter | _Fire] = deque()

    async def call(self, *args: Arg) -> Any:
        """One command's reply; an error reply raises ``ReplyError``."""
        (reply,) = await self._submit([args])
        if isinstance(reply, ReplyError):
            raise ReplyError(reply.message)
        return reply

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """The replies of several commands sent together, in order; an error reply is a
        ``ReplyError`` in the list, not raised."""
        if not commands:
            return []
        return await self._submit(commands)

    def send(self, *args: Arg) -> None:
        """Queue a command whose reply nobody waits for. Never blocks. While disconnected
        the command is dropped (counted in ``dropped``); an error reply is counted in
        ``send_errors`` and logged."""
        if not self._connected:
            self.dropped += 1
            return
        packed = pack(args)
        self._check_room(len(packed))
        self._inflight.append(_Fire.SEND)
        self._enqueue(packed)

    async def evalsha(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """EVALSHA, loading the script first if Redis does not have it (it restarted
        empty, or its scripts were flushed)."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self.call(*command)
        except ReplyError as exc:
            if not exc.message.startswith("NOSCRIPT"):
                raise
        await self.call("SCRIPT", "LOAD", script.text)
        return await self.call(*command)

    def _check_room(self, size: int) -> None:
        if self._out_bytes + size > self.max_pending:
            raise RedisUnavailable(
                f"more than {self.max_pending} bytes queued for Redis: it is not keeping up"
            )

    async def _submit(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        if not self._connected:
            raise RedisUnavailable(self.error)
        packed = b"".join(pack(c) for c in commands)
        self._check_room(len(packed))
        waiter = _Waiter(len(commands))
        self._inflight.extend([waiter] * len(commands))
        self._enqueue(packed, len(commands))
        with trio.move_on_after(self.timeout):
            await waiter.done.wait()
        if waiter.failure is not None:
            raise RedisUnavailable(waiter.failure)
        if not waiter.done.is_set():
            self._break(f"no reply within {self.timeout} s")
            raise RedisUnavailable(f"no reply from Redis within {self.timeout} s")
        return waiter.replies

    # Link hooks.
    def _reply(self, reply: Any) -> None:
        if not self._inflight:
            raise RedisUnavailable(f"a reply nobody asked for: {reply!r:.100}")
        waiter = self._inflight.popleft()
        if isinstance(waiter, _Fire):
            if waiter is _Fire.SEND and isinstance(reply, ReplyError):
                self.send_errors += 1
                # Powers of two only: a hot path failing on every send must not flood the log.
                if self.send_errors & (self.send_errors - 1) == 0:
                    log.warning(
                        "%s: a sent command failed (%d so far): %s",
                        self.name,
                        self.send_errors,
                        reply.message,
                    )
            return
        waiter.replies.append(reply)
        if len(waiter.replies) == waiter.expected:
            waiter.done.set()

    def _owes(self) -> bool:
        return bool(self._inflight)

    def _ping(self) -> None:
        self._inflight.append(_Fire.PING)
        self._enqueue(pack(["PING"]))

    def _lost(self, reason: str) -> None:
        inflight, self._inflight = self._inflight, deque()
        for waiter in inflight:
            if waiter is _Fire.SEND:
                # Sent or not, we cannot tell whether it ran.
                self.dropped += 1
            elif isinstance(waiter, _Waiter) and not waiter.done.is_set():
                waiter.failure = f"lost the connection to Redis: {reason}"
                waiter.done.set()


@asynccontextmanager
async def open_redis(
    url: str,
    *,
    timeout: float = 2.0,  # noqa: ASYNC109 - bounds each wait on Redis, not this call
    max_pending: int = 8 * 2**20,
    name: str = "parley",
) -> AsyncIterator[tuple[Redis, Subscriber]]:
    """The command connection and the pub/sub connection to the Redis at ``url``
    (``parse_url`` says which URLs), kept connected until the block ends.

    Waits for the first connection attempt of each, at most ``timeout``; if Redis is not
    there, opens all the same, disconnected, and keeps trying in the background. The
    connections are named ``name`` and ``name-sub`` (CLIENT LIST)."""
    address = parse_url(url)
    redis = Redis(address, timeout=timeout, max_pending=max_pending, name=name)
    subscriber = Subscriber(address, timeout=timeout, name=f"{name}-sub")
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as starting:
            starting.start_soon(nursery.start, redis.run)
            starting.start_soon(nursery.start, subscriber.run)
        try:
            yield redis, subscriber
        finally:
            nursery.cancel_scope.cancel()
