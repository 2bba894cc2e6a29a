"""The PostgreSQL store: one member's write is one statement, bulk paths use COPY."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timedelta

import psycopg
from psycopg.pq import ConnStatus, TransactionStatus

from optin_service.storage import (
    IDEMPOTENCY_TTL,
    EventRow,
    IdempotencyKeyReused,
    OptInRecord,
    StorageError,
    StorageUnavailable,
)

from . import queries, schema
from .errors import wrap
from .feed import BULK_SETTINGS, PostgresFeed
from .pool import Connection, Pool
from .url import Options, connection_defaults, split
from .watchdog import Watchdog

log = logging.getLogger(__name__)

_TTL_US = IDEMPOTENCY_TTL // timedelta(microseconds=1)
_NEWEST = (2**63 - 1, "")  # a position after every event: the first history page
_PRUNE_EVERY = 100  # writes (per process) between deletions of expired keys...
_PRUNE_LIMIT = 1000  # ...of at most this many
_EXPORT_FETCH = 10_000  # rows per FETCH of the export's server-side cursor
# Times one import chunk is merged again after a write moved one of its members
# between the merge's read of the state and its update.
_MERGE_ATTEMPTS = 5
#: Past a request's deadline, how long a cancelled operation has to end before
#: its connection is cut (the server is not answering at all).
_GRACE = 1.0
# One thread per process watches every store's requests.
_WATCHDOG = Watchdog(_GRACE)


class PostgresStore(PostgresFeed):
    """Opt-in state in PostgreSQL, safe across processes, threads and a fork.

    ``url`` is a libpq URL, with this backend's options (:class:`~.url.Options`)
    in its query or as keyword arguments (not both).
    """

    driver_errors = (psycopg.Error,)

    @classmethod
    def wrap_error(cls, exc: BaseException) -> StorageError:
        return wrap(exc)  # type: ignore[arg-type]

    def __init__(self, url: str, **options: int) -> None:
        libpq_url, in_url = split(url)
        both = set(in_url) & set(options)
        if both:
            raise ValueError(f"postgresql option(s) given twice: {', '.join(sorted(both))}")
        self.options = Options(**in_url, **options)
        opts = self.options
        self._pool = Pool(
            libpq_url,
            connection_defaults(libpq_url),
            min_size=opts.pool_min_size,
            max_size=opts.pool_max_size,
            timeout=opts.pool_timeout_ms / 1000,
            statement_timeout_ms=opts.statement_timeout_ms,
        )
        # The server's statement_timeout fires first while it answers; this bounds
        # what it does not (a COMMIT waiting for a synchronous standby, a hung server).
        self._deadline = opts.statement_timeout_ms / 1000 + 0.5
        # The longest a request can wait: for a connection, then to its deadline, then
        # for a cancel the server ignores (the watchdog looks every 0.1 s).
        self.max_wait = opts.pool_timeout_ms / 1000 + self._deadline + _GRACE + 0.2
        self._schema_pid: int | None = None  # the process that checked the schema
        self._writes = 0

    @classmethod
    def from_url(cls, url: str, **options: int) -> PostgresStore:
        return cls(url, **options)

    # --- connections ---------------------------------------------------------------

    @contextlib.contextmanager
    def _session(
        self, *, write: bool = False, watch: bool = True, check_schema: bool = True
    ) -> Iterator[Connection]:
        """A pooled connection for one operation (driver errors are wrapped by the
        public method, as :attr:`driver_errors` says).

        ``write``: a WARNING from the server during the operation (a COMMIT whose
        wait for a synchronous standby was cancelled: committed here, maybe not
        on the standby) makes it :class:`StorageUnavailable`. ``watch``: the
        operation gets the request deadline (bulk operations do not).
        ``check_schema``: the first operation in a process checks the schema version.
        """
        pool = self._pool.get()
        lost = False
        try:
            with pool.connection() as conn:
                try:
                    if check_schema and self._schema_pid != os.getpid():
                        self._check_schema(conn)
                    conn.warnings.clear()
                    entry = _WATCHDOG.arm(conn, self._deadline) if watch else None
                    try:
                        yield conn
                    finally:
                        if entry is not None:
                            _WATCHDOG.disarm(entry)
                finally:
                    lost = conn.info.status == ConnStatus.BAD
                if write and conn.warnings:
                    raise StorageUnavailable(
                        "postgresql: the write may not have reached a synchronous standby: "
                        + "; ".join(conn.warnings)
                    )
        finally:
            if lost:
                # The server went away (restarted, failed over, stopped answering): the
                # other pooled connections are to it too. Replace them all now, rather
                # than answer one 503 per stale connection as each comes up.
                pool.drain()

    def _check_schema(self, conn: Connection) -> None:
        # No lock: threads starting at once may each check (creating the tables is
        # serialised by an advisory lock), and a lock held across a fork would hang
        # the child.
        schema.ensure(conn)
        self._schema_pid = os.getpid()

    def upgrade(self) -> tuple[int, int]:
        """Bring the tables to this release's version (``optin db upgrade``):
        (version before, version after)."""
        try:  # not a method of the contract: wrapped here
            with self._session(watch=False, check_schema=False) as conn:
                versions = schema.upgrade(conn)
        except self.driver_errors as exc:
            raise self.wrap_error(exc) from exc
        self._schema_pid = None  # checked again by the next operation
        return versions

    def check(self) -> None:
        """A write to ``optin_health``: a standby, a read-only server or one that
        cannot reach its synchronous standby is not ready."""
        try:
            with self._session(write=True) as conn:
                conn.execute(queries.HEALTH, (_now_us(),))
        except self.driver_errors as exc:  # any failure, transient or not, is "not ready"
            error = self.wrap_error(exc)
            raise StorageUnavailable(str(error), reason=getattr(error, "reason", None)) from exc
        except StorageUnavailable:
            raise
        except StorageError as exc:
            raise StorageUnavailable(str(exc)) from exc

    def close(self) -> None:
        self._pool.close()
        self._schema_pid = None

    # --- one member ----------------------------------------------------------------

    def get(self, correlation_id: str) -> OptInRecord | None:
        with self._session() as conn:
            row = conn.execute(queries.GET, (correlation_id,)).fetchone()
        return None if row is None else OptInRecord.from_row(row)

    def set(self, record: OptInRecord, *, idempotency_key: str | None = None) -> OptInRecord:
        cid = record.correlation_id
        params = {
            "cid": cid,
            "us": record.updated_at_us,
            "rid": record.request_id,
            "status": record.status,
            "source": record.source,
            "client": record.client,
            "key": idempotency_key,
            "fingerprint": record.fingerprint,
            "now": _now_us(),
        }
        with self._session(write=True) as conn:
            fresh, applied = conn.execute(queries.WRITE, params).fetchone()
            if idempotency_key is not None and not fresh:
                applied = self._set_under_used_key(conn, record, params)
            if applied is True:  # the state was just copied from this very event
                current = record
            else:
                current = OptInRecord.from_row(conn.execute(queries.GET, (cid,)).fetchone())
            self._writes += 1
            if self._writes % _PRUNE_EVERY == 0:
                _prune(conn)
        return current

    def _set_under_used_key(
        self, conn: Connection, record: OptInRecord, params: dict[str, object]
    ) -> bool | None:
        """The key was used before: replay (None), refuse, or, once it expired, write
        under it as a new key (whether the state changed)."""
        cid, key, since = params["cid"], params["key"], params["now"] - _TTL_US  # type: ignore[operator]
        with conn.transaction():
            row = conn.execute(queries.KEY_LOCK, (cid, key)).fetchone()
            if row is not None and row[1] > since:
                if row[0] != record.fingerprint:
                    raise IdempotencyKeyReused(key)
                # A replay. The row lock makes this COMMIT wait for a synchronous
                # standby too: a retry after a 503 is answered 200 only once the
                # first write is replicated.
                return None
            claimed = conn.execute(queries.KEY_CLAIM, {**params, "since": since}).fetchone()
            if claimed is None:  # deleted as expired, then claimed by another request
                raise StorageUnavailable("postgresql: Idempotency-Key claimed concurrently")
            return conn.execute(queries.WRITE, {**params, "key": None}).fetchone()[1]

    def history(
        self, correlation_id: str, limit: int, before: tuple[int, str] | None = None
    ) -> list[OptInRecord]:
        us, rid = before or _NEWEST
        with self._session() as conn:
            rows = conn.execute(queries.HISTORY, (correlation_id, us, rid, limit)).fetchall()
        return [OptInRecord.from_row(row) for row in rows]

    # --- bulk ----------------------------------------------------------------------

    def rows(self, since: datetime | None = None) -> Iterator[EventRow]:
        """Every event, through a server-side cursor: constant memory, one snapshot."""
        query, params = queries.EXPORT, ()
        if since is not None:
            query, params = (
                queries.EXPORT_SINCE,
                (OptInRecord("-", "accepted", since).updated_at_us,),
            )
        with self._session(watch=False) as conn, conn.transaction():
            for setting in BULK_SETTINGS:
                conn.execute(setting)
            with conn.cursor(name="optin_export") as cursor:
                cursor.execute(query, params)
                while batch := cursor.fetchmany(_EXPORT_FETCH):
                    yield from batch

    def import_rows(self, rows: Iterable[EventRow]) -> int:
        """The whole stream into ``COPY`` (rows stream from ``rows``: nothing is held in
        memory), then numbered in import order, then merged ``import_batch`` events per
        transaction (:data:`~.queries.MERGE`), each appending its changes.

        Members are shared between ``import_connections`` sessions by a hash of their
        id (all of a member's events go to one), each holding its share in temporary
        tables: the sessions number and merge at the same time, so the server works
        on as many cores, and no two of them touch one member. A failure while
        staging keeps nothing; one in a merge keeps the chunks merged before it (each
        committed), and importing again completes the rest.
        """
        sessions = min(self.options.import_connections, self.options.pool_max_size)
        with contextlib.ExitStack() as stack:
            conns = [stack.enter_context(self._stage()) for _ in range(sessions)]
            _copy(conns, rows)
            stop = threading.Event()
            with ThreadPoolExecutor(len(conns)) as threads:
                shares = [threads.submit(self._merge_share, conn, stop) for conn in conns]
                try:
                    for done in as_completed(shares):
                        if done.exception() is not None:
                            break
                finally:  # a failure, or Ctrl-C: every session stops after its chunk
                    stop.set()
            return sum(share.result() for share in shares)  # raises the first failure

    @contextlib.contextmanager
    def _stage(self) -> Iterator[Connection]:
        """A session holding an import's share in temporary tables, dropped at the end."""
        with self._session(write=True, watch=False) as conn:
            try:
                conn.execute(queries.DROP_STAGE)  # left by a session that died mid-import
                conn.execute(queries.STAGE)
                conn.execute(queries.CHUNK_CHANGES)
                yield conn
            finally:
                # Whatever stopped it, no transaction stays open and no stage is left.
                if conn.info.transaction_status != TransactionStatus.IDLE:
                    with contextlib.suppress(psycopg.Error):
                        conn.rollback()
                with contextlib.suppress(psycopg.Error):
                    conn.execute(queries.DROP_STAGE)

    def _merge_share(self, conn: Connection, stop: threading.Event) -> int:
        """Number one session's staged share in import order, then merge it chunk by
        chunk (until ``stop``: another session failed): the new events."""
        with conn.transaction():
            for setting in BULK_SETTINGS:
                conn.execute(setting)
            conn.execute(queries.NUMBER)
            conn.execute(queries.NUMBER_KEY)
            conn.execute("ANALYZE optin_unique")  # temp tables have no autovacuum
            total = conn.execute(queries.NUMBERED).fetchone()[0]
        size, new = self.options.import_batch, 0
        for lo in range(0, total, size):
            if stop.is_set():
                break
            new += self._merge(conn, lo, lo + size)
        return new

    @staticmethod
    def _merge(conn: Connection, lo: int, hi: int) -> int:
        """Merge the staged events numbered ``lo`` < n <= ``hi`` in one transaction; the
        new events. A write that moved one of the chunk's members since the merge
        read its state rolls the chunk back, and it is merged again."""
        for _ in range(_MERGE_ATTEMPTS):
            merged = False
            conn.warnings.clear()
            with conn.transaction() as transaction:
                for setting in (*BULK_SETTINGS, queries.BULK_FEED):
                    conn.execute(setting)
                new, moved, written = conn.execute(queries.MERGE, {"lo": lo, "hi": hi}).fetchone()
                if written != moved:
                    raise psycopg.Rollback(transaction)  # leaves the block: try again
                conn.execute(queries.FEED_LOCK)  # held to the COMMIT: see the migration
                conn.execute(queries.APPEND_CHUNK)
                merged = True
            if not merged:
                continue
            if conn.warnings:  # this COMMIT's wait for a synchronous standby was cancelled
                raise StorageUnavailable(
                    "postgresql: an import's batch may not have reached a synchronous "
                    "standby: " + "; ".join(conn.warnings)
                )
            return new
        raise StorageUnavailable(
            f"postgresql: writes kept moving the states of the import's members "
            f"{_MERGE_ATTEMPTS} times in a row; the batches before this one are stored: "
            "import again (events already stored are skipped)"
        )

    def count_events(self) -> int:
        with self._session(watch=False) as conn, conn.transaction():
            for setting in BULK_SETTINGS:
                conn.execute(setting)
            return conn.execute(queries.COUNT).fetchone()[0]


def _copy(conns: list[Connection], rows: Iterable[EventRow]) -> None:
    """Copy the stream into the sessions' stages, each member's events to one session,
    in one transaction each: a failure keeps nothing."""
    with contextlib.ExitStack() as transactions:
        for conn in conns:
            transactions.enter_context(conn.transaction())
            for setting in BULK_SETTINGS:
                conn.execute(setting)
        with contextlib.ExitStack() as copies:
            writers = [
                copies.enter_context(conn.cursor().copy(queries.STAGE_COPY)).write_row
                for conn in conns
            ]
            for row in rows:
                writers[hash(row[0]) % len(writers)](row)


def _prune(conn: Connection) -> None:
    """Delete some expired idempotency keys, within the write's session (so within its
    deadline). Not waiting for a synchronous standby: losing a deletion in a failover
    loses nothing, and the write's answer must not depend on it. A failure is logged
    and waits for the next time."""
    try:
        with conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = local")
            conn.execute(queries.KEY_PRUNE, (_now_us() - _TTL_US, _PRUNE_LIMIT))
    except psycopg.Error as exc:
        log.warning("postgresql: expired idempotency keys not deleted: %s", exc)


def _now_us() -> int:
    """The time idempotency keys are stamped with (the service's clock, as on every backend)."""
    return time.time_ns() // 1000
