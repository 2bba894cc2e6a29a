"""The contract on the wire: raw HTTP/1.1 against gunicorn, as a client sees it."""

from __future__ import annotations

import json
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from optin_service.errors import ERROR_CODES
from optin_service.headers import RESPONSE_HEADERS
from tests.servers import LOOPBACK, Gunicorn, until_every_worker_answered

pytestmark = pytest.mark.slow
PATH = "/client/users/wire-1/profile/optin"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wire")
    gunicorn = Gunicorn({"OPTIN_STORAGE_URL": f"sqlite:///{tmp}/optin.db"}, workers=1)
    gunicorn.start(tmp / "gunicorn.log")
    yield gunicorn
    gunicorn.stop()


def raw(
    server, request: bytes, *, half_close: bool = False, timeout: float = 5
) -> tuple[str, dict[str, str], bytes]:
    """Send ``request`` as is (then end the sending side if ``half_close``); return the
    status line, headers (names as sent) and body."""
    with socket.create_connection((LOOPBACK, server.port), timeout=timeout) as sock:
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return response_of(sock)


def response_of(sock: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """Read an HTTP/1.1 response until the server closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, body


def put_request(body: bytes, *, chunked: bool = False) -> bytes:
    head = f"PUT {PATH} HTTP/1.1\r\nHost: {LOOPBACK}\r\nContent-Type: application/json\r\n"
    if not chunked:
        return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 4096]), body[i : i + 4096])
                      for i in range(0, len(body), 4096))  # fmt: skip
    return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunks + b"0\r\n\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status", "phrase"),
    [
        (f"PUT {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".encode(), 400, "LENGTH"),
        (f"put {PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 400, "'put'"),
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "too large"),
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-H%d: v\r\n" % n for n in range(101))
            + b"\r\n",
            431,
            "headers",
        ),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 9000 + b"\r\n\r\n", 431, ""),
        (
            f"PUT {PATH} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n".encode(),
            501,
            "xchunked",
        ),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n\r\n", 417, "200-ok"),
        # Without chunked last the body has no length (RFC 9112): gunicorn's 400.
        (
            f"PUT {PATH} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n".encode(),
            400,
            "TRANSFER-ENCODING",
        ),
        # gunicorn undoes the chunks, not the gzip: the app refuses it (it was stored as is).
        (
            put_request(b'{"LOYALTY_OPTIN":"declined"}', chunked=True).replace(
                b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked"
            ),
            501,
            "Transfer-Encoding other than chunked is not supported",
        ),
    ],
    ids=[
        "bad Content-Length",
        "lower-case method",
        "request line over 4094 bytes",
        "101 header fields",
        "a header over 8190 bytes",
        "unknown transfer coding",
        "unknown expectation",
        "gzip without chunked",
        "gzip before chunked",
    ],
)
def test_what_gunicorn_refuses_itself_gets_the_envelope_and_headers(
    server, request_bytes, status, phrase
):
    """gunicorn answers these before any app runs: gunicorn.conf.py makes its answer
    the envelope with the seed's headers (it was gunicorn's HTML page), with the
    errorCode the README's table gives that status."""
    line, headers, body = raw(server, request_bytes)
    assert line.startswith(f"HTTP/1.1 {status} ")
    assert headers["Content-Type"] == "application/json"
    error = json.loads(body)
    assert error["statusCode"] == status and phrase in error["errorMessage"]
    assert error["errorCode"] == ERROR_CODES[status]
    for name, value in RESPONSE_HEADERS:
        assert headers[name] == value, name
    assert len(headers["x-amzn-RequestId"]) == 36
    assert headers["X-Request-Id"] == headers["x-amzn-RequestId"]


