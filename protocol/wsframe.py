"""WebSocket frame bytes, built without a connection object.

A server-to-client frame is unmasked and, without per-connection compression, its bytes
are the same for every recipient: the fan-out path builds it once with ``server_frame``
and hands the same ``bytes`` object to every session ("encode once").
``parse_server_frames`` is the matching reader for load generators that cannot afford
a full WebSocket client per connection.
"""

import os
import struct

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_FIN = 0x80
_LEN16 = struct.Struct("!BBH")
_LEN64 = struct.Struct("!BBQ")


def server_frame(payload: bytes, opcode: int = OP_BINARY) -> bytes:
    """One final, unmasked frame carrying ``payload``."""
    n = len(payload)
    if n < 126:
        return bytes((_FIN | opcode, n)) + payload
    if n < 65536:
        return _LEN16.pack(_FIN | opcode, 126, n) + payload
    return _LEN64.pack(_FIN | opcode, 127, n) + payload


def client_frame(payload: bytes, opcode: int = OP_BINARY, mask: bytes | None = None) -> bytes:
    """One final, masked frame, as a client must send it."""
    key = os.urandom(4) if mask is None else mask
    n = len(payload)
    if n < 126:
        header = bytes((_FIN | opcode, 0x80 | n))
    elif n < 65536:
        header = _LEN16.pack(_FIN | opcode, 0x80 | 126, n)
    else:
        header = _LEN64.pack(_FIN | opcode, 0x80 | 127, n)
    # XOR the whole payload at once through int arithmetic: fast enough for a client.
    repeated = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")
    return header + key + masked


def parse_server_frames(buffer: bytes | bytearray) -> tuple[list[tuple[int, bytes]], int]:
    """Split complete unmasked frames off the front of ``buffer``.

    Returns ``[(opcode, payload), ...]`` and how many bytes they used; the rest is an
    incomplete frame to keep for the next read. Fragmented messages are not used by
    the Parley server and are returned frame by frame.
    """
    frames = []
    pos = 0
    end = len(buffer)
    while end - pos >= 2:
        opcode = buffer[pos] & 0x0F
        n = buffer[pos + 1] & 0x7F
        head = 2
        if n == 126:
            if end - pos < 4:
                break
            n = int.from_bytes(buffer[pos + 2 : pos + 4], "big")
            head = 4
        elif n == 127:
            if end - pos < 10:
                break
            n = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
            head = 10
        if end - pos < head + n:
            break
        frames.append((opcode, bytes(buffer[pos + head : pos + head + n])))
        pos += head + n
    return frames, pos
