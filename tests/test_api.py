"""The HTTP contract through Flask's test client: every rule of the README's "The API"."""

from __future__ import annotations

import json
import logging
import re
import uuid

import fakeredis
import pytest
from flask import Flask

from backends.memory import MemoryStore
from backends.redis import RedisStore
from backends.sqlite import SQLiteStore
from optin_service import OptIn, create_app
from optin_service.headers import SEED_HEADERS
from optin_service.storage import StorageError, StorageUnavailable

PATH = "/client/users/{}/profile/optin"
URL = PATH.format("member-1")
OK_BODY = b'{"message":"Opt-in updated."}'
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")

# The seed's header values, exactly as its page shows them.
SEED = {
    "Referrer-Policy": "no-referrer",
    "X-XSS-Protection": "1;mode=block",
    "Access-Control-Allow-Origin": "*",
    "Expect-CT": "max-age=86400",
    "Strict-Transport-Security": "max-age=31536000",
    "Feature-Policy": "vibrate 'none'; geolocation 'none'",
    "X-Frame-Options": "sameorigin",
    "Content-Security-Policy": (
        "connect-src 'none';object-src https://*.cloudfront.net;script-src https://*.cloudfront.net"
    ),
    "cache-control": "no-cache, no-store, must-revalidate",
    "X-Content-Type-Options": "nosniff",
}


def put(client, body, url=URL, content_type="application/json", **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.put(url, data=data, content_type=content_type, **kw)


def envelope(response):
    assert response.mimetype == "application/json"
    body = json.loads(response.data)
    assert list(body) == ["statusCode", "errorCode", "errorMessage"]
    assert body["statusCode"] == response.status_code
    return body


# --- the seed's PUT -----------------------------------------------------------


@pytest.mark.parametrize("status", ["accepted", "declined"])
def test_put_answers_the_seeds_29_bytes(client, status):
    response = put(client, {"LOYALTY_OPTIN": status})
    assert response.status_code == 200
    assert response.data == OK_BODY
    assert len(response.data) == 29
    assert response.headers["Content-Length"] == "29"
    assert response.headers["Content-Type"] == "application/json"


def test_seed_400_missing(client):
    response = put(client, {"other": 1})
    assert response.status_code == 400
    assert response.data == (
        b'{"statusCode":400,"errorCode":"INVALID_REQUEST",'
        b'"errorMessage":"LOYALTY_OPTIN missing from body"}'
    )


@pytest.mark.parametrize(
    "value", ["Accepted", "ACCEPTED", "accepted ", "yes", "", None, 1, True, [], {}, ["accepted"]]
)
def test_seed_400_invalid(client, value):
    response = put(client, {"LOYALTY_OPTIN": value})
    assert response.status_code == 400
    assert envelope(response) == {
        "statusCode": 400,
        "errorCode": "INVALID_REQUEST",
        "errorMessage": "Invalid opt-in response provided",
    }


def test_unknown_keys_are_ignored(client):
    response = put(client, {"LOYALTY_OPTIN": "declined", "extra": {"nested": [1, 2]}})
    assert response.status_code == 200
    assert client.get(URL).get_json()["LOYALTY_OPTIN"] == "declined"


def test_charset_parameter_is_accepted(client):
    response = put(
        client, {"LOYALTY_OPTIN": "accepted"}, content_type="application/json; charset=utf-8"
    )
    assert response.status_code == 200


# --- GET ------------------------------------------------------------------------


def test_get_answers_current_state(client):
    put(client, {"LOYALTY_OPTIN": "accepted"})
    first = client.get(URL).get_json()
    put(client, {"LOYALTY_OPTIN": "declined"})
    response = client.get(URL)
    assert response.status_code == 200
    body = response.get_json()
    assert list(body) == ["LOYALTY_OPTIN", "updatedAt"]
    assert body["LOYALTY_OPTIN"] == "declined"
    assert TIME.fullmatch(body["updatedAt"])
    assert body["updatedAt"] >= first["updatedAt"]


def test_get_of_unknown_member_is_404_envelope(client):
    response = client.get(PATH.format("nobody"))
    assert response.status_code == 404
    assert envelope(response)["errorCode"] == "NOT_FOUND"


# --- correlation id -------------------------------------------------------------


@pytest.mark.parametrize(
    "cid", ["a", "A" * 128, "abc-DEF_123.x:y@z", "user@example.com", "0", "...", "::"]
)
def test_allowed_correlation_ids(client, cid):
    assert put(client, {"LOYALTY_OPTIN": "accepted"}, url=PATH.format(cid)).status_code == 200
    assert client.get(PATH.format(cid)).get_json()["LOYALTY_OPTIN"] == "accepted"


@pytest.mark.parametrize(
    "cid",
    ["A" * 129, "a%20b", "caf%C3%A9", "a+b", "a,b", "%7Bx%7D", "a%00b", "a%22b", "a%27",
     ".", "..", "%2E", "%2E%2E"],  # a client's path normalisation removes . and ..
)  # fmt: skip
@pytest.mark.parametrize("method", ["put", "get"])
def test_rejected_correlation_ids(client, cid, method):
    if method == "put":
        response = put(client, {"LOYALTY_OPTIN": "accepted"}, url=PATH.format(cid))
    else:
        response = client.get(PATH.format(cid))
    assert response.status_code == 400
    assert "correlation_id" in envelope(response)["errorMessage"]


# --- body rules -----------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/xml"]
)
def test_non_json_content_type_is_415(client, content_type):
    kw = {} if content_type is None else {"content_type": content_type}
    response = client.put(URL, data='{"LOYALTY_OPTIN":"accepted"}', **kw)
    assert response.status_code == 415
    assert envelope(response)["errorCode"] == "UNSUPPORTED_MEDIA_TYPE"


