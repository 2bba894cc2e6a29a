"""A reader tailing the change feed while threads write sees each change once, in
commit order."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from optin_service.feed import Change
from optin_service.storage import STATUSES, IdempotencyKeyReused, OptInRecord, OptInStore
from optin_service.testing._feed import _assert_consistent, _difference, _read_all
from optin_service.testing._helpers import _BASE, _US

__all__ = ["TailingContract"]


class TailingContract:
    """The feed reads in commit order: a reader a few changes at a time, while writers,
    replays and an import run, sees what a reader from the start sees afterwards."""

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
