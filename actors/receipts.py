"""Receipt cursors of one room: who has received and read up to which seq.

How this works: each member has a cursor (delivered, read), each a monotonic maximum;
a read implies a delivery. The Room actor feeds receipts in with ``mark``, and once per
receipt interval takes what changed: the cursors to announce (``take_changes``) and the
records to store (``take_unsaved``), so a burst of receipts costs one event and one
upsert per member per interval, whatever the number of receipts. Counts per message
(how many members have read seq N) come from the sorted cursors, never from history.

Pure: no I/O and no clock, so it is tested on its own.
"""

import bisect
from collections.abc import Iterable

import attrs

from protocol.frames import Cursor, SeqCount
from storage.store import ReceiptUpsert


@attrs.frozen
class Changes:
    """What changed since the last announcement."""

    cursors: tuple[Cursor, ...]  # sorted by user
    lo: int  # the seqs whose counts changed: lo..hi
    hi: int


class RoomReceipts:
    def __init__(self, room: str, cursors: Iterable[tuple[str, int, int]] = ()) -> None:
        self.room = room
        self._cursors: dict[str, list[int]] = {u: [d, r] for u, d, r in cursors}
        self._changed: set[str] = set()
        self._unsaved: set[str] = set()
        self._lo = 0  # 0: no count changed
        self._hi = 0
        self._sorted: tuple[list[int], list[int]] | None = None
        self.version = 0  # changes whenever a cursor does

    def cursor(self, user: str) -> tuple[int, int]:
        c = self._cursors.get(user)
        return (0, 0) if c is None else (c[0], c[1])

    def mark(self, user: str, delivered: int | None, read: int | None, head: int) -> bool:
        """Raise ``user``'s cursor; values above ``head`` count as ``head``. True if it
        moved: a lower or repeated value is a no-op."""
        new_read = min(read or 0, head)
        new_delivered = max(min(delivered or 0, head), new_read)
        c = self._cursors.get(user)
        if c is None:
            if not new_delivered:
                return False
            c = self._cursors[user] = [0, 0]
        old_delivered, old_read = c
        if new_delivered <= old_delivered and new_read <= old_read:
            return False
        lo = min(
            old_delivered + 1 if new_delivered > old_delivered else head,
            old_read + 1 if new_read > old_read else head,
        )
        c[0] = max(old_delivered, new_delivered)
        c[1] = max(old_read, new_read)
        self._lo = lo if not self._lo else min(self._lo, lo)
        self._hi = max(self._hi, c[0])
        self._changed.add(user)
        self._unsaved.add(user)
        self._sorted = None
        self.version += 1
        return True

    def forget(self, user: str) -> None:
        """``user`` is no longer a member: their cursor stops counting."""
        if self._cursors.pop(user, None) is not None:
            self._changed.discard(user)
            self._unsaved.discard(user)
            self._sorted = None
            self.version += 1

    @property
    def changed(self) -> bool:
        return bool(self._changed)

    @property
    def unsaved(self) -> bool:
        return bool(self._unsaved)

    def take_changes(self) -> Changes | None:
        """The cursors that moved since the last call, and the seqs whose counts did."""
        if not self._changed:
            return None
        cursors = tuple(self._item(u) for u in sorted(self._changed))
        changes = Changes(cursors, self._lo, self._hi)
        self._changed = set()
        self._lo = self._hi = 0
        return changes

    def take_unsaved(self) -> list[ReceiptUpsert]:
        records = [
            ReceiptUpsert(room=self.room, user=u, delivered=c[0], read=c[1])
            for u in sorted(self._unsaved)
            for c in (self._cursors[u],)
        ]
        self._unsaved = set()
        return records

    def all(self) -> tuple[Cursor, ...]:
        """Every cursor that has moved, sorted by user."""
        return tuple(self._item(u) for u in sorted(self._cursors))

    def who(self, members: Iterable[str], seq: int | None, limit: int) -> tuple[list[Cursor], bool]:
        """Cursors of the ``members`` who have received ``seq`` (all of them, zeros
        included, if ``seq`` is None), sorted by user, at most ``limit``."""
        found = []
        for user in sorted(members):
            d, r = self.cursor(user)
            if seq is None or d >= seq:
                found.append(Cursor(user=user, delivered=d, read=r))
                if len(found) > limit:
                    return found[:limit], True
        return found, False

    def counts(self, lo: int, hi: int) -> tuple[SeqCount, ...]:
        """For each seq in ``lo..hi``: how many members have received it and read it."""
        if self._sorted is None:
            values = self._cursors.values()
            self._sorted = (sorted(c[0] for c in values), sorted(c[1] for c in values))
        delivered, read = self._sorted
        n = len(delivered)
        return tuple(
            SeqCount(
                seq=s,
                delivered=n - bisect.bisect_left(delivered, s),
                read=n - bisect.bisect_left(read, s),
            )
            for s in range(max(1, lo), hi + 1)
        )

    def _item(self, user: str) -> Cursor:
        d, r = self._cursors[user]
        return Cursor(user=user, delivered=d, read=r)
