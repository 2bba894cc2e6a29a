"""What leaves the change feed: ``prune_changes`` removes old changes, ``rebuild_changes``
replaces them all with changes made from the events; cursors into what left expire."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from optin_service.feed import CursorExpired
from optin_service.storage import OptInRecord, OptInStore
from optin_service.testing._feed import (
    _CLOCK_GAP,
    _assert_consistent,
    _entries,
    _fill,
    _read_all,
)
from optin_service.testing._helpers import _BASE, _US

__all__ = ["RetentionContract"]


class RetentionContract:
    """Pruning removes the changes appended before a time (versions go on counting) and
    rebuilding replays each member's events oldest first; a cursor into removed changes
    is :class:`~optin_service.feed.CursorExpired`, one right after them still reads on."""

    def test_prune_removes_old_changes_and_expires_cursors_into_them(
        self, store: OptInStore
    ) -> None:
        start = store.changes(None, 10).next
        old = _fill(store, 2)
        before = _read_all(store)
        time.sleep(_CLOCK_GAP)
        cut = datetime.now(timezone.utc)
        time.sleep(_CLOCK_GAP)
        new = OptInRecord("member-0", "declined", _BASE + 9 * _US, "r9")
        store.set(new)
        assert store.prune_changes(cut) == len(old)
        kept = _read_all(store)
        assert _entries(kept) == [(new, "accepted", 2)]  # versions go on counting
        for cursor in (start, before[0].cursor):
            with pytest.raises(CursorExpired):
                store.changes(cursor, 10)
        # Right after the removed changes: nothing was skipped, the cursor still works.
        assert store.changes(before[-1].cursor, 10).changes == kept
        assert store.changes(None, 10).changes == kept
        assert store.prune_changes(cut) == 0
        assert _read_all(store) == kept

    def test_prune_of_more_changes_than_a_batch(self, store: OptInStore) -> None:
        _fill(store, 40)  # backend tests shrink their batches below this
        time.sleep(_CLOCK_GAP)
        cut = datetime.now(timezone.utc)
        time.sleep(_CLOCK_GAP)
        later = OptInRecord("member-9", "accepted", _BASE, "late")
        store.set(later)
        assert store.prune_changes(cut) == 40
        assert _entries(_read_all(store)) == [(later, None, 1)]

    def test_after_pruning_every_change_next_still_works(self, store: OptInStore) -> None:
        first = OptInRecord("member-1", "accepted", _BASE, "r1")
        store.set(first)
        last = _read_all(store)[-1].cursor
        assert store.prune_changes(datetime.now(timezone.utc) + timedelta(days=1)) == 1
        page = store.changes(None, 10)
        assert page.changes == []
        assert store.changes(page.next, 10).changes == []
        assert store.changes(last, 10).changes == []
        second = OptInRecord("member-1", "declined", _BASE + _US, "r2")
        store.set(second)
        for cursor in (page.next, last, None):
            assert _entries(store.changes(cursor, 10).changes) == [(second, "accepted", 2)]

    def test_prune_before_any_change_removes_nothing(self, store: OptInStore) -> None:
        assert store.prune_changes(datetime.now(timezone.utc)) == 0
        _fill(store, 3)
        assert store.prune_changes(datetime.now(timezone.utc) - timedelta(days=1)) == 0
        assert len(_read_all(store)) == 3

    def test_rebuild_replays_each_members_events_oldest_first(self, store: OptInStore) -> None:
        start = store.changes(None, 10).next
        store.set(OptInRecord("member-1", "accepted", _BASE + 5 * _US, "r5"))
        store.set(OptInRecord("member-1", "declined", _BASE + _US, "r1"))  # older: no change
        store.set(OptInRecord("member-2", "accepted", _BASE, "r0"))
        store.import_events(
            [
                OptInRecord("member-1", "accepted", _BASE + 3 * _US, "r3"),
                OptInRecord("member-2", "declined", _BASE, "r0b"),
                OptInRecord("member-1", "accepted", _BASE + 9 * _US, "r9"),
                OptInRecord("member-3", "declined", _BASE, "r0"),
            ]
        )
        old = _read_all(store)
        assert len(old) == 5
        assert store.rebuild_changes() == store.count_events() == 7
        rebuilt = _read_all(store)
        _assert_consistent(store, rebuilt)
        members = [c.event.correlation_id for c in rebuilt]
        assert sorted(set(members)) == ["member-1", "member-2", "member-3"]
        for cid in set(members):  # every event, members one after another
            mine = [c.event for c in rebuilt if c.event.correlation_id == cid]
            assert mine == sorted(store.history(cid, 100), key=lambda e: e.precedence)
            assert members.count(cid) == len(mine)
            first = members.index(cid)
            assert members[first : first + len(mine)] == [cid] * len(mine)
        for cursor in (start, old[0].cursor, old[-1].cursor):
            with pytest.raises(CursorExpired):
                store.changes(cursor, 10)
        later = OptInRecord("member-2", "accepted", _BASE + _US, "r1")
        store.set(later)
        assert _entries(store.changes(rebuilt[-1].cursor, 10).changes) == [(later, "declined", 3)]
        _assert_consistent(store, _read_all(store))

    def test_rebuild_of_an_empty_store(self, store: OptInStore) -> None:
        start = store.changes(None, 10).next
        assert store.rebuild_changes() == 0
        page = store.changes(None, 10)
        assert page.changes == []
        record = OptInRecord("member-1", "accepted", _BASE, "r1")
        store.set(record)
        assert _entries(store.changes(page.next, 10).changes) == [(record, None, 1)]
        with pytest.raises(CursorExpired):
            store.changes(start, 10)
