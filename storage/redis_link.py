"""One connection to Redis that keeps itself connected: the part that ``Redis`` (commands)
and ``Subscriber`` (pub/sub) share.

How this works: ``run`` is a supervisor loop. It connects (TCP or a Unix socket), sends
AUTH, SELECT and CLIENT SETNAME in one write and reads their replies, all within the
timeout; then runs a session of two tasks, a writer and a reader, until the connection
fails; then marks the link disconnected, lets the subclass fail whatever waited on that
connection, sleeps a capped exponential backoff, and starts again. It never raises for a
connection problem: while disconnected, ``connected`` is False and ``error`` says why.

Writes are batched: the subclass queues packed commands synchronously (``_enqueue``)
and the writer sends everything queued with one ``send_all``. The reader receives at
most ``RECV_SIZE`` bytes at a time and hands every reply hiredis can parse from them to
the subclass (``_reply``) before it receives more, so a burst is never buffered on our
side beyond one receive. Every wait is bounded: while replies are owed the reader must
hear from Redis within the timeout, counted from the first command sent since Redis
last spoke, else the connection is declared dead (a stopped or partitioned server);
while nothing is owed it sends a PING after ``KEEPALIVE`` seconds of silence, so a dead
idle connection is found too.
"""

import logging
import random
import urllib.parse
from collections.abc import Sequence
from typing import Any, cast

import attrs
import hiredis
import trio

from storage.store import forget_tracebacks

log = logging.getLogger(__name__)

RECV_SIZE = 64 * 1024
KEEPALIVE = 10.0
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0

Arg = bytes | str | int | float


class RedisError(Exception):
    """Anything that went wrong talking to Redis."""


class RedisUnavailable(RedisError):
    """Not connected, the connection was lost, or Redis did not answer in time."""


