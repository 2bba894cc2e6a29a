"""A contract suite every :class:`~optin_service.storage.OptInStore` must pass.

Backends in this repository run it, and so can third-party plugins: subclass
:class:`StoreContract` under a ``Test`` name (so pytest collects it) and supply
a ``store`` fixture yielding a fresh, empty store that it closes afterwards::

    import pytest
    from optin_service.testing import StoreContract

    class TestMyStore(StoreContract):
        @pytest.fixture
        def store(self):
            store = MyStore.from_url("mine://localhost/optin-test")
            yield store
            store.close()

:func:`store_state_machine` is also usable on its own, with any settings.

What the suite holds a store to (see :class:`~optin_service.storage.OptInStore`):

- every ``set`` records an event; an event already stored (same member, time
  and request id) is skipped, even if its status or source differ;
- the current state is the event with the greatest
  :attr:`~optin_service.storage.OptInRecord.precedence` (newest, then
  ``declined``, then the greater request id): it depends on which events are
  stored, never on the order they arrived in;
- history is newest first by :attr:`~optin_service.storage.OptInRecord.position`,
  and a cursor is a position, so pages stay exact while events arrive;
- an ``Idempotency-Key`` replays (same fingerprint) or is refused (another
  fingerprint) per member, writing nothing either way.

This module imports pytest and hypothesis, which are test dependencies: import
it from tests only, never from the service.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import string
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import TypeVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from optin_service.storage import (
    DEFAULT_SOURCE,
    STATUSES,
    IdempotencyKeyReused,
    OptInRecord,
    OptInStore,
)

__all__ = ["STATE_MACHINE_SETTINGS", "StoreContract", "store_state_machine"]

_T = TypeVar("_T")

#: Ids that look like key separators, hash tags or path pieces to a backend.
#: Braces are outside what the API accepts, but a store must not care.
TRICKY_IDS: tuple[str, ...] = ("a:b", "a", "b", "{x}", "x}", "x", "@", "..", ".", "a-b", "a_b")

_ALPHABET = "ABCXYZabcxyz0189._:@-"
#: 128-character ids mixing every allowed character class, differing in one place.
LONG_IDS: tuple[str, ...] = (
    (_ALPHABET * 7)[:128],
    (_ALPHABET * 7)[:127] + "-",
    "-" + (_ALPHABET * 7)[:127],
    "@" * 128,
    ":" * 128,
    "." * 128,
)

#: How long the contract's stateful test runs: enough to find ordering bugs, fast enough for CI.
#: One failure reported, not every distinct one: shrinking each costs about a minute.
STATE_MACHINE_SETTINGS = settings(
    max_examples=25, stateful_step_count=20, deadline=None, report_multiple_bugs=False
)

_BASE = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)

# What the API accepts (optin_service.schemas), as alphabets: st.text draws far
# faster than st.from_regex, which matters when hypothesis shrinks a failure.
_ID_CHARS = string.ascii_letters + string.digits + "._:@-"  # member ids
_SOURCE_CHARS = string.ascii_letters + string.digits + "_-"  # X-Consent-Source, 1 to 32
_PRINTABLE = "".join(map(chr, range(0x20, 0x7F)))  # Idempotency-Key 1 to 255, client 0 to 128
_REQUEST_ID_CHARS = _PRINTABLE[1:]  # request ids: printable, no space, 1 to 128

# Each state machine example puts its ids under a random prefix of this length,
# so examples cannot see each other's writes even when they share one store.
_PREFIX_LEN = 13
_MAX_SUFFIX = 128 - _PREFIX_LEN


def _id_suffixes() -> st.SearchStrategy[str]:
    """The state machine's ids after its prefix: tricky ones, and any the API accepts."""
    return st.one_of(
        st.sampled_from(TRICKY_IDS + tuple(i[:_MAX_SUFFIX] for i in LONG_IDS)),
        st.text(_ID_CHARS, min_size=1, max_size=_MAX_SUFFIX),
    )


def _timestamps() -> st.SearchStrategy[datetime]:
    """UTC datetimes with microseconds, from the epoch to the end of 2100."""
    return st.datetimes(
        min_value=datetime(1970, 1, 1),
        max_value=datetime(2100, 12, 31, 23, 59, 59, 999999),
        timezones=st.just(timezone.utc),
    )


def _mostly(common: st.SearchStrategy[_T], rare: st.SearchStrategy[_T]) -> st.SearchStrategy[_T]:
    """``common`` three times in four (so values repeat and events clash), else ``rare``."""
    return st.one_of(common, common, common, rare)