def test_body_over_the_limit_is_413(client):
    body = json.dumps({"LOYALTY_OPTIN": "accepted", "pad": "x" * 16384})
    response = put(client, body)
    assert response.status_code == 413
    assert envelope(response)["errorCode"] == "PAYLOAD_TOO_LARGE"
    assert "16384" in envelope(response)["errorMessage"]


def test_body_at_the_limit_is_accepted(client):
    head = '{"LOYALTY_OPTIN":"accepted","pad":"'
    body = head + "x" * (16384 - len(head) - 2) + '"}'
    assert len(body) == 16384
    assert put(client, body).status_code == 200


def test_limit_follows_config(monkeypatch):
    monkeypatch.setenv("OPTIN_MAX_BODY_BYTES", "100")
    client = create_app({"OPTIN_STORAGE_URL": "memory://"}).test_client()
    assert put(client, {"LOYALTY_OPTIN": "accepted", "pad": "x" * 100}).status_code == 413
    assert put(client, {"LOYALTY_OPTIN": "accepted"}).status_code == 200


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[]", "Request body must be a JSON object"),
        ('"accepted"', "Request body must be a JSON object"),
        ("null", "Request body must be a JSON object"),
        ("42", "Request body must be a JSON object"),
        ("", "Request body is not valid JSON"),
        ("{", "Request body is not valid JSON"),
        ("{'LOYALTY_OPTIN': 'accepted'}", "Request body is not valid JSON"),
        (b"\xff\xfe{}", "Request body is not valid UTF-8"),
        ('{"LOYALTY_OPTIN": NaN}', "NaN is not a valid JSON value"),
        ('{"LOYALTY_OPTIN": "accepted", "x": Infinity}', "Infinity is not a valid JSON value"),
        ('{"x": -Infinity, "LOYALTY_OPTIN": "accepted"}', "-Infinity is not a valid JSON value"),
        # A number past a double's range parsed to Infinity (it was accepted).
        ('{"LOYALTY_OPTIN": "accepted", "x": 1e999}', "1e999 is too large for a JSON number"),
        ('{"x": -1.5E+400, "LOYALTY_OPTIN": 1}', "-1.5E+400 is too large for a JSON number"),
        (
            '{"LOYALTY_OPTIN":"accepted","LOYALTY_OPTIN":"declined"}',
            "Duplicate key in JSON body: LOYALTY_OPTIN",
        ),
        (
            '{"LOYALTY_OPTIN":"accepted","LOYALTY_OPTIN":"accepted"}',
            "Duplicate key in JSON body: LOYALTY_OPTIN",
        ),
        ('{"LOYALTY_OPTIN":"accepted","x":{"a":1,"a":2}}', "Duplicate key in JSON body: a"),
        ('{"a":1,"b":1,"b":2,"a":3}', "Duplicate key in JSON body: b"),  # the first repeated
        # A lone surrogate in a quoted key: UTF-8 cannot carry it (it was a 500).
        (
            '{"LOYALTY_OPTIN":"accepted","\\ud800":1,"\\ud800":2}',
            "Duplicate key in JSON body: \\ud800",
        ),
        ('{"\\udfff\\ud800":1,"\\udfff\\ud800":2}', "Duplicate key in JSON body: \\udfff\\ud800"),
        ('\ufeff{"LOYALTY_OPTIN":"accepted"}'.encode(), "Request body is not valid JSON"),
        ("[" * 5000 + "]" * 5000, "Request body is not valid JSON"),
    ],
)
def test_malformed_bodies_are_400(client, body, message):
    response = put(client, body)
    assert response.status_code == 400
    assert envelope(response) == {
        "statusCode": 400,
        "errorCode": "INVALID_REQUEST",
        "errorMessage": message,
    }


