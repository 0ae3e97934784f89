"""A Python client for Parley, on trio-websocket.

    async with open_client("ws://127.0.0.1:8080/ws", token) as client:
        await client.join("lobby")
        sent = await client.send("lobby", "hello")      # returns after the durable ack
        async for event in client.events:                # messages, member events, ...
            ...

The client answers the server's pings, matches replies to requests by ``id`` and
keeps each room's position (last seq seen, epoch) in ``positions``: pass that as
``resume`` to the next ``open_client`` and the server replays what was missed.

Tokens expire (PROTOCOL.md section 5). Give ``refresh``, an async function returning a
new token for the same user, and the client sends it a little before ``expires`` each
time; ``client.token`` is the newest, for the next connection:

    async def new_token() -> str:
        return await my_backend.token_for("alice")

    async with open_client(url, await new_token(), refresh=new_token) as client: ...
"""

import itertools
import logging
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionTimeout,
    WebSocketConnection,
    wrap_client_stream,
)

from protocol.codec import decode_server, encode
from protocol.errors import ErrorCode, RemoteProtocolError, sole_exception
from protocol.feed import FeedView
from protocol.frames import (
    PROTOCOL_VERSION,
    Block,
    BlockList,
    Blocks,
    Create,
    Direct,
    Error,
    FeedClose,
    FeedMore,
    FeedOpen,
    FeedPage,
    Follow,
    Frame,
    Hello,
    History,
    Interests,
    Invite,
    Join,
    Joined,
    KvAck,
    KvChanges,
    KvPut,
    KvResult,
    KvSync,
    KvWrite,
    Leave,
    Like,
    Message,
    Ok,
    Page,
    Ping,
    Pong,
    Post,
    Posted,
    PresenceList,
    PresenceState,
    Receipt,
    ReceiptCounts,
    Receipts,
    ReceiptState,
    Refresh,
    RoomKind,
    RoomList,
    Rooms,
    Send,
    Sent,
    SetStatus,
    Status,
    Typing,
    TypingOp,
    Unblock,
    Unfollow,
    Unlike,
    Unpost,
    Unsubscribe,
    Unwatch,
    Watch,
    Welcome,
    Who,
)
from protocol.kv import KvReplica

F = TypeVar("F", bound=Frame)
log = logging.getLogger(__name__)
EVENT_BUFFER = 100_000
REFRESH_MARGIN = 60.0  # seconds before expiry a token is refreshed (a fifth of a short life)
REFRESH_RETRY = 5.0  # seconds between tries when refreshing fails
#: Returns a new token for the same user.
TokenSource = Callable[[], Awaitable[str]]
SUBPROTOCOL = "parley.v1"
CLOSE_TIMEOUT = 5.0
CONNECT_TIMEOUT = 10.0  # seconds for the TCP connect, TLS and the WebSocket handshake


