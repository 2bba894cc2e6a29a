"""Bodies in and out: strict JSON parsing, then marshmallow schemas, built once.

The standard ``json`` module accepts NaN, Infinity and duplicate keys; a
consent body that says both "accepted" and "declined" is not consent, so the
parser here rejects all three before marshmallow sees the data.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import datetime, timezone
from typing import Any

from marshmallow import EXCLUDE, RAISE, Schema, ValidationError, fields, validate

from .errors import ERROR_CODES, ApiError
from .feed import MAX_CURSOR
from .storage import (
    DEFAULT_SOURCE,
    EARLIEST,
    LATEST,
    STATUSES,
    Change,
    ChangePage,
    OptInRecord,
    Status,
)

INVALID_OPTIN = "Invalid opt-in response provided"
MISSING_OPTIN = "LOYALTY_OPTIN missing from body"

#: A member id: what the path segment, the CLI and import accept. Not ``.`` or ``..``:
#: clients remove those segments from a URL path, so such a member could never be read.
#: (A lookahead with ``$`` rather than ``\Z``: the same in ECMA-262, for the OpenAPI pattern.)
CORRELATION_ID = re.compile(r"(?!\.\.?$)[A-Za-z0-9._:@-]{1,128}")
#: :data:`CORRELATION_ID` in words, for error messages and documentation.
CORRELATION_ID_RULE = "1 to 128 characters of A-Z a-z 0-9 . _ : @ -, not . or .."
#: ``X-Consent-Source``: the channel a consent came through.
SOURCE = re.compile(r"[A-Za-z0-9_-]{1,32}")
#: ``Idempotency-Key``: printable ASCII, space included.
IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
#: A request id in an imported event (ours are UUID4s): printable, no spaces.
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
#: The client recorded on an event: printable ASCII, possibly empty.
CLIENT = re.compile(r"[\x20-\x7e]{0,128}")


#: Characters of a value or a key an error message quotes: an import line can be
#: megabytes long, and its message is one line of a terminal or a log. Longer than
#: any valid id (128), so a value is cut only when its length alone is wrong.
SHOWN = 130


def cut(text: str, *, quote: bool = False, limit: int = SHOWN) -> str:
    """``text`` for an error message (``repr`` with ``quote``): whole up to ``limit``
    characters, else its start and its length."""
    if len(text) <= limit:
        return repr(text) if quote else text
    head = repr(text[:limit]) if quote else text[:limit]
    return f"{head}... ({len(text)} characters)"


class _FullMatch(validate.Validator):
    """The whole value matches ``pattern`` (marshmallow's Regexp only anchors the
    start); the error quotes the value, cut to :data:`SHOWN` characters."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern

    def __call__(self, value: str) -> str:
        if self.pattern.fullmatch(value) is None:
            raise ValidationError(f"{cut(value, quote=True)} is not valid")
        return value


