"""Set and get: a record comes back whole, whatever its ids, source, client or time."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone

import pytest

from optin_service.storage import DEFAULT_SOURCE, STATUSES, OptInRecord, OptInStore
from optin_service.testing._helpers import (
    _BASE,
    _US,
    LONG_IDS,
    TRICKY_IDS,
    _all_events,
    _assert_utc,
    _sort_key,
)

__all__ = ["BasicsContract"]


def _assert_clients_round_trip(store: OptInStore, clients: list[str]) -> list[OptInRecord]:
    """One event per client for member-1, written with set(): each comes back whole."""
    records = [
        OptInRecord("member-1", "accepted", _BASE + n * _US, f"req-{n}", "sms", client)
        for n, client in enumerate(clients)
    ]
    for record in records:
        assert store.set(record) == record
        assert store.get("member-1") == record
    assert store.history("member-1", 100) == records[::-1]
    assert _all_events(store) == sorted(records, key=_sort_key)
    return records


class BasicsContract:
    """A store keeps each member's current state, and every field round trips exactly."""

    def test_is_an_opt_in_store(self, store: OptInStore) -> None:
        assert isinstance(store, OptInStore)

    def test_get_unknown_id_is_none(self, store: OptInStore) -> None:
        assert store.get("never-set") is None

    def test_set_returns_the_record(self, store: OptInStore) -> None:
        record = OptInRecord("member-1", "accepted", _BASE, "req-1", "sms")
        assert store.set(record) == record

    def test_set_then_get_returns_an_equal_record(self, store: OptInStore) -> None:
        record = OptInRecord("member-1", "declined", _BASE, "req-1", "call_centre-2", "crm")
        store.set(record)
        got = store.get("member-1")
        assert got == record
        assert got.correlation_id == "member-1"
        assert got.status == "declined"
        assert got.updated_at == _BASE
        assert got.updated_at.microsecond == 123456
        assert got.request_id == "req-1"
        assert got.source == "call_centre-2"
        assert got.client == "crm"
        _assert_utc(got)

    @pytest.mark.parametrize(
        "request_id",
        ["", "r", "a:b:c", "{x}", "x}", "~!#$%&'()*+,-./;<=>?@[\\]^_`|", "r" * 128],
    )
    def test_request_ids_round_trip(self, store: OptInStore, request_id: str) -> None:
        record = OptInRecord("member-1", "accepted", _BASE, request_id, "A-z_9")
        assert store.set(record) == record
        assert store.get("member-1") == record
        assert store.history("member-1", 10) == [record]
        assert list(store.events()) == [record]

    def test_sources_round_trip(self, store: OptInStore) -> None:
        sources = [DEFAULT_SOURCE, "sms", "-", "_", "A" * 32, "a-B_0"]
        records = [
            OptInRecord("member-1", "accepted", _BASE + n * _US, f"req-{n}", source)
            for n, source in enumerate(sources)
        ]
        for record in records:
            assert store.set(record) == record
        assert store.history("member-1", 10) == records[::-1]

    def test_clients_round_trip(self, store: OptInStore) -> None:
        clients = [
            "",
            "crm",
            "svc:1",
            "a b",
            "{x}",
            " ",
            ":",
            "~!#$%&'()*+,-./;<=>?@[\\]^_`|",
            "c" * 128,
        ]
        records = _assert_clients_round_trip(store, clients)
        imported = [dataclasses.replace(r, correlation_id="member-2") for r in records]
        assert store.import_events(imported) == len(records)
        assert store.history("member-2", 100) == imported[::-1]
        assert store.get("member-2") == imported[-1]

    def test_clients_of_any_characters_round_trip(self, store: OptInStore) -> None:
        # A JWT's client_id, azp or sub claim names the client: any text at all.
        clients = ["a\nb", "\n", "a\n\n5", "tab\there", "é", "名前", "a b\r\n"]
        _assert_clients_round_trip(store, clients)

    def test_a_newer_set_wins(self, store: OptInStore) -> None:
        first = OptInRecord("member-1", "accepted", _BASE, "req-1")
        declined = OptInRecord("member-1", "declined", _BASE + timedelta(seconds=1), "req-2")
        accepted = OptInRecord("member-1", "accepted", _BASE + timedelta(seconds=2), "req-3")
        store.set(first)
        assert store.set(declined) == declined
        assert store.get("member-1") == declined
        assert store.set(accepted) == accepted
        assert store.get("member-1") == accepted

    def test_ids_are_independent(self, store: OptInStore) -> None:
        one = OptInRecord("member-1", "accepted", _BASE)
        two = OptInRecord("member-2", "declined", _BASE + timedelta(microseconds=1))
        store.set(one)
        assert store.get("member-2") is None
        assert store.history("member-2", 10) == []
        store.set(two)
        assert store.get("member-1") == one
        assert store.get("member-2") == two
        assert store.history("member-1", 10) == [one]
        assert store.history("member-2", 10) == [two]

    def test_tricky_and_long_ids_do_not_collide(self, store: OptInStore) -> None:
        ids = TRICKY_IDS + LONG_IDS
        assert len(set(ids)) == len(ids)
        assert all(len(i) == 128 for i in LONG_IDS)
        records = [
            OptInRecord(cid, STATUSES[n % 2], _BASE + timedelta(microseconds=n), f"req-{n}")
            for n, cid in enumerate(ids)
        ]
        for record in records:
            store.set(record)
        for record in records:
            assert store.get(record.correlation_id) == record
            assert store.history(record.correlation_id, 10) == [record]
        assert _all_events(store) == sorted(records, key=_sort_key)

    # --- timestamps ----------------------------------------------------------

    def test_timestamps_far_in_the_past_and_future_round_trip(self, store: OptInStore) -> None:
        stamps = [
            datetime(1971, 1, 1, tzinfo=timezone.utc),
            datetime(1971, 6, 15, 3, 4, 5, 1, tzinfo=timezone.utc),
            datetime(2100, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc),
        ]
        for n, stamp in enumerate(stamps):
            store.set(OptInRecord(f"member-{n}", "accepted", stamp))
        for n, stamp in enumerate(stamps):
            got = store.get(f"member-{n}")
            assert got is not None
            assert got.updated_at == stamp
            _assert_utc(got)
            assert store.history(f"member-{n}", 1)[0].updated_at == stamp

    def test_every_microsecond_round_trips(self, store: OptInStore) -> None:
        for micros in (0, 1, 9, 10, 500000, 999998, 999999):
            stamp = _BASE.replace(microsecond=micros)
            store.set(OptInRecord("member-1", "accepted", stamp))
            got = store.get("member-1")
            assert got is not None
            assert got.updated_at == stamp
            assert got.updated_at.microsecond == micros
        assert store.count_events() == 7
