"""The change feed: which writes are changes, versions, pages and cursors, retention,
rebuild, the deliverer's state, and a reader tailing the feed while threads write."""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest

from optin_service.feed import (
    MAX_CURSOR,
    Change,
    CursorExpired,
    CursorInvalid,
    decode_cursor,
    encode_cursor,
    import_order,
)
from optin_service.storage import (
    STATUSES,
    IdempotencyKeyReused,
    OptInRecord,
    OptInStore,
    Status,
)
from optin_service.testing._helpers import _BASE, _US, _identity

__all__ = ["FeedContract"]

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


class FeedContract:
    """Every event that becomes its member's state appends one change, atomically; the
    feed reads in commit order, a page at a time, after cursors the store validates."""

    def cursor_past_the_end(self, store: OptInStore, cursor: str) -> str:
        """A cursor of ``store``'s form, but past every change it gave out (it must be
        refused as invalid). This default reads cursors of the form
        ``encode_cursor("<generation>.<seq>")``; a backend whose cursors hold another
        form overrides it."""
        match = re.fullmatch(r"(.*\.)(\d+)", decode_cursor(cursor))
        assert match, f"override cursor_past_the_end for cursors like {decode_cursor(cursor)!r}"
        return encode_cursor(f"{match[1]}{int(match[2]) + 1_000_000}")

    # --- what is a change ----------------------------------------------------------

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

    # --- imports -------------------------------------------------------------------

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

    # --- pages and cursors ---------------------------------------------------------

    def _fill(self, store: OptInStore, count: int) -> list[OptInRecord]:
        records = [
            OptInRecord(f"member-{n % 3}", STATUSES[n % 2], _BASE + n * _US, f"r{n}")
            for n in range(count)
        ]
        for record in records:
            store.set(record)
        return records

    @pytest.mark.parametrize("limit", [1, 2, 7, 25, 1000])
    def test_pages_walk_every_change_once(self, store: OptInStore, limit: int) -> None:
        records = self._fill(store, 25)
        changes = _read_all(store, limit=limit)
        assert [c.event for c in changes] == records
        assert changes == _read_all(store)
        page = store.changes(None, limit)
        assert page.changes == changes[:limit]

    def test_a_change_cursor_reads_on_right_after_it(self, store: OptInStore) -> None:
        self._fill(store, 6)
        changes = _read_all(store)
        for at, change in enumerate(changes):
            assert store.changes(change.cursor, 2).changes == changes[at + 1 : at + 3]
        last = changes[-1].cursor
        page = store.changes(last, 10)
        assert (page.changes, page.next) == ([], last)

    def test_next_of_an_empty_page_reads_what_comes_later(self, store: OptInStore) -> None:
        empty = store.changes(None, 10)
        assert empty.changes == []
        first = OptInRecord("member-1", "accepted", _BASE, "r1")
        store.set(first)
        page = store.changes(empty.next, 10)
        assert [c.event for c in page.changes] == [first]
        assert store.changes(page.next, 10).next == page.next
        second = OptInRecord("member-2", "declined", _BASE, "r2")
        store.set(second)
        assert [c.event for c in store.changes(page.next, 10).changes] == [second]
        assert [c.event for c in store.changes(None, 10).changes] == [first, second]

    def test_cursors_are_short_url_safe_ascii(self, store: OptInStore) -> None:
        self._fill(store, 3)
        cursors = [store.changes(None, 1).next, *(c.cursor for c in _read_all(store))]
        cursors.append(store.changes(None, 10).next)
        for cursor in cursors:
            assert isinstance(cursor, str)
            assert 0 < len(cursor) <= MAX_CURSOR
            assert urllib.parse.quote(cursor, safe="") == cursor, cursor

    @pytest.mark.parametrize(
        "cursor",
        [
            "",
            "!",
            "not a cursor",
            "%2F",
            "é",
            "a" * (MAX_CURSOR + 1),
            encode_cursor(""),
            encode_cursor("nonsense"),
            encode_cursor("."),
            encode_cursor("x.y"),
            encode_cursor("x.-1"),
            encode_cursor("x.1.2"),
            encode_cursor("\x00"),
            "_w",  # base64url of a byte that is not UTF-8
        ],
    )
    def test_a_cursor_the_store_did_not_give_out_is_invalid(
        self, store: OptInStore, cursor: str
    ) -> None:
        self._fill(store, 2)
        with pytest.raises(CursorInvalid):
            store.changes(cursor, 10)

    def test_a_cursor_past_the_last_change_is_invalid(self, store: OptInStore) -> None:
        self._fill(store, 3)
        future = self.cursor_past_the_end(store, _read_all(store)[-1].cursor)
        with pytest.raises(CursorInvalid):
            store.changes(future, 10)
        empty = store.changes(None, 1).next
        with pytest.raises(CursorInvalid):
            store.changes(self.cursor_past_the_end(store, empty), 10)

    # --- retention -----------------------------------------------------------------

    def test_prune_removes_old_changes_and_expires_cursors_into_them(
        self, store: OptInStore
    ) -> None:
        start = store.changes(None, 10).next
        old = self._fill(store, 2)
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
        self._fill(store, 40)  # backend tests shrink their batches below this
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
        self._fill(store, 3)
        assert store.prune_changes(datetime.now(timezone.utc) - timedelta(days=1)) == 0
        assert len(_read_all(store)) == 3

    # --- rebuild -------------------------------------------------------------------

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

    # --- the deliverer's state -------------------------------------------------------

    def test_save_state_and_load_state(self, store: OptInStore) -> None:
        assert store.load_state("position") is None
        assert store.save_state("position", "abc") is True
        assert store.load_state("position") == "abc"
        assert store.save_state("position", "é" * 300) is True
        assert store.load_state("position") == "é" * 300
        assert store.save_state("lease", "") is True
        assert store.load_state("lease") == ""
        assert store.load_state("position") == "é" * 300
        assert store.save_state("position", None) is True
        assert store.load_state("position") is None
        assert store.save_state("position", None) is True  # deleting nothing
        store.close()
        assert store.load_state("lease") == ""

    def test_save_state_compare_and_set(self, store: OptInStore) -> None:
        # expected=None: only if absent.
        assert store.save_state("k", "v1", expected=None) is True
        assert store.save_state("k", "v2", expected=None) is False
        assert store.load_state("k") == "v1"
        # expected=value: only if that is the stored value.
        assert store.save_state("k", "v2", expected="v0") is False
        assert store.save_state("k", "v2", expected="") is False
        assert store.load_state("k") == "v1"
        assert store.save_state("k", "v2", expected="v1") is True
        assert store.save_state("k", "v2", expected="v2") is True  # the same value again
        assert store.load_state("k") == "v2"
        # Deleting, with and without an expected value.
        assert store.save_state("k", None, expected="v1") is False
        assert store.load_state("k") == "v2"
        assert store.save_state("k", None, expected="v2") is True
        assert store.load_state("k") is None
        assert store.save_state("k", None, expected="v2") is False
        assert store.save_state("k", None, expected=None) is True
        assert store.save_state("k", "", expected="") is False  # "" is a value, not absence
        assert store.load_state("k") is None

    def test_save_state_compare_and_set_has_one_winner_among_threads(
        self, store: OptInStore
    ) -> None:
        threads, expected = 8, None
        barrier = threading.Barrier(threads)
        with ThreadPoolExecutor(threads) as pool:
            for round_ in range(4):

                def attempt(t: int, round_: int = round_, expected: str | None = expected) -> bool:
                    barrier.wait()
                    return store.save_state("lease", f"{round_}-{t}", expected=expected)

                won = list(pool.map(attempt, range(threads)))
                assert won.count(True) == 1, won
                expected = f"{round_}-{won.index(True)}"
                assert store.load_state("lease") == expected

    # --- commit order under concurrency -------------------------------------------

    def test_a_reader_tailing_while_threads_write_sees_each_change_once_in_order(
        self, store: OptInStore
    ) -> None:
        """Threads write (sets with older events, replays and refusals among them, and
        one bulk import) while a reader tails the feed a few changes at a time. The
        reader sees every change exactly once, in the order a reader from the start
        sees them afterwards: a store whose positions are not in commit order loses
        the change that committed after a greater position was read."""
        writers, writes = 4, 60
        members = [f"member-{i}" for i in range(6)]
        caught_up, writing_done = threading.Event(), threading.Event()
        tailed: list[Change] = []
        tailed_while_writing = [0]

        def write(t: int) -> None:
            rng = random.Random(t)
            for i in range(writes):
                if i == writes // 3:  # let the reader catch something mid-stream
                    caught_up.wait(10)
                # Times mostly rising, so most writes are changes; some fall behind.
                stamp = _BASE + (i * writers + rng.randrange(3 * writers)) * _US
                record = OptInRecord(rng.choice(members), rng.choice(STATUSES), stamp, f"w{t}-{i}")
                key = f"k{t}-{i // 2}" if i % 4 < 2 else None  # pairs: a write, a replay
                try:
                    store.set(record, idempotency_key=key)
                except IdempotencyKeyReused:
                    pass

        def import_() -> None:
            rng = random.Random(99)
            caught_up.wait(10)
            stream = [
                OptInRecord(
                    rng.choice(members),
                    rng.choice(STATUSES),
                    _BASE + rng.randrange(writes * writers) * _US,
                    f"i{n}",
                ).row
                for n in range(120)
            ]
            store.import_rows(stream)

        def tail() -> None:
            after = None
            while True:
                done = writing_done.is_set()  # before the read: then an empty page is the end
                page = store.changes(after, 3)
                tailed.extend(page.changes)
                after = page.next
                if page.changes:
                    caught_up.set()
                    if not done:
                        tailed_while_writing[0] += len(page.changes)
                elif done:
                    return
                else:
                    time.sleep(0.001)

        with ThreadPoolExecutor(writers + 2) as pool:
            reader = pool.submit(tail)
            work = [pool.submit(write, t) for t in range(writers)] + [pool.submit(import_)]
            for future in work:
                future.result()
            writing_done.set()
            reader.result()

        full = _read_all(store)
        assert tailed == full, _difference("tailed", tailed, "read afterwards", full)
        assert tailed_while_writing[0] > 0  # the reader did tail the writes
        _assert_consistent(store, full)
        assert {c.event.correlation_id for c in full} == set(members)
