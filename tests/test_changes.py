"""The change feed over HTTP: ``GET /client/optin/changes`` (FEED.md's "HTTP")."""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timedelta, timezone

import pytest
from flask import Flask

import backends.memory
from backends.memory import MemoryStore
from optin_service import OptIn, create_app
from optin_service.feed import MAX_CURSOR
from optin_service.storage import OptInRecord, StorageUnavailable
from tests.test_api import PATH, SEED, TIME, envelope, put

CHANGES = "/client/optin/changes"
CHANGE_KEYS = [
    "correlationId",
    "LOYALTY_OPTIN",
    "previous",
    "updatedAt",
    "requestId",
    "source",
    "client",
    "version",
]
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def changes(client, path: str = CHANGES, **query):
    return client.get(path, query_string=query)


def read_all(client, limit: int = 1000, **query) -> tuple[list[dict], str]:
    """Every change, a page at a time, until an empty page; and the last ``next``."""
    items: list[dict] = []
    after = query.pop("after", None)
    for _ in range(10_000):
        response = changes(client, limit=limit, **query, **({"after": after} if after else {}))
        assert response.status_code == 200, response.data
        body = response.get_json()
        assert list(body) == ["items", "next"] and isinstance(body["next"], str)
        after = body["next"]
        if not body["items"]:
            return items, after
        items += body["items"]
    raise AssertionError("the feed never ended")


def set_answer(client, cid: str, status: str, **headers: str):
    response = put(client, {"LOYALTY_OPTIN": status}, url=PATH.format(cid), headers=headers)
    assert response.status_code == 200, response.data
    return response


# --- what a change is ----------------------------------------------------------------


def test_an_empty_feed_answers_no_items_and_a_cursor_to_poll_from(client):
    first = changes(client)
    assert first.status_code == 200 and first.mimetype == "application/json"
    body = first.get_json()
    assert body["items"] == [] and body["next"]
    again = changes(client, after=body["next"])
    assert again.status_code == 200 and again.get_json() == body


def test_every_accepted_put_is_a_change_with_the_events_fields(client):
    first = set_answer(client, "member-1", "accepted")
    again = set_answer(client, "member-1", "accepted", **{"X-Consent-Source": "STORE_42"})
    other = set_answer(client, "member-2", "declined")
    last = set_answer(client, "member-1", "declined")
    items = changes(client).get_json()["items"]
    assert [list(item) for item in items] == [CHANGE_KEYS] * 4
    assert [
        (i["correlationId"], i["LOYALTY_OPTIN"], i["previous"], i["version"]) for i in items
    ] == [
        ("member-1", "accepted", None, 1),
        ("member-1", "accepted", "accepted", 2),  # a repeat renews the evidence: a change too
        ("member-2", "declined", None, 1),
        ("member-1", "declined", "accepted", 3),
    ]
    assert [i["requestId"] for i in items] == [
        r.headers["x-amzn-RequestId"] for r in (first, again, other, last)
    ]
    assert [i["source"] for i in items] == ["API", "STORE_42", "API", "API"]
    assert all(i["client"] == "" for i in items)
    # The same event as the history and GET answer, with the same time format.
    history = client.get(PATH.format("member-1") + "/history").get_json()["items"]
    member_1 = [items[3], items[1], items[0]]  # newest first, as the history
    assert [(c["updatedAt"], c["requestId"]) for c in member_1] == [
        (e["updatedAt"], e["requestId"]) for e in history
    ]
    assert all(TIME.fullmatch(c["updatedAt"]) for c in items)
    state = client.get(PATH.format("member-1")).get_json()
    assert (items[-1]["LOYALTY_OPTIN"], items[-1]["updatedAt"]) == (
        state["LOYALTY_OPTIN"],
        state["updatedAt"],
    )


def test_what_does_not_become_the_state_is_no_change(app, client):
    set_answer(client, "member-1", "accepted", **{"Idempotency-Key": "k1"})
    set_answer(client, "member-1", "accepted", **{"Idempotency-Key": "k1"})  # a replay
    refused = put(client, {"LOYALTY_OPTIN": "maybe"}, url=PATH.format("member-1"))
    assert refused.status_code == 400
    reused = put(
        client,
        {"LOYALTY_OPTIN": "declined"},
        url=PATH.format("member-1"),
        headers={"Idempotency-Key": "k1"},
    )
    assert reused.status_code == 422
    store = app.extensions["optin"].store
    old = OptInRecord("member-1", "declined", T0 - timedelta(days=30), "old-1", "IMPORT")
    newer = OptInRecord("member-2", "declined", T0, "new-1", "IMPORT")
    assert store.import_events([old, newer]) == 2
    items = changes(client).get_json()["items"]
    assert [(i["correlationId"], i["requestId"], i["version"]) for i in items] == [
        ("member-1", items[0]["requestId"], 1),
        ("member-2", "new-1", 1),
    ]


