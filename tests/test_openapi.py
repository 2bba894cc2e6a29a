"""The OpenAPI document: valid 3.1, complete, and true to the service.

The document is checked for what it says (routes, statuses, headers, patterns,
security per ``OPTIN_AUTH``), and schemathesis fuzzes the app in-process from its
own ``/openapi.json`` with every check it has, positive and negative data, a fixed
seed and at most ``MAX_EXAMPLES`` generated cases per operation and phase.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
import zlib
from urllib.parse import unquote

import jwt
import pytest
import schemathesis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig

from optin_service import OptIn, create_app
from optin_service.api import UPDATED_BODY
from optin_service.feed import MAX_CURSOR
from optin_service.headers import RESPONSE_HEADERS
from optin_service.openapi import build_spec
from optin_service.operation import Operation, Parameter
from optin_service.schemas import CORRELATION_ID, ERROR_CODE_VALUES, HealthSchema, encode_cursor
from optin_service.storage import STATUSES, OptInRecord, StorageUnavailable

OPTIN = "/client/users/{correlation_id}/profile/optin"
HISTORY = OPTIN + "/history"
CHANGES = "/client/optin/changes"
API_OPERATIONS = {("put", OPTIN), ("get", OPTIN), ("get", HISTORY), ("get", CHANGES)}
OPEN_OPERATIONS = {("get", p) for p in ("/healthz", "/readyz", "/metrics", "/openapi.json")}
REQUEST_ID_HEADERS = ("x-amzn-RequestId", "X-Request-Id")

API_KEY = "openapi-test-key-0123456789"
API_KEYS = "tester:" + hashlib.sha256(API_KEY.encode()).hexdigest()
ISSUER = "https://issuer.test/"
AUDIENCE = "optin-api"
PREFIX = "/loyalty"
SEED = 20261126
MAX_EXAMPLES = 25


def make_app(**config) -> Flask:
    return create_app({"TESTING": True, "OPTIN_STORAGE_URL": "memory://", **config})


def host_app(url_prefix: str = PREFIX) -> Flask:
    """A host app mounting the API under a prefix."""
    host = Flask("host")
    host.config.update(TESTING=True, OPTIN_STORAGE_URL="memory://")
    host.add_url_rule("/", "home", lambda: "<h1>shop</h1>")
    OptIn(host, url_prefix=url_prefix)
    return host


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def jwt_app(tmp_path, rsa_key):
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "issuer.pem").write_bytes(pem)
    return make_app(
        OPTIN_AUTH="jwt",
        OPTIN_JWT_PUBLIC_KEY_FILE=str(tmp_path / "issuer.pem"),
        OPTIN_JWT_ISSUER=ISSUER,
        OPTIN_JWT_AUDIENCE=AUDIENCE,
    )


def token(key, scope: str) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "iat": now, "scope": scope}
    return jwt.encode({**claims, "client_id": "crm"}, key, algorithm="RS256")


def spec_of(**config) -> dict:
    return build_spec(make_app(**config))


ALL_MODES = {
    "none": {},
    "api-key": {"OPTIN_AUTH": "api-key", "OPTIN_API_KEYS": API_KEYS},
    "rate-limited": {"OPTIN_RATE_LIMIT": "5/minute"},
    "metrics-off": {"OPTIN_METRICS": False},
}


def operations(spec: dict):
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def resolve(spec: dict, node: dict) -> dict:
    while "$ref" in node:
        kind, name = node["$ref"].split("/")[-2:]
        node = spec["components"][kind][name]
    return node


def validator(spec: dict, schema: dict) -> Draft202012Validator:
    """A JSON Schema validator for ``schema``, resolving the document's components."""
    return Draft202012Validator({**schema, "components": spec["components"]})


# --- the document ------------------------------------------------------------


@pytest.mark.parametrize("mode", sorted(ALL_MODES))
def test_the_document_is_valid_openapi_3_1(mode):
    spec = spec_of(**ALL_MODES[mode])
    assert spec["openapi"] == "3.1.0"
    validate(spec)


def test_the_jwt_document_is_valid_openapi_3_1(jwt_app):
    validate(build_spec(jwt_app))


