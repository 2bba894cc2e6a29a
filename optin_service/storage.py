"""The storage interface every backend implements, and the record it stores.

The app talks to storage only through :class:`OptInStore`. Backends wrap their
driver's exceptions into :class:`StorageError` (or :class:`StorageUnavailable`
when retrying later may succeed), so the HTTP layer handles one family of
errors whatever the backend.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar, Literal, TypeVar

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


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: ``save_state(..., expected=UNSET)``: write whatever the stored value is.
UNSET = _Unset()


class StorageError(Exception):
    """A store failed in a way retrying will not fix (answered as a 500)."""


class StorageUnavailable(StorageError):
    """The store cannot be reached right now (answered as a 503 with Retry-After).

    The message goes to the log only (it may name hosts and files). ``reason``,
    when a backend gives one, is safe to show to clients: a state of the store an
    operator must fix, which the 503's message then names.
    """

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


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


# --- the change feed's types (optin_service.feed has the rest of the feed) ---------


class CursorInvalid(ValueError):
    """A cursor the store did not give out (answered as a 400)."""


class CursorExpired(Exception):
    """A cursor into changes already removed (retention), or from before a rebuild
    (answered as a 410: the reader must resynchronise)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """One entry of the feed: ``event`` became its member's current state."""

    event: OptInRecord
    #: The status it replaced; ``None`` for the member's first change.
    previous: Status | None
    #: The member's change count, 1, 2, 3... without a gap.
    version: int
    #: The position right after this change: read on from here with ``after=cursor``.
    cursor: str


@dataclasses.dataclass(frozen=True, slots=True)
class ChangePage:
    """A page of the feed, in commit order."""

    changes: list[Change]
    #: Where to read on: after the last change, or where this page started if it is empty.
    next: str


