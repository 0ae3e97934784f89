"""The ops endpoint described in OpenAPI 3.1, served at ``/openapi.json``.

Built from the same constants the handlers check (identifier rules, page and body
bounds, this node's message limits), so the document and the server cannot drift
apart silently; tests/test_openapi.py runs schemathesis against a running node with it.
"""

from typing import Any

from protocol.errors import ErrorCode
from protocol.limits import (
    DIRECT_PREFIX,
    MAX_CID_CHARS,
    MAX_DATA_DEPTH,
    POST_PREFIX,
    ROOM_ID_RE,
    ROOM_PAGE,
    USER_ID_RE,
    Limits,
)
from server.admin import MAX_BODY_BYTES, MAX_MEMBERS, MAX_PAGE

JSON = "application/json"
NO_NUL = "^[^\\u0000]*$"  # PostgreSQL text cannot hold U+0000


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    """Error responses of an admin operation: its own ``statuses`` and those of any."""
    why = {
        400: "invalid request: a parameter or the body breaks a rule (code 102 INVALID)",
        401: "no admin token, or the wrong one (code 108 UNAUTHORIZED)",
        403: "the admin API is off (the node runs without --admin-token), or the room "
        "refuses: a direct room's members are fixed (code 200 FORBIDDEN)",
        404: "no such room (code 201 NOT_FOUND)",
        409: "the room exists already (code 202 ROOM_EXISTS)",
        413: f"the body is over {MAX_BODY_BYTES} bytes, or a message's text or data over "
        "the node's limits (code 103 TOO_LARGE)",
        500: "a fault of the node's; its log has the details (code 301 INTERNAL)",
        503: "storage is unavailable or its write queue is full: retry later (code 300)",
        504: "the room did not answer in time (code 302 TIMEOUT)",
    }
    out = {
        str(s): _json(_ref("Error"), why[s])
        for s in sorted({400, 401, 403, 413, 500, 503, 504, *statuses})
    }
    out["401"]["headers"] = {
        "WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}
    }
    return out


def _data_value(depth: int) -> dict[str, Any]:
    """A value inside ``depth`` nested containers of a message's data map (the map
    itself is the first): at most ``MAX_DATA_DEPTH`` arrays and maps nest."""
    scalars: list[dict[str, Any]] = [
        {"type": "string"},
        {"type": "integer", "minimum": -(2**64), "maximum": 2**64 - 1},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
    ]
    if depth == MAX_DATA_DEPTH:
        return {"anyOf": scalars}
    inner = _ref(f"DataValue{depth + 1}")
    containers = [
        {"type": "array", "items": inner},
        {"type": "object", "additionalProperties": inner},
    ]
    return {"anyOf": [*scalars, *containers]}


