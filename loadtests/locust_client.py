"""A Parley session for Locust: the protocol's own codec over websocket-client, under
gevent, with every request timed and reported as a Locust request.

One greenlet reads the socket: it answers the server's ``ping``, hands each reply to the
request waiting for its ``id``, checks every ``message`` (``loadtests.delivery``) and
reports its publish-to-deliver latency, and passes the other frames to ``on_frame``.
A request is timed from just before its frame is written to the moment the reader
decoded its answer, so the waiting greenlet's wake-up is not in the figure.

Why websocket-client: it costs the load generator 15 to 20 % less CPU per round trip
than wsproto over a gevent socket (``python -m loadtests.locust_transport``; the figures
are in loadtests/README.md), and it is well kept and typed.
This module imports no trio: the Locust processes run gevent only.
"""

import itertools
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import gevent
import websocket
from gevent.event import AsyncResult
from locust.event import EventHook

from loadtests.backoff import FINAL_CLOSES, Backoff
from loadtests.delivery import DeliveryCheck, Verdict
from protocol.codec import decode_server, encode
from protocol.errors import ErrorCode, RemoteProtocolError
from protocol.frames import (
    PROTOCOL_VERSION,
    Error,
    Frame,
    Goaway,
    Hello,
    Joined,
    Message,
    Ping,
    Pong,
    Welcome,
)

F = TypeVar("F", bound=Frame)

# Request types, Locust's "Type" column; the name says which request and which answer.
SESSION = "session"
DELIVER = "deliver"
REPLAY = "replay"  # messages a resume replayed: their latency includes the time away

log = logging.getLogger("parley.locust")


class ParleyFailure(Exception):
    """A request that failed; its text is what Locust groups failures by, so it names the
    protocol's error or close code and never varies with the request."""


def error_name(code: int) -> str:
    try:
        return f"{ErrorCode(code).name} ({code})"
    except ValueError:
        return f"error {code}"


class _Pending:
    __slots__ = ("answered_at", "result", "started")

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.answered_at = 0.0
        self.result: AsyncResult[Any] = AsyncResult()


