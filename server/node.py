"""One Parley node: storage, the write-behind queue, the actors, the two listeners.

Nursery tree (ARCHITECTURE.md draws it)::

    serve
    └── open_node: store (migrated), run record
        ├── write-behind flusher
        ├── storage probe
        ├── actor directory: Room and User actors
        ├── ops HTTP (hypercorn + quart-trio)
        ├── connections: one task tree per client (reader, writer, session)
        └── client listener (accept loop)

Shutdown is a drain, then cancellation: stop accepting, send ``goaway``, store what
is queued (releasing the sent-acks), close every session with 1001, wait for them up
to the deadline, then cancel the rest. A run that stored everything is recorded as a
clean stop; otherwise the next start gives its rooms new epochs.
"""

import logging
import os
import re
import resource
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import attrs
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from actors.cluster import Cluster
from actors.cluster_presence import ClusterPresence
from actors.directory import ActorKind, Directory
from actors.feed_shard import FeedShard
from actors.feed_view import FeedViews
from actors.kv import Kv
from actors.messages import FlushState, Reply, RequestFailed, deliver
from actors.metrics import Metrics
from actors.placement import Placement
from actors.profile import Profile
from actors.pump import WritePump
from actors.quotas import UserQuotas
from actors.remote import Placed
from actors.room import Room
from actors.room_lookup import RoomLookup
from actors.services import Claims, Services
from actors.timers import Timers
from actors.user import User
from protocol.errors import CloseCode
from server import collector
from server.config import Config
from server.connection import CLOSE_TIMEOUT, Admission, Connection
from storage.bus import InProcessBus
from storage.redis_bus import RedisBus
from storage.redis_conn import Redis, Subscriber, open_redis
from storage.store import StorageError, Store, open_store
from storage.write_behind import WriteBehind

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 2.0
FILES_BESIDES_CLIENTS = 1000  # storage, ops, logs, listeners, sockets being refused
GOAWAY_DELAY_MS = 1000


@attrs.frozen
class Readiness:
    status: str  # OK, Degraded or Failed
    reasons: tuple[str, ...]
    checks: dict[str, object]

    @property
    def http_status(self) -> int:
        return 503 if self.status == "Failed" else 200