def _schemas(limits: Limits) -> dict[str, Any]:
    room_id = {"type": "string", "pattern": f"^{ROOM_ID_RE.pattern}$"}
    user_id = {"type": "string", "pattern": f"^{USER_ID_RE.pattern}$"}
    nullable_user = {"type": ["string", "null"], "pattern": user_id["pattern"]}
    kind = {"type": "string", "enum": ["open", "private", "direct"]}
    seq = {"type": "integer", "minimum": 0}
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "name", "message"],
                    "properties": {
                        "code": {"type": "integer", "enum": [int(c) for c in ErrorCode]},
                        "name": {"type": "string", "enum": [c.name for c in ErrorCode]},
                        "message": {"type": "string"},
                    },
                }
            },
        },
        "RoomId": room_id,
        "UserId": user_id,
        "RoomSummary": {
            "type": "object",
            "required": ["room", "kind", "owner", "members", "online", "seq"],
            "properties": {
                "room": room_id,
                "kind": kind,
                "owner": nullable_user,
                "members": {"type": "integer", "minimum": 0, "description": "how many"},
                "online": {"type": "integer", "minimum": 0, "description": "members online"},
                "seq": seq,
            },
        },
        "FeedShards": {
            "type": "object",
            "required": ["shards"],
            "properties": {
                "shards": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": [
                            "shard",
                            "south",
                            "north",
                            "west",
                            "east",
                            "posts",
                            "views",
                            "queries",
                        ],
                        "properties": {
                            "shard": {"type": "integer", "description": "its cell"},
                            "south": {"type": "number"},
                            "north": {"type": "number"},
                            "west": {"type": "number"},
                            "east": {"type": "number"},
                            "posts": {"type": "integer", "description": "live posts"},
                            "views": {"type": "integer", "description": "open views it serves"},
                            "queries": {"type": "integer", "description": "top-k answered"},
                        },
                    },
                }
            },
        },
        "RoomPage": {
            "type": "object",
            "required": ["rooms", "next"],
            "properties": {
                "rooms": {"type": "array", "items": _ref("RoomSummary")},
                "next": {
                    "type": ["string", "null"],
                    "pattern": room_id["pattern"],
                    "description": "pass as `after` for the next page; null on the last",
                },
            },
        },
        "NewRoom": {
            "type": "object",
            "additionalProperties": False,
            "required": ["room"],
            "properties": {
                "room": {**room_id, "not": {"pattern": f"^({DIRECT_PREFIX}|{POST_PREFIX})"}},
                "kind": {"type": "string", "enum": ["open", "private"], "default": "open"},
                "owner": nullable_user,
                "members": {"type": "array", "items": user_id, "maxItems": MAX_MEMBERS},
            },
        },
        "CreatedRoom": {
            "type": "object",
            "required": ["room", "kind", "owner", "members"],
            "properties": {
                "room": room_id,
                "kind": kind,
                "owner": nullable_user,
                "members": {"type": "array", "items": user_id},
            },
        },
        "RoomInfo": {
            "type": "object",
            "required": ["room", "kind", "owner", "epoch", "seq", "members", "online"],
            "properties": {
                "room": room_id,
                "kind": kind,
                "owner": nullable_user,
                "epoch": {"type": "string"},
                "seq": seq,
                "members": {"type": "array", "items": user_id},
                "online": {"type": "array", "items": user_id},
            },
        },
        "Membership": {
            "type": "object",
            "required": ["room", "user", "member"],
            "properties": {"room": room_id, "user": user_id, "member": {"type": "boolean"}},
        },
        "NewMessage": {
            "type": "object",
            "additionalProperties": False,
            "description": "text, data or both; the same cid again is the same message",
            "properties": {
                "text": {
                    "type": ["string", "null"],
                    "maxLength": limits.max_text_chars,
                    "pattern": NO_NUL,
                },
                "data": {
                    "type": ["object", "null"],
                    "additionalProperties": _ref("DataValue1"),
                    "description": f"at most {limits.max_data_bytes} bytes once CBOR-encoded",
                },
                "cid": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_CID_CHARS,
                    "pattern": NO_NUL,
                },
            },
            "anyOf": [
                {"required": ["text"], "properties": {"text": {"type": "string"}}},
                {"required": ["data"], "properties": {"data": {"type": "object"}}},
            ],
        },
        "Published": {
            "type": "object",
            "required": ["room", "seq", "ts", "cid"],
            "properties": {
                "room": room_id,
                "seq": seq,
                "ts": {"type": "integer", "description": "milliseconds since the epoch"},
                "cid": {"type": "string"},
            },
        },
        "Stats": {
            "type": "object",
            "required": ["connections", "sessions", "users_online", "actors", "write_behind"],
            "properties": {
                "connections": {"type": "integer", "minimum": 0},
                "sessions": {"type": "integer", "minimum": 0},
                "users_online": {"type": "integer", "minimum": 0},
                "presence_online": {"type": "integer", "minimum": 0},
                "actors": {"type": "object", "additionalProperties": {"type": "integer"}},
                "write_behind": {"type": "object"},
                "draining": {"type": "boolean"},
            },
        },
        "Readiness": {
            "type": "object",
            "required": ["status", "reasons", "checks"],
            "properties": {
                "status": {"type": "string", "enum": ["OK", "Degraded", "Failed"]},
                "reasons": {"type": "array", "items": {"type": "string"}},
                "checks": {"type": "object"},
            },
        },
    }
    for depth in range(1, MAX_DATA_DEPTH + 1):
        schemas[f"DataValue{depth}"] = _data_value(depth)
    return schemas


