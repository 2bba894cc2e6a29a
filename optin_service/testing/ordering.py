"""The current state: the stored event with the greatest precedence, whatever the arrival order."""

from __future__ import annotations

import dataclasses
import itertools
from datetime import datetime, timedelta, timezone

import pytest

from optin_service.storage import OptInRecord, OptInStore
from optin_service.testing._helpers import _BASE, _US

__all__ = ["OrderingContract"]


class OrderingContract:
    """Newest wins, then ``declined``, then the greater request id; an event already stored
    (same member, time and request id) is skipped, even if its status or source differ."""

    def test_an_older_event_lands_in_history_only(self, store: OptInStore) -> None:
        newer = OptInRecord("member-1", "accepted", _BASE + timedelta(seconds=1), "req-2")
        older = OptInRecord("member-1", "declined", _BASE, "req-1")
        assert store.set(newer) == newer
        assert store.set(older) == newer
        assert store.get("member-1") == newer
        assert store.history("member-1", 10) == [newer, older]
        assert store.count_events() == 2

    def test_an_older_event_one_microsecond_behind(self, store: OptInStore) -> None:
        newer = OptInRecord("member-1", "accepted", _BASE + _US, "req-1")
        older = OptInRecord("member-1", "declined", _BASE, "req-2")
        store.set(newer)
        assert store.set(older) == newer
        assert store.history("member-1", 10) == [newer, older]

    @pytest.mark.parametrize("declined_first", [True, False])
    def test_equal_times_declined_wins_whatever_the_order(
        self, store: OptInStore, declined_first: bool
    ) -> None:
        accepted = OptInRecord("member-1", "accepted", _BASE, "req-a")
        declined = OptInRecord("member-1", "declined", _BASE, "req-d")
        if declined_first:
            assert store.set(declined) == declined
            assert store.set(accepted) == declined
        else:
            assert store.set(accepted) == accepted
            assert store.set(declined) == declined
        assert store.get("member-1") == declined
        assert store.history("member-1", 10) == [declined, accepted]  # req-d > req-a
        assert store.count_events() == 2

    @pytest.mark.parametrize("greater_first", [True, False])
    def test_equal_times_and_answers_the_greater_request_id_wins(
        self, store: OptInStore, greater_first: bool
    ) -> None:
        greater = OptInRecord("member-1", "declined", _BASE, "req-b", "sms")
        lesser = OptInRecord("member-1", "declined", _BASE, "req-a", "web")
        if greater_first:
            assert store.set(greater) == greater
            assert store.set(lesser) == greater
        else:
            assert store.set(lesser) == lesser
            assert store.set(greater) == greater
        assert store.get("member-1") == greater
        assert store.history("member-1", 10) == [greater, lesser]

    def test_the_current_state_does_not_depend_on_arrival_order(self, store: OptInStore) -> None:
        events = [
            OptInRecord("-", "accepted", _BASE + _US, "r2"),
            OptInRecord("-", "declined", _BASE, "r9"),
            OptInRecord("-", "accepted", _BASE + _US, "r1"),
            OptInRecord("-", "declined", _BASE + _US, "r0"),
            OptInRecord("-", "declined", _BASE - _US, "r5"),
        ]
        winner = events[3]  # newest, declined, though its request id is the least
        for n, order in enumerate(itertools.permutations(events)):
            member = [dataclasses.replace(e, correlation_id=f"m{n}") for e in order]
            if n % 2:
                assert store.import_events(member) == len(member)
            else:
                for event in member:
                    store.set(event)
            expected = dataclasses.replace(winner, correlation_id=f"m{n}")
            assert store.get(f"m{n}") == expected, order
            assert store.set(member[0]) == expected  # stored already: nothing changes

    def test_an_event_already_stored_is_not_stored_again(self, store: OptInStore) -> None:
        record = OptInRecord("member-1", "accepted", _BASE, "req-1")
        newer = OptInRecord("member-1", "declined", _BASE + _US, "req-2")
        store.set(record)
        store.set(newer)
        assert store.set(record) == newer
        assert store.history("member-1", 10) == [newer, record]
        assert store.count_events() == 2

    def test_an_event_with_a_stored_identity_is_skipped_even_if_it_differs(
        self, store: OptInStore
    ) -> None:
        # Member, time and request id make an event: a second one with the same
        # three is the same event, whatever it says; the first one stands.
        first = OptInRecord("member-1", "accepted", _BASE, "req-1", "sms")
        clash = OptInRecord("member-1", "declined", _BASE, "req-1", "web")
        store.set(first)
        assert store.set(clash) == first
        assert store.get("member-1") == first
        assert store.history("member-1", 10) == [first]
        assert store.count_events() == 1

    def test_events_differing_only_in_time_are_distinct(self, store: OptInStore) -> None:
        # The default (empty) request id, as in imported events: time tells them apart.
        older = OptInRecord("member-1", "accepted", _BASE)
        newer = OptInRecord("member-1", "accepted", _BASE + timedelta(seconds=1))
        store.set(newer)
        assert store.set(older) == newer
        assert store.get("member-1") == newer
        assert store.history("member-1", 10) == [newer, older]
        assert store.count_events() == 2

    def test_precedence_holds_across_eras(self, store: OptInStore) -> None:
        """Before 1970 (negative µs), across the epoch, and far ahead, a microsecond
        apart: a store comparing times as text or as floats gets one of these wrong."""
        eras = [
            datetime(1899, 12, 31, 23, 59, 59, 999998, tzinfo=timezone.utc),
            datetime(1899, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc),
            datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc),
            datetime(1970, 1, 1, tzinfo=timezone.utc),
            datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=timezone.utc),
            datetime(2001, 9, 9, 1, 46, 39, 999999, tzinfo=timezone.utc),  # 10^15 - 1 µs
            datetime(2001, 9, 9, 1, 46, 40, tzinfo=timezone.utc),  # one more digit
            datetime(2200, 1, 1, 0, 0, 0, 1, tzinfo=timezone.utc),
        ]
        for i, moment in enumerate(eras):
            # Declined first: at the next µs an acceptance must still win.
            declined = OptInRecord(f"era-{i}", "declined", moment, f"d{i}")
            assert store.set(declined) == declined
            later = OptInRecord(f"era-{i}", "accepted", moment + _US, f"a{i}")
            assert store.set(later) == later
            assert store.get(f"era-{i}") == later
            earlier = OptInRecord(f"era-{i}", "declined", moment - _US, f"e{i}")
            assert store.set(earlier) == later
            assert store.get(f"era-{i}") == later
        for j, (older, newer) in enumerate(itertools.pairwise(eras)):
            cid = f"pair-{j}"
            newest = OptInRecord(cid, "declined", newer, "n")
            assert store.import_events([newest, OptInRecord(cid, "accepted", older, "o")]) == 2
            assert store.import_events([OptInRecord(cid, "accepted", newer, "z")]) == 1
            assert store.get(cid) == newest
