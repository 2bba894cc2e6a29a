"""Embedding: the API inside a host app changes none of the host's own responses."""

from __future__ import annotations

import gc
import json
from typing import ClassVar

import pytest
from flask import Flask, g
from flask_talisman import Talisman

from backends.memory import MemoryStore
from examples.host_app import create_host_app
from optin_service import OptIn, create_app, registry
from tests.test_api import OK_BODY, SEED

OPTIN = "/loyalty/client/users/m1/profile/optin"

HOST_REQUESTS = [
    ("GET", "/", None),
    ("GET", "/api/profile", None),
    ("GET", "/missing", None),
    ("GET", "/client/users/m1/profile/optin", None),  # not the API's: it lives under /loyalty
    ("POST", "/", None),
    ("PUT", "/api/profile", b"{}"),
    ("GET", "/loyaltyish", None),
    ("HEAD", "/", None),
]


def snapshot(client, method, path, body):
    response = client.open(path, method=method, data=body)
    return response.status_code, sorted(response.headers.items()), response.data


def test_host_responses_are_byte_identical_with_and_without_the_api():
    without = create_host_app(with_optin=False).test_client()
    with_api = create_host_app(store=MemoryStore()).test_client()
    for method, path, body in HOST_REQUESTS:
        before = snapshot(without, method, path, body)
        after = snapshot(with_api, method, path, body)
        assert after == before, (method, path)
    # The host's pages kept their own look, not the API's.
    home = with_api.get("/")
    assert "default-src 'self'" in home.headers["Content-Security-Policy"]
    assert "x-amzn-RequestId" not in home.headers
    missing = with_api.get("/missing")
    assert missing.mimetype == "text/html" and b"No such page" in missing.data
    assert with_api.get("/api/profile").data.startswith(b'{\n  "name": "Ada"')


def test_the_api_keeps_its_full_contract_under_the_prefix():
    client = create_host_app(store=MemoryStore()).test_client()
    ok = client.put(OPTIN, json={"LOYALTY_OPTIN": "accepted"})
    assert ok.status_code == 200 and ok.data == OK_BODY
    bad = client.put(OPTIN, json={})
    assert bad.data == (
        b'{"statusCode":400,"errorCode":"INVALID_REQUEST",'
        b'"errorMessage":"LOYALTY_OPTIN missing from body"}'
    )
    got = client.get(OPTIN)
    assert list(json.loads(got.data)) == ["LOYALTY_OPTIN", "updatedAt"]  # not the host's JSON
    assert b"\n" not in got.data
    responses = {
        "200": ok,
        "400": bad,
        "get": got,
        "404 route": client.get("/loyalty/nope"),
        "404 member": client.get("/loyalty/client/users/nobody/profile/optin"),
        "405": client.delete(OPTIN),
        "413": client.put(OPTIN, json={"LOYALTY_OPTIN": "accepted", "p": "x" * 20000}),
        "415": client.put(OPTIN, data="x", content_type="text/plain"),
        "healthz": client.get("/loyalty/healthz"),
        "readyz": client.get("/loyalty/readyz"),
    }
    for name, response in responses.items():
        for header, value in SEED.items():
            assert response.headers.get(header) == value, (name, header)
        assert response.headers["x-amzn-RequestId"] == response.headers["X-Request-Id"]
        if response.status_code >= 400:
            body = json.loads(response.data)
            assert body["statusCode"] == response.status_code, name
    assert responses["405"].headers["Allow"]
    assert json.loads(responses["404 route"].data)["errorCode"] == "NOT_FOUND"


@pytest.mark.parametrize("talisman_first", [True, False], ids=["talisman-first", "optin-first"])
def test_seed_values_win_over_a_host_talisman_whatever_the_order(talisman_first):
    app = Flask("host")

    def host_talisman():
        Talisman(app, force_https=True, frame_options="DENY", content_security_policy={"a": "b"})

    if talisman_first:
        host_talisman()
    OptIn(app, store=MemoryStore(), url_prefix="/loyalty")
    if not talisman_first:
        host_talisman()
    app.get("/page")(lambda: "page")
    client = app.test_client()
    response = client.put(OPTIN, json={"LOYALTY_OPTIN": "declined"})
    # No redirect to https for the API (a 302 on a PUT is replayed as a GET)...
    assert response.status_code == 200
    assert response.headers["X-Frame-Options"] == "sameorigin"
    assert response.headers["Content-Security-Policy"] == SEED["Content-Security-Policy"]
    # ...while the host's own page keeps its policy, redirect included.
    page = client.get("/page")
    assert page.status_code == 302
    https_page = client.get("/page", base_url="https://localhost")
    assert https_page.headers["X-Frame-Options"] == "DENY"
    assert https_page.headers["Content-Security-Policy"] == "a b"


