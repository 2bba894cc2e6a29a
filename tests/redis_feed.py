"""What the Redis stores' runs of the feed contract share: their cursors' form, and
the Cluster's promise for a reader tailing the feed while writers run."""

from __future__ import annotations

import itertools
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

from optin_service.feed import Change, decode_cursor, encode_cursor
from optin_service.storage import STATUSES, IdempotencyKeyReused, OptInRecord, OptInStore

BASE = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=timezone.utc)


def redis_cursor_past_the_end(cursor: str) -> str:
    """A Redis store's cursor (``<generation>.<id>,<id>,...``, one stream id per group)
    with its last group's position about 3,000 years (of µs) past the one it holds."""
    generation, _, positions = decode_cursor(cursor).partition(".")
    groups = positions.split(",")
    us, _, n = (groups[-1] or "0-0").partition("-")
    groups[-1] = f"{int(us) + 10**17}-{n}"
    return encode_cursor(f"{generation}.{','.join(groups)}")


class RedisCursors:
    """The feed contract's hook for the Redis stores' cursors."""

    def cursor_past_the_end(self, store: object, cursor: str) -> str:
        return redis_cursor_past_the_end(cursor)


def read_all(store: OptInStore, after: str | None = None, limit: int = 1000) -> list[Change]:
    changes: list[Change] = []
    while page := store.changes(after, limit).changes:
        changes.extend(page)
        after = page[-1].cursor
    return changes


def tail_while_writing(
    store: OptInStore, members: list[str], writers: int = 4, writes: int = 60, limit: int = 3
) -> tuple[list[Change], list[Change], int]:
    """Threads write (new and older events, idempotent replays) to ``members`` while a
    reader tails the feed ``limit`` changes at a time; returns what the reader saw,
    what a full read saw afterwards, and how many changes the reader saw while the
    writes ran."""
    writing_done, caught_up = threading.Event(), threading.Event()
    tailed: list[Change] = []
    while_writing = [0]

    def write(t: int) -> None:
        rng = random.Random(t)
        for i in range(writes):
            if i == writes // 3:  # let the reader catch something mid-stream
                caught_up.wait(10)
            record = OptInRecord(
                rng.choice(members),
                rng.choice(STATUSES),
                BASE + timedelta(microseconds=i * writers + rng.randrange(2 * writers)),
                f"w{t}-{i}",
            )
            try:
                store.set(record, idempotency_key=f"k{t}-{i // 2}" if i % 4 < 2 else None)
            except IdempotencyKeyReused:
                pass

    def tail() -> None:
        after = None
        while True:
            done = writing_done.is_set()  # before the read: then an empty page is the end
            page = store.changes(after, limit)
            tailed.extend(page.changes)
            after = page.next
            if page.changes:
                caught_up.set()
                while_writing[0] += 0 if done else len(page.changes)
            elif done:
                return
            else:
                time.sleep(0.001)

    with ThreadPoolExecutor(writers + 1) as pool:
        reader = pool.submit(tail)
        for future in [pool.submit(write, t) for t in range(writers)]:
            future.result()
        writing_done.set()
        reader.result()
    return tailed, read_all(store), while_writing[0]


def assert_each_change_once_in_member_order(
    store: OptInStore, tailed: list[Change], full: list[Change]
) -> None:
    """What a Cluster promises a reader tailing its feed: the same changes as a full read
    afterwards, each once, each member's in the same order (versions 1..k, each
    replacing the one before), the last one the member's state."""

    def entries(changes: list[Change]) -> list[tuple[OptInRecord, str | None, int]]:
        return [(c.event, c.previous, c.version) for c in changes]

    def key(entry: tuple[OptInRecord, str | None, int]) -> tuple:
        return (entry[0].correlation_id, entry[2])

    assert len(set(map(key, entries(full)))) == len(full), "a change read twice"
    assert sorted(entries(tailed), key=key) == sorted(entries(full), key=key)
    members = sorted({c.event.correlation_id for c in full})
    for cid in members:
        mine = [c for c in entries(tailed) if c[0].correlation_id == cid]
        assert mine == [c for c in entries(full) if c[0].correlation_id == cid], cid
        assert [version for _, _, version in mine] == list(range(1, len(mine) + 1)), cid
        assert mine[0][1] is None, cid
        for before, after in itertools.pairwise(mine):
            assert after[1] == before[0].status, (before, after)
            assert after[0].precedence > before[0].precedence, (before, after)
        assert mine[-1][0] == store.get(cid), cid