class OptInStore(abc.ABC):
    """Where opt-in state lives. Backends subclass this and register an entry point.

    Contract for implementers:

    - ``from_url`` must not connect: connections open lazily on first use, so a
      store built before gunicorn forks its workers is still safe. Options come
      from the URL and from keyword arguments (:attr:`config_options`), never
      from the environment.
    - Every method is safe to call from several threads at once.
    - Driver errors never escape raw: list the driver's exception classes in
      :attr:`driver_errors` and every public method of the subclass raises them
      as :meth:`wrap_error` says (:class:`StorageUnavailable` when a retry may
      succeed, else :class:`StorageError`), in this one place.
    - A backend implements the bulk paths on tuples (:meth:`rows`,
      :meth:`import_rows`); :meth:`events` and :meth:`import_events` build on them.
    """

    #: The driver's exception classes, wrapped by every public method (see :meth:`wrap_error`).
    driver_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    #: App config settings this backend reads, as ``{config key: from_url keyword}``;
    #: the extension passes each one the app's config holds (an option in the URL
    #: wins over its keyword).
    config_options: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _WRAPPED_METHODS:
            method = cls.__dict__.get(name)
            if method is not None:
                setattr(cls, name, _wrapping_driver_errors(method))

    @classmethod
    def wrap_error(cls, exc: BaseException) -> StorageError:
        """The error to raise for one of :attr:`driver_errors` (override to tell the
        transient ones, answered 503, from the rest, answered 500)."""
        return StorageError(f"{cls.__name__}: {exc}")

    #: The longest, in seconds, one call may block waiting for the storage (a lock,
    #: the network) before it gives up with :class:`StorageUnavailable`; ``None`` if
    #: the backend cannot say. The shipped ``gunicorn.conf.py`` refuses to start a
    #: store that may wait longer than half gunicorn's worker timeout.
    max_wait: float | None = None

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str, **options: Any) -> OptInStore:
        """Build a store from its ``OPTIN_STORAGE_URL`` without connecting yet.

        ``options`` are the keywords :attr:`config_options` names.
        """

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
    def rows(self, since: datetime | None = None) -> Iterator[EventRow]:
        """Every stored event (at or after ``since``) as an :data:`EventRow`, streamed in
        constant memory: what ``optin export`` and ``optin migrate`` read."""

    @abc.abstractmethod
    def import_rows(self, rows: Iterable[EventRow]) -> int:
        """Store a stream of events of any length, with the same ordering rule as :meth:`set`.

        The store batches the stream as suits it (``optin import`` and ``migrate``
        call this), in constant memory. An event already stored (same member,
        time and request id) is skipped, so importing twice changes nothing.
        Returns how many events were new. Rows are trusted: they come from
        another store or from :func:`~optin_service.schemas.load_event`.
        """

    def events(self, since: datetime | None = None) -> Iterator[OptInRecord]:
        """:meth:`rows` as records."""
        for row in self.rows(since):
            yield OptInRecord.from_row(row)

    def import_events(self, records: Iterable[OptInRecord]) -> int:
        """:meth:`import_rows` for records."""
        return self.import_rows(record.row for record in records)

    @abc.abstractmethod
    def count_events(self) -> int:
        """How many events are stored, over all members."""

    # --- the change feed (optin_service/feed.py) ---------------------------------

    @abc.abstractmethod
    def changes(self, after: str | None, limit: int) -> ChangePage:
        """Up to ``limit`` changes in commit order, after the cursor ``after`` (``None``:
        from the oldest change kept).

        Every write that makes an event its member's current state (:meth:`set`,
        :meth:`import_rows`) appends one :class:`~optin_service.feed.Change`
        atomically with the event; a reader tailing the feed while writers run
        sees each change once, in the order a later reader from the start sees
        them. :meth:`import_rows` applies each member's events oldest first
        (:func:`~optin_service.feed.import_order`), so an import gives every
        backend the same changes. Raises
        :class:`~optin_service.feed.CursorInvalid` for a cursor this store did not
        give out, :class:`~optin_service.feed.CursorExpired` for one into changes
        :meth:`prune_changes` removed or from before :meth:`rebuild_changes`.
        """

    @abc.abstractmethod
    def prune_changes(self, before: datetime) -> int:
        """Remove the changes appended before ``before``; return how many went."""

    @abc.abstractmethod
    def rebuild_changes(self) -> int:
        """Replace the feed with one rebuilt from the events: each member's events
        in precedence order, each a change (versions from 1), members one after
        another; every earlier cursor expires. Returns how many changes it holds."""

    @abc.abstractmethod
    def load_state(self, key: str) -> str | None:
        """A value :meth:`save_state` stored (the webhook deliverer's position, lease...)."""

    @abc.abstractmethod
    def save_state(self, key: str, value: str | None, *, expected: object = UNSET) -> bool:
        """Store ``value`` under ``key`` (``None`` deletes it). With ``expected`` (a
        value, or ``None`` for "absent"), only if the stored value is that one, as
        one atomic step; return whether it was written."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise :class:`StorageUnavailable` unless the store can read and write right now."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections; the store may be used again afterwards (it reopens)."""


#: The public methods whose driver errors :class:`OptInStore` wraps.
_WRAPPED_METHODS = (
    "changes",
    "prune_changes",
    "rebuild_changes",
    "load_state",
    "save_state",
    "get",
    "set",
    "history",
    "rows",
    "import_rows",
    "count_events",
    "check",
    "close",
)


def _wrapping_driver_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method``, raising its store's :attr:`~OptInStore.driver_errors` as
    :meth:`~OptInStore.wrap_error` says (generators too, for the whole iteration)."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def generator(self: OptInStore, *args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from method(self, *args, **kwargs)
            except self.driver_errors as exc:
                raise self.wrap_error(exc) from exc

        return generator

    @functools.wraps(method)
    def wrapped(self: OptInStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except self.driver_errors as exc:
            raise self.wrap_error(exc) from exc

    return wrapped
