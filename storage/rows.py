"""Records as table rows and back, the same for every SQL backend: what each column
holds (CBOR for ``data`` and kv values) is decided once, here. Payloads are stored as
the bytes they arrived in and read back as ``Raw``: the server never decodes them."""

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs

from actors.feed_cells import CELLS
from protocol.cbor import Raw, raw_cbor
from protocol.frames import KvEntry, Message
from storage.store import (
    BlockChanged,
    FeedProfile,
    FollowChanged,
    InterestsSet,
    KvChange,
    LikeChanged,
    MemberChanged,
    PostCreated,
    PostDeleted,
    Record,
    ShardSnapshot,
    StoredPost,
)

MESSAGE_COLUMNS = "seq, ts, sender, cid, text, data"
KV_COLUMNS = "key, rev, hlc, dev, value, deleted, ts"
FEED_RECORDS = (PostCreated, PostDeleted, LikeChanged, FollowChanged, InterestsSet)
# A post's comments are the messages of its room: its highest seq counts them, found
# by the messages primary key (room, seq), one probe per post.
POST_READ = (
    "SELECT p.id, p.author, p.cid, p.ts, p.lat, p.lon, p.category, p.text, p.data,"
    " p.deleted_at, (SELECT coalesce(max(m.seq), 0) FROM messages m"
    " WHERE m.room = 'post:' || p.id) FROM posts p"
)


def message_of(room: str, row: Any) -> Message:
    seq, ts, sender, cid, text, data = row
    return Message(
        room=room,
        seq=seq,
        ts=ts,
        user=sender,
        cid=cid,
        text=text,
        data=None if data is None else Raw(bytes(data)),
    )


def message_row(m: Message) -> tuple[Any, ...]:
    data = None if m.data is None else raw_cbor(m.data)
    return (m.room, m.seq, m.ts, m.user, m.cid, m.text, data)


def kv_change_of(user: str, row: Any) -> KvChange:
    key, rev, hlc, dev, value, deleted, ts = row
    value = None if value is None or value == b"\xf6" else Raw(bytes(value))
    entry = KvEntry(key=key, rev=rev, hlc=hlc, dev=dev, value=value, deleted=bool(deleted))
    return KvChange(user=user, entry=entry, ts=ts)


def kv_rows(changes: Iterable[KvChange]) -> tuple[list[tuple[Any, ...]], dict[str, int]]:
    """Rows for the ``kv`` table, and the newest revision per user for ``kv_heads``."""
    heads: dict[str, int] = {}
    rows = []
    for c in changes:
        e = c.entry
        value = None if e.deleted else raw_cbor(e.value)
        rows.append((c.user, e.key, e.rev, e.hlc, e.dev, value, e.deleted, c.ts))
        heads[c.user] = max(heads.get(c.user, 0), e.rev)
    return rows, heads


def toggle_runs(
    records: Iterable[MemberChanged] | Iterable[BlockChanged],
) -> Iterator[tuple[bool, list[tuple[Any, ...]]]]:
    """Members added or removed, or blocks set or lifted, as runs of the same way in
    the order made (an add and a remove of one pair must not swap): ``(added, rows)``,
    where an added row ends with its time and a removed row is the pair alone."""
    changes = (
        (r.added, (r.room, r.user), r.ts)
        if isinstance(r, MemberChanged)
        else (r.blocked, (r.user, r.other), r.ts)
        for r in records
    )
    for added, run in itertools.groupby(changes, key=lambda c: c[0]):
        yield added, [(*pair, ts) if added else pair for _, pair, ts in run]


def feed_profile_of(rows: Iterable[tuple[int, str]]) -> FeedProfile:
    """A profile from ``(part, value)`` rows: part 0 a followed author, 1 an interest,
    2 a user who blocks the viewer."""
    parts: tuple[set[str], set[str], set[str]] = (set(), set(), set())
    for part, value in rows:
        parts[part].add(value)
    follows, interests, blocked_by = map(frozenset, parts)
    return FeedProfile(follows=follows, interests=interests, blocked_by=blocked_by)


def stored_post_of(row: Any, likers: Iterable[str]) -> StoredPost:
    """A ``POST_READ`` row as a post."""
    post, author, cid, ts, lat, lon, category, text, data, deleted_at, comments = row
    created = PostCreated(
        post=post,
        author=author,
        cid=cid,
        ts=ts,
        lat=lat,
        lon=lon,
        category=category,
        text=text,
        data=None if data is None else Raw(bytes(data)),
    )
    return StoredPost(
        created=created,
        likers=frozenset(likers),
        comments=comments,
        deleted=deleted_at is not None,
    )


def shard_snapshot(
    last_number: int | None, posts: Iterable[Any], likers: Mapping[int, Iterable[str]]
) -> ShardSnapshot:
    """``POST_READ`` rows with the likers of each post (those of other posts, deleted or
    older but numbered after the oldest loaded, are left out)."""
    return ShardSnapshot(
        last_number=last_number or 0,
        posts=tuple(stored_post_of(row, likers.get(row[0], ())) for row in posts),
    )


def likers_by_post(likes: Iterable[tuple[int, str]]) -> dict[int, list[str]]:
    likers: dict[int, list[str]] = {}
    for post, user in likes:
        likers.setdefault(post, []).append(user)
    return likers


@attrs.frozen
class FeedRows:
    """A batch's feed records as rows. Nothing else in a batch touches the feed tables,
    and each of them ends the same whatever order its rows go in, so each kind is
    written once per batch: each (post, user) like and (user, author) follow as its
    last change made, each user's interests as their last set."""

    posts: list[tuple[Any, ...]]  # (id, shard, author, cid, ts, lat, lon, category, text, data)
    numbers: list[tuple[int, int]]  # (shard, highest number in the batch)
    deleted: list[tuple[int, int]]  # (ts, post)
    likes: list[tuple[int, str, int, int]]  # (post, user, shard, ts)
    unlikes: list[tuple[int, str]]
    follows: list[tuple[str, str, int]]  # (user, author, ts)
    unfollows: list[tuple[str, str]]
    interests: dict[str, list[str]]  # user: categories


def feed_rows(records: Iterable[Record]) -> FeedRows:
    rows = FeedRows([], [], [], [], [], [], [], {})
    numbers: dict[int, int] = {}
    likes: dict[tuple[int, str], LikeChanged] = {}
    follows: dict[tuple[str, str], FollowChanged] = {}
    for r in records:
        if isinstance(r, PostCreated):
            number, shard = divmod(r.post, CELLS)
            data = None if r.data is None else raw_cbor(r.data)
            rows.posts.append(
                (r.post, shard, r.author, r.cid, r.ts, r.lat, r.lon, r.category, r.text, data)
            )
            numbers[shard] = max(numbers.get(shard, 0), number)
        elif isinstance(r, PostDeleted):
            rows.deleted.append((r.ts, r.post))
        elif isinstance(r, LikeChanged):
            likes[r.post, r.user] = r
        elif isinstance(r, FollowChanged):
            follows[r.user, r.author] = r
        elif isinstance(r, InterestsSet):
            rows.interests[r.user] = list(dict.fromkeys(r.categories))
    rows.numbers.extend(numbers.items())
    for like in likes.values():
        if like.liked:
            rows.likes.append((like.post, like.user, like.post % CELLS, like.ts))
        else:
            rows.unlikes.append((like.post, like.user))
    for f in follows.values():
        if f.following:
            rows.follows.append((f.user, f.author, f.ts))
        else:
            rows.unfollows.append((f.user, f.author))
    return rows
