"""Consent as evidence over HTTP: provenance, history pages, ordering, idempotency,
on the memory store and on PostgreSQL."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone

import pytest

from optin_service import create_app
from optin_service.storage import OptInRecord
from tests.test_api import PATH, TIME, envelope, put

URL = PATH.format("member-1")
HISTORY = URL + "/history"


@pytest.fixture(
    params=[
        "memory",
        pytest.param("postgres", marks=[pytest.mark.slow, pytest.mark.postgres_server]),
    ]
)
def app(request):
    """The standalone app on memory and on PostgreSQL (a schema of its own)."""
    url = "memory://" if request.param == "memory" else request.getfixturevalue("postgres_url")
    app = create_app({"TESTING": True, "OPTIN_STORAGE_URL": url})
    yield app
    app.extensions["optin"].store.close()


def history(client, **query):
    return client.get(HISTORY, query_string=query)


def test_every_put_is_an_event_with_its_request_id_and_source(client):
    first = put(client, {"LOYALTY_OPTIN": "accepted"})
    second = put(client, {"LOYALTY_OPTIN": "declined"}, headers={"X-Consent-Source": "STORE_42"})
    body = history(client).get_json()
    assert body["next"] is None
    assert [list(item) for item in body["items"]] == [
        ["LOYALTY_OPTIN", "updatedAt", "requestId", "source", "client"]
    ] * 2
    newest, oldest = body["items"]
    assert newest["LOYALTY_OPTIN"] == "declined" and newest["source"] == "STORE_42"
    assert newest["requestId"] == second.headers["x-amzn-RequestId"]
    assert oldest["LOYALTY_OPTIN"] == "accepted" and oldest["source"] == "API"
    assert oldest["requestId"] == first.headers["x-amzn-RequestId"]
    assert TIME.fullmatch(newest["updatedAt"]) and newest["updatedAt"] > oldest["updatedAt"]


@pytest.mark.parametrize("source", ["", "a" * 33, "has space", "é", "a.b", "a/b"])
def test_bad_consent_source_is_400_and_stores_nothing(client, source):
    response = put(client, {"LOYALTY_OPTIN": "accepted"}, headers={"X-Consent-Source": source})
    assert response.status_code == 400
    assert "X-Consent-Source" in envelope(response)["errorMessage"]
    assert client.get(URL).status_code == 404
    assert history(client).status_code == 404


def test_history_of_unknown_member_is_404(client):
    response = history(client)
    assert response.status_code == 404
    assert envelope(response)["errorCode"] == "NOT_FOUND"


def test_history_pages_walk_every_event_once(client):
    for i in range(7):
        put(client, {"LOYALTY_OPTIN": ("accepted", "declined")[i % 2]})
    all_ids = [item["requestId"] for item in history(client, limit=100).get_json()["items"]]
    assert len(all_ids) == 7
    seen, cursor, pages = [], None, 0
    while True:
        query = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        body = history(client, **query).get_json()
        seen += [item["requestId"] for item in body["items"]]
        pages += 1
        cursor = body["next"]
        if cursor is None:
            break
    assert seen == all_ids and pages == 3


def test_cursor_stays_correct_while_new_events_arrive(client):
    for _ in range(4):
        put(client, {"LOYALTY_OPTIN": "accepted"})
    first = history(client, limit=2).get_json()
    expected_rest = [i["requestId"] for i in history(client, limit=100).get_json()["items"][2:]]
    for _ in range(3):
        put(client, {"LOYALTY_OPTIN": "declined"})
    rest = history(client, limit=100, cursor=first["next"]).get_json()
    assert [i["requestId"] for i in rest["items"]] == expected_rest
    assert rest["next"] is None


def test_default_limit_is_20(client):
    for _ in range(21):
        put(client, {"LOYALTY_OPTIN": "accepted"})
    body = history(client).get_json()
    assert len(body["items"]) == 20 and body["next"]


@pytest.mark.parametrize(
    "limit", ["0", "101", "-1", "abc", "1.5", "", " 5", "5 ", "+5", "1_0", "\u0665", "5.0", "1e1"]
)
def test_bad_limit_is_400(client, limit):
    put(client, {"LOYALTY_OPTIN": "accepted"})
    response = history(client, limit=limit)
    assert response.status_code == 400
    assert envelope(response)["errorMessage"] == "limit must be a whole number from 1 to 100"


@pytest.mark.parametrize("cursor", ["!!!", "bm90LWEtY3Vyc29y", "%%", "YWJjOmRlZg"])
def test_bad_cursor_is_400(client, cursor):
    put(client, {"LOYALTY_OPTIN": "accepted"})
    response = history(client, cursor=cursor)
    assert response.status_code == 400
    assert "cursor" in envelope(response)["errorMessage"]


@pytest.mark.parametrize("url", ["memory://", "sqlite:///{tmp}/optin.db"])
@pytest.mark.parametrize(
    "us", ["9" * 30, "-" + "9" * 30, "9223372036854775808", " 1", "1_0", "\u0661"]
)
def test_cursor_with_a_time_no_cursor_can_hold_is_400(tmp_path, url, us):
    """A made-up cursor is a 400 on every backend (a number past SQLite's INTEGER was a 500)."""
    app = create_app({"TESTING": True, "OPTIN_STORAGE_URL": url.format(tmp=tmp_path)})
    client = app.test_client()
    put(client, {"LOYALTY_OPTIN": "accepted"})
    cursor = base64.urlsafe_b64encode(f"{us}:x".encode()).rstrip(b"=").decode()
    response = history(client, cursor=cursor)
    assert response.status_code == 400
    assert envelope(response)["errorMessage"] == "cursor is not one this service gave out"
    app.extensions["optin"].store.close()


@pytest.mark.parametrize("rid", ["\x00", "r\x00", "", "a b", "\u00e9", "x" * 129])
def test_cursor_with_a_request_id_no_event_can_have_is_400(client, rid):
    """The request id part as strictly as the time part: a NUL reached PostgreSQL,
    which refuses NUL in text (a 500)."""
    put(client, {"LOYALTY_OPTIN": "accepted"})
    cursor = base64.urlsafe_b64encode(f"1760845087558021:{rid}".encode()).rstrip(b"=").decode()
    response = history(client, cursor=cursor)
    assert response.status_code == 400
    assert envelope(response)["errorMessage"] == "cursor is not one this service gave out"


def test_an_imported_older_event_goes_to_history_only(app, client):
    put(client, {"LOYALTY_OPTIN": "declined"})
    current = client.get(URL).get_json()
    old = OptInRecord(
        "member-1", "accepted", datetime.now(timezone.utc) - timedelta(days=30), "old-1", "IMPORT"
    )
    assert app.extensions["optin"].store.import_events([old]) == 1
    assert client.get(URL).get_json() == current
    items = history(client).get_json()["items"]
    assert [i["requestId"] for i in items][-1] == "old-1"


# --- Idempotency-Key ------------------------------------------------------------------


def test_a_repeated_key_returns_the_first_response_and_records_nothing(client):
    headers = {"Idempotency-Key": "order-123 retry"}
    first = put(client, {"LOYALTY_OPTIN": "accepted"}, headers=headers)
    again = put(client, {"LOYALTY_OPTIN": "accepted"}, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.data == first.data
    assert len(history(client).get_json()["items"]) == 1


def test_a_reused_key_with_another_body_is_422(client):
    headers = {"Idempotency-Key": "k-1"}
    put(client, {"LOYALTY_OPTIN": "accepted"}, headers=headers)
    for body, extra in [
        ({"LOYALTY_OPTIN": "declined"}, {}),
        ({"LOYALTY_OPTIN": "accepted"}, {"X-Consent-Source": "SMS"}),
    ]:
        response = put(client, body, headers=headers | extra)
        assert response.status_code == 422
        assert envelope(response)["errorCode"] == "IDEMPOTENCY_KEY_REUSED"
    assert client.get(URL).get_json()["LOYALTY_OPTIN"] == "accepted"
    assert len(history(client).get_json()["items"]) == 1


def test_keys_are_per_member(client):
    headers = {"Idempotency-Key": "shared"}
    put(client, {"LOYALTY_OPTIN": "accepted"}, headers=headers)
    other = put(client, {"LOYALTY_OPTIN": "declined"}, url=PATH.format("member-2"), headers=headers)
    assert other.status_code == 200


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "é"])
def test_bad_idempotency_key_is_400(client, key):
    response = put(client, {"LOYALTY_OPTIN": "accepted"}, headers={"Idempotency-Key": key})
    assert response.status_code == 400
    assert "Idempotency-Key" in envelope(response)["errorMessage"]
    assert client.get(URL).status_code == 404


def test_an_invalid_body_does_not_burn_the_key(client):
    headers = {"Idempotency-Key": "k-2"}
    assert put(client, {"LOYALTY_OPTIN": "nope"}, headers=headers).status_code == 400
    assert put(client, {"LOYALTY_OPTIN": "declined"}, headers=headers).status_code == 200
    assert json.loads(client.get(URL).data)["LOYALTY_OPTIN"] == "declined"
