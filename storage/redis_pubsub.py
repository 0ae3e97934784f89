"""The pub/sub connection to Redis (RESP2 SUBSCRIBE mode), with subscriptions that
survive reconnects.

How this works: ``_channels`` is what the caller wants to follow, one ``deliver``
callback per channel; it outlives connections. ``subscribe`` and ``unsubscribe`` change
it synchronously and queue SUBSCRIBE or UNSUBSCRIBE, which the writer sends in batches.
On every new connection every channel is subscribed again in one command, and once Redis
has confirmed them all, ``on_reconnect`` is called: what was published while the
connection was down is lost at the pub/sub level, so the caller resyncs what it follows.

The reader calls ``deliver(payload)`` synchronously for each message, in the order Redis
sent them, and parses no further than one receive ahead, so a burst costs us one receive
buffer, never a queue. A subscriber that falls too far behind is disconnected by Redis
(``client-output-buffer-limit pubsub``), which is handled like any other lost connection.

A channel is confirmed (``subscribed`` returns) once Redis answered the last SUBSCRIBE
sent for it, so that a caller who subscribes, awaits ``subscribed`` and then reads a
snapshot misses nothing in between, even after a quick unsubscribe and subscribe.
"""

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import trio

from storage.redis_link import Link, RedisAddress, RedisError, RedisUnavailable, pack

log = logging.getLogger(__name__)

Deliver = Callable[[bytes], None]

#: Channels per SUBSCRIBE when subscribing everything again after a reconnect.
RESUBSCRIBE_CHUNK = 1000


class Subscriber(Link):
    """The pub/sub connection (see the module docstring)."""

    def __init__(self, address: RedisAddress, *, timeout: float, name: str) -> None:
        super().__init__(address, timeout=timeout, name=name)
        self.on_reconnect: Callable[[], None] | None = None
        self.messages = 0
        self._channels: dict[bytes, Deliver] = {}
        self._confirmed: set[bytes] = set()
        # SUBSCRIBEs sent on this connection and not yet answered, per channel.
        self._unanswered: Counter[bytes] = Counter()
        self._owed = 0
        self._waiting: dict[bytes, trio.Event] = {}
        self._resyncing = False

    def subscribe(self, channel: bytes, deliver: Deliver) -> None:
        """Follow ``channel``: ``deliver(payload)`` is called for each message, from the
        reader task; it must not block. One ``deliver`` per channel: subscribing a
        channel again raises ``ValueError`` (unsubscribe it first)."""
        if channel in self._channels:
            raise ValueError(f"already subscribed to {channel!r}")
        self._channels[channel] = deliver
        if self._connected:
            self._subscribe([channel])

    def unsubscribe(self, channel: bytes) -> None:
        """Stop following ``channel`` (nothing if not followed)."""
        if self._channels.pop(channel, None) is None:
            return
        self._confirmed.discard(channel)
        self._wake_waiting(channel)
        if self._connected:
            self._owed += 1
            self._enqueue(pack([b"UNSUBSCRIBE", channel]))

    async def subscribed(self, channel: bytes) -> None:
        """Return once Redis confirmed the subscription to ``channel``; raises
        ``RedisUnavailable`` if that does not happen within the timeout."""
        if channel not in self._channels:
            raise RedisError(f"not subscribed to {channel!r}")
        with trio.move_on_after(self.timeout):
            while channel not in self._confirmed:
                if not self._connected:
                    raise RedisUnavailable(self.error)
                if channel not in self._channels:
                    raise RedisError(f"unsubscribed from {channel!r} while waiting")
                event = self._waiting.setdefault(channel, trio.Event())
                await event.wait()
            return
        self._break(f"SUBSCRIBE not confirmed within {self.timeout} s")
        raise RedisUnavailable(f"Redis did not confirm the subscription within {self.timeout} s")

    @property
    def resynced(self) -> bool:
        """Connected, every subscription confirmed again, and ``on_reconnect`` run: what
        is published from now on is heard, and what was missed has been dealt with."""
        return self.connected and not self._resyncing

    @property
    def channels(self) -> frozenset[bytes]:
        return frozenset(self._channels)

    def _subscribe(self, channels: list[bytes]) -> None:
        self._unanswered.update(channels)
        self._owed += len(channels)
        self._enqueue(pack([b"SUBSCRIBE", *channels]))

    def _wake_waiting(self, channel: bytes) -> None:
        event = self._waiting.pop(channel, None)
        if event is not None:
            event.set()

    # Link hooks.
    def _ready(self) -> None:
        channels = list(self._channels)
        for i in range(0, len(channels), RESUBSCRIBE_CHUNK):
            self._subscribe(channels[i : i + RESUBSCRIBE_CHUNK])
        self._resyncing = True
        self._maybe_resynced()

    def _reply(self, reply: Any) -> None:
        if isinstance(reply, list) and len(reply) == 3:
            kind, channel, payload = reply
            if kind == b"message":
                deliver = self._channels.get(channel)
                if deliver is None:
                    return  # unsubscribed; Redis has not seen our UNSUBSCRIBE yet
                self.messages += 1
                try:
                    deliver(payload)
                except Exception:
                    # A subscriber's bug must not cut every channel of the node.
                    log.exception("%s: delivering a message of %r failed", self.name, channel)
                return
            if kind == b"subscribe":
                self._owed -= 1
                self._unanswered[channel] -= 1
                if self._unanswered[channel] <= 0:
                    del self._unanswered[channel]
                    if channel in self._channels:
                        self._confirmed.add(channel)
                        self._wake_waiting(channel)
                        self._maybe_resynced()
                return
            if kind == b"unsubscribe":
                self._owed -= 1
                return
        if reply == b"PONG" or (isinstance(reply, list) and reply[:1] == [b"pong"]):
            self._owed -= 1
            return
        # An error reply or anything else means our idea of the connection is wrong.
        raise RedisUnavailable(f"unexpected reply on the pub/sub connection: {reply!r:.100}")

    def _maybe_resynced(self) -> None:
        if not self._resyncing or self._unanswered:
            return
        self._resyncing = False
        if self.on_reconnect is not None:
            try:
                self.on_reconnect()
            except Exception:
                log.exception("%s: on_reconnect failed", self.name)

    def _owes(self) -> bool:
        return self._owed > 0

    def _ping(self) -> None:
        self._owed += 1
        self._enqueue(pack([b"PING"]))

    def _lost(self, reason: str) -> None:
        self._confirmed.clear()
        self._unanswered.clear()
        self._owed = 0
        self._resyncing = False
        for channel in list(self._waiting):
            self._wake_waiting(channel)
