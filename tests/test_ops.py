"""server/ops.py and server/admin.py over real HTTP."""

import sqlite3
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from actors.directory import ActorKind
from protocol.client import ServerError
from protocol.errors import ErrorCode
from protocol.frames import Member, MemberOp, Message, ReceiptState
from server.admin import MAX_BODY_BYTES, MAX_MEMBERS, http_status
from tests.helpers import ADMIN, RunningServer, run_server


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


async def test_health_and_readiness(server: RunningServer) -> None:
    async with server.http(admin=False) as http:
        health = await http.get("/healthz")
        assert (health.status_code, health.json()) == (200, {"status": "OK"})
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        body = ready.json()
        assert (body["status"], body["reasons"]) == ("OK", [])
        assert set(body["checks"]) == {
            "storage",
            "write_behind",
            "bus",
            "draining",
            "connections",
        }


async def test_metrics_count_the_traffic(server: RunningServer) -> None:
    async with server.client("alice") as alice, server.client("bob") as bob:
        await alice.create("r")
        await bob.join("r")
        for i in range(3):
            await alice.send("r", f"m{i}")
        await bob.ping()
        with trio.fail_after(10):
            for _ in range(3):
                await bob.next_event(Message)
        async with server.http(admin=False) as http:
            response = await http.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain")
        got = samples(response.text)
    assert got["parley_connections", ()] == 2
    assert got["parley_sessions", ()] == 2
    assert got["parley_frames_in_total", (("type", "send"),)] == 3
    assert got["parley_frames_out_total", (("type", "sent"),)] == 3
    assert got["parley_frames_out_total", (("type", "message"),)] == 6  # 3 to each
    # 3 messages to 2 subscribers, and bob's join told to alice: nothing counted twice.
    assert got["parley_fanout_deliveries_total", ()] == 7
    assert got["parley_messages_total", ()] == 3
    assert got["parley_actors", (("kind", "room"),)] == 1
    assert got["parley_actors", (("kind", "user"),)] == 2
    assert got["parley_write_behind_flushed_records_total", ()] >= 5
    assert got["parley_write_behind_flush_seconds_count", ()] >= 1
    assert got["parley_write_behind_depth", ()] == 0
    assert got["parley_write_behind_failing", ()] == 0
    assert ("parley_outbox_bytes", ()) in got


async def test_errors_are_counted_by_code(server: RunningServer) -> None:
    async with server.client("alice") as alice:
        await alice.ws.send_message(b"\xff")
        await alice.next_event()
    async with server.http(admin=False) as http:
        got = samples((await http.get("/metrics")).text)
    assert got["parley_errors_total", (("code", "100"),)] == 1


