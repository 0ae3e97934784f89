"""Records as table rows and back, the same for every SQL backend: what each column
holds (CBOR for ``data`` and kv values) is decided once, here. Payloads are stored as
the bytes they arrived in and read back as ``Raw``: the server never decodes them."""

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from protocol.cbor import Raw, raw_cbor
from protocol.frames import KvEntry, Message
from storage.store import BlockChanged, KvChange, MemberChanged

MESSAGE_COLUMNS = "seq, ts, sender, cid, text, data"
KV_COLUMNS = "key, rev, hlc, dev, value, deleted, ts"


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
