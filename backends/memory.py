"""``memory://``: dicts under a lock, for tests and single-process embedding.

State lives in one process and dies with it; the shipped gunicorn config
refuses this backend with more than one worker.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import Any

from optin_service.storage import (
    IDEMPOTENCY_TTL,
    EventRow,
    IdempotencyKeyReused,
    OptInRecord,
    OptInStore,
    batched,
)


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
            self._add(record)
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
        added = 0
        for batch in batched(rows, self.import_batch):  # the lock is held a batch at a time
            with self._lock:
                added += sum(self._add(OptInRecord.from_row(row)) for row in batch)
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

    def check(self) -> None:
        # Dicts in this process: readable and writable whenever the process runs.
        return None

    def close(self) -> None:
        return None


def _now() -> datetime:
    """The clock idempotency keys are timed by: one function, so tests can move it
    (as ``backends.sqlite._now_us``) without replacing ``datetime`` in this module."""
    return datetime.now(timezone.utc)


def _position(record: OptInRecord) -> tuple[int, str]:
    return record.position


def _current(member: OptInRecord | list) -> OptInRecord:
    return member[0] if type(member) is list else member


def _events(member: OptInRecord | list | None) -> list[OptInRecord]:
    if member is None:
        return []
    return member[1] if type(member) is list else [member]
