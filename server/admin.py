"""The admin API: rooms, members, server-side publish, stats. Bearer admin token.

Every request goes to the same Room actors as client frames do, so the rules
(idempotency, durable acks, write-behind back-pressure) are the same; errors come back
as JSON with the protocol's error code and an HTTP status to match.
"""

import hmac
import secrets
from typing import Any

import attrs
from quart import Blueprint, request
from quart.typing import ResponseReturnValue

from actors.directory import ActorKind
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
from protocol.limits import DIRECT_PREFIX, is_room_id, is_user_id

HTTP_STATUS = {
    ErrorCode.INVALID: 400,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.ROOM_EXISTS: 409,
    ErrorCode.TRY_LATER: 503,
    ErrorCode.TIMEOUT: 504,
}
KINDS = {"open": RoomKind.OPEN, "private": RoomKind.PRIVATE}
MAX_PAGE = 500


class AdminError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def error_body(code: ErrorCode, message: str) -> dict[str, Any]:
    """The JSON of every error the ops endpoint returns."""
    return {"error": {"code": int(code), "name": code.name, "message": message}}


def _error(code: ErrorCode, message: str) -> ResponseReturnValue:
    return error_body(code, message), HTTP_STATUS.get(code, 500)


def _room_id(room: str) -> str:
    if not is_room_id(room):
        raise AdminError(ErrorCode.INVALID, f"bad room id {room!r}")
    return room


def _user_id(user: object) -> str:
    if not isinstance(user, str) or not is_user_id(user):
        raise AdminError(ErrorCode.INVALID, f"bad user id {user!r}")
    return user


async def _body() -> dict[str, Any]:
    data = await request.get_json(force=True, silent=True)
    if not isinstance(data, dict):
        raise AdminError(ErrorCode.INVALID, "the body must be a JSON object")
    return data


def admin_blueprint(node: Any) -> Blueprint:
    """``node`` is a ``server.node.Node``."""
    bp = Blueprint("admin", __name__, url_prefix="/admin")
    timeout = node.services.settings.request_timeout
    directory = node.directory

    async def room_ask(room: str, command: object, reply: Reply[Any]) -> Any:
        with answer_within(timeout):
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
            return _error(ErrorCode.UNAUTHORIZED, "missing or wrong admin token")
        return None

    @bp.errorhandler(AdminError)
    async def admin_error(exc: AdminError) -> ResponseReturnValue:
        return _error(exc.code, exc.message)

    @bp.errorhandler(RequestFailed)
    async def request_failed(exc: RequestFailed) -> ResponseReturnValue:
        return _error(exc.code, exc.message)

    @bp.get("/stats")
    async def stats() -> ResponseReturnValue:
        return node.stats()  # type: ignore[no-any-return]

    @bp.get("/rooms")
    async def list_rooms() -> ResponseReturnValue:
        try:
            limit = int(request.args.get("limit", "100"))
        except ValueError:
            raise AdminError(ErrorCode.INVALID, "limit must be an integer") from None
        if not 0 < limit <= MAX_PAGE:
            raise AdminError(ErrorCode.INVALID, f"limit must be 1-{MAX_PAGE}")
        after = request.args.get("after")
        rooms = await node.store.list_rooms(after, limit)
        out = []
        for r in rooms:
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
        next_after = out[-1]["room"] if len(out) == limit else None
        return {"rooms": out, "next": next_after}

    @bp.post("/rooms")
    async def create_room() -> ResponseReturnValue:
        body = await _body()
        room = _room_id(body.get("room", ""))
        if room.startswith(DIRECT_PREFIX):
            raise AdminError(ErrorCode.INVALID, "direct rooms are opened by their two users")
        kind = KINDS.get(body.get("kind", "open"))
        if kind is None:
            raise AdminError(ErrorCode.INVALID, "kind must be open or private")
        owner = body.get("owner")
        if owner is not None:
            _user_id(owner)
        members = body.get("members", [])
        if not isinstance(members, list):
            raise AdminError(ErrorCode.INVALID, "members must be a list of user ids")
        everyone = tuple(dict.fromkeys([*([owner] if owner else []), *map(_user_id, members)]))
        reply: Reply[None] = Reply()
        command = CreateRoom(kind=kind, owner=owner, members=everyone, reply=reply)
        await room_ask(room, command, reply)
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
        reply: Reply[None] = Reply()
        command = AddMember(by=None, user=_user_id(user), reply=reply)
        await room_ask(_room_id(room), command, reply)
        return {"room": room, "user": user, "member": True}

    @bp.delete("/rooms/<room>/members/<user>")
    async def remove_member(room: str, user: str) -> ResponseReturnValue:
        reply: Reply[None] = Reply()
        command = RemoveMember(by=None, user=_user_id(user), reply=reply)
        await room_ask(_room_id(room), command, reply)
        return {"room": room, "user": user, "member": False}

    @bp.post("/rooms/<room>/messages")
    async def publish(room: str) -> ResponseReturnValue:
        body = await _body()
        cid = body.get("cid") or f"admin-{secrets.token_hex(8)}"
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