def _event_times() -> st.SearchStrategy[datetime]:
    """Mostly one of three neighbouring microseconds (so times tie and cross), else any."""
    return _mostly(st.sampled_from([_BASE + n * _US for n in range(3)]), _timestamps())


def _templates() -> st.SearchStrategy[OptInRecord]:
    """Events without their member: any status and time; request id, source and client
    mostly from a few values, so that events share them.

    The empty request id is :class:`OptInRecord`'s default, kept for imported events.
    """
    return st.builds(
        OptInRecord,
        correlation_id=st.just("-"),
        status=st.sampled_from(STATUSES),
        updated_at=_event_times(),
        request_id=_mostly(
            st.sampled_from(("", "r1")), st.text(_REQUEST_ID_CHARS, min_size=1, max_size=128)
        ),
        source=_mostly(
            st.sampled_from((DEFAULT_SOURCE, "sms")),
            st.text(_SOURCE_CHARS, min_size=1, max_size=32),
        ),
        client=_mostly(st.sampled_from(("", "crm")), st.text(_PRINTABLE, max_size=128)),
    )


def _idempotency_keys() -> st.SearchStrategy[str]:
    """Mostly two keys, so replays and conflicts happen; sometimes any key the API accepts."""
    return _mostly(st.sampled_from(("k1", "k2")), st.text(_PRINTABLE, min_size=1, max_size=255))


def _assert_utc(record: OptInRecord) -> None:
    assert record.updated_at.utcoffset() == timedelta(0), record


def _identity(record: OptInRecord) -> tuple[str, int, str]:
    """What makes an event the same event: member, time, request id."""
    return (record.correlation_id, record.updated_at_us, record.request_id)


def _sort_key(record: OptInRecord) -> tuple[str, int, str, str, str, str]:
    """A total order on events, to compare what ``events()`` yields in any order."""
    return (*_identity(record), record.status, record.source, record.client)


def _newest_first(events: Iterable[OptInRecord]) -> list[OptInRecord]:
    """What ``history`` returns: newest first by position."""
    return sorted(events, key=lambda e: e.position, reverse=True)


def _current(events: Iterable[OptInRecord]) -> OptInRecord | None:
    """The current state once ``events`` are stored, in any order: the greatest precedence.

    Precedence ends with the request id, so distinct events never tie.
    """
    return max(events, key=lambda e: e.precedence, default=None)


def _pages(store: OptInStore, correlation_id: str, limit: int) -> list[list[OptInRecord]]:
    """Every history page of a member, each from the cursor the previous one ended at.

    Stops after the first page shorter than ``limit`` (an empty one included).
    """
    pages, before = [], None
    while True:
        page = store.history(correlation_id, limit, before)
        assert len(page) <= limit, (limit, page)
        pages.append(page)
        if len(page) < limit:
            return pages
        before = page[-1].position
        assert len(pages) < 10_000, "history never ends"


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


def _all_events(store: OptInStore) -> list[OptInRecord]:
    return sorted(store.events(), key=_sort_key)


