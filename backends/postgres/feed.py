"""The PostgreSQL store's change feed and the webhook deliverer's state.

Triggers on ``optin`` (migration 0002) append a change in the statement that
moves a member's state, under a transaction-level advisory lock held to COMMIT:
a snapshot that holds a change holds every change of a smaller seq that will
ever be visible, so a reader that reads on after the last change it saw skips
nothing. Cursors are ``encode_cursor("<generation>.<seq>")``; a rebuild draws a
new generation, so every earlier cursor expires.
"""

from __future__ import annotations

import abc
import contextlib
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from optin_service.feed import (
    UNSET,
    Change,
    ChangePage,
    CursorExpired,
    CursorInvalid,
    decode_cursor,
    encode_cursor,
)
from optin_service.storage import OptInRecord, OptInStore, StorageError

from . import queries
from .pool import Connection

# A cursor's text: the feed's generation (16 hex digits), a dot, a seq (a bigint).
_CURSOR = re.compile(r"([0-9a-f]{16})\.(0|[1-9][0-9]{0,18})")
_MAX_SEQ = 2**63 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
#: Bulk work happens in the CLI, not under gunicorn: no statement timeout there,
#: and room to sort a batch in memory.
BULK_SETTINGS = ("SET LOCAL statement_timeout = 0", "SET LOCAL work_mem = '64MB'")


class PostgresFeed(OptInStore):
    """The feed methods of :class:`~backends.postgres.store.PostgresStore`, which gives
    the sessions and the options."""

    options: Any

    @abc.abstractmethod
    def _session(
        self, *, write: bool = False, watch: bool = True, check_schema: bool = True
    ) -> contextlib.AbstractContextManager[Connection]:
        """A pooled connection for one operation (see the store)."""

    def changes(self, after: str | None, limit: int) -> ChangePage:
        """One statement, so one snapshot: any change it holds has every change of a
        smaller seq that will ever be visible (the feed's lock, see the migration),
        so reading on after the last one skips nothing."""
        position = None if after is None else _position(after)
        params = {"after": None if position is None else position[1], "limit": limit}
        with self._session() as conn:
            rows = conn.execute(queries.CHANGES, params).fetchall()
        if not rows:
            raise StorageError("postgresql: the table optin_feed has lost its row")
        generation, pruned, last = rows[0][:3]
        if position is not None:
            if position[0] != generation:
                raise CursorExpired("the change feed was rebuilt since this cursor was given out")
            if position[1] > last:
                raise CursorInvalid("cursor is not one this service gave out")
            if position[1] < pruned:
                raise CursorExpired("the changes after this cursor are no longer kept")
        page = [
            Change(OptInRecord.from_row(row[4:10]), row[10], row[11], _cursor(generation, row[3]))
            for row in rows
            if row[3] is not None
        ]
        start = pruned if position is None else position[1]
        return ChangePage(page, page[-1].cursor if page else _cursor(generation, start))

    def prune_changes(self, before: datetime) -> int:
        """From the feed's start, ``import_batch`` changes per statement at most, up to
        the first change appended at or after ``before`` (by the server's clock)."""
        params = {"before": _to_us(before), "batch": self.options.import_batch}
        removed = 0
        while True:
            with self._session() as conn:
                cut, gone = conn.execute(queries.PRUNE, params).fetchone()
            removed += gone
            if cut < self.options.import_batch:
                return removed

    def rebuild_changes(self) -> int:
        """In one transaction, writers locked out (readers see the old feed until it
        commits): a write waits for it, up to ``statement_timeout_ms``, then answers
        503. Stop the writers first on a big store."""
        with self._session(write=True, watch=False) as conn, conn.transaction():
            for setting in BULK_SETTINGS:
                conn.execute(setting)
            conn.execute(queries.REBUILD_LOCK)
            conn.execute(queries.REBUILD_CLEAR)
            conn.execute(queries.REBUILD_GENERATION)
            count = conn.execute(queries.REBUILD_CHANGES).rowcount
            conn.execute(queries.REBUILD_VERSIONS)
        return count

    def load_state(self, key: str) -> str | None:
        with self._session() as conn:
            row = conn.execute(queries.STATE_GET, (key,)).fetchone()
        return None if row is None else row[0]

    def save_state(self, key: str, value: str | None, *, expected: object = UNSET) -> bool:
        with self._session(write=True) as conn:
            if expected is UNSET:
                if value is None:
                    conn.execute(queries.STATE_DELETE, (key,))
                else:
                    conn.execute(queries.STATE_PUT, (key, value))
                return True
            if expected is None:
                if value is None:
                    return conn.execute(queries.STATE_ABSENT, (key,)).fetchone()[0]
                return conn.execute(queries.STATE_ADD, (key, value)).fetchone() is not None
            if value is None:
                return conn.execute(queries.STATE_DELETE_IF, (key, expected)).fetchone() is not None
            return conn.execute(queries.STATE_SWAP, (value, key, expected)).fetchone() is not None


def _position(cursor: str) -> tuple[str, int]:
    """The (generation, seq) a cursor holds; :class:`CursorInvalid` if it holds none."""
    found = _CURSOR.fullmatch(decode_cursor(cursor))
    if found is None or int(found[2]) > _MAX_SEQ:
        raise CursorInvalid("cursor is not one this service gave out")
    return found[1], int(found[2])


def _cursor(generation: str, seq: int) -> str:
    return encode_cursor(f"{generation}.{seq}")


def _to_us(moment: datetime) -> int:
    """``moment`` (timezone-aware) as whole µs since the epoch."""
    return (moment - _EPOCH) // timedelta(microseconds=1)