BAD_REQUESTS = [
    ({"LOYALTY_OPTIN": "nope"}, "application/json", {}),
    ({}, "application/json", {}),
    ('{"LOYALTY_OPTIN":"declined","LOYALTY_OPTIN":"declined"}', "application/json", {}),
    ('{"LOYALTY_OPTIN":"declined","x":NaN}', "application/json", {}),
    ('["declined"]', "application/json", {}),
    ('{"LOYALTY_OPTIN":"declined"}', "text/plain", {}),
    (json.dumps({"LOYALTY_OPTIN": "declined", "p": "x" * 20000}), "application/json", {}),
    ({"LOYALTY_OPTIN": "declined"}, "application/json", {"X-Consent-Source": "two words"}),
    ({"LOYALTY_OPTIN": "declined"}, "application/json", {"Idempotency-Key": "\u00e9"}),
]


def _on_backend(kind: str, tmp_path):
    """The standalone API over a fresh store of ``kind``."""
    if kind == "memory":
        store = MemoryStore()
    elif kind == "sqlite":
        store = SQLiteStore.from_url(f"sqlite:///{tmp_path}/optin.db")
    else:
        store = RedisStore(fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    app = Flask(__name__)
    app.config["TESTING"] = True
    OptIn(app, store=store, standalone=True)
    return app, store


@pytest.mark.parametrize("kind", ["memory", "sqlite", "fakeredis"])
def test_bad_input_never_changes_stored_state(kind, tmp_path):
    """Every event, every member's state and the idempotency keys stay as they were."""
    app, store = _on_backend(kind, tmp_path)
    client = app.test_client()
    assert put(client, {"LOYALTY_OPTIN": "accepted"}).status_code == 200
    events, state = list(store.events()), store.get("member-1")
    assert len(events) == 1
    targets = [URL, PATH.format("never-set")]
    for body, content_type, headers in BAD_REQUESTS:
        for url in targets:
            sent = {"Idempotency-Key": "refused-key", **headers}
            response = put(client, body, url=url, content_type=content_type, headers=sent)
            assert response.status_code in (400, 413, 415), (body, sent)
            assert list(store.events()) == events, (body, sent)
            assert store.get("member-1") == state
            assert store.history("never-set", 10) == [] and store.get("never-set") is None
    for cid in (".", ".."):  # ids refused before anything else
        assert put(client, {"LOYALTY_OPTIN": "declined"}, url=PATH.format(cid)).status_code == 400
    assert list(store.events()) == events
    # No refused request kept its Idempotency-Key: a real answer under that key is new.
    answer = {"LOYALTY_OPTIN": "declined"}
    assert put(client, answer, headers={"Idempotency-Key": "refused-key"}).status_code == 200
    assert len(list(store.events())) == 2
    store.close()


def test_the_readme_lists_every_error_code():
    """The README's error table and ERROR_CODES (the OpenAPI enum's source) agree."""
    from pathlib import Path

    from optin_service.errors import ERROR_CODES

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = set(re.findall(r"^\| (\d{3}) \| `([A-Z_]+)` \|", readme, re.MULTILINE))
    expected = {(str(status), code) for status, code in ERROR_CODES.items()}
    assert rows == expected | {("422", "IDEMPOTENCY_KEY_REUSED")}


# --- routing errors -------------------------------------------------------------


def test_unknown_route_is_404_envelope(client):
    response = client.get("/no/such/thing")
    assert response.status_code == 404
    assert envelope(response)["errorCode"] == "NOT_FOUND"


@pytest.mark.parametrize("method", ["post", "delete", "patch"])
def test_wrong_method_is_405_with_allow(client, method):
    response = getattr(client, method)(URL)
    assert response.status_code == 405
    assert envelope(response)["errorCode"] == "METHOD_NOT_ALLOWED"
    allowed = {m.strip() for m in response.headers["Allow"].split(",")}
    assert {"GET", "PUT"} <= allowed


def test_health_endpoints_refuse_put(client):
    response = client.put("/healthz")
    assert response.status_code == 405
    assert "GET" in response.headers["Allow"]


@pytest.mark.parametrize(("path", "methods"), [(URL, "GET, HEAD, OPTIONS, PUT"),
                                                (URL + "/history", "GET, HEAD, OPTIONS"),
                                                ("/healthz", "GET, HEAD, OPTIONS")])  # fmt: skip
def test_options_is_an_empty_204_with_allow_and_the_api_headers(client, path, methods):
    response = client.options(path)
    assert response.status_code == 204
    assert response.data == b""
    assert "Content-Type" not in response.headers  # no body, so no type (it was text/html)
    assert response.headers["Allow"] == methods
    for name, value in SEED.items():
        assert response.headers[name] == value, name
    assert uuid.UUID(response.headers["x-amzn-RequestId"]).version == 4


# --- storage failures and bugs ----------------------------------------------------


class FailingStore(MemoryStore):
    """A store whose request-path methods raise what they are told to."""

    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc

    def get(self, correlation_id):
        raise self.exc

    def set(self, record, *, idempotency_key=None):
        raise self.exc

    def history(self, correlation_id, limit, before=None):
        raise self.exc

    def check(self):
        raise self.exc


def failing_client(exc):
    app = create_app({"TESTING": True, "OPTIN_STORAGE_URL": "memory://"})
    app.extensions["optin"].store = FailingStore(exc)
    return app.test_client()


def test_storage_unavailable_is_503_with_retry_after():
    client = failing_client(StorageUnavailable("redis: Connection refused"))
    for response in (
        put(client, {"LOYALTY_OPTIN": "accepted"}),
        client.get(URL),
        client.get("/readyz"),
    ):
        assert response.status_code == 503
        body = envelope(response)
        assert body["errorCode"] == "SERVICE_UNAVAILABLE"
        assert "refused" not in body["errorMessage"]
        assert response.headers["Retry-After"] == "1"


def test_a_storage_state_an_operator_must_fix_is_named_in_the_503(tmp_path):
    """The message of a StorageUnavailable stays in the log; its reason, a state of the
    store safe to show, is named in the envelope (here: SQLite's file was deleted)."""
    app = create_app({"TESTING": True, "OPTIN_STORAGE_URL": f"sqlite:///{tmp_path}/optin.db"})
    client = app.test_client()
    assert put(client, {"LOYALTY_OPTIN": "accepted"}).status_code == 200
    (tmp_path / "optin.db").unlink()
    for response in (put(client, {"LOYALTY_OPTIN": "declined"}), client.get("/readyz")):
        assert response.status_code == 503
        message = envelope(response)["errorMessage"]
        assert message.startswith("Storage is unavailable, please retry later: ")
        assert "deleted or replaced" in message and str(tmp_path) not in message
    app.extensions["optin"].store.close()


def test_healthz_does_not_touch_storage():
    client = failing_client(StorageUnavailable("down"))
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "exc", [StorageError("sqlite: database disk image is malformed"), RuntimeError("secret detail")]
)
def test_unexpected_errors_are_500_without_details(exc, caplog):
    client = failing_client(exc)
    with caplog.at_level(logging.ERROR, logger="optin_service"):
        response = put(client, {"LOYALTY_OPTIN": "accepted"})
    assert response.status_code == 500
    assert envelope(response) == {
        "statusCode": 500,
        "errorCode": "INTERNAL_ERROR",
        "errorMessage": "Internal error",
    }
    assert b"secret" not in response.data and b"malformed" not in response.data
    rid = response.headers["x-amzn-RequestId"]
    logged = [r for r in caplog.records if rid in r.getMessage()]
    assert logged and logged[0].exc_info is not None


