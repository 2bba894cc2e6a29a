"""History: newest first by position, in pages that stay exact while events arrive."""

from __future__ import annotations

from datetime import timedelta

import pytest

from optin_service.storage import STATUSES, OptInRecord, OptInStore
from optin_service.testing._helpers import _BASE, _US, _newest_first, _pages

__all__ = ["HistoryContract"]


class HistoryContract:
    """``history`` is newest first by position, and a cursor is a position: ``before`` is
    strict and need not name a stored event."""

    def _seven(self, store: OptInStore, correlation_id: str = "member-1") -> list[OptInRecord]:
        """Seven events, ties in time included, stored out of order; returned newest first."""
        spec = [(3, "b"), (0, "a0"), (3, "a"), (5, "z"), (1, "m"), (3, "c"), (2, "n")]
        records = [
            OptInRecord(correlation_id, STATUSES[n % 2], _BASE + us * _US, f"req-{rid}")
            for n, (us, rid) in enumerate(spec)
        ]
        for record in records:
            store.set(record)
        return _newest_first(records)

    def test_history_is_newest_first_by_position(self, store: OptInStore) -> None:
        expected = self._seven(store)
        assert [(e.updated_at_us - expected[-1].updated_at_us, e.request_id) for e in expected] == [
            (5, "req-z"),
            (3, "req-c"),
            (3, "req-b"),
            (3, "req-a"),
            (2, "req-n"),
            (1, "req-m"),
            (0, "req-a0"),
        ]
        assert store.history("member-1", 100) == expected
        assert store.history("member-1", 7) == expected
        assert store.history("member-1", 3) == expected[:3]
        assert store.history("member-1", 1) == expected[:1]
        assert store.history("member-2", 100) == []

    def test_history_keeps_members_apart(self, store: OptInStore) -> None:
        one = self._seven(store, "a")
        two = self._seven(store, "a:b")
        three = self._seven(store, "{a}")
        assert store.history("a", 100) == one
        assert store.history("a:b", 100) == two
        assert store.history("{a}", 100) == three
        assert store.count_events() == 21

    @pytest.mark.parametrize("limit", [1, 2, 3, 6, 7, 8, 100])
    def test_history_pages_walk_every_event_exactly_once(
        self, store: OptInStore, limit: int
    ) -> None:
        expected = self._seven(store)
        pages = _pages(store, "member-1", limit)
        walked = [e for page in pages for e in page]
        assert walked == expected  # in order: no duplicates, no gaps
        assert all(len(page) == limit for page in pages[:-1])
        assert len(pages) == len(expected) // limit + 1

    def test_history_before_is_strict(self, store: OptInStore) -> None:
        expected = self._seven(store)
        for n, event in enumerate(expected):
            assert store.history("member-1", 100, event.position) == expected[n + 1 :]
        # A cursor need not be the position of a stored event.
        newest = expected[0].position
        assert store.history("member-1", 100, (newest[0] + 1, "")) == expected
        assert store.history("member-1", 100, (newest[0], newest[1] + "~")) == expected
        assert store.history("member-1", 100, (0, "")) == []

    def test_history_pages_stay_exact_while_events_arrive(self, store: OptInStore) -> None:
        expected = self._seven(store)
        first = store.history("member-1", 2)
        assert first == expected[:2]
        for n in range(1, 4):  # newer events arrive between the two pages
            store.set(OptInRecord("member-1", "declined", _BASE + n * timedelta(seconds=1)))
        second = store.history("member-1", 2, first[-1].position)
        assert second == expected[2:4]
        rest = store.history("member-1", 100, second[-1].position)
        assert rest == expected[4:]

    def test_history_cursor_splits_equal_times_by_request_id(self, store: OptInStore) -> None:
        expected = self._seven(store)
        first = store.history("member-1", 2)
        cursor = first[-1]  # the 3 µs event with the greatest request id, "req-c"
        assert cursor.request_id == "req-c"
        after = OptInRecord("member-1", "accepted", cursor.updated_at, "req-d")  # after it
        before = OptInRecord("member-1", "accepted", cursor.updated_at, "req-bb")  # before it
        store.set(after)
        store.set(before)
        second = store.history("member-1", 2, cursor.position)
        assert second == [before, expected[2]]
        assert store.history("member-1", 100, cursor.position) == [before, *expected[2:]]
