"""The admin API: rooms, members, server-side publish, stats. Bearer admin token.

Every request goes to the same Room actors as client frames do, so the rules
(idempotency, durable acks, write-behind back-pressure) are the same; errors come back
as JSON with the protocol's error code and an HTTP status to match.
"""

import hmac
import json
import logging
import secrets
from typing import Any

import attrs
from quart import Blueprint, request
from quart.typing import ResponseReturnValue

from actors.directory import ActorKind
from actors.feed_cells import bounds
from actors.messages import (
    AddMember,
    CreateRoom,
    DescribeRoom,
    Publish,
    RemoveMember,
    Reply,
    RequestFailed,
    answer_within,
    ask,
)
from actors.room import Room
from protocol.codec import from_fields
from protocol.errors import ErrorCode, RemoteProtocolError
from protocol.frames import RoomKind, Send
from protocol.limits import (
    DIRECT_PREFIX,
    MAX_ROOM_PAGE,
    POST_PREFIX,
    ROOM_PAGE,
    is_room_id,
    is_user_id,
)
from protocol.validate import ROOM_RULE, USER_RULE
from storage.store import StorageError, StorageUnavailable

log = logging.getLogger("parley.admin")

HTTP_STATUS = {
    ErrorCode.INVALID: 400,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.ROOM_EXISTS: 409,
    ErrorCode.TRY_LATER: 503,
    ErrorCode.INTERNAL: 500,
    ErrorCode.TIMEOUT: 504,
}
KINDS = {"open": RoomKind.OPEN, "private": RoomKind.PRIVATE}
MAX_PAGE = MAX_ROOM_PAGE
MAX_MEMBERS = 1000  # user ids in one room creation; more are added one by one
MAX_BODY_BYTES = 64 * 1024
CREATE_FIELDS = frozenset({"room", "kind", "owner", "members"})
PUBLISH_FIELDS = frozenset({"text", "data", "cid"})


class AdminError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def error_body(code: ErrorCode, message: str) -> dict[str, Any]:
    """The JSON of every error the ops endpoint returns."""
    return {"error": {"code": int(code), "name": code.name, "message": message}}


