"""Authentication (none, api-key, jwt) and rate limits."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from optin_service import create_app
from optin_service.schemas import dump_event, load_event
from optin_service.storage import StorageUnavailable
from tests.servers import LOOPBACK, Gunicorn, until_every_worker_answered
from tests.test_api import PATH, envelope, put

URL = PATH.format("member-1")
KEY = "s3cret-key-for-tests"
OTHER_KEY = "another-key"
ISSUER = "https://issuer.test/"
AUDIENCE = "optin-api"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def app_with(**config):
    return create_app({"OPTIN_STORAGE_URL": "memory://", **config})


@pytest.fixture
def key_client():
    app = app_with(OPTIN_AUTH="api-key", OPTIN_API_KEYS=f"pos:{sha(KEY)}, crm:{sha(OTHER_KEY)}")
    return app.test_client()


def test_none_warns_that_a_gateway_must_authenticate(caplog):
    client = app_with().test_client()
    assert put(client, {"LOYALTY_OPTIN": "accepted"}).status_code == 200
    assert any("gateway" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}, {"Authorization": f"bearer {KEY}"}],
)
def test_api_key_accepted_either_way_and_recorded(key_client, headers):
    assert put(key_client, {"LOYALTY_OPTIN": "accepted"}, headers=headers).status_code == 200
    items = key_client.get(URL + "/history", headers=headers).get_json()["items"]
    assert items[0]["client"] == "pos"


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({}, "missing"),
        ({"Authorization": "Bearer wrong"}, "wrong"),
        ({"x-api-key": "wrong"}, "wrong"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "malformed"),
        ({"Authorization": "Bearer"}, "malformed"),
        ({"Authorization": "Bearer clé-ünïcode"}, "non-ASCII"),
        ({"x-api-key": "ключ"}, "non-ASCII"),
        ({"x-api-key": KEY + " "}, "wrong"),
    ],
)
def test_api_key_failures_are_401_with_a_challenge(key_client, headers, why):
    for response in (
        put(key_client, {"LOYALTY_OPTIN": "accepted"}, headers=headers),
        key_client.get(URL, headers=headers),
        key_client.get(URL + "/history", headers=headers),
    ):
        assert response.status_code == 401, why
        assert envelope(response)["errorCode"] == "UNAUTHORIZED"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert key_client.get(URL, headers={"x-api-key": KEY}).status_code == 404  # nothing stored


def test_open_endpoints_need_no_credentials(key_client):
    for path in ("/healthz", "/readyz", "/metrics"):
        assert key_client.get(path).status_code == 200, path


@pytest.mark.parametrize("entries", ["pos", "pos:abc", f"bad name:{sha(KEY)}", ""])
def test_bad_key_configuration_stops_start_up(entries):
    with pytest.raises(ValueError, match="OPTIN_API_KEYS"):
        app_with(OPTIN_AUTH="api-key", OPTIN_API_KEYS=entries)


def test_unknown_auth_mode_stops_start_up():
    with pytest.raises(ValueError, match="OPTIN_AUTH"):
        app_with(OPTIN_AUTH="basic")


# --- JWT ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def jwks_server(rsa_key):
    """A JWKS document served from loopback, as an issuer would."""
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    body = json.dumps({"keys": [jwk | {"kid": "k1", "use": "sig", "alg": "RS256"}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer((LOOPBACK, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{LOOPBACK}:{server.server_port}/.well-known/jwks.json"
    server.shutdown()


def token(key, *, kid="k1", alg="RS256", **claims):
    payload = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": int(time.time()) + 300,
        "client_id": "crm-sync",
        "scope": "optin:read optin:write",
    } | claims
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid})


@pytest.fixture
def jwt_client(jwks_server):
    app = app_with(
        OPTIN_AUTH="jwt",
        OPTIN_JWT_JWKS_URL=jwks_server,
        OPTIN_JWT_ISSUER=ISSUER,
        OPTIN_JWT_AUDIENCE=AUDIENCE,
    )
    return app.test_client()


def bearer(value):
    return {"Authorization": f"Bearer {value}"}


def test_jwt_with_both_scopes_reads_and_writes_and_is_recorded(jwt_client, rsa_key):
    headers = bearer(token(rsa_key))
    assert put(jwt_client, {"LOYALTY_OPTIN": "declined"}, headers=headers).status_code == 200
    assert jwt_client.get(URL, headers=headers).get_json()["LOYALTY_OPTIN"] == "declined"
    assert jwt_client.get(URL + "/history", headers=headers).get_json()["items"][0]["client"] == (
        "crm-sync"
    )


@pytest.mark.parametrize(
    ("client_id", "recorded"),
    [
        ("Zo\u00eb CRM", "Zo\\u00eb CRM"),
        ('evil"name\n' * 20, ('evil"name\\n' * 20)[:128]),
        ("x" * 200, "x" * 128),
        ("x" * 127 + "\u00e9", "x" * 127),  # no half escape at the cut
        (12345, "12345"),
    ],
)
def test_jwt_client_is_recorded_as_export_and_import_carry_it(
    jwt_client, rsa_key, client_id, recorded
):
    headers = bearer(token(rsa_key, client_id=client_id))
    assert put(jwt_client, {"LOYALTY_OPTIN": "declined"}, headers=headers).status_code == 200
    store = jwt_client.application.extensions["optin"].store
    [event] = store.history("member-1", 10)
    assert event.client == recorded
    assert load_event(json.dumps(dump_event(event))) == event  # the export line imports


def test_jwt_client_falls_back_to_azp_when_client_id_is_not_a_string(jwt_client, rsa_key):
    headers = bearer(token(rsa_key, client_id={"a": 1}, azp="crm-sync"))
    assert put(jwt_client, {"LOYALTY_OPTIN": "declined"}, headers=headers).status_code == 200
    [event] = jwt_client.application.extensions["optin"].store.history("member-1", 10)
    assert event.client == "crm-sync"


def test_jwt_client_that_is_not_a_string_is_refused(jwt_client, rsa_key):
    headers = bearer(token(rsa_key, client_id={"a": 1}))
    response = put(jwt_client, {"LOYALTY_OPTIN": "declined"}, headers=headers)
    assert response.status_code == 401
    assert "not a string" in envelope(response)["errorMessage"]
    assert jwt_client.application.extensions["optin"].store.get("member-1") is None


def test_jwt_scopes_decide_between_read_and_write(jwt_client, rsa_key):
    reader = bearer(token(rsa_key, scope="optin:read"))
    writer = bearer(token(rsa_key, scope="optin:write"))
    assert put(jwt_client, {"LOYALTY_OPTIN": "accepted"}, headers=writer).status_code == 200
    denied = put(jwt_client, {"LOYALTY_OPTIN": "declined"}, headers=reader)
    assert denied.status_code == 403
    assert envelope(denied)["errorCode"] == "FORBIDDEN"
    assert 'error="insufficient_scope"' in denied.headers["WWW-Authenticate"]
    assert jwt_client.get(URL, headers=reader).get_json()["LOYALTY_OPTIN"] == "accepted"
    assert jwt_client.get(URL, headers=writer).status_code == 403
    assert jwt_client.get(URL + "/history", headers=writer).status_code == 403


def _with_claims(key, **claims):
    """A token with exactly these scope claims (``None`` stays a JSON null)."""
    payload = {"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 300, "client_id": "c"}
    return jwt.encode(payload | claims, key, algorithm="RS256", headers={"kid": "k1"})


@pytest.mark.parametrize(
    "claims",
    [
        {"scope": None},
        {"scope": 5},
        {"scope": True},
        {"scope": {"optin:read": False, "optin:write": False}},
        {"scope": ["optin:read", "optin:write"]},  # scope is a string (RFC 8693)
        {"scope": None, "scp": "optin:read optin:write"},  # scope decides when present
        {"scp": None},
        {"scp": 5},
        {"scp": {"optin:read": 1, "optin:write": 1}},
        {"scp": ["optin:read", "optin:write", 5]},
        {"scp": [["optin:read", "optin:write"]]},
    ],
    ids=repr,
)
def test_a_scope_claim_of_the_wrong_type_grants_nothing(jwt_client, rsa_key, claims):
    headers = bearer(_with_claims(rsa_key, **claims))
    for response in (
        put(jwt_client, {"LOYALTY_OPTIN": "declined"}, headers=headers),
        jwt_client.get(URL, headers=headers),
    ):
        assert response.status_code == 403, response.data
        assert envelope(response)["errorCode"] == "FORBIDDEN"
    assert jwt_client.application.extensions["optin"].store.get("member-1") is None


@pytest.mark.parametrize(
    "claims",
    [{"scope": "optin:read optin:write"}, {"scp": "optin:read optin:write"},
     {"scp": ["optin:read", "optin:write"]}],
    ids=repr,
)  # fmt: skip
def test_scopes_as_a_string_or_an_scp_list_of_strings(jwt_client, rsa_key, claims):
    headers = bearer(_with_claims(rsa_key, **claims))
    assert put(jwt_client, {"LOYALTY_OPTIN": "declined"}, headers=headers).status_code == 200
    assert jwt_client.get(URL, headers=headers).status_code == 200


def _other_rsa():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda k: token(k, exp=int(time.time()) - 3600), id="expired"),
        pytest.param(lambda k: token(k, aud="someone-else"), id="wrong-audience"),
        pytest.param(lambda k: token(k, iss="https://evil.test/"), id="wrong-issuer"),
        pytest.param(lambda k: token(k, exp=None), id="no-exp"),
        pytest.param(lambda k: token(_other_rsa()), id="wrong-signature"),
        pytest.param(lambda k: token(k, kid="unknown"), id="unknown-kid"),
        pytest.param(lambda k: token(k)[:-8] + "AAAAAAAA", id="tampered"),
        pytest.param(lambda k: "not.a.jwt", id="malformed"),
        pytest.param(lambda k: "héhé", id="non-ascii"),
        pytest.param(
            lambda k: jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "exp": 2**40}, "x" * 32, "HS256"),
            id="hs256-forgery",
        ),
        pytest.param(
            lambda k: token(ec.generate_private_key(ec.SECP256R1()), alg="ES256"),
            id="other-algorithm-key",
        ),
    ],
)
def test_bad_tokens_are_401(jwt_client, rsa_key, make):
    response = put(jwt_client, {"LOYALTY_OPTIN": "accepted"}, headers=bearer(make(rsa_key)))
    assert response.status_code == 401
    assert envelope(response)["errorCode"] == "UNAUTHORIZED"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_missing_token_is_401_without_error_code(jwt_client):
    response = jwt_client.get(URL)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="optin"'


@pytest.mark.parametrize(
    ("make_key", "alg"),
    [
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "PS256"),
        # An EC key's class is ECPublicKey, not EllipticCurvePublicKey: every ES256
        # token was refused ("It is required that you pass in a value for algorithms").
        (lambda: ec.generate_private_key(ec.SECP256R1()), "ES256"),
        (lambda: ec.generate_private_key(ec.SECP384R1()), "ES384"),
        (ed25519.Ed25519PrivateKey.generate, "EdDSA"),
    ],
)
def test_jwt_with_a_pem_public_key_file(tmp_path, make_key, alg):
    key, other = make_key(), make_key()
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "issuer.pem").write_bytes(pem)
    client = app_with(
        OPTIN_AUTH="jwt",
        OPTIN_JWT_PUBLIC_KEY_FILE=str(tmp_path / "issuer.pem"),
        OPTIN_JWT_ISSUER=ISSUER,
        OPTIN_JWT_AUDIENCE=AUDIENCE,
        OPTIN_JWT_ALGORITHMS="RS256,PS256,ES256,ES384,EdDSA",
    ).test_client()
    assert client.get("/healthz").status_code == 200
    body = {"LOYALTY_OPTIN": "accepted"}
    assert put(client, body, headers=bearer(token(key, alg=alg))).status_code == 200
    assert put(client, body, headers=bearer(token(other, alg=alg))).status_code == 401


def test_a_pem_key_no_configured_algorithm_verifies_refuses_to_start(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "issuer.pem").write_bytes(pem)
    with pytest.raises(ValueError, match=r"none of OPTIN_JWT_ALGORITHMS \(RS256\) verifies"):
        app_with(
            OPTIN_AUTH="jwt",
            OPTIN_JWT_PUBLIC_KEY_FILE=str(tmp_path / "issuer.pem"),
            OPTIN_JWT_ISSUER=ISSUER,
            OPTIN_JWT_AUDIENCE=AUDIENCE,
            OPTIN_JWT_ALGORITHMS="RS256",
        )


def test_unreachable_jwks_is_503_not_401(rsa_key):
    from tests.servers import free_port

    client = app_with(
        OPTIN_AUTH="jwt",
        OPTIN_JWT_JWKS_URL=f"http://{LOOPBACK}:{free_port()}/jwks.json",
        OPTIN_JWT_ISSUER=ISSUER,
        OPTIN_JWT_AUDIENCE=AUDIENCE,
        OPTIN_RETRY_AFTER_SECONDS=3,
    ).test_client()
    response = client.get(URL, headers=bearer(token(rsa_key)))
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "3"  # the setting, as for storage (was 5 always)


@pytest.mark.parametrize(
    "config",
    [
        {"OPTIN_JWT_ISSUER": ISSUER, "OPTIN_JWT_AUDIENCE": AUDIENCE},
        {"OPTIN_JWT_PUBLIC_KEY_FILE": "/x.pem", "OPTIN_JWT_AUDIENCE": AUDIENCE},
        {"OPTIN_JWT_PUBLIC_KEY_FILE": "/x.pem", "OPTIN_JWT_ISSUER": ISSUER},
        {
            "OPTIN_JWT_JWKS_URL": "http://127.0.0.1:1/",
            "OPTIN_JWT_ISSUER": ISSUER,
            "OPTIN_JWT_AUDIENCE": AUDIENCE,
            "OPTIN_JWT_ALGORITHMS": "HS256",
        },
    ],
)
def test_incomplete_jwt_configuration_stops_start_up(config):
    with pytest.raises(ValueError, match="OPTIN_"):
        app_with(OPTIN_AUTH="jwt", **config)


# --- rate limits ------------------------------------------------------------------------


@pytest.mark.parametrize("rate", ["3/minut", "lots", "3 per fortnight", "/minute"])
def test_a_rate_limit_that_is_not_one_refuses_to_start(rate):
    """Flask-Limiter logged an ERROR per request and let every request through."""
    with pytest.raises(ValueError, match=r"OPTIN_RATE_LIMIT=.* is not a rate such as 100/minute"):
        app_with(OPTIN_RATE_LIMIT=rate)


def test_rate_limit_per_client_with_envelope_and_retry_after():
    app = app_with(
        OPTIN_AUTH="api-key",
        OPTIN_API_KEYS=f"pos:{sha(KEY)},crm:{sha(OTHER_KEY)}",
        OPTIN_RATE_LIMIT="3/minute",
    )
    client = app.test_client()
    pos, crm = {"x-api-key": KEY}, {"x-api-key": OTHER_KEY}
    codes = [put(client, {"LOYALTY_OPTIN": "accepted"}, headers=pos).status_code for _ in range(3)]
    assert codes == [200, 200, 200]
    limited = client.get(URL, headers=pos)
    assert limited.status_code == 429
    assert envelope(limited)["errorCode"] == "TOO_MANY_REQUESTS"
    assert 0 < int(limited.headers["Retry-After"]) <= 60
    assert limited.headers["x-amzn-RequestId"] and limited.headers["Referrer-Policy"]
    assert client.get(URL, headers=crm).status_code == 200  # another client has its own count
    assert client.get("/healthz").status_code == 200  # never limited


def test_rate_limit_leaves_retry_after_to_429_and_to_the_apis_own_503():
    app = app_with(OPTIN_RATE_LIMIT="100/minute", OPTIN_RETRY_AFTER_SECONDS=2)
    client = app.test_client()
    ok = put(client, {"LOYALTY_OPTIN": "accepted"})
    assert ok.status_code == 200 and ok.headers["X-RateLimit-Limit"] == "100"
    assert "Retry-After" not in ok.headers
    store = app.extensions["optin"].store

    def down(*args, **kwargs):
        raise StorageUnavailable("down")

    store.get = down
    unavailable = client.get(URL)
    assert unavailable.status_code == 503 and unavailable.headers["Retry-After"] == "2"


def test_rate_limit_per_address_without_authentication_and_proxyfix():
    app = app_with(OPTIN_RATE_LIMIT="2/minute", OPTIN_TRUSTED_PROXIES=1)
    client = app.test_client()

    def from_(address):
        return client.get(URL, headers={"X-Forwarded-For": address}).status_code

    assert [from_("203.0.113.5") for _ in range(3)] == [404, 404, 429]
    assert from_("203.0.113.6") == 404


def test_forwarded_for_is_ignored_without_trusted_proxies():
    client = app_with(OPTIN_RATE_LIMIT="2/minute").test_client()
    codes = [
        client.get(URL, headers={"X-Forwarded-For": f"10.9.9.{i}"}).status_code for i in range(3)
    ]
    assert codes == [404, 404, 429]


def test_a_redis_counter_store_gets_the_storage_backends_timeouts():
    from backends.redis import CONNECT_TIMEOUT, SOCKET_TIMEOUT
    from optin_service.ratelimit import REDIS_OPTIONS

    assert REDIS_OPTIONS == {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
    }


@pytest.mark.slow
@pytest.mark.redis_server
def test_a_limit_holds_across_two_gunicorn_workers_sharing_redis(tmp_path, redis_server):
    env = {
        "OPTIN_STORAGE_URL": f"sqlite:///{tmp_path}/optin.db",
        "OPTIN_AUTH": "api-key",
        "OPTIN_API_KEYS": f"pos:{sha(KEY)}",
        "OPTIN_RATE_LIMIT": "10/minute",
        "OPTIN_RATE_LIMIT_STORAGE_URL": redis_server.url.rsplit("/", 1)[0] + "/3",
    }
    import requests

    gunicorn = Gunicorn(env, workers=2).start(tmp_path / "gunicorn.log")
    try:
        codes = []

        def put(i: int) -> None:
            response = requests.put(  # a new connection each time: either worker may answer
                f"{gunicorn.base}/client/users/r{i}/profile/optin",
                json={"LOYALTY_OPTIN": "accepted"},
                headers={"x-api-key": KEY},
                timeout=5,
            )
            codes.append(response.status_code)

        # Per-worker counters would let 10 through in each worker: both must answer.
        sent = until_every_worker_answered(gunicorn, put, at_least=16)
        assert codes.count(200) == 10 and codes.count(429) == sent - 10, codes
        assert {line["pid"] for line in gunicorn.access_lines()} == set(gunicorn.worker_pids())
    finally:
        gunicorn.stop()
