"""The least any service on this contract and this storage must do: the ceiling.

``bench/reference_app.py`` with, in place of its dict, one write of the member's
status to the storage the service would use, and nothing else: no history, no
validation beyond the reference's, no log, no metrics. ``headers`` answers with
the contract's 15 response headers (as ``bench/reference_headers_app.py``),
``bare`` with the reference's two. If one of these measures below a target,
no implementation of the service on that storage can meet it: it has to do at
least this much more than the reference, on the same gunicorn and Flask.

Two more factories bring the ceiling closer to what the service must also be:

- ``history``: as ``headers``, and the write also appends the event to the
  member's history in the same round trip or transaction (the consent record the
  service keeps as evidence): Redis runs one script doing ``SET`` and ``ZADD``,
  SQLite one transaction doing the upsert and an ``INSERT`` into a second table,
  PostgreSQL one statement doing both (one transaction, one round trip).
- ``libraries``: as ``headers``, in a worker that has also imported the
  libraries the service is built on (marshmallow, flask-talisman,
  prometheus-client), unused: the least RSS of any service built on them.

The storage comes from ``OPTIN_STORAGE_URL``, as for the service:

- ``sqlite:///path?synchronous=NORMAL``: WAL, ``synchronous`` FULL unless said
  (SQLite's and the service's default), one autocommit upsert per PUT into a
  one-table file (``INSERT ... ON CONFLICT DO UPDATE``). Workers take turns on
  a blocking ``flock`` first, the fairest queue there is (the waiter wakes when
  the lock is released; SQLite's own busy handler sleeps 1, 2, 5 ms... between
  tries), with no timeout: a benchmark may wait forever, a service may not.
- ``redis://host:port/db``: one ``SET`` per PUT through redis-py (a connection
  pool, hiredis when installed, as the service).
- ``postgresql://...``: one autocommit upsert per PUT through psycopg 3 from a
  ``psycopg_pool.ConnectionPool`` opened in each worker on its first PUT (after
  the fork), as the service; text compared byte-wise (``COLLATE "C"``), as the
  service's tables do; ``synchronous_commit`` the server's.

``bench/load.py --configs ceiling-sqlite-full,ceiling-redis,...`` pairs them
with the plain reference.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

from flask import Flask, Response, request

from bench.reference_app import BODY
from bench.reference_headers_app import RESPONSE_HEADERS

# write(correlation_id, status, event_id): event_id names the history event.
Writer = Callable[[str, str, str], None]


def _sqlite_writer(url: str, history: bool) -> Writer:
    parts = urlsplit(url)
    path = parts.path
    synchronous = parse_qs(parts.query).get("synchronous", ["FULL"])[0]
    local: dict[int, tuple[sqlite3.Connection, int]] = {}  # per process: after the fork

    def connect() -> tuple[sqlite3.Connection, int]:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS optin (id TEXT PRIMARY KEY, status TEXT NOT NULL)"
            " WITHOUT ROWID"
        )
        conn.execute(
            "CREATE TABLE IF NOT EXISTS history (id TEXT, at INTEGER, event TEXT,"
            " PRIMARY KEY (id, at, event)) WITHOUT ROWID"
        )
        return conn, os.open(path + "-ceiling-lock", os.O_RDWR | os.O_CREAT, 0o600)

    def write(correlation_id: str, status: str, event_id: str) -> None:
        opened = local.get(os.getpid())
        if opened is None:
            opened = local[os.getpid()] = connect()
        conn, lock = opened
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if history:
                conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO optin (id, status) VALUES (?, ?)"
                " ON CONFLICT (id) DO UPDATE SET status = excluded.status",
                (correlation_id, status),
            )
            if history:
                conn.execute(
                    "INSERT INTO history (id, at, event) VALUES (?, ?, ?)",
                    (correlation_id, time.time_ns() // 1000, f"{event_id} {status}"),
                )
                conn.execute("COMMIT")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

    return write


def _redis_writer(url: str, history: bool) -> Writer:
    import redis

    client = redis.Redis.from_url(url)  # a pool: connections are made after the fork
    # The state and the history event in one round trip (EVALSHA, as the service).
    append = client.register_script(
        "redis.call('SET', KEYS[1], ARGV[1]) redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])"
    )

    def write(correlation_id: str, status: str, event_id: str) -> None:
        key = "ceiling:" + correlation_id
        if history:
            event = f"{event_id} {status}"
            append(keys=(key, key + ":h"), args=(status, time.time_ns() // 1000, event))
        else:
            client.set(key, status)

    return write


# The history event and the state in one statement: one transaction, one round trip.
_PG_TABLES = """
CREATE TABLE IF NOT EXISTS ceiling_optin (
    id text COLLATE "C" PRIMARY KEY, status text NOT NULL);
