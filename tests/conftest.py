from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import RunningServer, run_server


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    """A node on free ports with a fresh SQLite database."""
    async with run_server(tmp_path) as running:
        yield running