def store_state_machine(make_store: Callable[[], OptInStore]) -> type[RuleBasedStateMachine]:
    """A hypothesis state machine checking a store against a model of events.

    The model is, per member, the list of its events; the current state is the
    one with the greatest precedence; idempotency keys are a dict
    ``(member, key) -> first request``, whose fingerprint a later request must
    match (keys never expire here: time is not simulated). After every step,
    each member's current state and whole history must match the model.

    Each example calls ``make_store()`` once and closes the store at the end.
    Every example uses ids under a random prefix of its own (the ids stay within
    the API's 128 characters), so ``make_store`` may return a fresh store or the
    same one each time. Run it with
    ``run_state_machine_as_test(store_state_machine(make), settings=...)``.
    """

    class StoreStateMachine(RuleBasedStateMachine):
        """Sets (plain, with idempotency keys), imports, gets, history pages and
        close/reopen on a store, mirrored on a model."""

        suffixes = Bundle("suffixes")
        keyed = Bundle("keyed")  # (suffix, Idempotency-Key) pairs already used

        def __init__(self) -> None:
            super().__init__()
            self.store = make_store()
            self.prefix = f"{uuid.uuid4().hex[: _PREFIX_LEN - 1]}:"
            self.model: dict[str, list[OptInRecord]] = {}
            # (member, Idempotency-Key) -> the first request made with it
            self.keys: dict[tuple[str, str], OptInRecord] = {}

        # --- the model -------------------------------------------------------

        def _add(self, record: OptInRecord) -> bool:
            """Store ``record`` in the model; False if that event was already stored."""
            events = self.model.setdefault(record.correlation_id, [])
            if any(_identity(e) == _identity(record) for e in events):
                return False
            events.append(record)
            return True

        def _current(self, correlation_id: str) -> OptInRecord | None:
            return _current(self.model.get(correlation_id, []))

        def _event(self, suffix: str, template: OptInRecord) -> OptInRecord:
            return dataclasses.replace(template, correlation_id=self.prefix + suffix)

        def _set(self, record: OptInRecord, **changes: object) -> None:
            record = dataclasses.replace(record, **changes)
            self._add(record)
            got = self.store.set(record)
            assert got == self._current(record.correlation_id)
            _assert_utc(got)

        # --- rules -----------------------------------------------------------

        @rule(target=suffixes, suffix=_id_suffixes(), template=_templates())
        def set_new(self, suffix: str, template: OptInRecord) -> str:
            self._set(self._event(suffix, template))
            return suffix

        @rule(suffix=suffixes, template=_templates())
        def set_again(self, suffix: str, template: OptInRecord) -> None:
            self._set(self._event(suffix, template))

        @rule(suffix=suffixes, template=_templates())
        def set_the_other_answer_at_the_same_time(self, suffix: str, template: OptInRecord) -> None:
            """The other answer, as old as the current state: "declined" must win the tie."""
            current = self._current(self.prefix + suffix)
            assert current is not None
            other = "declined" if current.status == "accepted" else "accepted"
            self._set(self._event(suffix, template), status=other, updated_at=current.updated_at)

        @rule(
            target=keyed,
            suffix=suffixes,
            template=_templates(),
            key=_idempotency_keys(),
        )
        def set_with_idempotency_key(
            self, suffix: str, template: OptInRecord, key: str
        ) -> tuple[str, str]:
            self._set_with_key(self._event(suffix, template), key)
            return suffix, key

        @rule(used=keyed, template=_templates(), same=st.booleans())
        def retry_with_idempotency_key(
            self, used: tuple[str, str], template: OptInRecord, same: bool
        ) -> None:
            """A key used before, with its first request's answer and source or another."""
            suffix, key = used
            first = self.keys[(self.prefix + suffix, key)]
            record = self._event(suffix, template)
            if same:
                record = dataclasses.replace(record, status=first.status, source=first.source)
            elif record.fingerprint == first.fingerprint:
                other = "declined" if first.status == "accepted" else "accepted"
                record = dataclasses.replace(record, status=other)
            self._set_with_key(record, key)

        def _set_with_key(self, record: OptInRecord, key: str) -> None:
            """A set with an Idempotency-Key: written, replayed or refused as the model says."""
            cid = record.correlation_id
            first = self.keys.get((cid, key))
            if first is None:
                self.keys[(cid, key)] = record
                self._add(record)
                assert self.store.set(record, idempotency_key=key) == self._current(cid)
            elif first.fingerprint == record.fingerprint:  # a replay: nothing written
                assert self.store.set(record, idempotency_key=key) == self._current(cid)
            else:
                with pytest.raises(IdempotencyKeyReused):
                    self.store.set(record, idempotency_key=key)

        @rule(
            new=st.lists(st.tuples(st.one_of(suffixes, _id_suffixes()), _templates()), max_size=4),
            again=st.lists(st.integers(min_value=0), max_size=3),
        )
        def import_batch(self, new: list[tuple[str, OptInRecord]], again: list[int]) -> None:
            """A batch of new events, then copies of stored ones or of the batch's own."""
            batch = [self._event(suffix, template) for suffix, template in new]
            pool = [e for events in self.model.values() for e in events] + batch
            if pool:
                batch += [pool[i % len(pool)] for i in again]
            added = sum(self._add(record) for record in batch)
            assert self.store.import_events(batch) == added

        @rule(suffix=st.one_of(suffixes, _id_suffixes()))
        def get(self, suffix: str) -> None:
            correlation_id = self.prefix + suffix
            got = self.store.get(correlation_id)
            assert got == self._current(correlation_id)
            if got is not None:
                _assert_utc(got)

        @rule(suffix=st.one_of(suffixes, _id_suffixes()), limit=st.integers(1, 3))
        def history_pages(self, suffix: str, limit: int) -> None:
            correlation_id = self.prefix + suffix
            pages = _pages(self.store, correlation_id, limit)
            expected = _newest_first(self.model.get(correlation_id, []))
            assert [e for page in pages for e in page] == expected
            assert all(len(page) == limit for page in pages[:-1])

        @rule()
        def close_and_reopen(self) -> None:
            self.store.close()

        @invariant()
        def every_member_matches_the_model(self) -> None:
            for correlation_id, events in self.model.items():
                assert self.store.get(correlation_id) == _current(events)
                expected = _newest_first(events)
                assert self.store.history(correlation_id, len(expected) + 1) == expected

        def teardown(self) -> None:
            self.store.close()

    return StoreStateMachine