CREATE TABLE IF NOT EXISTS ceiling_history (
    id text COLLATE "C", at bigint, event text COLLATE "C", PRIMARY KEY (id, at, event))
"""
_PG_STATE = (
    "INSERT INTO ceiling_optin (id, status) VALUES (%(id)s, %(status)s)"
    " ON CONFLICT (id) DO UPDATE SET status = excluded.status"
)
_PG_HISTORY = (
    "WITH event AS (INSERT INTO ceiling_history (id, at, event)"
    " VALUES (%(id)s, %(at)s, %(event)s)) " + _PG_STATE
)


def _postgres_writer(url: str, history: bool) -> Writer:
    import psycopg_pool

    pools: dict[int, psycopg_pool.ConnectionPool] = {}  # per process: after the fork
    statement = _PG_HISTORY if history else _PG_STATE

    def pool() -> psycopg_pool.ConnectionPool:
        opened = pools.get(os.getpid())
        if opened is None:
            opened = pools[os.getpid()] = psycopg_pool.ConnectionPool(
                url, min_size=1, kwargs={"autocommit": True}, open=True
            )
            with opened.connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(7262)")  # workers start at once
                conn.execute(_PG_TABLES)
        return opened

    def write(correlation_id: str, status: str, event_id: str) -> None:
        params = {"id": correlation_id, "status": status}
        if history:
            params.update(at=time.time_ns() // 1000, event=f"{event_id} {status}")
        with pool().connection() as conn:
            conn.execute(statement, params)

    return write


def create(headers: bool, history: bool = False) -> Flask:
    url = os.environ["OPTIN_STORAGE_URL"]
    writer = (
        _sqlite_writer
        if url.startswith("sqlite:")
        else _postgres_writer
        if url.startswith("postgresql:")
        else _redis_writer
    )
    write = writer(url, history)
    app = Flask(__name__)

    @app.put("/client/users/<correlation_id>/profile/optin")
    def put_optin(correlation_id: str) -> Response:
        body = request.get_json(silent=True)
        status = body.get("LOYALTY_OPTIN") if isinstance(body, dict) else None
        if status not in ("accepted", "declined"):
            return Response(b'{"message":"Invalid opt-in response provided"}', 400)
        rid = str(uuid.uuid4()) if headers else ""  # also the event's id (history)
        write(correlation_id, status, rid)
        if not headers:
            return Response(BODY, 200, mimetype="application/json")
        extra = [*RESPONSE_HEADERS, ("x-amzn-RequestId", rid), ("X-Request-Id", rid)]
        return Response(BODY, 200, headers=extra, mimetype="application/json")

    return app


def headers() -> Flask:
    """gunicorn's app factory: ``bench.ceiling_app:headers()``."""
    return create(headers=True)


def bare() -> Flask:
    """gunicorn's app factory: ``bench.ceiling_app:bare()``."""
    return create(headers=False)


def history() -> Flask:
    """gunicorn's app factory: ``bench.ceiling_app:history()``."""
    return create(headers=True, history=True)


def libraries() -> Flask:
    """gunicorn's app factory: ``bench.ceiling_app:libraries()``."""
    import flask_talisman  # noqa: F401
    import marshmallow  # noqa: F401
    import prometheus_client  # noqa: F401

    return create(headers=True)
