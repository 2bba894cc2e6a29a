"""What a change is: every event that becomes its member's state appends one change,
with the member's next version, and nothing else does."""

from __future__ import annotations

import dataclasses
import random
from datetime import datetime, timedelta, timezone

import pytest

from optin_service.storage import STATUSES, IdempotencyKeyReused, OptInRecord, OptInStore
from optin_service.testing._feed import _assert_consistent, _entries, _Model, _read_all
from optin_service.testing._helpers import _BASE, _US

__all__ = ["ChangesContract"]


class ChangesContract:
    """A set that takes precedence appends one change (versions 1, 2, 3... per member,
    without gaps); an older event, one already stored, a replay or a refused
    ``Idempotency-Key`` appends none."""

    def test_an_empty_store_has_no_changes(self, store: OptInStore) -> None:
        page = store.changes(None, 10)
        assert page.changes == []
        assert store.changes(page.next, 10).changes == []

    def test_a_set_appends_one_change(self, store: OptInStore) -> None:
        record = OptInRecord("member-1", "declined", _BASE, "r1", "sms", "crm")
        store.set(record)
        [change] = _read_all(store)
        assert (change.event, change.previous, change.version) == (record, None, 1)
        assert change.event.updated_at.utcoffset() == timedelta(0)

    def test_a_repeat_of_the_same_answer_is_a_change(self, store: OptInStore) -> None:
        first = OptInRecord("member-1", "accepted", _BASE, "r1")
        again = OptInRecord("member-1", "accepted", _BASE + _US, "r2")
        store.set(first)
        store.set(again)
        assert _entries(_read_all(store)) == [(first, None, 1), (again, "accepted", 2)]

    def test_an_older_event_is_not_a_change(self, store: OptInStore) -> None:
        newer = OptInRecord("member-1", "accepted", _BASE + _US, "r2")
        store.set(newer)
        store.set(OptInRecord("member-1", "declined", _BASE, "r1"))
        assert _entries(_read_all(store)) == [(newer, None, 1)]

    def test_an_event_already_stored_is_not_a_change(self, store: OptInStore) -> None:
        record = OptInRecord("member-1", "accepted", _BASE, "r1", "sms")
        store.set(record)
        store.set(record)
        # The same identity with a status that would take precedence: still the same event.
        store.set(dataclasses.replace(record, status="declined", source="web"))
        store.import_events([record, dataclasses.replace(record, status="declined")])
        assert _entries(_read_all(store)) == [(record, None, 1)]

    def test_an_idempotent_replay_or_a_refused_key_is_not_a_change(self, store: OptInStore) -> None:
        first = OptInRecord("member-1", "accepted", _BASE, "r1")
        store.set(first, idempotency_key="k")
        store.set(OptInRecord("member-1", "accepted", _BASE + _US, "r2"), idempotency_key="k")
        with pytest.raises(IdempotencyKeyReused):
            store.set(OptInRecord("member-1", "declined", _BASE + _US, "r3"), idempotency_key="k")
        assert _entries(_read_all(store)) == [(first, None, 1)]

    def test_equal_times_declined_then_greater_request_id(self, store: OptInStore) -> None:
        declined = OptInRecord("member-1", "declined", _BASE, "r1")
        store.set(declined)
        store.set(OptInRecord("member-1", "accepted", _BASE, "r2"))  # loses to declined
        later_id = OptInRecord("member-1", "declined", _BASE, "r3")
        store.set(later_id)
        assert _entries(_read_all(store)) == [(declined, None, 1), (later_id, "declined", 2)]

    def test_versions_count_each_members_changes_without_gaps(self, store: OptInStore) -> None:
        rng = random.Random(17)
        model = _Model()
        for _ in range(120):
            record = OptInRecord(
                f"member-{rng.randrange(5)}",
                rng.choice(STATUSES),
                _BASE + rng.randrange(40) * _US,  # many older events and ties
                f"r{rng.randrange(60)}",
            )
            store.set(record)
            model.apply(record)
        changes = _read_all(store)
        _assert_consistent(store, changes)
        assert _entries(changes) == model.changes

    def test_a_change_carries_the_event_whole(self, store: OptInStore) -> None:
        record = OptInRecord(
            "a:b", "declined", datetime(1970, 1, 1, tzinfo=timezone.utc), "r" * 128, "x_-9", "c"
        )
        store.import_events([record])
        [change] = _read_all(store)
        assert change.event == record
        assert change.event.updated_at_us == 0