class ServerError(Exception):
    """The server answered a request with an ``error`` frame."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code} {error.msg}")
        self.error = error
        self.code = ErrorCode(error.code) if error.code in ErrorCode._value2member_map_ else None


class Disconnected(Exception):
    """The connection ended before the answer came."""


class _Pending:
    __slots__ = ("done", "frame")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.frame: Frame | None = None


class ParleyClient:
    def __init__(self, ws: WebSocketConnection, token: str = "") -> None:
        self.ws = ws
        self.token = token  # the newest, refreshed or not: use it to connect again
        self.welcome: Welcome | None = None
        self.positions: dict[str, tuple[int, str]] = {}
        self.close_code: int | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._events_send, self.events = trio.open_memory_channel[Frame](EVENT_BUFFER)

    # --- requests ---------------------------------------------------------------------

    def next_id(self) -> int:
        return next(self._ids)

    async def send_frame(self, frame: Frame) -> None:
        await self.ws.send_message(encode(frame))

    async def request(self, frame: Frame, expect: type[F]) -> F:
        """Send ``frame`` (with an ``id``) and return the reply; raises ``ServerError``."""
        request_id: int = frame.id  # type: ignore[attr-defined]
        pending = self._pending[request_id] = _Pending()
        try:
            await self.send_frame(frame)
            await pending.done.wait()
        finally:
            self._pending.pop(request_id, None)
        reply = pending.frame
        if reply is None:
            raise Disconnected(f"connection closed (code {self.close_code})")
        if isinstance(reply, Error):
            raise ServerError(reply)
        if not isinstance(reply, expect):
            raise TypeError(f"expected {expect.__name__}, got {reply!r}")
        return reply

    async def create(self, room: str, *, private: bool = False) -> Joined:
        kind = RoomKind.PRIVATE if private else RoomKind.OPEN
        return await self.request(Create(id=self.next_id(), room=room, kind=kind), Joined)

    async def join(self, room: str, *, resume: bool = True) -> Joined:
        """Subscribe to ``room``, replaying from ``positions`` if we have been there."""
        seq, epoch = self.positions.get(room, (None, None)) if resume else (None, None)
        return await self.request(Join(id=self.next_id(), room=room, seq=seq, epoch=epoch), Joined)

    async def direct(self, user: str) -> Joined:
        return await self.request(Direct(id=self.next_id(), user=user), Joined)

    async def leave(self, room: str) -> None:
        await self.request(Leave(id=self.next_id(), room=room), Ok)
        self.positions.pop(room, None)

    async def unsubscribe(self, room: str) -> None:
        await self.request(Unsubscribe(id=self.next_id(), room=room), Ok)

    async def invite(self, room: str, user: str) -> None:
        await self.request(Invite(id=self.next_id(), room=room, user=user), Ok)

    async def send(
        self,
        room: str,
        text: str | None = None,
        *,
        data: dict[str, Any] | None = None,
        cid: str | None = None,
        retry: bool = False,
    ) -> Sent:
        """Post a message and wait for its sent-ack."""
        frame = Send(
            id=self.next_id(),
            room=room,
            cid=cid or secrets.token_hex(8),
            text=text,
            data=data,
            retry=retry,
        )
        return await self.request(frame, Sent)

    async def history(
        self,
        room: str,
        *,
        before: int | None = None,
        after: int | None = None,
        limit: int | None = None,
    ) -> Page:
        frame = History(id=self.next_id(), room=room, before=before, after=after, limit=limit)
        return await self.request(frame, Page)

    async def rooms(self, *, after: str | None = None, limit: int | None = None) -> RoomList:
        """A page of the rooms this user is a member of."""
        return await self.request(Rooms(id=self.next_id(), room=after, limit=limit), RoomList)

    async def receipt(
        self, room: str, *, delivered: int | None = None, read: int | None = None
    ) -> None:
        """Ack delivery and/or reading up to a seq; returns once the room took it."""
        frame = Receipt(id=self.next_id(), room=room, delivered=delivered, read=read)
        await self.request(frame, Ok)

    async def receipt_state(self, room: str, seq: int | None = None) -> ReceiptState:
        """Members' cursors: those who have received ``seq``, or all members."""
        return await self.request(Receipts(id=self.next_id(), room=room, seq=seq), ReceiptState)

    async def receipt_counts(self, room: str, seq: int, limit: int = 1) -> ReceiptCounts:
        frame = Receipts(id=self.next_id(), room=room, seq=seq, limit=limit)
        return await self.request(frame, ReceiptCounts)

    async def typing(self, room: str, *, stop: bool = False) -> None:
        op = TypingOp.STOP if stop else TypingOp.START
        await self.request(Typing(id=self.next_id(), room=room, op=op), Ok)

    async def set_status(self, status: Status) -> None:
        await self.request(SetStatus(id=self.next_id(), status=status), Ok)

    async def who(self, *users: str) -> dict[str, PresenceState]:
        answer = await self.request(Who(id=self.next_id(), users=users), PresenceList)
        return {p.user: p for p in answer.items}

    async def watch(self, *users: str) -> dict[str, PresenceState]:
        answer = await self.request(Watch(id=self.next_id(), users=users), PresenceList)
        return {p.user: p for p in answer.items}

    async def unwatch(self, *users: str) -> None:
        await self.request(Unwatch(id=self.next_id(), users=users), Ok)

    async def block(self, user: str) -> None:
        await self.request(Block(id=self.next_id(), user=user), Ok)

    async def unblock(self, user: str) -> None:
        await self.request(Unblock(id=self.next_id(), user=user), Ok)

    async def blocks(self) -> tuple[str, ...]:
        return (await self.request(Blocks(id=self.next_id()), BlockList)).users

    async def kv_put(self, dev: str, *writes: KvWrite) -> KvAck:
        """Write keys as device ``dev``; returns once stored, with one result per write."""
        return await self.request(KvPut(id=self.next_id(), dev=dev, items=writes), KvAck)

    async def kv_sync(self, after: int = 0, *, limit: int | None = None) -> KvChanges:
        """One page of changes after revision ``after``; starts live ``kvchanged`` events."""
        return await self.request(KvSync(id=self.next_id(), after=after, limit=limit), KvChanges)

    async def kv_push(self, replica: KvReplica) -> list[KvResult]:
        """Send the replica's pending writes; the results that were refused or lost."""
        put = replica.put_frame(self.next_id())
        if not put.items:
            return []
        return replica.on_ack(put, await self.request(put, KvAck))

    async def kv_pull(self, replica: KvReplica, *, limit: int | None = None) -> None:
        """Bring the replica up to date, page by page. Apply the ``kvchanged`` events
        that follow with ``replica.on_changed``."""
        while True:
            page = await self.request(replica.sync_frame(self.next_id(), limit), KvChanges)
            replica.on_changes(page)
            if not page.more:
                return

    # --- feeds ----------------------------------------------------------------------

    async def post(
        self,
        lat: float,
        lon: float,
        category: str,
        text: str | None = None,
        *,
        data: Any = None,
        cid: str | None = None,
        retry: bool = False,
    ) -> Posted:
        """Make a feed post; returns once it is stored."""
        frame = Post(
            id=self.next_id(),
            cid=cid or secrets.token_hex(8),
            lat=lat,
            lon=lon,
            category=category,
            text=text,
            data=data,
            retry=retry,
        )
        return await self.request(frame, Posted)

    async def unpost(self, post: int) -> None:
        await self.request(Unpost(id=self.next_id(), post=post), Ok)

    async def like(self, post: int) -> None:
        await self.request(Like(id=self.next_id(), post=post), Ok)

    async def unlike(self, post: int) -> None:
        await self.request(Unlike(id=self.next_id(), post=post), Ok)

    async def follow(self, user: str) -> None:
        await self.request(Follow(id=self.next_id(), user=user), Ok)

    async def unfollow(self, user: str) -> None:
        await self.request(Unfollow(id=self.next_id(), user=user), Ok)

    async def set_interests(self, *categories: str) -> None:
        await self.request(Interests(id=self.next_id(), interests=categories), Ok)

    async def feed_open(
        self, lat: float, lon: float, radius: int, *, limit: int | None = None
    ) -> FeedView:
        """Open a feed view; apply the ``feedchanged`` events that follow with
        ``FeedView.apply``."""
        frame = FeedOpen(id=self.next_id(), lat=lat, lon=lon, radius=radius, limit=limit)
        return FeedView(await self.request(frame, FeedPage))

    async def feed_more(self, view: int, rank: int, *, limit: int | None = None) -> FeedPage:
        frame = FeedMore(id=self.next_id(), view=view, rank=rank, limit=limit)
        return await self.request(frame, FeedPage)

    async def feed_close(self, view: int) -> None:
        await self.request(FeedClose(id=self.next_id(), view=view), Ok)

    async def ping(self) -> float:
        """Round-trip time in seconds."""
        started = trio.current_time()
        await self.request(Ping(id=self.next_id()), Pong)
        return trio.current_time() - started

    async def next_event(self, kind: type[F] | None = None) -> Any:
        """The next event (of type ``kind``, skipping others if given)."""
        while True:
            event = await self.events.receive()
            if kind is None or isinstance(event, kind):
                return event

    async def refresh(self, token: str) -> int | None:
        """Go on with ``token``; when it expires (ms since the Unix epoch, or None)."""
        ok = await self.request(Refresh(id=self.next_id(), token=token), Ok)
        self.token = token
        return ok.expires

    async def _keep_token_fresh(self, source: TokenSource, expires: int) -> None:
        """Refresh a little before each expiry; on failure, try again until it is too
        late (the server then closes with 4007, and the caller reconnects)."""
        while True:
            left = expires / 1000 - time.time()
            await trio.sleep(max(0.0, left - min(REFRESH_MARGIN, left / 5)))
            while True:
                try:
                    new = await self.refresh(await source())
                    break
                except (Disconnected, ConnectionClosed):
                    return
                except Exception as exc:  # the application's callback, or a refusal
                    log.warning("token refresh failed (%s); trying again", exc)
                    await trio.sleep(REFRESH_RETRY)
            if new is None:
                return  # a token that does not expire
            expires = new

    # --- the reader -------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                try:
                    data = await self.ws.get_message()
                except ConnectionClosed as closed:
                    self.close_code = closed.reason.code if closed.reason else None
                    return
                frame = _known(data)
                if frame is None:
                    continue
                self._track(frame)
                request_id = getattr(frame, "id", None)
                if isinstance(frame, Ping) and request_id is None:
                    try:
                        await self.send_frame(Pong())
                    except ConnectionClosed:
                        pass  # the close is the next thing we read
                    continue
                pending = self._pending.get(request_id) if request_id is not None else None
                if pending is not None:
                    pending.frame = frame
                    pending.done.set()
                else:
                    await self._events_send.send(frame)
        finally:
            for pending in self._pending.values():
                pending.done.set()
            self._events_send.close()

    def _track(self, frame: Frame) -> None:
        if isinstance(frame, Message):
            epoch = self.positions.get(frame.room, (0, ""))[1]
            self.positions[frame.room] = (frame.seq, epoch)
        elif isinstance(frame, Joined):
            seen = self.positions.get(frame.room)
            if frame.recovered and seen is not None:
                self.positions[frame.room] = (seen[0], frame.epoch)
            else:  # a fresh start: live messages come after the head
                self.positions[frame.room] = (frame.seq, frame.epoch)