def test_200_is_the_seeds_bytes_with_its_header_names(server):
    status, headers, body = raw(server, put_request(b'{"LOYALTY_OPTIN":"accepted"}'))
    assert status == "HTTP/1.1 200 OK"
    assert body == b'{"message":"Opt-in updated."}'
    assert headers["Content-Length"] == "29"
    assert headers["X-XSS-Protection"] == "1;mode=block"
    assert headers["cache-control"] == "no-cache, no-store, must-revalidate"
    assert len(headers["x-amzn-RequestId"]) == 36
    assert headers["Strict-Transport-Security"] == "max-age=31536000"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"LOYALTY_OPTIN":"maybe"}', b"Invalid opt-in response provided"),
        (b"{}", b"LOYALTY_OPTIN missing from body"),
    ],
)
def test_seed_400s_on_the_wire(server, body, message):
    status, headers, answer = raw(server, put_request(body))
    assert status == "HTTP/1.1 400 BAD REQUEST"
    assert answer == (
        b'{"statusCode":400,"errorCode":"INVALID_REQUEST","errorMessage":"' + message + b'"}'
    )
    assert headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(("pad", "code"), [(100, "200"), (16400, "413"), (200_000, "413")])
def test_chunked_bodies_are_held_to_the_limit(server, pad, code):
    body = b'{"LOYALTY_OPTIN":"declined","pad":"' + b"x" * pad + b'"}'
    status, headers, answer = raw(server, put_request(body, chunked=True))
    assert status.split()[1] == code, answer
    assert headers["X-Content-Type-Options"] == "nosniff"


DECLINED = b'{"LOYALTY_OPTIN":"declined"}'  # 28 bytes, 0x1c