def test_a_mounted_api_documents_its_real_paths():
    standalone = build_spec(make_app())
    spec = build_spec(host_app())
    validate(spec)
    assert set(spec["paths"]) == {PREFIX + path for path in standalone["paths"]}
    assert "/" not in spec["paths"]  # the host's own page is not the API's


# Rate-limited, Flask-Limiter wraps the views: the wrappers keep their declarations.
@pytest.mark.parametrize(
    "app",
    [make_app(), host_app(), host_app("/a/b/"), make_app(OPTIN_RATE_LIMIT="5/minute")],
    ids=["standalone", "mounted", "mounted-deeper", "rate-limited"],
)
def test_every_route_of_the_blueprint_is_documented_and_nothing_more(app):
    spec = build_spec(app)
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith("optin."):
            path = rule.rule.replace("<", "{").replace(">", "}")
            routes |= {(m.lower(), path) for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert {(method, path) for method, path, _ in operations(spec)} == routes
    assert len(routes) == 8


def test_a_declared_view_is_documented_with_what_every_operation_shares():
    """Adding an endpoint is declaring its operation beside its view: the builder
    adds the headers, the envelopes, and what authentication and limits answer."""
    app = make_app(**ALL_MODES["api-key"], OPTIN_RATE_LIMIT="5/minute")
    thing = Parameter("thing_id", "path", "A thing", re.compile("[a-z]{1,8}"), 8)

    @app.get("/things/<thing_id>")
    @Operation(
        "getThing",
        "A thing",
        tag="consent",
        parameters=[thing],
        ok="The thing",
        returns=HealthSchema,
        errors={404: "No such thing"},
    )
    def get_thing(thing_id):
        return {"status": "ok"}

    spec = build_spec(app)
    validate(spec)
    operation = spec["paths"]["/things/{thing_id}"]["get"]
    assert operation["operationId"] == "getThing"
    assert operation["parameters"] == [{"$ref": "#/components/parameters/thing_id"}]
    param = spec["components"]["parameters"]["thing_id"]
    assert (param["in"], param["schema"]["pattern"]) == ("path", "^[a-z]{1,8}$")
    assert set(operation["responses"]) == {"200", "401", "404", "429", "500"}
    for status, response in operation["responses"].items():
        assert set(response["headers"]) >= {name for name, _ in RESPONSE_HEADERS}, status
    ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/Health"}
    missing = operation["responses"]["404"]["content"]["application/json"]["schema"]
    assert validator(spec, missing).is_valid(
        {"statusCode": 404, "errorCode": "NOT_FOUND", "errorMessage": "x"}
    )
    assert "Retry-After" in operation["responses"]["429"]["headers"]


def test_an_operation_names_a_known_tag():
    with pytest.raises(ValueError, match="tag 'things'"):
        Operation("getThing", "A thing", tag="things", ok="The thing", returns=HealthSchema)


def test_served_compact_as_json_and_built_once_per_app():
    app = make_app()
    client = app.test_client()
    first, second = client.get("/openapi.json"), client.get("/openapi.json")
    assert first.status_code == 200
    assert first.mimetype == "application/json"
    assert first.data == second.data
    assert first.data == json.dumps(json.loads(first.data), separators=(",", ":")).encode()
    assert json.loads(first.data) == build_spec(app)
    assert app.extensions["optin"].openapi == first.data  # built once, then served as kept
    # One document per app: another app with another auth mode gets its own.
    other = make_app(OPTIN_AUTH="api-key", OPTIN_API_KEYS=API_KEYS)
    assert "security" in json.loads(other.test_client().get("/openapi.json").data)
    assert "security" not in json.loads(client.get("/openapi.json").data)


def test_the_document_is_open_and_carries_the_api_headers():
    app = make_app(OPTIN_AUTH="api-key", OPTIN_API_KEYS=API_KEYS)
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    for name, value in RESPONSE_HEADERS:
        assert response.headers[name] == value
    assert uuid.UUID(response.headers["x-amzn-RequestId"]).version == 4


EXPECTED_STATUSES = {
    ("put", OPTIN): {"200", "400", "408", "413", "415", "422", "500", "503"},
    ("get", OPTIN): {"200", "400", "404", "500", "503"},
    ("get", HISTORY): {"200", "400", "404", "500", "503"},
    ("get", CHANGES): {"200", "400", "410", "500", "503"},
    ("get", "/healthz"): {"200", "500"},
    ("get", "/readyz"): {"200", "500", "503"},
    ("get", "/metrics"): {"200", "500"},
    ("get", "/openapi.json"): {"200", "500"},
}


@pytest.mark.parametrize("mode", ["none", "api-key", "jwt", "rate-limited", "metrics-off"])
def test_every_status_each_route_can_give(mode, request):
    if mode == "jwt":
        spec = build_spec(request.getfixturevalue("jwt_app"))
    else:
        spec = spec_of(**ALL_MODES[mode])
    extra = {
        "none": set(),
        "api-key": {"401"},
        "jwt": {"401", "403"},
        "rate-limited": {"429"},
        "metrics-off": set(),
    }[mode]
    for method, path, operation in operations(spec):
        expected = set(EXPECTED_STATUSES[method, path])
        if (method, path) in API_OPERATIONS:
            expected |= extra
        if mode == "metrics-off" and path == "/metrics":
            expected = {"404", "500"}
        assert set(operation["responses"]) == expected, (method, path)


def test_errors_answer_the_envelope_with_their_own_code():
    spec = spec_of(**ALL_MODES["api-key"], OPTIN_RATE_LIMIT="5/minute")
    error = spec["components"]["schemas"]["Error"]
    assert error["required"] == sorted(["statusCode", "errorCode", "errorMessage"])
    assert error["properties"]["statusCode"]["type"] == "integer"
    assert error["properties"]["errorMessage"]["type"] == "string"
    assert error["properties"]["errorCode"]["enum"] == list(ERROR_CODE_VALUES)
    seen = set()
    for _, _, operation in operations(spec):
        for status, response in operation["responses"].items():
            if status.startswith("2"):
                continue
            schema = response["content"]["application/json"]["schema"]
            code = "IDEMPOTENCY_KEY_REUSED" if status == "422" else None
            check = validator(spec, schema)
            body = {"statusCode": int(status), "errorCode": code, "errorMessage": "x"}
            if code is None:
                body["errorCode"] = schema["properties"]["errorCode"]["const"]
            check.validate(body)
            assert not check.is_valid({**body, "statusCode": 599})
            assert not check.is_valid({**body, "errorCode": "SOMETHING_ELSE"})
            assert not check.is_valid({"statusCode": int(status), "errorCode": body["errorCode"]})
            seen.add((status, body["errorCode"]))
    assert seen >= {
        ("400", "INVALID_REQUEST"),
        ("401", "UNAUTHORIZED"),
        ("404", "NOT_FOUND"),
        ("413", "PAYLOAD_TOO_LARGE"),
        ("410", "CURSOR_EXPIRED"),
        ("415", "UNSUPPORTED_MEDIA_TYPE"),
        ("422", "IDEMPOTENCY_KEY_REUSED"),
        ("429", "TOO_MANY_REQUESTS"),
        ("500", "INTERNAL_ERROR"),
        ("503", "SERVICE_UNAVAILABLE"),
    }


def test_any_other_method_is_a_documented_405():
    app = make_app()
    spec = build_spec(app)
    documented = spec["components"]["responses"]["MethodNotAllowed"]
    schema = documented["content"]["application/json"]["schema"]
    for path in ("/healthz", "/openapi.json", OPTIN.format(correlation_id="m1")):
        response = app.test_client().delete(path)
        assert response.status_code == 405
        validator(spec, schema).validate(json.loads(response.data))
        for name in documented["headers"]:
            assert name in response.headers, name


def test_every_response_documents_the_security_headers_and_the_request_id(jwt_app):
    spec = build_spec(jwt_app)
    headers = spec["components"]["headers"]
    for name, value in RESPONSE_HEADERS:
        assert headers[name]["schema"]["const"] == value
        assert headers[name]["required"] is True
    for name in REQUEST_ID_HEADERS:
        assert headers[name]["schema"] == {"type": "string", "format": "uuid"}
    specific = {
        "401": "WWW-Authenticate",
        "403": "WWW-Authenticate",
        "429": "Retry-After",
        "503": "Retry-After",
    }
    for method, path, operation in operations(spec):
        for status, response in operation["responses"].items():
            names = set(response["headers"])
            assert names >= {name for name, _ in RESPONSE_HEADERS} | set(REQUEST_ID_HEADERS)
            if status in specific:
                assert specific[status] in names, (method, path, status)
                assert resolve(spec, response["headers"][specific[status]])["required"]


def test_parameters_carry_the_services_rules():
    spec = spec_of()
    params = spec["components"]["parameters"]
    cid = params["correlation_id"]
    assert (cid["in"], cid["required"]) == ("path", True)
    pattern = re.compile(cid["schema"]["pattern"])  # ECMA-262 and Python agree on this one
    for value in ("a", "...", "a.b", "x" * 128, ".a", "a."):
        assert pattern.search(value), value
    for value in (".", "..", "", "x" * 129, "a b", "a/b"):
        assert not pattern.search(value), value
    source = params["X-Consent-Source"]
    assert (source["in"], source["schema"]["pattern"]) == ("header", "^[A-Za-z0-9_-]{1,32}$")
    key = params["Idempotency-Key"]
    assert key["in"] == "header"
    assert key["schema"]["pattern"] == r"^[\x20-\x7e]{1,255}$"
    assert (key["schema"]["minLength"], key["schema"]["maxLength"]) == (1, 255)
    put = spec["paths"][OPTIN]["put"]
    assert {p["$ref"].rsplit("/", 1)[1] for p in put["parameters"]} == set(params)
    query = {p["name"]: p for p in spec["paths"][HISTORY]["get"]["parameters"] if "name" in p}
    assert query["limit"]["in"] == "query"
    assert query["limit"]["schema"] == {
        "type": "integer",
        "default": 20,
        "minimum": 1,
        "maximum": 100,
    }
    assert query["cursor"]["schema"] == {"type": "string", "minLength": 1}
    feed = {p["name"]: p for p in spec["paths"][CHANGES]["get"]["parameters"]}
    assert set(feed) == {"after", "limit"}
    assert feed["limit"]["schema"] == {
        "type": "integer",
        "default": 100,
        "minimum": 1,
        "maximum": 1000,
    }
    assert feed["after"]["schema"] == {"type": "string", "minLength": 1, "maxLength": MAX_CURSOR}
    assert not feed["after"]["required"] and not feed["limit"]["required"]


def test_bodies_come_from_the_marshmallow_schemas():
    spec = spec_of()
    schemas = spec["components"]["schemas"]
    put = spec["paths"][OPTIN]["put"]
    body = put["requestBody"]["content"]["application/json"]["schema"]
    request = resolve(spec, body)
    assert request["required"] == ["LOYALTY_OPTIN"]
    assert request["properties"]["LOYALTY_OPTIN"]["enum"] == list(STATUSES)
    assert "additionalProperties" not in request  # unknown keys are ignored
    updated = put["responses"]["200"]["content"]["application/json"]["schema"]
    check = validator(spec, updated)
    check.validate(json.loads(UPDATED_BODY))
    assert not check.is_valid({"message": "Opt-in updated"})
    assert not check.is_valid({})
    state = schemas["OptInState"]
    assert state["required"] == ["LOYALTY_OPTIN", "updatedAt"]
    assert state["properties"]["updatedAt"]["format"] == "date-time"
    page = schemas["HistoryPage"]
    assert page["properties"]["items"]["items"] == {"$ref": "#/components/schemas/HistoryItem"}
    assert page["properties"]["next"]["type"] == ["string", "null"]
    assert {"requestId", "source"} <= set(schemas["HistoryItem"]["required"])
    changes = schemas["ChangesPage"]
    assert changes["required"] == ["items", "next"]
    assert changes["properties"]["items"]["items"] == {"$ref": "#/components/schemas/Change"}
    change = schemas["Change"]
    assert sorted(change["required"]) == sorted(
        [
            "correlationId",
            "LOYALTY_OPTIN",
            "previous",
            "updatedAt",
            "requestId",
            "source",
            "client",
            "version",
        ]
    )
    assert change["properties"]["previous"]["type"] == ["string", "null"]
    check = validator(spec, {"$ref": "#/components/schemas/Change"})
    first = {
        "correlationId": "m1",
        "LOYALTY_OPTIN": "accepted",
        "previous": None,
        "updatedAt": "2026-11-26T12:00:00.123456Z",
        "requestId": "r1",
        "source": "API",
        "client": "",
        "version": 1,
    }
    check.validate(first)
    assert not check.is_valid({**first, "previous": "maybe"})
    assert not check.is_valid({**first, "version": 0})
    health = spec["paths"]["/healthz"]["get"]["responses"]["200"]["content"]["application/json"]
    assert validator(spec, health["schema"]).is_valid({"status": "ok"})
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]


