"""A throwaway third-party backend: a few dicts and a list, plus the URL it was built from."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone

from optin_service.storage import (
    IDEMPOTENCY_TTL,
    UNSET,
    ChangePage,
    EventRow,
    IdempotencyKeyReused,
    OptInRecord,
    OptInStore,
)


class DummyStore(OptInStore):
    def __init__(self, url: str) -> None:
        self.url = url
        self.records: dict[str, OptInRecord] = {}  # the current state of each member
        self.log: list[OptInRecord] = []  # every event, as it arrived
        self.keys: dict[tuple[str, str], tuple[str, datetime]] = {}  # -> fingerprint, when
        self._seen: set[tuple[str, int, str]] = set()  # member, µs, request id
        self.state: dict[str, str] = {}  # save_state's values
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **options: object) -> DummyStore:
        return cls(url)

    def get(self, correlation_id: str) -> OptInRecord | None:
        return self.records.get(correlation_id)

    def set(self, record: OptInRecord, *, idempotency_key: str | None = None) -> OptInRecord:
        cid = record.correlation_id
        with self._lock:
            if idempotency_key is not None:
                now = datetime.now(timezone.utc)
                seen = self.keys.get((cid, idempotency_key))
                if seen is not None and now - seen[1] < IDEMPOTENCY_TTL:
                    if seen[0] != record.fingerprint:
                        raise IdempotencyKeyReused(idempotency_key)
                    return self.records[cid]
                self.keys[(cid, idempotency_key)] = (record.fingerprint, now)
            self._add(record)
            return self.records[cid]

    def _add(self, record: OptInRecord) -> bool:
        identity = (record.correlation_id, *record.position)
        if identity in self._seen:
            return False
        self._seen.add(identity)
        self.log.append(record)
        current = self.records.get(record.correlation_id)
        if current is None or record.precedence > current.precedence:
            self.records[record.correlation_id] = record
        return True

    def history(
        self, correlation_id: str, limit: int, before: tuple[int, str] | None = None
    ) -> list[OptInRecord]:
        with self._lock:
            mine = [
                e
                for e in self.log
                if e.correlation_id == correlation_id and (before is None or e.position < before)
            ]
        return sorted(mine, key=lambda e: e.position, reverse=True)[:limit]

    def import_rows(self, rows: Iterable[EventRow]) -> int:
        with self._lock:
            return sum(self._add(OptInRecord.from_row(row)) for row in rows)

    def rows(self, since: datetime | None = None) -> Iterator[EventRow]:
        with self._lock:
            log = list(self.log)
        return (e.row for e in log if since is None or e.updated_at >= since)

    def count_events(self) -> int:
        return len(self.log)

    # No change feed: the tests of this plugin are about finding it, not its feed.
    def changes(self, after: str | None, limit: int) -> ChangePage:
        raise NotImplementedError("the dummy backend keeps no change feed")

    def prune_changes(self, before: datetime) -> int:
        raise NotImplementedError("the dummy backend keeps no change feed")

    def rebuild_changes(self) -> int:
        raise NotImplementedError("the dummy backend keeps no change feed")

    def load_state(self, key: str) -> str | None:
        return self.state.get(key)

    def save_state(self, key: str, value: str | None, *, expected: object = UNSET) -> bool:
        with self._lock:
            if expected is not UNSET and self.state.get(key) != expected:
                return False
            if value is None:
                self.state.pop(key, None)
            else:
                self.state[key] = value
            return True

    def check(self) -> None:
        return None

    def close(self) -> None:
        return None
