"""The least any service on this contract and this storage must do: the ceiling.

``bench/reference_app.py`` with, in place of its dict, one write of the member's
status to the storage the service would use, and nothing else: no history, no
validation beyond the reference's, no log, no metrics. ``headers`` answers with
the contract's 15 response headers (as ``bench/reference_headers_app.py``),
``bare`` with the reference's two. If one of these measures below a target,
no implementation of the service on that storage can meet it: it has to do at
least this much more than the reference, on the same gunicorn and Flask.

The storage comes from ``OPTIN_STORAGE_URL``, as for the service:

- ``sqlite:///path?synchronous=NORMAL``: WAL, ``synchronous`` FULL unless said
  (SQLite's and the service's default), one autocommit upsert per PUT into a
  one-table file (``INSERT ... ON CONFLICT DO UPDATE``). Workers take turns on
  a blocking ``flock`` first, the fairest queue there is (the waiter wakes when
  the lock is released; SQLite's own busy handler sleeps 1, 2, 5 ms... between
  tries), with no timeout: a benchmark may wait forever, a service may not.
- ``redis://host:port/db``: one ``SET`` per PUT through redis-py (a connection
  pool, hiredis when installed, as the service).

``bench/load.py --configs ceiling-sqlite-full,ceiling-redis,...`` pairs them
with the plain reference.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import uuid
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

from flask import Flask, Response, request

from bench.reference_app import BODY
from bench.reference_headers_app import RESPONSE_HEADERS


def _sqlite_writer(url: str) -> Callable[[str, str], None]:
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
        return conn, os.open(path + "-ceiling-lock", os.O_RDWR | os.O_CREAT, 0o600)

    def write(correlation_id: str, status: str) -> None:
        opened = local.get(os.getpid())
        if opened is None:
            opened = local[os.getpid()] = connect()
        conn, lock = opened
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            conn.execute(
                "INSERT INTO optin (id, status) VALUES (?, ?)"
                " ON CONFLICT (id) DO UPDATE SET status = excluded.status",
                (correlation_id, status),
            )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

    return write


def _redis_writer(url: str) -> Callable[[str, str], None]:
    import redis

    client = redis.Redis.from_url(url)  # a pool: connections are made after the fork

    def write(correlation_id: str, status: str) -> None:
        client.set("ceiling:" + correlation_id, status)

    return write


def create(headers: bool) -> Flask:
    url = os.environ["OPTIN_STORAGE_URL"]
    write = _sqlite_writer(url) if url.startswith("sqlite:") else _redis_writer(url)
    app = Flask(__name__)

    @app.put("/client/users/<correlation_id>/profile/optin")
    def put_optin(correlation_id: str) -> Response:
        body = request.get_json(silent=True)
        status = body.get("LOYALTY_OPTIN") if isinstance(body, dict) else None
        if status not in ("accepted", "declined"):
            return Response(b'{"message":"Invalid opt-in response provided"}', 400)
        write(correlation_id, status)
        if not headers:
            return Response(BODY, 200, mimetype="application/json")
        rid = str(uuid.uuid4())
        extra = [*RESPONSE_HEADERS, ("x-amzn-RequestId", rid), ("X-Request-Id", rid)]
        return Response(BODY, 200, headers=extra, mimetype="application/json")

    return app


def headers() -> Flask:
    """gunicorn's app factory: ``bench.ceiling_app:headers()``."""
    return create(headers=True)


def bare() -> Flask:
    """gunicorn's app factory: ``bench.ceiling_app:bare()``."""
    return create(headers=False)
