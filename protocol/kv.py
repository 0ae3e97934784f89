"""A device's replica of its user's key-value map: the client half of kv sync, sans-IO.

    replica = KvReplica("phone-1")
    put = replica.put_frame(request_id, [replica.set("theme", "dark", wall_ms)])
    ... send it; on its ``kvack``:   replica.on_ack(put, ack)
    sync = replica.sync_frame(request_id); on each ``kvchanges``: replica.on_changes(page),
    and ask again with ``replica.sync_frame`` while ``page.more``
    on each ``kvchanged`` event:     replica.on_changed(event)

The replica applies an entry only if its revision is above the one it holds for that
key, so pages, live events and acks may overlap in any order and it still ends where
the server is. Its clock observes every timestamp it receives, so a write made after
seeing another one always wins over it.
"""

from collections.abc import Iterable

import attrs

from protocol.frames import KvAck, KvChanged, KvChanges, KvEntry, KvPut, KvResult, KvSync, KvWrite
from protocol.hlc import Clock


class KvReplica:
    def __init__(self, dev: str) -> None:
        self.dev = dev
        self.clock = Clock()
        self.entries: dict[str, KvEntry] = {}  # as the server has them, deletions included
        self.rev = 0  # synced up to this revision: what the next sync asks after
        self.pending: dict[str, KvWrite] = {}  # written here, not acknowledged yet
        self._paging: int | None = None  # while a sync runs: the last revision received
        self._listing: int | None = None  # during a full listing: the revision it began at

    # --- local writes -------------------------------------------------------------------

    def set(self, key: str, value: object, wall_ms: int, *, expect: int | None = None) -> KvWrite:
        return self._write(
            KvWrite(key=key, hlc=self.clock.now(wall_ms), value=value, expect=expect)
        )

    def delete(self, key: str, wall_ms: int, *, expect: int | None = None) -> KvWrite:
        hlc = self.clock.now(wall_ms)
        return self._write(KvWrite(key=key, hlc=hlc, deleted=True, expect=expect))

    def _write(self, write: KvWrite) -> KvWrite:
        self.pending[write.key] = write
        return write

    def put_frame(self, request_id: int, writes: Iterable[KvWrite] | None = None) -> KvPut:
        """A ``kvput`` of ``writes``, or of every pending write (an offline queue)."""
        items = tuple(self.pending.values() if writes is None else writes)
        return KvPut(id=request_id, dev=self.dev, items=items)

    def on_ack(self, put: KvPut, ack: KvAck) -> list[KvResult]:
        """Take in the answer to ``put``; the results that were refused or lost."""
        self.clock.observe(ack.hlc)
        lost = []
        for write, result in zip(put.items, ack.items, strict=True):
            if self.pending.get(write.key) is write:
                del self.pending[write.key]
            if result.code is None:
                fields = attrs.asdict(write, recurse=False, filter=lambda a, _: a.name != "expect")
                self._apply(KvEntry(rev=result.rev, dev=self.dev, **fields))
                continue
            lost.append(result)
            current = entry_of(result)
            if current is not None:
                self._apply(current)
        self._advance(ack.rev)
        return lost

    # --- sync ---------------------------------------------------------------------------

    def sync_frame(self, request_id: int, limit: int | None = None) -> KvSync:
        """The next ``kvsync``: from where the replica is, or where the last page ended."""
        if self._paging is None:
            return KvSync(id=request_id, after=self.rev, limit=limit)
        full = self._listing is not None
        return KvSync(id=request_id, after=self._paging, limit=limit, reset=full, rev=self._listing)

    def on_changes(self, page: KvChanges) -> None:
        if page.reset:
            self.entries.clear()  # what it had is older than what the server remembers
            self._listing = page.rev
        for entry in page.items:
            self._apply(entry)
            self.clock.observe(entry.hlc)
        if page.more:
            self._paging = page.items[-1].rev
            return
        self._paging = None
        self._listing = None
        self.rev = page.rev

    def on_changed(self, event: KvChanged) -> None:
        for entry in event.items:
            self._apply(entry)
            self.clock.observe(entry.hlc)
        self._advance(event.rev)

    def _advance(self, rev: int) -> None:
        # A session that has synced gets every change in revision order (an event, or an
        # ack for its own), so the latest revision it got is how far it is synced. The
        # server sends 0 to a session that has not synced on this connection.
        if rev and self._paging is None:
            self.rev = max(self.rev, rev)

    def _apply(self, entry: KvEntry) -> None:
        held = self.entries.get(entry.key)
        if held is None or entry.rev > held.rev:
            self.entries[entry.key] = entry

    # --- reading ------------------------------------------------------------------------

    def values(self) -> dict[str, object]:
        """The map as this device sees it: the server's entries, then its pending writes."""
        out = {k: e.value for k, e in self.entries.items() if not e.deleted}
        for key, write in self.pending.items():
            if write.deleted:
                out.pop(key, None)
            else:
                out[key] = write.value
        return out

    def synced(self) -> dict[str, KvEntry]:
        """The live entries as the server has them (pending writes left out)."""
        return {k: e for k, e in self.entries.items() if not e.deleted}


def entry_of(result: KvResult) -> KvEntry | None:
    """The current entry a stale or conflicting result carries, if it carries one."""
    if result.hlc is None or result.dev is None:
        return None
    return KvEntry(**attrs.asdict(result, filter=lambda a, _: a.name not in ("code", "msg")))
