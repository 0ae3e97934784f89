"""A bare Parley connection for load generation: wsproto for the handshake only, then
frames parsed straight off the socket with ``protocol.wsframe``. Several thousand of
these fit in one process, where full WebSocket clients would saturate it first."""

import cbor2
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, Request

from protocol.codec import encode
from protocol.frames import PROTOCOL_VERSION, TYPE_KEY, Frame, Hello
from protocol.wsframe import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, client_frame
from protocol.wsframe import parse_server_frames as parse

WELCOME = 4
ERROR = 5


class RawClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.closed = False
        self.close_code: int | None = None  # the server's, once it closed
        self._buffer = bytearray()

    @classmethod
    async def connect(cls, host: str, port: int, token: str) -> "RawClient":
        return await cls.start(await trio.open_tcp_stream(host, port), f"{host}:{port}", token)

    @classmethod
    async def start(cls, stream: trio.SocketStream, host: str, token: str) -> "RawClient":
        """Upgrade ``stream`` to WebSocket and say hello."""
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host=host, target="/ws")))
        accepted = False
        while not accepted:
            data = await stream.receive_some(65536)
            if not data:
                raise ConnectionError("closed during the handshake")
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    accepted = True
                elif isinstance(event, RejectConnection):
                    raise ConnectionError(f"rejected: HTTP {event.status_code}")
        client = cls(stream)
        await client.send(Hello(v=PROTOCOL_VERSION, token=token))
        while True:
            for payload in await client.receive():
                reply = cbor2.loads(payload)
                if reply.get(TYPE_KEY) == WELCOME:
                    return client
                if reply.get(TYPE_KEY) == ERROR:
                    raise ConnectionError(f"hello refused: {reply}")

    async def send(self, frame: Frame) -> None:
        await self.stream.send_all(client_frame(encode(frame)))

    async def receive(self) -> list[bytes]:
        """The binary payloads of one read (maybe none); answers WebSocket pings.

        Raises ``EOFError`` once the server has closed."""
        if self.closed:
            raise EOFError("connection closed")
        data = await self.stream.receive_some(262144)
        if not data:
            self.closed = True
            raise EOFError("connection closed")
        self._buffer += data
        frames, used = parse(self._buffer)
        del self._buffer[:used]
        payloads = []
        for opcode, payload in frames:
            if opcode == OP_BINARY:
                payloads.append(payload)
            elif opcode == OP_PING:
                await self.stream.send_all(client_frame(payload, OP_PONG))
            elif opcode == OP_CLOSE:
                self.closed = True
                if len(payload) >= 2:
                    self.close_code = int.from_bytes(payload[:2], "big")
                break
        return payloads

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
