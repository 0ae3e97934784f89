"""Shared test helpers: a real node on real sockets, and ways to talk to it."""

import functools
import json
import os
import resource
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
import trio.testing
import trio_websocket
from trio_websocket import WebSocketConnection
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from loadtests.cli import free_port
from protocol.client import ParleyClient, open_client, open_websocket, run_client
from protocol.codec import decode_server
from protocol.frames import Frame
from server.config import Config
from server.connection import serve_connection
from server.node import Addresses, Node, open_node, serve
from server.tokens import issue_token, token_verifier

SECRET = "test-secret-0123456789-abcdefghijklmnop"
ADMIN = "test-admin-token"


@attrs.define
class RunningServer:
    node: Node
    addresses: Addresses
    shutdown: trio.Event
    config: Config

    @property
    def url(self) -> str:
        host, port = self.addresses.client
        return f"ws://{host}:{port}/ws"

    @property
    def ops_url(self) -> str:
        host, port = self.addresses.ops
        return f"http://{host}:{port}"

    def token(self, user: str, ttl: int = 3600) -> str:
        return issue_token(SECRET, user, ttl)

    def client(self, user: str, **kwargs: Any) -> Any:
        """``async with server.client("alice") as alice: ...``"""
        return open_client(self.url, self.token(user), **kwargs)

    def http(self, *, admin: bool = True) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {ADMIN}"} if admin else {}
        return httpx.AsyncClient(base_url=self.ops_url, headers=headers)

    def raw(self) -> Any:
        """``async with server.raw() as ws``: a WebSocket with no Parley client on it,
        for sending anything at all."""
        return open_websocket(self.url)


def node_config(tmp_path: Path, **overrides: Any) -> Config:
    options: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "ops_port": 0,
        "database_url": f"sqlite:///{tmp_path / 'parley.db'}",
        "secret": SECRET,
        "admin_token": ADMIN,
        "drain_timeout": 5.0,
    }
    options.update(overrides)
    return Config(**options)


@asynccontextmanager
async def run_server(tmp_path: Path, **overrides: Any) -> AsyncIterator[RunningServer]:
    """A node serving on free ports until the block ends, then drained."""
    config = node_config(tmp_path, **overrides)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        start = functools.partial(
            serve,
            config,
            token_verifier(SECRET, require_exp=not config.allow_tokens_without_exp),
            config.admin_token,
            shutdown=shutdown,
            handle_signals=False,
        )
        node, addresses = await nursery.start(start)
        try:
            yield RunningServer(node, addresses, shutdown, config)
        finally:
            shutdown.set()


@asynccontextmanager
async def memory_node(tmp_path: Path, **overrides: Any) -> AsyncIterator["MemoryNode"]:
    config = node_config(tmp_path, storage_probe_interval=0, **overrides)
    verifier = token_verifier(SECRET, require_exp=not config.allow_tokens_without_exp)
    async with open_node(config, verifier) as (node, connections):
        yield MemoryNode(node, connections)
        connections.cancel_scope.cancel()


class MemoryNode:
    """A node whose clients connect over memory streams: no kernel I/O, so a test can
    drive it in virtual time (``trio.testing.MockClock``)."""

    def __init__(self, node: Node, connections: trio.Nursery) -> None:
        self.node = node
        self.connections = connections

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[WebSocketConnection]:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        self.connections.start_soon(
            serve_connection, server_stream, self.node.services, self.node.connections, "mem"
        )
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery,
                client_stream,  # type: ignore[arg-type]  # any trio Stream works
                "localhost",
                "/ws",
            )
            try:
                yield ws
            finally:
                # Close like a client that leaves: the server sees the session end now.
                with trio.move_on_after(5, shield=True):
                    await ws.aclose()
                    await client_stream.aclose()
                nursery.cancel_scope.cancel()

    @asynccontextmanager
    async def raw(self) -> AsyncIterator[tuple[trio.abc.Stream, WSConnection]]:
        """The client's stream after the upgrade, to send any bytes at any pace, and a
        wsproto client to make frames and read the server's."""
        client_stream, server_stream = trio.testing.memory_stream_pair()
        self.connections.start_soon(
            serve_connection, server_stream, self.node.services, self.node.connections, "mem"
        )
        ws = WSConnection(ConnectionType.CLIENT)
        await client_stream.send_all(ws.send(Request(host="localhost", target="/ws")))
        while not any(isinstance(e, AcceptConnection) for e in ws.events()):
            ws.receive_data(bytes(await client_stream.receive_some(65536)))
        try:
            yield client_stream, ws
        finally:
            await client_stream.aclose()

    @asynccontextmanager
    async def client(self, user: str, **options: Any) -> AsyncIterator[ParleyClient]:
        """A ``ParleyClient`` over a memory stream; ``ttl`` and ``refresh`` for tokens.
        The default token lives for a year: a test whose mock clock jumps while storage
        works must not jump to its expiry."""
        token = issue_token(SECRET, user, options.pop("ttl", 365 * 86400))
        async with self.connect() as ws, run_client(ws, token, **options) as c:
            yield c