def test_mounted_at_the_root_only_the_api_paths_are_the_apis():
    app = create_host_app(store=MemoryStore(), url_prefix="")
    client = app.test_client()
    assert (
        client.put("/client/users/m1/profile/optin", json={"LOYALTY_OPTIN": "accepted"}).data
        == OK_BODY
    )
    api_404 = client.get("/client/users/m1/profile")
    assert api_404.status_code == 404 and api_404.mimetype == "application/json"
    host_404 = client.get("/elsewhere")
    assert host_404.mimetype == "text/html"
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/healthz/").mimetype == "application/json"  # under the API's path
    # Paths that only start like the API's are the host's: its 404 page, no API headers.
    for path in ("/healthzzz", "/metricsdashboard", "/readyz-db", "/openapi.json5"):
        response = client.get(path)
        assert response.status_code == 404 and response.mimetype == "text/html", path
        assert "x-amzn-RequestId" not in response.headers, path


def test_a_hosts_own_error_pages_and_hooks_leave_the_api_its_errors():
    app = Flask(__name__)

    @app.before_request
    def start_timer():
        g.host_started = 1.0

    @app.after_request
    def read_timer(response):
        response.headers["X-Host-Timer"] = str(g.host_started)  # needs its before_request
        return response

    @app.errorhandler(400)
    @app.errorhandler(404)
    @app.errorhandler(405)
    @app.errorhandler(413)
    def host_page(error):
        return f"<html>host {error.code}</html>", error.code

    OptIn(app, store=MemoryStore(), url_prefix="/loyalty")
    client = app.test_client()
    too_big = client.put(
        OPTIN, data=b'{"LOYALTY_OPTIN": "' + b"x" * 20_000 + b'"}', content_type="application/json"
    )
    wrong_method = client.post(OPTIN, json={"LOYALTY_OPTIN": "accepted"})
    no_route = client.put(OPTIN + "/", json={"LOYALTY_OPTIN": "accepted"})
    for response, status in ((too_big, 413), (wrong_method, 405), (no_route, 404)):
        assert response.status_code == status and response.mimetype == "application/json"
        assert "x-amzn-RequestId" in response.headers
        assert response.headers["X-Host-Timer"] == "1.0"
    assert client.get("/loyalty/client/users/m1/profile/optin").status_code == 404  # nothing set
    assert client.get("/nowhere").data == b"<html>host 404</html>"  # the host's own page


def test_two_apps_in_one_process_keep_their_own_data():
    shared = OptIn()
    first, second = Flask("first"), Flask("second")
    shared.init_app(first, store=MemoryStore())
    shared.init_app(second, store=MemoryStore())
    a, b = first.test_client(), second.test_client()
    a.put("/client/users/m1/profile/optin", json={"LOYALTY_OPTIN": "accepted"})
    b.put("/client/users/m1/profile/optin", json={"LOYALTY_OPTIN": "declined"})
    assert a.get("/client/users/m1/profile/optin").get_json()["LOYALTY_OPTIN"] == "accepted"
    assert b.get("/client/users/m1/profile/optin").get_json()["LOYALTY_OPTIN"] == "declined"
    with first.app_context():
        assert shared.store is first.extensions["optin"].store
    assert first.extensions["optin"].store is not second.extensions["optin"].store


def test_two_standalone_apps_on_separate_sqlite_files(tmp_path):
    one = create_app({"OPTIN_STORAGE_URL": f"sqlite:///{tmp_path}/one.db"}).test_client()
    two = create_app({"OPTIN_STORAGE_URL": f"sqlite:///{tmp_path}/two.db"}).test_client()
    one.put("/client/users/m1/profile/optin", json={"LOYALTY_OPTIN": "accepted"})
    assert two.get("/client/users/m1/profile/optin").status_code == 404


