"""``Idempotency-Key``: per member, a replay writes nothing and another request is refused."""

from __future__ import annotations

from datetime import timedelta

import pytest

from optin_service.storage import IdempotencyKeyReused, OptInRecord, OptInStore
from optin_service.testing._helpers import _BASE, _US

__all__ = ["IdempotencyContract"]


class IdempotencyContract:
    """A key replays (same fingerprint) or is refused (another fingerprint) per member,
    writing nothing either way; a key outlives ``close``."""

    def test_a_first_idempotency_key_writes_as_usual(self, store: OptInStore) -> None:
        record = OptInRecord("member-1", "accepted", _BASE, "r1", "sms")
        assert store.set(record, idempotency_key="k") == record
        assert store.history("member-1", 10) == [record]

    def test_an_idempotent_replay_returns_the_current_state_and_writes_nothing(
        self, store: OptInStore
    ) -> None:
        first = OptInRecord("member-1", "accepted", _BASE, "r1", "sms")
        newer = OptInRecord("member-1", "declined", _BASE + _US, "r2", "web")
        store.set(first, idempotency_key="key-1")
        store.set(newer)
        count = store.count_events()
        store.close()  # the key outlives a reconnection
        retry = OptInRecord("member-1", "accepted", _BASE + timedelta(seconds=9), "r3", "sms")
        assert store.set(retry, idempotency_key="key-1") == newer
        assert store.set(first, idempotency_key="key-1") == newer
        assert store.count_events() == count
        assert store.history("member-1", 10) == [newer, first]
        assert store.get("member-1") == newer

    @pytest.mark.parametrize(
        ("status", "source"), [("declined", "sms"), ("accepted", "web"), ("declined", "web")]
    )
    def test_an_idempotency_key_reused_for_another_request_is_refused(
        self, store: OptInStore, status: str, source: str
    ) -> None:
        first = OptInRecord("member-1", "accepted", _BASE, "r1", "sms")
        store.set(first, idempotency_key="key-1")
        other = OptInRecord("member-1", status, _BASE + _US, "r2", source)
        with pytest.raises(IdempotencyKeyReused):
            store.set(other, idempotency_key="key-1")
        assert store.get("member-1") == first
        assert store.history("member-1", 10) == [first]
        assert store.count_events() == 1
        # Refused, not forgotten: the first request's fingerprint still replays.
        assert store.set(first, idempotency_key="key-1") == first
        with pytest.raises(IdempotencyKeyReused):
            store.set(other, idempotency_key="key-1")

    def test_idempotency_keys_are_per_member(self, store: OptInStore) -> None:
        one = OptInRecord("member-1", "accepted", _BASE, "r1")
        two = OptInRecord("member-2", "declined", _BASE, "r2")
        three = OptInRecord("member-3", "accepted", _BASE, "r3")
        assert store.set(one, idempotency_key="shared") == one
        assert store.set(two, idempotency_key="shared") == two
        assert store.set(three, idempotency_key="shared") == three
        assert store.count_events() == 3
        assert [store.get(r.correlation_id) for r in (one, two, three)] == [one, two, three]

    def test_idempotency_keys_are_independent_of_each_other(self, store: OptInStore) -> None:
        first = OptInRecord("member-1", "accepted", _BASE, "r1")
        second = OptInRecord("member-1", "declined", _BASE + _US, "r2")
        store.set(first, idempotency_key="key-1")
        assert store.set(second, idempotency_key="key-2") == second
        assert store.set(first, idempotency_key="key-1") == second  # replay
        assert store.count_events() == 2

    def test_a_set_without_a_key_uses_no_key(self, store: OptInStore) -> None:
        first = OptInRecord("member-1", "accepted", _BASE, "r1")
        second = OptInRecord("member-1", "declined", _BASE + _US, "r2")
        store.set(first)
        store.set(second)
        assert store.set(first, idempotency_key="key-1") == second  # written: an old event
        assert store.count_events() == 2

    @pytest.mark.parametrize(
        "key", [" ", "a b", ":", "{k}", "k}", "}:h", "}:i:k", "*", "?", "[a]", "~" * 255]
    )
    def test_idempotency_keys_of_any_printable_ascii(self, store: OptInStore, key: str) -> None:
        first = OptInRecord("member-1", "accepted", _BASE, "r1")
        store.set(first, idempotency_key=key)
        with pytest.raises(IdempotencyKeyReused):
            store.set(OptInRecord("member-1", "declined", _BASE, "r2"), idempotency_key=key)
        assert store.set(first, idempotency_key=key + "x") == first
        assert store.count_events() == 1

    def test_idempotency_keys_never_reach_another_member(self, store: OptInStore) -> None:
        # Ids with braces are outside the API, but a store must keep them apart:
        # whatever a backend makes of "x" plus the key "k}", member "x}:i:k" is another.
        store.set(OptInRecord("x", "accepted", _BASE, "r1"), idempotency_key="k}")
        store.set(OptInRecord("x", "accepted", _BASE, "r1"), idempotency_key="k}:h")
        assert store.get("x}:i:k") is None
        assert store.history("x}:i:k", 10) == []
        other = OptInRecord("x}:i:k", "declined", _BASE, "r2")
        assert store.set(other) == other
        assert store.get("x}:i:k") == other
        assert store.history("x}:i:k", 10) == [other]
        assert store.count_events() == 2
