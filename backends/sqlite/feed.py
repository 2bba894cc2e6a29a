"""Reading the SQLite store's change feed: pages after a cursor, from one snapshot."""

from __future__ import annotations

import re
import sqlite3

from backends.sqlite import sql
from optin_service.feed import (
    Change,
    ChangePage,
    CursorExpired,
    CursorInvalid,
    decode_cursor,
    encode_cursor,
)
from optin_service.storage import OptInRecord

# A cursor's text: the feed's generation (16 hex digits), a dot, a seq.
_CURSOR = re.compile(r"([0-9a-f]{16})\.(0|[1-9][0-9]{0,18})")


def read_changes(conn: sqlite3.Connection, after: str | None, limit: int) -> ChangePage:
    """Up to ``limit`` changes after ``after`` (``None``: after the changes pruned).

    One read transaction: the feed's bounds and its rows come from one WAL snapshot,
    which holds every change committed before it and none after. Writers commit one
    at a time and each takes the next seq, so a snapshot's changes are the feed's
    first ones, with no hole a later commit could fill: a reader tailing the feed
    never skips a change.
    """
    conn.execute("BEGIN")
    try:
        generation, pruned, last = conn.execute(sql.FEED).fetchone()
        seq = pruned if after is None else _position(after, generation, pruned, last)
        rows = conn.execute(sql.CHANGES, (seq, limit)).fetchall()
    finally:
        conn.execute("COMMIT")  # ends the read; nothing was written
    page = [
        Change(OptInRecord.from_row(row[1:7]), row[7], row[8], _cursor(generation, row[0]))
        for row in rows
    ]
    return ChangePage(page, page[-1].cursor if page else _cursor(generation, seq))


def _cursor(generation: str, seq: int) -> str:
    return encode_cursor(f"{generation}.{seq}")


def _position(cursor: str, generation: str, pruned: int, last: int) -> int:
    """The seq a cursor holds, checked against the feed's generation, the greatest seq
    pruned and the greatest given out (see ``OptInStore.changes`` for the errors)."""
    found = _CURSOR.fullmatch(decode_cursor(cursor))
    if found is None:
        raise CursorInvalid("cursor is not one this service gave out")
    seq = int(found[2])
    if found[1] != generation:
        raise CursorExpired("the change feed was rebuilt since this cursor was given out")
    if seq > last:
        raise CursorInvalid("cursor is not one this service gave out")
    if seq < pruned:
        raise CursorExpired("the changes after this cursor are no longer kept")
    return seq
