"""``memory://``: dicts under a lock, for tests and single-process embedding.

State lives in one process and dies with it; the shipped gunicorn config
refuses this backend with more than one worker.
"""

from __future__ import annotations

import bisect
import secrets
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import Any

from optin_service.feed import (
    Change,
    ChangePage,
    CursorExpired,
    CursorInvalid,
    decode_cursor,
    encode_cursor,
    import_order,
)
from optin_service.storage import (
    IDEMPOTENCY_TTL,
    UNSET,
    EventRow,
    IdempotencyKeyReused,
    OptInRecord,
    OptInStore,
    Status,
    batched,
)

#: One entry of the feed: (seq, event, previous status, version, when appended).
_Entry = tuple[int, OptInRecord, "Status | None", int, datetime]


class MemoryStore(OptInStore):
    """Opt-in state and history in dicts. Every ``from_url`` call gives a new, empty store."""

    def __init__(self, *, import_batch: int = 5000) -> None:
        #: Events imported per hold of the lock (a documented knob for the contract suite).
        self.import_batch = import_batch
        # Per member, in one dict: its only event (which is then its current state),
        # or ``[current, events]`` once it has two, events sorted by position
        # (searched with bisect's key=). Most members answer once: no list and no
        # second dict entry for them.
        self._members: dict[str, OptInRecord | list] = {}
        self._keys: dict[tuple[str, str], tuple[str, datetime]] = {}
        self._lock = threading.Lock()
        # The feed, in append order (seq increasing), and what numbers it: a rebuild
        # starts a new generation, so every earlier cursor expires.
        self._feed: list[_Entry] = []
        self._generation = secrets.token_hex(4)
        self._seq = 0
        self._pruned_through = 0  # the greatest seq prune_changes removed
        self._versions: dict[str, int] = {}
        self._state: dict[str, str] = {}

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryStore:
        return cls(**options)

    def get(self, correlation_id: str) -> OptInRecord | None:
        with self._lock:
            member = self._members.get(correlation_id)
            return None if member is None else _current(member)

    def set(self, record: OptInRecord, *, idempotency_key: str | None = None) -> OptInRecord:
        cid = record.correlation_id
        with self._lock:
            if idempotency_key is not None:
                now = _now()
                self._forget_expired_keys(now)
                seen = self._keys.get((cid, idempotency_key))
                if seen is not None:
                    if seen[0] != record.fingerprint:
                        raise IdempotencyKeyReused(idempotency_key)
                    return _current(self._members[cid])
                self._keys[(cid, idempotency_key)] = (record.fingerprint, now)
            self._apply(record)
            return _current(self._members[cid])

    def _forget_expired_keys(self, now: datetime) -> None:
        """Drop idempotency keys past their TTL (as SQLite prunes and Redis expires them).
        Keys are only ever added at the end, with the time then: the oldest come first."""
        keys = self._keys
        while keys:
            oldest = next(iter(keys))
            if now - keys[oldest][1] < IDEMPOTENCY_TTL:
                return
            del keys[oldest]

    def _apply(self, record: OptInRecord) -> bool:
        """Store ``record`` (unless stored already) and, if it becomes its member's
        state, append the change; whether it was new."""
        member = self._members.get(record.correlation_id)
        before = None if member is None else _current(member)
        if not self._add(record):
            return False
        if before is None or record.precedence > before.precedence:
            self._append(record, None if before is None else before.status)
        return True

    def _append(self, record: OptInRecord, previous: Status | None) -> None:
        version = self._versions.get(record.correlation_id, 0) + 1
        self._versions[record.correlation_id] = version
        self._seq += 1
        self._feed.append((self._seq, record, previous, version, _now()))

    def _add(self, record: OptInRecord) -> bool:
        cid = record.correlation_id
        member = self._members.get(cid)
        if member is None:
            self._members[cid] = record
            return True
        if type(member) is not list:  # its second event: now a [current, events] pair
            if member.position == record.position:
                return False
            events = sorted((member, record), key=_position)
            current = record if record.precedence > member.precedence else member
            self._members[cid] = [current, events]
            return True
        events = member[1]
        position = record.position
        at = bisect.bisect_left(events, position, key=_position)
        if at < len(events) and events[at].position == position:
            return False
        events.insert(at, record)
        if record.precedence > member[0].precedence:
            member[0] = record
        return True

    def history(
        self, correlation_id: str, limit: int, before: tuple[int, str] | None = None
    ) -> list[OptInRecord]:
        with self._lock:
            events = _events(self._members.get(correlation_id))
            end = (
                len(events) if before is None else bisect.bisect_left(events, before, key=_position)
            )
            return events[max(0, end - limit) : end][::-1]

    def import_rows(self, rows: Iterable[EventRow]) -> int:
        # The first row of each identity, then each member's events oldest first.
        first: dict[tuple[str, int, str], EventRow] = {}
        for row in rows:
            first.setdefault(row[:3], row)
        added = 0
        ordered = sorted(first.values(), key=import_order)
        for batch in batched(ordered, self.import_batch):  # the lock is held a batch at a time
            with self._lock:
                added += sum(self._apply(OptInRecord.from_row(row)) for row in batch)
        return added

    def rows(self, since: datetime | None = None) -> Iterator[EventRow]:
        with self._lock:
            snapshot = [e for member in self._members.values() for e in _events(member)]
        for event in snapshot:
            if since is None or event.updated_at >= since:
                yield event.row

    def count_events(self) -> int:
        with self._lock:
            return sum(
                len(member[1]) if type(member) is list else 1 for member in self._members.values()
            )

    def changes(self, after: str | None, limit: int) -> ChangePage:
        with self._lock:
            # No cursor: from the oldest change kept, so an empty page's ``next`` is the
            # position right after the pruned ones, never a cursor into them.
            seq = self._pruned_through if after is None else self._position(after)
            start = bisect.bisect_right(self._feed, seq, key=_seq)
            page = [
                Change(event, previous, version, self._cursor(at))
                for at, event, previous, version, _ in self._feed[start : start + limit]
            ]
            next_cursor = page[-1].cursor if page else self._cursor(seq)
        return ChangePage(page, next_cursor)

    def _cursor(self, seq: int) -> str:
        return encode_cursor(f"{self._generation}.{seq}")

    def _position(self, cursor: str) -> int:
        """The seq a cursor of this store holds (see :meth:`changes` for the errors)."""
        generation, dot, seq = decode_cursor(cursor).partition(".")
        if not dot or not (seq.isascii() and seq.isdigit()) or int(seq) > self._seq:
            raise CursorInvalid("cursor is not one this service gave out")
        if generation != self._generation or int(seq) < self._pruned_through:
            raise CursorExpired("the changes after this cursor are no longer kept")
        return int(seq)

    def prune_changes(self, before: datetime) -> int:
        with self._lock:
            gone = 0
            while gone < len(self._feed) and self._feed[gone][4] < before:
                gone += 1
            if gone:
                self._pruned_through = self._feed[gone - 1][0]
                del self._feed[:gone]
            return gone

    def rebuild_changes(self) -> int:
        with self._lock:
            self._feed, self._versions = [], {}
            self._generation, self._seq, self._pruned_through = secrets.token_hex(4), 0, 0
            for cid in sorted(self._members):
                previous: Status | None = None
                for event in sorted(_events(self._members[cid]), key=_precedence):
                    self._append(event, previous)
                    previous = event.status
            return len(self._feed)

    def load_state(self, key: str) -> str | None:
        with self._lock:
            return self._state.get(key)

    def save_state(self, key: str, value: str | None, *, expected: object = UNSET) -> bool:
        with self._lock:
            if expected is not UNSET and self._state.get(key) != expected:
                return False
            if value is None:
                self._state.pop(key, None)
            else:
                self._state[key] = value
            return True

    def check(self) -> None:
        # Dicts in this process: readable and writable whenever the process runs.
        return None

    def close(self) -> None:
        return None


def _now() -> datetime:
    """The clock idempotency keys are timed by: one function, so tests can move it
    (as ``backends.sqlite._now_us``) without replacing ``datetime`` in this module."""
    return datetime.now(timezone.utc)


def _seq(entry: _Entry) -> int:
    return entry[0]


def _precedence(record: OptInRecord) -> tuple[int, bool, str]:
    return record.precedence


def _position(record: OptInRecord) -> tuple[int, str]:
    return record.position


def _current(member: OptInRecord | list) -> OptInRecord:
    return member[0] if type(member) is list else member


def _events(member: OptInRecord | list | None) -> list[OptInRecord]:
    if member is None:
        return []
    return member[1] if type(member) is list else [member]
