"""A node on PostgreSQL, end to end: chat, kv and a restart; and an outage of the
database while clients chat (the private server is stopped and started again)."""

import logging
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]
import pytest
import trio

from protocol.client import ServerError
from protocol.errors import ErrorCode
from protocol.frames import Joined, KvWrite, Message
from protocol.hlc import pack
from storage.migrations import migrations_for
from storage.postgres import NODE_LOCK
from storage.postgres import _translate as translate_error
from storage.store import (
    KvSnapshot,
    StorageConfigError,
    StorageError,
    StorageUnavailable,
    Store,
    open_store,
)
from tests.helpers import run_server, until_status
from tests.postgres import PrivatePostgres, private_postgres


async def test_chat_kv_and_a_restart_on_postgres(tmp_path: Path, postgres_url: str) -> None:
    async with run_server(tmp_path, database_url=postgres_url) as server:
        async with server.client("alice") as alice, server.client("bob") as bob:
            await alice.create("r")
            await bob.join("r")
            sent = [await alice.send("r", f"m{i}", cid=f"c{i}") for i in range(5)]
            got = [await bob.next_event(Message) for _ in range(5)]
            assert [m.seq for m in got] == [s.seq for s in sent] == [1, 2, 3, 4, 5]
            await bob.receipt("r", read=5)
            ack = await alice.kv_put("phone", KvWrite(key="theme", hlc=pack(1), value="dark"))
            assert ack.items[0].code is None
            positions = dict(bob.positions)
    async with run_server(tmp_path, database_url=postgres_url) as server:
        async with server.client("bob", resume=positions) as bob:
            joined = await bob.next_event(Joined)
            assert (joined.recovered, joined.seq, joined.read) == (True, 5, 5)
            page = await bob.history("r", limit=10)
            assert [m.text for m in page.items] == [f"m{i}" for i in range(5)]
        async with server.client("alice") as alice:
            changes = await alice.kv_sync()
            assert [(e.key, e.value, e.rev) for e in changes.items] == [("theme", "dark", 1)]


@pytest.fixture
def own_postgres() -> Iterator[PrivatePostgres]:
    """A private server of this test's own, to stop and start."""
    with private_postgres() as server:
        yield server


async def test_a_database_outage_holds_acks_then_drains(
    tmp_path: Path, own_postgres: PrivatePostgres
) -> None:
    url = own_postgres.new_database()
    async with run_server(
        tmp_path, database_url=url, write_queue_records=30, storage_probe_interval=0.1
    ) as server:
        async with server.client("alice") as alice, server.client("bob") as bob:
            await alice.create("r")
            await bob.join("r")
            before = [await alice.send("r", f"before{i}", cid=f"b{i}") for i in range(3)]
            assert [(await bob.next_event(Message)).seq for _ in before] == [1, 2, 3]
            assert (await until_status(server, "OK"))["reasons"] == []  # OK, for no reason left

            await trio.to_thread.run_sync(own_postgres.stop)
            body = await until_status(server, "Degraded")  # the probe notices, idle
            assert any("storage:" in str(r) for r in body["reasons"]), body
            acked: dict[str, int] = {}
            refused: list[str] = []

            async def send(cid: str) -> None:
                try:
                    acked[cid] = (await alice.send("r", cid, cid=cid)).seq
                except ServerError as exc:
                    assert exc.code is ErrorCode.TRY_LATER
                    refused.append(cid)

            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(send, f"d{i}")
                body = await until_status(server, "Failed")  # the queue is full
                reasons = body["reasons"]
                assert isinstance(reasons, list)
                assert any(str(r).startswith("storage:") for r in reasons), reasons
                assert any("queue full" in str(r) for r in reasons), reasons
                with trio.fail_after(30):
                    while len(refused) < 10:  # noqa: ASYNC110 - counting refusals
                        await trio.sleep(0.05)
                assert acked == {}  # no ack while nothing can be stored
                # Online members still get the messages the room sequenced.
                live = [await bob.next_event(Message) for _ in range(40 - len(refused))]
                assert [m.seq for m in live] == list(range(4, 4 + len(live)))

                await trio.to_thread.run_sync(own_postgres.start)
            assert (await until_status(server, "OK"))["reasons"] == []  # OK, for no reason left
            # The node lock went with the old server's sessions; the probe took it back.
            async with open_store(url) as other:
                with pytest.raises(StorageConfigError, match="another Parley node"):
                    await other.begin_run()

            assert len(acked) + len(refused) == 40
            assert sorted(acked.values()) == list(range(4, 4 + len(acked)))
            page = await alice.history("r", limit=100)
            stored = [(m.seq, m.cid) for m in page.items]
            assert [seq for seq, _ in stored] == list(range(1, 4 + len(acked)))  # no gap
            assert len({cid for _, cid in stored}) == len(stored)  # nothing twice
            assert {cid: seq for seq, cid in stored if cid.startswith("d")} == acked
            assert not set(refused) & {cid for _, cid in stored}
            assert [s.seq for s in before] == [1, 2, 3]