def test_no_security_without_authentication():
    spec = spec_of()
    assert "security" not in spec
    assert "securitySchemes" not in spec["components"]
    assert all("security" not in operation for _, _, operation in operations(spec))


def test_api_keys_as_bearer_or_x_api_key():
    spec = spec_of(**ALL_MODES["api-key"])
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert schemes["apiKeyAuth"] == {
        **schemes["apiKeyAuth"],
        "type": "apiKey",
        "in": "header",
        "name": "x-api-key",
    }
    assert spec["security"] == [{"bearerAuth": []}, {"apiKeyAuth": []}]  # either one
    for method, path, operation in operations(spec):
        if (method, path) in OPEN_OPERATIONS:
            assert operation["security"] == []
        else:
            assert "security" not in operation  # the document's own


def test_jwt_bearer_with_a_scope_per_method(jwt_app):
    spec = build_spec(jwt_app)
    scheme = spec["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"], scheme["bearerFormat"]) == ("http", "bearer", "JWT")
    assert "optin:write" in scheme["description"] and "optin:read" in scheme["description"]
    assert ISSUER in scheme["description"]
    for method, path, operation in operations(spec):
        if (method, path) in OPEN_OPERATIONS:
            assert operation["security"] == []
        else:
            scope = "optin:write" if method == "put" else "optin:read"
            assert operation["security"] == [{"bearerAuth": [scope]}]


