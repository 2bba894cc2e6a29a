"""Pages and cursors of the change feed: every change once, in order, a page at a time,
after cursors the store validates."""

from __future__ import annotations

import re
import urllib.parse

import pytest

from optin_service.feed import MAX_CURSOR, CursorInvalid, decode_cursor, encode_cursor
from optin_service.storage import OptInRecord, OptInStore
from optin_service.testing._feed import _fill, _read_all
from optin_service.testing._helpers import _BASE

__all__ = ["CursorsContract"]


class CursorsContract:
    """``changes(after, limit)`` pages walk the feed once; a change's cursor reads on
    right after it, an empty page's ``next`` waits for what comes later; a cursor the
    store did not give out is refused as :class:`~optin_service.feed.CursorInvalid`.

    The hook :meth:`cursor_past_the_end` makes a cursor past the feed's end; a backend
    whose cursors are not ``encode_cursor("<generation>.<seq>")`` overrides it."""

    def cursor_past_the_end(self, store: OptInStore, cursor: str) -> str:
        """A cursor of ``store``'s form, but past every change it gave out (it must be
        refused as invalid). This default reads cursors of the form
        ``encode_cursor("<generation>.<seq>")``; a backend whose cursors hold another
        form overrides it."""
        match = re.fullmatch(r"(.*\.)(\d+)", decode_cursor(cursor))
        assert match, f"override cursor_past_the_end for cursors like {decode_cursor(cursor)!r}"
        return encode_cursor(f"{match[1]}{int(match[2]) + 1_000_000}")

    @pytest.mark.parametrize("limit", [1, 2, 7, 25, 1000])
    def test_pages_walk_every_change_once(self, store: OptInStore, limit: int) -> None:
        records = _fill(store, 25)
        changes = _read_all(store, limit=limit)
        assert [c.event for c in changes] == records
        assert changes == _read_all(store)
        page = store.changes(None, limit)
        assert page.changes == changes[:limit]

    def test_a_change_cursor_reads_on_right_after_it(self, store: OptInStore) -> None:
        _fill(store, 6)
        changes = _read_all(store)
        for at, change in enumerate(changes):
            assert store.changes(change.cursor, 2).changes == changes[at + 1 : at + 3]
        last = changes[-1].cursor
        page = store.changes(last, 10)
        assert (page.changes, page.next) == ([], last)

    def test_next_of_an_empty_page_reads_what_comes_later(self, store: OptInStore) -> None:
        empty = store.changes(None, 10)
        assert empty.changes == []
        first = OptInRecord("member-1", "accepted", _BASE, "r1")
        store.set(first)
        page = store.changes(empty.next, 10)
        assert [c.event for c in page.changes] == [first]
        assert store.changes(page.next, 10).next == page.next
        second = OptInRecord("member-2", "declined", _BASE, "r2")
        store.set(second)
        assert [c.event for c in store.changes(page.next, 10).changes] == [second]
        assert [c.event for c in store.changes(None, 10).changes] == [first, second]

    def test_cursors_are_short_url_safe_ascii(self, store: OptInStore) -> None:
        _fill(store, 3)
        cursors = [store.changes(None, 1).next, *(c.cursor for c in _read_all(store))]
        cursors.append(store.changes(None, 10).next)
        for cursor in cursors:
            assert isinstance(cursor, str)
            assert 0 < len(cursor) <= MAX_CURSOR
            assert urllib.parse.quote(cursor, safe="") == cursor, cursor

    @pytest.mark.parametrize(
        "cursor",
        [
            "",
            "!",
            "not a cursor",
            "%2F",
            "é",
            "a" * (MAX_CURSOR + 1),
            encode_cursor(""),
            encode_cursor("nonsense"),
            encode_cursor("."),
            encode_cursor("x.y"),
            encode_cursor("x.-1"),
            encode_cursor("x.1.2"),
            encode_cursor("\x00"),
            "_w",  # base64url of a byte that is not UTF-8
        ],
    )
    def test_a_cursor_the_store_did_not_give_out_is_invalid(
        self, store: OptInStore, cursor: str
    ) -> None:
        _fill(store, 2)
        with pytest.raises(CursorInvalid):
            store.changes(cursor, 10)

    def test_a_cursor_past_the_last_change_is_invalid(self, store: OptInStore) -> None:
        _fill(store, 3)
        future = self.cursor_past_the_end(store, _read_all(store)[-1].cursor)
        with pytest.raises(CursorInvalid):
            store.changes(future, 10)
        empty = store.changes(None, 1).next
        with pytest.raises(CursorInvalid):
            store.changes(self.cursor_past_the_end(store, empty), 10)
