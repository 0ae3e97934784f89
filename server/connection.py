"""One client connection: the WebSocket handshake and framing over a trio Stream.

How this works: after the handshake (``protocol.wsserver.parse_upgrade``), one task
reads: it parses the client's frames (``protocol.wsserver.ClientFrames``) and hands
each complete binary message to the Session, one at a time. Sending is the node's
write pump's job while the socket takes everything (``actors.pump``); a writer task is
started only when it does not (a full socket) and for the closing frames, and ends when
the pump can take over again. The session's timers run on the node's timer task, and
actors' events reach it by direct call (``Session.notify``): an idle connection is one
task. Data frames are built by ``protocol.wsframe`` (once per fan-out, shared by every
recipient), pong and close frames by ``protocol.wsserver``.

Closing: whoever decides (session, reader) calls ``close``; the close frame goes out
after what is already queued, then the reader waits a bounded time for the client's
close frame. A slow consumer's outbox is dropped and it gets the close frame at once.
Each connection is a crash barrier: a bug here or in the session closes this
connection with 1011 and is logged; it never reaches the listener.
"""

import logging
import os

import trio

from actors.outbox import Outbox
from actors.services import Services
from actors.session import BUSY_RECHECK, Session
from actors.timers import Timer
from protocol.errors import CloseCode
from protocol.wsserver import (
    ClientFrames,
    Close,
    Event,
    Failed,
    HandshakeError,
    Message,
    Ping,
    TooBig,
    accept_response,
    close_frame,
    parse_upgrade,
    pong_frame,
)

log = logging.getLogger(__name__)

RECEIVE_BYTES = 65536
HANDSHAKE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 3.0  # how long we wait for the client's close frame, or to send ours
DETACH_TIMEOUT = 2.0  # for telling rooms and the user actor that a session is gone
WS_PATH = "/ws"
SUBPROTOCOL = "parley.v1"


def _read_now(fd: int) -> bytes | None:
    """What the socket holds now: None if nothing yet, b"" at its end or if the client
    reset it. Not inline in the reader: an exception raised in a coroutine gives its
    frame a frame object that stays as long as the coroutine, here as long as an idle
    connection (184 B); raised here, it dies with this call."""
    try:
        return os.read(fd, RECEIVE_BYTES)
    except BlockingIOError:
        return None
    except OSError:
        return b""


async def _handshake(stream: trio.abc.Stream) -> bytes | None:
    """Accept a WebSocket upgrade on /ws, answer anything else with an HTTP error. The
    bytes the client sent after its request (frames already), or None if refused."""
    data = bytearray()  # a head trickling in is neither copied nor searched over again
    with trio.move_on_after(HANDSHAKE_TIMEOUT):
        while True:
            chunk = await stream.receive_some(RECEIVE_BYTES)
            if not chunk:
                return None
            searched = len(data)
            data += chunk
            try:
                upgrade = parse_upgrade(data, WS_PATH, searched)
            except HandshakeError as exc:
                await stream.send_all(exc.response(data))
                return None
            if upgrade is None:
                continue
            chosen = SUBPROTOCOL if SUBPROTOCOL in upgrade.subprotocols else None
            await stream.send_all(accept_response(upgrade.key, chosen))
            return upgrade.rest
    return None