# --- headers on every response ----------------------------------------------------


def _responses(client):
    put(client, {"LOYALTY_OPTIN": "accepted"})
    yield "put 200", put(client, {"LOYALTY_OPTIN": "accepted"})
    yield "get 200", client.get(URL)
    yield "400", put(client, {})
    yield "404", client.get("/nope")
    yield "405", client.delete(URL)
    yield "413", put(client, {"p": "x" * 20000})
    yield "415", client.put(URL, data="x")
    yield "healthz", client.get("/healthz")
    yield "readyz", client.get("/readyz")
    yield "options", client.options(URL)
    unavailable = failing_client(StorageUnavailable("down"))
    yield "503", put(unavailable, {"LOYALTY_OPTIN": "accepted"})
    yield "500", put(failing_client(RuntimeError("boom")), {"LOYALTY_OPTIN": "accepted"})


def test_seed_headers_on_every_response(client):
    seen_ids = set()
    for name, response in _responses(client):
        for header, value in SEED.items():
            assert response.headers.get(header) == value, (name, header)
        rid = response.headers["x-amzn-RequestId"]
        assert uuid.UUID(rid).version == 4, name
        assert response.headers["X-Request-Id"] == rid
        seen_ids.add(rid)
    assert len(seen_ids) == 12  # a fresh id per response


