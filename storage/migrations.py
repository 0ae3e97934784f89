"""Plain-SQL migrations: ``storage/migrations/<backend>/NNNN_name.sql``, applied in order.

Each file runs once, in its own transaction, and is recorded in ``schema_migrations``.
"""

import re
from importlib import resources

import attrs

_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


@attrs.frozen
class Migration:
    version: int
    name: str
    sql: str


def migrations_for(backend: str) -> list[Migration]:
    """The migration files of ``backend``, in version order."""
    folder = resources.files("storage") / "migrations" / backend
    found = []
    for entry in folder.iterdir():
        match = _NAME.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two {backend} migrations share a version: {versions}")
    return found
