"""Locust scenarios for Parley: `locust -f loadtests/locustfile.py --host ws://HOST:8080`.

Each user class is one kind of real traffic (loadtests/README.md says which); pick them
by name on the command line or with ``--class-picker``. Every request is a Locust
request (type ``session``, ``chat``, ``presence`` or ``kv``; the name says which request
and which answer); every message a session receives is a ``deliver`` request timed from
its sender's clock, and a duplicate, reordered or lost delivery is a ``deliver``
failure and fails the run.
"""

import contextlib
import functools
import itertools
import logging
import random
import time
from collections.abc import Callable
from typing import Any, ClassVar

import gevent
from locust import User, constant, tag, task
from locust.env import Environment
from locust.exception import StopUser

from loadtests import locust_run
from loadtests.delivery import DeliveryCheck
from loadtests.locust_client import ParleyFailure, Session
from protocol.frames import (
    History,
    Join,
    Joined,
    KvAck,
    KvChanged,
    KvChanges,
    Ok,
    Page,
    PresenceList,
    Receipt,
    Send,
    Sent,
    SetStatus,
    Status,
    Watch,
    Who,
)
from protocol.kv import KvReplica

log = logging.getLogger("parley.locust")

CHAT = "chat"
PRESENCE = "presence"
KV = "kv"

_tokens: list[locust_run.Tokens] = []  # made by the first user of the process
_numbers = itertools.count()  # users of this process, for their ids
_seats: dict[str, "itertools.count[int]"] = {}  # users of each class, for their rooms
_present: list[str] = []  # the presence churners' user ids in this process
_WORDS = "the quick brown fox jumps over a lazy dog while we wait for the build".split()


def think(low: float, high: float) -> Callable[[User], float]:
    """A think time between ``low`` and ``high`` seconds, times ``--parley-think``."""

    def wait_time(user: User) -> float:
        scale: float = locust_run.options(user.environment).parley_think
        return random.uniform(low, high) * scale

    return wait_time


def pause(user: User, low: float, high: float) -> None:
    """Think, but no longer than until the run drains."""
    locust_run.draining.wait(think(low, high)(user))


def step(weight: int, scenario: str) -> Callable[[Callable[[Any], None]], Any]:
    """A task of ``scenario`` (its tag). Before it runs: once the run drains, nothing
    more; a session that lost its connection is resumed when its backoff allows, as an
    app does, and its rooms joined again if the resume lost them; after a close that
    reconnecting cannot help (4001, 4002, 4006) the user stops. A failure ends the task
    (Locust has it already: every request reports its own)."""

    def decorate(body: Callable[[Any], None]) -> Any:
        @functools.wraps(body)
        def run(user: "ParleyUser") -> None:
            if locust_run.draining.is_set():
                gevent.sleep(3600)  # the run ends: this user does nothing more
                return
            for session in user.sessions:
                if session.given_up:
                    log.error("%s stops: %s", user.user_id, session.given_up)
                    raise StopUser()
            try:
                if not user.begun:
                    user.try_to_begin()
                elif user.reconnect():
                    body(user)
            except ParleyFailure:
                pass

        return task(weight)(tag(scenario)(run))

    return decorate


def _text() -> str:
    return " ".join(random.choices(_WORDS, k=random.randint(3, 20)))


