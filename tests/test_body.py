"""Reading the body (optin_service.body) over the WSGI inputs a server may give.

The same cases over gunicorn itself, on raw sockets, are in test_http.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from werkzeug.test import EnvironBuilder

from optin_service import create_app
from optin_service.body import _WATCHDOG

URL = "/client/users/member-1/profile/optin"
GOOD = b'{"LOYALTY_OPTIN": "accepted"}'


class ParseError(Exception):
    """Like gunicorn's ParseException subclasses: not an OSError, not a ValueError."""


class Stream:
    """A WSGI input with only read(), as gunicorn's: its bytes, ``step`` at most per read,
    then an error if given."""

    def __init__(self, data: bytes, step: int = 1 << 20, error: Exception | None = None):
        self.data, self.step, self.error = data, step, error

    def read(self, size: int = -1) -> bytes:
        if not self.data and self.error is not None:
            raise self.error
        size = len(self.data) if size < 0 else size
        chunk, self.data = self.data[: min(size, self.step)], self.data[min(size, self.step) :]
        return chunk


def answer(length: int | None, stream, *, config=None, **environ) -> tuple[int, dict]:
    """What the app answers a PUT whose body the server gives as ``stream``
    (terminated by the server, as gunicorn does)."""
    app = create_app(
        {"OPTIN_STORAGE_URL": "memory://", "OPTIN_MAX_BODY_BYTES": 100, **(config or {})}
    )
    built = EnvironBuilder(URL, method="PUT", data=b"", content_type="application/json")
    env = built.get_environ()
    env.update({"wsgi.input": stream, "wsgi.input_terminated": True, **environ})
    if length is None:
        env.pop("CONTENT_LENGTH", None)
    else:
        env["CONTENT_LENGTH"] = str(length)
    seen = []
    body = b"".join(app.wsgi_app(env, lambda status, headers: seen.append(status)))
    stored = app.extensions["optin"].store.get("member-1")
    status = int(seen[0].split()[0])
    assert (status == 200) == (stored is not None)  # a refused request stores nothing
    return status, json.loads(body)


@pytest.mark.parametrize(
    ("length", "stream", "status"),
    [
        (len(GOOD), lambda: Stream(GOOD), 200),
        (len(GOOD), lambda: Stream(GOOD, step=3), 200),  # short reads
        (None, lambda: Stream(GOOD, step=3), 200),  # chunked: no Content-Length
        (100, lambda: Stream(GOOD + b" " * 71), 200),  # exactly at the limit
        (None, lambda: Stream(GOOD + b" " * 72), 413),  # chunked, one byte over
        (101, lambda: Stream(GOOD + b" " * 72), 413),
        (0, lambda: Stream(b""), 400),  # no body: not JSON
    ],
)
def test_a_whole_body_is_read_through_the_guard(length, stream, status):
    assert answer(length, stream())[0] == status


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (lambda: Stream(GOOD[:10]), "Request body ended after 10 of the 29 bytes"),
        (lambda: Stream(b""), "Request body ended after 0 of the 29 bytes"),
        (
            lambda: Stream(GOOD[:10], error=ParseError("Invalid chunk size: 'zz'")),
            "Request body could not be read: Invalid chunk size: 'zz'",
        ),
        (lambda: Stream(GOOD[:10], error=OSError("reset")), "could not be read: reset"),
        (lambda: Stream(b"", error=ValueError("closed")), "could not be read: closed"),
        (lambda: Stream(b"", error=ParseError("x" * 10_000)), "could not be read: " + "x" * 200),
    ],
    ids=["stopped early", "nothing sent", "server parse error", "reset", "closed", "long"],
)
def test_an_incomplete_or_unreadable_body_is_a_400(stream, message):
    status, error = answer(len(GOOD), stream())
    assert status == 400
    assert error["errorCode"] == "INVALID_REQUEST"
    assert message in error["errorMessage"]
    assert len(error["errorMessage"]) < 250


def test_a_server_timeout_while_reading_is_a_408():
    status, error = answer(len(GOOD), Stream(GOOD[:5], error=TimeoutError("timed out")))
    assert (status, error["errorCode"]) == (408, "REQUEST_TIMEOUT")


class SocketReader:
    """Reads a body of ``length`` bytes as gunicorn's reader does: loops over recv until
    it holds what was asked, so a timeout on the socket would bound each recv, never
    the whole read."""

    def __init__(self, sock: socket.socket, length: int) -> None:
        self.sock, self.left = sock, length

    def read(self, size: int = -1) -> bytes:
        size = min(size, self.left)
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                break
            data += chunk
        self.left -= len(data)
        return data


@pytest.fixture
def connection():
    """Both ends of a TCP connection on loopback: (client, server)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    yield client, server
    client.close()
    server.close()


def test_a_trickling_body_gets_a_408_at_its_deadline_and_the_socket_stays_usable(connection):
    client, server = connection
    stop = threading.Event()

    def trickle() -> None:
        client.sendall(GOOD[:5])
        for byte in GOOD[5:]:
            if stop.wait(0.05):
                return
            client.sendall(bytes([byte]))  # 24 more bytes: 1.2 s in all

    sender = threading.Thread(target=trickle)
    sender.start()
    started = time.monotonic()
    try:
        status, error = answer(
            len(GOOD),
            SocketReader(server, len(GOOD)),
            config={"OPTIN_BODY_TIMEOUT_SECONDS": 0.3},
            **{"gunicorn.socket": server},
        )
    finally:
        stop.set()
        sender.join()
    assert (status, error["errorCode"]) == (408, "REQUEST_TIMEOUT")
    assert error["errorMessage"] == "Request body did not arrive within 0.3 s"
    assert time.monotonic() - started < 1.0  # the deadline and a watchdog tick, not 1.2 s
    server.sendall(b"the response")  # only reading was shut
    assert client.recv(100) == b"the response"
    assert not _WATCHDOG._watched and not _WATCHDOG._expired


def test_a_body_within_its_deadline_is_read_and_forgotten(connection):
    client, server = connection
    client.sendall(GOOD)
    status, _ = answer(len(GOOD), SocketReader(server, len(GOOD)), **{"gunicorn.socket": server})
    assert status == 200
    assert not _WATCHDOG._watched and not _WATCHDOG._expired


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_a_body_timeout_that_is_not_a_positive_number_stops_start_up(monkeypatch, value):
    monkeypatch.setenv("OPTIN_BODY_TIMEOUT_SECONDS", value)
    with pytest.raises(ValueError, match="OPTIN_BODY_TIMEOUT_SECONDS"):
        create_app({"OPTIN_STORAGE_URL": "memory://"})