def stored(server, member: str) -> int:
    """How many events the service holds for ``member`` (0 when it answers 404)."""
    path = f"/client/users/{member}/profile/optin/history?limit=100"
    status, _, body = raw(server, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return 0 if status.split()[1] == "404" else len(json.loads(body)["items"])


@pytest.mark.parametrize(
    "chunks",
    [
        b"zz\r\n" + DECLINED + b"\r\n0\r\n\r\n",
        b"-1c\r\n" + DECLINED + b"\r\n0\r\n\r\n",
        b"0x1c\r\n" + DECLINED + b"\r\n0\r\n\r\n",
        b"5\r\n" + DECLINED + b"\r\n0\r\n\r\n",
        b"1c\r\n" + DECLINED + b"0\r\n\r\n",
        b"1c;=x\r\n" + DECLINED + b"\r\n0\r\n\r\n",
        b"1c\r\n" + DECLINED + b"\r\n0\r\nno colon here\r\n\r\n",
    ],
    ids=["size zz", "size -1c", "size 0x1c", "data longer than its size", "no CRLF after data",
         "bad extension", "bad trailer"],
)  # fmt: skip
def test_a_malformed_chunked_body_is_a_400_and_stores_nothing(server, chunks, request):
    """gunicorn raises its parse errors from wsgi.input.read: a client's error (they
    were a 500 with a traceback in the log)."""
    member = "chunked-" + request.node.callspec.id.replace(" ", "-")
    head = (
        f"PUT /client/users/{member}/profile/optin HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    logged = len(server.log())
    status, headers, body = raw(server, head.encode() + chunks)
    assert status == "HTTP/1.1 400 BAD REQUEST", body
    error = json.loads(body)
    assert error["errorCode"] == "INVALID_REQUEST" and "body" in error["errorMessage"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert stored(server, member) == 0
    new_lines = server.log()[logged:]
    assert '"level": "ERROR"' not in new_lines and "Traceback" not in new_lines, new_lines


def test_a_body_shorter_than_its_content_length_is_a_400_and_stores_nothing(server):
    """The client announced 4000 bytes, sent 28 and ended its side: not an answer."""
    request = (
        b"PUT /client/users/short-body/profile/optin HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: 4000\r\n\r\n"
    ) + DECLINED
    status, _, body = raw(server, request, half_close=True)
    assert status == "HTTP/1.1 400 BAD REQUEST", body
    assert "28 of the 4000 bytes" in json.loads(body)["errorMessage"]
    assert stored(server, "short-body") == 0


BODY_TIMEOUT = 2


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """Two workers, a short body deadline and the shipped worker timeout (30 s)."""
    tmp = tmp_path_factory.mktemp("stall")
    env = {
        "OPTIN_STORAGE_URL": f"sqlite:///{tmp}/optin.db",
        "OPTIN_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
    }
    gunicorn = Gunicorn(env, workers=2).start(tmp / "gunicorn.log")
    yield gunicorn
    gunicorn.stop()


def _stalled_put(server, member: str) -> socket.socket:
    """A PUT announcing 100 bytes that sends 16 and then nothing."""
    sock = socket.create_connection((LOOPBACK, server.port), timeout=20)
    sock.sendall(
        (
            f"PUT /client/users/{member}/profile/optin HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        ).encode()
        + DECLINED[:16]
    )
    return sock


def test_stalled_bodies_answer_408_and_free_their_workers(two_workers):
    """Four clients stall on two workers: each gets 408 after the body deadline (not a
    500 after gunicorn's 30 s worker timeout), no worker is killed, and /healthz is
    answered as soon as a worker is free."""
    started = time.monotonic()
    stallers = [_stalled_put(two_workers, f"stall-{n}") for n in range(4)]
    try:
        health = raw(two_workers, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", timeout=20)
        health_after = time.monotonic() - started
        answers = [response_of(sock) for sock in stallers]
    finally:
        for sock in stallers:
            sock.close()
    for status, headers, body in answers:
        assert status == "HTTP/1.1 408 REQUEST TIMEOUT", body
        error = json.loads(body)
        assert error["errorCode"] == "REQUEST_TIMEOUT"
        assert f"{BODY_TIMEOUT} s" in error["errorMessage"]
        assert headers["X-Content-Type-Options"] == "nosniff"
    assert health[0] == "HTTP/1.1 200 OK"
    assert health_after < 15, health_after  # two rounds of 2 s stalls, not 31 s
    assert all(stored(two_workers, f"stall-{n}") == 0 for n in range(4))
    log = two_workers.log()
    assert "WORKER TIMEOUT" not in log and "SIGKILL" not in log, log[-3000:]


def test_a_trickling_body_does_not_reset_the_deadline(two_workers):
    """One byte every half second would keep a per-read timeout happy for 50 s: the
    whole body read has one deadline."""
    sock = _stalled_put(two_workers, "trickle")
    started = time.monotonic()
    try:
        for byte in b" " * 100:
            if select.select([sock], [], [], 0.5)[0]:
                break  # the server answered
            try:
                sock.send(bytes([byte]))
            except OSError:
                break  # the server closed after answering
        status, _, body = response_of(sock)
    finally:
        sock.close()
    assert status == "HTTP/1.1 408 REQUEST TIMEOUT", body
    assert time.monotonic() - started < BODY_TIMEOUT + 8
    assert stored(two_workers, "trickle") == 0


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("redis", marks=pytest.mark.redis_server)]
)
def test_idempotency_holds_across_two_workers(tmp_path, request, backend):
    if backend == "redis":
        url = request.getfixturevalue("redis_server").url + f"?prefix=idem-{tmp_path.name}:"
    else:
        url = f"sqlite:///{tmp_path}/optin.db"
    gunicorn = Gunicorn({"OPTIN_STORAGE_URL": url}, workers=2).start(tmp_path / "gunicorn.log")
    try:
        body = b'{"LOYALTY_OPTIN":"accepted"}'
        head = (
            f"PUT {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Idempotency-Key: same-key\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: raw(gunicorn, head + body), range(40)))
        assert {status for status, _, _ in answers} == {"HTTP/1.1 200 OK"}
        history_request = f"GET {PATH}/history?limit=100 HTTP/1.1\r\nHost: x\r\n\r\n".encode()

        def history(_: int) -> None:
            _, _, answer = raw(gunicorn, history_request)
            assert len(json.loads(answer)["items"]) == 1, answer

        until_every_worker_answered(gunicorn, history, at_least=10)  # each worker reads one
        conflict = head + body.replace(b"accepted", b"declined")
        assert raw(gunicorn, conflict)[0] == "HTTP/1.1 422 UNPROCESSABLE ENTITY"
    finally:
        gunicorn.stop()


def test_the_document_served_by_gunicorn_validates(server):
    from openapi_spec_validator import validate

    status, headers, body = raw(server, b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == "HTTP/1.1 200 OK" and headers["Content-Type"] == "application/json"
    document = json.loads(body)
    validate(document)
    assert document["openapi"].startswith("3.1")
    assert "/client/users/{correlation_id}/profile/optin" in document["paths"]
