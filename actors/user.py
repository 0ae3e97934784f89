"""The User actor: one per online user, holding all of that user's sessions.

It subscribes to the bus channel ``user:<id>`` while it runs, so an event for the user
(an invitation, a new direct room) reaches every session of theirs, on whichever node
the event was raised. It retires once the last session is gone and it has been idle.
"""

import logging
from collections.abc import Callable

import trio

from actors.directory import ActorKind
from actors.messages import SessionClosed, SessionLink, SessionOpened, UserCommand
from actors.services import Services

log = logging.getLogger(__name__)


class User:
    def __init__(self, key: str, services: Services, predecessor: "User | None") -> None:
        self.key = key
        self._s = services
        # Sessions outlive a crash of their user actor: the new one keeps them.
        self.sessions: dict[str, SessionLink] = {} if predecessor is None else predecessor.sessions

    async def run(self, inbox: trio.MemoryReceiveChannel[UserCommand]) -> None:
        unsubscribe: Callable[[], None] = self._s.bus.subscribe(f"user:{self.key}", self._deliver)
        try:
            idle = self._s.settings.actor_idle
            while True:
                with trio.move_on_after(idle) as waiting:
                    command = await inbox.receive()
                if waiting.cancelled_caught:
                    # A session that could not say goodbye leaves a closed outbox behind.
                    for sid in [k for k, v in self.sessions.items() if v.outbox.closed]:
                        del self.sessions[sid]
                    if not self.sessions and self._s.directory.try_retire(ActorKind.USER, self.key):
                        return
                elif type(command) is SessionOpened:
                    self.sessions[command.link.id] = command.link
                elif type(command) is SessionClosed:
                    self.sessions.pop(command.link.id, None)
                else:
                    raise TypeError(f"user got {command!r}")
        finally:
            unsubscribe()

    def _deliver(self, frame: bytes) -> None:
        for link in self.sessions.values():
            link.outbox.append(frame)
