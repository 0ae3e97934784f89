"""One user's key-value map, as the KV actor keeps it: the rules, without the actor.

Last writer wins per key, ordered by ``(hlc, dev)``, so every device resolves two
concurrent writes the same way whatever order they reach the server in. Each applied
write gets the next revision of the map. Deletions stay as tombstones, so that a
device syncing later learns of them, until compaction forgets the old ones; a device
whose sync position is older than the newest forgotten deletion must start over.

How this works: ``_entries`` is kept in revision order (a rewritten key moves to the
end), so "changes since revision R" is read from the end backwards.
"""

from collections.abc import Iterator

import attrs

from protocol.cbor import raw_cbor
from protocol.errors import ErrorCode
from protocol.frames import KvChanges, KvEntry, KvResult, KvSync, KvWrite
from protocol.hlc import physical_ms
from storage.store import KvChange, KvCompacted, KvSnapshot


@attrs.frozen(kw_only=True)
class KvQuota:
    max_keys: int = 10_000  # live keys per user
    max_bytes: int = 4 * 2**20  # UTF-8 key bytes plus CBOR value bytes of live keys
    max_skew_ms: int = 60_000  # how far a write's clock may run ahead of the server's
    tombstone_ttl_ms: int = 30 * 86_400_000  # deletions are remembered this long
    max_tombstones: int = 10_000  # and at most this many, but for the young ones:
    min_tombstone_age_ms: int = 600_000  # a sync listing in progress must see these


