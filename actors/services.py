"""What the node gives every actor: settings and shared services."""

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio

from actors.directory import ActorKind, Directory
from actors.kvmap import KvQuota
from actors.messages import refuse
from actors.metrics import Metrics
from actors.outbox import Pump
from actors.presence import PresenceBook
from actors.quotas import QuotaSettings, UserQuotas
from actors.room_lookup import RoomLookup
from actors.timers import Timers
from protocol.errors import ErrorCode
from protocol.hlc import Clock
from protocol.limits import Limits
from protocol.ranking import STEP_MS
from storage.bus import Bus
from storage.store import Claim, Fence, StorageError, Store
from storage.write_behind import WriteBehind


@attrs.frozen(kw_only=True)
class Settings:
    """Actor tunables; ``server.config`` fills them from flags and environment."""

    limits: Limits = attrs.field(factory=Limits)
    history_buffer: int = 256  # recent messages a room keeps in memory
    max_replay: int = 1000  # most messages a resume replays before it says "not recovered"
    large_room: int = 100  # above this many members, member events go to the member only
    actor_idle: float = 30.0  # an actor with nothing to do retires after this long
    durable_acks: bool = True  # sent-ack after commit (False: after sequencing, weaker)
    request_timeout: float = 10.0
    ping_interval: float = 25.0
    pong_timeout: float = 10.0
    hello_timeout: float = 10.0
    frame_timeout: float = 30.0  # a client frame, or fragmented message, arrives in full by then
    outbox_bytes: int = 4 * 2**20
    rate: float = 50.0  # inbound frames per second per session, sustained
    burst: int = 100
    error_budget: int = 20  # error frames a session may earn in a row before it is closed
    error_refill: float = 1.0  # error budget regained per second
    mailbox_size: int = 1024
    receipt_interval: float = 0.1  # a room announces receipts this often
    receipt_store_interval: float = 1.0  # and stores the cursors that moved this often
    typing_timeout: float = 6.0  # a typing start not refreshed in this long ends itself
    presence_grace: float = 5.0  # a user is announced offline this long after their last session
    max_watches: int = 100  # users one session may watch explicitly
    kv_quota: KvQuota = attrs.field(factory=KvQuota)
    feed_interval: float = 0.1  # a feed view sends at most one change this often
    feed_step_ms: int = STEP_MS  # the ranking instant advances in steps of this
    feed_horizon: float = 7 * 86400.0  # posts older than this leave the live shards
    max_follows: int = 5000  # authors one user may follow
    quotas: QuotaSettings = attrs.field(factory=QuotaSettings)


if TYPE_CHECKING:
    from actors.cluster import Cluster

T = TypeVar("T")
log = logging.getLogger(__name__)

# Clock skew allowed when a token is checked, and after its exp before its session ends.
TOKEN_LEEWAY = 30


@attrs.frozen
class Claims:
    """What a valid token says: who, and until when (Unix seconds; None: for ever)."""

    user: str
    exp: int | None


async def read_until_stored(what: str, read: Callable[[], Awaitable[T]]) -> T:
    """``read()`` from storage, retried with backoff while storage fails: an actor that
    starts cannot serve without what storage knows, and must not crash the node."""
    pause = 0.1
    while True:
        try:
            return await read()
        except StorageError as exc:
            log.warning("%s: storage failed (%s); retrying in %.1fs", what, exc, pause)
            await trio.sleep(pause)
            pause = min(5.0, pause * 2)


async def claim_fence(services: "Services", kind: str, key: str) -> tuple[Fence, Claim]:
    """Take actor ``(kind, key)``'s rows for this node (a cluster's): done before the
    actor reads them, so whatever a former owner stored is in what it reads, and
    whatever that owner still tries to store is refused. The fence wakes the actor
    (``Moved``) once another node takes them."""
    assert services.cluster is not None
    store, run = services.store, services.run
    claim = await read_until_stored(f"claim of {kind} {key!r}", lambda: store.claim(kind, key, run))
    moved = services.cluster.moved_later(kind, key)
    return Fence(kind, key, claim.token, on_stale=moved), claim


async def retire_refusing(
    services: "Services", kind: ActorKind, key: str, inbox: trio.MemoryReceiveChannel[Any]
) -> None:
    """Retire an actor another node runs now, refusing what is still sent to it."""
    while not services.directory.try_retire(kind, key):
        refuse(await inbox.receive(), ErrorCode.TRY_LATER, "moved to another node; retry")


def wall_ms() -> int:
    """Server timestamps: milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


@attrs.define(kw_only=True)
class Services:
    settings: Settings
    store: Store
    write_behind: WriteBehind
    directory: Directory
    bus: Bus
    metrics: Metrics
    run: int  # this node's run id, for crash detection (storage.store.Store.begin_run)
    verify_token: Callable[[str], Claims]  # raises ValueError for a bad token
    rooms: RoomLookup  # whether a room exists, without starting its actor
    quotas: UserQuotas
    now_ms: Callable[[], int] = wall_ms
    presence: PresenceBook = attrs.field(factory=PresenceBook)
    hlc: Clock = attrs.field(factory=Clock)  # the node's hybrid logical clock, for kv
    pump: Pump | None = None  # writes outboxes to sockets (actors.pump); None: writers do
    timers: Timers = attrs.field(factory=Timers)  # sessions' keep-alive; the node runs it
    cluster: "Cluster | None" = None  # in a cluster (Redis): how to reach other nodes