async def until_ping_answers(store: Store) -> None:
    """Until the store's readiness probe passes; at most 30 s."""
    with trio.fail_after(30):
        while True:
            try:
                await store.ping()
            except StorageUnavailable:
                await trio.sleep(0.1)
            else:
                return


async def test_ping_fails_while_the_database_is_down_and_answers_again(
    own_postgres: PrivatePostgres,
) -> None:
    """What readiness asks of storage: ``StorageUnavailable`` while PostgreSQL is stopped,
    an answer again once it is back, on the same store."""
    async with open_store(own_postgres.new_database()) as store:
        await store.ping()
        await trio.to_thread.run_sync(own_postgres.stop)
        with pytest.raises(StorageUnavailable), trio.fail_after(30):
            await store.ping()
        await trio.to_thread.run_sync(own_postgres.start)
        await until_ping_answers(store)  # the pool reconnects as the server comes up


async def test_the_database_password_appears_in_no_log_line_or_status(
    tmp_path: Path, own_postgres: PrivatePostgres, caplog: pytest.LogCaptureFixture
) -> None:
    """Through a start, an outage and a recovery: the password in --database-url is in
    no log line (tracebacks included), readiness body or metrics page."""
    caplog.set_level(logging.DEBUG)
    url = own_postgres.new_database().replace("parley@", "parley:hunter2@")  # trust auth
    seen: list[str] = []
    async with run_server(tmp_path, database_url=url, storage_probe_interval=0.1) as server:
        async with server.client("alice") as alice:
            await alice.create("r")
            await alice.send("r", "before")
            seen.append(repr(await until_status(server, "OK")))
            await trio.to_thread.run_sync(own_postgres.stop)
            seen.append(repr(await until_status(server, "Degraded")))
            with trio.move_on_after(1):  # refused or held: either way it meets the outage
                await alice.send("r", "during")
            async with server.http() as http:
                seen.append((await http.get("/metrics")).text)
            await trio.to_thread.run_sync(own_postgres.start)
            seen.append(repr(await until_status(server, "OK")))
    handler = logging.StreamHandler()
    seen += [handler.format(record) for record in caplog.records]
    assert any("storage" in line.lower() for line in seen)  # the outage was seen and said
    assert [line for line in seen if "hunter2" in line] == []


