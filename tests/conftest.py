from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.helpers import RunningServer, run_server
from tests.postgres import PrivatePostgres, private_postgres


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
