"""The Profile actor: what a user's feed ranking needs to know of them.

One per user whose feed is in use: whom they follow, their interests, and who blocks
them (``storage.store.FeedProfile``), loaded from storage when it starts. Every post of
the user passes through it on its way to its shard, so that a ``cid`` names one post
even when retried at another place (another shard). It applies
``follow``, ``unfollow`` and ``interests`` in order, stores them write-behind, answers
``ok`` once stored, and then tells the user's sessions that have feed views open, whose
views rank again. It retires once no view follows it and everything is stored.
"""

import trio

from actors.directory import ActorKind
from actors.feed_cells import cell_of
from actors.feed_messages import (
    BlockedBy,
    MakePost,
    PostMade,
    PostRequest,
    ProfileCommand,
    ProfileRequest,
    WatchProfile,
)
from actors.messages import (
    ActorMoved,
    Detach,
    Moved,
    ProfileChanged,
    Refused,
    Reply,
    RequestFailed,
    SessionLink,
    answer_once_stored,
    answer_within,
    ask,
    tell_session,
)
from actors.services import Services, claim_fence, read_until_stored, retire_refusing
from protocol.errors import ErrorCode
from protocol.frames import Follow, Interests, Ok, Post, Posted, Unfollow
from storage.store import FeedProfile, Fence, FollowChanged, InterestsSet
from storage.write_behind import COMMITTED, Ticket


