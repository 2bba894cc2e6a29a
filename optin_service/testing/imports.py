"""Bulk paths: ``import_events``, ``import_rows``, and the stream ``events``, ``rows``,
``count_events`` give back."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

from optin_service.storage import STATUSES, OptInRecord, OptInStore
from optin_service.testing._helpers import (
    _BASE,
    _US,
    _all_events,
    _assert_utc,
    _newest_first,
    _sort_key,
)

__all__ = ["ImportsContract"]


class ImportsContract:
    """An import stores what a ``set`` per event would, skips events already stored, and
    returns how many it added; the stream yields every event once, filtered by ``since``."""

    def _batch(self) -> list[OptInRecord]:
        return [
            OptInRecord("member-1", "declined", _BASE + 2 * _US, "r2"),
            OptInRecord("member-1", "accepted", _BASE + 3 * _US, "r3"),
            OptInRecord("member-1", "accepted", _BASE, "r1", "sms"),
            OptInRecord("member-2", "declined", _BASE, "r1"),
            OptInRecord("member-2", "accepted", _BASE, "r2"),
            OptInRecord("{x}", "accepted", _BASE - timedelta(days=365 * 40), "", "legacy"),
        ]

    def test_import_applies_the_ordering_rule(self, store: OptInStore) -> None:
        batch = self._batch()
        assert store.import_events(batch) == len(batch)
        assert store.get("member-1") == batch[1]  # newest, though not last
        assert store.get("member-2") == batch[3]  # equal times: declined
        assert store.get("{x}") == batch[5]
        assert store.history("member-1", 10) == _newest_first(batch[:3])
        assert _all_events(store) == sorted(batch, key=_sort_key)
        assert store.count_events() == len(batch)

    def test_import_behind_the_current_state_lands_in_history_only(self, store: OptInStore) -> None:
        current = OptInRecord("member-1", "accepted", _BASE + timedelta(days=1), "live")
        store.set(current)
        assert store.import_events(self._batch()) == len(self._batch())
        assert store.get("member-1") == current
        assert store.history("member-1", 10)[0] == current

    def test_importing_the_same_batch_twice_changes_nothing(self, store: OptInStore) -> None:
        batch = self._batch()
        assert store.import_events(batch) == len(batch)
        events = _all_events(store)
        current = {cid: store.get(cid) for cid in ("member-1", "member-2", "{x}")}
        assert store.import_events(batch) == 0
        assert store.import_events(reversed(batch)) == 0
        assert _all_events(store) == events
        assert {cid: store.get(cid) for cid in current} == current
        assert store.count_events() == len(batch)

    def test_import_skips_stored_events_and_repeats_within_the_batch(
        self, store: OptInStore
    ) -> None:
        stored = OptInRecord("member-1", "accepted", _BASE, "r1")
        store.set(stored)
        new = OptInRecord("member-1", "declined", _BASE - _US, "r0")
        assert store.import_events([stored, new, new, stored]) == 1
        assert store.history("member-1", 10) == [stored, new]
        assert store.get("member-1") == stored

    def test_import_skips_an_event_with_a_stored_identity_even_if_it_differs(
        self, store: OptInStore
    ) -> None:
        stored = OptInRecord("member-1", "accepted", _BASE, "r1", "sms")
        store.set(stored)
        clash = OptInRecord("member-1", "declined", _BASE, "r1", "web")
        assert store.import_events([clash]) == 0
        assert store.get("member-1") == stored
        assert store.history("member-1", 10) == [stored]
        assert list(store.events()) == [stored]

    def test_import_of_nothing(self, store: OptInStore) -> None:
        assert store.import_events([]) == 0
        assert store.import_events(iter(())) == 0
        assert store.count_events() == 0

    def test_import_takes_any_iterable(self, store: OptInStore) -> None:
        batch = self._batch()
        assert store.import_events(e for e in batch) == len(batch)
        assert store.count_events() == len(batch)

    def test_rows_are_the_events_as_tuples(self, store: OptInStore) -> None:
        batch = self._batch()
        store.import_events(batch)
        assert sorted(store.rows()) == sorted(e.row for e in batch)
        since = _BASE + _US
        assert sorted(store.rows(since)) == sorted(e.row for e in batch if e.updated_at >= since)

    def test_import_rows_of_a_long_shuffled_stream(self, store: OptInStore) -> None:
        """A stream longer than a bulk path's batches (backend tests shrink them) with
        ties, repeats and clashes (one identity, other fields: the first one wins),
        in random order, on top of stored events: as if imported one by one."""
        rng = random.Random(20261126)
        stored = [
            OptInRecord(f"member-{i}", "accepted", _BASE + i * _US, "r0", "early")
            for i in range(0, 30, 3)
        ]
        for record in stored:
            store.set(record)
        stream = [
            OptInRecord(
                f"member-{rng.randrange(30)}",
                rng.choice(STATUSES),
                _BASE + rng.randrange(4) * _US,  # few times: many ties
                f"r{rng.randrange(3)}",  # few request ids: clashes with stored events
                rng.choice(("API", "WEB", "early")),
                rng.choice(("", "crm")),
            )
            for _ in range(400)
        ]
        stream += rng.sample(stream, 60)  # repeats
        rng.shuffle(stream)
        # The model: an identity keeps the first event seen (stored ones first).
        kept: dict[tuple[str, int, str], OptInRecord] = {}
        for record in [*stored, *stream]:
            kept.setdefault(
                (record.correlation_id, record.updated_at_us, record.request_id), record
            )
        assert store.import_rows(e.row for e in stream) == len(kept) - len(stored)
        assert _all_events(store) == sorted(kept.values(), key=_sort_key)
        for i in range(30):
            events = [e for e in kept.values() if e.correlation_id == f"member-{i}"]
            expected = max(events, key=lambda e: e.precedence) if events else None
            assert store.get(f"member-{i}") == expected, i
        assert store.import_rows(e.row for e in reversed(stream)) == 0
        assert _all_events(store) == sorted(kept.values(), key=_sort_key)

    def test_events_since_filters_inclusively(self, store: OptInStore) -> None:
        batch = self._batch()
        store.import_events(batch)
        assert sorted(store.events(None), key=_sort_key) == sorted(batch, key=_sort_key)
        for since in (_BASE, _BASE + _US, _BASE + 2 * _US, _BASE + 3 * _US, _BASE + 4 * _US):
            expected = sorted((e for e in batch if e.updated_at >= since), key=_sort_key)
            assert sorted(store.events(since), key=_sort_key) == expected, since
        assert len(list(store.events(_BASE))) == 5
        assert len(list(store.events(_BASE + 3 * _US))) == 1
        assert list(store.events(_BASE + 4 * _US)) == []
        assert len(list(store.events(datetime(1970, 1, 1, tzinfo=timezone.utc)))) == 6

    def test_events_of_an_empty_store(self, store: OptInStore) -> None:
        assert list(store.events()) == []
        assert list(store.events(_BASE)) == []
        assert store.count_events() == 0

    def test_events_returns_utc_records(self, store: OptInStore) -> None:
        store.import_events(self._batch())
        for event in store.events():
            _assert_utc(event)

    def test_count_events_counts_every_event_once(self, store: OptInStore) -> None:
        assert store.count_events() == 0
        store.set(OptInRecord("count-1", "accepted", _BASE, "r1"))
        store.set(OptInRecord("count-1", "accepted", _BASE, "r1"))  # the same event
        assert store.count_events() == 1
        store.set(OptInRecord("count-1", "declined", _BASE - _US, "r0"))  # older
        store.set(OptInRecord("count-2", "declined", _BASE, "r1"))
        assert store.count_events() == 3
        store.import_events(self._batch())
        assert store.count_events() == 3 + len(self._batch())
