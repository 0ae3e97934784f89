"""What the node gives every actor: settings and shared services."""

import time
from collections.abc import Callable

import attrs

from actors.directory import Directory
from actors.metrics import Metrics
from protocol.limits import Limits
from storage.bus import Bus
from storage.store import Store
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
    outbox_bytes: int = 4 * 2**20
    rate: float = 50.0  # inbound frames per second per session, sustained
    burst: int = 100
    error_budget: int = 20  # error frames a session may earn in a row before it is closed
    error_refill: float = 1.0  # error budget regained per second
    mailbox_size: int = 1024


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
    verify_token: Callable[[str], str]  # token -> user id, or raises ValueError
    now_ms: Callable[[], int] = wall_ms
