"""``parley serve --workers N``: node processes sharing one port (SO_REUSEPORT) under a
supervisor that serves one ops endpoint, restarts a dead worker and drains them all on
SIGTERM. Real processes on real sockets, with a private PostgreSQL and Redis."""

import os
import signal
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from protocol.client import ParleyClient, open_client
from protocol.frames import Message, Sent
from server.cli import build_parser
from server.config import config_from_args
from server.workers import Supervisor, Worker, _exit_text
from tests.helpers import ADMIN, SECRET, ServerProcess, events_until, node_config, run_cli
from tests.helpers import server_process as single_process

LEASE = "1"


@asynccontextmanager
async def machine(
    tmp_path: Path, database_url: str, redis_url: str, *extra: str
) -> AsyncIterator[ServerProcess]:
    """``parley serve --workers 2`` as a child process, ready (both workers answer)."""
    args = ("--workers", "2", "--database-url", database_url, "--redis-url", redis_url)
    async with single_process(tmp_path, *args, "--cluster-lease", LEASE, *extra) as server:
        await server.start()
        await until_ready(server)
        yield server


def ops(server: ServerProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{server.ops_port}",
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=10,
    )


async def readiness(server: ServerProcess) -> tuple[int, dict[str, Any]]:
    async with ops(server) as http:
        response = await http.get("/readyz")
    return response.status_code, response.json()