@attrs.define
class Node:
    config: Config
    services: Services
    store: Store
    connections: set[Connection] = attrs.field(factory=set)
    draining: bool = False
    deadline: float | None = None  # when a drain must be over, flush included
    storage_error: str | None = None  # from the periodic probe
    admin_token: str | None = None
    placement: Placement | None = None
    admission: Admission = attrs.field(
        default=attrs.Factory(
            lambda self: Admission(
                self.config.max_connections, self.config.max_connections_per_address
            ),
            takes_self=True,
        )
    )

    @property
    def write_behind(self) -> WriteBehind:
        return self.services.write_behind

    @property
    def directory(self) -> Directory:
        return self.services.directory

    def readiness(self) -> Readiness:
        reasons: list[str] = []
        degraded = failed = False
        wb = self.write_behind.statistics()
        fill = self.write_behind.fill_ratio()
        if self.draining:
            failed = True
            reasons.append("draining: the node is shutting down")
        if wb.failing_since is not None:
            degraded = True
            for_s = trio.current_time() - wb.failing_since
            reasons.append(f"storage: writes failing for {for_s:.0f}s ({wb.last_error})")
        elif self.storage_error is not None:
            degraded = True
            reasons.append(f"storage: {self.storage_error}")
        admission = self.admission
        if admission.open >= admission.max_total:
            failed = True
            reasons.append(
                f"connections: {admission.open} open, the most --max-connections allows; "
                "new ones are refused"
            )
        if fill >= 1.0:
            failed = True
            reasons.append("write-behind: queue full, sends are refused")
        elif fill >= 0.5:
            degraded = True
            reasons.append(f"write-behind: backlog at {fill:.0%} of capacity")
        bus_error = self._bus_error()
        if bus_error is not None:
            degraded = True
            reasons.append(f"bus: {bus_error}")
        status = "Failed" if failed else "Degraded" if degraded else "OK"
        checks: dict[str, object] = {
            "storage": {
                "ok": wb.failing_since is None and self.storage_error is None,
                "error": wb.last_error or self.storage_error,
            },
            "write_behind": {
                "depth": wb.depth,
                "bytes": wb.bytes,
                "max_records": wb.max_records,
                "max_bytes": wb.max_bytes,
            },
            "bus": self._bus_check(),
            "draining": self.draining,
            "connections": {"open": admission.open, "max": admission.max_total},
        }
        return Readiness(status, tuple(reasons), checks)

    def _bus_error(self) -> str | None:
        cluster = self.services.cluster
        if cluster is None:
            return None
        if not cluster.redis.connected:
            return f"Redis unreachable ({cluster.redis.error}); sends to other nodes refused"
        if not cluster.subscriber.resynced:
            # Deaf to other nodes' events until every channel is back and its relays
            # have sent their sessions to resume.
            return "Redis pub/sub reconnecting; events from other nodes may be missed"
        if cluster.placement.error is not None:
            return cluster.placement.error
        return None

    def _bus_check(self) -> dict[str, object]:
        cluster = self.services.cluster
        if cluster is None:
            return {"ok": True, "kind": "in-process"}
        error = self._bus_error()
        return {"ok": error is None, "kind": "redis", "node": cluster.node, "error": error}

    def stats(self) -> dict[str, object]:
        users = list(self.directory.actors(ActorKind.USER))
        wb = self.write_behind.statistics()
        return {
            "connections": len(self.connections),
            "sessions": sum(1 for c in self.connections if c.session.user is not None),
            "users_online": sum(1 for u in users if u.sessions),
            "presence_online": len(self.services.presence),
            "actors": {str(kind): self.directory.count(kind) for kind in ActorKind},
            "write_behind": attrs.asdict(wb),
            "draining": self.draining,
        }

    def collect_metrics(self) -> Iterable[Metric]:
        actors = GaugeMetricFamily("parley_actors", "Live actors by kind", labels=["kind"])
        for kind in ActorKind:
            actors.add_metric([str(kind)], self.directory.count(kind))
        yield actors
        cluster = self.services.cluster
        if cluster is not None:
            yield from _cluster_metrics(cluster)
        yield from _feed_metrics(self.directory)
        yield GaugeMetricFamily(
            "parley_client_sockets",
            "Client sockets open, handshakes included: what --max-connections bounds",
            value=self.admission.open,
        )
        yield GaugeMetricFamily(
            "parley_unknown_rooms_cached",
            "Room ids remembered as not existing (the room lookup's negative cache)",
            value=len(self.services.rooms),
        )
        yield GaugeMetricFamily(
            "parley_outbox_bytes",
            "Bytes waiting in session outboxes",
            value=sum(c.outbox.nbytes for c in self.connections),
        )
        wb = self.write_behind.statistics()
        yield GaugeMetricFamily(
            "parley_write_behind_depth", "Records waiting to be stored", value=wb.depth
        )
        yield GaugeMetricFamily(
            "parley_write_behind_bytes", "Bytes waiting to be stored", value=wb.bytes
        )
        yield GaugeMetricFamily(
            "parley_write_behind_failing",
            "1 while storage writes fail",
            value=int(wb.failing_since is not None),
        )
        yield CounterMetricFamily(
            "parley_write_behind_flushed_records", "Records stored", value=wb.flushed_records
        )

    async def probe_storage(self, interval: float) -> None:
        """Notice an unreachable database even while nothing is being written."""
        while True:
            try:
                with trio.fail_after(PROBE_TIMEOUT):
                    await self.store.ping()
                self.storage_error = None
            except (StorageError, trio.TooSlowError) as exc:
                self.storage_error = f"probe failed: {exc or 'timeout'}"
            await trio.sleep(interval)

    async def _flush_rooms(self) -> None:
        """Have every room queue what it keeps for its next interval (receipts)."""
        for room in list(self.directory.actors(ActorKind.ROOM)):
            ref = self.directory.get(ActorKind.ROOM, room.key)
            if ref is None:
                continue
            reply: Reply[None] = Reply()
            try:
                await deliver(ref, FlushState(reply))
                await reply.wait()
            except RequestFailed:
                pass  # it stopped, after storing what it had

    async def drain(self, stop_accepting: Callable[[], None], deadline: float) -> None:
        """Everything up to closing the sessions; returns by ``deadline``."""
        self.draining = True
        self.deadline = deadline
        stop_accepting()
        log.info("draining: %d connections", len(self.connections))
        for conn in list(self.connections):
            conn.session.goaway("server shutting down", GOAWAY_DELAY_MS)
        with trio.move_on_at(deadline) as flushing:
            await self._flush_rooms()
            await self.write_behind.wait_flushed()
        if flushing.cancelled_caught:
            depth = self.write_behind.statistics().depth
            log.error("drain: storage did not take %d queued records in time", depth)
        for conn in list(self.connections):
            conn.close(CloseCode.GOING_AWAY, "server shutting down")


