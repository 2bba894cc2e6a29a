"""The SQLite store: connections bound to one file, writes, reads, imports and the feed."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl

from backends.sqlite import sql
from backends.sqlite.feed import read_changes
from backends.sqlite.schema import ensure_schema
from backends.sqlite.transaction import Transaction, busy_timeout
from optin_service.feed import UNSET, ChangePage
from optin_service.storage import (
    IDEMPOTENCY_TTL,
    EventRow,
    IdempotencyKeyReused,
    OptInRecord,
    OptInStore,
    StorageError,
    StorageUnavailable,
    batched,
)

_STAGE_BATCH = 5000  # rows per insert into the stage, at most
# Events per write transaction of the merge, by default: each holds the write lock,
# so API writes beside an import wait for one chunk at most.
IMPORT_BATCH = 10_000
_MERGE_PAUSE = 0.002  # seconds between merge transactions
_PRUNE_EVERY = 1000  # writes between deletions of expired idempotency keys
_NEWEST = (2**63 - 1, "")  # a position after every event: the first history page
_SYNCHRONOUS = ("FULL", "NORMAL", "EXTRA")
_MAX_TIMEOUT = (2**31 - 1) // 1000  # busy_timeout takes a C int of milliseconds
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class SQLiteStore(OptInStore):
    """Opt-in state in one SQLite file, safe across processes and threads.

    ``import_batch`` is how many events one write transaction of a bulk import
    merges (API writes beside an import wait for one such transaction at most).
    """

    driver_errors = (sqlite3.Error,)

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "FULL",
        timeout: float = 5.0,
        import_batch: int = IMPORT_BATCH,
    ) -> None:
        if path in ("", ":memory:") or path.startswith("file:"):
            raise ValueError(
                "sqlite:// needs a file path (sqlite:///relative.db or sqlite:////abs.db); "
                "use memory:// for a store that is not kept"
            )
        synchronous = synchronous.upper()
        if synchronous not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {_SYNCHRONOUS}, not {synchronous!r}")
        if not 0 <= timeout <= _MAX_TIMEOUT:  # also rejects NaN
            raise ValueError(f"timeout must be 0 to {_MAX_TIMEOUT} seconds, not {timeout!r}")
        self.path = os.path.abspath(path)
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            raise ValueError(
                f"sqlite: cannot use {self.path}: its folder {folder} does not exist "
                "(create it first; the store creates no folders)"
            )
        if import_batch < 1:
            raise ValueError(f"import_batch must be 1 or more, not {import_batch}")
        self.synchronous = synchronous
        self.timeout = timeout
        self.import_batch = import_batch
        #: A call waits at most ``timeout`` for the write lock (see :class:`Transaction`).
        self.max_wait = timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._pid = os.getpid()
        self._write_lock = threading.Lock()
        self._queue_fd: int | None = None
        self._writes = 0
        # The file this store is bound to: the one at its path now, else the one its
        # first connection creates. Kept across fork: a worker uses its master's file.
        self._identity = _identity(self.path)

    @classmethod
    def wrap_error(cls, exc: BaseException) -> StorageError:
        # OperationalError covers locks, I/O and a vanished file: worth retrying later.
        if isinstance(exc, sqlite3.OperationalError):
            return StorageUnavailable(f"sqlite: {exc}")
        return StorageError(f"sqlite: {exc}")

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteStore:
        # Split by hand: a "#" in a folder's name is part of the path, not a fragment.
        _scheme, slashes, rest = url.partition("://")
        if not slashes or not rest.startswith("/"):
            raise ValueError(
                f"sqlite URL {url!r} is not sqlite:///relative.db or sqlite:////abs.db"
                + (" (it has a host part)" if rest else "")
            )
        path, _, query = rest[1:].partition("?")
        found = dict(parse_qsl(query, keep_blank_values=True))
        unknown = set(found) - {"synchronous", "timeout"}
        if unknown:
            raise ValueError(f"unknown sqlite URL option(s): {', '.join(sorted(unknown))}")
        return cls(
            path,
            synchronous=found.get("synchronous", "FULL"),
            timeout=float(found.get("timeout", 5.0)),
            **options,
        )

    def _forget_parent(self) -> None:
        """In a forked child, drop what belongs to the parent: its connections, its
        write lock (possibly held at the fork) and its queue descriptor (an flock
        on a shared descriptor would be shared, not exclusive)."""
        if self._pid != os.getpid():
            self._local = threading.local()
            self._connections = []
            self._write_lock = threading.Lock()
            self._queue_fd = None
            self._pid = os.getpid()

    def _connection(self, deadline: float | None = None) -> sqlite3.Connection:
        """This thread's connection, once the path still names the store's file.
        Opening it waits until ``deadline`` at most (default: ``timeout`` from now)."""
        self._forget_parent()
        self._check_file()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open(time.monotonic() + self.timeout if deadline is None else deadline)
            self._local.conn, self._local.wal = conn, _identity(self.path + "-wal")
            with self._lock:
                self._connections.append(conn)
        return conn

    def _check_file(self) -> None:
        """Raise :class:`StorageUnavailable` unless the path names the file this store
        is bound to (no file yet is fine before the first connection creates it)."""
        if self._identity is not None and _identity(self.path) != self._identity:
            raise StorageUnavailable(
                f"sqlite: {self.path} is no longer the database file this store started "
                "with (deleted or replaced); nothing is written until it is back",
                reason="the database file was deleted or replaced while the service ran",
            )

    def _check_written(self) -> None:
        """After a COMMIT: the database file is still at its path, and so is the WAL
        the commit went to (the one at ``<path>-wal`` when the connection opened it;
        None: the connection keeps no WAL). While a connection is open SQLite never
        deletes or replaces its WAL (the last connection to close deletes it), so a
        change means someone removed it, and with it every commit since the last
        checkpoint: none is acknowledged."""
        self._check_file()
        bound = self._local.wal
        if bound is not None and _identity(self.path + "-wal") != bound:
            raise StorageUnavailable(
                f"sqlite: {self.path}-wal is no longer the write-ahead log this connection "
                "commits to (deleted or replaced): recent writes live only in the old "
                "one; nothing is acknowledged until the service restarts",
                reason="the database's -wal file was deleted or replaced while the service ran",
            )

    def _open(self, deadline: float) -> sqlite3.Connection:
        # Creates the file if there is none yet (never a folder: the folder must exist).
        conn = sqlite3.connect(
            self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        try:
            # Switching to WAL needs a moment of exclusive access, and SQLite does
            # not always apply the busy handler to it: retry while workers start,
            # all before the deadline.
            while True:
                busy_timeout(conn, deadline - time.monotonic())
                try:
                    conn.execute("PRAGMA journal_mode = WAL")
                    ensure_schema(conn)
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            busy_timeout(conn, self.timeout)
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            # A bulk import stages every row in TEMP tables: on disk (TMPDIR), not in
            # memory, whatever this SQLite build's default, so memory stays constant.
            conn.execute("PRAGMA temp_store = FILE")
        except sqlite3.Error:
            conn.close()
            raise
        try:
            with self._lock:
                if self._identity is None:  # the first connection: bind to its file
                    self._identity = _identity(self.path)
            if self._identity is None:
                raise StorageUnavailable(f"sqlite: {self.path} vanished as it was opened")
            self._check_file()  # the file just opened is the one the store is bound to
        except StorageUnavailable:
            conn.close()
            raise
        return conn

    def get(self, correlation_id: str) -> OptInRecord | None:
        row = self._connection().execute(sql.SELECT, (correlation_id,)).fetchone()
        return None if row is None else OptInRecord.from_row(row)

    def set(self, record: OptInRecord, *, idempotency_key: str | None = None) -> OptInRecord:
        cid = record.correlation_id
        with self._transaction() as conn:
            if idempotency_key is not None:
                now_us = _now_us()
                since = now_us - IDEMPOTENCY_TTL // timedelta(microseconds=1)
                seen = conn.execute(sql.KEY_SELECT, (cid, idempotency_key, since)).fetchone()
                if seen is not None:
                    if seen[0] != record.fingerprint:
                        raise IdempotencyKeyReused(idempotency_key)
                    return OptInRecord.from_row(conn.execute(sql.SELECT, (cid,)).fetchone())
                conn.execute(sql.KEY_PUT, (cid, idempotency_key, record.fingerprint, now_us))
                self._writes += 1
                if self._writes % _PRUNE_EVERY == 0:
                    conn.execute(sql.KEY_PRUNE, (since,))
            row = record.row
            if conn.execute(sql.INSERT_EVENT, row).rowcount:
                if conn.execute(sql.APPLY_CURRENT, row[:3]).rowcount:
                    # The state was just copied from this very event: it is ``record``.
                    return record
            return OptInRecord.from_row(conn.execute(sql.SELECT, (cid,)).fetchone())

    def history(
        self, correlation_id: str, limit: int, before: tuple[int, str] | None = None
    ) -> list[OptInRecord]:
        us, rid = before or _NEWEST
        rows = self._connection().execute(sql.HISTORY, (correlation_id, us, rid, limit))
        return [OptInRecord.from_row(row) for row in rows]

    def import_rows(self, rows: Iterable[EventRow]) -> int:
        """Stage every row in a TEMP table (no lock on the file), keep the first of each
        identity keyed in import order, then merge in that order, :attr:`import_batch`
        events per write transaction: each member's events oldest first, each one
        that moves the state appending its change. Rows arriving in random order (a
        Redis SCAN) would otherwise dirty a page of the file per event in every
        transaction; in key order a transaction appends to a few pages. Memory stays
        constant: SQLite's temp files hold the stage."""
        conn = self._connection()
        try:
            for drop in sql.DROP_TEMP:
                conn.execute(drop)
            for create in (sql.STAGE, sql.UNIQUE, sql.CHUNK):
                conn.execute(create)
            for batch in batched(rows, min(_STAGE_BATCH, self.import_batch)):
                conn.execute("BEGIN")  # touches the temp database only: no lock on the file
                conn.executemany(sql.STAGE_INSERT, batch)
                conn.execute("COMMIT")
            conn.execute(sql.UNIQUE_FILL)
            added = 0
            after: tuple[str, int, int, str] | None = sql.CHUNK_START
            while after is not None:
                with self._transaction() as conn:
                    conn.execute("DELETE FROM temp.optin_chunk")
                    filled = conn.execute(sql.CHUNK_FILL, (*after, self.import_batch)).rowcount
                    after = conn.execute(sql.CHUNK_LAST).fetchone()
                    if after is not None:
                        new = conn.execute(sql.CHUNK_EVENTS).rowcount
                        conn.execute(
                            sql.CHUNK_CURRENT if new == filled else sql.CHUNK_CURRENT_STORED
                        )
                        added += new
                # Writers waiting for the lock poll it (every millisecond at most): a
                # pause lets them in between chunks, else they wait out the whole merge.
                time.sleep(_MERGE_PAUSE)
            return added
        finally:
            # Whatever stopped it (a driver error, a row SQLite cannot take, an
            # interrupt), no transaction stays open on this thread's connection.
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            with contextlib.suppress(sqlite3.Error):
                for drop in sql.DROP_TEMP:
                    conn.execute(drop)

    def rows(self, since: datetime | None = None) -> Iterator[EventRow]:
        query = f"SELECT {sql.COLUMNS} FROM optin_event"
        params: tuple[int, ...] = ()
        if since is not None:
            query += " WHERE updated_us >= ?"
            params = (_to_us(since),)
        cursor = self._connection().execute(query, params)
        while batch := cursor.fetchmany(1000):
            yield from batch

    def count_events(self) -> int:
        return self._connection().execute(sql.COUNT_EVENTS).fetchone()[0]

    # --- the change feed ------------------------------------------------------------

    def changes(self, after: str | None, limit: int) -> ChangePage:
        return read_changes(self._connection(), after, limit)

    def prune_changes(self, before: datetime) -> int:
        """From the feed's start, :attr:`import_batch` changes per write transaction at
        most (writers wait for one batch, not a whole backlog), up to the first change
        appended at or after ``before``."""
        params = {"before": _to_us(before), "batch": self.import_batch}
        removed = 0
        while True:
            with self._transaction() as conn:
                cut, count = conn.execute(sql.PRUNE_CUT, params).fetchone()
                if count:
                    conn.execute(sql.PRUNE, (cut,))
                    conn.execute(sql.PRUNED_THROUGH, (cut,))
            removed += count
            if count < self.import_batch:
                return removed

    def rebuild_changes(self) -> int:
        """In one write transaction: readers see the old feed or the new one, and no
        write lands between them (writers wait; a big store makes them time out, so
        stop them first)."""
        with self._transaction() as conn:
            conn.execute(sql.REBUILD_CLEAR)
            conn.execute(sql.REBUILD_GENERATION)
            count = conn.execute(sql.REBUILD_CHANGES, (_now_us(),)).rowcount
            conn.execute(sql.REBUILD_VERSIONS)
        return count

    def load_state(self, key: str) -> str | None:
        row = self._connection().execute(sql.STATE_GET, (key,)).fetchone()
        return None if row is None else row[0]

    def save_state(self, key: str, value: str | None, *, expected: object = UNSET) -> bool:
        # Each case is one statement, in a write transaction: compare and set at once.
        with self._transaction() as conn:
            if expected is UNSET:
                if value is None:
                    conn.execute(sql.STATE_DELETE, (key,))
                else:
                    conn.execute(sql.STATE_PUT, (key, value))
                return True
            if expected is None:
                if value is None:
                    return bool(conn.execute(sql.STATE_ABSENT, (key,)).fetchone()[0])
                return conn.execute(sql.STATE_ADD, (key, value)).rowcount == 1
            if value is None:
                return conn.execute(sql.STATE_DELETE_IF, (key, expected)).rowcount == 1
            return conn.execute(sql.STATE_SWAP, (value, key, expected)).rowcount == 1

    def _transaction(self) -> Transaction:
        """One write transaction, holding the write lock from its start; all or nothing."""
        self._forget_parent()
        return Transaction(self)

    def _queue(self) -> int | None:
        """This process's descriptor of ``<file>-lock``, where writers queue (None if it
        cannot be opened: writers then only wait through ``busy_timeout``)."""
        fd = self._queue_fd
        if fd is None:
            try:
                fd = os.open(self.path + "-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError:
                return None
            with self._lock:
                if self._queue_fd is None:
                    self._queue_fd = fd
                else:
                    os.close(fd)
                    fd = self._queue_fd
        return fd

    def check(self) -> None:
        """Write and commit one row, as a PUT would: through the same lock, deadline and
        file check. This fails where reading alone would pass: a database that can only
        be read, a write lock held past the timeout, a file deleted under an open
        connection, a full disk."""
        with self._transaction() as conn:
            conn.execute(sql.HEALTH_TABLE)
            conn.execute(sql.HEALTH_WRITE, (_now_us(),))

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
            self._local = threading.local()
            fd, self._queue_fd = self._queue_fd, None
        if fd is not None and self._pid == os.getpid():
            os.close(fd)
        for conn in connections:
            conn.close()


def _identity(path: str) -> tuple[int, int] | None:
    """Which file ``path`` names (device, inode), or None if there is none."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:  # its folder unreadable, say: cannot tell, so cannot use it
        raise StorageUnavailable(f"sqlite: {path}: {exc.strerror}") from exc
    return (found.st_dev, found.st_ino)


def _to_us(moment: datetime) -> int:
    """``moment`` (timezone-aware) as whole µs since the epoch."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _now_us() -> int:
    return time.time_ns() // 1000
