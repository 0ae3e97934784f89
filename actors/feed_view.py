"""A session's feed views: one actor per session that has any open (at most 4 views).

A view is a place, a radius and a page size. Its page is merged from the answers of
the feed shards its circle touches, each asked at the same ranking instant, so the page
is exactly the ranking over every post it may show at that instant (PROTOCOL.md,
"Feeds"). It ranks again when a shard says a change may alter it, when the user's
profile or blocks change, and when the ranking instant moves on (every step, a minute by
default, as freshness decays; the views of a node spread over the step's first 15 s): at
most once per ``--feed-interval`` per view, and sends ``feedchanged`` only if the page did
change.

``feedmore`` pages through a snapshot: the first one ranks the view's posts to
``MAX_FEED_DEPTH`` at the page's instant, and later ones read it, so pages neither skip
nor repeat posts while counts move.
"""

import math
import zlib

import attrs
import trio

from actors.directory import ActorKind
from actors.feed_cells import CELLS, MAX_VIEW_CELLS, cells_within, widest_radius
from actors.feed_index import Viewer
from actors.feed_messages import (
    LivePosts,
    Ranking,
    RankQuery,
    StopWatch,
    ViewCommand,
    ViewRequest,
    ViewsDirty,
    WatchProfile,
)
from actors.messages import (
    Detach,
    FeedDelta,
    Refused,
    Reply,
    RequestFailed,
    SessionLink,
    answer_within,
    ask,
    tell_session,
)
from actors.services import Services
from protocol.codec import encode
from protocol.errors import ErrorCode
from protocol.frames import (
    FeedChanged,
    FeedClose,
    FeedItem,
    FeedMore,
    FeedOpen,
    FeedPage,
    Frame,
    Ok,
)
from protocol.limits import FEED_PAGE, MAX_FEED_DEPTH, MAX_VIEWS, MIN_RADIUS_M
from protocol.ranking import rank_key, ranking_instant
from protocol.wsframe import server_frame
from storage.store import FeedProfile

STEP_SPREAD = 15.0  # seconds over which views rank again when the step moves on


@attrs.define(eq=False)
class _View:
    number: int
    lat: float
    lon: float
    radius: float
    k: int
    cells: tuple[int, ...]
    at: int = 0  # the instant the page was ranked at
    page: tuple[FeedItem, ...] = ()  # as it is now
    shown: tuple[FeedItem, ...] = ()  # as the client has it
    gens: dict[int, int] = attrs.Factory(dict)  # shard -> the answer its deltas follow
    due: float = math.inf  # when it ranks again (trio clock)
    ranked: float = -math.inf  # when it last ranked
    emit: float = math.inf  # when it sends what changed
    sent: float = -math.inf  # when it last sent a page or change
    snapshot: tuple[FeedItem, ...] | None = None
    snapshot_at: int = 0


