"""What sessions, views, rooms and feed actors send each other about feeds."""

import attrs

from actors.feed_index import Viewer
from actors.messages import Detach, FeedDelta, Moved, Reply, SessionLink
from protocol.frames import (
    FeedClose,
    FeedItem,
    FeedMore,
    FeedOpen,
    Follow,
    Interests,
    Post,
    Unfollow,
)
from storage.store import FeedProfile
from storage.write_behind import Ticket

# --- to a feed shard ------------------------------------------------------------------


@attrs.frozen
class MakePost:
    """A ``post`` of ``user``'s, from their Profile actor (which makes ``cid`` unique)."""

    user: str
    frame: Post
    reply: "Reply[PostMade]"


@attrs.frozen
class PostMade:
    """The post's id and time; ``posted`` may be answered once ``ticket`` is stored."""

    post: int
    ts: int
    ticket: Ticket


@attrs.frozen
class DropPost:
    """``user`` deletes ``post``: the reply is the deletion's ticket, or None if the
    post is not live in this shard (older than the horizon, or unknown)."""

    user: str
    post: int
    reply: Reply[Ticket | None]


@attrs.frozen
class SetLike:
    """``user`` likes ``post`` or stops; the reply as for ``DropPost``."""

    user: str
    post: int
    liked: bool
    reply: Reply[Ticket | None]


@attrs.frozen
class PostAuthor:
    """Who wrote ``post``, if it is live here (None: ask storage)."""

    post: int
    reply: Reply[str | None]


@attrs.frozen
class LivePosts:
    """Which of ``posts`` (of this shard) are live: not deleted, not past the horizon."""

    posts: tuple[int, ...]
    reply: Reply[frozenset[int]]


@attrs.frozen
class CommentCount:
    """``post``'s comment room holds ``comments`` messages now (a monotonic maximum)."""

    post: int
    comments: int


@attrs.frozen
class Ranking:
    """A shard's answer: its best posts for the viewer, and (if watched) the answer's
    number, which the deltas that follow it carry."""

    items: tuple[FeedItem, ...]
    gen: int


@attrs.frozen
class RankQuery:
    """The shard's ``k`` best posts for ``viewer`` at instant ``at`` (ms). With ``watch``
    the shard then sends ``link``'s session what changes in them (``FeedDelta``, or
    ``FeedDirty`` when the view must ask again)."""

    link: SessionLink
    view: int
    viewer: Viewer
    at: int
    k: int
    watch: bool
    reply: Reply[Ranking]


@attrs.frozen
class StopWatch:
    """Session ``session``'s view ``view`` is closed."""

    session: str
    view: int


ShardCommand = (
    MakePost
    | DropPost
    | SetLike
    | PostAuthor
    | LivePosts
    | CommentCount
    | RankQuery
    | StopWatch
    | Detach
    | Moved
)

# --- to a user's feed profile ---------------------------------------------------------


@attrs.frozen
class ProfileRequest:
    """A ``follow``, ``unfollow`` or ``interests`` from ``link``'s session."""

    link: SessionLink
    frame: Follow | Unfollow | Interests


@attrs.frozen
class WatchProfile:
    """The profile now, and ``ProfileChanged`` to ``link``'s session at each change."""

    link: SessionLink
    reply: Reply[FeedProfile]


@attrs.frozen
class BlockedBy:
    """``other`` blocks this user now (or no longer): their posts leave its feeds."""

    other: str
    blocked: bool


@attrs.frozen
class PostRequest:
    """A ``post`` from ``link``'s session, through its user's Profile: every post of a
    user passes one actor, so a ``cid`` names one post wherever it was made."""

    link: SessionLink
    frame: Post


ProfileCommand = ProfileRequest | PostRequest | WatchProfile | BlockedBy | Detach | Moved

# --- to a session's views ---------------------------------------------------------------


@attrs.frozen
class ViewRequest:
    """A ``feedopen``, ``feedmore`` or ``feedclose`` from ``link``'s session, which
    knows whom its user blocks (``blocks``)."""

    link: SessionLink
    frame: FeedOpen | FeedMore | FeedClose
    blocks: frozenset[str]


@attrs.frozen
class ViewsDirty:
    """Forwarded by the session: ``FeedDirty`` (``view``), or every view when ``view``
    is None (the profile or the blocks changed: ``profile``/``blocks`` if known; or,
    ``lost``, a delta could not be forwarded)."""

    view: int | None
    profile: FeedProfile | None = None
    blocks: frozenset[str] | None = None
    lost: bool = False


ViewCommand = ViewRequest | ViewsDirty | FeedDelta | Detach