class ParleyUser(User):
    """A person on one device: a session, its rooms' delivery check, and the drain."""

    abstract = True
    deliver_name = "message"
    room_kinds: tuple[str, ...] = ()  # the rooms the run makes for it: "small", "large"

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        opts = locust_run.options(environment)
        self.number = next(_numbers)
        self.seat = next(_seats.setdefault(type(self).__name__, itertools.count()))
        self.worker = locust_run.worker_index(environment)
        self.user_id = f"{opts.parley_prefix}-{self.worker}-{self.number}"
        if not _tokens:
            _tokens.append(locust_run.Tokens(environment))
        self.url = locust_run.ws_url(self.host or "")
        self.sessions = [self.open_session()]
        self.session = self.sessions[0]
        self.rooms: dict[str, int] = {}  # room -> last seq this user's receipts covered

    def open_session(self) -> Session:
        return Session(
            self.url,
            _tokens[0].token(self.user_id),
            self.environment.events.request,
            DeliveryCheck(counts=locust_run.unreported),
            timeout=locust_run.options(self.environment).parley_timeout,
            deliver_name=self.deliver_name,
        )

    def on_start(self) -> None:
        locust_run.settlers.add(self.settle)
        self.begun = False
        self.try_to_begin()

    def try_to_begin(self) -> None:
        """Connect and do what the scenario starts with; a failure (reported already)
        leaves it to a later task to try again, after the session's backoff."""
        try:
            for session in self.sessions:
                if not session.connected and not self.connect(session, resume=False):
                    return
            self.begin()
            self.begun = True
        except ParleyFailure:
            pass

    def connect(self, session: Session, *, resume: bool) -> bool:
        """Connect ``session`` if its backoff allows; else pause (at most that long) and
        return False."""
        wait = session.backoff.wait(time.monotonic())
        if wait > 0:
            locust_run.draining.wait(wait)
            return False
        session.connect(resume=resume)
        return True

    def begin(self) -> None:
        """The scenario's first steps once connected: rooms to join, contacts to watch."""

    def reconnect(self) -> bool:
        """Resume every session that should be connected; False while one must wait
        out its backoff (the task is skipped, after a pause of at most that wait)."""
        for session in self.sessions:
            if not session.wanted or session.connected:
                continue
            if not self.connect(session, resume=True):
                return False
            if session is self.session:
                for room in set(self.rooms) - set(session.check.rooms()):
                    self.join(room)  # its resume was refused (PROTOCOL.md section 5)
        return True

    def on_stop(self) -> None:
        locust_run.settlers.discard(self.settle)
        for session in self.sessions:
            # Stopped early (a shape's ramp-down): what is missing now is lost.
            session.fault("lost", session.check.abandon())
            session.close()

    def small_room(self) -> str:
        """Of every eight users of this class on a worker, the first two share a pair
        room, the next two another, the last four a group room; the rooms wrap around
        once the users outnumber them."""
        opts = locust_run.options(self.environment)
        block, seat = divmod(self.seat, 8)
        block = block * max(1, opts.expect_workers) + self.worker  # workers interleave
        if seat < 4:
            return f"{opts.parley_prefix}-pair-{(2 * block + seat // 2) % opts.parley_pairs}"
        return f"{opts.parley_prefix}-group-{block % opts.parley_groups}"

    def join(self, room: str) -> Joined:
        frame = Join(id=self.session.next_id(), room=room)
        joined = self.session.request(frame, Joined, CHAT, "join→joined")
        self.rooms[room] = joined.seq
        return joined

    def send(self, room: str) -> Sent:
        frame = Send(
            id=self.session.next_id(),
            room=room,
            cid=f"{self.user_id}-{time.time_ns()}",
            text=_text(),
            data={"t": time.time()},  # the receivers' latency is measured from it
        )
        return self.session.request(frame, Sent, CHAT, "send→sent")

    def receipt(self) -> None:
        """Mark read what arrived since the last receipt, as an open chat screen does."""
        positions = self.session.check.positions()
        for room, covered in self.rooms.items():
            newest = positions.get(room, 0)
            if newest > covered:
                frame = Receipt(id=self.session.next_id(), room=room, read=newest)
                self.session.request(frame, Ok, CHAT, "receipt→ok")
                self.rooms[room] = newest

    def history(self, room: str, limit: int = 20) -> Page:
        frame = History(id=self.session.next_id(), room=room, limit=limit)
        return self.session.request(frame, Page, CHAT, "history→page")

    def settle(self, deadline: float) -> None:
        """At the end of the run: wait for every room's newest message; the rest is lost."""
        for session in self.sessions:
            while session.wanted and not session.connected and time.monotonic() < deadline:
                if session.connecting or session.backoff.wait(time.monotonic()):
                    gevent.sleep(0.05)  # a reconnector between a drop and its resume
                    continue
                with contextlib.suppress(ParleyFailure):  # reported; tried again
                    session.connect(resume=True)
            for room in session.check.rooms():
                try:
                    page = session.request(
                        History(id=session.next_id(), room=room, limit=1),
                        Page,
                        CHAT,
                        "history→page",
                    )
                except ParleyFailure:
                    continue  # reported as a failure already; the room cannot be checked
                newest = page.items[-1].seq if page.items else 0
                while not session.check.caught_up(room, newest) and time.monotonic() < deadline:
                    gevent.sleep(0.05)
                session.fault("lost", session.check.finish(room, newest))


