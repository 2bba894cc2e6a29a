"""Deadlines on what a connection does, kept by one thread per process.

PostgreSQL's ``statement_timeout`` bounds a statement while the server works on it,
but not a COMMIT waiting for a synchronous standby (the wait ignores the timeout),
and nothing the server does bounds a server that stopped answering. So a request
arms a deadline for its connection; past it, the watchdog sends a cancel request
(the server then ends the wait: for a COMMIT, with a WARNING that it committed
locally only); if the operation is still running ``grace`` seconds later (the
server is not answering at all), it shuts the socket down, so the blocked call
fails at once and the pool replaces the connection.

An entry's lock is held while the watchdog acts on it and while the request
disarms it, so a cancel never reaches the next user of a pooled connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time

import psycopg

log = logging.getLogger(__name__)

#: How often the thread looks at deadlines: their precision.
_TICK = 0.1


class _Entry:
    __slots__ = ("cancelled", "conn", "deadline", "lock")

    def __init__(self, conn: psycopg.Connection, deadline: float) -> None:
        self.conn = conn
        self.deadline = deadline
        self.cancelled = False
        self.lock = threading.Lock()


class Watchdog:
    """Cancels, then cuts off, operations that run past their deadline."""

    def __init__(self, grace: float = 1.0) -> None:
        self.grace = grace
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}
        self._pid: int | None = None  # the process whose thread runs
        # A child starts with none of its parent's threads, and maybe with a lock
        # one of them held at the fork: it starts afresh.
        os.register_at_fork(after_in_child=self._forget_parent)

    def _forget_parent(self) -> None:
        self._lock = threading.Lock()
        self._entries = {}
        self._pid = None

    def arm(self, conn: psycopg.Connection, seconds: float) -> _Entry:
        """Watch ``conn`` until :meth:`disarm`; act ``seconds`` from now."""
        entry = _Entry(conn, time.monotonic() + seconds)
        with self._lock:
            if self._pid != os.getpid():  # the first deadline in this process
                self._pid = os.getpid()
                threading.Thread(
                    target=self._run, name="optin-postgres-watchdog", daemon=True
                ).start()
            self._entries[id(entry)] = entry
        return entry

    def disarm(self, entry: _Entry) -> None:
        """Stop watching; waits while the watchdog is acting on this entry."""
        with entry.lock, self._lock:
            self._entries.pop(id(entry), None)

    def _run(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            time.sleep(_TICK)
            now = time.monotonic()
            with self._lock:
                due = [e for e in self._entries.values() if e.deadline <= now]
            for entry in due:
                if entry.lock.acquire(blocking=False):
                    try:
                        self._act(entry)
                    finally:
                        entry.lock.release()

    def _act(self, entry: _Entry) -> None:
        with self._lock:
            if id(entry) not in self._entries:  # disarmed meanwhile
                return
        if not entry.cancelled:
            entry.cancelled = True
            entry.deadline += self.grace
            log.warning("postgresql: cancelling an operation past its deadline")
            with contextlib.suppress(psycopg.Error):
                entry.conn.cancel_safe(timeout=self.grace)
            return
        log.warning("postgresql: the server does not answer a cancel; dropping the connection")
        with self._lock:
            self._entries.pop(id(entry), None)
        with contextlib.suppress(OSError, psycopg.Error):
            # A duplicate of the descriptor: shutting it down ends the connection for
            # libpq too (its wait returns, the read fails), without closing its fd.
            with socket.socket(fileno=os.dup(entry.conn.fileno())) as sock:
                sock.shutdown(socket.SHUT_RDWR)
