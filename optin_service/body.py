"""Reading a request body: whole, within its size limit, within its deadline.

:func:`read_body` reads through Werkzeug's ``request.get_data()`` and the
per-request ``max_content_length``, over a guard around the server's input
stream (``wsgi.input``) that turns what a server raises while reading into HTTP
errors and holds the whole read to one deadline:

- 413: over ``OPTIN_MAX_BODY_BYTES``;
- 400: a body the server cannot parse (a malformed chunk), or one that ends
  before its ``Content-Length`` (the client stopped: an incomplete request is
  not an answer);
- 408: not all there within ``OPTIN_BODY_TIMEOUT_SECONDS``;
- 501: a transfer coding other than chunked (``gzip, chunked``).

The deadline needs the connection's socket, which gunicorn puts in every
environ as ``gunicorn.socket``. A timeout on the socket would not do: gunicorn's
reader loops over ``recv`` inside one ``read``, so a client trickling a byte now
and then would keep each ``recv`` within any timeout for as long as it likes.
Instead a watchdog thread (one per process, started on first use) shuts the
socket for reading once the deadline passes, which ends a blocked ``recv``
with end-of-stream wherever it is; the response is still written, and gunicorn
still drains what the client sends before it closes. Under a server that gives
no socket, the body has no deadline here: a buffering proxy in front gives one.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import IO

from flask import Request
from werkzeug.exceptions import BadRequest, HTTPException, RequestEntityTooLarge, RequestTimeout
from werkzeug.exceptions import NotImplemented as NotImplementedHTTP


def read_body(req: Request, limit: int, timeout: float) -> bytes:
    """The whole body of ``req``, at most ``limit`` bytes, read within ``timeout`` seconds."""
    codings = req.headers.get("Transfer-Encoding")
    if codings is not None and codings.strip(" \t").lower() != "chunked":
        # gunicorn undoes the chunking of "gzip, chunked", not the gzip: read as it
        # is, the body would be taken for what it is not.
        raise NotImplementedHTTP("Transfer-Encoding other than chunked is not supported")
    # Set per request (Flask >= 3.1) so a host app's own limit is left alone. One
    # byte of headroom: a body without Content-Length (chunked) is cut at the limit
    # silently, and that extra byte tells a body that fits from one that does not.
    req.max_content_length = limit + 1
    environ = req.environ
    guard = _GuardedInput(environ["wsgi.input"], environ.get("gunicorn.socket"), timeout)
    # Werkzeug builds request.stream from wsgi.input on first use, which is here:
    # nothing on the API's request path reads the body before.
    environ["wsgi.input"] = guard
    try:
        data = req.get_data(cache=False)
    finally:
        guard.close()
    if len(data) > limit:
        raise RequestEntityTooLarge()
    expected = req.content_length
    if expected is not None and len(data) < expected:
        raise BadRequest(
            f"Request body ended after {len(data)} of the {expected} bytes "
            "its Content-Length announced"
        )
    return data


class _GuardedInput:
    """A WSGI input stream read within one deadline, whose failures are HTTP errors.

    A read that fails is the client's error (400), whatever the server raises:
    gunicorn raises its own ``ParseException`` classes for a malformed chunked
    body, not the ``OSError`` that Werkzeug would turn into a 400 itself.
    """

    def __init__(self, stream: IO[bytes], sock: socket.socket | None, timeout: float) -> None:
        self._stream = stream
        self._timeout = timeout
        self._watched = sock is not None
        #: Set by the watchdog, before it shuts the socket: a read that ended then is late.
        self.expired = False
        if sock is not None:
            _WATCHDOG.watch(self, sock, time.monotonic() + timeout)

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._stream.read(size)
        except HTTPException:
            raise
        except TimeoutError:  # a server's own socket timeout
            raise self._late() from None
        except Exception as exc:  # the server's own classes: see the class docstring
            if self.expired:
                raise self._late() from None
            reason = str(exc)[:200] or type(exc).__name__
            raise BadRequest(f"Request body could not be read: {reason}") from None
        if self.expired:  # the read ended because the watchdog shut the socket
            raise self._late()
        return data

    def close(self) -> None:
        """Stop watching the deadline (the body is read, or its reading failed)."""
        if self._watched:
            _WATCHDOG.forget(self)
            self._watched = False

    def _late(self) -> RequestTimeout:
        return RequestTimeout(f"Request body did not arrive within {self._timeout:g} s")


class _Watchdog:
    """Shuts, for reading, the socket of each body read still running past its deadline.

    Checked every ``tick`` seconds, so a deadline is kept to within a tick; a
    watch costs a dictionary entry under a lock, not a thread or a wake-up per
    request. The thread is started on first use in each process (after a fork,
    the parent's thread does not exist in the child). It marks a guard
    ``expired`` before it shuts its socket, so the read that the shutdown ends
    sees the mark without taking the lock.
    """

    def __init__(self, tick: float = 0.25) -> None:
        self._tick = tick
        self._lock = threading.Lock()
        self._watched: dict[_GuardedInput, tuple[float, socket.socket]] = {}
        self._pid = 0

    def watch(self, guard: _GuardedInput, sock: socket.socket, deadline: float) -> None:
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._watched.clear()
                threading.Thread(target=self._run, name="optin-body-deadline", daemon=True).start()
            self._watched[guard] = (deadline, sock)

    def forget(self, guard: _GuardedInput) -> None:
        with self._lock:
            self._watched.pop(guard, None)

    def _run(self) -> None:
        while True:
            time.sleep(self._tick)
            now = time.monotonic()
            with self._lock:
                due = [(g, s) for g, (deadline, s) in self._watched.items() if deadline <= now]
                for guard, _ in due:
                    del self._watched[guard]
                    guard.expired = True
            for _, sock in due:
                with contextlib.suppress(OSError):  # the client may have gone already
                    sock.shutdown(socket.SHUT_RD)


_WATCHDOG = _Watchdog()