# --- responses the fuzzing below cannot provoke, checked by schemathesis -----


def check(app: Flask, method: str, path: str, *, headers=None, **case) -> int:
    """Call one documented operation of ``app`` and run every schemathesis check on it."""
    schema = schemathesis.openapi.from_wsgi(
        "/openapi.json", app, config=SchemathesisConfig()
    ).include(path_regex="^/")
    operation = schema[path][method.upper()]
    made = operation.Case(**case)
    response = made.call(headers=headers)
    # A 503 provoked on purpose is no server bug, but must still be as documented.
    excluded = [not_a_server_error] if response.status_code == 503 else []
    made.validate_response(response, headers=headers, excluded_checks=excluded)
    return response.status_code


def test_jwt_answers_conform(jwt_app, rsa_key):
    both = {"Authorization": f"Bearer {token(rsa_key, 'optin:read optin:write')}"}
    read = {"Authorization": f"Bearer {token(rsa_key, 'optin:read')}"}
    put = {"path_parameters": {"correlation_id": "m1"}, "body": {"LOYALTY_OPTIN": "accepted"}}
    assert check(jwt_app, "put", OPTIN, headers=both, **put) == 200
    assert check(jwt_app, "put", OPTIN, headers=read, **put) == 403
    assert check(jwt_app, "put", OPTIN, **put) == 401
    get = {"path_parameters": {"correlation_id": "m1"}}
    assert check(jwt_app, "get", HISTORY, headers=read, **get) == 200
    assert check(jwt_app, "get", CHANGES, headers=read) == 200
    write = {"Authorization": f"Bearer {token(rsa_key, 'optin:write')}"}
    assert check(jwt_app, "get", CHANGES, headers=write) == 403
    assert check(jwt_app, "get", OPTIN, headers={"Authorization": "Bearer x"}, **get) == 401
    assert check(jwt_app, "get", "/healthz") == 200


