"""The changes an import makes: each member's events applied oldest first, the first
of an identity kept, the same changes as setting the events one by one."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable

from optin_service.feed import import_order
from optin_service.storage import STATUSES, OptInRecord, OptInStore
from optin_service.testing._feed import (
    _assert_consistent,
    _by_member,
    _entries,
    _Model,
    _read_all,
)
from optin_service.testing._helpers import _BASE, _US, _identity

__all__ = ["ImportedChangesContract"]


class ImportedChangesContract:
    """``import_events`` and ``import_rows`` append the changes their events would make
    set one at a time in import order (each member's oldest first), and none for an
    event already stored."""

    def test_an_import_applies_each_members_events_oldest_first(self, store: OptInStore) -> None:
        events = [
            OptInRecord("member-1", "accepted", _BASE, "r1"),
            # Equal times: accepted before declined (r2 before r3), whatever the request ids.
            OptInRecord("member-1", "accepted", _BASE + _US, "r9"),
            OptInRecord("member-1", "declined", _BASE + _US, "r2"),
            OptInRecord("member-1", "declined", _BASE + _US, "r3"),
            OptInRecord("member-1", "accepted", _BASE + 2 * _US, "r0"),
        ]
        store.import_events(reversed(events))
        expected = [
            (e, None if i == 0 else events[i - 1].status, i + 1) for i, e in enumerate(events)
        ]
        assert _entries(_read_all(store)) == expected

    def test_an_import_keeps_the_first_of_an_identity(self, store: OptInStore) -> None:
        first = OptInRecord("member-1", "declined", _BASE, "r1", "sms")
        store.import_events([first, dataclasses.replace(first, status="accepted", source="web")])
        store.import_events(
            [
                dataclasses.replace(first, correlation_id="member-2", source="web"),
                dataclasses.replace(first, correlation_id="member-2", status="accepted"),
            ]
        )
        second = dataclasses.replace(first, correlation_id="member-2", source="web")
        assert _entries(_read_all(store)) == [(first, None, 1), (second, None, 1)]

    def test_imported_older_events_are_absent_and_newer_ones_present(
        self, store: OptInStore
    ) -> None:
        current = OptInRecord("member-1", "accepted", _BASE, "live")
        store.set(current)
        older = [
            OptInRecord("member-1", s, _BASE - n * _US, f"o{n}")
            for n, s in [(1, "declined"), (2, "accepted")]
        ]
        newer = [
            OptInRecord("member-1", "declined", _BASE + 2 * _US, "n2"),
            OptInRecord("member-1", "declined", _BASE + _US, "n1"),
        ]
        store.import_events([newer[0], *older, newer[1]])
        assert _entries(_read_all(store)) == [
            (current, None, 1),
            (newer[1], "accepted", 2),
            (newer[0], "declined", 3),
        ]
        assert store.get("member-1") == newer[0]

    def test_an_import_gives_the_changes_of_its_events_set_one_by_one(
        self, store: OptInStore
    ) -> None:
        """A long shuffled stream (longer than the bulk paths' batches, which backend
        tests shrink) with ties, repeats and clashes, on top of stored events: members
        ``a-*`` take it as one import, members ``b-*`` take the same events one ``set``
        at a time in import order; both feeds match the model."""
        rng = random.Random(20261206)
        stored = [
            OptInRecord(f"member-{i}", "accepted", _BASE + 2 * _US, "r0", "early")
            for i in range(0, 12, 3)
        ]
        stream = [
            OptInRecord(
                f"member-{rng.randrange(12)}",
                rng.choice(STATUSES),
                _BASE + rng.randrange(5) * _US,
                f"r{rng.randrange(4)}",
                rng.choice(("API", "WEB", "early")),
            )
            for _ in range(300)
        ]
        stream += rng.sample(stream, 40)
        rng.shuffle(stream)

        def as_member(prefix: str, records: Iterable[OptInRecord]) -> list[OptInRecord]:
            return [
                dataclasses.replace(r, correlation_id=prefix + r.correlation_id) for r in records
            ]

        model = _Model()
        for prefix in ("a-", "b-"):
            for record in as_member(prefix, stored):
                store.set(record)
                model.apply(record)
        store.import_rows(r.row for r in as_member("a-", stream))
        model.import_(as_member("a-", stream))
        first: dict[tuple[str, int, str], OptInRecord] = {}
        for record in as_member("b-", stream):
            first.setdefault(_identity(record), record)
        for record in sorted(first.values(), key=lambda r: import_order(r.row)):
            store.set(record)
            model.apply(record)

        changes = _read_all(store)
        _assert_consistent(store, changes)
        for i in range(12):
            a, b = f"a-member-{i}", f"b-member-{i}"
            mine = _entries(_by_member(changes).get(a, []))
            assert mine == model.of(a), a
            theirs = _entries(_by_member(changes).get(b, []))
            assert [(dataclasses.replace(e, correlation_id=a), p, v) for e, p, v in theirs] == mine
        assert store.import_rows(r.row for r in as_member("a-", stream)) == 0
        assert _read_all(store) == changes
