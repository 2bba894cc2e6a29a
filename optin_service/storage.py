"""The storage interface every backend implements, and the record it stores.

The app talks to storage only through :class:`OptInStore`. Backends wrap their
driver's exceptions into :class:`StorageError` (or :class:`StorageUnavailable`
when retrying later may succeed), so the HTTP layer handles one family of
errors whatever the backend.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Literal, TypeVar

Status = Literal["accepted", "declined"]
T = TypeVar("T")
STATUSES: tuple[Status, ...] = ("accepted", "declined")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


#: An event as stores move it in bulk, with no record built per event:
#: ``(correlation_id, updated_at µs, request_id, status, source, client)``.
EventRow = tuple[str, int, str, str, str, str]


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter), read lazily: the bulk
    paths' batches (``itertools.batched`` from Python 3.12 on)."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


class StorageError(Exception):
    """A store failed in a way retrying will not fix (answered as a 500)."""


class StorageUnavailable(StorageError):
    """The store cannot be reached right now (answered as a 503 with Retry-After)."""


#: The times a store can keep exactly: whole µs since the epoch, within ±2**53 µs
#: (a Redis sorted-set score is a double). No consent predates 1684 or follows 2255.
EARLIEST = _EPOCH - timedelta(microseconds=2**53)
LATEST = _EPOCH + timedelta(microseconds=2**53)
_TIME_RANGE = f"between {EARLIEST.isoformat()} and {LATEST.isoformat()}"

#: The ``source`` of an event recorded without an ``X-Consent-Source`` header.
DEFAULT_SOURCE = "API"
#: How long an ``Idempotency-Key`` is remembered.
IDEMPOTENCY_TTL = timedelta(hours=24)


class IdempotencyKeyReused(Exception):
    """An ``Idempotency-Key`` already used for this member with a different request."""


@dataclasses.dataclass(frozen=True, slots=True)
class OptInRecord:
    """One consent event: what a member said, when the server recorded it, and how.

    Events are immutable evidence. A member's current state is the event with
    the newest ``updated_at``; for equal times, ``declined`` wins (when two
    answers cannot be told apart in time, the member is not contacted).
    """

    correlation_id: str
    status: Status
    updated_at: datetime
    #: The id of the request that recorded it (``x-amzn-RequestId``): unique per event.
    request_id: str = ""
    #: Through which channel: the ``X-Consent-Source`` header, else ``API``.
    source: str = DEFAULT_SOURCE
    #: Who recorded it: the authenticated client's name ("" without authentication).
    client: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {self.status!r}")
        if self.updated_at.tzinfo is None:
            raise ValueError("updated_at must be timezone-aware")
        if not EARLIEST <= self.updated_at <= LATEST:
            raise ValueError(f"updated_at must be {_TIME_RANGE}, not {self.updated_at}")

    @classmethod
    def now(
        cls,
        correlation_id: str,
        status: Status,
        request_id: str = "",
        source: str = DEFAULT_SOURCE,
        client: str = "",
    ) -> OptInRecord:
        """A record stamped with the server's current UTC time."""
        return cls(correlation_id, status, datetime.now(timezone.utc), request_id, source, client)

    @property
    def updated_at_us(self) -> int:
        """``updated_at`` as whole microseconds since the Unix epoch (how stores keep it)."""
        delta = self.updated_at - _EPOCH
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds

    @classmethod
    def from_us(
        cls,
        correlation_id: str,
        status: Status,
        micros: int,
        request_id: str = "",
        source: str = DEFAULT_SOURCE,
        client: str = "",
    ) -> OptInRecord:
        """Rebuild a record from the microsecond timestamp a store kept."""
        moment = _EPOCH + timedelta(microseconds=micros)
        return cls(correlation_id, status, moment, request_id, source, client)

    @property
    def row(self) -> EventRow:
        """The record as an :data:`EventRow`."""
        return (
            self.correlation_id,
            self.updated_at_us,
            self.request_id,
            self.status,
            self.source,
            self.client,
        )

    @classmethod
    def from_row(cls, row: EventRow) -> OptInRecord:
        """The record an :data:`EventRow` holds."""
        cid, us, rid, status, source, client = row
        return cls.from_us(cid, status, us, rid, source, client)  # type: ignore[arg-type]

    @property
    def precedence(self) -> tuple[int, bool, str]:
        """Orders a member's events for the current state.

        Newest wins; for equal times ``declined`` wins; then the greater request
        id, so the current state depends only on which events are stored, never
        on the order they arrived in (a migration rebuilds the same state).
        """
        return (self.updated_at_us, self.status == "declined", self.request_id)

    @property
    def position(self) -> tuple[int, str]:
        """Orders a member's history: by time, then request id (what a cursor holds)."""
        return (self.updated_at_us, self.request_id)

    @property
    def fingerprint(self) -> str:
        """What a repeated ``Idempotency-Key`` must match: the same answer, same source."""
        return f"{self.status}|{self.source}"


