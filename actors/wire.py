"""Actor records between nodes: the ``actors.messages`` records, CBOR-encoded once.

How this works: a record of any class registered here (the actor messages, the frames
they carry, their enums) is a CBOR tag holding ``[class name, *fields]``; tuples,
frozensets, bytes and ``Raw`` payloads keep their types. What only makes sense inside
one process is swapped at the boundary: the sender's ``Exits`` turn a ``SessionLink``
into a ``LinkRef`` (node and session id, so answers find the session), a ``Reply`` into
a ``ReplyRef`` (the request id its answer comes back under) and a ``Ticket`` into
"stored" (a sender forwards what waits on a record only once it is stored); the
receiver's ``Entries`` turn them back into a stand-in link and reply of its own.

Names, not numbers, identify classes, so nodes of two versions that share a record's
fields still understand each other; a class unknown to the receiver is an error
(``WireError``), never a silent drop.
"""

import enum
from collections.abc import Iterable
from typing import Any, Protocol

import attrs
import cbor2

from actors import feed_messages, messages
from actors.feed_index import Viewer
from protocol import frames
from protocol.cbor import Raw
from protocol.errors import ErrorCode
from storage.store import FeedProfile
from storage.write_behind import COMMITTED, Ticket

RECORD = 27001  # CBOR tag numbers (first-come range): a record, an enum member, ...
ENUM = 27002
TUPLE = 27003
FROZENSET = 27004
RAW = 27005
TICKET = 27006


class WireError(Exception):
    """A payload from another node that this node cannot read."""


@attrs.frozen
class LinkRef:
    """A session on another node, by id; ``user`` is the session's user."""

    node: str
    id: str
    user: str


@attrs.frozen
class ReplyRef:
    """The answer to request ``id`` goes back to ``node``."""

    node: str
    id: int


@attrs.frozen
class Command:
    """For actor ``(kind, key)`` on the node this is sent to, from node ``origin``."""

    kind: str
    key: str
    record: Any
    origin: str = ""


@attrs.frozen
class NotHere:
    """Actor ``(kind, key)`` does not run on the node a command was sent to: the
    sender's stand-in for it steps down."""

    kind: str
    key: str


@attrs.frozen
class Answer:
    """The answer to request ``id``: ``value``, or the refusal ``code``."""

    id: int
    value: Any = None
    code: ErrorCode | None = None
    message: str = ""


@attrs.frozen
class ToSession:
    """A frame for session ``id`` of the node this is sent to."""

    id: str
    frame: bytes


@attrs.frozen
class Notify:
    """An event for session ``id``'s inbox."""

    id: str
    event: Any


class Exits(Protocol):
    """What a sending node does with what cannot cross."""

    def link(self, link: messages.SessionLink) -> LinkRef: ...

    def reply(self, reply: messages.Reply[Any]) -> ReplyRef: ...


class Entries(Protocol):
    """What a receiving node puts in place of what could not cross."""

    def link(self, ref: LinkRef) -> messages.SessionLink: ...

    def reply(self, ref: ReplyRef) -> messages.Reply[Any]: ...


def _registry(modules: Iterable[Any], extra: Iterable[type]) -> dict[str, type]:
    found: dict[str, type] = {}
    for module in modules:
        for name, value in vars(module).items():
            if isinstance(value, type) and value.__module__ == module.__name__:
                if attrs.has(value) or issubclass(value, enum.Enum):
                    found[name] = value
    for cls in extra:
        found[cls.__name__] = cls
    return found


_CLASSES = _registry(
    [messages, feed_messages, frames],
    [
        LinkRef,
        ReplyRef,
        Command,
        NotHere,
        Answer,
        ToSession,
        Notify,
        ErrorCode,
        Viewer,
        FeedProfile,
    ],
)
# A link holds process-local objects: it is swapped (for a LinkRef), never sent as such.
del _CLASSES["SessionLink"]
_FIELDS = {
    cls: tuple(a.name for a in attrs.fields(cls)) for cls in _CLASSES.values() if attrs.has(cls)
}


_PLAIN = (str, int, bytes, bool, float, type(None))


def pack(record: object, exits: Exits) -> bytes:
    """``record`` as bytes for another node."""
    return cbor2.dumps(_out(record, exits))


def _out(value: Any, exits: Exits) -> Any:
    # A module function, not a closure in pack: a nested function that calls itself
    # holds its own cell, a cycle per call that only the collector frees (and the node
    # runs it hourly: ARCHITECTURE.md, "Garbage collection").
    cls = type(value)
    if cls in _PLAIN:
        return value
    if cls is tuple:  # cbor2 would write a plain array, which reads back as a list
        return cbor2.CBORTag(TUPLE, [_out(v, exits) for v in value])
    if cls is frozenset:
        return cbor2.CBORTag(FROZENSET, [_out(v, exits) for v in value])
    if cls is list:
        return [_out(v, exits) for v in value]
    if cls is dict:
        return {k: _out(v, exits) for k, v in value.items()}
    if cls is Raw:
        return cbor2.CBORTag(RAW, value.cbor)
    if cls is Ticket:
        return cbor2.CBORTag(TICKET, None)
    if cls is messages.SessionLink:
        value, cls = exits.link(value), LinkRef
    elif isinstance(value, messages.Reply):
        value, cls = exits.reply(value), ReplyRef
    elif isinstance(value, enum.Enum):
        return cbor2.CBORTag(ENUM, [cls.__name__, value.value])
    names = _FIELDS.get(cls)
    if names is None:
        raise WireError(f"{cls.__name__} cannot be sent to another node")
    return cbor2.CBORTag(RECORD, [cls.__name__, *(_out(getattr(value, n), exits) for n in names)])


def unpack(data: bytes, entries: Entries) -> Any:
    """The record another node packed, with stand-ins from ``entries``."""

    def tag_hook(tag: cbor2.CBORTag, immutable: bool) -> Any:
        value = tag.value
        if tag.tag == RECORD:
            cls = _CLASSES.get(value[0])
            if cls is None or cls not in _FIELDS:
                raise WireError(f"unknown record {value[0]!r}")
            record = cls(**dict(zip(_FIELDS[cls], value[1:], strict=True)))
            if type(record) is LinkRef:
                return entries.link(record)
            if type(record) is ReplyRef:
                return entries.reply(record)
            return record
        if tag.tag == TUPLE:
            return tuple(value)
        if tag.tag == FROZENSET:
            return frozenset(value)
        if tag.tag == RAW:
            return Raw(value)
        if tag.tag == TICKET:
            return COMMITTED
        if tag.tag == ENUM:
            cls = _CLASSES.get(value[0])
            if cls is None or not issubclass(cls, enum.Enum):
                raise WireError(f"unknown enum {value[0]!r}")
            return cls(value[1])
        raise WireError(f"unknown tag {tag.tag}")

    try:
        return cbor2.loads(data, tag_hook=tag_hook)
    except WireError:
        raise
    except Exception as exc:  # cbor2's errors, a field that no longer exists, ...
        raise WireError(f"unreadable record: {type(exc).__name__}: {exc}") from exc
