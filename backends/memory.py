"""``memory://``: a dict under a lock, for tests and single-process embedding.

State lives in one process and dies with it; the shipped gunicorn config
refuses this backend with more than one worker.
"""

from __future__ import annotations

import threading

from optin_service.storage import OptInRecord, OptInStore


class MemoryStore(OptInStore):
    """Opt-in state in a dict. Every ``from_url`` call gives a new, empty store."""

    def __init__(self) -> None:
        self._records: dict[str, OptInRecord] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> MemoryStore:
        return cls()

    def get(self, correlation_id: str) -> OptInRecord | None:
        with self._lock:
            return self._records.get(correlation_id)

    def set(self, record: OptInRecord) -> OptInRecord:
        with self._lock:
            self._records[record.correlation_id] = record
        return record

    def check(self) -> None:
        return None

    def close(self) -> None:
        return None