def node_name() -> str:
    """This node's id in a cluster: readable in logs, unique across restarts."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40]
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


@asynccontextmanager
async def open_node(
    config: Config, verify_token: Callable[[str], Claims], admin_token: str | None = None
) -> AsyncIterator[tuple[Node, trio.Nursery]]:
    """A running node without listeners, and the nursery its connections belong in."""
    async with AsyncExitStack() as stack:
        redis = None
        if config.redis_url is not None:
            redis = await stack.enter_async_context(
                open_redis(config.redis_url, timeout=min(2.0, config.cluster_lease / 3))
            )
        async with _open_node(config, verify_token, admin_token, redis) as opened:
            yield opened


@asynccontextmanager
async def _open_node(
    config: Config,
    verify_token: Callable[[str], Claims],
    admin_token: str | None,
    redis: tuple[Redis, Subscriber] | None,
) -> AsyncIterator[tuple[Node, trio.Nursery]]:
    metrics = Metrics()
    settings = config.settings()
    async with open_store(
        config.database_url,
        pool_size=config.database_pool,
        statement_timeout=config.statement_timeout,
    ) as store:
        run = await store.begin_run(shared=redis is not None)
        if run.rotated_rooms:
            log.warning(
                "the previous run did not stop cleanly: %d rooms get a new epoch "
                "(their clients refetch history)",
                run.rotated_rooms,
            )
        clean = False
        async with trio.open_nursery() as nursery:
            write_behind = WriteBehind(
                store,
                max_records=config.write_queue_records,
                max_bytes=config.write_queue_bytes,
                batch_records=config.write_batch,
                flush_seconds=metrics.flush_seconds,
            )
            await nursery.start(write_behind.run)
            pump = WritePump()
            await nursery.start(pump.run)
            timers = Timers()
            await nursery.start(timers.run)
            nursery.start_soon(collector.run, config.gc_sweep_interval)
            directory = Directory(nursery, metrics, mailbox_size=settings.mailbox_size)
            services = Services(
                settings=settings,
                store=store,
                write_behind=write_behind,
                directory=directory,
                rooms=RoomLookup(directory, store, metrics),
                quotas=UserQuotas(settings.quotas, metrics),
                bus=InProcessBus(),
                metrics=metrics,
                run=run.run,
                verify_token=verify_token,
                pump=pump,
                timers=timers,
            )
            owners: dict[ActorKind, Callable[[str, Any], Any]] = {
                ActorKind.ROOM: lambda key, old: Room(key, services, old),
                ActorKind.USER: lambda key, old: User(key, services, old),
                ActorKind.KV: lambda key, old: Kv(key, services, old),
                ActorKind.FEED: lambda key, old: FeedShard(key, services, old),
                ActorKind.PROFILE: lambda key, old: Profile(key, services, old),
            }
            # A session's views live where the session does: never placed.
            directory.register(ActorKind.VIEWS, lambda key, old: FeedViews(key, services, old))
            placement = None
            if redis is not None:
                placement = Placement(redis[0], node_name(), lease=config.cluster_lease)
                await nursery.start(placement.run)
                cluster = Cluster(
                    *redis,
                    placement,
                    directory,
                    metrics,
                    nursery,
                    request_timeout=settings.request_timeout,
                    actor_idle=settings.actor_idle,
                )
                placement.on_lost = cluster.lost
                services.cluster = cluster
                services.rooms.on_created = cluster.room_created
                cluster.on_room_created = lambda room: services.rooms.created(room, here=False)
                presence = ClusterPresence(redis[0], config.cluster_lease)
                services.presence = presence
                services.bus = RedisBus(*redis, placement.node, presence, nursery)
                nursery.start_soon(presence.run)
                await nursery.start(cluster.run)
                log.info("cluster node %s", placement.node)
                for kind, make in owners.items():
                    directory.register(kind, _placed(kind, cluster, make))
            else:
                for kind, make in owners.items():
                    directory.register(kind, make)
            node = Node(config, services, store, admin_token=admin_token, placement=placement)
            metrics.collect_at_scrape(node.collect_metrics)
            if config.storage_probe_interval > 0:
                nursery.start_soon(node.probe_storage, config.storage_probe_interval)
            try:
                async with trio.open_nursery() as connections:
                    yield node, connections
            finally:
                # One deadline for the whole drain: what is left of it, if it began.
                deadline = node.deadline or trio.current_time() + config.drain_timeout
                with trio.move_on_at(deadline, shield=True):
                    await write_behind.wait_flushed()
                    await store.end_run(run.run)
                    clean = True
                    if placement is not None:  # others take this node's actors at once
                        await placement.leave()
                nursery.cancel_scope.cancel()
        log.info("stopped %s", "cleanly" if clean else "with records unstored")


def _cluster_metrics(cluster: Cluster) -> Iterable[Metric]:
    redis, sub = cluster.redis, cluster.subscriber
    yield GaugeMetricFamily(
        "parley_cluster_redis_up",
        "1 while both Redis connections are up",
        value=int(redis.connected and sub.connected),
    )
    yield GaugeMetricFamily(
        "parley_cluster_stand_ins",
        "Actors other nodes run that this node forwards to",
        value=len(cluster.stubs),
    )
    yield GaugeMetricFamily(
        "parley_cluster_relays",
        "Rooms run elsewhere whose events this node relays",
        value=len(cluster.relays),
    )
    yield GaugeMetricFamily(
        "parley_cluster_pending_requests",
        "Requests to other nodes awaiting an answer",
        value=len(cluster.pending),
    )
    yield CounterMetricFamily(
        "parley_cluster_relayed_deliveries",
        "Frames relayed to this node's sessions from rooms run elsewhere",
        value=sum(r.delivered for r in cluster.relays.values()) + cluster.relayed_before,
    )
    yield CounterMetricFamily(
        "parley_cluster_redis_commands",
        "Commands sent on the command connection",
        value=redis.commands,
    )
    yield CounterMetricFamily(
        "parley_cluster_redis_dropped",
        "Fire-and-forget commands dropped while Redis was unreachable",
        value=redis.dropped,
    )
    yield CounterMetricFamily(
        "parley_cluster_redis_reconnects",
        "Reconnects of both Redis connections",
        value=redis.reconnects + sub.reconnects,
    )
    yield CounterMetricFamily(
        "parley_cluster_unreadable",
        "Envelopes from other nodes that could not be read",
        value=cluster.unreadable,
    )


def _feed_metrics(directory: Directory) -> Iterable[Metric]:
    posts = GaugeMetricFamily(
        "parley_feed_shard_posts", "Live posts per feed shard", labels=["shard"]
    )
    views = GaugeMetricFamily(
        "parley_feed_shard_views", "Open views watching each feed shard", labels=["shard"]
    )
    queries = CounterMetricFamily(
        "parley_feed_shard_queries", "Top-k queries answered per feed shard", labels=["shard"]
    )
    for shard in directory.actors(ActorKind.FEED):
        index = getattr(shard, "index", None)
        if index is None:
            continue  # loading, or run by another node
        posts.add_metric([shard.key], len(index))
        views.add_metric([shard.key], len(shard.watches))
        queries.add_metric([shard.key], shard.queries)
    yield posts
    yield views
    yield queries


def _placed(
    kind: ActorKind, cluster: Cluster, make: Callable[[str, Any], Any]
) -> Callable[[str, Any], Any]:
    return lambda key, old: Placed(kind, key, cluster, make, old)


@attrs.frozen
class Addresses:
    client: tuple[str, int]
    ops: tuple[str, int]


async def serve(
    config: Config,
    verify_token: Callable[[str], Claims],
    admin_token: str | None = None,
    *,
    shutdown: trio.Event | None = None,
    handle_signals: bool = True,
    worker: int | None = None,
    task_status: trio.TaskStatus[tuple[Node, Addresses]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a node until SIGTERM/SIGINT (or ``shutdown`` is set), then drain and return.

    ``worker``: this node is that worker of ``parley serve --workers`` (server/workers.py):
    it shares the client port with its siblings and drains if its supervisor dies."""
    from server.listener import serve_clients
    from server.ops import ops_url, serve_ops
    from server.workers import shared_listeners, watch_supervisor

    shutdown = trio.Event() if shutdown is None else shutdown
    # Listen before touching storage: a port in use is the commonest start-up failure.
    try:
        if worker is None:
            listeners = await trio.open_tcp_listeners(config.port, host=config.host)
        else:
            listeners = await shared_listeners(config.host, config.port)
    except OSError as exc:
        where = f"{config.host}:{config.port}"
        raise OSError(
            f"cannot listen for clients on {where}: {exc.strerror}; another port: --port N "
            "(or PARLEY_PORT)"
        ) from exc
    client = listeners[0].socket.getsockname()[:2]
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if files != resource.RLIM_INFINITY and config.max_connections + FILES_BESIDES_CLIENTS > files:
        log.warning(
            "--max-connections %d leaves less than %d of this process's %d open files "
            "(ulimit -n) for the rest: accepts may fail with EMFILE below the limit",
            config.max_connections,
            FILES_BESIDES_CLIENTS,
            files,
        )
    try:
        async with open_node(config, verify_token, admin_token) as (node, connections):
            async with trio.open_nursery() as nursery:
                accepting = trio.CancelScope()

                async def accept() -> None:
                    with accepting:
                        await serve_clients(
                            node.services, node.connections, listeners, connections, node.admission
                        )

                nursery.start_soon(accept)
                ops = await nursery.start(serve_ops, node)
                if handle_signals:
                    nursery.start_soon(_watch_signals, shutdown)
                if worker is not None:
                    nursery.start_soon(watch_supervisor, shutdown)
                log.info("parley serving ws://%s:%d/ws; ops on %s", *client, ops_url(ops))
                if config.dev:  # once it serves: a start that failed printed no secrets
                    log.warning("dev mode: admin token %s", admin_token)
                    log.warning("dev mode: make a client token with: parley token <user>")
                task_status.started((node, Addresses(client, ops)))
                await shutdown.wait()
                log.info("shutting down")
                deadline = trio.current_time() + config.drain_timeout
                await node.drain(accepting.cancel, deadline)
                # Every session has its close frame queued: each connection gets up to
                # CLOSE_TIMEOUT for the closing handshake, even if the drain used the
                # whole deadline (storage stuck), so clients still read 1001.
                connections.cancel_scope.deadline = max(
                    deadline, trio.current_time() + CLOSE_TIMEOUT
                )
                nursery.cancel_scope.cancel()
    finally:
        for listener in listeners:  # if start-up failed before the accept loop took them
            await trio.aclose_forcefully(listener)


async def _watch_signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if shutdown.is_set():
                # The operator insists: stop now. Like a crash, the next start sees an
                # unclean run and rotates the epochs of the rooms this run touched.
                log.warning("second %s: exiting without draining", signal.Signals(signum).name)
                os._exit(1)
            log.info("%s received", signal.Signals(signum).name)
            shutdown.set()
