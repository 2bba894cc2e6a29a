"""Threads: one store shared by several threads loses, duplicates and mixes up nothing."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from optin_service.storage import STATUSES, IdempotencyKeyReused, OptInRecord, OptInStore
from optin_service.testing._helpers import _BASE, _US, _current, _newest_first

__all__ = ["ConcurrencyContract"]


class ConcurrencyContract:
    """Concurrent sets keep every event and the precedence rule; one idempotency key used
    by racing requests writes once."""

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
