"""The SQLite store's write transaction: one writer at a time, fairly, within a deadline."""

from __future__ import annotations

import contextlib
import fcntl
import sqlite3
import threading
import time
from typing import Protocol

from optin_service.storage import StorageUnavailable


class _Store(Protocol):
    """What a transaction uses of its store (``SQLiteStore``)."""

    timeout: float
    _write_lock: threading.Lock

    def _connection(self, deadline: float | None = None) -> sqlite3.Connection: ...
    def _queue(self) -> int | None: ...
    def _check_written(self) -> None: ...


class Transaction:
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

    After COMMIT the store checks its file and its WAL are still at their paths: a
    commit into a file deleted meanwhile raises :class:`StorageUnavailable`, never
    returns.
    """

    __slots__ = ("_conn", "_lock", "_queued", "_store")

    def __init__(self, store: _Store) -> None:
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
            self._queued = queue_up(store._queue(), deadline)
            busy_timeout(conn, deadline - time.monotonic())
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
                self._store._check_written()
                return
            # The exception of the block propagates as it is, after the rollback.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        finally:
            # Reads on this connection wait the full timeout again.
            with contextlib.suppress(sqlite3.Error):
                busy_timeout(conn, self._store.timeout)


def queue_up(fd: int | None, deadline: float) -> int | None:
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


def busy_timeout(conn: sqlite3.Connection, seconds: float) -> None:
    """Let SQLite wait up to ``seconds`` (0 if none are left) for a lock on ``conn``."""
    conn.execute(f"PRAGMA busy_timeout = {max(0, int(seconds * 1000))}")
