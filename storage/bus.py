"""The bus: how events reach actors that may live on another node.

A single node uses ``InProcessBus``: a publish calls the local subscribers of the
channel at once. A Redis bus (many nodes) will implement the same two methods with
PUBLISH/SUBSCRIBE, so actors do not change. Channels are named ``<kind>:<key>``:
``user:<id>`` carries framed events (bytes) for every session of one user, and
``presence:<id>`` carries ``actors.presence.PresenceNote`` records (bytes and strings
only, so a Redis bus can serialize them) to the sessions that follow that user.
"""

from collections.abc import Callable
from functools import partial
from typing import Protocol

Deliver = Callable[[object], None]


class Bus(Protocol):
    def publish(self, channel: str, payload: object) -> None:
        """Hand ``payload`` to every subscriber of ``channel``; never blocks."""

    def subscribe(self, channel: str, deliver: Deliver) -> Callable[[], None]:
        """Call ``deliver(payload)`` for each publish; returns the unsubscribe function."""


class InProcessBus:
    """``Bus`` for one node: subscribers are called synchronously."""

    def __init__(self) -> None:
        self._subscribers: dict[str, list[Deliver]] = {}

    def publish(self, channel: str, payload: object) -> None:
        for deliver in self._subscribers.get(channel, ()):
            deliver(payload)

    def subscribe(self, channel: str, deliver: Deliver) -> Callable[[], None]:
        self._subscribers.setdefault(channel, []).append(deliver)
        # A partial, not a closure: every user actor keeps one while its user is
        # connected, hibernating included (a closure with its cells is 90 B more).
        return partial(self._unsubscribe, channel, deliver)

    def _unsubscribe(self, channel: str, deliver: Deliver) -> None:
        subscribers = self._subscribers.get(channel)
        if subscribers and deliver in subscribers:
            subscribers.remove(deliver)
            if not subscribers:
                del self._subscribers[channel]
