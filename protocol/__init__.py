"""Parley's wire protocol, sans-IO: frames, CBOR codec, limits, errors, WebSocket frames.

The server, the Python client, the load generators and the fuzzers all use this package;
nothing here touches a socket or a clock.
"""

from protocol.codec import decode_client, decode_server, encode, to_map
from protocol.errors import (
    CloseCode,
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from protocol.frames import (
    PROTOCOL_VERSION,
    Create,
    Direct,
    Error,
    Frame,
    Goaway,
    Hello,
    History,
    Invite,
    Join,
    Joined,
    Leave,
    Member,
    MemberOp,
    Message,
    Ok,
    Page,
    Ping,
    Pong,
    RoomKind,
    Send,
    Sent,
    Unsubscribe,
    Welcome,
)
from protocol.limits import Limits, direct_room_id

__all__ = [
    "PROTOCOL_VERSION",
    "CloseCode",
    "Create",
    "Direct",
    "Error",
    "ErrorCode",
    "Frame",
    "Goaway",
    "Hello",
    "History",
    "Invite",
    "Join",
    "Joined",
    "Leave",
    "Limits",
    "LocalProtocolError",
    "Member",
    "MemberOp",
    "Message",
    "Ok",
    "Page",
    "Ping",
    "Pong",
    "ProtocolError",
    "RemoteProtocolError",
    "RoomKind",
    "Send",
    "Sent",
    "Unsubscribe",
    "Welcome",
    "decode_client",
    "decode_server",
    "direct_room_id",
    "encode",
    "to_map",
]
