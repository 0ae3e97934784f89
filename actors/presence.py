"""Who is online on this node: the presence book, and what a presence change publishes.

How this works: each User actor is the only writer of its own entry: it puts the user
in the book when they come online (their first session), marks them offline with their
last-seen time when the grace period after their last session ends, and takes them out
when it retires (by then storage has the last-seen time). A change is published once on the bus
channel ``presence:<user>`` as a ``PresenceNote`` holding the framed ``presence`` event;
every session that follows the user (a member of a small room they share, or an explicit
``watch``) subscribed to that channel once and appends the same bytes to its outbox.
Sessions read the book, without awaiting, for the state of users they start to follow.
In a cluster the book also lives in Redis (``actors.cluster_presence``).
"""

from collections.abc import Iterable

import attrs

from protocol.codec import encode
from protocol.frames import Presence, PresenceState, Status
from protocol.wsframe import server_frame


@attrs.frozen
class PresenceNote:
    """Published on ``presence:<user>``: the same bytes for every follower, except those
    in ``hidden`` (the users this user blocks), who may not see it; with ``only``, for
    those followers alone (a block or unblock tells the user concerned)."""

    user: str
    frame: bytes
    hidden: frozenset[str]
    only: frozenset[str] | None = None
    status: Status = Status.ONLINE  # what ``frame`` says, for other nodes' books
    ts: int | None = None


@attrs.frozen
class Entry:
    status: Status  # OFFLINE, or the status the user chose
    blocks: frozenset[str]
    last_seen: int | None = None


def presence_note(
    user: str,
    status: Status,
    blocks: frozenset[str],
    ts: int | None,
    only: frozenset[str] | None = None,
) -> PresenceNote:
    frame = server_frame(encode(Presence(user=user, status=status, ts=ts)))
    return PresenceNote(user, frame, blocks, only, status, ts)


class PresenceBook:
    def __init__(self) -> None:
        self._online: dict[str, Entry] = {}

    def __len__(self) -> int:
        """Users online on this node."""
        return sum(1 for e in self._online.values() if e.status is not Status.OFFLINE)

    def get(self, user: str) -> Entry | None:
        return self._online.get(user)

    def put(
        self, user: str, status: Status, blocks: frozenset[str], last_seen: int | None = None
    ) -> None:
        self._online[user] = Entry(status, blocks, last_seen)

    def remove(self, user: str) -> None:
        self._online.pop(user, None)

    def forget(self, user: str) -> None:
        """Drop ``user``'s entry here only: their actor moved to another node."""
        self._online.pop(user, None)

    def visible(self, users: Iterable[str], viewer: str) -> list[PresenceState]:
        """The online ``users`` whom ``viewer`` may see."""
        found = []
        for user in users:
            entry = self._online.get(user)
            if entry is not None and entry.status is not Status.OFFLINE:
                if viewer not in entry.blocks:
                    found.append(PresenceState(user=user, status=entry.status))
        return found

    async def known_anywhere(self, users: list[str], viewer: str) -> dict[str, PresenceState]:
        """``known``, and in a cluster what other nodes know (``ClusterPresence``)."""
        return self.known(users, viewer)

    def known(self, users: Iterable[str], viewer: str) -> dict[str, PresenceState]:
        """What the book knows of ``users``, online or recently gone, as ``viewer`` may
        see it: a user who blocks the viewer looks offline, with no last-seen time."""
        found = {}
        for user in users:
            entry = self._online.get(user)
            if entry is None:
                continue
            if viewer in entry.blocks:
                found[user] = PresenceState(user=user, status=Status.OFFLINE)
            elif entry.status is Status.OFFLINE:
                found[user] = PresenceState(user=user, status=Status.OFFLINE, ts=entry.last_seen)
            else:
                found[user] = PresenceState(user=user, status=entry.status)
        return found