class _BadJSON(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _BadJSON(f"{name} is not a valid JSON value")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # a key came twice: name the first that did
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _BadJSON(f"Duplicate key in JSON body: {cut(key)}")
            seen.add(key)
    return obj


# Built once: json.loads with hooks builds a new decoder and scanner on every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_reject_duplicates)


def loads_object(text: str | bytes, what: str = "Request body") -> dict[str, Any]:
    """One JSON object, strictly: no NaN/Infinity, no duplicate keys, UTF-8.

    Raises ``ValueError`` with a message fit for a client, naming ``what`` was read.
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if text.startswith("\ufeff"):  # what json.loads refuses before decoding
            raise ValueError("Unexpected UTF-8 BOM")
        value = _DECODER.decode(text)
    except _BadJSON:
        raise
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not valid UTF-8") from None
    except (ValueError, RecursionError):
        raise ValueError(f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object")
    return value


#: More than six fractional digits: a time finer than the µs stores keep.
SUBMICROSECOND = re.compile(r"[.,]\d{7,}")


def format_time(moment: datetime) -> str:
    """``2026-11-26T12:00:00.123456Z``: UTC, four-digit year, always six fractional digits."""
    # isoformat pads the year to four digits (strftime's %Y does not, before 1000).
    return moment.astimezone(timezone.utc).replace(tzinfo=None).isoformat("T", "microseconds") + "Z"


class Timestamp(fields.AwareDateTime):
    """An ISO 8601 time with a zone in; ``...T12:00:00.123456Z`` out."""

    def _serialize(self, value: datetime | None, attr: Any, obj: Any, **kwargs: Any) -> str | None:
        return None if value is None else format_time(value)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> datetime:
        # Stores keep microseconds: a finer time would be cut silently, and two
        # events could then share one identity.
        if isinstance(value, str) and SUBMICROSECOND.search(value):
            raise ValidationError("has more than six fractional digits (microseconds)")
        moment = super()._deserialize(value, attr, data, **kwargs)
        if not EARLIEST <= moment <= LATEST:
            raise ValidationError(
                f"must be between {format_time(EARLIEST)} and {format_time(LATEST)}"
            )
        return moment


def _status(**kwargs: Any) -> fields.String:
    return fields.String(
        validate=validate.OneOf(STATUSES, error=INVALID_OPTIN),
        metadata={"description": "The member's answer", "enum": list(STATUSES)},
        **kwargs,
    )


class OptInRequestSchema(Schema):
    """``{"LOYALTY_OPTIN": "accepted" | "declined"}``; other keys are ignored."""

    class Meta:
        unknown = EXCLUDE

    LOYALTY_OPTIN = _status(
        required=True,
        error_messages={"required": MISSING_OPTIN, "null": INVALID_OPTIN, "invalid": INVALID_OPTIN},
    )


# Response bodies (dumped, never loaded): every field is ``required`` because every
# dump writes it, which is what the OpenAPI document then says.


class OptInStateSchema(Schema):
    """The current state answered by ``GET``."""

    LOYALTY_OPTIN = _status(attribute="status", required=True)
    updatedAt = Timestamp(
        attribute="updated_at", required=True, metadata={"description": "When it was recorded"}
    )


class HistoryItemSchema(OptInStateSchema):
    """One consent event in a member's history."""

    requestId = fields.String(attribute="request_id", required=True)
    source = fields.String(
        required=True, metadata={"description": "X-Consent-Source of the request"}
    )
    client = fields.String(
        required=True,
        metadata={"description": "The authenticated client that recorded it (empty without auth)"},
    )


class HistoryPageSchema(Schema):
    """A page of history, newest first, and the cursor of the next page (or null)."""

    items = fields.List(fields.Nested(HistoryItemSchema), required=True)
    next = fields.String(allow_none=True, required=True)


class QueryInteger(fields.Integer):
    """A whole number written in ASCII digits only (``int()`` would also take
    spaces, signs, underscores and non-ASCII digits)."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> int:
        if not (isinstance(value, str) and value.isascii() and value.isdigit()):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


def _page_limit(default: int, most: int, what: str) -> QueryInteger:
    """A page's ``limit``: 1 to ``most`` ``what`` per page, ``default`` without one."""
    rule = f"limit must be a whole number from 1 to {most}"
    return QueryInteger(
        load_default=default,
        validate=validate.Range(1, most, error=rule),
        error_messages={"invalid": rule},
        metadata={"description": f"{what} per page, 1 to {most}"},
    )


class HistoryQuerySchema(Schema):
    """``?limit=N&cursor=C`` of the history endpoint."""

    class Meta:
        unknown = EXCLUDE

    limit = _page_limit(20, 100, "Events")
    # An empty cursor is one this service never gave out: a 400, as the minLength says.
    cursor = fields.String(
        load_default=None,
        metadata={
            "description": "The `next` of the previous page; only cursors this service gave out",
            "minLength": 1,
        },
    )


class ChangeSchema(Schema):
    """One change of the feed: an event that became its member's current state."""

    class Meta:
        ordered = True

    correlationId = fields.String(attribute="event.correlation_id", required=True)
    LOYALTY_OPTIN = _status(attribute="event.status", required=True)
    previous = fields.String(
        allow_none=True,
        required=True,
        metadata={
            "description": "The status it replaced; null for the member's first change",
            "enum": [*STATUSES, None],
        },
    )
    updatedAt = Timestamp(
        attribute="event.updated_at",
        required=True,
        metadata={"description": "When it was recorded"},
    )
    requestId = fields.String(attribute="event.request_id", required=True)
    source = fields.String(
        attribute="event.source",
        required=True,
        metadata={"description": "X-Consent-Source of the request"},
    )
    client = fields.String(
        attribute="event.client",
        required=True,
        metadata={"description": "The authenticated client that recorded it (empty without auth)"},
    )
    version = fields.Integer(
        required=True,
        metadata={
            "description": "The member's change count: 1, 2, 3... without a gap",
            "minimum": 1,
        },
    )


class ChangesPageSchema(Schema):
    """A page of the change feed, in commit order, and where to read on."""

    items = fields.List(fields.Nested(ChangeSchema), required=True)
    next = fields.String(
        required=True,
        metadata={
            "description": (
                "Pass it back as `after` to read on; after an empty page it is the cursor "
                "sent (or the start), to poll again from"
            ),
            "minLength": 1,
        },
    )


class ChangesQuerySchema(Schema):
    """``?after=CURSOR&limit=N`` of the change feed."""

    class Meta:
        unknown = EXCLUDE

    limit = _page_limit(100, 1000, "Changes")
    # Read by the store, which refuses a cursor it did not give out (a 400): an empty
    # one, or one over MAX_CURSOR, never is one.
    after = fields.String(
        load_default=None,
        metadata={
            "description": (
                "The `next` of the previous page; without it, from the oldest change kept. "
                "Only cursors this service gave out; one into changes no longer kept is a 410"
            ),
            "minLength": 1,
            "maxLength": MAX_CURSOR,
        },
    )


#: Every ``errorCode`` the envelope carries: one per status, plus the PUT's 422.
ERROR_CODE_VALUES = (*ERROR_CODES.values(), "IDEMPOTENCY_KEY_REUSED")


class ErrorSchema(Schema):
    """The error envelope every error status answers (see ``errors.py``)."""

    statusCode = fields.Integer(
        required=True, metadata={"description": "The HTTP status, repeated"}
    )
    errorCode = fields.String(
        required=True,
        validate=validate.OneOf(ERROR_CODE_VALUES),
        metadata={"description": "What went wrong, for programs"},
    )
    errorMessage = fields.String(
        required=True, metadata={"description": "What went wrong, for people"}
    )


class OptInUpdatedSchema(Schema):
    """The PUT's 200 body, always the same 29 bytes: ``{"message":"Opt-in updated."}``
    (written as those bytes, never dumped: this schema documents them)."""

    message = fields.String(required=True, validate=validate.OneOf(["Opt-in updated."]))


class HealthSchema(Schema):
    """``/healthz`` answers ``{"status": "ok"}``, ``/readyz`` ``{"status": "ready"}``."""

    status = fields.String(required=True, validate=validate.OneOf(("ok", "ready")))


class EventSchema(Schema):
    """One event as a line of ``optin export`` / ``optin import`` (JSON Lines)."""

    class Meta:
        unknown = RAISE
        ordered = True

    correlationId = fields.String(
        attribute="correlation_id", required=True, validate=_FullMatch(CORRELATION_ID)
    )
    LOYALTY_OPTIN = _status(attribute="status", required=True)
    updatedAt = Timestamp(
        attribute="updated_at",
        required=True,
        error_messages={"invalid_awareness": "needs a time zone, such as Z for UTC"},
    )
    requestId = fields.String(
        attribute="request_id", required=True, validate=_FullMatch(REQUEST_ID)
    )
    source = fields.String(load_default=DEFAULT_SOURCE, validate=_FullMatch(SOURCE))
    client = fields.String(load_default="", validate=_FullMatch(CLIENT))


_request_schema = OptInRequestSchema()
_state_schema = OptInStateSchema()
_page_schema = HistoryPageSchema()
_query_schema = HistoryQuerySchema()
_event_schema = EventSchema()
_change_schema = ChangeSchema()
_changes_schema = ChangesPageSchema()
_changes_query_schema = ChangesQuerySchema()


def load_optin_status(data: bytes) -> Status:
    """The status a PUT body asks for, or an :class:`ApiError` with the seed's message."""
    try:
        loaded = _request_schema.load(loads_object(data))
    except ValidationError as exc:
        messages = exc.messages_dict.get("LOYALTY_OPTIN") or [INVALID_OPTIN]
        raise ApiError(400, messages[0]) from None
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    return loaded["LOYALTY_OPTIN"]


def dump_state(record: OptInRecord) -> dict[str, Any]:
    """The GET body for ``record``."""
    return _state_schema.dump(record)


def dump_page(items: list[OptInRecord], next_cursor: str | None) -> dict[str, Any]:
    """The history body."""
    return _page_schema.dump({"items": items, "next": next_cursor})


def load_history_query(args: Any) -> tuple[int, tuple[int, str] | None]:
    """``limit`` and the decoded ``cursor`` of a history request, or a 400."""
    try:
        query = _query_schema.load(args)
    except ValidationError as exc:
        raise ApiError(400, _first_message(exc)) from None
    cursor = query["cursor"]
    return query["limit"], None if cursor is None else decode_cursor(cursor)


def encode_cursor(position: tuple[int, str]) -> str:
    """An opaque cursor for the history page after ``position``."""
    raw = f"{position[0]}:{position[1]}".encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# An event's time in µs (years 1 to 9999 need 18 digits at most): fits SQLite's INTEGER.
_CURSOR_US = re.compile(r"-?[0-9]{1,18}")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """The position a cursor from :func:`encode_cursor` holds, or a 400."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        us, rid = raw.split(":", 1)
        if not _CURSOR_US.fullmatch(us):
            raise ValueError(us)
        return int(us), rid
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ApiError(400, "cursor is not one this service gave out") from None


def load_changes_query(args: Any) -> tuple[int, str | None]:
    """``limit`` and ``after`` (the cursor, still opaque: the store reads it) of a
    change feed request, or a 400."""
    try:
        query = _changes_query_schema.load(args)
    except ValidationError as exc:
        raise ApiError(400, _first_message(exc)) from None
    return query["limit"], query["after"]


def dump_changes(page: ChangePage) -> dict[str, Any]:
    """The change feed's body for ``page``."""
    return _changes_schema.dump({"items": page.changes, "next": page.next})


def dump_change(change: Change) -> dict[str, Any]:
    """One change, as in the feed's ``items`` (and a line of ``optin changes list``)."""
    return _change_schema.dump(change)


def dump_event(record: OptInRecord) -> dict[str, Any]:
    """An event as one export line's object."""
    return _event_schema.dump(record)


def load_event(line: str | bytes) -> OptInRecord:
    """An event from one import line; ``ValueError`` says what is wrong with it."""
    try:
        data = _event_schema.load(loads_object(line, "the event"))
    except ValidationError as exc:
        raise ValueError(_first_message(exc)) from None
    return OptInRecord(**data)


def _first_message(exc: ValidationError) -> str:
    """The first field's first message, ``field: message``; both cut (an unknown key
    is a field too, and can be the huge part of a line)."""
    field, messages = next(iter(exc.normalized_messages().items()))
    message = messages[0] if isinstance(messages, list) else str(messages)
    if message.startswith(field):
        return cut(message, limit=2 * SHOWN)
    return f"{cut(str(field))}: {cut(message, limit=2 * SHOWN)}"
