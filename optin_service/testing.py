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

This module imports pytest and hypothesis, which are test dependencies: import
it from tests only, never from the service.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from optin_service.storage import STATUSES, OptInRecord, OptInStore, Status

__all__ = ["STATE_MACHINE_SETTINGS", "StoreContract", "store_state_machine"]

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
STATE_MACHINE_SETTINGS = settings(max_examples=25, stateful_step_count=20, deadline=None)

_BASE = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=timezone.utc)

# Each state machine example puts its ids under a random prefix of this length,
# so examples cannot see each other's writes even when they share one store.
_PREFIX_LEN = 13
_MAX_SUFFIX = 128 - _PREFIX_LEN


def _id_suffixes() -> st.SearchStrategy[str]:
    """The state machine's ids after its prefix: tricky ones, and any the API accepts."""
    return st.one_of(
        st.sampled_from(TRICKY_IDS + tuple(i[:_MAX_SUFFIX] for i in LONG_IDS)),
        st.from_regex(rf"[A-Za-z0-9._:@-]{{1,{_MAX_SUFFIX}}}", fullmatch=True),
    )


def _timestamps() -> st.SearchStrategy[datetime]:
    """UTC datetimes with microseconds, from the epoch to the end of 2100."""
    return st.datetimes(
        min_value=datetime(1970, 1, 1),
        max_value=datetime(2100, 12, 31, 23, 59, 59, 999999),
        timezones=st.just(timezone.utc),
    )


def _assert_utc(record: OptInRecord) -> None:
    assert record.updated_at.utcoffset() == timedelta(0), record


def store_state_machine(make_store: Callable[[], OptInStore]) -> type[RuleBasedStateMachine]:
    """A hypothesis state machine checking a store against a plain dict.

    Each example calls ``make_store()`` once and closes the store at the end.
    Every example uses ids under a random prefix of its own (the ids stay within
    the API's 128 characters), so ``make_store`` may return a fresh store or the
    same one each time. Run it with
    ``run_state_machine_as_test(store_state_machine(make), settings=...)``.
    """

    class StoreStateMachine(RuleBasedStateMachine):
        """Sets, gets and close/reopen on a store, mirrored on a dict."""

        suffixes = Bundle("suffixes")

        def __init__(self) -> None:
            super().__init__()
            self.store = make_store()
            self.prefix = f"{uuid.uuid4().hex[: _PREFIX_LEN - 1]}:"
            self.model: dict[str, OptInRecord] = {}

        @rule(
            target=suffixes,
            suffix=_id_suffixes(),
            status=st.sampled_from(STATUSES),
            updated_at=_timestamps(),
        )
        def set_new(self, suffix: str, status: Status, updated_at: datetime) -> str:
            self._set(suffix, status, updated_at)
            return suffix

        @rule(suffix=suffixes, status=st.sampled_from(STATUSES), updated_at=_timestamps())
        def overwrite(self, suffix: str, status: Status, updated_at: datetime) -> None:
            self._set(suffix, status, updated_at)

        @rule(suffix=st.one_of(suffixes, _id_suffixes()))
        def get(self, suffix: str) -> None:
            correlation_id = self.prefix + suffix
            got = self.store.get(correlation_id)
            assert got == self.model.get(correlation_id)
            if got is not None:
                _assert_utc(got)

        @rule()
        def close_and_reopen(self) -> None:
            self.store.close()

        @invariant()
        def every_record_matches_the_model(self) -> None:
            for correlation_id, expected in self.model.items():
                assert self.store.get(correlation_id) == expected

        def teardown(self) -> None:
            self.store.close()

        def _set(self, suffix: str, status: Status, updated_at: datetime) -> None:
            record = OptInRecord(self.prefix + suffix, status, updated_at)
            assert self.store.set(record) == record
            self.model[record.correlation_id] = record

    return StoreStateMachine