class SmallRoomChatter(ParleyUser):
    """1:1 and group chat: of every eight users, two pairs and a group of four, each
    sending a message every few seconds and marking what arrived as read."""

    room_kinds = ("small",)  # the rooms the run makes for it

    weight = 10
    wait_time = think(1, 9)
    deliver_name = "message: small rooms"

    def begin(self) -> None:
        self.my_room = self.small_room()
        self.join(self.my_room)

    @step(6, "chat")
    def send_message(self) -> None:
        self.send(self.my_room)

    @step(3, "chat")
    def mark_read(self) -> None:
        self.receipt()

    @step(1, "chat")
    def scroll_back(self) -> None:
        self.history(self.my_room)


class LargeRoomMember(ParleyUser):
    abstract = True
    deliver_name = "message: large room"
    room_kinds = ("large",)

    def begin(self) -> None:
        self.large = f"{locust_run.options(self.environment).parley_prefix}-large"
        self.join(self.large)


class LargeRoomReader(LargeRoomMember):
    """A member of a large room (a channel, a live event) who mostly reads."""

    weight = 20
    wait_time = think(10, 30)

    @step(3, "large-room")
    def mark_read(self) -> None:
        self.receipt()

    @step(1, "large-room")
    def scroll_back(self) -> None:
        self.history(self.large)


class LargeRoomWriter(LargeRoomMember):
    """One of the few who speak in the large room: a message a second."""

    weight = 1
    wait_time = think(1, 1)

    @step(1, "large-room")
    def speak(self) -> None:
        self.send(self.large)


class PresenceChurner(ParleyUser):
    """A phone that comes and goes: watches its contacts, goes away and back, and
    disconnects for a while, sometimes within the presence grace, sometimes beyond."""

    weight = 3
    wait_time = think(2, 6)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.me = self.user_id  # until the welcome says which user the token is for

    def begin(self) -> None:
        self.me = self.session.user  # the token's, which a token file decides
        if self.me not in _present:  # a begin that failed is tried again
            _present.append(self.me)
        self.watch()
        # Each of its requests once at the start too, as an app coming to the foreground:
        # a short run (the tests' 8 s) draws few steps, and may draw none of one (a run
        # of the suite drew no who).
        self.ask_who()
        self.set_status(Status.ONLINE)

    def on_stop(self) -> None:
        if self.me in _present:
            _present.remove(self.me)
        super().on_stop()

    def contacts(self) -> list[str]:
        others = [u for u in _present if u != self.me]
        return random.sample(others, min(20, len(others))) or [self.me]

    def watch(self) -> None:
        frame = Watch(id=self.session.next_id(), users=tuple(self.contacts()))
        self.session.request(frame, PresenceList, PRESENCE, "watch→presencelist")

    def set_status(self, status: Status) -> None:
        frame = SetStatus(id=self.session.next_id(), status=status)
        self.session.request(frame, Ok, PRESENCE, "setstatus→ok")

    @step(3, "presence")
    def away_and_back(self) -> None:
        for status in (Status.AWAY, Status.ONLINE):
            self.set_status(status)

    def ask_who(self) -> None:
        frame = Who(id=self.session.next_id(), users=tuple(self.contacts()))
        self.session.request(frame, PresenceList, PRESENCE, "who→presencelist")

    @step(2, "presence")
    def who(self) -> None:
        self.ask_who()

    @step(2, "presence")
    def offline_for_a_while(self) -> None:
        self.session.close()
        pause(self, 0, 10)  # the presence grace is 5 s by default
        self.session.connect()
        self.watch()


