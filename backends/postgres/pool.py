"""Connections: one ``psycopg_pool.ConnectionPool`` per process, opened on first use.

Never at construction: gunicorn builds the app, then may fork, and a connection
must not cross a fork (both processes would talk on one socket). A child that
finds its parent's pool leaves it alone (closing it would end the parent's
sessions: the sockets are shared) and opens its own.

Pool settings, and why:

- ``autocommit``: a read or a one-statement write is one round trip; writes of
  several statements open a transaction explicitly.
- a short wait for a connection (``pool_timeout_ms``, 1 s): with the server down,
  every connection attempt fails and a request answers 503 after that wait.
- ``reconnect_timeout`` of 2 s: psycopg_pool retries a failed connection with a
  doubling delay (1, 2, 4, 8... s), so after a long outage the next attempt could
  come long after the server is back. Giving up after 2 s hands the next attempt
  to the next request instead: the pool recovers within about a second of the
  server's return, however long it was away.
- a check of each connection as it leaves the pool (:func:`_alive`), costing a
  round trip only when the server sent something to an idle connection: a
  restarted server's connections are replaced before a request uses one, in
  every worker (each has its own pool), rather than answering one 503 each.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg_pool
from psycopg.errors import Diagnostic

RECONNECT_TIMEOUT = 2.0
_WORKERS = 2  # pool threads opening connections in the background


class Connection(psycopg.Connection):
    """A pooled connection that collects the WARNINGs the server sends it: a write
    checks that none came (a COMMIT whose wait for a synchronous standby was
    cancelled sends one)."""

    warnings: list[str]


def _configure(statement_timeout_ms: int) -> Callable[[Connection], None]:
    def configure(conn: Connection) -> None:
        notes: list[str] = []
        conn.warnings = notes

        def note(diagnostic: Diagnostic) -> None:
            if diagnostic.severity_nonlocalized == "WARNING":
                notes.append(f"{diagnostic.message_primary} ({diagnostic.sqlstate})")

        conn.add_notice_handler(note)
        conn.execute(f"SET statement_timeout = {int(statement_timeout_ms)}")

    return configure


def _alive(conn: Connection) -> None:
    """Raise if a connection taken from the pool is dead.

    An idle connection has nothing to read unless the server spoke unprompted: the
    FATAL it sends as it shuts down or terminates the session, then the end of the
    stream. Only then is the server asked (an empty query), so a healthy pool pays
    one poll per request, not a round trip.
    """
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    if poller.poll(0):
        conn.execute("")


class Pool:
    """This process's pool for one store: :meth:`get` opens it on first use."""

    def __init__(
        self,
        conninfo: str,
        connect: dict[str, Any],
        *,
        min_size: int,
        max_size: int,
        timeout: float,
        statement_timeout_ms: int,
    ) -> None:
        self._conninfo = conninfo
        self._connect = {**connect, "autocommit": True}
        self._sizes = (min_size, max_size)
        self._timeout = timeout
        self._configure = _configure(statement_timeout_ms)
        self._pool: psycopg_pool.ConnectionPool | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        # A parent's pools, kept referenced in a forked child so that nothing of
        # theirs (connections, threads) is finalised there.
        self._inherited: list[psycopg_pool.ConnectionPool] = []

    def _forget_parent(self) -> None:
        if self._pid != os.getpid():
            if self._pool is not None:
                self._inherited.append(self._pool)
            self._pool, self._pid, self._lock = None, os.getpid(), threading.Lock()

    def get(self) -> psycopg_pool.ConnectionPool:
        self._forget_parent()
        pool = self._pool
        if pool is None:
            with self._lock:
                pool = self._pool
                if pool is None:
                    pool = psycopg_pool.ConnectionPool(
                        self._conninfo,
                        connection_class=Connection,
                        kwargs=self._connect,
                        min_size=self._sizes[0],
                        max_size=self._sizes[1],
                        open=False,
                        configure=self._configure,
                        check=self._check,
                        name="optin",
                        timeout=self._timeout,
                        reconnect_timeout=RECONNECT_TIMEOUT,
                        num_workers=_WORKERS,
                    )
                    pool.open()
                    self._pool = pool
        return pool

    def _check(self, conn: Connection) -> None:
        try:
            _alive(conn)
        except psycopg.Error:
            # The others are connections to the same server: replace them all now.
            if self._pool is not None:
                self._pool.drain()
            raise

    @property
    def opened(self) -> bool:
        """Whether this process has opened its pool."""
        return self._pool is not None and self._pid == os.getpid()

    def close(self) -> None:
        """Close this process's pool (a later :meth:`get` opens a new one)."""
        self._forget_parent()
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
