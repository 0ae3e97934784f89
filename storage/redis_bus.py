"""The bus of a cluster: ``storage.bus.Bus`` over Redis pub/sub.

How this works: a publish calls this node's own subscribers at once, as the in-process
bus does, and publishes once to Redis for the other nodes, marked with this node's id;
each node drops its own echo. A node subscribes to a channel in Redis only while it has
a subscriber of its own there (route, don't broadcast): a node with no follower of a
user hears nothing of that user's presence. Payloads are the framed bytes of a user's
events, or ``PresenceNote`` records, which travel as their fields.
"""

import logging
from collections.abc import Callable

import cbor2

from actors.presence import PresenceNote
from storage.bus import Deliver
from storage.redis_conn import Redis, Subscriber

log = logging.getLogger(__name__)


def bus_channel(channel: str) -> bytes:
    return f"parley:{{{channel}}}:bus".encode()


class RedisBus:
    def __init__(self, redis: Redis, subscriber: Subscriber, node: str) -> None:
        self._redis = redis
        self._subscriber = subscriber
        self._node = node
        self._subscribers: dict[str, list[Deliver]] = {}
        self.unreadable = 0

    def publish(self, channel: str, payload: object) -> None:
        for deliver in self._subscribers.get(channel, ()):
            deliver(payload)
        if type(payload) is PresenceNote:
            only = None if payload.only is None else sorted(payload.only)
            fields = [payload.user, payload.frame, sorted(payload.hidden), only]
            body = cbor2.dumps([self._node, fields])
        else:
            assert isinstance(payload, bytes), payload
            body = cbor2.dumps([self._node, payload])
        self._redis.send("PUBLISH", bus_channel(channel), body)

    def subscribe(self, channel: str, deliver: Deliver) -> Callable[[], None]:
        subscribers = self._subscribers.get(channel)
        if subscribers is None:
            subscribers = self._subscribers[channel] = []
            self._subscriber.subscribe(bus_channel(channel), self._receiver(channel))
        subscribers.append(deliver)

        def unsubscribe() -> None:
            found = self._subscribers.get(channel)
            if found and deliver in found:
                found.remove(deliver)
                if not found:
                    del self._subscribers[channel]
                    self._subscriber.unsubscribe(bus_channel(channel))

        return unsubscribe

    def _receiver(self, channel: str) -> Callable[[bytes], None]:
        def receive(body: bytes) -> None:
            try:
                origin, payload = cbor2.loads(body)
                if origin == self._node:
                    return  # delivered here when published
                if type(payload) is list:
                    user, frame, hidden, only = payload
                    payload = PresenceNote(
                        user, frame, frozenset(hidden), None if only is None else frozenset(only)
                    )
            except (ValueError, TypeError, cbor2.CBORDecodeError) as exc:
                self.unreadable += 1
                log.error("bus: unreadable message on %s dropped: %s", channel, exc)
                return
            for deliver in list(self._subscribers.get(channel, ())):
                deliver(payload)

        return receive
