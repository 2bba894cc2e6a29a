"""What the change feed's mixins share: reading a whole feed, checking it, and a model
of which events are changes.

Private to :mod:`optin_service.testing`; a plugin author needs only the mixins.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from optin_service.feed import Change, import_order
from optin_service.storage import STATUSES, OptInRecord, OptInStore, Status
from optin_service.testing._helpers import _BASE, _US, _identity

#: What a test compares of a change when cursors do not matter: (event, previous, version).
_Entry = tuple[OptInRecord, "Status | None", int]

# Clocks: prune_changes compares append times with the caller's clock, and stores keep
# them to the millisecond at least; a gap this long on each side of a cut is unambiguous.
_CLOCK_GAP = 0.05


def _read_all(store: OptInStore, after: str | None = None, limit: int = 1000) -> list[Change]:
    """Every change after ``after``, page by page up to the first empty page, checking
    each page's ``next`` on the way."""
    changes: list[Change] = []
    while True:
        page = store.changes(after, limit)
        assert len(page.changes) <= limit, (limit, page)
        if not page.changes:
            if after is not None:
                assert page.next == after  # an empty page: read on from the same place
            return changes
        assert page.next == page.changes[-1].cursor
        changes.extend(page.changes)
        after = page.next
        assert len(changes) < 1_000_000, "the feed never ends"


def _entries(changes: Iterable[Change]) -> list[_Entry]:
    return [(c.event, c.previous, c.version) for c in changes]


def _by_member(changes: Iterable[Change]) -> dict[str, list[Change]]:
    members: dict[str, list[Change]] = {}
    for change in changes:
        members.setdefault(change.event.correlation_id, []).append(change)
    return members


def _assert_consistent(store: OptInStore, changes: list[Change]) -> None:
    """What holds for a whole feed (read from its first change): each member's changes
    in feed order have versions 1..k, each replaces the one before it (``previous``, a
    greater precedence), each is a stored event, and the last is the member's state."""
    assert len({c.cursor for c in changes}) == len(changes), "a cursor given twice"
    for cid, mine in _by_member(changes).items():
        assert [c.version for c in mine] == list(range(1, len(mine) + 1)), cid
        assert mine[0].previous is None, cid
        for before, after in itertools.pairwise(mine):
            assert after.previous == before.event.status, (before, after)
            assert after.event.precedence > before.event.precedence, (before, after)
        assert mine[-1].event == store.get(cid), cid
        stored = set(store.history(cid, 100_000))
        assert all(c.event in stored for c in mine), cid


def _difference(name: str, one: list[Change], other_name: str, other: list[Change]) -> str:
    """Where two reads of the feed part (an assertion's message)."""
    shorter = min(len(one), len(other))
    at = next((i for i in range(shorter) if one[i] != other[i]), shorter)
    return (
        f"{name}: {len(one)} changes, {other_name}: {len(other)}; they part at {at}: "
        f"{one[at : at + 1]} vs {other[at : at + 1]}"
    )


class _Model:
    """What a store's feed must hold: applied in the order given, an event not yet stored
    that takes precedence over its member's state is a change."""

    def __init__(self) -> None:
        self.stored: set[tuple[str, int, str]] = set()
        self.state: dict[str, tuple[OptInRecord, int]] = {}
        self.changes: list[_Entry] = []

    def apply(self, record: OptInRecord) -> None:
        if _identity(record) in self.stored:
            return
        self.stored.add(_identity(record))
        current = self.state.get(record.correlation_id)
        if current is None or record.precedence > current[0].precedence:
            version = 1 if current is None else current[1] + 1
            self.state[record.correlation_id] = (record, version)
            self.changes.append((record, None if current is None else current[0].status, version))

    def import_(self, stream: Iterable[OptInRecord]) -> None:
        """An import: the first of each identity, each member's events oldest first."""
        first: dict[tuple[str, int, str], OptInRecord] = {}
        for record in stream:
            first.setdefault(_identity(record), record)
        for record in sorted(first.values(), key=lambda r: import_order(r.row)):
            self.apply(record)

    def of(self, cid: str) -> list[_Entry]:
        return [entry for entry in self.changes if entry[0].correlation_id == cid]


def _fill(store: OptInStore, count: int) -> list[OptInRecord]:
    """``count`` sets to three members, each a change (times rise); the records, in order."""
    records = [
        OptInRecord(f"member-{n % 3}", STATUSES[n % 2], _BASE + n * _US, f"r{n}")
        for n in range(count)
    ]
    for record in records:
        store.set(record)
    return records
