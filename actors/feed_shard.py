"""The FeedShard actor: the live posts of one cell of the globe (``actors.feed_cells``).

It keeps its posts and their counts in memory (``actors.feed_index``), loaded from
storage when it starts: those made within the horizon (``--feed-horizon``); older ones
leave memory, not storage. It gives out post ids, stores posts, likes and deletions
write-behind (handing back the ticket, for those who asked to be answered once it is
stored), answers "your best k for this viewer" for the views that cover its cell, and
remembers what each open view last asked.

When a post changes (it is made, liked, commented, unliked, deleted) the views that
read the shard hear of it (``actors.feed_watches``): a risen post's new item, at most
once per interval, or, when a post on a page fell, a word to rank again.
"""

import math

import trio

from actors.directory import ActorKind
from actors.feed_cells import MAX_NUMBER, post_id
from actors.feed_index import FeedIndex, LivePost, Ranked
from actors.feed_messages import (
    CommentCount,
    DropPost,
    LivePosts,
    MakePost,
    PostAuthor,
    PostMade,
    Ranking,
    RankQuery,
    SetLike,
    ShardCommand,
    StopWatch,
)
from actors.feed_watches import Watches
from actors.messages import (
    ActorMoved,
    Detach,
    FeedDelta,
    FeedDirty,
    Moved,
    Reply,
    tell_session,
)
from actors.services import Services, claim_fence, read_until_stored, retire_refusing
from protocol.errors import ErrorCode
from protocol.frames import FeedItem
from storage.store import Fence, LikeChanged, PostCreated, PostDeleted
from storage.write_behind import COMMITTED, Ticket

EVICT_EVERY = 60.0  # seconds between sweeps of posts older than the horizon