class ReplyError(RedisError):
    """Redis answered with an error reply."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


#: What ``Reader.gets`` returns when it needs more bytes (a reply is never this object).
_MORE = object()


def pack(args: Sequence[Arg]) -> bytes:
    """One command in the Redis protocol."""
    # hiredis's stub types its argument as a one-element tuple.
    packed: bytes = hiredis.pack_command(cast(Any, tuple(args)))
    return packed


def new_reader() -> hiredis.Reader:
    return hiredis.Reader(replyError=ReplyError, notEnoughData=_MORE)


@attrs.frozen
class RedisAddress:
    """Where Redis is and how to log in (``parse_url``)."""

    host: str | None = None
    port: int = 6379
    path: str | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0

    def __str__(self) -> str:
        where = self.path if self.path is not None else f"{self.host}:{self.port}"
        return f"{where} db {self.db}"


def parse_url(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]`` or
    ``unix://[[user]:password@]/path/to/socket[?db=N]``. TLS (``rediss://``) and other
    query options are not supported and refused, as is anything else."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "unix"):
        raise ValueError(
            f"unsupported Redis URL scheme {parts.scheme!r}: use redis://host:port/db or "
            "unix:///path/to/socket (rediss:// TLS is not supported)"
        )
    if parts.fragment:
        raise ValueError("a Redis URL has no #fragment")
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    if username and not password:
        raise ValueError("a Redis URL with a user needs a password (redis://user:pw@host)")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    if parts.scheme == "unix":
        if set(query) - {"db"} or len(query.get("db", ())) > 1:
            raise ValueError("a unix:// Redis URL takes only ?db=N")
        if not parts.path or parts.hostname:
            raise ValueError("a unix:// Redis URL is unix:///path/to/socket (no host)")
        return RedisAddress(
            path=parts.path,
            username=username,
            password=password,
            db=_db(query.get("db", ["0"])[0]),
        )
    if query:
        raise ValueError("a redis:// URL takes no ?options; the database goes in the path")
    if not parts.hostname:
        raise ValueError("a redis:// URL needs a host (redis://host:port/db)")
    try:
        port = parts.port or 6379
    except ValueError as exc:
        raise ValueError(f"bad port in Redis URL: {exc}") from None
    return RedisAddress(
        host=parts.hostname,
        port=port,
        username=username,
        password=password,
        db=_db(parts.path.lstrip("/") or "0"),
    )


def _db(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"a Redis database is a number, not {text!r}")
    return int(text)


#: What a lost or refused connection raises, as opposed to a bug.
CONNECTION_ERRORS = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    hiredis.HiredisError,
    RedisError,
)


def describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


class Link:
    """The supervisor, writer and reader of one connection. Subclasses say what is sent
    on every new connection (``_ready``), what a reply means (``_reply``), whether
    replies are owed (``_owes``), how to ping (``_ping``) and what to fail when the
    connection is lost (``_lost``)."""

    def __init__(self, address: RedisAddress, *, timeout: float, name: str) -> None:
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"a Redis client name has no spaces and is not empty: {name!r}")
        self.address = address
        self.timeout = timeout
        self.name = name
        self.error: str | None = "not connected yet"
        self.batches = 0
        self.commands = 0
        self.reconnects = 0
        self._connected = False
        self._out: list[bytes] = []
        self._out_count = 0
        self._out_bytes = 0
        self._wake = trio.Event()
        self._session: trio.CancelScope | None = None
        self._read_scope: trio.CancelScope | None = None
        # When the replies owed must have begun to come; None while nothing is owed.
        self._reply_due: float | None = None
        self._broken: str | None = None

    @property
    def connected(self) -> bool:
        return self._connected

    # Subclass hooks.
    def _ready(self) -> None:
        """Queue what a new connection starts with."""

    def _reply(self, reply: Any) -> None:
        raise NotImplementedError

    def _owes(self) -> bool:
        raise NotImplementedError

    def _ping(self) -> None:
        raise NotImplementedError

    def _lost(self, reason: str) -> None:
        """Fail whatever waited on the connection that was just lost."""

    def _enqueue(self, packed: bytes, count: int = 1) -> None:
        self._out.append(packed)
        self._out_count += count
        self._out_bytes += len(packed)
        self._wake.set()

    def _break(self, reason: str) -> None:
        """Give up on the current connection (a reply is late: the order of what follows
        can no longer be trusted) and reconnect."""
        if self._session is not None and self._broken is None:
            self._broken = reason
            self._session.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve, reconnect, until cancelled. Reports started after the first
        attempt, whether it connected or not."""
        delay = BACKOFF_FIRST
        started = False
        ever_connected = False
        while True:
            try:
                stream, reader = await self._connect()
            except CONNECTION_ERRORS as exc:
                forget_tracebacks(exc)  # trio's connect attempts hold it: a cycle per attempt
                self.error = f"cannot connect to Redis at {self.address}: {describe(exc)}"
                log.warning("%s: %s", self.name, self.error)
            else:
                delay = BACKOFF_FIRST
                self.reconnects += ever_connected
                ever_connected = True
                self._broken = None
                self._connected = True
                self.error = None
                self._ready()
                if not started:
                    started = True
                    task_status.started()
                reason = await self._serve(stream, reader)
                log.warning(
                    "%s: lost the connection to Redis at %s: %s", self.name, self.address, reason
                )
            if not started:
                started = True
                task_status.started()
            # Jitter, so that the nodes of a cluster do not all come back at once.
            await trio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _connect(self) -> tuple[trio.SocketStream, hiredis.Reader]:
        address = self.address
        with trio.fail_after(self.timeout):
            if address.path is not None:
                stream = await trio.open_unix_socket(address.path)
            else:
                assert address.host is not None
                stream = await trio.open_tcp_stream(address.host, address.port)
            try:
                commands: list[list[Arg]] = []
                if address.password is not None:
                    commands.append(["AUTH", *filter(None, [address.username]), address.password])
                if address.db:
                    commands.append(["SELECT", address.db])
                commands.append(["CLIENT", "SETNAME", self.name])
                await stream.send_all(b"".join(pack(c) for c in commands))
                reader = new_reader()
                for _ in commands:
                    reply = reader.gets()
                    while reply is _MORE:
                        data = await stream.receive_some(RECV_SIZE)
                        if not data:
                            raise RedisUnavailable("Redis closed the connection")
                        reader.feed(data)
                        reply = reader.gets()
                    if isinstance(reply, ReplyError):
                        raise reply
            except BaseException:
                stream.socket.close()
                raise
        return stream, reader

    async def _serve(self, stream: trio.SocketStream, reader: hiredis.Reader) -> str:
        """Run one connection until it fails; returns why it ended."""
        reason = "connection closed"
        try:
            async with stream, trio.open_nursery() as nursery:
                self._session = nursery.cancel_scope
                nursery.start_soon(self._write, stream)
                await self._read(stream, reader)
        except* CONNECTION_ERRORS as group:
            forget_tracebacks(group)  # a cancelled writer's group loops back through trio
            reason = describe(_first(group))
        finally:
            self._connected = False
            self._session = self._read_scope = self._reply_due = None
            reason = self._broken or reason
            self.error = f"lost the connection to Redis at {self.address}: {reason}"
            self._out.clear()
            self._out_bytes = self._out_count = 0
            self._lost(reason)
        return reason

    async def _write(self, stream: trio.SocketStream) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if not self._out:
                continue
            data = b"".join(self._out)
            self._out.clear()
            self.batches += 1
            self.commands += self._out_count
            self._out_count = 0
            if self._reply_due is None:  # the first command owed since Redis last spoke
                self._reply_due = trio.current_time() + self.timeout
                scope = self._read_scope
                if scope is not None:
                    scope.deadline = min(scope.deadline, self._reply_due)
            await stream.send_all(data)
            # Counted until sent: what waits in send_all is memory we hold too.
            self._out_bytes -= len(data)

    async def _read(self, stream: trio.SocketStream, reader: hiredis.Reader) -> None:
        while True:
            now = trio.current_time()
            if self._owes():
                if self._reply_due is None:  # queued, and the writer has not run yet
                    self._reply_due = now + self.timeout
                deadline = self._reply_due
            else:
                self._reply_due = None
                deadline = now + KEEPALIVE
            scope = self._read_scope = trio.CancelScope(deadline=deadline)
            with scope:
                data = await stream.receive_some(RECV_SIZE)
            if scope.cancelled_caught:
                # The deadline is checked again, not the scope's: a keepalive's may fire
                # in the same instant as a command is sent, which must get its own time.
                due = self._reply_due
                if self._owes() and due is not None and trio.current_time() >= due:
                    raise RedisUnavailable(f"no reply from Redis within {self.timeout} s")
                if not self._owes():  # else what was just queued is the probe
                    self._ping()
                continue
            if not data:
                raise RedisUnavailable("Redis closed the connection")
            self._reply_due = None  # Redis spoke: what is still owed has the timeout again
            reader.feed(data)
            while (reply := reader.gets()) is not _MORE:
                self._reply(reply)