def http_status(code: ErrorCode) -> int:
    """The status of a refusal: a code without its own is answered by its class (1xx:
    the request is wrong, 2xx: not allowed, 3xx: not now), never as a fault of ours."""
    return HTTP_STATUS.get(code) or {1: 400, 2: 403}.get(code // 100, 503)


def _error(code: ErrorCode, message: str) -> tuple[dict[str, Any], int]:
    return error_body(code, message), http_status(code)


def _invalid(message: str) -> AdminError:
    return AdminError(ErrorCode.INVALID, message)


# Messages name the field and the rule, never the value: it may be 64 KiB of anything.


def _room_id(room: object, field: str = "room") -> str:
    if not isinstance(room, str) or not is_room_id(room):
        raise _invalid(f"{field} must be a room id: {ROOM_RULE}")
    return room


def _user_id(user: object, field: str = "user") -> str:
    if not isinstance(user, str) or not is_user_id(user):
        raise _invalid(f"{field} must be a user id: {USER_RULE}")
    return user


async def _body(fields: frozenset[str]) -> dict[str, Any]:
    """The request's JSON object, holding only ``fields``. Any content type is read as
    JSON, so ``curl -d`` works."""
    raw = await request.get_data()  # over MAX_CONTENT_LENGTH: 413 (server/ops.py)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise _invalid("the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise _invalid("the body must be a JSON object")
    if not data.keys() <= fields:
        raise _invalid(f"unknown field; the fields are {', '.join(sorted(fields))}")
    return data


def _page_limit(text: str) -> int:
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 0 < limit <= MAX_PAGE:
        raise _invalid(f"limit must be an integer 1-{MAX_PAGE}")
    return limit


def admin_blueprint(node: Any) -> Blueprint:
    """``node`` is a ``server.node.Node``."""
    bp = Blueprint("admin", __name__, url_prefix="/admin")
    timeout = node.services.settings.request_timeout
    directory = node.directory

    async def room_ask(
        room: str, command: object, reply: Reply[Any], *, creating: bool = False
    ) -> Any:
        with answer_within(timeout):
            # As for clients: a room that does not exist costs no actor.
            if not creating:
                try:
                    found = await node.services.rooms.exists(room)
                except StorageError as exc:
                    raise RequestFailed(ErrorCode.TRY_LATER, "storage unavailable") from exc
                if not found:
                    raise RequestFailed(ErrorCode.NOT_FOUND, "no such room")
            return await ask(directory, ActorKind.ROOM, room, command, reply)

    @bp.before_request
    async def authenticate() -> ResponseReturnValue | None:
        if node.admin_token is None:
            return _error(ErrorCode.FORBIDDEN, "the admin API is off: start with --admin-token")
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if (
            scheme.lower() != "bearer"
            or not token
            or not hmac.compare_digest(token.encode(), node.admin_token.encode())
        ):
            body, status = _error(ErrorCode.UNAUTHORIZED, "missing or wrong admin token")
            return body, status, {"WWW-Authenticate": 'Bearer realm="parley admin"'}
        return None

    @bp.errorhandler(AdminError)
    async def admin_error(exc: AdminError) -> ResponseReturnValue:
        return _error(exc.code, exc.message)

    @bp.errorhandler(RequestFailed)
    async def request_failed(exc: RequestFailed) -> ResponseReturnValue:
        return _error(exc.code, exc.message)

    @bp.errorhandler(StorageError)
    async def storage_failed(exc: StorageError) -> ResponseReturnValue:
        if isinstance(exc, StorageUnavailable):
            return _error(ErrorCode.TRY_LATER, f"storage is unavailable: {exc}")
        log.error("admin: %s %s: storage failed", request.method, request.path, exc_info=exc)
        return _error(ErrorCode.INTERNAL, "storage failed; the node's log has the details")

    @bp.get("/stats")
    async def stats() -> ResponseReturnValue:
        return node.stats()  # type: ignore[no-any-return]

    @bp.get("/feeds")
    async def list_feed_shards() -> ResponseReturnValue:
        shards = []
        for shard in directory.actors(ActorKind.FEED):
            index = getattr(shard, "index", None)
            if index is None:
                continue  # loading, or run by another node of the cluster
            south, north, west, east = bounds(shard.cell)
            shards.append(
                {
                    "shard": shard.cell,
                    "south": south,
                    "north": north,
                    "west": west,
                    "east": east,
                    "posts": len(index),
                    "views": len(shard.watches),
                    "queries": shard.queries,
                }
            )
        shards.sort(key=lambda s: -s["posts"])
        return {"shards": shards}

    @bp.get("/rooms")
    async def list_rooms() -> ResponseReturnValue:
        limit = _page_limit(request.args.get("limit", str(ROOM_PAGE)))
        after = request.args.get("after")
        if after is not None:
            _room_id(after, "after")
        # One more than asked tells whether a next page exists: no link to an empty page.
        rooms = await node.store.list_rooms(after, limit + 1)
        out = []
        for r in rooms[:limit]:
            live: Room | None = directory.actor(ActorKind.ROOM, r.room)
            online = len(live.online_users()) if live is not None else 0
            seq = live.seq if live is not None and live.exists else r.seq
            out.append(
                {
                    "room": r.room,
                    "kind": r.kind.name.lower(),
                    "owner": r.owner,
                    "members": r.members,
                    "online": online,
                    "seq": seq,
                }
            )
        next_after = out[-1]["room"] if len(rooms) > limit else None
        return {"rooms": out, "next": next_after}

    @bp.post("/rooms")
    async def create_room() -> ResponseReturnValue:
        body = await _body(CREATE_FIELDS)
        room = _room_id(body.get("room"))
        if room.startswith(DIRECT_PREFIX):
            raise _invalid("direct rooms are opened by their two users")
        if room.startswith(POST_PREFIX):
            raise _invalid("a post's comment room is made by the first to join it")
        kind_name = body.get("kind", "open")
        if not isinstance(kind_name, str) or kind_name not in KINDS:
            raise _invalid("kind must be open or private")
        kind = KINDS[kind_name]
        owner = body.get("owner")
        if owner is not None:
            _user_id(owner, "owner")
        members = body.get("members", [])
        if not isinstance(members, list) or len(members) > MAX_MEMBERS:
            raise _invalid(f"members must be a list of at most {MAX_MEMBERS} user ids")
        named = [_user_id(m, "each of members") for m in members]
        everyone = tuple(dict.fromkeys([*([owner] if owner else []), *named]))
        reply: Reply[None] = Reply()
        command = CreateRoom(kind=kind, owner=owner, members=everyone, reply=reply)
        await room_ask(room, command, reply, creating=True)
        return {
            "room": room,
            "kind": kind.name.lower(),
            "owner": owner,
            "members": list(everyone),
        }, 201

    @bp.get("/rooms/<room>")
    async def describe_room(room: str) -> ResponseReturnValue:
        reply: Reply[Any] = Reply()
        info = await room_ask(_room_id(room), DescribeRoom(reply), reply)
        out = attrs.asdict(info)
        out["kind"] = info.kind.name.lower()
        return out

    @bp.put("/rooms/<room>/members/<user>")
    async def add_member(room: str, user: str) -> ResponseReturnValue:
        _room_id(room)
        reply: Reply[None] = Reply()
        command = AddMember(by=None, user=_user_id(user), reply=reply)
        await room_ask(_room_id(room), command, reply)
        return {"room": room, "user": user, "member": True}

    @bp.delete("/rooms/<room>/members/<user>")
    async def remove_member(room: str, user: str) -> ResponseReturnValue:
        _room_id(room)
        reply: Reply[None] = Reply()
        command = RemoveMember(by=None, user=_user_id(user), reply=reply)
        await room_ask(_room_id(room), command, reply)
        return {"room": room, "user": user, "member": False}

    @bp.post("/rooms/<room>/messages")
    async def publish(room: str) -> ResponseReturnValue:
        body = await _body(PUBLISH_FIELDS)
        cid = body.get("cid", f"admin-{secrets.token_hex(8)}")
        fields = {
            "id": 0,
            "room": room,
            "cid": cid,
            "text": body.get("text"),
            "data": body.get("data"),
        }
        try:
            send = from_fields(Send, fields, node.services.settings.limits)
        except RemoteProtocolError as exc:
            raise AdminError(exc.code, exc.message) from None
        reply: Reply[tuple[int, int]] = Reply()
        seq, ts = await room_ask(room, Publish(user=None, send=send, reply=reply), reply)
        return {"room": room, "seq": seq, "ts": ts, "cid": cid}, 201

    return bp