class FeedShard:
    def __init__(self, key: str, services: Services, predecessor: "FeedShard | None") -> None:
        self.key = key
        self.cell = int(key)
        self._s = services
        self.index: FeedIndex | None = None
        self.last_number = 0
        # (author, cid) -> (id, ts) of the posts made within the horizon, deleted or not:
        # a retry gets the original back (older ones are found in storage first).
        self.cids: dict[tuple[str, str], tuple[int, int]] = {}
        self.watches: Watches | None = None
        self.deleted: dict[int, Ticket] = {}  # deletions storage may not hold yet
        self._flush_at = math.inf  # when risen posts go to the views (trio clock)
        self._flushed = -math.inf
        self.queries = 0
        self._last_ticket: Ticket = COMMITTED
        self._fence: Fence | None = None
        if predecessor is not None and predecessor.index is not None:
            # Posts it made may still be queued, not stored: reloading would give their
            # numbers out again.
            self.index = predecessor.index
            self.last_number = predecessor.last_number
            self.cids = predecessor.cids
            self.watches = predecessor.watches
            self.deleted = predecessor.deleted
            self._flush_at = trio.current_time()
            self._last_ticket = predecessor._last_ticket
            self._fence = predecessor._fence

    @property
    def horizon_ms(self) -> int:
        return int(self._s.settings.feed_horizon * 1000)

    async def run(self, inbox: trio.MemoryReceiveChannel[ShardCommand]) -> None:
        if self.index is None:
            await self._load()
        assert self.index is not None and self.watches is not None
        next_sweep = trio.current_time() + EVICT_EVERY
        while True:
            command: ShardCommand | None = None
            with trio.move_on_at(min(next_sweep, self._flush_at)):
                command = await inbox.receive()
            fence = self._fence
            if fence is not None and (fence.stale or type(command) is Moved):
                return await self._step_down(inbox)
            if command is not None:
                self._handle(command)
                if self.watches.pending and self._flush_at == math.inf:
                    interval = self._s.settings.feed_interval
                    self._flush_at = max(trio.current_time(), self._flushed + interval)
                continue
            now = trio.current_time()
            if now >= self._flush_at:
                self._flush()
            if now < next_sweep:
                continue
            next_sweep = now + EVICT_EVERY
            self._sweep()
            if (
                not len(self.index)
                and not self.watches
                and self._last_ticket.committed
                and self._s.directory.try_retire(ActorKind.FEED, self.key)
            ):
                return

    async def _load(self) -> None:
        store = self._s.store
        if self._s.cluster is not None:
            self._fence, _ = await claim_fence(self._s, "feed", self.key)
        since = self._s.now_ms() - self.horizon_ms
        snapshot = await read_until_stored(
            f"feed shard {self.key}", lambda: store.load_shard(self.cell, since)
        )
        index = FeedIndex()
        for stored in snapshot.posts:
            c = stored.created
            index.add(_live(c, set(stored.likers), stored.comments))
            self.cids[c.author, c.cid] = c.post, c.ts
        self.last_number = snapshot.last_number
        self.index = index
        self.watches = Watches(index)

    async def _step_down(self, inbox: trio.MemoryReceiveChannel[ShardCommand]) -> None:
        """Another node runs this shard now: views re-open there."""
        for watch in self.watches or ():
            tell_session(watch.link, ActorMoved("feed", self.key))
        self.watches = None
        await retire_refusing(self._s, ActorKind.FEED, self.key, inbox)

    def _sweep(self) -> None:
        assert self.index is not None
        for post in self.index.evict_older_than(self._s.now_ms() - self.horizon_ms):
            self.cids.pop((post.author, post.cid), None)
            self._changed(post, rises=False)
        assert self.watches is not None
        self.watches.sweep()
        self.deleted = {p: t for p, t in self.deleted.items() if not t.committed}

    def _handle(self, command: ShardCommand) -> None:
        kind = type(command)
        if kind is RankQuery:
            self._rank(command)  # type: ignore[arg-type]
        elif kind is SetLike:
            self._like(command)  # type: ignore[arg-type]
        elif kind is MakePost:
            self._post(command)  # type: ignore[arg-type]
        elif kind is CommentCount:
            assert type(command) is CommentCount and self.index is not None
            post = self.index.get(command.post)
            if post is not None and self.index.set_comments(command.post, command.comments):
                self._changed(post, rises=True)
        elif kind is DropPost:
            self._drop(command)  # type: ignore[arg-type]
        elif kind is LivePosts:
            assert type(command) is LivePosts and self.index is not None
            get = self.index.get
            command.reply.set(frozenset(p for p in command.posts if get(p) is not None))
        elif kind is PostAuthor:
            assert type(command) is PostAuthor and self.index is not None
            live = self.index.get(command.post)
            if live is None and command.post in self.deleted:
                return command.reply.fail(ErrorCode.NOT_FOUND, "no such post")
            command.reply.set(None if live is None else live.author)
        elif kind is StopWatch:
            assert type(command) is StopWatch and self.watches is not None
            self.watches.stop(command.session, command.view)
        elif kind is Detach:
            assert type(command) is Detach and self.watches is not None
            self.watches.stop_session(command.link.id)
        elif kind is Moved:
            pass  # not claimed yet (no fence): nothing of ours to give up
        else:
            raise TypeError(f"feed shard got {command!r}")

    # --- posts ---------------------------------------------------------------------------

    def _post(self, command: MakePost) -> None:
        assert self.index is not None
        user, frame = command.user, command.frame
        known = self.cids.get((user, frame.cid))
        if known is not None:  # a retry: the original (deleted since or not)
            return command.reply.set(PostMade(*known, self._last_ticket))
        wb = self._s.write_behind
        if not wb.has_capacity() or self.last_number >= MAX_NUMBER:
            return command.reply.fail(ErrorCode.TRY_LATER, "storage is behind")
        self.last_number += 1
        record = PostCreated(
            post=post_id(self.last_number, self.cell),
            author=user,
            cid=frame.cid,
            ts=self._s.now_ms(),
            lat=frame.lat,
            lon=frame.lon,
            category=frame.category,
            text=frame.text,
            data=frame.data,  # type: ignore[arg-type]  # Raw, as the server decodes it
        )
        post = _live(record)
        size = 128 + len(frame.text or "") + len(getattr(frame.data, "cbor", b""))
        self._last_ticket = ticket = wb.enqueue(record, size, self._fence)
        self.index.add(post)
        self.cids[post.author, post.cid] = post.post, post.ts
        self._s.metrics.feed_posts.inc()
        command.reply.set(PostMade(post.post, post.ts, ticket))
        self._changed(post, rises=True)

    def _drop(self, command: DropPost) -> None:
        assert self.index is not None
        post = self.index.get(command.post)
        if post is None:
            return self._not_live(command.post, command.reply)
        if post.author != command.user:
            return command.reply.fail(ErrorCode.FORBIDDEN, "not your post")
        self.index.remove(command.post)
        record = PostDeleted(post=command.post, ts=self._s.now_ms())
        self._last_ticket = self._s.write_behind.enqueue(record, fence=self._fence)
        self.deleted[command.post] = self._last_ticket
        command.reply.set(self._last_ticket)
        self._changed(post, rises=False)

    def _not_live(self, post: int, reply: Reply[Ticket | None]) -> None:
        """Not in memory: deleted a moment ago (storage may not know yet), or ask storage."""
        if post in self.deleted:
            return reply.fail(ErrorCode.NOT_FOUND, "no such post")
        reply.set(None)

    def _like(self, command: SetLike) -> None:
        assert self.index is not None
        post = self.index.get(command.post)
        if post is None:
            return self._not_live(command.post, command.reply)
        if command.liked:
            changed = self.index.like(command.post, command.user)
        else:
            changed = self.index.unlike(command.post, command.user)
        if changed:
            if not self._s.write_behind.has_capacity():
                # Undo: the count must not run ahead of what storage will hold.
                (self.index.unlike if command.liked else self.index.like)(
                    command.post, command.user
                )
                return command.reply.fail(ErrorCode.TRY_LATER, "storage is behind")
            record = LikeChanged(
                post=command.post, user=command.user, liked=command.liked, ts=self._s.now_ms()
            )
            self._last_ticket = self._s.write_behind.enqueue(record, fence=self._fence)
            self._s.metrics.feed_likes.inc()
            self._changed(post, rises=command.liked)
        # Unchanged: a retry, answered once what it repeats is stored.
        command.reply.set(self._last_ticket)

    # --- views ---------------------------------------------------------------------------

    def _rank(self, query: RankQuery) -> None:
        assert self.index is not None and self.watches is not None
        ranked = self.index.top(query.viewer, query.at, query.k)
        self.queries += 1
        self._s.metrics.feed_examined.observe(self.index.examined)
        gen = 0
        if query.watch:
            gen = self.watches.watch(
                query.link, query.view, query.viewer, query.at, query.k, ranked
            )
        query.reply.set(Ranking(tuple(self._item(r) for r in ranked), gen))

    def _item(self, r: Ranked) -> FeedItem:
        assert self.index is not None
        post = self.index.get(r.post)
        assert post is not None
        return FeedItem(
            post=post.post,
            user=post.author,
            ts=post.ts,
            lat=post.lat,
            lon=post.lon,
            category=post.category,
            likes=len(post.likers),
            comments=post.comments,
            score=r.score,
            parts=r.parts,
            text=post.text,
            data=post.data,  # type: ignore[arg-type]
        )

    def _changed(self, post: LivePost, *, rises: bool) -> None:
        """Note a change of ``post`` for the views reading this shard: those that must
        ask again are told now; risen posts go out at the next flush."""
        assert self.watches is not None
        stale = self.watches.changed(post, rises=rises)
        for watch in stale:
            tell_session(watch.link, FeedDirty(watch.view))
        if stale:
            self._s.metrics.feed_dirty.inc(len(stale))

    def _flush(self) -> None:
        """Send each view the items of its risen posts, once per interval at most."""
        assert self.watches is not None
        self._flush_at = math.inf
        self._flushed = trio.current_time()
        sent = 0
        for watch, ranked in self.watches.flush():
            items = tuple(self._item(r) for r in ranked)
            tell_session(watch.link, FeedDelta(watch.view, self.cell, watch.gen, items))
            sent += 1
        if sent:
            self._s.metrics.feed_deltas.inc(sent)


def _live(created: PostCreated, likers: set[str] | None = None, comments: int = 0) -> LivePost:
    c = created
    return LivePost(
        post=c.post,
        author=c.author,
        cid=c.cid,
        ts=c.ts,
        lat=c.lat,
        lon=c.lon,
        category=c.category,
        text=c.text,
        data=c.data,
        likers=set() if likers is None else likers,
        comments=comments,
    )
