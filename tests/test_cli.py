"""server/cli.py and server/config.py: the commands a new user types."""

import functools
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from loadtests.cli import free_port
from protocol.client import open_client
from server.chat import printable, retry_after
from server.cli import build_parser
from server.config import SERVE_OPTIONS, config_from_args
from server.tokens import DEV_SECRETS_NAME, issue_token, load_dev_secrets, token_verifier
from tests.helpers import (
    SECRET,
    ServerProcess,
    rename_table,
    run_cli,
    run_server,
    server_process,
)


def test_help_lists_the_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("serve", "token", "chat", "migrate", "bench"):
        assert command in result.stdout


def test_serve_help_explains_every_option_and_its_variable() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # undo argparse's line wrapping
    for option in SERVE_OPTIONS:
        assert option.flag in text
        assert option.env in text
    for required in (
        "--host",
        "--port",
        "--ops-host",
        "--ops-port",
        "--database-url",
        "--redis-url",
        "--secret",
        "--admin-token",
        "--dev",
        "--log-level",
    ):
        assert required in text


@pytest.mark.parametrize("command", ["token", "chat", "migrate", "bench"])
def test_every_command_has_help(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout


def test_environment_variables_configure_serve() -> None:
    env = {
        "PARLEY_PORT": "9001",
        "PARLEY_DEV": "true",
        "PARLEY_RATE": "7.5",
        "PARLEY_ACK_MODE": "sequenced",
        "PARLEY_DATABASE_URL": "sqlite:///x.db",
    }
    args = build_parser(env).parse_args(["serve", "--rate", "9"])
    config = config_from_args(args)
    assert (config.port, config.dev, config.rate, config.ack_mode, config.database_url) == (
        9001,
        True,
        9.0,
        "sequenced",
        "sqlite:///x.db",  # the flag beats the variable
    )
    assert not config.settings().durable_acks


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The error line of a command that must fail with exit status 2 and say why once."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["serve", "--port", "abc"], "parley serve: --port: must be an integer 0-65535, got 'abc'"),
        (["serve", "--ops-port", "70000"], "--ops-port: must be an integer 0-65535, got '70000'"),
        (["serve", "--rate", "nan"], "--rate: must be a positive number, got 'nan'"),
        (["serve", "--storage-probe-interval", "x"], "must be a number 0 or more, got 'x'"),
        (["serve", "--dev", "--log-level", "loud"], "--log-level: invalid choice: 'loud'"),
        (["token", "alice", "--ttl", "-100"], "--ttl: must be a positive integer, got '-100'"),
        (["token", "alice", "--ttl", "0"], "--ttl: must be a positive integer, got '0'"),
        (["chat", "--user", "a", "--room", "r", "--history", "x"], "--history: must be"),
        (["chat", "--user", "a"], "parley chat: the following arguments are required: --room"),
        (["bench", "fanout", "--receivers", "x"], "--receivers: must be an integer, got 'x'"),
        (["migrate", "--database-url", "sqlite:x.db"], "--database-url: bad SQLite URL"),
    ],
)
def test_a_bad_flag_is_one_clear_line(args: list[str], line: str) -> None:
    error = one_line_error(run_cli(*args))
    assert line in error
    assert error.endswith("--help")
    assert "invalid" not in error.replace("invalid choice", "")  # argparse's type names


def test_a_bad_environment_value_is_one_clear_line(tmp_path: Path) -> None:
    result = run_cli("serve", env={"PARLEY_PORT": "abc"}, cwd=tmp_path)
    assert one_line_error(result).startswith(
        "parley serve: PARLEY_PORT='abc': must be an integer 0-65535"
    )
    result = run_cli("serve", env={"PARLEY_ACK_MODE": "maybe"}, cwd=tmp_path)
    assert "PARLEY_ACK_MODE='maybe': choose from durable, sequenced" in one_line_error(result)
    url = "postgresql://parley:hunter2@db:5432"
    result = run_cli("migrate", env={"PARLEY_DATABASE_URL": url}, cwd=tmp_path)
    error = one_line_error(result)
    assert "PARLEY_DATABASE_URL: postgresql://parley:***@db:5432 names no database" in error
    # The flag wins, even over a wrong variable; other commands do not read it.
    result = run_cli("serve", "--port", "1", "--secret=short", env={"PARLEY_PORT": "abc"})
    assert "at least 32 bytes" in one_line_error(result)
    result = run_cli("token", "alice", "--secret", SECRET, env={"PARLEY_PORT": "abc"})
    assert result.returncode == 0, result.stderr


