"""Database URLs as operators type them: refused unless plain, never shown with a password."""

from pathlib import Path

import pytest

from storage.sqlite import sqlite_path
from storage.store import StorageConfigError, check_database_url, open_store, redact_url
from tests.helpers import run_cli
from tests.postgres import PrivatePostgres

PASSWORD = "hunter2-do-not-print"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://parley:pw@db:5432/parley", "postgresql://parley:***@db:5432/parley"),
        ("postgres://u:p%40ss@h/d?sslmode=require", "postgres://u:***@h/d?sslmode=require"),
        ("postgresql://u:pa/ss?x@h/d", "postgresql://u:***@h/d"),
        (
            "postgresql://u@h/d?password=pw&sslmode=off",
            "postgresql://u@h/d?password=***&sslmode=off",
        ),
        ("postgresql://h/d?sslmode=off&password=pw", "postgresql://h/d?sslmode=off&password=***"),
        ("postgresql://parley@/db?host=/tmp/pg", "postgresql://parley@/db?host=/tmp/pg"),
        ("sqlite:////var/lib/parley/parley.db", "sqlite:////var/lib/parley/parley.db"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url_hides_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://",
        "postgres://",
        f"postgresql://parley:{PASSWORD}@db:5432",
        f"postgresql://parley:{PASSWORD}@db:5432/",
        "postgresql://parley@/?host=/tmp/pg",
    ],
)
async def test_a_postgres_url_must_name_its_database(url: str) -> None:
    with pytest.raises(StorageConfigError, match="names no database") as caught:
        async with open_store(url):
            pass
    assert PASSWORD not in str(caught.value)


def test_a_postgres_database_may_be_named_in_the_query() -> None:
    check_database_url("postgresql://parley@/?host=/tmp/pg&dbname=parley")


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:/x.db",
        "sqlite:x.db",
        "sqlite://host/x.db",
        "sqlite://[x/y.db",
        "sqlite:///x.db?mode=ro",
        "sqlite:///x.db#1",
        "sqlite:",
    ],
)
async def test_a_sqlite_url_must_say_what_it_means(url: str, tmp_path: Path) -> None:
    with pytest.raises(StorageConfigError) as caught:
        sqlite_path(url)
    assert "sqlite:///relative.db" in str(caught.value)
    assert "sqlite:////absolute.db" in str(caught.value)
    with pytest.raises(StorageConfigError, match="bad SQLite URL"):
        async with open_store(url):
            pass


def test_migrate_refuses_an_ambiguous_sqlite_url(tmp_path: Path) -> None:
    result = run_cli("migrate", "--database-url", "sqlite:/x.db", cwd=tmp_path)
    assert result.returncode == 2
    assert "sqlite:////absolute.db" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no x.db made anywhere it was not meant


def test_migrate_refuses_a_postgres_url_without_a_database(postgres: PrivatePostgres) -> None:
    # PGDATABASE names a database that exists: before, migrate created Parley's tables there.
    url = f"postgresql://parley:{PASSWORD}@/?host={postgres.dir}"
    result = run_cli("migrate", "--database-url", url, env={"PGDATABASE": "postgres"})
    assert result.returncode == 2, result.stdout
    assert "names no database" in result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    made = "SELECT count(*) FROM pg_tables WHERE tablename = 'schema_migrations'"
    assert postgres.psql(made) == "0"


def test_migrate_never_prints_the_password(postgres_url: str) -> None:
    # The private server trusts local connections: the password is accepted and unused.
    url = postgres_url.replace("postgresql://parley@", f"postgresql://parley:{PASSWORD}@")
    result = run_cli("migrate", "--database-url", url)
    assert result.returncode == 0, result.stderr
    assert "postgresql://parley:***@" in result.stdout
    assert PASSWORD not in result.stdout + result.stderr
    in_query = f"{postgres_url}&password={PASSWORD}"
    result = run_cli("migrate", "--database-url", in_query)
    assert result.returncode == 0, result.stderr
    assert "password=***" in result.stdout and PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "url",
    [
        f"postgresq://parley:{PASSWORD}@db/parley",  # a typo in the scheme
        f"postgresql://parley:{PASSWORD}@/no_such_database?host=/nonexistent",
    ],
)
def test_a_refused_url_is_shown_without_its_password(url: str) -> None:
    result = run_cli("migrate", "--database-url", url, "--statement-timeout", "2")
    assert result.returncode == 2
    assert "***" in result.stderr and PASSWORD not in result.stdout + result.stderr
