"""A session's feed requests: posts, likes, follows, interests and views.

The session hands every feed frame to its ``SessionFeeds``, which routes it: deletions
and likes to the shard of the post's cell (``actors.feed_cells``); posts, follows and
interests to the user's Profile actor (which makes a post in its shard); views to the
session's FeedViews actor. A like or deletion of a post the live shards do not hold
(older than the horizon) is checked against storage and stored write-behind directly.
"""

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import trio

from actors.directory import ActorKind
from actors.feed_cells import cell_of_post
from actors.feed_messages import (
    DropPost,
    PostAuthor,
    PostRequest,
    ProfileRequest,
    SetLike,
    ViewRequest,
    ViewsDirty,
)
from actors.messages import (
    Detach,
    FeedDelta,
    FeedDirty,
    ProfileChanged,
    Reply,
    RequestFailed,
    SessionLink,
    answer_once_stored,
    answer_within,
    ask,
    deliver,
)
from protocol.errors import ErrorCode
from protocol.frames import (
    FeedClose,
    FeedMore,
    FeedOpen,
    Follow,
    Frame,
    Interests,
    Like,
    Ok,
    Post,
    Posted,
    Unfollow,
    Unlike,
    Unpost,
)
from storage.store import (
    FeedProfile,
    LikeChanged,
    PostDeleted,
    StorageError,
    Store,
    StoredPost,
)
from storage.write_behind import Ticket

if TYPE_CHECKING:
    from actors.session import Session

T = TypeVar("T")
FEED_FRAMES = frozenset(
    {Post, Unpost, Like, Unlike, Follow, Unfollow, Interests, FeedOpen, FeedMore, FeedClose}
)


