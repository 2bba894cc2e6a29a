"""The tables, their version, and upgrades.

``optin_schema_version`` holds one number: the migrations applied. Migration N is
``migrations/NNNN_*.sql``; :data:`VERSION` is the newest this release has. A store
creates the tables on first use in an empty database; a database at an older
version needs ``optin db upgrade`` (:func:`upgrade`), so that a release never
changes tables under older workers still running; a newer version than this
release knows is refused (503), since this code cannot know what it changed.
"""

from __future__ import annotations

import re
from importlib import resources

import psycopg

from optin_service.storage import StorageError, StorageUnavailable

_FILE = re.compile(r"(\d{4})_\w+\.sql")


def _migrations() -> dict[int, str]:
    """Version -> the SQL that brings the previous version to it."""
    found = {}
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        match = _FILE.fullmatch(entry.name)
        if match:
            found[int(match.group(1))] = entry.read_text(encoding="utf-8")
    if sorted(found) != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations are not numbered 1 to N: {sorted(found)}")
    return found


MIGRATIONS = _migrations()
VERSION = max(MIGRATIONS)

# Serialises creating and upgrading (several workers start at once): any fixed key.
_LOCK_KEY = 0x6F7074696E  # "optin"
_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS optin_schema_version (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    version integer NOT NULL
)
"""
_READ = "SELECT version FROM optin_schema_version"
_FIND = "SELECT to_regclass('optin_schema_version') IS NOT NULL"
_WRITE = (
    "INSERT INTO optin_schema_version (version) VALUES (%s) "
    "ON CONFLICT (id) DO UPDATE SET version = excluded.version"
)


def version(conn: psycopg.Connection) -> int:
    """The schema version of the database (0: no tables yet), without writing."""
    if not conn.execute(_FIND).fetchone()[0]:
        return 0
    row = conn.execute(_READ).fetchone()
    return 0 if row is None else row[0]


def ensure(conn: psycopg.Connection) -> None:
    """On a worker's first connection: create the tables in an empty database, or
    refuse (503, naming both versions) a schema this release does not match."""
    found = version(conn)
    if found == 0:
        found = upgrade(conn)[1]
    if found > VERSION:
        raise StorageUnavailable(_newer(found))
    if found < VERSION:
        raise StorageUnavailable(
            f"postgresql: the database's schema is version {found}, this release needs "
            f"{VERSION}: run `optin db upgrade`"
        )


def upgrade(conn: psycopg.Connection) -> tuple[int, int]:
    """Apply every migration the database lacks, in one transaction; (before, after).

    Under an advisory lock, so concurrent upgrades (workers creating the tables
    at once) apply each migration once. A database newer than this release is
    left as it is (:class:`StorageError`).
    """
    with conn.transaction():
        conn.execute("SET LOCAL statement_timeout = 0")  # a migration may take long
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(_VERSION_TABLE)
        row = conn.execute(_READ + " FOR UPDATE").fetchone()
        before = 0 if row is None else row[0]
        if before > VERSION:
            raise StorageError(_newer(before))
        for number in range(before + 1, VERSION + 1):
            conn.execute(MIGRATIONS[number])
        if before != VERSION:
            conn.execute(_WRITE, (VERSION,))
    return before, VERSION


def _newer(found: int) -> str:
    return (
        f"postgresql: the database's schema is version {found}, newer than this "
        f"release knows ({VERSION}): run the release that upgraded it"
    )
