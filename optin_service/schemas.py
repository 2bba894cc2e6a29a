"""Bodies in and out: the marshmallow schemas of the API and of an export line, built
once, and the functions that load and dump with them.

JSON text is parsed strictly first (:mod:`.strict_json`); the schemas' field types are
in :mod:`.fields`, what a value may look like and how a time is written in
:mod:`.formats`. Names of those modules that callers import from here stay importable
from here.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from marshmallow import EXCLUDE, RAISE, Schema, ValidationError, fields, validate

from .errors import ERROR_CODES, ApiError
from .feed import MAX_CURSOR
from .fields import INVALID_OPTIN, FullMatch, QueryInteger, Timestamp, page_limit, status_field
from .formats import (
    CLIENT,
    CORRELATION_ID,
    CORRELATION_ID_RULE,
    IDEMPOTENCY_KEY,
    REQUEST_ID,
    SHOWN,
    SOURCE,
    SUBMICROSECOND,
    cut,
    format_time,
)
from .storage import DEFAULT_SOURCE, STATUSES, Change, ChangePage, OptInRecord, Status
from .strict_json import loads_object

# What others import from here, the value formats, field types and strict parser the
# schemas are built on included.
__all__ = [
    "CLIENT",
    "CORRELATION_ID",
    "CORRELATION_ID_RULE",
    "ERROR_CODE_VALUES",
    "IDEMPOTENCY_KEY",
    "INVALID_OPTIN",
    "MISSING_OPTIN",
    "REQUEST_ID",
    "SHOWN",
    "SOURCE",
    "SUBMICROSECOND",
    "ChangeSchema",
    "ChangesPageSchema",
    "ChangesQuerySchema",
    "ErrorSchema",
    "EventSchema",
    "HealthSchema",
    "HistoryItemSchema",
    "HistoryPageSchema",
    "HistoryQuerySchema",
    "OptInRequestSchema",
    "OptInStateSchema",
    "OptInUpdatedSchema",
    "QueryInteger",
    "Timestamp",
    "cut",
    "decode_cursor",
    "dump_change",
    "dump_changes",
    "dump_event",
    "dump_page",
    "dump_state",
    "encode_cursor",
    "format_time",
    "load_changes_query",
    "load_event",
    "load_history_query",
    "load_optin_status",
    "loads_object",
]

MISSING_OPTIN = "LOYALTY_OPTIN missing from body"


class OptInRequestSchema(Schema):
    """``{"LOYALTY_OPTIN": "accepted" | "declined"}``; other keys are ignored."""

    class Meta:
        unknown = EXCLUDE

    LOYALTY_OPTIN = status_field(
        required=True,
        error_messages={"required": MISSING_OPTIN, "null": INVALID_OPTIN, "invalid": INVALID_OPTIN},
    )


# Response bodies (dumped, never loaded): every field is ``required`` because every
# dump writes it, which is what the OpenAPI document then says.


class OptInStateSchema(Schema):
    """The current state answered by ``GET``."""

    LOYALTY_OPTIN = status_field(attribute="status", required=True)
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


class HistoryQuerySchema(Schema):
    """``?limit=N&cursor=C`` of the history endpoint."""

    class Meta:
        unknown = EXCLUDE

    limit = page_limit(20, 100, "Events")
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
    LOYALTY_OPTIN = status_field(attribute="event.status", required=True)
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

    limit = page_limit(100, 1000, "Changes")
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
        attribute="correlation_id", required=True, validate=FullMatch(CORRELATION_ID)
    )
    LOYALTY_OPTIN = status_field(attribute="status", required=True)
    updatedAt = Timestamp(
        attribute="updated_at",
        required=True,
        error_messages={"invalid_awareness": "needs a time zone, such as Z for UTC"},
    )
    requestId = fields.String(attribute="request_id", required=True, validate=FullMatch(REQUEST_ID))
    source = fields.String(load_default=DEFAULT_SOURCE, validate=FullMatch(SOURCE))
    client = fields.String(load_default="", validate=FullMatch(CLIENT))


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
        # Both parts as a cursor given out holds them: a request id of an event stored.
        if not (_CURSOR_US.fullmatch(us) and REQUEST_ID.fullmatch(rid)):
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
