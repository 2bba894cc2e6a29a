"""The store against a model: a hypothesis state machine mirrored on a plain dict.

:func:`store_state_machine` is usable on its own, with any settings;
:class:`ModelContract` runs it with :data:`STATE_MACHINE_SETTINGS`.
"""

from __future__ import annotations

import dataclasses
import string
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
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
from optin_service.testing._helpers import (
    _BASE,
    _US,
    LONG_IDS,
    TRICKY_IDS,
    _assert_utc,
    _current,
    _identity,
    _newest_first,
    _pages,
)

__all__ = ["STATE_MACHINE_SETTINGS", "ModelContract", "store_state_machine"]

_T = TypeVar("_T")

#: How long the contract's stateful test runs: enough to find ordering bugs, fast enough for CI.
#: One failure reported, not every distinct one: shrinking each costs about a minute.
STATE_MACHINE_SETTINGS = settings(
    max_examples=25, stateful_step_count=20, deadline=None, report_multiple_bugs=False
)

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


class ModelContract:
    """Random sequences of every operation agree with a model of the events
    (see :func:`store_state_machine`)."""

    def test_matches_a_model(self, store: OptInStore) -> None:
        run_state_machine_as_test(
            store_state_machine(lambda: store), settings=STATE_MACHINE_SETTINGS
        )