async def until_ready(server: ServerProcess) -> dict[str, Any]:
    """The machine's readiness once it is OK; fails after 30 s with the last answer."""
    body: dict[str, Any] = {}
    try:
        with trio.fail_after(30):
            while True:
                try:
                    status, body = await readiness(server)
                except httpx.TransportError:
                    status = 0
                if status == 200 and body["status"] == "OK":
                    return body
                await trio.sleep(0.1)
    except trio.TooSlowError:
        raise AssertionError(f"not ready: {body}\n{server.log()}") from None


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (an exited child not reaped yet does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@contextmanager
def killed_at_the_end(stopped: Iterable[int]) -> Iterator[None]:
    """Workers a test stopped (SIGSTOP) die with it even if it fails: a stopped orphan
    would never see that its supervisor is gone."""
    try:
        yield
    finally:
        for pid in stopped:
            if _running(pid):  # not one that exited, whose number may be another's now
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def pids(body: dict[str, Any]) -> dict[int, int]:
    return {w["worker"]: w["pid"] for w in body["checks"]["workers"]}


async def samples(server: ServerProcess, name: str) -> dict[str, float]:
    """``name``'s value per ``worker`` label, from the machine's /metrics."""
    async with ops(server) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name:
                found[sample.labels.get("worker", "")] = sample.value
    return found


async def sessions(server: ServerProcess) -> dict[str, float]:
    return await samples(server, "parley_sessions")


async def test_workers_share_the_port_chat_across_and_drain(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    async with machine(tmp_path, postgres_url, redis_url) as server:
        body = await until_ready(server)
        assert sorted(pids(body)) == [0, 1]
        assert all(w["status"] == "OK" for w in body["checks"]["workers"])
        assert len(set(pids(body).values())) == 2
        assert server.proc is not None and server.proc.pid not in pids(body).values()

        # Clients connect one at a time; the worker whose session gauge moved has it.
        where: dict[str, str] = {}
        async with AsyncExitStack() as stack:
            clients: dict[str, ParleyClient] = {}
            before = await sessions(server)
            for i in range(40):
                user = f"u{i}"
                clients[user] = await stack.enter_async_context(
                    open_client(server.url, server.token(user))
                )
                with trio.fail_after(10):
                    while (now := await sessions(server)) == before:  # noqa: ASYNC110
                        await trio.sleep(0.02)
                (moved,) = [w for w in now if now[w] != before.get(w, 0)]
                assert now[moved] == before.get(moved, 0) + 1
                where[user], before = moved, now
            assert sorted(before) == ["0", "1"]
            assert sum(before.values()) == 40
            assert all(count > 0 for count in before.values()), before  # the kernel spread them

            # Two users on different workers chat in one room.
            alice_user = next(u for u, w in where.items() if w == "0")
            bob_user = next(u for u, w in where.items() if w == "1")
            alice, bob = clients[alice_user], clients[bob_user]
            await alice.create("lobby")
            await bob.join("lobby")
            sent: list[Sent] = []

            async def talk(client: ParleyClient, who: str) -> None:
                for i in range(10):
                    sent.append(await client.send("lobby", f"{who}{i}", cid=f"{who}{i}"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(talk, alice, "a")
                nursery.start_soon(talk, bob, "b")
            assert sorted(s.seq for s in sent) == list(range(1, 21))
            by_seq = {s.seq: s.cid for s in sent}
            for client in (alice, bob):
                with trio.fail_after(10):
                    got = await events_until(client, Message, 20)
                assert [m.seq for m in got] == list(range(1, 21))  # in order, once each
                assert all(by_seq[m.seq] == m.cid for m in got)

            # The admin API answers through the machine's endpoint (from one worker).
            async with ops(server) as http:
                room = (await http.get("/admin/rooms/lobby")).json()
                refused = await http.get("/admin/stats", headers={"Authorization": "Bearer x"})
                created = await http.post("/admin/rooms", json={"room": "second"})
                page = (await http.get("/admin/rooms?limit=1")).json()  # the query goes along
                health = await http.get("/healthz")
            assert room["seq"] == 20
            assert refused.status_code == 401  # the worker checked the token
            assert created.status_code == 201, created.text
            assert [r["room"] for r in page["rooms"]] == ["lobby"] and page["next"] == "lobby"
            assert health.status_code == 200
            assert health.json() == {
                "status": "OK",
                "reasons": [],
                "pids": {str(i): pid for i, pid in pids(body).items()},
            }

            # SIGTERM drains both workers, clients still connected, and exits 0.
            assert await server.signal(signal.SIGTERM) == 0
        log = server.log()
        assert log.count("stopped cleanly") == 2, log
        assert "w0 server.node: draining: " in log and "w1 server.node: draining: " in log


async def test_a_killed_worker_is_restarted_pinned_again(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    async with machine(tmp_path, postgres_url, redis_url, "--pin-workers") as server:
        first = pids(await until_ready(server))
        for index, pid in first.items():
            assert os.sched_getaffinity(pid) == {cpus[index % len(cpus)]}
        assert await samples(server, "parley_worker_pid") == {
            str(i): float(pid) for i, pid in first.items()
        }

        os.kill(first[1], signal.SIGKILL)
        with trio.fail_after(30):
            while True:
                status, body = await readiness(server)
                if pids(body)[1] is None:  # seen down: reported, not waited for
                    assert status == 503
                    assert any(r.startswith("worker 1: ") for r in body["reasons"]), body
                if status == 200 and pids(body)[1] not in (None, first[1]):
                    break
                await trio.sleep(0.05)
        second = pids(body)
        assert second[0] == first[0]
        restarts = {w["worker"]: w["restarts"] for w in body["checks"]["workers"]}
        assert restarts == {0: 0, 1: 1}
        assert await samples(server, "parley_worker_restarts_total") == {"0": 0.0, "1": 1.0}
        assert os.sched_getaffinity(second[1]) == {cpus[1 % len(cpus)]}
        assert f"worker 1 (pid {first[1]}) exited killed by SIGKILL" in server.log()

        # Serving on: a client gets in, whichever worker it reaches.
        async with open_client(server.url, server.token("carol")) as carol:
            await carol.create("after")
            assert (await carol.send("after", "hi")).seq == 1
        assert await server.signal(signal.SIGTERM) == 0


async def test_a_worker_that_does_not_drain_is_killed_after_the_timeout(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    async with machine(tmp_path, postgres_url, redis_url, "--drain-timeout", "1") as server:
        stuck = pids(await until_ready(server))[0]
        with killed_at_the_end([stuck]):
            os.kill(stuck, signal.SIGSTOP)  # it cannot drain
            status, body = await readiness(server)
            assert status == 503
            assert any(r.startswith("worker 0: unreachable: no answer") for r in body["reasons"])
            async with ops(server) as http:
                health = await http.get("/healthz")
            assert health.status_code == 503
            assert health.json()["reasons"] == ["worker 0: no answer in 2 s"]
            assert await server.signal(signal.SIGTERM) == 1  # not all drained
            log = server.log()
    assert log.count("stopped cleanly") == 1, log  # worker 1
    assert "workers stopped: -9, 0" in log


async def test_a_second_signal_kills_the_workers(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    async with machine(tmp_path, postgres_url, redis_url) as server:
        stuck = pids(await until_ready(server))
        with killed_at_the_end(stuck.values()):
            for pid in stuck.values():
                os.kill(pid, signal.SIGSTOP)  # neither can drain: the second signal must act
            assert server.proc is not None
            server.proc.send_signal(signal.SIGINT)
            with trio.fail_after(10):
                while "SIGINT received: draining" not in server.log():  # noqa: ASYNC110
                    await trio.sleep(0.05)
            status, body = await readiness(server)
            assert status == 503
            assert body["reasons"][0] == "draining: the machine is shutting down"
            # The drain timeout (10 s) and margin have not passed: this exit is the SIGKILL's.
            assert await server.signal(signal.SIGTERM) == 1
            log = server.log()
    assert "second SIGTERM: killing the workers" in log
    assert "workers stopped: -9, -9" in log


def test_workers_need_redis_and_postgresql(tmp_path: Path) -> None:
    base = ("serve", f"--secret={SECRET}", "--port", "0", "--ops-port", "0")
    no_redis = run_cli(*base, "--workers", "2", cwd=tmp_path)
    sqlite = run_cli(
        *base, "--redis-url", "redis://127.0.0.1:1", cwd=tmp_path, env={"PARLEY_WORKERS": "3"}
    )
    for result, n in ((no_redis, 2), (sqlite, 3)):
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"parley serve: --workers {n}: "), result.stderr
        assert "--redis-url redis://" in result.stderr
        assert "--database-url postgresql://" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    help_text = run_cli("serve", "--help").stdout
    assert "--pin-workers" in help_text and "PARLEY_WORKERS" in help_text
    assert "--worker " not in help_text  # the supervisor's flag for its children


def test_a_worker_reads_the_supervisors_options_from_its_environment(tmp_path: Path) -> None:
    config = node_config(
        tmp_path,
        workers=4,
        pin_workers=True,
        redis_url="redis://127.0.0.1:1/2",
        database_url="postgresql://u:p@127.0.0.1/db",
        rate=12.5,
        presence_grace=0.0,
        admin_token=None,
    )
    supervisor = Supervisor(config, [Worker(3, "unix:/run/w3.sock")])
    env = supervisor.environment(supervisor.workers[0])
    args = build_parser(env).parse_args(supervisor.command(supervisor.workers[0])[3:])
    assert args.worker == 3
    expected = attrs.evolve(config, workers=1, ops_host="unix:/run/w3.sock", ops_port=0)
    assert config_from_args(args) == expected


async def test_workers_drain_when_their_supervisor_is_killed(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    """SIGKILL of the supervisor: the orphaned workers notice, drain and exit, rather
    than hold the port out of anyone's control."""
    async with machine(tmp_path, postgres_url, redis_url) as server:
        workers = pids(await until_ready(server))
        with killed_at_the_end(workers.values()):
            assert await server.signal(signal.SIGKILL) == -signal.SIGKILL
            with trio.fail_after(30):
                while any(_running(pid) for pid in workers.values()):  # noqa: ASYNC110 - other processes
                    await trio.sleep(0.05)
            log = server.log()
    assert server.proc is not None
    assert log.count(f"the supervisor (pid {server.proc.pid}) is gone: draining") == 2, log
    assert log.count("stopped cleanly") == 2, log


def test_how_a_workers_exit_is_told() -> None:
    assert _exit_text(0) == "with status 0"
    assert _exit_text(3) == "with status 3"
    assert _exit_text(-signal.SIGKILL) == "killed by SIGKILL"
    assert _exit_text(-200) == "killed by signal 200"  # no such signal here