async def test_readiness_degrades_when_storage_fails(tmp_path: Path) -> None:
    async with run_server(tmp_path, storage_probe_interval=0.05) as server:
        async with server.client("alice") as alice:
            await alice.create("r")
            blocker = sqlite3.connect(tmp_path / "parley.db", isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(alice.send, "r", "waits for storage")
                    async with server.http(admin=False) as http:
                        with trio.fail_after(30):
                            while True:
                                body = (await http.get("/readyz")).json()
                                if body["status"] != "OK":
                                    break
                                await trio.sleep(0.05)
                        assert body["status"] == "Degraded"
                        assert any(r.startswith("storage:") for r in body["reasons"])
                    blocker.execute("ROLLBACK")
            finally:
                blocker.close()
            async with server.http(admin=False) as http:
                with trio.fail_after(30):
                    while (await http.get("/readyz")).json()["status"] != "OK":  # noqa: ASYNC110
                        await trio.sleep(0.05)


async def test_full_write_queue_refuses_sends_and_fails_readiness(tmp_path: Path) -> None:
    async with run_server(tmp_path, write_queue_records=5) as server:
        async with server.client("alice") as alice:
            await alice.create("r")
            blocker = sqlite3.connect(tmp_path / "parley.db", isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")
            refused: list[str] = []
            try:
                async with trio.open_nursery() as nursery:

                    async def send(i: int) -> None:
                        try:
                            await alice.send("r", f"m{i}", cid=f"c{i}")
                        except ServerError as exc:
                            assert exc.code is ErrorCode.TRY_LATER
                            refused.append(f"c{i}")

                    # More refusals than the error budget: 3xx errors are not charged.
                    for i in range(40):
                        nursery.start_soon(send, i)
                    with trio.fail_after(30):
                        while len(refused) < 30:  # noqa: ASYNC110 - counting replies
                            await trio.sleep(0.01)
                    assert alice.close_code is None
                    async with server.http(admin=False) as http:
                        response = await http.get("/readyz")
                    assert response.status_code == 503
                    assert response.json()["status"] == "Failed"
                    blocker.execute("ROLLBACK")
            finally:
                blocker.close()
            page = await alice.history("r")
            stored = {m.cid for m in page.items}
            assert len(stored) == 5 and stored.isdisjoint(refused)
            assert stored | set(refused) == {f"c{i}" for i in range(40)}


# --- admin API --------------------------------------------------------------------------


async def test_admin_needs_the_token(server: RunningServer) -> None:
    async with server.http(admin=False) as http:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": ADMIN}):
            response = await http.post("/admin/rooms", json={"room": 123}, headers=headers)
            assert response.status_code == 401  # before the body is looked at
            assert response.json()["error"] == {
                "code": 108,
                "name": "UNAUTHORIZED",
                "message": "missing or wrong admin token",
            }
            assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_admin_api_is_off_without_a_token(tmp_path: Path) -> None:
    async with run_server(tmp_path, admin_token=None) as server:
        async with server.http() as http:
            response = await http.get("/admin/stats")
        assert response.status_code == 403
        assert response.json()["error"]["name"] == "FORBIDDEN"


async def test_admin_rooms_members_and_publish(server: RunningServer) -> None:
    async with server.http() as http, server.client("alice") as alice:
        created = await http.post(
            "/admin/rooms", json={"room": "news", "kind": "private", "members": ["alice"]}
        )
        assert created.status_code == 201
        told = await alice.next_event(Member)
        assert (told.room, told.user, told.op, told.by) == ("news", "alice", MemberOp.ADDED, None)
        assert (await http.post("/admin/rooms", json={"room": "news"})).status_code == 409
        await alice.join("news")

        published = await http.post("/admin/rooms/news/messages", json={"text": "hello all"})
        assert published.status_code == 201
        seq = published.json()["seq"]
        message = await alice.next_event(Message)
        assert (message.seq, message.user, message.text) == (seq, None, "hello all")
        again = await http.post(
            "/admin/rooms/news/messages", json={"text": "hello all", "cid": published.json()["cid"]}
        )
        assert again.json()["seq"] == seq  # idempotent by cid

        added = await http.put("/admin/rooms/news/members/bob")
        assert added.status_code == 200
        event = await alice.next_event(Member)
        assert (event.user, event.op) == ("bob", MemberOp.ADDED)

        info = (await http.get("/admin/rooms/news")).json()
        assert (info["kind"], info["members"], info["online"], info["seq"]) == (
            "private",
            ["alice", "bob"],
            ["alice"],
            seq,
        )
        listing = (await http.get("/admin/rooms")).json()
        assert listing["rooms"] == [
            {
                "room": "news",
                "kind": "private",
                "owner": None,
                "members": 2,
                "online": 1,
                "seq": seq,
            }
        ]

        removed = await http.delete("/admin/rooms/news/members/alice")
        assert removed.status_code == 200
        event = await alice.next_event(Member)
        assert (event.user, event.op, event.by) == ("alice", MemberOp.REMOVED, None)
        info = (await http.get("/admin/rooms/news")).json()
        assert info["members"] == ["bob"] and info["online"] == []

        stats = (await http.get("/admin/stats")).json()
        assert stats["sessions"] == 1 and stats["actors"]["room"] == 1


async def test_unknown_endpoints_answer_json(server: RunningServer) -> None:
    async with server.http() as http:
        missing = await http.get("/admin/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["name"] == "NOT_FOUND"
        wrong = await http.delete("/admin/rooms/team")
        assert wrong.status_code == 405 and wrong.json()["error"]["name"] == "INVALID"


async def test_admin_validation_errors(server: RunningServer) -> None:
    too_many = [f"u{i}" for i in range(MAX_MEMBERS + 1)]
    async with server.http() as http:
        cases = [
            ("post", "/admin/rooms", {"room": "bad room"}, 400),
            ("post", "/admin/rooms", {"room": "dm:a:b"}, 400),
            ("post", "/admin/rooms", {"room": "x", "kind": "secret"}, 400),
            ("post", "/admin/rooms", {"room": "x", "members": ["ok", "not ok"]}, 400),
            ("post", "/admin/rooms", {"room": 123}, 400),  # answered 500
            ("post", "/admin/rooms", {"room": "x", "kind": []}, 400),  # answered 500
            ("post", "/admin/rooms", {"room": "x", "owner": 5}, 400),
            ("post", "/admin/rooms", {"room": "x", "members": "alice"}, 400),
            ("post", "/admin/rooms", {"room": "x", "members": [None]}, 400),
            ("post", "/admin/rooms", {"room": "x", "members": too_many}, 400),
            ("post", "/admin/rooms", {"room": "x", "colour": "red"}, 400),
            ("post", "/admin/rooms", ["x"], 400),
            ("post", "/admin/rooms", None, 400),
            ("post", "/admin/rooms/missing/messages", {"text": "hi"}, 404),
            ("post", "/admin/rooms/x/messages", {"text": 5}, 400),
            ("post", "/admin/rooms/x/messages", {}, 400),
            ("post", "/admin/rooms/x/messages", {"text": "hi", "cid": 0}, 400),
            ("post", "/admin/rooms/x/messages", {"text": "hi", "data": []}, 400),
            ("post", "/admin/rooms/x/messages", {"text": "hi", "user": "alice"}, 400),
            ("post", "/admin/rooms/x/messages", {"text": "x" * 5000}, 413),
            ("post", "/admin/rooms/bad room/messages", {"text": "hi"}, 400),
            ("get", "/admin/rooms/missing", None, 404),
            ("get", "/admin/rooms/bad room", None, 400),
            ("put", "/admin/rooms/missing/members/bob", None, 404),
            ("put", "/admin/rooms/bad room/members/bob", None, 400),
            ("delete", "/admin/rooms/x/members/not ok", None, 400),
            ("get", "/admin/rooms?limit=0", None, 400),
            ("get", "/admin/rooms?limit=x", None, 400),
            ("get", "/admin/rooms?after=bad room", None, 400),
        ]
        for method, url, body, status in cases:
            response = await http.request(method, url, json=body)
            assert response.status_code == status, (method, url, response.text)
            error = response.json()["error"]
            assert error["code"] in {102, 103, 201} and len(error["message"]) < 200, error
        for raw in (b"{", b"[" * 60_000, '{"room": "\u00e9"}'.encode("latin-1"), b""):
            response = await http.post("/admin/rooms", content=raw)
            assert response.status_code == 400, (raw[:20], response.text)
            assert response.json()["error"]["name"] == "INVALID"
    # The room that does not exist was looked up (once in storage), not started.
    assert len(server.node.services.rooms) == 1
    assert server.node.directory.count(ActorKind.ROOM) == 0


def test_every_error_code_has_an_http_status_of_its_class() -> None:
    for code in ErrorCode:
        expected = {1: range(400, 500), 2: range(400, 500), 3: range(500, 600)}[code // 100]
        assert http_status(code) in expected, code
    assert http_status(ErrorCode.INTERNAL) == 500 and http_status(ErrorCode.BLOCKED) == 403


async def test_admin_bodies_are_bounded(server: RunningServer) -> None:
    async with server.http() as http:
        response = await http.post("/admin/rooms/x/messages", content=b" " * (MAX_BODY_BYTES + 1))
        assert response.status_code == 413
        assert response.json()["error"]["code"] == 103
    async with server.http() as http:  # a fresh connection: the last one is closed
        assert (await http.get("/admin/stats")).status_code == 200


async def test_admin_room_pages_end_without_an_empty_page(server: RunningServer) -> None:
    async with server.http() as http:
        for room in ("a", "b", "c"):
            assert (await http.post("/admin/rooms", json={"room": room})).status_code == 201
        whole = (await http.get("/admin/rooms?limit=3")).json()
        assert [r["room"] for r in whole["rooms"]] == ["a", "b", "c"]
        assert whole["next"] is None  # was "c", which led to an empty page
        first = (await http.get("/admin/rooms?limit=2")).json()
        assert ([r["room"] for r in first["rooms"]], first["next"]) == (["a", "b"], "b")
        last = (await http.get(f"/admin/rooms?limit=2&after={first['next']}")).json()
        assert ([r["room"] for r in last["rooms"]], last["next"]) == (["c"], None)


async def test_a_body_that_arrives_after_a_refusal_does_not_hang_the_connection(
    server: RunningServer,
) -> None:
    """Hypercorn left a kept-alive connection unanswered when the response (here a 401)
    went out before the request's body had arrived."""
    host, port = server.addresses.ops
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        body = b'{"room": "late"}'
        head = f"POST /admin/rooms HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        await stream.send_all(head.encode())
        received = b""
        with trio.move_on_after(0.3):  # the server may answer before the body comes
            received += await stream.receive_some()
        await trio.sleep(0.3)  # and have finished with the request by then
        await stream.send_all(body)
        await trio.sleep(0.1)  # the body and the next request in separate reads
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(10):
            while not received.endswith(b'{"status":"OK"}\n'):  # the answer to the GET
                chunk = await stream.receive_some()
                assert chunk, f"the connection was closed: {received!r}"
                received += chunk
    assert received.startswith(b"HTTP/1.1 401") and b"HTTP/1.1 200" in received


async def test_a_request_waiting_on_storage_does_not_look_idle(tmp_path: Path) -> None:
    """The reader reads no pong while it waits for a join's commit: not a silent client."""
    async with run_server(tmp_path, ping_interval=0.2, pong_timeout=0.2) as server:
        async with server.client("alice") as alice, server.client("bob") as bob:
            await alice.create("r")
            blocker = sqlite3.connect(tmp_path / "parley.db", isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(bob.join, "r")  # waits for the member's commit
                    await trio.sleep(1.0)  # well past ping interval + pong timeout
                    blocker.execute("ROLLBACK")
            finally:
                blocker.close()
            assert await bob.ping() >= 0


async def test_a_session_that_ends_mid_join_leaves_no_subscriber(tmp_path: Path) -> None:
    async with run_server(tmp_path) as server:
        async with server.client("alice") as alice:
            await alice.create("r")
            blocker = sqlite3.connect(tmp_path / "parley.db", isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")
            try:
                async with server.client("bob") as bob:
                    with trio.move_on_after(0.5):
                        await bob.join("r")  # subscribed, waiting for the commit
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            room = server.node.directory.actor(ActorKind.ROOM, "r")
            with trio.fail_after(10):
                while any(s.link.user == "bob" for s in room.subs.values()):  # noqa: ASYNC110
                    await trio.sleep(0.02)


async def test_metrics_count_receipts_and_presence(server: RunningServer) -> None:
    async with server.client("alice") as alice, server.client("bob") as bob:
        await alice.create("r")
        await bob.join("r")
        sent = await alice.send("r", "m")
        await bob.receipt("r", read=sent.seq)
        with trio.fail_after(10):
            await alice.next_event(ReceiptState)
        await bob.who("alice")
        async with server.http(admin=False) as http:
            got = samples((await http.get("/metrics")).text)
    assert got["parley_frames_in_total", (("type", "receipt"),)] == 1
    assert got["parley_frames_in_total", (("type", "who"),)] == 1
    assert got["parley_frames_out_total", (("type", "receiptstate"),)] == 2  # to both
    assert got["parley_frames_out_total", (("type", "presencelist"),)] >= 1  # who
    assert got["parley_presence_changes_total", ()] == 2  # alice and bob came online
