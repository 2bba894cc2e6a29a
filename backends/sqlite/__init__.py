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
- The change feed is a table in the same file (:mod:`backends.sqlite.schema`):
  triggers on the state table append a change whenever a statement moves a
  member's state, inside that statement, so a change commits with its event or
  not at all. Its ``seq`` (``AUTOINCREMENT``, never given out twice) is assigned
  inside the write transaction, and writers are serialised, so seq order is
  commit order; a reader reads one WAL snapshot, a prefix of that order, so a
  reader tailing the feed never skips a change a slower writer commits later.
  A file of the previous release gets the feed's tables when it is first opened;
  its feed is empty until ``optin changes rebuild``.

Query options: ``synchronous`` (FULL, NORMAL), ``timeout`` (seconds a call may
wait for the write lock, in all, default 5).
"""

from __future__ import annotations

from backends.sqlite.store import IMPORT_BATCH, SQLiteStore

__all__ = ["IMPORT_BATCH", "SQLiteStore"]