class FeedViews:
    def __init__(self, key: str, services: Services, predecessor: "FeedViews | None") -> None:
        self.key = key  # the session's id
        self._s = services
        self.link: SessionLink | None = None
        self.views: dict[int, _View] = {}
        self.profile: FeedProfile | None = None
        self.blocks: frozenset[str] = frozenset()
        self._numbers = 0
        self._phase = zlib.crc32(key.encode()) / 2**32  # where in the spread this one ranks
        if predecessor is not None:
            self.link = predecessor.link
            self.views = predecessor.views
            self.profile = predecessor.profile
            self.blocks = predecessor.blocks
            self._numbers = predecessor._numbers
            for view in self.views.values():
                view.due = trio.current_time()  # what it was doing is lost: rank again

    async def run(self, inbox: trio.MemoryReceiveChannel[ViewCommand]) -> None:
        while True:
            wake = min((min(v.due, v.emit) for v in self.views.values()), default=math.inf)
            command: ViewCommand | None = None
            with trio.move_on_at(wake):
                command = await inbox.receive()
            if command is None:
                await self._wake()
            elif type(command) is FeedDelta:
                self._delta(command)
            elif type(command) is ViewRequest:
                self.link = command.link
                self.blocks = command.blocks
                try:
                    await self._request(command.frame)
                except RequestFailed as exc:
                    tell_session(
                        command.link, Refused(exc.code, exc.message, command.frame.id, None)
                    )
            elif type(command) is ViewsDirty:
                self._dirty(command)
            else:
                assert type(command) is Detach
                if self._retire():
                    return
            # Its session is gone (and could not say so), or closed its last view.
            closed = self.link is not None and self.link.outbox.closed
            if (closed or not self.views) and self._retire():
                return

    def _retire(self) -> bool:
        self._stop_all()
        return self._s.directory.try_retire(ActorKind.VIEWS, self.key)

    def _delta(self, delta: FeedDelta) -> None:
        """Posts of one shard rose: merge their items (every other post's score is
        what it was, so the page is the old one with them in their places)."""
        view = self.views.get(delta.view)
        if view is None or view.gens.get(delta.shard) != delta.gen:
            return  # the view asked that shard again since: the answer had them
        items = {item.post: item for item in view.page}
        items.update((item.post, item) for item in delta.items)
        ranked = sorted(items.values(), key=lambda i: rank_key(i.score, i.post))
        view.page = tuple(ranked[: view.k])
        self._emit_soon(view)

    def _emit_soon(self, view: _View) -> None:
        interval = self._s.settings.feed_interval
        view.emit = min(view.emit, max(trio.current_time(), view.sent + interval))

    def _dirty(self, command: ViewsDirty) -> None:
        if command.view is None and not command.lost:
            profile = command.profile or self.profile
            blocks = self.blocks if command.blocks is None else command.blocks
            if profile == self.profile and blocks == self.blocks:
                return  # told what it knew (the blocks a session learns as it starts)
            self.profile, self.blocks = profile, blocks
        if command.view is None:
            targets = list(self.views.values())
        else:
            view = self.views.get(command.view)
            targets = [] if view is None else [view]
        interval = self._s.settings.feed_interval
        for view in targets:
            view.due = min(view.due, max(trio.current_time(), view.ranked + interval))

    async def _request(self, frame: FeedOpen | FeedMore | FeedClose) -> None:
        if type(frame) is FeedOpen:
            if len(self.views) >= MAX_VIEWS:
                raise RequestFailed(ErrorCode.TOO_MANY_VIEWS, f"at most {MAX_VIEWS} feed views")
            if self.profile is None:
                assert self.link is not None
                reply: Reply[FeedProfile] = Reply()
                with answer_within(self._s.settings.request_timeout):
                    self.profile = await ask(
                        self._s.directory,
                        ActorKind.PROFILE,
                        self.link.user,
                        WatchProfile(self.link, reply),
                        reply,
                    )
            cells = cells_within(frame.lat, frame.lon, frame.radius)
            if len(cells) > MAX_VIEW_CELLS:
                widest = widest_radius(frame.lat, frame.lon, frame.radius)
                if widest < MIN_RADIUS_M:
                    raise RequestFailed(ErrorCode.INVALID, "no feed view this close to a pole")
                raise RequestFailed(
                    ErrorCode.INVALID, f"radius must be at most {widest} m at this place"
                )
            self._numbers += 1
            view = _View(
                self._numbers,
                frame.lat,
                frame.lon,
                float(frame.radius),
                frame.limit or FEED_PAGE,
                tuple(cells),
            )
            self.views[view.number] = view
            try:
                await self._rank(view)
            except BaseException:
                self._stop(view)
                raise
            self._send(FeedPage(id=frame.id, view=view.number, ts=view.at, items=view.page))
            view.shown, view.sent = view.page, trio.current_time()
            return
        assert type(frame) is FeedMore or type(frame) is FeedClose
        found = self.views.get(frame.view)
        if found is None:
            raise RequestFailed(ErrorCode.NOT_FOUND, "no such feed view")
        view = found
        if type(frame) is FeedClose:
            self._stop(view)
            self._send(Ok(id=frame.id))
            return
        assert type(frame) is FeedMore
        if view.snapshot is None:
            snapshot = await self._ask_shards(view, MAX_FEED_DEPTH, view.at, watch=False)
            view.snapshot, view.snapshot_at = snapshot[0], view.at
        end = frame.rank + (frame.limit or FEED_PAGE)
        items = await self._still_shown(view.snapshot[frame.rank : end])
        self._send(
            FeedPage(
                id=frame.id,
                view=view.number,
                ts=view.snapshot_at,
                items=items,
                more=end < len(view.snapshot),
            )
        )

    async def _still_shown(self, items: tuple[FeedItem, ...]) -> tuple[FeedItem, ...]:
        """``items`` of a snapshot but those deleted, past the horizon, or by authors
        hidden from the viewer since it was taken."""
        assert self.profile is not None
        hidden = self.blocks | self.profile.blocked_by
        items = tuple(item for item in items if item.user not in hidden)
        by_cell: dict[int, list[int]] = {}
        for item in items:
            by_cell.setdefault(item.post % CELLS, []).append(item.post)
        live: frozenset[int] = frozenset()
        with answer_within(self._s.settings.request_timeout):
            for cell, posts in by_cell.items():
                reply: Reply[frozenset[int]] = Reply()
                query = LivePosts(tuple(posts), reply)
                found = await ask(self._s.directory, ActorKind.FEED, str(cell), query, reply)
                live = live | found
        return tuple(item for item in items if item.post in live)

    async def _wake(self) -> None:
        now = trio.current_time()
        for view in [v for v in self.views.values() if min(v.due, v.emit) <= now]:
            if view.due <= now:
                try:
                    await self._rank(view)
                except RequestFailed:
                    view.due = trio.current_time() + 1.0  # a shard cannot answer now: later
                    continue
                if view.number not in self.views:
                    continue  # closed meanwhile
                self._emit_soon(view)
            if view.emit <= trio.current_time():
                self._emit(view)

    def _emit(self, view: _View) -> None:
        view.emit = math.inf
        changed = _changes(view.shown, view.page)
        if changed is None:
            return
        posts = tuple(item.post for item in view.page)
        self._send(FeedChanged(view=view.number, ts=view.at, posts=posts, items=changed))
        view.shown, view.sent = view.page, trio.current_time()
        self._s.metrics.feed_changes.inc()

    async def _rank(self, view: _View) -> None:
        """Rank ``view`` at the current instant, and wait for the next step or change."""
        now_ms = self._s.now_ms()
        step = self._s.settings.feed_step_ms
        at = ranking_instant(now_ms, step)
        view.page, view.gens = await self._ask_shards(view, view.k, at, watch=True)
        view.at = at
        view.ranked = trio.current_time()
        # Freshness moves on at the next step: every score changes then. Views rank
        # again spread over the step's first seconds, not all in the same instant.
        spread = min(STEP_SPREAD, step / 4000) * self._phase
        view.due = view.ranked + (at + step - now_ms) / 1000 + spread

    async def _ask_shards(
        self, view: _View, k: int, at: int, *, watch: bool
    ) -> tuple[tuple[FeedItem, ...], dict[int, int]]:
        """The best ``k`` of the view's shards at instant ``at``, and each shard's
        answer number."""
        assert self.link is not None and self.profile is not None
        p = self.profile
        viewer = Viewer(
            lat=view.lat,
            lon=view.lon,
            radius=view.radius,
            follows=p.follows,
            interests=p.interests,
            hidden=self.blocks | p.blocked_by,
        )
        answers: dict[int, Ranking] = {}

        async def one(cell: int) -> None:
            reply: Reply[Ranking] = Reply()
            assert self.link is not None
            query = RankQuery(self.link, view.number, viewer, at, k, watch, reply)
            answers[cell] = await ask(self._s.directory, ActorKind.FEED, str(cell), query, reply)

        with answer_within(self._s.settings.request_timeout):
            if len(view.cells) == 1:
                await one(view.cells[0])
            else:
                async with trio.open_nursery() as nursery:
                    for cell in view.cells:
                        nursery.start_soon(one, cell)
        items = [item for answer in answers.values() for item in answer.items]
        items.sort(key=lambda i: rank_key(i.score, i.post))
        return tuple(items[:k]), {cell: answer.gen for cell, answer in answers.items()}

    def _stop(self, view: _View) -> None:
        self.views.pop(view.number, None)
        for cell in view.cells:
            ref = self._s.directory.get(ActorKind.FEED, str(cell))
            if ref is not None:
                try:
                    ref.send_nowait(StopWatch(self.key, view.number))
                except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                    pass  # the shard drops watches of closed sessions itself

    def _stop_all(self) -> None:
        for view in list(self.views.values()):
            self._stop(view)
        if self.link is not None and self.profile is not None:
            self.profile = None  # asked again with the next view
            ref = self._s.directory.get(ActorKind.PROFILE, self.link.user)
            if ref is not None:
                try:
                    ref.send_nowait(Detach(self.link))
                except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                    pass  # it drops closed sessions itself

    def _send(self, frame: Frame) -> None:
        assert self.link is not None
        self.link.outbox.append(server_frame(encode(frame)))
        self._s.metrics.frames_out_by[type(frame)].inc()


def _changes(
    before: tuple[FeedItem, ...], after: tuple[FeedItem, ...]
) -> tuple[FeedItem, ...] | None:
    """The items of ``after`` that are new or changed; None if the page is the same."""
    old = {item.post: item for item in before}
    changed = tuple(item for item in after if old.get(item.post) != item)
    if not changed and [i.post for i in before] == [i.post for i in after]:
        return None
    return changed