def test_a_rate_limited_answer_conforms():
    app = make_app(OPTIN_RATE_LIMIT="2/minute")
    get = {"path_parameters": {"correlation_id": "m1"}}
    statuses = [check(app, "get", OPTIN, **get) for _ in range(3)]
    assert statuses == [404, 404, 429]
    assert check(app, "get", "/readyz") == 200  # never limited


def test_storage_down_answers_conform(monkeypatch):
    app = make_app()

    def down(*args, **kwargs):
        raise StorageUnavailable("down")

    store = app.extensions["optin"].store
    for name in ("get", "set", "history", "changes", "check"):
        monkeypatch.setattr(store, name, down)
    get = {"path_parameters": {"correlation_id": "m1"}}
    assert check(app, "get", OPTIN, **get) == 503
    assert check(app, "get", HISTORY, **get) == 503
    assert check(app, "get", CHANGES) == 503
    put = {**get, "body": {"LOYALTY_OPTIN": "declined"}}
    assert check(app, "put", OPTIN, **put) == 503
    assert check(app, "get", "/readyz") == 503


def test_an_expired_cursor_answers_conform():
    app = make_app()
    store = app.extensions["optin"].store
    store.set(OptInRecord.now("m1", "accepted", "r1"))
    before = store.changes(None, 1).next
    store.rebuild_changes()
    assert check(app, "get", CHANGES, query={"after": before}) == 410
    assert check(app, "get", CHANGES, query={"after": store.changes(None, 1).next}) == 200


