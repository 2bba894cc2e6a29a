"""The idempotency window (``IDEMPOTENCY_TTL``, 24 h) on the stores that time it
themselves (memory, SQLite; Redis expires the key), and over HTTP.

A key younger than the window replays (nothing written; another request under it is
422); a key as old as the window is forgotten: the next request under it is a new
event. Time is moved through each backend's clock function, never slept.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

import backends.memory
import backends.sqlite.store
from backends.memory import MemoryStore
from backends.sqlite import SQLiteStore
from optin_service import create_app
from optin_service.storage import IDEMPOTENCY_TTL, IdempotencyKeyReused, OptInRecord
from tests.test_api import URL, envelope, put

STAMP = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=timezone.utc)
JUST_YOUNGER = IDEMPOTENCY_TTL - timedelta(microseconds=1)


class Clock:
    """The time a backend reads, moved by the test."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 26, 12, tzinfo=timezone.utc)

    def advance(self, delta: timedelta) -> None:
        self.now += delta

    @property
    def us(self) -> int:
        return OptInRecord("-", "accepted", self.now).updated_at_us


@pytest.fixture(params=["memory", "sqlite"])
def backend(request, tmp_path, monkeypatch):
    """(storage URL, clock): the backend's clock is the test's."""
    clock = Clock()
    if request.param == "memory":
        monkeypatch.setattr(backends.memory, "_now", lambda: clock.now)
        return "memory://", clock
    monkeypatch.setattr(backends.sqlite.store, "_now_us", lambda: clock.us)
    return f"sqlite:///{tmp_path}/optin.db", clock


@pytest.fixture
def store(backend):
    url, clock = backend
    store = MemoryStore() if url == "memory://" else SQLiteStore.from_url(url)
    yield store, clock
    store.close()


def _event(status: str, request_id: str, minutes: int = 0) -> OptInRecord:
    return OptInRecord("member-1", status, STAMP + timedelta(minutes=minutes), request_id)


# --- store level ------------------------------------------------------------------------


def test_a_key_younger_than_the_window_replays(store):
    store, clock = store
    first = store.set(_event("accepted", "r1"), idempotency_key="k")
    clock.advance(JUST_YOUNGER)
    assert store.set(_event("accepted", "r2", 1), idempotency_key="k") == first
    with pytest.raises(IdempotencyKeyReused):
        store.set(_event("declined", "r3", 2), idempotency_key="k")
    assert store.count_events() == 1
    assert store.get("member-1") == first


def test_a_key_as_old_as_the_window_is_forgotten(store):
    store, clock = store
    store.set(_event("accepted", "r1"), idempotency_key="k")
    clock.advance(IDEMPOTENCY_TTL)
    second = _event("declined", "r2", 1)
    assert store.set(second, idempotency_key="k") == second  # a new event, no refusal
    assert store.count_events() == 2
    assert store.get("member-1") == second
    # The key now belongs to the new request, for a new window.
    clock.advance(JUST_YOUNGER)
    with pytest.raises(IdempotencyKeyReused):
        store.set(_event("accepted", "r3", 2), idempotency_key="k")
    assert store.count_events() == 2


# --- over HTTP --------------------------------------------------------------------------


@pytest.fixture
def client(backend):
    url, clock = backend
    app = create_app({"TESTING": True, "OPTIN_STORAGE_URL": url})
    yield app.test_client(), clock
    app.extensions["optin"].store.close()


def _put(client, status: str):
    return put(client, {"LOYALTY_OPTIN": status}, headers={"Idempotency-Key": "k"})


def _statuses(client) -> list[str]:
    return [item["LOYALTY_OPTIN"] for item in client.get(URL + "/history").get_json()["items"]]


def test_over_http_a_key_younger_than_the_window_replays(client):
    client, clock = client
    assert _put(client, "accepted").status_code == 200
    clock.advance(JUST_YOUNGER)
    assert _put(client, "accepted").status_code == 200  # replayed: nothing written
    refused = _put(client, "declined")
    assert refused.status_code == 422
    assert envelope(refused)["errorCode"] == "IDEMPOTENCY_KEY_REUSED"
    assert _statuses(client) == ["accepted"]
    assert client.get(URL).get_json()["LOYALTY_OPTIN"] == "accepted"


def test_over_http_a_key_as_old_as_the_window_is_forgotten(client):
    client, clock = client
    assert _put(client, "accepted").status_code == 200
    clock.advance(IDEMPOTENCY_TTL)
    assert _put(client, "declined").status_code == 200  # a new request, not a 422
    assert _statuses(client) == ["declined", "accepted"]
    assert client.get(URL).get_json()["LOYALTY_OPTIN"] == "declined"