def _known(data: bytes | str) -> Frame | None:
    """The frame in a server message; None for a type this client does not know (from a
    newer server: ignored, as PROTOCOL.md says, before the welcome too)."""
    try:
        return decode_server(data if isinstance(data, bytes) else data.encode())
    except RemoteProtocolError as exc:
        if exc.code is ErrorCode.UNKNOWN_TYPE:
            return None
        raise


async def handshake(
    client: ParleyClient, token: str, resume: dict[str, tuple[int, str]] | None
) -> Welcome:
    await client.send_frame(Hello(v=PROTOCOL_VERSION, token=token, resume=resume or None))
    while True:
        try:
            data = await client.ws.get_message()
        except ConnectionClosed as closed:
            raise Disconnected(f"closed during hello: {closed.reason}") from None
        frame = _known(data)
        if isinstance(frame, Welcome):
            return frame
        if isinstance(frame, Error):
            raise ServerError(frame)


@contextmanager
def _connecting(deadline: float, late: str) -> Iterator[None]:
    with trio.move_on_at(deadline) as scope:
        yield
    if scope.cancelled_caught:
        raise ConnectionTimeout(late)


@asynccontextmanager
async def open_websocket(
    url: str, *, max_message_size: int = 2**24, connect_timeout: float = CONNECT_TIMEOUT
) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket to ``url`` (ws:// or wss://) whose TCP stream we own and close.

    trio-websocket's own ``open_websocket_url`` leaves the client socket open when the
    server ends the connection first, which a long-running client would leak. Connecting
    takes at most ``connect_timeout`` seconds, else ``ConnectionTimeout`` (a
    ``HandshakeError``): trio-websocket's handshake waits for ever for a server that
    closes the connection, or says nothing, before it answers.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a WebSocket URL: {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    resource = parts.path or "/"
    if parts.query:
        resource += "?" + parts.query
    deadline = trio.current_time() + connect_timeout
    late = f"no WebSocket connection to {url} in {connect_timeout:g} s"
    with _connecting(deadline, late):
        tcp = await trio.open_tcp_stream(parts.hostname, port)
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = tcp
    try:
        with sole_exception():
            if secure:
                stream = trio.SSLStream(
                    tcp, ssl.create_default_context(), server_hostname=parts.hostname
                )
                # Here, not on the WebSocket's first write: a certificate that does not
                # verify failed inside trio-websocket's reader and the client hung.
                with _connecting(deadline, late):
                    await stream.do_handshake()  # BrokenResourceError from ssl.SSLError
            async with trio.open_nursery() as nursery:
                with _connecting(deadline, late):
                    ws = await wrap_client_stream(
                        nursery,
                        stream,
                        parts.netloc,
                        resource,
                        subprotocols=[SUBPROTOCOL],
                        max_message_size=max_message_size,
                        message_queue_size=EVENT_BUFFER,
                    )
                try:
                    yield ws
                finally:
                    with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


@asynccontextmanager
async def open_client(
    url: str,
    token: str,
    *,
    resume: dict[str, tuple[int, str]] | None = None,
    max_message_size: int = 2**24,
    refresh: TokenSource | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> AsyncIterator[ParleyClient]:
    """Connect, authenticate and keep reading until the block ends; with ``refresh``,
    keep the token fresh too."""
    async with open_websocket(
        url, max_message_size=max_message_size, connect_timeout=connect_timeout
    ) as ws:
        async with run_client(ws, token, resume=resume, refresh=refresh) as client:
            yield client


@asynccontextmanager
async def run_client(
    ws: WebSocketConnection,
    token: str,
    *,
    resume: dict[str, tuple[int, str]] | None = None,
    refresh: TokenSource | None = None,
) -> AsyncIterator[ParleyClient]:
    """Authenticate on an open WebSocket (of any transport) and run the reader."""
    client = ParleyClient(ws, token)
    if resume:
        client.positions.update(resume)
    client.welcome = welcome = await handshake(client, token, resume)
    with sole_exception():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._read)
            if refresh is not None and welcome.expires is not None:
                nursery.start_soon(client._keep_token_fresh, refresh, welcome.expires)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