def test_a_secret_may_start_with_a_dash(tmp_path: Path) -> None:
    secret = "-" + SECRET
    result = run_cli("token", "alice", f"--secret={secret}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert token_verifier(secret)(result.stdout.strip()).user == "alice"
    error = one_line_error(run_cli("token", "alice", "--secret", secret, cwd=tmp_path))
    assert "--secret=VALUE" in error
    assert "--secret=VALUE" in " ".join(run_cli("serve", "--help").stdout.split())


def test_an_expired_token_is_never_printed(tmp_path: Path) -> None:
    result = run_cli("token", "alice", "--ttl", "-100", "--secret", SECRET, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""


def test_chat_refuses_a_token_of_another_user(tmp_path: Path) -> None:
    dave = issue_token(SECRET, "dave", 3600)
    # Refused before connecting: nothing listens at this URL.
    url = f"ws://127.0.0.1:{free_port()}/ws"
    result = run_cli("chat", "--user", "carol", "--room", "r", "--token", dave, "--url", url)
    error = one_line_error(result)
    assert "--token is dave's token, not carol's" in error
    result = run_cli("chat", "--user", "carol", "--room", "r", "--token", "junk", "--url", url)
    assert "not a session token" in one_line_error(result)


@pytest.mark.parametrize(
    ("token", "cause"),
    [
        (issue_token("another-secret-of-32-bytes-or-more-0123", "carol", 3600), "--secret="),
        (issue_token(SECRET, "carol", -100), "make a new one"),
    ],
)
async def test_chat_says_why_the_server_refused_its_token(
    tmp_path: Path, token: str, cause: str
) -> None:
    async with run_server(tmp_path) as server:
        command = ["chat", "--user", "carol", "--room", "r", "--url", server.url, "--token", token]
        result = await trio.to_thread.run_sync(lambda: run_cli(*command))
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "the server refused the token" in lines[0], result.stderr
    assert cause in lines[0]


def test_serve_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    result = run_cli("serve", cwd=tmp_path)
    assert result.returncode == 2
    assert "--secret" in result.stderr and "--dev" in result.stderr
    result = run_cli("serve", "--secret", "too-short", cwd=tmp_path)
    assert result.returncode == 2 and "at least 32 bytes" in result.stderr


def test_an_empty_admin_token_means_off_and_a_short_one_is_refused() -> None:
    args = build_parser({"PARLEY_ADMIN_TOKEN": "", "PARLEY_SECRET": ""}).parse_args(["serve"])
    config = config_from_args(args)
    assert config.admin_token is None and config.secret is None
    result = run_cli("serve", "--secret", SECRET, "--admin-token", "short")
    assert result.returncode == 2 and "at least 16" in result.stderr


def test_a_cluster_on_sqlite_is_refused(tmp_path: Path) -> None:
    result = run_cli("serve", "--dev", "--redis-url", "redis://localhost", cwd=tmp_path)
    assert result.returncode == 2 and "SQLite serves a single node" in result.stderr


def test_token_with_an_explicit_secret(tmp_path: Path) -> None:
    secret = "a-secret-of-at-least-32-bytes-0123456789"
    result = run_cli("token", "alice", "--secret", secret, cwd=tmp_path)
    assert result.returncode == 0
    assert token_verifier(secret)(result.stdout.strip()).user == "alice"
    assert run_cli("token", "not:valid", "--secret", secret, cwd=tmp_path).returncode == 2


def test_token_uses_the_secret_a_dev_server_keeps(tmp_path: Path) -> None:
    result = run_cli("token", "alice", cwd=tmp_path)
    assert result.returncode == 2 and "serve --dev" in result.stderr
    assert not (tmp_path / DEV_SECRETS_NAME).exists()  # token never makes a secret up
    kept = load_dev_secrets(tmp_path / DEV_SECRETS_NAME, create=True)  # as serve --dev does
    assert kept is not None
    assert (tmp_path / DEV_SECRETS_NAME).stat().st_mode & 0o777 == 0o600
    result = run_cli("token", "bob", cwd=tmp_path)
    assert result.returncode == 0
    assert token_verifier(kept.secret)(result.stdout.strip()).user == "bob"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_cli(
        "token", "bob", "--database-url", f"sqlite:///{tmp_path / 'parley.db'}", cwd=elsewhere
    )
    assert token_verifier(kept.secret)(result.stdout.strip()).user == "bob"


def test_clear_errors_for_common_mistakes(tmp_path: Path) -> None:
    missing = run_cli(
        "serve", "--dev", "--database-url", "sqlite:///no/such/dir/x.db", cwd=tmp_path
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad_url = run_cli(
        "chat",
        "--user",
        "a",
        "--room",
        "r",
        "--url",
        "http://x/ws",
        "--secret",
        SECRET,
        cwd=tmp_path,
    )
    assert bad_url.returncode == 2 and "WebSocket URL" in bad_url.stderr
    bad_user = run_cli(
        "chat", "--user", "not valid", "--room", "r", "--secret", SECRET, cwd=tmp_path
    )
    assert bad_user.returncode == 2 and "bad user id" in bad_user.stderr


def test_migrate_creates_the_schema(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    result = run_cli("migrate", "--database-url", f"sqlite:///{db}")
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(db) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    assert {"rooms", "members", "messages", "runs", "schema_migrations"} <= tables


async def test_dev_server_and_token_agree_with_no_setup(tmp_path: Path) -> None:
    port, ops_port = free_port(), free_port()
    command = [
        "serve",
        "--dev",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--ops-port",
        str(ops_port),
    ]
    log = tmp_path / "serve.log"
    async with trio.open_nursery() as nursery:
        with log.open("wb") as out:
            proc = await nursery.start(
                functools.partial(
                    trio.run_process,
                    [sys.executable, "-m", "server.cli", *command],
                    cwd=tmp_path,
                    stdout=out,
                    stderr=out,
                    check=False,
                )
            )
        with trio.fail_after(30):
            while b"admin token" not in log.read_bytes():  # noqa: ASYNC110 - another process
                await trio.sleep(0.05)
        assert b"serving" in log.read_bytes()  # the secrets are shown once it serves
        token = (
            await trio.to_thread.run_sync(lambda: run_cli("token", "bob", cwd=tmp_path))
        ).stdout.strip()
        async with open_client(f"ws://127.0.0.1:{port}/ws", token) as client:
            assert client.welcome is not None and client.welcome.user == "bob"
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await proc.wait() == 0


def _chat_command(url: str, user: str) -> list[str]:
    return [
        *(sys.executable, "-m", "server.cli", "chat", "--user", user, "--room", "lobby"),
        *("--url", url, f"--secret={SECRET}"),
    ]


async def _until_written(path: Path, text: bytes, seconds: float = 30) -> None:
    """Until another process has written ``text`` into ``path``."""
    with trio.fail_after(seconds):
        while text not in path.read_bytes():  # noqa: ASYNC110, ASYNC240 - a file, no event
            await trio.sleep(0.05)


async def _start_chat(
    nursery: trio.Nursery,
    url: str,
    user: str,
    out_path: Path,
    err_path: Path,
    until: bytes | None = None,
) -> trio.Process:
    """``parley chat`` as ``user`` in lobby, its output into the two files; once it says
    ``until`` (default: that it is in). Its output is buffered, as a user's would be when
    piped (a line it forgets to flush is seen late, and the test fails)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with out_path.open("wb") as out, err_path.open("wb") as err:
        process: trio.Process = await nursery.start(
            functools.partial(
                trio.run_process,
                _chat_command(url, user),
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                check=False,
                env=env,
            )
        )
    await _until_written(err_path, until or f"{user} in lobby".encode())
    return process


async def test_two_chat_terminals_talk(tmp_path: Path) -> None:
    """``parley chat`` as people run it: bob listens, alice types two lines and quits."""
    async with run_server(tmp_path) as server:
        bob_out, bob_err = tmp_path / "bob.out", tmp_path / "bob.err"
        async with trio.open_nursery() as nursery:
            bob = await _start_chat(nursery, server.url, "bob", bob_out, bob_err)
            alice = await trio.run_process(
                _chat_command(server.url, "alice"),
                stdin=b"hi bob\nhow are you\n",
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert alice.returncode == 0, alice.stderr
            expected = b"[1] alice: hi bob\n[2] alice: how are you\n"
            await _until_written(bob_out, expected)
            assert expected in alice.stdout  # the typist sees the room too
            assert bob.stdin is not None
            await bob.stdin.aclose()  # Ctrl-D
            with trio.fail_after(30):
                assert await bob.wait() == 0
        # Carol comes later: she is shown what was said; a line too long is refused
        # (and said so), an empty one is not sent, and she goes on.
        carol = await trio.run_process(
            _chat_command(server.url, "carol"),
            stdin=b"x" * 4097 + b"\n\nhello\n",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert carol.returncode == 0, carol.stderr
    assert carol.stdout.startswith(expected), carol.stdout  # the history, before the rest
    assert b"[3] carol: hello\n" in carol.stdout
    assert b"! not sent: " in carol.stderr and b"4096" in carol.stderr, carol.stderr


async def test_chat_says_when_the_url_is_not_a_parley_endpoint(tmp_path: Path) -> None:
    """An HTTP server that is not Parley (here the node's ops port) answers the upgrade
    with an error: chat says so in one line and stops, it does not retry for ever."""
    async with run_server(tmp_path) as server:
        host, port = server.addresses.ops
        result = await trio.run_process(
            _chat_command(f"ws://{host}:{port}/ws", "alice"),
            stdin=b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 1
    assert b"is not a Parley endpoint (HTTP 404)" in result.stderr, result.stderr


def test_what_chat_shows_of_another_servers_refusal() -> None:
    """Its words without control characters (no escape sequence reaches the terminal),
    on one line, cut at 200 characters; its Retry-After, within reason."""
    assert printable(b"\x1b[2Jbusy\r\nnow\x07") == "[2Jbusy  now"
    assert printable(b"x" * 500) == "x" * 200 and printable(None) == ""
    assert retry_after(((b"Retry-After", b"10"),)) == 10.0
    assert retry_after(((b"retry-after", b"86400"),)) == 300.0
    assert retry_after(((b"retry-after", b"Wed, 21 Oct 2026 07:28:00 GMT"),)) == 0.0
    assert retry_after(()) == 0.0


async def test_chat_waits_for_a_full_server_then_gets_in(tmp_path: Path) -> None:
    """A server at its connection limit answers the upgrade 503: chat says the server is
    busy and tries again after the Retry-After the server asks for (PROTOCOL.md), and
    gets in once a place is free."""
    async with run_server(tmp_path, max_connections=1) as server:
        out_path, err_path = tmp_path / "alice.out", tmp_path / "alice.err"
        async with trio.open_nursery() as nursery:
            async with server.client("bob"):  # the one place
                busy = b"* server busy (HTTP 503: the server is full; try again later); "
                busy += b"retrying in 10 s"  # the server's Retry-After, over chat's backoff
                alice = await _start_chat(nursery, server.url, "alice", out_path, err_path, busy)
            await _until_written(err_path, b"alice in lobby")
            assert alice.stdin is not None
            await alice.stdin.aclose()  # Ctrl-D
            with trio.fail_after(30):
                assert await alice.wait() == 0
    assert b"not a Parley endpoint" not in err_path.read_bytes()


async def test_chat_retries_a_room_storage_cannot_find_yet(tmp_path: Path) -> None:
    """Storage cannot say whether the room exists (its table is renamed away by another
    connection): the join is refused TRY_LATER, which chat shows and retries with its
    backoff, connected again each time; once storage answers, chat is in the room."""
    db = tmp_path / "parley.db"
    async with run_server(tmp_path) as server:
        await trio.to_thread.run_sync(rename_table, db, "rooms", "rooms_away")
        out_path, err_path = tmp_path / "alice.out", tmp_path / "alice.err"
        async with trio.open_nursery() as nursery:
            refused = b"* server refused (storage unavailable; retry)"
            alice = await _start_chat(nursery, server.url, "alice", out_path, err_path, refused)
            await trio.to_thread.run_sync(rename_table, db, "rooms_away", "rooms")
            await _until_written(err_path, b"alice in lobby")
            assert alice.stdin is not None
            await alice.stdin.aclose()  # Ctrl-D
            with trio.fail_after(30):
                assert await alice.wait() == 0


async def _bob_says(server: ServerProcess, text: str) -> None:
    async with open_client(server.url, server.token("bob")) as bob:
        await bob.join("lobby")
        await bob.send("lobby", text)


async def _alice_saw_bob_say_before(
    nursery: trio.Nursery, server: ServerProcess
) -> tuple[trio.Process, Path, Path]:
    """alice's chat in lobby, and its two output files, once it showed bob's "before"."""
    out_path, err_path = server.tmp_path / "alice.out", server.tmp_path / "alice.err"
    alice = await _start_chat(nursery, server.url, "alice", out_path, err_path)
    await _bob_says(server, "before")
    await _until_written(out_path, b"[1] bob: before")
    return alice, out_path, err_path


async def test_chat_reconnects_and_resumes_without_repeating_a_line(tmp_path: Path) -> None:
    """The server restarts under a running chat: it says so, reconnects with backoff,
    resumes from the last seq it printed, and shows what came meanwhile exactly once."""
    async with server_process(tmp_path) as server:
        await server.start()
        async with trio.open_nursery() as nursery:
            alice, out_path, err_path = await _alice_saw_bob_say_before(nursery, server)
            assert await server.signal(signal.SIGTERM) == 0
            await _until_written(err_path, b"* disconnected")
            await server.start()
            await _bob_says(server, "after")
            await _until_written(out_path, b"[2] bob: after", 60)
            assert alice.stdin is not None
            await alice.stdin.aclose()  # Ctrl-D
            with trio.fail_after(30):
                assert await alice.wait() == 0
    shown = [line for line in out_path.read_bytes().splitlines() if line.startswith(b"[")]
    assert shown == [b"[1] bob: before", b"[2] bob: after"]  # each once, in order
    assert b"* reconnected" in err_path.read_bytes()


def test_migrate_a_postgres_database(postgres_url: str) -> None:
    result = run_cli("migrate", "--database-url", postgres_url)
    assert result.returncode == 0, result.stderr
    assert "schema is up to date" in result.stdout
    again = run_cli("migrate", "--database-url", postgres_url)  # nothing left to apply
    assert again.returncode == 0, again.stderr


def test_the_frame_timeout_is_an_option() -> None:
    args = build_parser({"PARLEY_FRAME_TIMEOUT": "12.5"}).parse_args(["serve"])
    assert config_from_args(args).settings().frame_timeout == 12.5
    assert run_cli("serve", env={"PARLEY_FRAME_TIMEOUT": "0"}).returncode == 2


def test_the_connection_limits_are_options() -> None:
    env = {"PARLEY_MAX_CONNECTIONS": "500", "PARLEY_MAX_CONNECTIONS_PER_ADDRESS": "0"}
    config = config_from_args(build_parser(env).parse_args(["serve"]))
    assert (config.max_connections, config.max_connections_per_address) == (500, 0)
    assert run_cli("serve", env={"PARLEY_MAX_CONNECTIONS": "0"}).returncode == 2
    assert run_cli("serve", env={"PARLEY_MAX_CONNECTIONS_PER_ADDRESS": "-1"}).returncode == 2


def test_a_burst_too_small_for_the_largest_frame_is_refused(tmp_path: Path) -> None:
    result = run_cli("serve", "--dev", "--burst", "10", cwd=tmp_path)
    assert result.returncode == 2
    assert "--burst 10 is below the 17 rate tokens" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_port_in_use_says_which_flag_moves_it_and_prints_no_secret(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--dev", "--host", "127.0.0.1", "--port", str(port), cwd=tmp_path)
    assert result.returncode == 1
    assert f"cannot listen for clients on 127.0.0.1:{port}" in result.stderr
    assert "--port N (or PARLEY_PORT)" in result.stderr and "Errno" not in result.stderr
    assert "admin token" not in result.stderr


def test_chat_that_could_not_send_what_was_typed_fails() -> None:
    """Input ended while no server answered: the lines were lost, and the exit status
    says so (a script piping into chat must not take it for success)."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again: nothing listens there
    result = subprocess.run(
        [
            *(sys.executable, "-m", "server.cli", "chat", "--user", "alice", "--room", "lobby"),
            *("--url", f"ws://127.0.0.1:{port}/ws", f"--secret={SECRET}"),
        ],
        input="lost?\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "1 line was not sent" in result.stderr


async def test_chat_says_when_the_room_history_changed_under_it(tmp_path: Path) -> None:
    """The server is killed (no clean stop): the rooms it had open get a new epoch, so a
    chat that resumes is told its position no longer holds. It says so, and shows what
    is said from then on."""
    async with server_process(tmp_path) as server:
        await server.start()
        async with trio.open_nursery() as nursery:
            alice, out_path, _ = await _alice_saw_bob_say_before(nursery, server)
            assert await server.signal(signal.SIGKILL) == -signal.SIGKILL
            await server.start()
            await _until_written(out_path, b"* history of lobby changed; showing from seq 1", 60)
            await _bob_says(server, "after")
            await _until_written(out_path, b"[2] bob: after")
            assert alice.stdin is not None
            await alice.stdin.aclose()  # Ctrl-D
            with trio.fail_after(30):
                assert await alice.wait() == 0
