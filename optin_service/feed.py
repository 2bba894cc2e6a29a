"""The change feed's types: what a store appends when an event becomes a member's state.

A :class:`Change` is appended atomically with the event that made it the
member's current state, and :meth:`~optin_service.storage.OptInStore.changes`
reads changes in commit order, a page at a time, after a cursor. Cursors are
opaque to callers; each store writes its own position into one with
:func:`encode_cursor` and reads it back with :func:`decode_cursor`, so every
backend's cursors look alike: URL-safe ASCII, never longer than
:data:`MAX_CURSOR`.

:func:`sorted_for_import` puts a stream of events in the order an import
applies them (each member's events oldest first), for stores that cannot sort
a whole import themselves.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator

# The feed's types are part of the store interface, so they live in storage (which
# imports nothing of this module); here is where callers find them.
from .storage import (
    UNSET,
    Change,
    ChangePage,
    CursorExpired,
    CursorInvalid,
    EventRow,
    batched,
)

__all__ = [
    "MAX_CURSOR",
    "UNSET",
    "Change",
    "ChangePage",
    "CursorExpired",
    "CursorInvalid",
    "decode_cursor",
    "encode_cursor",
    "import_order",
    "sorted_for_import",
]

#: The longest cursor a store gives out (a Cluster cursor holds one position per group).
MAX_CURSOR = 4096


def encode_cursor(position: str) -> str:
    """A cursor holding ``position`` (a store's own text)."""
    return base64.urlsafe_b64encode(position.encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> str:
    """The position a cursor from :func:`encode_cursor` holds; :class:`CursorInvalid` if none."""
    if len(cursor) > MAX_CURSOR or not cursor.isascii():
        raise CursorInvalid("cursor is not one this service gave out")
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise CursorInvalid("cursor is not one this service gave out") from None


def import_order(row: EventRow) -> tuple[str, int, bool, str]:
    """The order an import applies a stream's events in: by member, then
    :attr:`~optin_service.storage.OptInRecord.precedence` (oldest first)."""
    cid, us, rid, status, _source, _client = row
    return (cid, us, status == "declined", rid)


_SORT_SCHEMA = """
CREATE TABLE row (
    seq INTEGER PRIMARY KEY,
    correlation_id TEXT, updated_us INTEGER, request_id TEXT,
    status TEXT, source TEXT, client TEXT
);
"""
_SORT_INSERT = (
    "INSERT INTO row (correlation_id, updated_us, request_id, status, source, client) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
# The first row of each identity in the stream, in import order.
_SORT_SELECT = (
    "SELECT correlation_id, updated_us, request_id, status, source, client FROM row "
    "WHERE seq IN (SELECT min(seq) FROM row GROUP BY correlation_id, updated_us, request_id) "
    "ORDER BY correlation_id, updated_us, status = 'declined', request_id"
)


def sorted_for_import(rows: Iterable[EventRow], batch: int = 5000) -> Iterator[EventRow]:
    """``rows`` in :func:`import_order`, the first of each identity (member, µs,
    request id) only, in constant memory: an external sort through a temporary
    SQLite file (in ``TMPDIR``), removed when the iterator is done or closed."""
    folder = tempfile.mkdtemp(prefix="optin-import-")
    path = os.path.join(folder, "sort.db")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.executescript(_SORT_SCHEMA)
        for chunk in batched(rows, batch):
            conn.execute("BEGIN")
            conn.executemany(_SORT_INSERT, chunk)
            conn.execute("COMMIT")
        cursor = conn.execute(_SORT_SELECT)
        while fetched := cursor.fetchmany(batch):
            yield from fetched
    finally:
        conn.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
            os.rmdir(folder)