class Profile:
    def __init__(self, key: str, services: Services, predecessor: "Profile | None") -> None:
        self.key = key
        self._s = services
        self.profile: FeedProfile | None = None
        self.subs: dict[str, SessionLink] = {}
        # Posts made through this actor by cid, until stored (then storage knows them),
        # and those on their way to their shard, with who waits for them.
        self.posted: dict[str, PostMade] = {}
        self._making: dict[str, list[tuple[SessionLink, int]]] = {}
        self._last_ticket: Ticket = COMMITTED
        self._fence: Fence | None = None
        if predecessor is not None:
            self.profile = predecessor.profile
            self.subs = predecessor.subs
            self.posted = predecessor.posted
            self._last_ticket = predecessor._last_ticket
            self._fence = predecessor._fence

    async def run(self, inbox: trio.MemoryReceiveChannel[ProfileCommand]) -> None:
        if self.profile is None:
            store = self._s.store
            if self._s.cluster is not None:
                self._fence, _ = await claim_fence(self._s, "profile", self.key)
            self.profile = await read_until_stored(
                f"profile {self.key!r}", lambda: store.load_feed_profile(self.key)
            )
        async with trio.open_nursery() as posting:  # a post in a slow shard holds no other
            await self._serve(inbox, posting)

    async def _serve(
        self, inbox: trio.MemoryReceiveChannel[ProfileCommand], posting: trio.Nursery
    ) -> None:
        idle = self._s.settings.actor_idle
        while True:
            command: ProfileCommand | None = None
            with trio.move_on_after(idle):
                command = await inbox.receive()
            fence = self._fence
            if fence is not None and (fence.stale or type(command) is Moved):
                return await self._step_down(inbox)
            if type(command) is PostRequest:
                self._post(command, posting)
                continue
            if command is not None:
                self._handle(command)
                continue
            for sid in [k for k, v in self.subs.items() if v.outbox.closed]:
                del self.subs[sid]
            self.posted = {
                cid: made for cid, made in self.posted.items() if not made.ticket.committed
            }
            if (
                not self.subs
                and not self.posted
                and not self._making
                and self._last_ticket.committed
                and self._s.directory.try_retire(ActorKind.PROFILE, self.key)
            ):
                return

    async def _step_down(self, inbox: trio.MemoryReceiveChannel[ProfileCommand]) -> None:
        for link in self.subs.values():
            tell_session(link, ActorMoved("profile", self.key))
        self.subs.clear()
        await retire_refusing(self._s, ActorKind.PROFILE, self.key, inbox)

    def _post(self, command: PostRequest, posting: trio.Nursery) -> None:
        """Make the post in its shard, unless this cid made one already (the session
        asked storage first: only posts not stored yet are known here alone)."""
        link, frame = command.link, command.frame
        made = self.posted.get(frame.cid)
        if made is not None:
            return self._answer(made, frame.cid, link, frame.id)
        waiting = self._making.get(frame.cid)
        if waiting is not None:  # the same cid on its way to a shard: one post
            waiting.append((link, frame.id))
            return
        self._making[frame.cid] = [(link, frame.id)]
        posting.start_soon(self._make, frame)

    async def _make(self, frame: Post) -> None:
        reply: Reply[PostMade] = Reply()
        command = MakePost(self.key, frame, reply)
        try:
            with answer_within(self._s.settings.request_timeout):
                shard = str(cell_of(frame.lat, frame.lon))
                made = await ask(self._s.directory, ActorKind.FEED, shard, command, reply)
        except RequestFailed as exc:
            for link, request in self._making.pop(frame.cid):
                tell_session(link, Refused(exc.code, exc.message, request, None))
            return
        self.posted[frame.cid] = made
        for link, request in self._making.pop(frame.cid):
            self._answer(made, frame.cid, link, request)

    def _answer(self, made: PostMade, cid: str, link: SessionLink, request: int) -> None:
        posted = Posted(id=request, post=made.post, cid=cid, ts=made.ts)
        answer_once_stored(made.ticket, link, posted)

    def _handle(self, command: ProfileCommand) -> None:
        assert self.profile is not None
        if type(command) is WatchProfile:
            self.subs[command.link.id] = command.link
            command.reply.set(self.profile)
        elif type(command) is ProfileRequest:
            self._change(command.link, command.frame)
        elif type(command) is BlockedBy:
            others = self.profile.blocked_by
            others = others | {command.other} if command.blocked else others - {command.other}
            if others != self.profile.blocked_by:
                self._tell(
                    FeedProfile(
                        follows=self.profile.follows,
                        interests=self.profile.interests,
                        blocked_by=others,
                    )
                )
        elif type(command) is Detach:
            self.subs.pop(command.link.id, None)
        elif type(command) is Moved:
            pass  # not claimed yet (no fence): nothing of ours to give up
        else:
            raise TypeError(f"profile got {command!r}")

    def _change(self, link: SessionLink, frame: Follow | Unfollow | Interests) -> None:
        assert self.profile is not None
        p = self.profile
        wb = self._s.write_behind
        if not wb.has_capacity():
            tell_session(link, Refused(ErrorCode.TRY_LATER, "storage is behind", frame.id, None))
            return
        now = self._s.now_ms()
        if type(frame) is Interests:
            categories = tuple(sorted(set(frame.interests)))
            record: FollowChanged | InterestsSet = InterestsSet(
                user=self.key, categories=categories, ts=now
            )
            new = FeedProfile(
                follows=p.follows, interests=frozenset(categories), blocked_by=p.blocked_by
            )
        else:
            assert type(frame) is Follow or type(frame) is Unfollow
            following = type(frame) is Follow
            author = frame.user
            limit = self._s.settings.max_follows
            if following and author not in p.follows and len(p.follows) >= limit:
                self._s.metrics.quota_refusals.labels(quota="follows").inc()
                tell_session(
                    link,
                    Refused(ErrorCode.QUOTA_EXCEEDED, f"at most {limit} follows", frame.id, None),
                )
                return
            follows = p.follows | {author} if following else p.follows - {author}
            if follows == p.follows:  # a retry: answered once what it repeats is stored
                answer_once_stored(self._last_ticket, link, Ok(id=frame.id))
                return
            record = FollowChanged(user=self.key, author=author, following=following, ts=now)
            new = FeedProfile(follows=follows, interests=p.interests, blocked_by=p.blocked_by)
        self._last_ticket = ticket = wb.enqueue(record, fence=self._fence)
        answer_once_stored(ticket, link, Ok(id=frame.id))
        self._tell(new)

    def _tell(self, profile: FeedProfile) -> None:
        self.profile = profile
        for link in self.subs.values():
            tell_session(link, ProfileChanged(profile))
