"""Peer "floor": the least a Python server can do per delivery, to measure the floor.

    python floor_server.py PORT

The "websockets" contract (see ``loadtests.peers``) on one epoll loop of raw non-blocking
sockets and nothing else: the upgrade answered by hand, client frames unmasked, and a
broadcast that frames the text once and writes it to each other member with one
``os.write``. Its system time per delivery is the kernel's cost of a loopback send, which
no server in any language avoids while each delivery is its own write; its user time is
the least Python adds to it. No pings, no limits, no error handling beyond dropping a
connection: not a server to run, a ruler to measure with. Only the standard library.
"""

import base64
import hashlib
import os
import select
import signal
import socket
import struct
import sys
from urllib.parse import parse_qs, urlsplit

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B65"


def frame(payload: bytes, opcode: int = 1) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + struct.pack("!H", n) + payload
    return bytes((0x80 | opcode, 127)) + struct.pack("!Q", n) + payload


OK = frame(b"ok")


class Conn:
    __slots__ = ("buf", "fd", "room", "sock", "upgraded")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = b""
        self.room = ""
        self.upgraded = False


def upgrade_response(buf: bytes) -> tuple[bytes | None, str, bytes]:
    """The 101 answer to a complete upgrade request at the head of ``buf``, the room its
    URL names and the bytes after it; (None, "", buf) while the head is incomplete."""
    head, sep, rest = buf.partition(b"\r\n\r\n")
    if not sep:
        return None, "", buf
    lines = head.split(b"\r\n")
    key = b""
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            key = value.strip()
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    path = lines[0].split(b" ")[1].decode()
    room = parse_qs(urlsplit(path).query).get("room", [""])[0]
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    return answer, room, rest


def unmask_frames(buf: bytes) -> tuple[list[tuple[str, bytes]], bytes, bool]:
    """The complete client frames at the head of ``buf``: each text frame's (room, text),
    the bytes after them, and whether a close frame came (what follows it is dropped)."""
    texts: list[tuple[str, bytes]] = []
    while len(buf) >= 6:
        opcode, n = buf[0] & 0x0F, buf[1] & 0x7F
        at = 2
        if n == 126:
            n, at = struct.unpack_from("!H", buf, 2)[0], 4
        elif n == 127:
            n, at = struct.unpack_from("!Q", buf, 2)[0], 10
        if len(buf) < at + 4 + n:
            break
        mask = buf[at : at + 4]
        data = bytes(b ^ mask[i & 3] for i, b in enumerate(buf[at + 4 : at + 4 + n]))
        buf = buf[at + 4 + n :]
        if opcode == 8:
            return texts, b"", True
        if opcode == 1:
            target, _, text = data.partition(b"\n")
            texts.append((target.decode(), text))
    return texts, buf, False


def main() -> None:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: floor_server.py PORT")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", int(sys.argv[1])))
    listener.listen(4096)
    listener.setblocking(False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ep = select.epoll()
    ep.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, Conn] = {}
    rooms: dict[str, dict[int, Conn]] = {}

    def drop(c: Conn) -> None:
        conns.pop(c.fd, None)
        rooms.get(c.room, {}).pop(c.fd, None)
        ep.unregister(c.fd)
        c.sock.close()

    def upgrade(c: Conn) -> None:
        answer, c.room, c.buf = upgrade_response(c.buf)
        if answer is not None:
            rooms.setdefault(c.room, {})[c.fd] = c
            c.sock.send(answer)
            c.upgraded = True

    def frames(c: Conn) -> None:
        texts, c.buf, closed = unmask_frames(c.buf)
        write = os.write
        for target, text in texts:
            out = frame(text)
            for fd in rooms.get(target, {}):
                if fd != c.fd:
                    try:
                        write(fd, out)  # a short write tears the frame: it shows as lost
                    except OSError:
                        pass  # a full or reset socket: that delivery is lost, and shows
            try:
                write(c.fd, OK)
            except OSError:
                pass
        if closed:
            drop(c)

    while True:
        for fd, _ in ep.poll():
            if fd == listener.fileno():
                while True:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[sock.fileno()] = Conn(sock)
                    ep.register(sock.fileno(), select.EPOLLIN)
                continue
            c = conns.get(fd)
            if c is None:
                continue
            try:
                data = c.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                drop(c)
                continue
            c.buf += data
            if not c.upgraded:
                upgrade(c)
            if c.upgraded:
                frames(c)


if __name__ == "__main__":
    main()
