"""``sqlite:///relative.db`` or ``sqlite:////absolute.db``: one durable file.

Correct under several gunicorn workers on one file:

- WAL, so readers never block the writer; ``busy_timeout`` so a writer waits for
  another instead of failing with "database is locked".
- Every write is one upsert statement in autocommit mode. A read-then-write
  transaction would take a shared lock first and, on upgrading, get SQLITE_BUSY
  *without* waiting; a single statement takes the write lock up front.
- ``synchronous=FULL`` by default: consent is evidence, so an acknowledged
  write survives power loss. ``?synchronous=NORMAL`` trades that for speed
  (survives a crash of the process, not of the machine).
- One connection per thread, opened on first use in the process that uses it,
  so connections never cross a ``fork``.

Query options: ``synchronous`` (FULL, NORMAL), ``timeout`` (seconds to wait for
a lock, default 5).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from urllib.parse import parse_qsl, urlsplit

from optin_service.storage import (
    OptInRecord,
    OptInStore,
    StorageError,
    StorageUnavailable,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS optin (
    correlation_id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('accepted', 'declined')),
    updated_us INTEGER NOT NULL
) WITHOUT ROWID
"""
_UPSERT = (
    "INSERT INTO optin (correlation_id, status, updated_us) VALUES (?, ?, ?) "
    "ON CONFLICT (correlation_id) DO UPDATE "
    "SET status = excluded.status, updated_us = excluded.updated_us"
)
_SELECT = "SELECT status, updated_us FROM optin WHERE correlation_id = ?"
_SYNCHRONOUS = ("FULL", "NORMAL", "EXTRA")
_MAX_TIMEOUT = (2**31 - 1) // 1000  # busy_timeout takes a C int of milliseconds


class SQLiteStore(OptInStore):
    """Opt-in state in one SQLite file, safe across processes and threads."""

    def __init__(self, path: str, *, synchronous: str = "FULL", timeout: float = 5.0) -> None:
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
        self.synchronous = synchronous
        self.timeout = timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._pid = os.getpid()

    @classmethod
    def from_url(cls, url: str) -> SQLiteStore:
        parts = urlsplit(url)
        if parts.netloc:
            raise ValueError(
                f"sqlite URL {url!r} has a host part; use sqlite:///relative.db or sqlite:////abs.db"
            )
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = set(options) - {"synchronous", "timeout"}
        if unknown:
            raise ValueError(f"unknown sqlite URL option(s): {', '.join(sorted(unknown))}")
        return cls(
            parts.path[1:],
            synchronous=options.get("synchronous", "FULL"),
            timeout=float(options.get("timeout", 5.0)),
        )

    def _connection(self) -> sqlite3.Connection:
        if self._pid != os.getpid():  # forked: the parent's connections are not ours
            self._local = threading.local()
            self._connections = []
            self._pid = os.getpid()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _open(self) -> sqlite3.Connection:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            # Switching to WAL needs a moment of exclusive access, and SQLite does
            # not always apply the busy handler to it: retry while workers start.
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    conn.execute("PRAGMA journal_mode = WAL")
                    conn.execute(_SCHEMA)
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        except sqlite3.Error as exc:
            conn.close()
            raise _wrap(exc) from exc
        return conn

    def get(self, correlation_id: str) -> OptInRecord | None:
        try:
            row = self._connection().execute(_SELECT, (correlation_id,)).fetchone()
        except sqlite3.Error as exc:
            raise _wrap(exc) from exc
        return None if row is None else OptInRecord.from_us(correlation_id, row[0], row[1])

    def set(self, record: OptInRecord) -> OptInRecord:
        params = (record.correlation_id, record.status, record.updated_at_us)
        try:
            self._connection().execute(_UPSERT, params)
        except sqlite3.Error as exc:
            raise _wrap(exc) from exc
        return record

    def check(self) -> None:
        try:
            self._connection().execute("SELECT 1 FROM optin LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"sqlite {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
            self._local = threading.local()
        for conn in connections:
            conn.close()


def _wrap(exc: sqlite3.Error) -> StorageError:
    # OperationalError covers locks, I/O and a vanished file: worth retrying later.
    if isinstance(exc, sqlite3.OperationalError):
        return StorageUnavailable(f"sqlite: {exc}")
    return StorageError(f"sqlite: {exc}")
