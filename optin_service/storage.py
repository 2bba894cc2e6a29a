"""The storage interface every backend implements, and the record it stores.

The app talks to storage only through :class:`OptInStore`. Backends wrap their
driver's exceptions into :class:`StorageError` (or :class:`StorageUnavailable`
when retrying later may succeed), so the HTTP layer handles one family of
errors whatever the backend.
"""

from __future__ import annotations

import abc
import dataclasses
from datetime import datetime, timedelta, timezone
from typing import Literal

Status = Literal["accepted", "declined"]
STATUSES: tuple[Status, ...] = ("accepted", "declined")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class StorageError(Exception):
    """A store failed in a way retrying will not fix (answered as a 500)."""


class StorageUnavailable(StorageError):
    """The store cannot be reached right now (answered as a 503 with Retry-After)."""


@dataclasses.dataclass(frozen=True, slots=True)
class OptInRecord:
    """One member's current consent: what they said and when the server recorded it."""

    correlation_id: str
    status: Status
    updated_at: datetime

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {self.status!r}")
        if self.updated_at.tzinfo is None:
            raise ValueError("updated_at must be timezone-aware")

    @classmethod
    def now(cls, correlation_id: str, status: Status) -> OptInRecord:
        """A record stamped with the server's current UTC time."""
        return cls(correlation_id, status, datetime.now(timezone.utc))

    @property
    def updated_at_us(self) -> int:
        """``updated_at`` as whole microseconds since the Unix epoch (how stores keep it)."""
        delta = self.updated_at - _EPOCH
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds

    @classmethod
    def from_us(cls, correlation_id: str, status: Status, micros: int) -> OptInRecord:
        """Rebuild a record from the microsecond timestamp a store kept."""
        return cls(correlation_id, status, _EPOCH + timedelta(microseconds=micros))


class OptInStore(abc.ABC):
    """Where opt-in state lives. Backends subclass this and register an entry point.

    Contract for implementers:

    - ``from_url`` must not connect: connections open lazily on first use, so a
      store built before gunicorn forks its workers is still safe.
    - Every method is safe to call from several threads at once.
    - Driver errors are raised as :class:`StorageUnavailable` (connection lost,
      timeout, busy) or :class:`StorageError` (anything else), never raw.
    """

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str) -> OptInStore:
        """Build a store from its ``OPTIN_STORAGE_URL`` without connecting yet."""

    @abc.abstractmethod
    def get(self, correlation_id: str) -> OptInRecord | None:
        """The member's current record, or ``None`` if nothing was ever stored."""

    @abc.abstractmethod
    def set(self, record: OptInRecord) -> OptInRecord:
        """Store ``record`` as the member's current state, durably, and return it."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise :class:`StorageUnavailable` unless the store answers right now."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections; the store may be used again afterwards (it reopens)."""