class OptInStore(abc.ABC):
    """Where opt-in state lives. Backends subclass this and register an entry point.

    Contract for implementers:

    - ``from_url`` must not connect: connections open lazily on first use, so a
      store built before gunicorn forks its workers is still safe.
    - Every method is safe to call from several threads at once.
    - Driver errors are raised as :class:`StorageUnavailable` (connection lost,
      timeout, busy) or :class:`StorageError` (anything else), never raw.
    """

    #: The longest, in seconds, one call may block waiting for the storage (a lock,
    #: the network) before it gives up with :class:`StorageUnavailable`; ``None`` if
    #: the backend cannot say. The shipped ``gunicorn.conf.py`` refuses to start a
    #: store that may wait longer than half gunicorn's worker timeout.
    max_wait: float | None = None

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str) -> OptInStore:
        """Build a store from its ``OPTIN_STORAGE_URL`` without connecting yet."""

    @abc.abstractmethod
    def get(self, correlation_id: str) -> OptInRecord | None:
        """The member's current record, or ``None`` if nothing was ever stored."""

    @abc.abstractmethod
    def set(self, record: OptInRecord, *, idempotency_key: str | None = None) -> OptInRecord:
        """Record the event ``record``, durably, and return the member's current state.

        The event and the current state change atomically: both or neither. The
        current state changes only if ``record`` takes precedence over it
        (:attr:`OptInRecord.precedence`), so an old event lands in history only.

        With ``idempotency_key``: if this member used the key less than
        :data:`IDEMPOTENCY_TTL` ago with the same fingerprint, nothing is written
        and the current state is returned; with another fingerprint,
        :class:`IdempotencyKeyReused` is raised. The key is kept with the event.
        """

    @abc.abstractmethod
    def history(
        self, correlation_id: str, limit: int, before: tuple[int, str] | None = None
    ) -> list[OptInRecord]:
        """Up to ``limit`` of the member's events, newest first by :attr:`~OptInRecord.position`.

        ``before`` is the position of the last event of the previous page: only
        events strictly older than it are returned, so pages stay correct while
        new events arrive.
        """

    @abc.abstractmethod
    def import_events(self, records: Iterable[OptInRecord]) -> int:
        """Store events in bulk (one batch), with the same ordering rule as :meth:`set`.

        An event already stored (same member, time and request id) is skipped,
        so importing twice changes nothing. Returns how many were new.
        """

    @abc.abstractmethod
    def events(self, since: datetime | None = None) -> Iterator[OptInRecord]:
        """Every stored event (at or after ``since``), streamed in constant memory."""

    def rows(self, since: datetime | None = None) -> Iterator[EventRow]:
        """:meth:`events` as :data:`EventRow` tuples: what ``optin migrate`` reads.

        Backends may override it to skip building a record per event.
        """
        for record in self.events(since):
            yield record.row

    def import_rows(self, rows: Iterable[EventRow]) -> int:
        """:meth:`import_events` for a whole stream of :data:`EventRow` tuples, of any
        length: the store batches it as suits it (``optin import`` and ``migrate``).

        Same rules as :meth:`import_events`; returns how many events were new.
        Backends may override it with a bulk path. Rows are trusted: they come
        from another store or from :func:`~optin_service.schemas.load_event`.
        """
        return sum(
            self.import_events([OptInRecord.from_row(row) for row in batch])
            for batch in batched(rows, 5000)
        )

    @abc.abstractmethod
    def count_events(self) -> int:
        """How many events are stored, over all members."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise :class:`StorageUnavailable` unless the store can read and write right now."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections; the store may be used again afterwards (it reopens)."""