def test_metrics_off_answers_conform():
    assert check(make_app(OPTIN_METRICS=False), "get", "/metrics") == 404


# --- schemathesis: the whole API, fuzzed from its own document ---------------


def fuzz_config(**extra) -> SchemathesisConfig:
    # A schema-valid PUT may reuse an Idempotency-Key with another answer: 422.
    accepted = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
    return SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True},
            "checks": {
                "enabled": True,
                "positive_data_acceptance": {"expected-statuses": accepted},
            },
            **extra,
        }
    )


def fuzzed(path: str, app: Flask, **extra):
    # The explicit filter brings in GET /openapi.json, which schemathesis
    # otherwise leaves out as the endpoint that served the document.
    schema = schemathesis.openapi.from_wsgi(path, app, config=fuzz_config(**extra))
    return schema.include(path_regex="^/")


# Schemathesis' pytest integration loads a schema at import (its lazy,
# fixture-based loader fails under pytest 9), so these apps live with the module.
NONE_APP = make_app()
API_KEY_APP = make_app(**ALL_MODES["api-key"])
HOST_APP = host_app()
none_schema = fuzzed("/openapi.json", NONE_APP)
api_key_schema = fuzzed(
    "/openapi.json", API_KEY_APP, auth={"openapi": {"apiKeyAuth": {"api_key": API_KEY}}}
)
mounted_schema = fuzzed(PREFIX + "/openapi.json", HOST_APP)


def call_and_validate(case, app: Flask) -> None:
    """Make most members exist and give real cursors, then call and run every check.

    Three members in four get two events first, so reads answer 200 (and their
    bodies are checked) as well as 404. A cursor is opaque: in positive cases the
    generated one is replaced by one the service gave out.
    """
    cid = (case.path_parameters or {}).get("correlation_id")
    if isinstance(cid, str):
        cid = unquote(cid)  # some phases hand it over percent-encoded
    if isinstance(cid, str) and CORRELATION_ID.fullmatch(cid):
        store = app.extensions["optin"].store
        if zlib.crc32(cid.encode()) % 4 and store.get(cid) is None:
            for status in STATUSES:
                store.set(OptInRecord.now(cid, status, str(uuid.uuid4()), "SEED"))
        positive = case.meta is not None and case.meta.generation.mode.is_positive
        if positive and case.query and "cursor" in case.query:
            events = store.history(cid, 1, None)
            case.query["cursor"] = encode_cursor(events[0].position if events else (0, "-"))
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if positive and case.query and "after" in case.query:
        store = app.extensions["optin"].store
        case.query["after"] = store.changes(None, 1).next  # the position after a change, if any
    case.call_and_validate()


@none_schema.parametrize()
def test_the_service_conforms_to_its_document(case):
    call_and_validate(case, NONE_APP)


@api_key_schema.parametrize()
def test_the_service_conforms_to_its_document_with_api_keys(case):
    call_and_validate(case, API_KEY_APP)


@mounted_schema.parametrize()
def test_a_mounted_api_conforms_to_its_document(case):
    call_and_validate(case, HOST_APP)