def _path(name: str, schema: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": _ref(schema),
        "description": description,
    }


ROOM = _path("room", "RoomId", "the room's id")
USER = _path("user", "UserId", "the user's id")
ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]


def _paths() -> dict[str, Any]:
    membership = {
        "parameters": [ROOM, USER],
        "put": {
            "summary": "Add a member; they hear of it",
            "security": ADMIN,
            "responses": {"200": _json(_ref("Membership"), "a member"), **_errors(404)},
        },
        "delete": {
            "summary": "Remove a member",
            "security": ADMIN,
            "responses": {"200": _json(_ref("Membership"), "not a member"), **_errors(404)},
        },
    }
    return {
        "/healthz": {
            "get": {
                "summary": "Liveness: the event loop answers",
                "security": [],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["status"],
                            "properties": {"status": {"const": "OK"}},
                        },
                        "alive",
                    )
                },
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: storage, write-behind queue, draining",
                "security": [],
                "responses": {
                    "200": _json(_ref("Readiness"), "OK or Degraded: send traffic"),
                    "503": _json(_ref("Readiness"), "Failed: send no new traffic"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {
                    "200": {
                        "description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
            }
        },
        "/admin/stats": {
            "get": {
                "summary": "Connections, sessions, users online, actors, write-behind queue",
                "security": ADMIN,
                "responses": {"200": _json(_ref("Stats"), "the node's counts"), **_errors()},
            }
        },
        "/admin/feeds": {
            "get": {
                "summary": "The feed shards this node runs: their cells, live posts and views",
                "security": ADMIN,
                "responses": {
                    "200": _json(_ref("FeedShards"), "by posts, most first"),
                    **_errors(),
                },
            }
        },
        "/admin/rooms": {
            "get": {
                "summary": "Rooms in id order, a page at a time",
                "security": ADMIN,
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_PAGE,
                            "default": ROOM_PAGE,
                        },
                    },
                    {
                        "name": "after",
                        "in": "query",
                        "schema": _ref("RoomId"),
                        "description": "the `next` of the page before",
                    },
                ],
                "responses": {"200": _json(_ref("RoomPage"), "a page of rooms"), **_errors()},
            },
            "post": {
                "summary": "Create a room",
                "security": ADMIN,
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": _ref("NewRoom")}},
                },
                "responses": {
                    "201": _json(_ref("CreatedRoom"), "created, members told"),
                    **_errors(409),
                },
            },
        },
        "/admin/rooms/{room}": {
            "parameters": [ROOM],
            "get": {
                "summary": "Kind, owner, epoch, last seq, members and who is online",
                "security": ADMIN,
                "responses": {"200": _json(_ref("RoomInfo"), "the room"), **_errors(404)},
            },
        },
        "/admin/rooms/{room}/members/{user}": membership,
        "/admin/rooms/{room}/messages": {
            "parameters": [ROOM],
            "post": {
                "summary": "Publish a message from the server (no user), once stored",
                "security": ADMIN,
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": _ref("NewMessage")}},
                },
                "responses": {
                    "201": _json(_ref("Published"), "stored, with its seq"),
                    **_errors(404),
                },
            },
        },
    }


def openapi_document(limits: Limits) -> dict[str, Any]:
    """The document for a node whose clients have ``limits``."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Parley operators' endpoint",
            "version": "1",
            "description": "Health, readiness, metrics and the admin API. Errors are "
            '`{"error": {"code", "name", "message"}}` with the protocol\'s error codes '
            "(PROTOCOL.md, section 12). The admin API takes the admin token as a bearer "
            "token; without it, or with another, it answers 401; on a node started "
            "without --admin-token, 403.",
        },
        "paths": _paths(),
        "components": {
            "schemas": _schemas(limits),
            "securitySchemes": {
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the node's --admin-token",
                }
            },
        },
    }