class Connection:
    __slots__ = (
        "_close_frame",
        "_crashed",
        "_early",
        "_flushed",
        "_frame_timer",
        "_scope",
        "_services",
        "_stopped",
        "_stream",
        "_writer_exited",
        "_writer_scope",
        "_writers",
        "_writing",
        "_written",
        "frames",
        "outbox",
        "session",
    )

    def __init__(
        self, stream: trio.abc.Stream, services: Services, peer: str, early: bytes = b""
    ) -> None:
        self._stream = stream
        self._early = early  # frames that came with the handshake
        self._services = services
        self.frames = ClientFrames(services.settings.limits.max_frame_bytes)
        socket = getattr(stream, "socket", None)  # a trio SocketStream; tests use memory
        self.outbox = Outbox(
            services.settings.outbox_bytes,
            on_overflow=self._slow_consumer,
            pump=services.pump,
            fd=socket.fileno() if socket is not None else None,
            on_broken=self._broken,
            start_writer=self._start_writer,
        )
        self.session = Session(services, self.outbox, self._close, peer)
        self._close_frame: bytes | None = None
        self._flushed = False  # the writer sent everything, the final frame too
        self._written: trio.Event | None = None  # made when run() waits for that
        # The connection's lifetime: the close deadline, and what a reset or a failing
        # writer cancels. A scope, not a nursery of our own (1.3 KiB per connection):
        # the writer, when there is one, runs in the nursery this connection runs in
        # (the node's connections nursery), bound to us by its own scope, stopped and
        # waited for before the stream closes, and behind its own crash barrier.
        self._scope = trio.CancelScope()
        self._writers = trio.lowlevel.current_task().parent_nursery
        self._writing = False  # a writer task runs
        self._writer_scope: trio.CancelScope | None = None
        self._writer_exited: trio.Event | None = None
        self._stopped = False  # no writer starts any more
        self._crashed = False  # the writer failed
        # Armed while a frame or a fragmented message is incomplete: a client that
        # trickles one must not hold its session open forever. On the node's timer
        # task, like the session's keep-alive.
        self._frame_timer: Timer | None = None

    async def run(self) -> None:
        try:
            with self._scope:
                # Read until the closing handshake ends or the client goes away. Written
                # out here, not in a method: an idle connection waits in this loop, and
                # each coroutine in the waiting chain is ~250 B per idle session.
                fd = self.outbox.fd
                data: bytes | bytearray = self._early
                self._early = b""
                while True:
                    # Parsing and handling in functions of their own, so the last event
                    # (a message) is not referenced from this frame while it idles.
                    if data and await self._handle(self._feed(bytes(data))):  # free for bytes
                        break
                    data = b""
                    if fd is None:
                        data = await self._receive()
                    else:
                        # A socket: read its non-blocking fd directly and wait with
                        # wait_readable, as trio's receive_some does under four more
                        # layers of coroutines that stayed alive under every idle reader.
                        ready = _read_now(fd)
                        if ready:
                            await trio.lowlevel.checkpoint()  # one per read, as trio's
                        while ready is None:
                            await trio.lowlevel.wait_readable(fd)
                            ready = _read_now(fd)
                        data = ready
                    if not data:
                        break  # the end of the stream, or reset by the client
                if self._close_frame is None:
                    self.outbox.close()  # the client left: flush what we can, then stop
                if not self._flushed:
                    self._written = trio.Event()
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await self._written.wait()
            if self._crashed:
                await self._internal_error()
        except Exception:
            log.exception("connection of %s crashed; closing it", self.session.peer)
            await self._internal_error()
        finally:
            if self._frame_timer is not None:
                self._frame_timer.cancel()
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await self._stop_writer()
            self.outbox.close()  # out of the pump's hands before the socket closes
            try:
                with trio.move_on_after(DETACH_TIMEOUT, shield=True):
                    await self.session.detach()
                await trio.aclose_forcefully(self._stream)  # raises Cancelled at shutdown
            finally:
                self.outbox.disown()
                self.session.release()

    async def _internal_error(self) -> None:
        """Close with 1011 after a bug here, in the session or in the writer."""
        with trio.move_on_after(1, shield=True):
            await self._stop_writer()  # one writer per stream: we send the close frame
            self.outbox.close()  # the pump must not write into our close frame
            self._services.metrics.closes_by[CloseCode.INTERNAL_ERROR].inc()
            if not self.outbox.torn:  # else a close frame would land inside a frame
                await self._send_close_now(CloseCode.INTERNAL_ERROR, "internal error")

    async def _stop_writer(self) -> None:
        self._stopped = True
        if self._writing:
            assert self._writer_scope is not None and self._writer_exited is not None
            self._writer_scope.cancel()
            await self._writer_exited.wait()

    def close(self, code: CloseCode, reason: str) -> None:
        """Close with ``code`` (through the session, which counts it)."""
        self.session.close(code, reason)

    def _slow_consumer(self) -> None:
        # Called from inside some room's fan-out: only flags and a deadline here. The
        # writer sends the close frame if its current send completes; the deadline cuts
        # the connection if it never does.
        self.close(CloseCode.SLOW_CONSUMER, "slow consumer")

    def _broken(self) -> None:
        # The pump could not write: the client reset the connection. Nothing more can
        # reach it, so there is nothing to wait for.
        self._scope.cancel()

    def _close(self, code: CloseCode, reason: str) -> None:
        if self._close_frame is not None:
            return  # a close frame is out already, ours or the answer to the client's
        self._close_frame = close_frame(code, reason)
        self.outbox.close(self._close_frame)
        # The client gets CLOSE_TIMEOUT to take our close frame and answer it.
        scope = self._scope
        scope.deadline = min(scope.deadline, trio.current_time() + CLOSE_TIMEOUT)

    async def _send_close_now(self, code: CloseCode, reason: str) -> None:
        if self._close_frame is None:
            self._close_frame = close_frame(code, reason)
        if self._close_frame is not None:
            try:
                await self._stream.send_all(self._close_frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def _start_writer(self) -> None:
        """The outbox has work for a writer (actors.outbox): start one unless one runs."""
        if not self._writing and not self._stopped and self._writers is not None:
            self._writing = True
            self._writer_scope = scope = trio.CancelScope()
            self._writer_exited = exited = trio.Event()
            self._writers.start_soon(self._write, scope, exited)

    async def _write(self, scope: trio.CancelScope, exited: trio.Event) -> None:
        """Runs in the connections nursery: nothing may escape from here."""
        outbox = self.outbox
        stream = self._stream
        pump = self._services.pump
        try:
            with scope:
                while batch := await outbox.next_batch():
                    await stream.send_all(batch[0] if len(batch) == 1 else b"".join(batch))
                    if outbox.written(pump):
                        return  # the pump has it again; started anew if need be
                if outbox.overflowed:
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await self._send_close_now(CloseCode.SLOW_CONSUMER, "slow consumer")
                    self._scope.cancel()
                self._flushed = True
                if self._written is not None:
                    self._written.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._scope.cancel()
            self._flushed = True
            if self._written is not None:
                self._written.set()
        except Exception:
            log.exception("writer of %s crashed; closing the connection", self.session.peer)
            self._crashed = True
            self._scope.cancel()
        finally:
            self._writing = False
            exited.set()

    async def _receive(self) -> bytes | bytearray:
        """The next read from a stream that is not a socket (tests' memory streams); b""
        at its end."""
        try:
            return await self._stream.receive_some(RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    def _feed(self, data: bytes) -> list[Event]:
        """Parse one read. Only complete frames are signs of life: bytes trickling in
        are not. A frame or message left incomplete gets a deadline from the read in
        which it began."""
        frames = self.frames
        events = frames.feed(data)
        if frames.completed:
            self.session.on_activity()
        timer = self._frame_timer
        if not frames.incomplete:
            if timer is not None:
                timer.cancel()
                self._frame_timer = None
        elif frames.started:
            if timer is not None:
                timer.cancel()
            deadline = trio.current_time() + self._services.settings.frame_timeout
            self._frame_timer = self._services.timers.call_at(deadline, self._frame_late)
        return events

    def _frame_late(self) -> None:
        if self.session.busy:
            # The reader is handling the client's request, not reading: what the client
            # sent meanwhile waits unread. Not the client's delay.
            later = trio.current_time() + BUSY_RECHECK
            self._frame_timer = self._services.timers.call_at(later, self._frame_late)
        else:
            self.close(CloseCode.IDLE_TIMEOUT, "frame not completed in time")

    async def _handle(self, events: list[Event]) -> bool:
        """Act on the client's frames; True once the closing handshake is over."""
        session = self.session
        for event in events:
            kind = type(event)
            if kind is Message:
                if self._close_frame is not None:
                    continue  # we are closing: the rest is ignored
                assert isinstance(event, Message)
                if event.text:
                    session.on_text(len(event.data))
                else:
                    await session.on_message(event.data)
            elif kind is Ping:
                # A WebSocket ping takes a rate token like any frame; one over the
                # rate is not answered (there is no error frame for it).
                if self._close_frame is None and session.allow_control_frame():
                    assert isinstance(event, Ping)
                    self.outbox.append(pong_frame(event.payload))
            elif kind is Close:
                if self._close_frame is not None:
                    return True  # the client answered our close frame
                # The client closes: answer, and stop once the answer is out.
                assert isinstance(event, Close)
                self._close_frame = close_frame(event.code, event.reason)
                self.outbox.close(self._close_frame)
                return True
            elif kind is TooBig:
                assert isinstance(event, TooBig)
                self.close(CloseCode.MESSAGE_TOO_BIG, event.reason)
            elif kind is Failed:
                assert isinstance(event, Failed)
                self.close(event.code, event.reason)
        return False


class Admission:
    """Client sockets open, in total and per address, from accept to close (handshakes
    included): what ``--max-connections`` and ``--max-connections-per-address`` bound.
    ``peer`` is "host:port"; the port does not count."""

    def __init__(self, max_total: int, max_per_address: int) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address  # 0: no limit
        self.open = 0
        self.by_address: dict[str, int] = {}

    def admit(self, peer: str) -> str | None:
        """Count a socket from ``peer``; or, over a limit, the reason it is refused
        (not counted): "max_connections" or "per_address"."""
        if self.open >= self.max_total:
            return "max_connections"
        host = peer.rpartition(":")[0]
        n = self.by_address.get(host, 0)
        if self.max_per_address and n >= self.max_per_address:
            return "per_address"
        self.by_address[host] = n + 1
        self.open += 1
        return None

    def release(self, peer: str) -> None:
        host = peer.rpartition(":")[0]
        n = self.by_address[host] - 1
        if n:
            self.by_address[host] = n
        else:
            del self.by_address[host]  # the map holds only addresses with sockets open
        self.open -= 1


async def serve_connection(
    stream: trio.abc.Stream,
    services: Services,
    connections: set[Connection],
    peer: str,
    admission: Admission | None = None,
) -> None:
    """Run one client connection to its end, and close its stream; then ``admission``
    counts it gone. Nothing here may reach the listener."""
    try:
        try:
            early = await _handshake(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception:
            log.exception("handshake with %s failed; closing it", peer)
            return
        if early is None:
            return
        try:
            conn = Connection(stream, services, peer, early)
        except Exception:
            log.exception("connection of %s could not start; closing it", peer)
            return
        connections.add(conn)
        services.metrics.connections.inc()
        try:
            await conn.run()
        finally:
            connections.discard(conn)
            services.metrics.connections.dec()
    finally:
        await trio.aclose_forcefully(stream)
        if admission is not None:
            admission.release(peer)