async def next_frame(ws: WebSocketConnection) -> Frame:
    return decode_server(await ws.get_message())  # type: ignore[arg-type]


def pending_events(client: ParleyClient) -> list[object]:
    """Every event the client has received and not read yet, without waiting."""
    events: list[object] = []
    while True:
        try:
            events.append(client.events.receive_nowait())
        except trio.WouldBlock:
            return events


async def events_until(client: ParleyClient, kind: type, count: int) -> list[Any]:
    """The next ``count`` events of ``kind``, skipping others."""
    return [await client.next_event(kind) for _ in range(count)]


# --- a server in its own process (signals, SIGKILL) -----------------------------------


@attrs.define
class ServerProcess:
    """``parley serve`` as a child process, for tests that signal or kill it."""

    tmp_path: Path
    nursery: trio.Nursery
    extra: tuple[str, ...] = ()
    nofile: int | None = None  # its open-file limit (RLIMIT_NOFILE), if not ours
    port: int = attrs.field(factory=free_port)
    ops_port: int = attrs.field(factory=free_port)
    proc: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--ops-port",
            str(self.ops_port),
            "--database-url",
            f"sqlite:///{self.tmp_path / 'parley.db'}",
            "--secret",
            SECRET,
            "--admin-token",
            ADMIN,
            *self.extra,
        ]

    async def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        log = self.tmp_path / "server.log"
        with log.open("ab") as out:  # the child keeps its own copy of the descriptor
            start = functools.partial(
                trio.run_process,
                self.command(),
                stdout=out,
                stderr=out,
                check=False,
                preexec_fn=self._limit_files if self.nofile else None,
            )
            self.proc = await self.nursery.start(start)
        with trio.fail_after(30):
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"server exited {self.proc.returncode}: {self.log()}")
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                return

    def _limit_files(self) -> None:
        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def log(self) -> str:
        return (self.tmp_path / "server.log").read_text(errors="replace")

    async def signal(self, signum: int) -> int:
        """Send ``signum`` and wait for the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signum)
        with trio.fail_after(30):
            return await self.proc.wait()

    def token(self, user: str) -> str:
        return issue_token(SECRET, user, 3600)


@asynccontextmanager
async def server_process(tmp_path: Path, *extra: str) -> AsyncIterator[ServerProcess]:
    """A ``ServerProcess`` (not started); killed when the block ends."""
    async with trio.open_nursery() as nursery:
        server = ServerProcess(tmp_path, nursery, extra)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()  # run_process kills what still runs


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``parley ARGS`` in a child process."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    full_env = {**inherited, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


async def readiness(server: RunningServer) -> dict[str, Any]:
    async with server.http(admin=False) as http:
        body: dict[str, Any] = (await http.get("/readyz")).json()
    return body


async def until_status(server: RunningServer, status: str) -> dict[str, Any]:
    """The node's readiness once its status is ``status``."""
    with trio.fail_after(60):
        while (body := await readiness(server))["status"] != status:  # noqa: ASYNC110
            await trio.sleep(0.05)
    return body


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)


def actor_crashes(node: Node, kind: str) -> float | None:
    """How many times actors of ``kind`` crashed on ``node`` (the metric)."""
    return node.services.metrics.registry.get_sample_value(
        "parley_actor_crashes_total", {"kind": kind}
    )


#: Bounds a wait for something that must happen, so that a bug fails instead of hanging.
PATIENCE = 15


async def until(condition: Callable[[], bool]) -> None:
    """Until ``condition()`` holds (a state of other tasks or servers); at most PATIENCE s."""
    with trio.fail_after(PATIENCE):
        while not condition():  # noqa: ASYNC110 - no event tells of these states
            await trio.sleep(0.01)


def rename_table(db: Path, old: str, new: str) -> None:
    """Rename a table of a node's SQLite file from another connection: the node's reads
    of it fail until it is renamed back."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=10)
    conn.execute(f"ALTER TABLE {old} RENAME TO {new}")
    conn.close()