class StoreContract:
    """What every store must do. Subclass as ``Test...`` and supply a ``store`` fixture."""

    # --- get and set ---------------------------------------------------------

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

    # --- ordering: the current state -----------------------------------------

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

    # --- history -------------------------------------------------------------

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

    # --- import and the event stream -----------------------------------------

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

    # --- idempotency ---------------------------------------------------------

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

    # --- lifecycle -----------------------------------------------------------

    def test_check_passes_on_a_healthy_store(self, store: OptInStore) -> None:
        assert store.check() is None
        store.set(OptInRecord("member-1", "accepted", _BASE))
        assert store.check() is None

    def test_close_then_use_again_reopens(self, store: OptInStore) -> None:
        record = OptInRecord("member-1", "accepted", _BASE)
        store.set(record)
        store.close()
        assert store.get("member-1") == record
        store.close()
        later = OptInRecord("member-1", "declined", _BASE + timedelta(seconds=1))
        store.set(later)
        store.close()
        store.check()
        assert store.get("member-1") == later
        store.close()
        assert store.history("member-1", 10) == [later, record]
        store.close()
        assert store.count_events() == 2
        store.close()
        assert store.import_events([record]) == 0
        store.close()
        assert len(list(store.events())) == 2

    def test_close_is_harmless_before_use_and_twice(self, store: OptInStore) -> None:
        store.close()
        store.close()
        assert store.get("member-1") is None

    # --- threads -------------------------------------------------------------

    def test_concurrent_sets_and_gets_from_8_threads(self, store: OptInStore) -> None:
        threads, writes, shared = 8, 200, ("shared-0", "shared-1", "shared-2")
        barrier = threading.Barrier(threads)

        def work(t: int) -> tuple[OptInRecord, set[OptInRecord]]:
            # Each thread's timestamps are unique, so every event written is distinct.
            mine, to_shared = f"distinct-{t}", set()
            last = None
            barrier.wait()
            for i in range(writes):
                stamp = _BASE + timedelta(microseconds=t * writes + i)
                record = OptInRecord(mine, STATUSES[i % 2], stamp, f"t{t}-{i}")
                if i % 2:
                    record = dataclasses.replace(record, correlation_id=shared[i % 3])
                    to_shared.add(record)
                else:
                    last = record
                got = store.set(record)
                assert got.correlation_id == record.correlation_id
                assert got.precedence >= record.precedence
                # Reads race with other threads' writes: only our own id is predictable.
                assert store.get(mine) == last
                seen = store.get(shared[i % 3])
                assert seen is None or seen.correlation_id == shared[i % 3]
            return last, to_shared

        with ThreadPoolExecutor(threads) as pool:
            results = [f.result() for f in [pool.submit(work, t) for t in range(threads)]]

        written = set().union(*(to_shared for _, to_shared in results))
        for last, _ in results:
            assert store.get(last.correlation_id) == last
            assert len(store.history(last.correlation_id, writes)) == writes // 2
        for cid in shared:
            events = [r for r in written if r.correlation_id == cid]
            assert store.get(cid) == _current(events)
            assert store.history(cid, len(written)) == _newest_first(events)
        assert store.count_events() == threads * writes

    @pytest.mark.parametrize("same_answer", [True, False])
    def test_concurrent_requests_with_one_idempotency_key_write_once(
        self, store: OptInStore, same_answer: bool
    ) -> None:
        threads = 8
        barrier = threading.Barrier(threads)

        def attempt(t: int) -> OptInRecord | None:
            status = "accepted" if same_answer else STATUSES[t % 2]
            record = OptInRecord("member-1", status, _BASE + t * _US, f"r{t}")
            barrier.wait()
            try:
                return store.set(record, idempotency_key="once")
            except IdempotencyKeyReused:
                return None

        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(attempt, range(threads)))

        [winner] = store.history("member-1", 10)
        assert store.get("member-1") == winner
        for t, got in enumerate(results):
            if same_answer or STATUSES[t % 2] == winner.status:
                assert got == winner  # the write itself, or a replay of it
            else:
                assert got is None  # refused
        assert store.count_events() == 1

    # --- against a model -----------------------------------------------------

    def test_matches_a_model(self, store: OptInStore) -> None:
        run_state_machine_as_test(
            store_state_machine(lambda: store), settings=STATE_MACHINE_SETTINGS
        )