def test_seed_header_names_keep_the_seeds_casing(client):
    raw = [name for name, _ in put(client, {"LOYALTY_OPTIN": "accepted"}).headers.to_wsgi_list()]
    for name in ["x-amzn-RequestId", "cache-control", "X-XSS-Protection", "Expect-CT"]:
        assert name in raw
    assert all(name in raw for name, _ in SEED_HEADERS)


def test_https_gets_the_same_headers_and_plain_http_is_not_redirected(client):
    https = put(
        client, {"LOYALTY_OPTIN": "accepted"}, environ_overrides={"wsgi.url_scheme": "https"}
    )
    assert https.status_code == 200
    assert https.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert https.headers.getlist("Strict-Transport-Security") == ["max-age=31536000"]
    plain = put(client, {"LOYALTY_OPTIN": "accepted"})
    assert plain.status_code == 200  # Talisman's force_https would answer 302 here
    assert "Location" not in plain.headers


# --- health and config ------------------------------------------------------------


def test_health_and_readiness(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").get_json() == {"status": "ready"}


def test_default_storage_is_sqlite_in_instance_under_the_working_directory(
    monkeypatch, caplog, tmp_path
):
    # Wherever the package is imported from (source tree, site-packages), as the README
    # says: the service, `optin` and `flask optin` started here share ./instance/optin.db.
    monkeypatch.delenv("OPTIN_STORAGE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="optin_service"):
        app = create_app()
    state = app.extensions["optin"]
    db = tmp_path / "instance" / "optin.db"
    assert state.storage_url == f"sqlite:///{db}"
    assert type(state.store).__name__ == "SQLiteStore"
    assert (tmp_path / "instance").is_dir()  # the default's folder is made on demand
    assert any(str(db) in r.getMessage() for r in caplog.records)
    app.extensions["optin"].store.close()


def test_config_mapping_overrides_environment(monkeypatch):
    monkeypatch.setenv("OPTIN_STORAGE_URL", "nosuch://x")
    app = create_app({"OPTIN_STORAGE_URL": "memory://"})
    assert type(app.extensions["optin"].store).__name__ == "MemoryStore"


def test_bad_number_in_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("OPTIN_MAX_BODY_BYTES", "lots")
    with pytest.raises(ValueError, match="OPTIN_MAX_BODY_BYTES"):
        create_app({"OPTIN_STORAGE_URL": "memory://"})