# --- pages and cursors ---------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def any_app(request, tmp_path):
    """The standalone app on each built-in backend that runs without a server."""
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/optin.db"
    app = create_app({"TESTING": True, "OPTIN_STORAGE_URL": url})
    yield app
    app.extensions["optin"].store.close()


def test_pages_walk_every_change_once_in_commit_order(any_app):
    client = any_app.test_client()
    for n in range(10):
        set_answer(client, f"m{n % 3}", ("accepted", "declined")[n % 2])
    everything = changes(client, limit=1000).get_json()["items"]
    assert len(everything) == 10
    paged, after = read_all(client, limit=3)
    assert paged == everything
    # With nothing new, the same cursor comes back: poll again from it.
    empty = changes(client, after=after).get_json()
    assert empty == {"items": [], "next": after}
    set_answer(client, "m9", "accepted")
    fresh = changes(client, after=after).get_json()
    assert [i["correlationId"] for i in fresh["items"]] == ["m9"] and fresh["next"] != after
    # Each change's own position: a page of one continues exactly after it.
    one = changes(client, limit=1).get_json()
    assert changes(client, after=one["next"], limit=1).get_json()["items"] == [everything[1]]


def test_the_default_page_is_100_changes(client):
    for n in range(101):
        set_answer(client, f"m{n}", "accepted")
    body = changes(client).get_json()
    assert len(body["items"]) == 100
    rest = changes(client, after=body["next"]).get_json()
    assert [i["correlationId"] for i in rest["items"]] == ["m100"]


def test_a_limit_of_1000_is_accepted(client):
    set_answer(client, "m1", "accepted")
    assert len(changes(client, limit="1000").get_json()["items"]) == 1
    assert len(changes(client, limit="1").get_json()["items"]) == 1


@pytest.mark.parametrize(
    "limit", ["0", "1001", "-1", "abc", "1.5", "", " 5", "+5", "1_0", "\u0665", "1e1"]
)
def test_a_bad_limit_is_400_and_names_the_range(client, limit):
    response = changes(client, limit=limit)
    assert response.status_code == 400
    body = envelope(response)
    assert body["errorCode"] == "INVALID_REQUEST"
    assert body["errorMessage"] == "limit must be a whole number from 1 to 1000"


def _history_cursor() -> str:
    return base64.urlsafe_b64encode(b"1764000000000000:req").rstrip(b"=").decode()


@pytest.mark.parametrize(
    "after",
    [
        "",
        "!!!",
        "%%",
        "bm90LWEtY3Vyc29y",  # base64 of something no store wrote
        _history_cursor(),  # a history cursor is not a feed cursor
        "é",
        "A" * (MAX_CURSOR + 1),
    ],
    ids=["empty", "punctuation", "percent", "foreign", "history", "non-ascii", "too-long"],
)
def test_a_cursor_this_service_did_not_give_out_is_400(any_app, after):
    client = any_app.test_client()
    set_answer(client, "m1", "accepted")
    response = changes(client, after=after)
    assert response.status_code == 400
    body = envelope(response)
    assert body["errorCode"] == "INVALID_REQUEST" and "after" in body["errorMessage"]


def test_a_cursor_from_before_a_rebuild_is_410_cursor_expired(any_app):
    app, client = any_app, any_app.test_client()
    set_answer(client, "m1", "accepted")
    set_answer(client, "m1", "declined")
    before = changes(client, limit=1).get_json()["next"]
    assert app.extensions["optin"].store.rebuild_changes() == 2
    expired = changes(client, after=before)
    assert expired.status_code == 410
    body = envelope(expired)
    assert body["errorCode"] == "CURSOR_EXPIRED" and "from the start" in body["errorMessage"]
    for name, value in SEED.items():
        assert expired.headers[name] == value, name
    assert expired.headers["X-Request-Id"] == expired.headers["x-amzn-RequestId"]
    # Resynchronising: from the start, the rebuilt feed.
    items, _ = read_all(client)
    assert [(i["LOYALTY_OPTIN"], i["version"]) for i in items] == [
        ("accepted", 1),
        ("declined", 2),
    ]


@pytest.fixture
def clock(monkeypatch):
    """The memory store's wall clock (what dates a change), moved by hand."""
    now = [T0]
    monkeypatch.setattr(backends.memory, "_now", lambda: now[0])
    return now


