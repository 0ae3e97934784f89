"""What types alone cannot say of a client's frame: identifiers, lengths, combinations.

``validate`` runs on every frame ``protocol.codec.decode_client`` built; it raises
``RemoteProtocolError`` at the first rule broken, with a short message that never repeats
what the client sent. Lengths of text are counted in Unicode code points, as Python's
``len`` does (PROTOCOL.md section 3): a JavaScript client counting UTF-16 units sees more
for characters outside the Basic Multilingual Plane.
"""

from collections.abc import Callable
from typing import Any

from protocol.errors import ErrorCode, RemoteProtocolError
from protocol.frames import (
    Block,
    Create,
    Direct,
    FeedMore,
    FeedOpen,
    Follow,
    Frame,
    Hello,
    History,
    Interests,
    Invite,
    Join,
    KvPut,
    KvSync,
    Leave,
    Post,
    Receipt,
    Receipts,
    Refresh,
    RoomKind,
    Rooms,
    Send,
    SetStatus,
    Status,
    Typing,
    Unblock,
    Unfollow,
    Unsubscribe,
    Unwatch,
    Watch,
    Who,
)
from protocol.limits import (
    DIRECT_PREFIX,
    MAX_CID_CHARS,
    MAX_EPOCH_CHARS,
    MAX_FEED_PAGE,
    MAX_KV_PAGE,
    MAX_RADIUS_M,
    MAX_RECEIPT_RANGE,
    MAX_ROOM_PAGE,
    MAX_USERS_PER_REQUEST,
    MIN_RADIUS_M,
    POST_PREFIX,
    Limits,
    is_device_id,
    is_room_id,
    is_user_id,
)

MAX_TOKEN_CHARS = 4096
ROOM_RULE = "1-128 of A-Z a-z 0-9 _ . @ + = ~ : -"
USER_RULE = "1-64 of A-Z a-z 0-9 _ . @ + = ~ -"


def _invalid(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.INVALID, message)


def _too_large(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.TOO_LARGE, message)


def check_room(room: str) -> None:
    if not is_room_id(room):
        raise _invalid(f"bad room id: {ROOM_RULE}")


def check_user(user: str) -> None:
    if not is_user_id(user):
        raise _invalid(f"bad user id: {USER_RULE}")


def _token(frame: Hello | Refresh, limits: Limits) -> None:
    if len(frame.token) > MAX_TOKEN_CHARS:
        raise _too_large(f"token longer than {MAX_TOKEN_CHARS} characters")


def _hello(frame: Hello, limits: Limits) -> None:
    _token(frame, limits)
    for room, (_, epoch) in (frame.resume or {}).items():
        check_room(room)
        if len(epoch) > MAX_EPOCH_CHARS:
            raise _invalid(f"resume: epoch longer than {MAX_EPOCH_CHARS} characters")


def _send(frame: Send, limits: Limits) -> None:
    check_room(frame.room)
    _content("send", frame, limits)


def _content(name: str, frame: Send | Post, limits: Limits) -> None:
    """The cid, text and data of a ``send`` or a ``post``."""
    if not 0 < len(frame.cid) <= MAX_CID_CHARS:
        raise _invalid(f"cid must be 1-{MAX_CID_CHARS} characters")
    # PostgreSQL text cannot hold NUL, and a record storage refuses would hold up every
    # write after it.
    if "\x00" in frame.cid or (frame.text is not None and "\x00" in frame.text):
        raise _invalid("cid and text may not contain NUL (U+0000)")
    if frame.text is None and frame.data is None:
        raise _invalid(f"{name} needs text, data or both")
    if frame.text is not None and len(frame.text) > limits.max_text_chars:
        raise _too_large(f"text longer than {limits.max_text_chars} characters")
    # data's size was refused by the decoder, which reads no further than the limit.


def _create(frame: Create, limits: Limits) -> None:
    check_room(frame.room)
    if frame.room.startswith(DIRECT_PREFIX):
        raise _invalid(f"room ids starting with {DIRECT_PREFIX!r} are for direct rooms")
    if frame.room.startswith(POST_PREFIX):
        raise _invalid(f"room ids starting with {POST_PREFIX!r} are for posts' comments")
    if frame.kind is RoomKind.DIRECT:
        raise _invalid("direct rooms are opened with a direct frame")


def _join(frame: Join, limits: Limits) -> None:
    check_room(frame.room)
    if (frame.seq is None) != (frame.epoch is None):
        raise _invalid("join resumes with both seq and epoch, or neither")
    if frame.epoch is not None and len(frame.epoch) > MAX_EPOCH_CHARS:
        raise _invalid(f"epoch longer than {MAX_EPOCH_CHARS} characters")


def _room_only(frame: Leave | Unsubscribe | Typing, limits: Limits) -> None:
    check_room(frame.room)


def _invite(frame: Invite, limits: Limits) -> None:
    check_room(frame.room)
    check_user(frame.user)


def _user_only(frame: Direct | Block | Unblock | Follow | Unfollow, limits: Limits) -> None:
    check_user(frame.user)


