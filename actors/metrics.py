"""Prometheus metrics of one node.

Each node owns its own ``CollectorRegistry``, so several nodes can live in one process
(the tests run many). Hot paths count once per event, never once per recipient:
fan-out adds the recipient count in one ``inc``. Label children are bound up front so
counting is a dict lookup, not a label resolution. Values that are state rather than
events (queue depths, live actors, outbox bytes) are read at scrape time.

Counters are ``Count``s, not prometheus_client's ``Counter``: that one takes a mutex on
every ``inc``, which was 6.5 % of the server's CPU in the 1:1 chat benchmark (BENCHMARKS.md).
Every count is bumped on the node's trio thread, so a plain integer is safe.
"""

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from protocol.errors import CloseCode, ErrorCode
from protocol.frames import CLIENT_FRAMES, SERVER_FRAMES, Frame

# The *_created series double the output and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Count:
    """One counter value, bumped without a lock (trio thread only)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class Counter(Collector):
    """A counter family exported like prometheus_client's ``Counter``: ``name`` ends in
    ``_total``; children by label values, made on first use."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self._name, self._doc, self._labelnames = name, documentation, tuple(labelnames)
        self._children: dict[tuple[str, ...], Count] = {}
        self._solo = Count()
        if not self._labelnames:
            self._children[()] = self._solo
        registry.register(self)

    def labels(self, **values: str) -> Count:
        key = tuple(values[n] for n in self._labelnames)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = Count()
        return child

    def inc(self, amount: int = 1) -> None:
        self._solo.value += amount

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        for key, child in self._children.items():
            family.add_metric(key, child.value)
        return [family]


def frame_name(cls: type[Frame]) -> str:
    return cls.__name__.lower()


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.connections = Gauge("parley_connections", "Open client connections", registry=r)
        self.sessions = Gauge("parley_sessions", "Authenticated sessions", registry=r)
        self.actor_crashes = Counter(
            "parley_actor_crashes_total", "Actor crashes (each was restarted)", ["kind"], registry=r
        )
        self.frames_in = Counter(
            "parley_frames_in_total", "Frames received from clients", ["type"], registry=r
        )
        self.frames_out = Counter(
            "parley_frames_out_total", "Frames queued to clients", ["type"], registry=r
        )
        self.deliveries = Counter(
            "parley_fanout_deliveries_total", "Room events appended to session outboxes", registry=r
        )
        self.messages = Counter("parley_messages_total", "Messages sequenced by rooms", registry=r)
        self.errors = Counter(
            "parley_errors_total", "Error frames sent, by code", ["code"], registry=r
        )
        self.closes = Counter(
            "parley_session_closes_total",
            "Sessions closed by the server, by close code",
            ["code"],
            registry=r,
        )
        self.presence_changes = Counter(
            "parley_presence_changes_total",
            "Presence changes published (each once, whatever the number of followers)",
            registry=r,
        )
        self.kv_writes = Counter(
            "parley_kv_writes_total",
            "KV writes by outcome (applied, resent, stale, conflict, quota, skew)",
            ["outcome"],
            registry=r,
        )
        self.kv_sync_pages = Counter(
            "parley_kv_sync_pages_total", "kvchanges pages answered", registry=r
        )
        self.kv_resets = Counter(
            "parley_kv_resets_total",
            "KV syncs answered with a full listing because the device was too far behind",
            registry=r,
        )
        self.connections_refused = Counter(
            "parley_connections_refused_total",
            "Client connections refused at accept: max_connections (503), per_address (429)",
            ["reason"],
            registry=r,
        )
        self.accept_errors = Counter(
            "parley_accept_errors_total",
            "Accepts that failed for want of descriptors or memory, by errno; each is "
            "retried after a backoff",
            ["errno"],
            registry=r,
        )
        self.room_lookups = Counter(
            "parley_room_lookups_total",
            "Rooms named by requests, found by: running actor, cached as missing, "
            "stored, or missing after a storage read",
            ["result"],
            registry=r,
        )
        self.quota_refusals = Counter(
            "parley_quota_refusals_total",
            "Requests refused by a quota (sessions_per_user, room_creations, rooms_per_minute, "
            "blocks, follows)",
            ["quota"],
            registry=r,
        )
        self.feed_posts = Counter("parley_feed_posts_total", "Feed posts made", registry=r)
        self.feed_likes = Counter(
            "parley_feed_likes_total", "Likes and unlikes that changed a count", registry=r
        )
        self.feed_dirty = Counter(
            "parley_feed_view_wakes_total",
            "Times a shard told a view to rank again (a post on its page fell or left)",
            registry=r,
        )
        self.feed_deltas = Counter(
            "parley_feed_deltas_total",
            "Risen posts' items a shard sent a view (at most one message per view per "
            "interval), instead of the view ranking again",
            registry=r,
        )
        self.feed_changes = Counter(
            "parley_feed_changes_total", "feedchanged events sent to views", registry=r
        )
        self.feed_examined = Histogram(
            "parley_feed_examined_posts",
            "Posts a shard scored to answer one view's top-k (the rest were pruned)",
            buckets=(10, 25, 50, 100, 250, 500, 1000, 2500, 10000, 100000),
            registry=r,
        )
        self.flush_seconds = Histogram(
            "parley_write_behind_flush_seconds",
            "Time to store one write-behind batch",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.frames_in_by = {c: self.frames_in.labels(type=frame_name(c)) for c in CLIENT_FRAMES}
        self.frames_out_by = {c: self.frames_out.labels(type=frame_name(c)) for c in SERVER_FRAMES}
        self.errors_by = {c: self.errors.labels(code=str(int(c))) for c in ErrorCode}
        self.closes_by = {c: self.closes.labels(code=str(int(c))) for c in CloseCode}
        outcomes = ("applied", "resent", "stale", "conflict", "quota", "skew")
        self.kv_writes_by = {o: self.kv_writes.labels(outcome=o) for o in outcomes}
        reasons = ("max_connections", "per_address")
        self.refused_by = {r: self.connections_refused.labels(reason=r) for r in reasons}

    def collect_at_scrape(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Add metrics read from live state when Prometheus scrapes (queue depths...)."""

        class _Collector(Collector):
            def collect(self) -> Iterable[Metric]:
                return collect()

        self.registry.register(_Collector())
