"""``sqlite:///relative.db`` or ``sqlite:////absolute.db``: one durable file.

Correct under several gunicorn workers on one file:

- WAL, so readers never block the writer; ``busy_timeout`` so a writer waits for
  another instead of failing with "database is locked".
- Every write is one ``BEGIN IMMEDIATE`` transaction: the event, the current
  state and the idempotency key change together or not at all. A deferred
  transaction would take a shared lock first and, on upgrading, get SQLITE_BUSY
  *without* waiting; IMMEDIATE takes the write lock up front, waiting for it.
- ``synchronous=FULL`` by default: consent is evidence, so an acknowledged
  write survives power loss. ``?synchronous=NORMAL`` trades that for speed
  (survives a crash of the process, not of the machine).
- One connection per thread, opened on first use in the process that uses it,
  so connections never cross a ``fork``.
- Bound to one file: the store remembers which file (device and inode) it found
  at its path, and every call checks, with one ``stat``, that the path still
  names it. Once the file is deleted or replaced (its folder removed, a restore
  gone wrong), every call raises :class:`StorageUnavailable` instead of writing
  into the unlinked file or a new empty one, until the file is back. A write
  checks again after its COMMIT, so a write whose file vanished meanwhile is
  never acknowledged (the client retries it with its ``Idempotency-Key``).
- Creates no folders: the path's folder must exist when the store is built.

Query options: ``synchronous`` (FULL, NORMAL), ``timeout`` (seconds a call may
wait for the write lock, in all, default 5).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl

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

_SCHEMA = """
CREATE TABLE IF NOT EXISTS optin (
    correlation_id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('accepted', 'declined')),
    updated_us INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    source TEXT NOT NULL,
    client TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS optin_event (
    correlation_id TEXT NOT NULL,
    updated_us INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('accepted', 'declined')),
    source TEXT NOT NULL,
    client TEXT NOT NULL,
    PRIMARY KEY (correlation_id, updated_us, request_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS optin_idempotency (
    correlation_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    PRIMARY KEY (correlation_id, idempotency_key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS optin_idempotency_created ON optin_idempotency (created_us);
"""
_COLUMNS = "correlation_id, updated_us, request_id, status, source, client"
_INSERT_EVENT = f"INSERT OR IGNORE INTO optin_event ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
# The precedence rule (OptInRecord.precedence), the one place it is written in SQL:
# an upsert into the current state moves it only to an event that takes precedence:
# newer; as new and "declined" over "accepted"; then the greater request id.
_UPSERT_CURRENT = (
    "ON CONFLICT (correlation_id) DO UPDATE SET status = excluded.status, "
    "updated_us = excluded.updated_us, request_id = excluded.request_id, "
    "source = excluded.source, client = excluded.client "
    "WHERE (excluded.updated_us, excluded.status = 'declined', excluded.request_id) "
    "> (optin.updated_us, optin.status = 'declined', optin.request_id)"
)
# The state is copied from the stored event, so an import whose event was already
# stored (same identity, other fields) cannot put a state in place that no stored
# event holds. ("WHERE true" tells SQLite's parser the ON CONFLICT is the upsert's.)
_APPLY_CURRENT = (
    f"INSERT INTO optin ({_COLUMNS}) SELECT {_COLUMNS} FROM optin_event "
    "WHERE correlation_id = ? AND updated_us = ? AND request_id = ? "
    f"{_UPSERT_CURRENT}"
)
# Bulk import (import_rows): a stage, sorted by a covering index (the merge reads
# the index alone), merged in chunks copied out in key order; the chunk's rowid
# order is then key order, so inserting in rowid order needs no sort.
_TYPED_COLUMNS = (
    "correlation_id TEXT, updated_us INTEGER, request_id TEXT, status TEXT, source TEXT, "
    "client TEXT"
)
# seq (the rowid) keeps the stream's order among rows of one identity: the first wins.
_STAGE = f"CREATE TEMP TABLE optin_staged (seq INTEGER PRIMARY KEY, {_TYPED_COLUMNS})"
_CHUNK = f"CREATE TEMP TABLE optin_chunk ({_TYPED_COLUMNS})"
_STAGE_INSERT = f"INSERT INTO temp.optin_staged ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
_STAGE_INDEX = (
    "CREATE INDEX temp.optin_staged_key ON optin_staged "
    "(correlation_id, updated_us, request_id, seq, status, source, client)"
)
_STAGE_BATCH = 5000  # rows per insert into the stage, at most
# Events per write transaction of the merge, by default: each holds the write lock,
# so API writes beside an import wait for one chunk at most.
IMPORT_BATCH = 10_000
_MERGE_PAUSE = 0.002  # seconds between merge transactions
_CHUNK_FILL = (
    f"INSERT INTO temp.optin_chunk ({_COLUMNS}) SELECT {_COLUMNS} FROM temp.optin_staged "
    "WHERE (correlation_id, updated_us, request_id) > (?, ?, ?) "
    "ORDER BY correlation_id, updated_us, request_id, seq LIMIT ?"
)
_CHUNK_LAST = (
    "SELECT correlation_id, updated_us, request_id FROM temp.optin_chunk "
    "ORDER BY rowid DESC LIMIT 1"
)
_CHUNK_EVENTS = (
    f"INSERT OR IGNORE INTO optin_event ({_COLUMNS}) SELECT {_COLUMNS} FROM temp.optin_chunk "
    "ORDER BY rowid"
)
# Every event of the chunk in turn; the state moves only to one that takes
# precedence, so it ends on the greatest. Used when every row of the chunk was
# new, hence is exactly what is stored.
_CHUNK_CURRENT = (
    f"INSERT INTO optin ({_COLUMNS}) SELECT {_COLUMNS} FROM temp.optin_chunk "
    f"WHERE true ORDER BY rowid {_UPSERT_CURRENT}"
)
# Otherwise (some events were stored already, maybe with other fields), from the
# stored events, as _APPLY_CURRENT does.
_CHUNK_CURRENT_STORED = (
    f"INSERT INTO optin ({_COLUMNS}) SELECT {', '.join('e.' + c for c in _COLUMNS.split(', '))} "
    "FROM temp.optin_chunk c JOIN optin_event e USING (correlation_id, updated_us, request_id) "
    f"WHERE true ORDER BY c.rowid {_UPSERT_CURRENT}"
)
_SELECT = f"SELECT {_COLUMNS} FROM optin WHERE correlation_id = ?"
_HISTORY = (
    f"SELECT {_COLUMNS} FROM optin_event WHERE correlation_id = ? "
    "AND (updated_us, request_id) < (?, ?) "
    "ORDER BY updated_us DESC, request_id DESC LIMIT ?"
)
_KEY_SELECT = (
    "SELECT fingerprint FROM optin_idempotency "
    "WHERE correlation_id = ? AND idempotency_key = ? AND created_us > ?"
)
_KEY_PUT = (
    "INSERT OR REPLACE INTO optin_idempotency "
    "(correlation_id, idempotency_key, fingerprint, created_us) VALUES (?, ?, ?, ?)"
)
_KEY_PRUNE = "DELETE FROM optin_idempotency WHERE created_us <= ?"
_PRUNE_EVERY = 1000  # writes between deletions of expired idempotency keys
_NEWEST = (2**63 - 1, "")  # a position after every event: the first history page
_SYNCHRONOUS = ("FULL", "NORMAL", "EXTRA")
_MAX_TIMEOUT = (2**31 - 1) // 1000  # busy_timeout takes a C int of milliseconds
# check(): one row, rewritten by every readiness check; a table of its own, so the
# evidence tables are never touched, created by the first check (a read-only database
# the store only reads needs no new table).
_HEALTH_TABLE = (
    "CREATE TABLE IF NOT EXISTS optin_health (id INTEGER PRIMARY KEY, checked_us INTEGER)"
)
_HEALTH_WRITE = "INSERT OR REPLACE INTO optin_health (id, checked_us) VALUES (1, ?)"


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
        #: A call waits at most ``timeout`` for the write lock (see :class:`_Transaction`).
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
            self._local.conn = conn
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
                _busy_timeout(conn, deadline - time.monotonic())
                try:
                    conn.execute("PRAGMA journal_mode = WAL")
                    conn.executescript(_SCHEMA)
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            _busy_timeout(conn, self.timeout)
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
        row = self._connection().execute(_SELECT, (correlation_id,)).fetchone()
        return None if row is None else OptInRecord.from_row(row)

    def set(self, record: OptInRecord, *, idempotency_key: str | None = None) -> OptInRecord:
        cid = record.correlation_id
        with self._transaction() as conn:
            if idempotency_key is not None:
                now_us = _now_us()
                since = now_us - IDEMPOTENCY_TTL // timedelta(microseconds=1)
                seen = conn.execute(_KEY_SELECT, (cid, idempotency_key, since)).fetchone()
                if seen is not None:
                    if seen[0] != record.fingerprint:
                        raise IdempotencyKeyReused(idempotency_key)
                    return OptInRecord.from_row(conn.execute(_SELECT, (cid,)).fetchone())
                conn.execute(_KEY_PUT, (cid, idempotency_key, record.fingerprint, now_us))
                self._writes += 1
                if self._writes % _PRUNE_EVERY == 0:
                    conn.execute(_KEY_PRUNE, (since,))
            row = record.row
            if conn.execute(_INSERT_EVENT, row).rowcount:
                if conn.execute(_APPLY_CURRENT, row[:3]).rowcount:
                    # The state was just copied from this very event: it is ``record``.
                    return record
            return OptInRecord.from_row(conn.execute(_SELECT, (cid,)).fetchone())

    def history(
        self, correlation_id: str, limit: int, before: tuple[int, str] | None = None
    ) -> list[OptInRecord]:
        us, rid = before or _NEWEST
        rows = self._connection().execute(_HISTORY, (correlation_id, us, rid, limit))
        return [OptInRecord.from_row(row) for row in rows]

    def import_rows(self, rows: Iterable[EventRow]) -> int:
        """Stage every row in a TEMP table (no lock on the file), sort it with an
        index, then merge it in key order, :attr:`import_batch` events per write
        transaction. Rows arriving in random order (a Redis SCAN) would otherwise
        dirty a page of the file per event in every transaction; in key order a
        transaction appends to a few pages. Memory stays constant: SQLite's temp
        files hold the stage."""
        conn = self._connection()
        try:
            for table, create in (("optin_staged", _STAGE), ("optin_chunk", _CHUNK)):
                conn.execute(f"DROP TABLE IF EXISTS temp.{table}")
                conn.execute(create)
            for batch in batched(rows, min(_STAGE_BATCH, self.import_batch)):
                conn.execute("BEGIN")  # touches the temp database only: no lock on the file
                conn.executemany(_STAGE_INSERT, batch)
                conn.execute("COMMIT")
            conn.execute(_STAGE_INDEX)
            added = 0
            after: tuple[str, int, str] | None = ("", -(2**63), "")
            while after is not None:
                with self._transaction() as conn:
                    conn.execute("DELETE FROM temp.optin_chunk")
                    filled = conn.execute(_CHUNK_FILL, (*after, self.import_batch)).rowcount
                    after = conn.execute(_CHUNK_LAST).fetchone()
                    if after is not None:
                        new = conn.execute(_CHUNK_EVENTS).rowcount
                        conn.execute(_CHUNK_CURRENT if new == filled else _CHUNK_CURRENT_STORED)
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
                conn.execute("DROP TABLE IF EXISTS temp.optin_staged")
                conn.execute("DROP TABLE IF EXISTS temp.optin_chunk")

    def rows(self, since: datetime | None = None) -> Iterator[EventRow]:
        query = f"SELECT {_COLUMNS} FROM optin_event"
        params: tuple[int, ...] = ()
        if since is not None:
            query += " WHERE updated_us >= ?"
            params = (OptInRecord("-", "accepted", since).updated_at_us,)
        cursor = self._connection().execute(query, params)
        while batch := cursor.fetchmany(1000):
            yield from batch

    def count_events(self) -> int:
        return self._connection().execute("SELECT COUNT(*) FROM optin_event").fetchone()[0]

    def _transaction(self) -> _Transaction:
        """One write transaction, holding the write lock from its start; all or nothing."""
        self._forget_parent()
        return _Transaction(self)

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
            conn.execute(_HEALTH_TABLE)
            conn.execute(_HEALTH_WRITE, (_now_us(),))

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
            self._local = threading.local()
            fd, self._queue_fd = self._queue_fd, None
        if fd is not None and self._pid == os.getpid():
            os.close(fd)
        for conn in connections:
            conn.close()


class _Transaction:
    """``with store._transaction() as conn:`` BEGIN IMMEDIATE, then COMMIT, or ROLLBACK
    on any exception. A class, not ``@contextmanager``: no generator per write.

    All of its waiting shares one deadline, ``timeout`` from its start, so a call
    gives up within ``timeout`` (:attr:`SQLiteStore.max_wait`), whatever holds it up.

    Threads of one process take turns on a lock first: SQLite's busy handler
    sleeps and retries, which is unfair under load (a thread can lose every
    round until its timeout); a queue on a lock is not.

    Processes (gunicorn workers) then queue on an ``flock`` of ``<file>-lock``,
    polled every 50 µs doubling to 1 ms: SQLite's busy handler sleeps 1, 2, 5,
    10 ms... between tries, so a worker that finds the write lock taken sleeps
    at least a millisecond while the transaction it waits for (a WAL append and,
    with synchronous=FULL, one fsync) is usually over in a tenth of that. Then
    BEGIN IMMEDIATE waits through ``busy_timeout``, set to what is left before
    the deadline, for writers that do not queue (another program) or for the lock
    when the queue was not free in time.

    After COMMIT the store checks its file is still at its path: a commit into a
    file deleted meanwhile raises :class:`StorageUnavailable`, never returns.
    """

    __slots__ = ("_conn", "_lock", "_queued", "_store")

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store
        self._lock = store._write_lock

    def __enter__(self) -> sqlite3.Connection:
        store = self._store
        deadline = time.monotonic() + store.timeout
        if not self._lock.acquire(timeout=store.timeout):
            raise StorageUnavailable("sqlite: another thread held the write lock too long")
        self._queued = None
        try:
            conn = self._conn = store._connection(deadline)
            self._queued = _queue_up(store._queue(), deadline)
            _busy_timeout(conn, deadline - time.monotonic())
            conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._leave()
            raise
        return conn

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        try:
            self._finish(kind, exc)
        finally:
            self._leave()

    def _leave(self) -> None:
        try:
            if self._queued is not None:
                fcntl.flock(self._queued, fcntl.LOCK_UN)
        finally:
            self._lock.release()

    def _finish(self, kind: type[BaseException] | None, exc: BaseException | None) -> None:
        conn = self._conn
        try:
            if kind is None:
                try:
                    conn.execute("COMMIT")
                except sqlite3.Error:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
                self._store._check_file()
                return
            # The exception of the block propagates as it is, after the rollback.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        finally:
            # Reads on this connection wait the full timeout again.
            with contextlib.suppress(sqlite3.Error):
                _busy_timeout(conn, self._store.timeout)


def _queue_up(fd: int | None, deadline: float) -> int | None:
    """Take the ``flock`` on ``fd``, polling until ``deadline``; ``fd`` if taken, else None."""
    if fd is None:
        return None
    delay = 50e-6
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() + delay > deadline:
                return None
            time.sleep(delay)
            delay = min(delay * 2, 0.001)
        except OSError:
            return None


def _busy_timeout(conn: sqlite3.Connection, seconds: float) -> None:
    """Let SQLite wait up to ``seconds`` (0 if none are left) for a lock on ``conn``."""
    conn.execute(f"PRAGMA busy_timeout = {max(0, int(seconds * 1000))}")


def _identity(path: str) -> tuple[int, int] | None:
    """Which file ``path`` names (device, inode), or None if there is none."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:  # its folder unreadable, say: cannot tell, so cannot use it
        raise StorageUnavailable(f"sqlite: {path}: {exc.strerror}") from exc
    return (found.st_dev, found.st_ino)


def _now_us() -> int:
    return time.time_ns() // 1000