class SessionFeeds:
    __slots__ = ("_lost", "_profile", "_session", "_views")

    def __init__(self, session: "Session") -> None:
        self._session = session
        self._views = False  # has spoken to its FeedViews actor
        self._lost = False  # an event for the views did not fit in their mailbox
        self._profile: FeedProfile | None = None  # the newest the Profile actor sent

    async def handle(self, frame: Frame) -> None:
        session = self._session
        link = session.link
        assert link is not None
        kind = type(frame)
        if kind is FeedOpen or kind is FeedMore or kind is FeedClose:
            self._views = True
            blocks = await session.known_blocks()  # no page may show them, not even once
            ref = session._s.directory.ref(ActorKind.VIEWS, link.id)
            request = ViewRequest(link, frame, blocks)  # type: ignore[arg-type]
            return await session._tell(ref, request)
        if session.going_away and kind is not Unfollow:
            raise RequestFailed(ErrorCode.TRY_LATER, "server is going away; reconnect")
        if kind is Post:
            assert isinstance(frame, Post)
            return await self._post(link, frame)
        if kind is Follow or kind is Unfollow or kind is Interests:
            if kind is not Interests and frame.user == link.user:  # type: ignore[attr-defined]
                raise RequestFailed(ErrorCode.INVALID, "one cannot follow oneself")
            ref = session._s.directory.ref(ActorKind.PROFILE, link.user)
            return await session._tell(ref, ProfileRequest(link, frame))  # type: ignore[arg-type]
        if kind is Like or kind is Unlike:
            assert isinstance(frame, Like | Unlike)
            return await self._like(link, frame.id, frame.post, liked=kind is Like)
        assert isinstance(frame, Unpost)
        return await self._unpost(link, frame)

    async def _post(self, link: SessionLink, frame: Post) -> None:
        session = self._session
        # Made before? Storage knows the posts stored; the user's Profile those still on
        # their way (and the shard those of its horizon).
        found = await self._stored(lambda store: store.find_post(link.user, frame.cid))
        if found is not None:
            posted = Posted(id=frame.id, post=found.post, cid=found.cid, ts=found.ts)
            return session._send(posted)
        ref = session._s.directory.ref(ActorKind.PROFILE, link.user)
        await session._tell(ref, PostRequest(link, frame))

    async def _like(self, link: SessionLink, request: int, post: int, *, liked: bool) -> None:
        cell = await self._shard_of(post)
        reply: Reply[Ticket | None] = Reply()
        ticket = await self._ask(str(cell), SetLike(link.user, post, liked, reply), reply)
        if ticket is None:  # not live: a post beyond the horizon still takes likes
            await self._live_or_stored(post)
            ts = self._session._s.now_ms()
            ticket = self._enqueue(LikeChanged(post=post, user=link.user, liked=liked, ts=ts))
        # Without holding the session: its next frame is read at once.
        answer_once_stored(ticket, link, Ok(id=request))

    async def _unpost(self, link: SessionLink, frame: Unpost) -> None:
        reply: Reply[Ticket | None] = Reply()
        command = DropPost(link.user, frame.post, reply)
        ticket = await self._ask(str(await self._shard_of(frame.post)), command, reply)
        if ticket is None:
            stored = await self._live_or_stored(frame.post)
            if stored.created.author != link.user:
                raise RequestFailed(ErrorCode.FORBIDDEN, "not your post")
            ticket = self._enqueue(PostDeleted(post=frame.post, ts=self._session._s.now_ms()))
        answer_once_stored(ticket, link, Ok(id=frame.id))

    async def post_author(self, post: int) -> str:
        """The author of ``post``, which exists and is not deleted (else NOT_FOUND)."""
        cell = await self._shard_of(post)
        reply: Reply[str | None] = Reply()
        author = await self._ask(str(cell), PostAuthor(post, reply), reply)
        if author is None:
            author = (await self._live_or_stored(post)).created.author
        return author

    async def _live_or_stored(self, post: int) -> StoredPost:
        found = await self._stored(lambda store: store.load_post(post))
        if found is None or found.deleted:
            raise RequestFailed(ErrorCode.NOT_FOUND, "no such post")
        return found

    async def _shard_of(self, post: int) -> int:
        """The cell of ``post``. A shard not running here is started only for a post
        storage holds: a client learns a post's id once it is stored, so an id of no
        post costs one read, not a shard (nor, in a cluster, a claim)."""
        cell = _cell(post)
        if not self._session._s.directory.has(ActorKind.FEED, str(cell)):
            found = await self._stored(lambda store: store.load_post(post))
            if found is None:
                raise RequestFailed(ErrorCode.NOT_FOUND, "no such post")
        return cell

    async def _ask(self, shard: str, command: object, reply: Reply[T]) -> T:
        s = self._session
        with answer_within(s._settings.request_timeout):
            return await ask(s._s.directory, ActorKind.FEED, shard, command, reply)

    async def _stored(self, read: Callable[[Store], Awaitable[T]]) -> T:
        s = self._session
        try:
            with trio.fail_after(s._settings.request_timeout):
                return await read(s._s.store)
        except (StorageError, trio.TooSlowError) as exc:
            raise RequestFailed(ErrorCode.TRY_LATER, "storage unavailable; retry") from exc

    def _enqueue(self, record: LikeChanged | PostDeleted) -> Ticket:
        wb = self._session._s.write_behind
        if not wb.has_capacity():
            raise RequestFailed(ErrorCode.TRY_LATER, "storage is behind")
        return wb.enqueue(record)

    # --- events ----------------------------------------------------------------------------

    def on_event(self, event: FeedDirty | FeedDelta | ProfileChanged) -> None:
        if type(event) is FeedDelta:
            self._forward(event)
        elif type(event) is FeedDirty:
            self._forward(ViewsDirty(event.view))
        else:
            assert type(event) is ProfileChanged
            self._profile = event.profile  # kept: a lost event must not lose it
            self._forward(ViewsDirty(None, profile=event.profile))

    def blocks_changed(self, blocks: frozenset[str]) -> None:
        if self._views:
            self._forward(ViewsDirty(None, blocks=blocks))

    def _forward(self, command: ViewsDirty | FeedDelta) -> None:
        link = self._session.link
        if link is None:
            return
        ref = self._session._s.directory.get(ActorKind.VIEWS, link.id)
        if ref is None:
            return
        try:
            if self._lost:  # a change was lost: every view ranks again first
                ref.send_nowait(ViewsDirty(None, profile=self._profile, lost=True))
                self._lost = False
            ref.send_nowait(command)
        except trio.WouldBlock:
            self._lost = True  # its mailbox is full: the next event that fits says so
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def detach(self, link: SessionLink) -> None:
        if not self._views:
            return
        ref = self._session._s.directory.get(ActorKind.VIEWS, link.id)
        if ref is not None:
            try:
                await deliver(ref, Detach(link))
            except RequestFailed:
                pass


def _cell(post: int) -> int:
    cell = cell_of_post(post)
    if cell is None:
        raise RequestFailed(ErrorCode.NOT_FOUND, "no such post")
    return cell
