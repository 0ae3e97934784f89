"""actors/messages.py: how a command that cannot be handled is answered, whatever shape
of answer it expects, and the mailbox helpers every request goes through."""

import pytest
import trio
import trio.testing

from actors.messages import (
    Attach,
    Attached,
    AttachMode,
    Detach,
    KvRequest,
    MarkReceipt,
    Publish,
    Refused,
    Reply,
    RequestFailed,
    SessionEvent,
    SessionLink,
    SetTyping,
    answer_within,
    deliver,
    refuse,
)
from protocol.errors import ErrorCode
from protocol.frames import KvSync, Receipt, Send, TypingOp


class Outbox:
    closed = False

    def append(self, data: bytes) -> None:
        raise AssertionError("a refusal goes to the session's inbox, not its outbox")


async def test_refuse_answers_each_command_the_way_it_expects() -> None:
    events: list[SessionEvent] = []
    link = SessionLink("s1", "alice", Outbox(), events.append)
    reply: Reply[Attached] = Reply()
    refuse(Attach(link=link, mode=AttachMode.JOIN, reply=reply), ErrorCode.TRY_LATER, "moved")
    with pytest.raises(RequestFailed) as failed:
        await reply.wait()
    assert (failed.value.code, failed.value.message) == (ErrorCode.TRY_LATER, "moved")
    assert events == []  # a command with a reply is answered there only

    send = Send(id=7, room="r", cid="c", text="x")
    requests = [
        Publish(user="alice", send=send, link=link),
        MarkReceipt(link=link, receipt=Receipt(room="r", read=1, id=8)),
        SetTyping(link=link, op=TypingOp.START, hidden=frozenset(), id=9),
        KvRequest(link=link, frame=KvSync(id=10)),
    ]
    silent = [
        SetTyping(link=link, op=TypingOp.STOP, hidden=frozenset()),  # no id: no answer
        Detach(link=link),  # not a request
        object(),  # not even a command
    ]
    for record in (*requests, *silent):
        refuse(record, ErrorCode.TRY_LATER, "busy", "r")
    assert events == [Refused(ErrorCode.TRY_LATER, "busy", rid, "r") for rid in (7, 8, 9, 10)]


async def test_deliver_waits_for_room_and_fails_on_a_stopped_actor() -> None:
    send, receive = trio.open_memory_channel[object](1)
    await deliver(send, "first")  # room at once
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliver, send, "second")  # a full mailbox: back-pressure
        await trio.testing.wait_all_tasks_blocked()
        assert receive.receive_nowait() == "first"
    assert receive.receive_nowait() == "second"
    send.send_nowait("third")
    failures: list[RequestFailed] = []

    async def waiting() -> None:
        try:
            await deliver(send, "fourth")
        except RequestFailed as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiting)
        await trio.testing.wait_all_tasks_blocked()
        await receive.aclose()  # the actor stops while a command waits for room
    with pytest.raises(RequestFailed) as stopped:
        await deliver(send, "fifth")  # and one that finds it stopped
    for failure in (*failures, stopped.value):
        assert (failure.code, failure.message) == (ErrorCode.TRY_LATER, "actor stopped; retry")
    assert len(failures) == 1


async def test_a_request_not_answered_in_time_fails_with_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    reply: Reply[int] = Reply()
    with pytest.raises(RequestFailed) as late:
        with answer_within(5.0):
            await reply.wait()
    assert late.value.code is ErrorCode.TIMEOUT
