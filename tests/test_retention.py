"""OPTIN_CHANGES_RETENTION: the app prunes the change feed after PUTs, once a minute."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import pytest

import backends.memory
from optin_service import create_app
from optin_service.retention import PRUNE_INTERVAL
from optin_service.storage import StorageError, StorageUnavailable
from tests.test_api import OK_BODY, PATH, put

CHANGES = "/client/optin/changes"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
DAY = timedelta(days=1)


class Clocks:
    """The wall clock (the memory store dates changes by it, the retention counts back
    from it) and the monotonic one (the interval between prunes), moved by hand."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = T0
        self.seconds = 1000.0
        monkeypatch.setattr(backends.memory, "_now", lambda: self.now)
        monkeypatch.setattr("optin_service.retention._now", lambda: self.now)
        monkeypatch.setattr("optin_service.retention._monotonic", lambda: self.seconds)

    def advance(self, delta: timedelta) -> None:
        self.now += delta
        self.seconds += delta.total_seconds()


@pytest.fixture
def clocks(monkeypatch):
    return Clocks(monkeypatch)


def app_keeping(days: object):
    return create_app(
        {"TESTING": True, "OPTIN_STORAGE_URL": "memory://", "OPTIN_CHANGES_RETENTION": days}
    )


def answer(client, cid: str, status: str = "accepted") -> None:
    """A PUT, closed as a server closes it once sent (which is when the prune runs)."""
    response = put(client, {"LOYALTY_OPTIN": status}, url=PATH.format(cid))
    assert (response.status_code, response.data) == (200, OK_BODY)
    response.close()


def feed(client) -> list[str]:
    return [i["correlationId"] for i in client.get(CHANGES).get_json()["items"]]


def test_changes_older_than_the_retention_are_pruned_after_a_put(clocks):
    app = app_keeping(2)
    client = app.test_client()
    answer(client, "day-0")  # the first PUT prunes (nothing yet)
    clocks.advance(DAY)
    answer(client, "day-1")
    clocks.advance(DAY + timedelta(seconds=1))
    assert feed(client) == ["day-0", "day-1"]  # reading prunes nothing
    answer(client, "day-2")  # day-0 is now over two days old
    assert feed(client) == ["day-1", "day-2"]
    # The events stay: only the feed forgets.
    assert client.get(PATH.format("day-0")).get_json()["LOYALTY_OPTIN"] == "accepted"


def test_at_most_one_prune_a_minute_per_app(clocks, monkeypatch):
    app = app_keeping(1)
    store = app.extensions["optin"].store
    calls: list[datetime] = []
    prune = store.prune_changes

    def counted(before: datetime) -> int:
        calls.append(before)
        return prune(before)

    monkeypatch.setattr(store, "prune_changes", counted)
    client = app.test_client()
    answer(client, "m1")
    assert calls == [T0 - DAY]
    for n in range(5):
        clocks.advance(timedelta(seconds=10))
        answer(client, f"n{n}")
    assert len(calls) == 1
    clocks.advance(timedelta(seconds=PRUNE_INTERVAL - 50))
    answer(client, "m2")
    assert calls == [T0 - DAY, clocks.now - DAY]
    # Reads and refused writes never prune.
    clocks.advance(timedelta(minutes=5))
    client.get(CHANGES)
    client.get(PATH.format("m1"))
    bad = put(client, {"LOYALTY_OPTIN": "maybe"}, url=PATH.format("m1"))
    assert bad.status_code == 400
    bad.close()
    assert len(calls) == 2


@pytest.mark.parametrize("error", [StorageUnavailable("down"), StorageError("broken")])
def test_a_prune_that_fails_is_logged_and_the_put_still_answers_200(
    clocks, monkeypatch, caplog, error
):
    app = app_keeping(1)
    store = app.extensions["optin"].store

    def failing(before: datetime) -> int:
        raise error

    monkeypatch.setattr(store, "prune_changes", failing)
    client = app.test_client()
    with caplog.at_level(logging.WARNING, logger="optin_service.retention"):
        answer(client, "m1")
    assert store.get("m1").status == "accepted"
    records = [r for r in caplog.records if r.name == "optin_service.retention"]
    assert len(records) == 1 and "could not prune the change feed" in records[0].getMessage()
    # Tried again a minute later, not on every PUT meanwhile.
    calls: list[datetime] = []
    monkeypatch.setattr(store, "prune_changes", lambda before: calls.append(before) or 0)
    clocks.advance(timedelta(seconds=PRUNE_INTERVAL - 1))
    answer(client, "m2")
    assert calls == []
    clocks.advance(timedelta(seconds=1))
    answer(client, "m3")
    assert calls == [clocks.now - DAY]


def test_zero_keeps_every_change_and_never_prunes(clocks, monkeypatch):
    app = app_keeping(0)
    store = app.extensions["optin"].store

    def refused(before: datetime) -> int:
        raise AssertionError("pruned with OPTIN_CHANGES_RETENTION=0")

    monkeypatch.setattr(store, "prune_changes", refused)
    client = app.test_client()
    answer(client, "m1")
    clocks.advance(timedelta(days=3650))
    answer(client, "m2")
    assert feed(client) == ["m1", "m2"]


def test_the_default_keeps_every_change():
    assert create_app({"OPTIN_STORAGE_URL": "memory://"}).config["OPTIN_CHANGES_RETENTION"] == 0


def test_the_environment_sets_it(monkeypatch):
    monkeypatch.setenv("OPTIN_CHANGES_RETENTION", "30")
    app = create_app({"OPTIN_STORAGE_URL": "memory://"})
    assert app.extensions["optin"].retention.days == 30


@pytest.mark.parametrize("days", [-1, 1.5, "7", True, None])
def test_a_retention_that_is_not_whole_days_stops_start_up(days):
    with pytest.raises(ValueError, match="OPTIN_CHANGES_RETENTION must be a whole number of days"):
        app_keeping(days)
