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
import trio

from actors.cluster_presence import ClusterPresence
from actors.presence import PresenceNote
from protocol.frames import Status
from storage.bus import Deliver
from storage.redis_conn import Redis, Subscriber

log = logging.getLogger(__name__)


def bus_channel(channel: str) -> bytes:
    return f"parley:{{{channel}}}:bus".encode()


PRESENCE = "presence:"


class RedisBus:
    """``presence`` (if given) mirrors the presence of users followed here."""

    def __init__(
        self,
        redis: Redis,
        subscriber: Subscriber,
        node: str,
        presence: ClusterPresence | None = None,
        nursery: trio.Nursery | None = None,
    ) -> None:
        self._redis = redis
        self._subscriber = subscriber
        self._node = node
        self._subscribers: dict[str, list[Deliver]] = {}
        self._presence = presence
        self._nursery = nursery
        self.unreadable = 0
        if presence is not None:
            presence.announce = self._announce

    def _announce(self, note: PresenceNote) -> None:
        for deliver in list(self._subscribers.get(PRESENCE + note.user, ())):
            deliver(note)

    def publish(self, channel: str, payload: object) -> None:
        for deliver in self._subscribers.get(channel, ()):
            deliver(payload)
        if type(payload) is PresenceNote:
            only = None if payload.only is None else sorted(payload.only)
            fields = [
                payload.user,
                payload.frame,
                sorted(payload.hidden),
                only,
                int(payload.status),
                payload.ts,
            ]
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
            if self._presence is not None and self._nursery and channel.startswith(PRESENCE):
                self._presence.followed(channel[len(PRESENCE) :], self._nursery)
        subscribers.append(deliver)

        def unsubscribe() -> None:
            found = self._subscribers.get(channel)
            if found and deliver in found:
                found.remove(deliver)
                if not found:
                    del self._subscribers[channel]
                    self._subscriber.unsubscribe(bus_channel(channel))
                    if self._presence is not None and channel.startswith(PRESENCE):
                        self._presence.unfollowed(channel[len(PRESENCE) :])

        return unsubscribe

    def _receiver(self, channel: str) -> Callable[[bytes], None]:
        def receive(body: bytes) -> None:
            try:
                origin, payload = cbor2.loads(body)
                if origin == self._node:
                    return  # delivered here when published
                if type(payload) is list:
                    user, frame, hidden, only, status, ts = payload
                    payload = PresenceNote(
                        user,
                        frame,
                        frozenset(hidden),
                        None if only is None else frozenset(only),
                        Status(status),
                        ts,
                    )
                    if self._presence is not None:
                        self._presence.mirror(payload)
            except (ValueError, TypeError, cbor2.CBORDecodeError) as exc:
                self.unreadable += 1
                log.error("bus: unreadable message on %s dropped: %s", channel, exc)
                return
            for deliver in list(self._subscribers.get(channel, ())):
                deliver(payload)

        return receive