def _rooms(frame: Rooms, limits: Limits) -> None:
    if frame.room is not None:
        check_room(frame.room)
    if frame.limit is not None and not 0 < frame.limit <= MAX_ROOM_PAGE:
        raise _invalid(f"limit must be 1-{MAX_ROOM_PAGE}")


def _receipt(frame: Receipt, limits: Limits) -> None:
    check_room(frame.room)
    if frame.delivered is None and frame.read is None:
        raise _invalid("receipt needs delivered, read or both")


def _receipts(frame: Receipts, limits: Limits) -> None:
    check_room(frame.room)
    if frame.limit is not None:
        if frame.seq is None:
            raise _invalid("receipts with a limit needs the first seq")
        if not 0 < frame.limit <= MAX_RECEIPT_RANGE:
            raise _invalid(f"limit must be 1-{MAX_RECEIPT_RANGE}")


def _set_status(frame: SetStatus, limits: Limits) -> None:
    if frame.status is Status.OFFLINE:
        raise _invalid("status may be online, away or dnd; offline is the server's to say")


def _users(frame: Who | Watch | Unwatch, limits: Limits) -> None:
    if not frame.users:  # the codec refused more than the maximum before reading any
        raise _invalid(f"name 1-{MAX_USERS_PER_REQUEST} users")
    for user in frame.users:
        check_user(user)


def _kv_put(frame: KvPut, limits: Limits) -> None:
    if not is_device_id(frame.dev):
        raise _invalid(f"bad device id: {USER_RULE}")
    if not frame.items:  # the codec refused more than kv_batch before reading any
        raise _too_large(f"kvput takes 1-{limits.kv_batch} writes")
    for i, write in enumerate(frame.items):
        if not 0 < len(write.key.encode()) <= limits.kv_key_bytes or "\x00" in write.key:
            raise _invalid(f"write {i}: a key is 1-{limits.kv_key_bytes} UTF-8 bytes, no NUL")
        if write.hlc == 0:
            raise _invalid(f"write {i}: hlc must be above 0")
        if write.deleted and write.value is not None:  # (a value's size: the decoder's)
            raise _invalid(f"write {i}: a deletion carries no value")


def _kv_sync(frame: KvSync, limits: Limits) -> None:
    if frame.limit is not None and not 0 < frame.limit <= MAX_KV_PAGE:
        raise _invalid(f"limit must be 1-{MAX_KV_PAGE}")


def _history(frame: History, limits: Limits) -> None:
    check_room(frame.room)
    if frame.before is not None and frame.after is not None:
        raise _invalid("history takes before or after, not both")
    if frame.limit is not None and not 0 < frame.limit <= limits.max_history_limit:
        raise _invalid(f"limit must be 1-{limits.max_history_limit}")


def _place(lat: float, lon: float) -> None:
    if not -90 <= lat <= 90:
        raise _invalid("lat must be -90 to 90 (degrees)")
    if not -180 <= lon <= 180:
        raise _invalid("lon must be -180 to 180 (degrees)")


def _category(category: str, limits: Limits) -> None:
    if category not in limits.categories:
        raise _invalid(f"unknown category; known: {', '.join(limits.categories)}")


def _post(frame: Post, limits: Limits) -> None:
    _content("post", frame, limits)
    _place(frame.lat, frame.lon)
    _category(frame.category, limits)


def _interests(frame: Interests, limits: Limits) -> None:
    for category in frame.interests:
        _category(category, limits)


def _feed_open(frame: FeedOpen, limits: Limits) -> None:
    _place(frame.lat, frame.lon)
    if not MIN_RADIUS_M <= frame.radius <= MAX_RADIUS_M:
        raise _invalid(f"radius must be {MIN_RADIUS_M}-{MAX_RADIUS_M} (metres)")
    _feed_limit(frame.limit)


def _feed_more(frame: FeedMore, limits: Limits) -> None:
    _feed_limit(frame.limit)


def _feed_limit(limit: int | None) -> None:
    if limit is not None and not 0 < limit <= MAX_FEED_PAGE:
        raise _invalid(f"limit must be 1-{MAX_FEED_PAGE}")


_RULES: dict[type[Frame], Callable[[Any, Limits], None]] = {
    Hello: _hello,
    Refresh: _token,
    Send: _send,
    Create: _create,
    Join: _join,
    Leave: _room_only,
    Unsubscribe: _room_only,
    Typing: _room_only,
    Invite: _invite,
    Direct: _user_only,
    Block: _user_only,
    Unblock: _user_only,
    Rooms: _rooms,
    Receipt: _receipt,
    Receipts: _receipts,
    SetStatus: _set_status,
    Who: _users,
    Watch: _users,
    Unwatch: _users,
    KvPut: _kv_put,
    KvSync: _kv_sync,
    History: _history,
    Post: _post,
    Interests: _interests,
    Follow: _user_only,
    Unfollow: _user_only,
    FeedOpen: _feed_open,
    FeedMore: _feed_more,
}


def validate(frame: Frame, limits: Limits) -> None:
    """Check the rules of ``frame``'s type; raises ``RemoteProtocolError``."""
    rule = _RULES.get(type(frame))
    if rule is not None:
        rule(frame, limits)
