"""Bodies and event lines: times, cursors and strict JSON, below the HTTP layer."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from optin_service.schemas import decode_cursor, dump_event, encode_cursor, format_time, load_event
from optin_service.storage import OptInRecord


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc), "0999-01-02T03:04:05.000006Z"),
        (datetime(2026, 11, 26, 12, tzinfo=timezone.utc), "2026-11-26T12:00:00.000000Z"),
        (
            datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc),
            "1969-12-31T23:59:59.999999Z",
        ),
    ],
)
def test_times_are_utc_with_four_digit_years_and_microseconds(moment, text):
    assert format_time(moment) == text


@pytest.mark.parametrize("year", [1685, 1969, 2026, 2255])
def test_an_exported_event_imports_back_identically(year):
    record = OptInRecord(
        "m-1",
        "declined",
        datetime(year, 6, 1, 1, 2, 3, 456789, tzinfo=timezone.utc),
        "r-1",
        "WEB",
        "crm",
    )
    import json

    assert load_event(json.dumps(dump_event(record))) == record


@pytest.mark.parametrize(
    "when",
    [
        "0001-01-01T00:00:00Z",
        "1684-07-28T00:12:25.259007Z",
        "2255-06-05T23:47:34.740993Z",
        "9999-12-31T23:59:59.999999Z",
    ],
)
def test_an_event_beyond_the_times_every_store_keeps_exactly_is_refused(when):
    line = (
        '{"correlationId":"a","LOYALTY_OPTIN":"accepted",'
        f'"updatedAt":"{when}","requestId":"r","source":"API"}}'
    )
    with pytest.raises(
        ValueError, match=r"^updatedAt: must be between 1684-07-28T00:12:25\.259008Z "
    ):
        load_event(line)
    with pytest.raises(ValueError, match="updated_at must be between"):
        OptInRecord("a", "accepted", datetime.fromisoformat(when.replace("Z", "+00:00")))


def test_the_first_and_last_exact_times_are_kept():
    for when in ("1684-07-28T00:12:25.259008Z", "2255-06-05T23:47:34.740992Z"):
        line = (
            '{"correlationId":"a","LOYALTY_OPTIN":"accepted",'
            f'"updatedAt":"{when}","requestId":"r","source":"API"}}'
        )
        assert format_time(load_event(line).updated_at) == when


def test_a_time_finer_than_microseconds_is_refused_not_cut():
    line = (
        '{"correlationId":"a","LOYALTY_OPTIN":"accepted",'
        '"updatedAt":"2026-01-02T03:04:05.0000061Z","requestId":"r"}'
    )
    with pytest.raises(ValueError, match="six fractional digits"):
        load_event(line)


def test_cursors_round_trip():
    assert decode_cursor(encode_cursor((1795699211482913, "a:b:c"))) == (1795699211482913, "a:b:c")


@pytest.mark.parametrize("cid", [".", ".."])
def test_an_event_for_an_id_no_client_can_address_is_refused(cid):
    line = (
        f'{{"correlationId":"{cid}","LOYALTY_OPTIN":"accepted",'
        '"updatedAt":"2026-01-02T03:04:05Z","requestId":"r"}'
    )
    with pytest.raises(ValueError, match="correlationId"):
        load_event(line)
    load_event(line.replace(f'"{cid}"', '"..."'))  # three dots are an ordinary id