class Session:
    """One WebSocket session. ``url`` is the server's ``ws://host:port/ws``."""

    def __init__(
        self,
        url: str,
        token: str,
        request_event: EventHook,
        check: DeliveryCheck,
        *,
        timeout: float = 10.0,
        deliver_name: str = "message",
        on_frame: Callable[[Frame], None] | None = None,
    ) -> None:
        self.url = url
        self.token = token
        self.check = check
        self.timeout = timeout
        self.deliver_name = deliver_name
        self.on_frame = on_frame
        self.epochs: dict[str, str] = {}  # room -> epoch, for the next resume
        self.close_code: int | None = None
        self.wanted = False  # connected, or meant to be: dropped, not closed
        self.backoff = Backoff()  # when to reconnect
        self.given_up: str | None = None  # a close after which reconnecting cannot help
        self.connecting = False
        self.user = ""
        self._fire = request_event.fire
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._ws: websocket.WebSocket | None = None
        self._reader: gevent.Greenlet[Any, Any] | None = None
        self._replaying: set[str] = set()  # resumed rooms not answered yet
        self._replay_ends: dict[str, int] = {}  # room -> the last seq its resume replays
        self._hello = self._resumed = _Pending()
        self._resume_fault: str | None = None

    # --- connecting ----------------------------------------------------------------

    def connect(self, *, resume: bool = False) -> Welcome:
        """Open the WebSocket and say hello (with the rooms' positions if ``resume``).
        Reported as ``connect`` (the handshake) and ``hello→welcome``, or
        ``resume→joined`` when resuming: timed to the last resumed room's ``joined``.
        A failure leaves no connection behind and backs off (``loadtests.backoff``)."""
        if self._ws is not None:
            self.drop()
        self.wanted = True
        self.connecting = True
        try:
            welcome = self._connect(resume)
        except ParleyFailure:
            self.drop()
            self.backoff.failed(time.monotonic())
            raise
        finally:
            self.connecting = False
        self.backoff.succeeded()
        return welcome

    def _connect(self, resume: bool) -> Welcome:
        self.close_code = None
        positions = self.check.positions() if resume else {}
        rooms = {r: (seq, self.epochs[r]) for r, seq in positions.items() if r in self.epochs}
        started = time.perf_counter()
        try:
            ws = websocket.create_connection(
                self.url,
                timeout=self.timeout,
                subprotocols=["parley.v1"],
                enable_multithread=True,  # the send lock: tasks and the reader both write
                skip_utf8_validation=True,
            )
        except websocket.WebSocketBadStatusException as exc:
            # 429 or 503 (PROTOCOL.md section 1): wait at least Retry-After.
            headers = exc.resp_headers or {}
            wait = headers.get("retry-after", "")
            if wait.isdigit():
                self.backoff.server_asks(time.monotonic(), int(wait))
            refused = ParleyFailure(f"HTTP {exc.status_code}")
            self._report(SESSION, "connect", started, refused)
            raise refused from exc
        except (OSError, websocket.WebSocketException) as exc:
            self._report(SESSION, "connect", started, ParleyFailure(type(exc).__name__))
            raise ParleyFailure(f"connect: {type(exc).__name__}") from exc
        self._ws = ws
        self._report(SESSION, "connect", started, None)
        assert ws.sock is not None
        ws.sock.settimeout(None)  # the reader waits as long as the session lives
        ws.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._replaying = set(rooms)
        self._hello = _Pending()
        self._resumed = _Pending()
        self._resume_fault = None
        self._reader = gevent.spawn(self._read_loop, ws)
        hello = Hello(v=PROTOCOL_VERSION, token=self.token, resume=rooms or None)
        try:
            self.send(hello)
        except ParleyFailure as exc:
            self._report(SESSION, "hello→welcome", self._hello.started, exc)
            raise
        welcome = self._wait(self._hello, SESSION, "hello→welcome")
        if not isinstance(welcome, Welcome):
            raise ParleyFailure(f"hello answered with {type(welcome).__name__}")
        if rooms:
            self._resumed.started = self._hello.started
            if not self._replaying:
                self._resumed.answered_at = self._hello.answered_at
                self._resumed.result.set(None)
            self._wait(self._resumed, SESSION, "resume→joined")
        self.user = welcome.user
        return welcome

    def drop(self) -> None:
        """Lose the connection as a phone does: no close frame, the socket just goes."""
        ws, self._ws = self._ws, None
        if ws is not None and ws.sock is not None:
            ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            ws.sock.close()  # a reset: the server sees the session end at once
        self._stop_reader()

    def close(self) -> None:
        """Close with 1000, as a client that quits does."""
        self.wanted = False
        ws, self._ws = self._ws, None
        self._stop_reader(block=True)  # the close handshake reads the socket itself
        if ws is not None:
            try:
                ws.close(timeout=1)
            except (OSError, websocket.WebSocketException):
                pass  # closing anyway; nothing waits on it

    def _stop_reader(self, block: bool = False) -> None:
        reader, self._reader = self._reader, None
        if reader is not None and reader is not gevent.getcurrent():
            reader.kill(block=block)
        self._fail_pending("connection closed")

    @property
    def connected(self) -> bool:
        return self._ws is not None and self.close_code is None

    # --- requests ------------------------------------------------------------------

    def next_id(self) -> int:
        return next(self._ids)

    def request(self, frame: Frame, expect: type[F], kind: str, name: str) -> F:
        """Send ``frame`` (its ``id`` from ``next_id``) and wait for its answer, reported
        as ``kind``/``name``. Raises ``ParleyFailure`` (reported as a failure already)."""
        request_id: int = frame.id  # type: ignore[attr-defined]
        return self._ask(frame, request_id, expect, kind, name)

    def send(self, frame: Frame) -> None:
        """Send a frame that has no answer to wait for."""
        if self._ws is None:
            raise ParleyFailure("not connected")
        # The socket has no timeout (the reader's wait is unbounded): bound the send,
        # which a server that stopped reading would otherwise hold forever.
        timer = gevent.Timeout(self.timeout)
        timer.start()
        try:
            self._ws.send_bytes(encode(frame))
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            raise ParleyFailure(f"send: no progress in {self.timeout:g} s") from None
        except (OSError, websocket.WebSocketException) as exc:
            raise ParleyFailure(f"send: {type(exc).__name__}") from exc
        finally:
            timer.close()

    def _ask(self, frame: Frame, key: int, expect: type[F], kind: str, name: str) -> F:
        pending = self._pending[key] = _Pending()
        try:
            self.send(frame)
        except ParleyFailure as exc:
            self._pending.pop(key, None)
            self._report(kind, name, pending.started, exc)
            raise
        try:
            reply = self._wait(pending, kind, name)
        finally:
            self._pending.pop(key, None)
        if not isinstance(reply, expect):
            wrong = ParleyFailure(f"expected {expect.__name__}, got {type(reply).__name__}")
            self._report(kind, name, pending.started, wrong, pending.answered_at)
            raise wrong
        return reply

    def _wait(self, pending: _Pending, kind: str, name: str) -> Any:
        try:
            reply = pending.result.get(timeout=self.timeout)
        except gevent.Timeout:
            late = ParleyFailure(f"no answer in {self.timeout:g} s")
            self._report(kind, name, pending.started, late)
            raise late from None
        except ParleyFailure as exc:
            self._report(kind, name, pending.started, exc)
            raise
        if isinstance(reply, Error):
            refused = ParleyFailure(error_name(reply.code))
            self._report(kind, name, pending.started, refused, pending.answered_at)
            raise refused
        self._report(kind, name, pending.started, None, pending.answered_at)
        return reply

    def _report(
        self,
        kind: str,
        name: str,
        started: float,
        exc: Exception | None,
        ended: float = 0.0,
    ) -> None:
        elapsed = (ended or time.perf_counter()) - started
        self._fire(
            request_type=kind,
            name=name,
            response_time=elapsed * 1000,
            response_length=0,
            exception=exc,
            context={},
        )

    def _fail_pending(self, why: str) -> None:
        for pending in [*self._pending.values(), self._hello, self._resumed]:
            if not pending.result.ready():
                pending.result.set_exception(ParleyFailure(why))

    # --- reading -------------------------------------------------------------------

    def _read_loop(self, ws: websocket.WebSocket) -> None:
        """Read until the connection ends; only the current connection's reader touches
        the session's state (an old one may still be unwinding after a reconnect)."""
        code, why = 1006, "connection lost"
        try:
            while True:
                opcode, data = ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
                    why = f"closed {code}"
                    return
                if opcode == websocket.ABNF.OPCODE_BINARY and self._ws is ws:
                    self._dispatch(data)
        except (OSError, websocket.WebSocketException, ParleyFailure):
            pass
        except Exception:
            log.exception("the reader of %s failed; closing the connection", self.user)
            why = "the load generator's reader failed"
        finally:
            if self._ws is ws:
                self.close_code = code
                if code in FINAL_CLOSES:
                    self.given_up = f"closed {code} ({FINAL_CLOSES[code]})"
                self._fail_pending(why)
                self._ws = None
                if code == 1006 and ws.sock is not None:
                    ws.sock.close()  # whatever broke, the connection is over

    def _dispatch(self, data: bytes) -> None:
        try:
            frame = decode_server(data)
        except RemoteProtocolError as exc:
            if exc.code == ErrorCode.UNKNOWN_TYPE:
                return  # a newer server's frame: ignored, as PROTOCOL.md section 2 says
            raise
        if type(frame) is Message:
            self._delivered(frame)
            return
        if type(frame) is Ping:
            self.send(Pong(id=frame.id))
            return
        if type(frame) is Joined:
            self._joined(frame)
        key = getattr(frame, "id", None)
        if key is not None and (pending := self._pending.get(key)) is not None:
            pending.answered_at = time.perf_counter()
            pending.result.set(frame)
        elif type(frame) is Welcome or (type(frame) is Error and not self._hello.result.ready()):
            self._hello.answered_at = time.perf_counter()
            self._hello.result.set(frame)
        elif type(frame) is Error and frame.room in self._replaying:
            self.check.forget(frame.room)  # not subscribed: the user joins it again
            self._resumed_room(frame.room, f"resumed room: {error_name(frame.code)}")
        elif type(frame) is Goaway:
            self.backoff.server_asks(time.monotonic(), (frame.delay or 0) / 1000)
        elif self.on_frame is not None:
            self.on_frame(frame)

    def _joined(self, frame: Joined) -> None:
        self.epochs[frame.room] = frame.epoch
        self.check.joined(frame.room, frame.seq, frame.recovered)
        if frame.recovered:
            self._replay_ends[frame.room] = frame.seq
        if frame.id is None and frame.room in self._replaying:
            fault = "not recovered" if frame.recovered is False else None
            self._resumed_room(frame.room, fault)

    def _resumed_room(self, room: str, fault: str | None) -> None:
        """One resumed room answered; the resume fails if any room's answer did."""
        self._replaying.discard(room)
        self._resume_fault = self._resume_fault or fault
        if not self._replaying and not self._resumed.result.ready():
            self._resumed.answered_at = time.perf_counter()
            if self._resume_fault:
                self._resumed.result.set_exception(ParleyFailure(self._resume_fault))
            else:
                self._resumed.result.set(None)

    def _delivered(self, frame: Message) -> None:
        verdict = self.check.message(frame.room, frame.seq)
        sent = frame.data.get("t") if isinstance(frame.data, dict) else None
        if verdict is Verdict.IN_ORDER or verdict is Verdict.GAP:
            replayed = frame.seq <= self._replay_ends.get(frame.room, 0)
            if isinstance(sent, float):
                latency = max(0.0, time.time() - sent) * 1000
                self._fire(
                    request_type=REPLAY if replayed else DELIVER,
                    name=self.deliver_name,
                    response_time=latency,
                    response_length=len(frame.text or ""),
                    exception=None,
                    context={},
                )
        elif verdict is not Verdict.UNTRACKED:
            self.fault(verdict.value)
        if verdict is Verdict.GAP:
            self.fault("gap (missing seqs)")

    def fault(self, what: str, count: int = 1) -> None:
        """Report ``count`` faulty deliveries ("lost", "duplicate", …) as failures."""
        for _ in range(count):
            self._fire(
                request_type=DELIVER,
                name=self.deliver_name,
                response_time=0,
                response_length=0,
                exception=ParleyFailure(what),
                context={},
            )