class StoreContract:
    """What every store must do. Subclass as ``Test...`` and supply a ``store`` fixture."""

    # --- get and set ---------------------------------------------------------

    def test_is_an_opt_in_store(self, store: OptInStore) -> None:
        assert isinstance(store, OptInStore)

    def test_get_unknown_id_is_none(self, store: OptInStore) -> None:
        assert store.get("never-set") is None

    def test_set_returns_the_record(self, store: OptInStore) -> None:
        record = OptInRecord("member-1", "accepted", _BASE)
        assert store.set(record) == record

    def test_set_then_get_returns_an_equal_record(self, store: OptInStore) -> None:
        record = OptInRecord("member-1", "declined", _BASE)
        store.set(record)
        got = store.get("member-1")
        assert got == record
        assert got.correlation_id == "member-1"
        assert got.status == "declined"
        assert got.updated_at == _BASE
        assert got.updated_at.microsecond == 123456
        _assert_utc(got)

    def test_second_set_wins(self, store: OptInStore) -> None:
        first = OptInRecord("member-1", "accepted", _BASE)
        declined = OptInRecord("member-1", "declined", _BASE + timedelta(seconds=1))
        accepted = OptInRecord("member-1", "accepted", _BASE + timedelta(seconds=2))
        store.set(first)
        store.set(declined)
        assert store.get("member-1") == declined
        store.set(accepted)
        assert store.get("member-1") == accepted

    def test_ids_are_independent(self, store: OptInStore) -> None:
        one = OptInRecord("member-1", "accepted", _BASE)
        two = OptInRecord("member-2", "declined", _BASE + timedelta(microseconds=1))
        store.set(one)
        assert store.get("member-2") is None
        store.set(two)
        assert store.get("member-1") == one
        assert store.get("member-2") == two

    def test_tricky_and_long_ids_do_not_collide(self, store: OptInStore) -> None:
        ids = TRICKY_IDS + LONG_IDS
        assert len(set(ids)) == len(ids)
        assert all(len(i) == 128 for i in LONG_IDS)
        records = [
            OptInRecord(cid, STATUSES[n % 2], _BASE + timedelta(microseconds=n))
            for n, cid in enumerate(ids)
        ]
        for record in records:
            store.set(record)
        for record in records:
            assert store.get(record.correlation_id) == record

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

    def test_every_microsecond_round_trips(self, store: OptInStore) -> None:
        for micros in (0, 1, 9, 10, 500000, 999998, 999999):
            stamp = _BASE.replace(microsecond=micros)
            store.set(OptInRecord("member-1", "accepted", stamp))
            got = store.get("member-1")
            assert got is not None
            assert got.updated_at == stamp
            assert got.updated_at.microsecond == micros

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

    def test_close_is_harmless_before_use_and_twice(self, store: OptInStore) -> None:
        store.close()
        store.close()
        assert store.get("member-1") is None

    # --- threads -------------------------------------------------------------

    def test_concurrent_sets_and_gets_from_8_threads(self, store: OptInStore) -> None:
        threads, writes, shared = 8, 200, ("shared-0", "shared-1", "shared-2")
        barrier = threading.Barrier(threads)

        def work(t: int) -> tuple[OptInRecord, set[OptInRecord]]:
            # Each thread's timestamps are unique, so every value written is distinct.
            mine, to_shared = f"distinct-{t}", set()
            last = None
            barrier.wait()
            for i in range(writes):
                stamp = _BASE + timedelta(microseconds=t * writes + i)
                record = OptInRecord(mine, STATUSES[i % 2], stamp)
                if i % 2:
                    record = OptInRecord(shared[i % 3], record.status, stamp)
                    to_shared.add(record)
                else:
                    last = record
                store.set(record)
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
        for cid in shared:
            assert store.get(cid) in {r for r in written if r.correlation_id == cid}

    # --- against a model -----------------------------------------------------

    def test_matches_a_dict_model(self, store: OptInStore) -> None:
        run_state_machine_as_test(
            store_state_machine(lambda: store), settings=STATE_MACHINE_SETTINGS
        )
