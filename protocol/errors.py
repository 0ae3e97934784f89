"""Error codes, close codes and the protocol's exceptions.

Error codes travel in ``error`` frames and are stable: a client may switch on them.
Close codes travel in the WebSocket close frame when the server ends a session.
Both tables are reproduced in PROTOCOL.md; ``tests/test_codec.py`` checks they agree.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum


class ErrorCode(IntEnum):
    """The ``code`` of an ``error`` frame."""

    # 1xx: the client's frame is wrong; the session goes on.
    BAD_FRAME = 100
    UNKNOWN_TYPE = 101
    INVALID = 102
    TOO_LARGE = 103
    RATE_LIMITED = 104
    NOT_AUTHENTICATED = 105
    ALREADY_AUTHENTICATED = 106
    UNSUPPORTED_VERSION = 107
    UNAUTHORIZED = 108
    # 2xx: the request is well formed but not allowed.
    FORBIDDEN = 200
    NOT_FOUND = 201
    ROOM_EXISTS = 202
    TOO_MANY_ROOMS = 203
    BLOCKED = 204
    TOO_MANY_WATCHES = 205
    KV_STALE = 206  # only in kvack items: a newer write of the key is stored
    KV_CONFLICT = 207  # only in kvack items: the key's revision is not the expected one
    KV_QUOTA = 208  # only in kvack items: the user's map would exceed its quota
    CLOCK_SKEW = 209  # only in kvack items: the write's clock is too far ahead of the server's
    QUOTA_EXCEEDED = 210  # sessions per user, rooms created per hour, rooms named per minute
    TOO_MANY_VIEWS = 211  # feed views open at once in one session
    # 3xx: the server cannot do it now; retrying later may work.
    TRY_LATER = 300
    INTERNAL = 301
    TIMEOUT = 302


class CloseCode(IntEnum):
    """WebSocket close codes the server sends."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    INVALID_DATA = 1007
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    UNAUTHORIZED = 4001
    UNSUPPORTED_VERSION = 4002
    HELLO_TIMEOUT = 4003
    IDLE_TIMEOUT = 4004
    SLOW_CONSUMER = 4005
    TOO_MANY_ERRORS = 4006
    TOKEN_EXPIRED = 4007
    TOO_MANY_SESSIONS = 4008
    MOVED = 4009


class ProtocolError(Exception):
    """A violation of the Parley protocol.

    ``code`` is what the ``error`` frame carries; ``close`` is set when the session
    must end, with that WebSocket close code; ``request_id`` lets the error frame name
    the request it answers.
    """

    def __init__(self, code: ErrorCode, message: str, *, close: CloseCode | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.close = close
        self.request_id: int | None = None  # the ``id`` of the offending frame, if readable

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r})"


class RemoteProtocolError(ProtocolError):
    """The peer sent something that breaks the protocol."""


class LocalProtocolError(ProtocolError):
    """We were about to send something that breaks the protocol: a bug on our side."""


@contextmanager
def sole_exception() -> Iterator[None]:
    """Raise the one exception of a group as itself.

    Trio wraps whatever leaves a nursery in an ExceptionGroup; a caller of this client
    should be able to write ``except ServerError``, as with trio-websocket's own API.
    Groups of several exceptions are left alone.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        sole: BaseException = group
        while isinstance(sole, BaseExceptionGroup) and len(sole.exceptions) == 1:
            sole = sole.exceptions[0]
        if sole is group:
            raise
        raise sole from None
