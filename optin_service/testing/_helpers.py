"""What the contract mixins share: fixed times, awkward ids, and how to compare events.

Private to :mod:`optin_service.testing`; a plugin author needs only the mixins.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

from optin_service.storage import OptInRecord, OptInStore

#: Ids that look like key separators, hash tags or path pieces to a backend.
#: Braces are outside what the API accepts, but a store must not care.
TRICKY_IDS: tuple[str, ...] = ("a:b", "a", "b", "{x}", "x}", "x", "@", "..", ".", "a-b", "a_b")

_ALPHABET = "ABCXYZabcxyz0189._:@-"
#: 128-character ids mixing every allowed character class, differing in one place.
LONG_IDS: tuple[str, ...] = (
    (_ALPHABET * 7)[:128],
    (_ALPHABET * 7)[:127] + "-",
    "-" + (_ALPHABET * 7)[:127],
    "@" * 128,
    ":" * 128,
    "." * 128,
)

_BASE = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)


def _assert_utc(record: OptInRecord) -> None:
    assert record.updated_at.utcoffset() == timedelta(0), record


def _identity(record: OptInRecord) -> tuple[str, int, str]:
    """What makes an event the same event: member, time, request id."""
    return (record.correlation_id, record.updated_at_us, record.request_id)


def _sort_key(record: OptInRecord) -> tuple[str, int, str, str, str, str]:
    """A total order on events, to compare what ``events()`` yields in any order."""
    return (*_identity(record), record.status, record.source, record.client)


def _newest_first(events: Iterable[OptInRecord]) -> list[OptInRecord]:
    """What ``history`` returns: newest first by position."""
    return sorted(events, key=lambda e: e.position, reverse=True)


def _current(events: Iterable[OptInRecord]) -> OptInRecord | None:
    """The current state once ``events`` are stored, in any order: the greatest precedence.

    Precedence ends with the request id, so distinct events never tie.
    """
    return max(events, key=lambda e: e.precedence, default=None)


def _pages(store: OptInStore, correlation_id: str, limit: int) -> list[list[OptInRecord]]:
    """Every history page of a member, each from the cursor the previous one ended at.

    Stops after the first page shorter than ``limit`` (an empty one included).
    """
    pages, before = [], None
    while True:
        page = store.history(correlation_id, limit, before)
        assert len(page) <= limit, (limit, page)
        pages.append(page)
        if len(page) < limit:
            return pages
        before = page[-1].position
        assert len(pages) < 10_000, "history never ends"


def _all_events(store: OptInStore) -> list[OptInRecord]:
    return sorted(store.events(), key=_sort_key)