def test_embedded_without_a_storage_url_uses_the_hosts_instance_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("OPTIN_STORAGE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "host-instance"
    app = Flask("host", instance_path=str(folder))
    OptIn(app)
    try:
        assert app.extensions["optin"].storage_url == f"sqlite:///{folder}/optin.db"
        assert folder.is_dir()
        assert not (tmp_path / "instance").exists()
    finally:
        app.extensions["optin"].store.close()


def test_registering_twice_on_one_app_is_refused():
    app = Flask("host")
    OptIn(app, store=MemoryStore())
    with pytest.raises(RuntimeError, match="already"):
        OptIn(app, store=MemoryStore())


class CountingStore(MemoryStore):
    closed: ClassVar[list[str]] = []

    @classmethod
    def from_url(cls, url):
        store = cls()
        store.url = url
        return store

    def close(self):
        CountingStore.closed.append(self.url)


def test_a_store_built_from_its_url_is_closed_when_the_app_goes():
    registry.register("counting", CountingStore)
    try:
        CountingStore.closed.clear()
        for i in range(5):
            app = create_app({"OPTIN_STORAGE_URL": f"counting://{i}"})
            app.test_client().get("/readyz")
            del app
        gc.collect()
        assert sorted(CountingStore.closed) == [f"counting://{i}" for i in range(5)]
    finally:
        registry.unregister("counting")


def test_a_store_passed_in_stays_the_hosts():
    CountingStore.closed.clear()
    store = CountingStore.from_url("counting://host")
    app = Flask("host")
    OptIn(app, store=store)
    del app
    gc.collect()
    assert CountingStore.closed == []


@pytest.mark.parametrize(
    ("url", "setting", "expected"),
    [
        ("redis://127.0.0.1:1/0", 1, 1),
        ("redis://127.0.0.1:1/0?min_replicas_acked=2", 1, 2),  # the URL wins
        ("redis://127.0.0.1:1/0", 0, 0),
    ],
)
def test_min_replicas_setting_reaches_a_redis_store(url, setting, expected):
    app = create_app({"OPTIN_STORAGE_URL": url, "OPTIN_REDIS_MIN_REPLICAS_ACKED": setting})
    assert app.extensions["optin"].store.min_replicas_acked == expected


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_standalone_talisman_and_embedded_constants_send_the_same_headers(scheme):
    """Standalone, Talisman sets part of the seed's headers; embedded, every one is a
    constant in headers.py. Both must send the same names, values and casing."""
    from optin_service.headers import RESPONSE_HEADERS, TALISMAN_HEADERS

    standalone = create_app({"OPTIN_STORAGE_URL": "memory://"}).test_client()
    host = Flask(__name__)
    OptIn(host, store=MemoryStore(), url_prefix="/loyalty")
    embedded = host.test_client()
    env = {"wsgi.url_scheme": scheme}
    body = {"LOYALTY_OPTIN": "accepted"}
    for path in ("/client/users/m1/profile/optin", "/client/users/%20/profile/optin"):
        got = [
            client.put(prefix + path, json=body, environ_overrides=env)
            for client, prefix in ((standalone, ""), (embedded, "/loyalty"))
        ]
        assert got[0].status_code == got[1].status_code
        fixed = [
            sorted((k, v) for k, v in r.headers.to_wsgi_list() if k in dict(RESPONSE_HEADERS))
            for r in got
        ]
        assert fixed[0] == fixed[1] == sorted(RESPONSE_HEADERS)
    # Talisman really is what sets its headers in the standalone app.
    bare = Flask(__name__)
    from optin_service.headers import TALISMAN_OPTIONS

    Talisman(bare, **TALISMAN_OPTIONS)
    bare.add_url_rule("/", "home", lambda: "")
    sent = bare.test_client().get("/", environ_overrides=env).headers
    assert sorted((k, sent[k]) for k, _ in TALISMAN_HEADERS) == sorted(TALISMAN_HEADERS)


def test_an_embedded_api_reads_only_its_hosts_config(monkeypatch):
    """The environment is the standalone service's (create_app); a host app configures
    the API through its own app.config only."""
    monkeypatch.setenv("OPTIN_MAX_BODY_BYTES", "10")
    monkeypatch.setenv("OPTIN_AUTH", "api-key")  # would refuse to start without keys
    host = Flask(__name__)
    OptIn(host, store=MemoryStore())
    assert host.config["OPTIN_MAX_BODY_BYTES"] == 16384
    assert host.config["OPTIN_AUTH"] == "none"
    response = host.test_client().put(
        "/client/users/m1/profile/optin", json={"LOYALTY_OPTIN": "accepted", "pad": "x" * 50}
    )
    assert response.status_code == 200
    assert (
        create_app({"OPTIN_STORAGE_URL": "memory://", "OPTIN_AUTH": "none"}).config[
            "OPTIN_MAX_BODY_BYTES"
        ]
        == 10
    )  # the standalone service does read it


@pytest.mark.parametrize(
    ("name", "value"),
    [
        # -1 made ProxyFix believe the client's own X-Forwarded-For entry.
        ("OPTIN_TRUSTED_PROXIES", "-1"),
        ("OPTIN_MAX_BODY_BYTES", "0"),  # every PUT a 413
        ("OPTIN_MAX_BODY_BYTES", "-1"),
        ("OPTIN_RETRY_AFTER_SECONDS", "-5"),
        ("OPTIN_REDIS_MIN_REPLICAS_ACKED", "-1"),
    ],
)
def test_a_whole_number_setting_out_of_range_refuses_to_start(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name} must be a whole number >= [01], not {value}"):
        create_app({"OPTIN_STORAGE_URL": "memory://"})
    monkeypatch.delenv(name)
    with pytest.raises(ValueError, match=f"{name} must be a whole number"):
        create_app({"OPTIN_STORAGE_URL": "memory://", name: int(value)})


def test_a_host_may_give_a_timeout_as_any_positive_number():
    """Timeouts are checked where they are read, as positive numbers: a host app's 2.5."""
    config = {"OPTIN_WEBHOOK_TIMEOUT_SECONDS": 2.5, "OPTIN_BODY_TIMEOUT_SECONDS": 0.5}
    app = create_app({"OPTIN_STORAGE_URL": "memory://", **config})
    assert app.config["OPTIN_WEBHOOK_TIMEOUT_SECONDS"] == 2.5