def test_a_cursor_into_pruned_changes_is_410_and_a_poller_at_the_end_is_not(app, client, clock):
    store = app.extensions["optin"].store
    set_answer(client, "m1", "accepted")
    early = changes(client).get_json()["next"]
    clock[0] += timedelta(days=2)
    set_answer(client, "m2", "accepted")
    tail = changes(client, after=early).get_json()["next"]
    clock[0] += timedelta(days=2)
    assert store.prune_changes(clock[0] - timedelta(days=3)) == 1
    assert changes(client, after=tail).status_code == 200  # nothing it needed was pruned
    kept = changes(client, after=early)  # m1 went, and this cursor only needs m2
    assert [i["correlationId"] for i in kept.get_json()["items"]] == ["m2"]
    assert [i["correlationId"] for i in changes(client).get_json()["items"]] == ["m2"]
    assert store.prune_changes(clock[0]) == 1
    expired = changes(client, after=early)
    assert expired.status_code == 410 and envelope(expired)["errorCode"] == "CURSOR_EXPIRED"
    # Every change is gone: a reader from the start polls from a cursor that stays good.
    empty = changes(client).get_json()
    assert empty["items"] == []
    polled = changes(client, after=empty["next"])
    assert polled.status_code == 200, polled.data
    set_answer(client, "m3", "declined")
    items, _ = read_all(client, after=empty["next"])
    assert [i["correlationId"] for i in items] == ["m3"]


# --- the API's rules apply -----------------------------------------------------------


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_api_keys_guard_the_feed():
    app = create_app(
        {
            "OPTIN_STORAGE_URL": "memory://",
            "OPTIN_AUTH": "api-key",
            "OPTIN_API_KEYS": f"crm:{sha('k')}",
        }
    )
    client = app.test_client()
    denied = changes(client)
    assert denied.status_code == 401 and envelope(denied)["errorCode"] == "UNAUTHORIZED"
    assert denied.headers["WWW-Authenticate"].startswith("Bearer")
    set_answer(client, "m1", "accepted", **{"x-api-key": "k"})
    items = client.get(CHANGES, headers={"x-api-key": "k"}).get_json()["items"]
    assert [(i["correlationId"], i["client"]) for i in items] == [("m1", "crm")]


def test_the_feed_is_rate_limited_like_the_rest():
    app = create_app({"OPTIN_STORAGE_URL": "memory://", "OPTIN_RATE_LIMIT": "2/minute"})
    client = app.test_client()
    assert [changes(client).status_code for _ in range(2)] == [200, 200]
    limited = changes(client)
    assert limited.status_code == 429 and envelope(limited)["errorCode"] == "TOO_MANY_REQUESTS"
    assert limited.headers["Retry-After"]


def test_storage_down_is_503_with_retry_after(app, client):
    def down(*args, **kwargs):
        raise StorageUnavailable("down")

    app.extensions["optin"].store.changes = down
    response = changes(client)
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert envelope(response)["errorCode"] == "SERVICE_UNAVAILABLE"


def test_only_get_on_the_feed(client):
    response = client.post(CHANGES)
    assert response.status_code == 405 and envelope(response)["errorCode"] == "METHOD_NOT_ALLOWED"
    assert "GET" in response.headers["Allow"]


def host(url_prefix: str) -> Flask:
    app = Flask("host")
    app.config.update(TESTING=True)
    app.add_url_rule("/", "home", lambda: "<h1>shop</h1>")
    app.add_url_rule("/client/optinx", "optinx", lambda: "<p>the host's</p>")
    OptIn(app, store=MemoryStore(), url_prefix=url_prefix)
    return app


def test_embedded_the_feed_lives_under_the_prefix():
    client = host("/loyalty").test_client()
    ok = client.put("/loyalty" + PATH.format("m1"), json={"LOYALTY_OPTIN": "accepted"})
    assert ok.status_code == 200
    items = changes(client, "/loyalty" + CHANGES).get_json()["items"]
    assert [i["correlationId"] for i in items] == ["m1"]
    assert client.get(CHANGES).mimetype == "text/html"  # the host's 404 at the root


def test_mounted_at_the_root_the_api_owns_client_optin():
    client = host("").test_client()
    assert changes(client).get_json() == {"items": [], "next": changes(client).get_json()["next"]}
    below = client.get("/client/optin/nothing")
    assert below.status_code == 404 and envelope(below)["errorCode"] == "NOT_FOUND"
    assert below.headers["x-amzn-RequestId"]
    host_page = client.get("/client/optinx")
    assert host_page.data == b"<p>the host's</p>" and "x-amzn-RequestId" not in host_page.headers
