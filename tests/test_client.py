"""protocol/client.py: what the Python client does by itself (token refresh)."""

from pathlib import Path

import trio

from protocol.errors import CloseCode
from server.tokens import issue_token
from tests.helpers import SECRET, memory_node


async def test_the_client_refreshes_its_token_through_the_callback(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Tokens of a minute, for ten minutes: the session lives on, refreshed each time a
    little before the end, and the client holds the newest token."""
    issued: list[str] = []

    async def new_token() -> str:
        issued.append(issue_token(SECRET, "alice", 60))
        return issued[-1]

    async with (
        memory_node(tmp_path, ping_interval=1000.0) as mem,
        mem.client("alice", ttl=60, refresh=new_token) as alice,
    ):
        await trio.sleep(600)
        assert await alice.ping() >= 0
        assert alice.close_code is None
        assert 10 <= len(issued) <= 13  # one every 48 s (a fifth of 60 s before the end)
        assert alice.token == issued[-1]


async def test_without_a_callback_the_session_ends_with_its_token(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with (
        memory_node(tmp_path, ping_interval=1000.0) as mem,
        mem.client("alice", ttl=60) as alice,
    ):
        await trio.sleep(120)
        assert alice.close_code == CloseCode.TOKEN_EXPIRED


async def test_a_failing_callback_is_tried_again(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise OSError("token service unreachable")
        return issue_token(SECRET, "alice", 3600)

    async with (
        memory_node(tmp_path, ping_interval=1000.0) as mem,
        mem.client("alice", ttl=60, refresh=flaky) as alice,
    ):
        await trio.sleep(300)
        assert (calls, alice.close_code) == (3, None)
