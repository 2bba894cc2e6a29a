"""The contract on the wire: raw HTTP/1.1 against gunicorn, as a client sees it."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from optin_service.errors import ERROR_CODES
from optin_service.headers import RESPONSE_HEADERS
from tests.servers import LOOPBACK, Gunicorn

pytestmark = pytest.mark.slow
PATH = "/client/users/wire-1/profile/optin"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wire")
    gunicorn = Gunicorn({"OPTIN_STORAGE_URL": f"sqlite:///{tmp}/optin.db"}, workers=1)
    gunicorn.start(tmp / "gunicorn.log")
    yield gunicorn
    gunicorn.stop()


def raw(server, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send ``request`` as is; return the status line, headers (names as sent) and body."""
    with socket.create_connection((LOOPBACK, server.port), timeout=5) as sock:
        sock.sendall(request)
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
    ],
    ids=[
        "bad Content-Length",
        "lower-case method",
        "request line over 4094 bytes",
        "101 header fields",
        "a header over 8190 bytes",
        "unknown transfer coding",
        "unknown expectation",
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
        for _ in range(10):  # reach both workers
            _, _, answer = raw(gunicorn, history_request)
            assert len(json.loads(answer)["items"]) == 1, answer
        pids = {
            line.split("pid:")[1].split()[0]
            for line in gunicorn.log().splitlines()
            if "Booting worker" in line
        }
        assert len(pids) == 2
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
