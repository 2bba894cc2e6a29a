"""``memory://``: dicts under a lock, for tests and single-process embedding.

State lives in one process and dies with it; the shipped gunicorn config
refuses this backend with more than one worker.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone

from optin_service.storage import (
    IDEMPOTENCY_TTL,
    IdempotencyKeyReused,
    OptInRecord,
    OptInStore,
)


class MemoryStore(OptInStore):
    """Opt-in state and history in dicts. Every ``from_url`` call gives a new, empty store."""

    def __init__(self) -> None:
        self._current: dict[str, OptInRecord] = {}
        # Per member: events sorted by position (searched with bisect's key=, not a
        # parallel list of positions: a tuple, an int and a list entry less per event).
        self._history: dict[str, list[OptInRecord]] = {}
        self._keys: dict[tuple[str, str], tuple[str, datetime]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> MemoryStore:
        return cls()

    def get(self, correlation_id: str) -> OptInRecord | None:
        with self._lock:
            return self._current.get(correlation_id)

    def set(self, record: OptInRecord, *, idempotency_key: str | None = None) -> OptInRecord:
        cid = record.correlation_id
        with self._lock:
            if idempotency_key is not None:
                seen = self._keys.get((cid, idempotency_key))
                now = datetime.now(timezone.utc)
                if seen is not None and now - seen[1] < IDEMPOTENCY_TTL:
                    if seen[0] != record.fingerprint:
                        raise IdempotencyKeyReused(idempotency_key)
                    return self._current[cid]
                self._keys[(cid, idempotency_key)] = (record.fingerprint, now)
            self._add(record)
            return self._current[cid]

    def _add(self, record: OptInRecord) -> bool:
        cid = record.correlation_id
        events = self._history.get(cid)
        if events is None:  # a list of exactly one (append would reserve room for four)
            self._history[cid] = [record]
            self._current[cid] = record
            return True
        position = record.position
        at = bisect.bisect_left(events, position, key=_position)
        if at < len(events) and events[at].position == position:
            return False
        events.insert(at, record)
        current = self._current.get(cid)
        if current is None or record.precedence > current.precedence:
            self._current[cid] = record
        return True

    def history(
        self, correlation_id: str, limit: int, before: tuple[int, str] | None = None
    ) -> list[OptInRecord]:
        with self._lock:
            events = self._history.get(correlation_id, [])
            end = (
                len(events) if before is None else bisect.bisect_left(events, before, key=_position)
            )
            return events[max(0, end - limit) : end][::-1]

    def import_events(self, records: Iterable[OptInRecord]) -> int:
        with self._lock:
            return sum(self._add(record) for record in records)

    def events(self, since: datetime | None = None) -> Iterator[OptInRecord]:
        with self._lock:
            snapshot = [e for events in self._history.values() for e in events]
        for event in snapshot:
            if since is None or event.updated_at >= since:
                yield event

    def count_events(self) -> int:
        with self._lock:
            return sum(len(events) for events in self._history.values())

    def check(self) -> None:
        return None

    def close(self) -> None:
        return None


def _position(record: OptInRecord) -> tuple[int, str]:
    return record.position