class KvDevices(ParleyUser):
    """One person's phone and laptop syncing settings and drafts: edits on both, some
    made offline and pushed on reconnect, some to the same key at the same moment.
    At the end both devices must hold the same map."""

    weight = 3
    wait_time = think(1, 5)
    keys: ClassVar[list[str]] = [f"draft/{i}" for i in range(8)] + ["settings/theme"]

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.sessions.append(self.open_session())
        self.replicas = [KvReplica(f"dev{i}") for i in range(2)]
        for session, replica in zip(self.sessions, self.replicas, strict=True):
            session.on_frame = self._events_for(replica)

    @staticmethod
    def _events_for(replica: KvReplica) -> Any:
        def on_frame(frame: object) -> None:
            if type(frame) is KvChanged:
                replica.on_changed(frame)

        return on_frame

    def begin(self) -> None:
        for device in range(2):
            self.sync(device)

    def sync(self, device: int) -> None:
        session, replica = self.sessions[device], self.replicas[device]
        while True:
            frame = replica.sync_frame(session.next_id())
            page = session.request(frame, KvChanges, KV, "kvsync→kvchanges")
            replica.on_changes(page)
            if not page.more:
                return

    def push(self, device: int) -> None:
        session, replica = self.sessions[device], self.replicas[device]
        if not replica.pending:
            return
        put = replica.put_frame(session.next_id())
        replica.on_ack(put, session.request(put, KvAck, KV, "kvput→kvack"))

    def edit(self, device: int, count: int, keys: list[str] | None = None) -> None:
        replica, now = self.replicas[device], int(time.time() * 1000)
        for key in keys or random.sample(self.keys, count):
            if random.random() < 0.1:
                replica.delete(key, now)
            else:
                replica.set(key, {"text": _text(), "at": now}, now)

    @step(5, "kv")
    def edit_online(self) -> None:
        device = random.randrange(2)
        self.edit(device, random.randint(1, 3))
        self.push(device)

    @step(2, "kv")
    def same_key_at_once(self) -> None:
        key = random.choice(self.keys)
        for device in range(2):
            self.edit(device, 1, [key])
        gevent.joinall([gevent.spawn(self.push_quietly, device) for device in range(2)])

    def push_quietly(self, device: int) -> None:
        """``push`` in a greenlet of its own: its failure is reported already."""
        with contextlib.suppress(ParleyFailure):
            self.push(device)

    @step(1, "kv")
    def offline_then_catch_up(self) -> None:
        device = random.randrange(2)
        self.sessions[device].close()
        self.edit(device, random.randint(3, 8))
        pause(self, 1, 5)
        self.sessions[device].connect()
        self.push(device)
        self.sync(device)

    def settle(self, deadline: float) -> None:
        """Both devices push what they hold and catch up until they agree; a task still
        running (a device coming back online) may need a few rounds."""
        converged = False
        while not converged and time.monotonic() < deadline:
            try:
                for device in range(2):
                    if self.sessions[device].connected:
                        self.push(device)
                for device in range(2):
                    if self.sessions[device].connected:
                        self.sync(device)
            except ParleyFailure:
                pass  # reported already; try again until the deadline
            a, b = (replica.values() for replica in self.replicas)
            converged = a == b and not any(r.pending for r in self.replicas)
            if not converged:
                gevent.sleep(0.1)
        self.environment.events.request.fire(
            request_type=KV,
            name="devices converge",
            response_time=0,
            response_length=0,
            exception=None if converged else ParleyFailure("devices differ"),
            context={},
        )


class Reconnector(ParleyUser):
    """A phone in a reconnect storm: every storm (all reconnectors at the same instant)
    it loses its connection without a close, comes back after a jittered backoff and
    resumes the large room, which must replay exactly what it missed."""

    weight = 2
    wait_time = constant(0)
    deliver_name = "message: resumed"
    room_kinds = ("large",)

    def begin(self) -> None:
        self.large = f"{locust_run.options(self.environment).parley_prefix}-large"
        self.join(self.large)

    @step(1, "reconnect")
    def storm(self) -> None:
        every = locust_run.options(self.environment).parley_storm_every
        if locust_run.draining.wait(every - time.time() % every):
            return
        self.session.drop()
        self.send_while_away()
        gevent.sleep(random.uniform(0.1, 1.0))  # a backoff with jitter
        self.session.connect(resume=True)

    def send_while_away(self) -> None:
        """Someone else speaks while this phone is away, so there is something to replay;
        a second session of the same person does it."""
        other = self.open_session()
        try:
            other.connect()
            other.request(Join(id=other.next_id(), room=self.large), Joined, CHAT, "join→joined")
            frame = Send(
                id=other.next_id(),
                room=self.large,
                cid=f"{self.user_id}-away-{time.time_ns()}",
                text=_text(),
                data={"t": time.time()},
            )
            other.request(frame, Sent, CHAT, "send→sent")
        finally:
            other.close()


__all__ = [
    "KvDevices",
    "LargeRoomReader",
    "LargeRoomWriter",
    "PresenceChurner",
    "Reconnector",
    "SmallRoomChatter",
]
