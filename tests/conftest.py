from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from storage.store import Store, open_store
from tests.helpers import RunningServer, run_server
from tests.postgres import PrivatePostgres, private_postgres
from tests.redis_server import PrivateRedis, RedisServerMissing, private_redis


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    """A node on free ports with a fresh SQLite database."""
    async with run_server(tmp_path) as running:
        yield running


@pytest.fixture(scope="session")
def postgres() -> Iterator[PrivatePostgres]:
    """One private PostgreSQL server for the whole run (each test takes a database)."""
    with private_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres: PrivatePostgres) -> str:
    """A fresh database on the private server."""
    return postgres.new_database()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database of each backend, for tests of the store contract."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    async with open_store(store_url) as opened:
        yield opened


@contextmanager
def _redis_or_fail() -> Iterator[PrivateRedis]:
    try:
        with private_redis() as server:
            yield server
    except RedisServerMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[PrivateRedis]:
    """One private redis-server for the whole run, shared by the tests (see redis_url)."""
    with _redis_or_fail() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: PrivateRedis) -> str:
    """An empty Redis: the shared private server is flushed (every database, and its
    scripts) before each test. Database 1, so that every test goes through SELECT.
    Pub/sub channels belong to no database: tests use their own channel names."""
    redis_server.command("FLUSHALL")
    redis_server.command("SCRIPT", "FLUSH")
    return redis_server.url + "/1"


@pytest.fixture
def own_redis() -> Iterator[PrivateRedis]:
    """A private redis-server for this test alone, for tests that stop, pause or
    reconfigure it."""
    with _redis_or_fail() as server:
        yield server
