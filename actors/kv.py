"""The KV actor: one per user whose key-value map is in use, on this node.

It owns the user's map (``actors.kvmap``): it applies each ``kvput`` in order, stores
the applied changes write-behind and, once they are committed, acks the writer and
pushes the changes to the user's other sessions that have synced. Answers to
``kvsync`` wait for the same commit, so no client ever sees a revision that a crash
could take back. It retires once no session follows it and everything is stored.
"""

import math

import attrs
import trio

from actors.directory import ActorKind
from actors.kvmap import KvMap
from actors.messages import (
    ActorMoved,
    Detach,
    KvCommand,
    KvRequest,
    Moved,
    Refused,
    SessionLink,
    refuse_if_moved,
    tell_session,
)
from actors.services import Services, claim_fence, read_until_stored, retire_refusing
from protocol.codec import encode
from protocol.errors import ErrorCode
from protocol.frames import Frame, KvAck, KvChanged, KvPut, KvResult, KvSync
from protocol.limits import KV_PAGE
from protocol.wsframe import server_frame
from storage.store import Fence
from storage.write_behind import COMMITTED, Ticket

COMPACT_EVERY = 60.0  # seconds between checks for expired deletions
PAGE_BYTES = 256 * 1024  # values in one kvchanges page, and current values in one kvack
_OUTCOMES: dict[int | None, str] = {
    None: "applied",
    ErrorCode.KV_STALE: "stale",
    ErrorCode.KV_CONFLICT: "conflict",
    ErrorCode.KV_QUOTA: "quota",
    ErrorCode.CLOCK_SKEW: "skew",
}


class Kv:
    def __init__(self, key: str, services: Services, predecessor: "Kv | None") -> None:
        self.key = key
        self._s = services
        self.map: KvMap | None = None
        self.subs: dict[str, SessionLink] = {}  # sessions that get changes live
        self._last_ticket: Ticket = COMMITTED
        self._compacted_at = -math.inf
        self._fence: Fence | None = None  # in a cluster, the claim on the user's kv rows
        if predecessor is not None:
            # What the crashed actor applied may still be queued, not stored: reloading
            # from storage would give its revisions out a second time.
            self.map = predecessor.map
            self.subs = predecessor.subs
            self._last_ticket = predecessor._last_ticket
            self._fence = predecessor._fence

    async def run(self, inbox: trio.MemoryReceiveChannel[KvCommand]) -> None:
        if self.map is None:
            store = self._s.store
            if self._s.cluster is not None:
                # A former owner's writes would reuse revisions: refused from now on.
                self._fence, _ = await claim_fence(self._s, "kv", self.key)
            snapshot = await read_until_stored(f"kv {self.key!r}", lambda: store.load_kv(self.key))
            self.map = KvMap(self.key, snapshot, self._s.settings.kv_quota)
        self._compact()
        idle = self._s.settings.actor_idle
        while True:
            command: KvCommand | None = None
            with trio.move_on_after(idle) as waiting:
                command = await inbox.receive()
            fence = self._fence
            if fence is not None and (fence.stale or type(command) is Moved):
                return await self._step_down(inbox)
            if not waiting.cancelled_caught:
                assert command is not None
                self._handle(command)
                continue
            # A session that could not say goodbye leaves a closed outbox behind.
            for sid in [k for k, v in self.subs.items() if v.outbox.closed]:
                del self.subs[sid]
            self._compact()
            if (
                not self.subs
                and self._last_ticket.committed
                and self._s.directory.try_retire(ActorKind.KV, self.key)
            ):
                return

    async def _step_down(self, inbox: trio.MemoryReceiveChannel[KvCommand]) -> None:
        """Another node runs this map now: its sessions resume there."""
        for link in self.subs.values():
            tell_session(link, ActorMoved("kv", self.key))
        self.subs.clear()
        await retire_refusing(self._s, ActorKind.KV, self.key, inbox)

    def _handle(self, command: KvCommand) -> None:
        if type(command) is KvRequest:
            if type(command.frame) is KvPut:
                self._put(command.link, command.frame)
            else:
                assert type(command.frame) is KvSync
                self._sync(command.link, command.frame)
        elif type(command) is Detach:
            self.subs.pop(command.link.id, None)
        elif type(command) is Moved:
            pass  # not claimed yet (no fence): nothing of ours to give up
        else:
            raise TypeError(f"kv got {command!r}")

    def _put(self, link: SessionLink, put: KvPut) -> None:
        assert self.map is not None
        wb = self._s.write_behind
        if not wb.has_capacity():  # through the session, as every refusal
            tell_session(link, Refused(ErrorCode.TRY_LATER, "storage is behind", put.id, None))
            return
        now = self._s.now_ms()
        results: list[KvResult] = []
        applied = []
        shown = 0  # bytes of current values put in the ack
        counts = self._s.metrics.kv_writes_by
        for write in put.items:
            result, change = self.map.write(put.dev, write, now)
            if change is not None:
                applied.append(change.entry)
                size = 64 + self.map.size_of(write.key)
                self._last_ticket = wb.enqueue(change, size, self._fence)
            elif result.hlc is not None:  # stale or conflict, showing the current entry
                shown += self.map.size_of(write.key)
                if shown > PAGE_BYTES:  # the client learns the rest with kvsync
                    result = attrs.evolve(result, hlc=None, dev=None, value=None, deleted=False)
            resent = change is None and result.code is None
            counts["resent" if resent else _OUTCOMES[result.code]].inc()
            results.append(result)
        clock = self._s.hlc
        if applied:
            clock.observe(max(entry.hlc for entry in applied))
        # The map's revision is a sync position only for a session that gets every
        # change (it has synced); to any other it would skip changes it never saw.
        rev = self.map.rev if link.id in self.subs else 0
        ack = KvAck(id=put.id, hlc=clock.now(now), rev=rev, items=tuple(results))
        changed = KvChanged(rev=self.map.rev, items=tuple(applied)) if applied else None
        self._compact()
        self._last_ticket.then(self._answer_put, (link, ack, changed))
        refuse_if_moved(self._last_ticket, link, put.id)

    def _answer_put(self, answer: tuple[SessionLink, KvAck, KvChanged | None]) -> None:
        link, ack, changed = answer
        self._send(link, ack)
        if changed is None:
            return
        others = [s for s in self.subs.values() if s.id != link.id]
        if others:
            data = server_frame(encode(changed))  # once, for every session
            for session in others:
                session.outbox.append(data)
            self._s.metrics.frames_out_by[KvChanged].inc(len(others))

    def _sync(self, link: SessionLink, sync: KvSync) -> None:
        assert self.map is not None
        self.subs[link.id] = link
        page = self.map.answer(sync, KV_PAGE, PAGE_BYTES)
        self._s.metrics.kv_sync_pages.inc()
        if page.reset and sync.after:
            self._s.metrics.kv_resets.inc()
        self._last_ticket.then(self._send_to, (link, page))

    def _compact(self) -> None:
        assert self.map is not None
        now = trio.current_time()
        if now < self._compacted_at + COMPACT_EVERY:
            return  # a scan of the whole map: not at every write
        self._compacted_at = now
        record = self.map.compact(self._s.now_ms())
        if record is not None:
            self._last_ticket = self._s.write_behind.enqueue(record, fence=self._fence)

    def _send_to(self, answer: tuple[SessionLink, Frame]) -> None:
        self._send(*answer)

    def _send(self, link: SessionLink, frame: Frame) -> None:
        link.outbox.append(server_frame(encode(frame)))
        self._s.metrics.frames_out_by[type(frame)].inc()
