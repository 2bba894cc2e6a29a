"""A throwaway third-party backend: a dict, plus the URL it was built from."""

from __future__ import annotations

from optin_service.storage import OptInRecord, OptInStore


class DummyStore(OptInStore):
    def __init__(self, url: str) -> None:
        self.url = url
        self.records: dict[str, OptInRecord] = {}

    @classmethod
    def from_url(cls, url: str) -> DummyStore:
        return cls(url)

    def get(self, correlation_id: str) -> OptInRecord | None:
        return self.records.get(correlation_id)

    def set(self, record: OptInRecord) -> OptInRecord:
        self.records[record.correlation_id] = record
        return record

    def check(self) -> None:
        return None

    def close(self) -> None:
        return None