class KvMap:
    def __init__(self, user: str, snapshot: KvSnapshot, quota: KvQuota) -> None:
        self.user = user
        self.quota = quota
        self.rev = snapshot.rev
        self.floor = snapshot.floor
        # The greatest write among the forgotten deletions: a write to a key with no
        # entry must beat it, or an old write would bring a deleted key back.
        self.floor_write = (snapshot.floor_hlc, snapshot.floor_dev)
        self._entries: dict[str, KvChange] = {}
        self._sizes: dict[str, int] = {}
        self.bytes = 0
        self.tombstones = 0
        for change in snapshot.entries:  # in revision order
            self._put(change)

    @property
    def keys(self) -> int:
        return len(self._entries) - self.tombstones

    def write(self, dev: str, w: KvWrite, now_ms: int) -> tuple[KvResult, KvChange | None]:
        """Apply ``w`` from device ``dev`` if it wins; the result, and what to store."""
        old = self._entries.get(w.key)
        cur = None if old is None else old.entry
        if cur is not None and cur.hlc == w.hlc and cur.dev == dev:
            return KvResult(key=w.key, rev=cur.rev), None  # a resend of the stored write
        if physical_ms(w.hlc) > now_ms + self.quota.max_skew_ms:
            return _refused(w.key, ErrorCode.CLOCK_SKEW, "the write's clock is ahead of ours"), None
        if w.expect is not None and w.expect != (0 if cur is None or cur.deleted else cur.rev):
            return _current(w.key, ErrorCode.KV_CONFLICT, cur), None
        if cur is not None and (w.hlc, dev) < (cur.hlc, cur.dev):
            return _current(w.key, ErrorCode.KV_STALE, cur), None
        if cur is None and (w.hlc, dev) <= self.floor_write:
            return _current(w.key, ErrorCode.KV_STALE, None), None
        size = 0 if w.deleted else len(w.key.encode()) + len(raw_cbor(w.value))
        if not w.deleted:
            keys = self.keys + (cur is None or cur.deleted)
            total = self.bytes - self._sizes.get(w.key, 0) + size
            if keys > self.quota.max_keys:
                return _refused(w.key, ErrorCode.KV_QUOTA, f"over {self.quota.max_keys} keys"), None
            if total > self.quota.max_bytes:
                message = f"over {self.quota.max_bytes} bytes"
                return _refused(w.key, ErrorCode.KV_QUOTA, message), None
        self.rev += 1
        entry = KvEntry(
            key=w.key, rev=self.rev, hlc=w.hlc, dev=dev, value=w.value, deleted=w.deleted
        )
        change = KvChange(user=self.user, entry=entry, ts=now_ms)
        self._put(change, size)
        return KvResult(key=w.key, rev=self.rev), change

    def resets(self, after: int) -> bool:
        """Whether a device synced up to ``after`` must start over: deletions it has not
        seen are forgotten, or it has revisions this map never gave out (lost storage)."""
        return after > self.rev or 0 < after < self.floor

    def answer(self, sync: KvSync, limit: int, max_bytes: int) -> KvChanges:
        """The page that answers ``sync``."""
        if sync.reset:
            # The next page of a full listing: it starts over if a deletion it may not
            # have listed was forgotten since it began (a key of an earlier page).
            restart = sync.rev is None or self.floor > sync.rev or sync.after > self.rev
        else:
            restart = sync.after == 0 or self.resets(sync.after)
        after = 0 if restart else sync.after
        # From 0 there is nothing to delete; past that, a key listed in an earlier page
        # may have been deleted since.
        items, more = self.changes(
            after, sync.limit or limit, max_bytes=max_bytes, deletions=after > 0
        )
        return KvChanges(id=sync.id, rev=self.rev, items=tuple(items), more=more, reset=restart)

    def size_of(self, key: str) -> int:
        """Bytes ``key`` counts against the quota (0 if deleted or absent)."""
        return self._sizes.get(key, 0)

    def changes(
        self, after: int, limit: int, *, max_bytes: int, deletions: bool
    ) -> tuple[list[KvEntry], bool]:
        """Entries with a revision above ``after``, oldest first: at most ``limit`` of
        them, holding at most ``max_bytes`` (but at least one); and whether more follow."""
        newer = []
        for change in self._newest_first():
            if change.entry.rev <= after:
                break
            if deletions or not change.entry.deleted:
                newer.append(change.entry)
        page: list[KvEntry] = []
        size = 0
        for entry in reversed(newer):
            size += self._sizes.get(entry.key, 0)
            if len(page) == limit or (page and size > max_bytes):
                break
            page.append(entry)
        return page, len(page) < len(newer)

    def compact(self, now_ms: int) -> KvCompacted | None:
        """Forget the deletions past their time, and the oldest beyond the cap (down to
        3/4 of it) once they are old enough."""
        q = self.quota
        excess = self.tombstones - q.max_tombstones
        if excess > 0:
            excess = self.tombstones - q.max_tombstones * 3 // 4
        expired = now_ms - q.tombstone_ttl_ms
        old = now_ms - q.min_tombstone_age_ms
        floor = None
        for change in list(self._entries.values()):
            entry = change.entry
            if not entry.deleted:
                continue
            if change.ts >= expired and (excess <= 0 or change.ts > old):
                break  # every deletion up to ``floor`` is gone, and only those
            del self._entries[entry.key]
            self.tombstones -= 1
            excess -= 1
            floor = entry.rev
            self.floor_write = max(self.floor_write, (entry.hlc, entry.dev))
        if floor is None:
            return None
        self.floor = floor
        hlc, dev = self.floor_write
        return KvCompacted(user=self.user, floor=floor, floor_hlc=hlc, floor_dev=dev)

    def _put(self, change: KvChange, size: int | None = None) -> None:
        key = change.entry.key
        old = self._entries.pop(key, None)  # re-inserted at the end: revision order
        if old is not None and old.entry.deleted:
            self.tombstones -= 1
        self.bytes -= self._sizes.pop(key, 0)
        self._entries[key] = change
        if change.entry.deleted:
            self.tombstones += 1
            return
        if size is None:
            size = len(key.encode()) + len(raw_cbor(change.entry.value))
        self._sizes[key] = size
        self.bytes += size

    def _newest_first(self) -> Iterator[KvChange]:
        return reversed(self._entries.values())


def _refused(key: str, code: ErrorCode, message: str) -> KvResult:
    return KvResult(key=key, code=code, msg=message)


def _current(key: str, code: ErrorCode, cur: KvEntry | None) -> KvResult:
    if cur is None:
        return KvResult(key=key, code=code)
    return KvResult(
        key=key,
        code=code,
        rev=cur.rev,
        hlc=cur.hlc,
        dev=cur.dev,
        value=cur.value,
        deleted=cur.deleted,
    )