async def test_postgres_errors_are_unavailable_or_not_by_their_class(
    own_postgres: PrivatePostgres,
) -> None:
    """Retrying helps with a statement cut by its timeout (here: a lock held elsewhere)
    or a server that is gone: ``StorageUnavailable``. It does not with a missing table
    (SQLSTATE class 42): ``StorageError`` only."""
    url = own_postgres.new_database()
    database = urlsplit(url).path.lstrip("/")
    async with open_store(url, statement_timeout=0.3) as store:
        assert await store.fetch_messages("r", 1, 10) == []
        # psql holds an exclusive lock on messages, in a transaction left open.
        held = await trio.to_thread.run_sync(
            own_postgres.hold, "BEGIN; LOCK TABLE messages IN ACCESS EXCLUSIVE MODE", database
        )
        try:
            # PostgreSQL's statement timeout or the driver's, whichever fires first.
            timed_out = "statement timeout|did not answer in time"
            with pytest.raises(StorageUnavailable, match=timed_out), trio.fail_after(30):
                await store.fetch_messages("r", 1, 10)
        finally:
            held.release()

        await trio.to_thread.run_sync(own_postgres.psql, "DROP TABLE messages CASCADE", database)
        with pytest.raises(StorageError) as missing:
            await store.fetch_messages("r", 1, 10)
        assert not isinstance(missing.value, StorageUnavailable)

        await trio.to_thread.run_sync(own_postgres.stop)
        with pytest.raises(StorageUnavailable), trio.fail_after(30):
            await store.fetch_messages("r", 1, 10)


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (asyncpg.exceptions.AdminShutdownError("terminating connection"), True),  # 57P01
        (asyncpg.exceptions.TooManyConnectionsError("too many clients"), True),  # 53300
        (asyncpg.exceptions.SerializationError("could not serialize"), True),  # 40001
        (asyncpg.exceptions.DeadlockDetectedError("deadlock detected"), True),  # 40P01
        (asyncpg.exceptions.ConnectionFailureError("connection failure"), True),  # 08006
        (asyncpg.exceptions.TransactionIntegrityConstraintViolationError("x"), False),  # 40002
        (asyncpg.exceptions.UndefinedTableError('relation "x" does not exist'), False),
        (TimeoutError(), True),  # asyncio's, from our bound on a call
        (TimeoutError(110, "Connection timed out"), True),  # a socket's
        (ConnectionRefusedError(111, "Connection refused"), True),
        (ValueError("a bug of ours"), False),
    ],
)
def test_every_postgres_error_is_classed_by_its_sqlstate(
    error: Exception, unavailable: bool
) -> None:
    """Worth a retry (StorageUnavailable: TRY_LATER) or not (StorageError): the second
    is what the admin API answers 500 for, and logs."""
    translated = translate_error(error)
    assert isinstance(translated, StorageError)
    assert isinstance(translated, StorageUnavailable) is unavailable
    assert str(error) in str(translated)
    assert translate_error(translated) is translated  # classed once


async def test_a_node_lock_taken_by_another_node_is_reported_then_taken_back(
    own_postgres: PrivatePostgres, caplog: pytest.LogCaptureFixture
) -> None:
    """The node's lock session ends (as a database restart ends it) and another node
    takes the lock before this one's probe: each probe fails, saying so, while the
    other holds it; once it lets go, the next probe takes the lock back."""
    url = own_postgres.new_database()
    database = urlsplit(url).path.lstrip("/")
    async with open_store(url) as store:
        await store.begin_run()
        thief = await trio.to_thread.run_sync(
            own_postgres.hold,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'parley-node-lock';"
            f" SELECT pg_advisory_lock({NODE_LOCK})",
            database,
        )
        try:
            for _ in range(2):
                with pytest.raises(StorageUnavailable, match="another Parley node took"):
                    await store.ping()
            errors = [
                r
                for r in caplog.records
                if r.levelno == logging.ERROR and r.name == "storage.postgres"
            ]
            assert [r.getMessage() for r in errors] == [
                "the node lock of this database is held by another node"
            ] * 2
        finally:
            thief.release()
        await until_ping_answers(store)  # once the server has ended the other session
        async with open_store(url) as other:
            with pytest.raises(StorageConfigError, match="another Parley node"):
                await other.begin_run()


async def test_a_failed_migration_stops_the_start_and_leaves_no_half(
    own_postgres: PrivatePostgres,
) -> None:
    """A migration that fails (here a table in its way) rolls back whole: the start
    fails naming it, the migrations before it stay applied, and once the obstacle is
    gone the next start applies it and the rest."""
    url = own_postgres.new_database()
    database = urlsplit(url).path.lstrip("/")
    obstacle = "CREATE TABLE kv (unrelated INTEGER)"
    await trio.to_thread.run_sync(own_postgres.psql, obstacle, database)
    with pytest.raises(StorageConfigError) as failed:
        async with open_store(url):
            pass
    assert 'migration 0003_kv failed: relation "kv" already exists' in str(failed.value)
    versions = await trio.to_thread.run_sync(
        own_postgres.psql,
        "SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_migrations",
        database,
    )
    assert versions == "1,2"
    await trio.to_thread.run_sync(own_postgres.psql, "DROP TABLE kv", database)
    async with open_store(url) as store:
        assert await store.load_kv("alice") == KvSnapshot()  # the kv tables are there
    versions = await trio.to_thread.run_sync(
        own_postgres.psql, "SELECT count(*) FROM schema_migrations", database
    )
    assert int(versions) == len(migrations_for("postgres"))
