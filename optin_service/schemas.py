"""Request and response bodies: strict JSON parsing, then marshmallow schemas.

The standard ``json`` module accepts NaN, Infinity and duplicate keys; a
consent body that says both "accepted" and "declined" is not consent, so the
parser here rejects all three before marshmallow sees the data.
"""

from __future__ import annotations

import json
from datetime import timezone
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from .errors import ApiError
from .storage import STATUSES, OptInRecord, Status

INVALID_OPTIN = "Invalid opt-in response provided"
MISSING_OPTIN = "LOYALTY_OPTIN missing from body"


class OptInRequestSchema(Schema):
    """``{"LOYALTY_OPTIN": "accepted" | "declined"}``; other keys are ignored."""

    class Meta:
        unknown = EXCLUDE

    LOYALTY_OPTIN = fields.String(
        required=True,
        validate=validate.OneOf(STATUSES, error=INVALID_OPTIN),
        error_messages={"required": MISSING_OPTIN, "null": INVALID_OPTIN, "invalid": INVALID_OPTIN},
        metadata={"description": "The member's answer", "enum": list(STATUSES)},
    )


def format_time(record: OptInRecord) -> str:
    """``2026-11-26T12:00:00.123456Z``: UTC, always six fractional digits."""
    return record.updated_at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class OptInStateSchema(Schema):
    """The current state answered by ``GET``."""

    LOYALTY_OPTIN = fields.String(attribute="status", metadata={"enum": list(STATUSES)})
    updatedAt = fields.Function(format_time, metadata={"format": "date-time"})


class _BadJSON(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _BadJSON(f"{name} is not a valid JSON value")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _BadJSON(f"Duplicate key in JSON body: {key}")
        obj[key] = value
    return obj


def parse_json_object(data: bytes) -> dict[str, Any]:
    """One JSON object, strictly: no NaN/Infinity, no duplicate keys, UTF-8."""
    try:
        value = json.loads(
            data.decode("utf-8"),
            parse_constant=_reject_constant,
            object_pairs_hook=_reject_duplicates,
        )
    except _BadJSON as exc:
        raise ApiError(400, str(exc)) from None
    except UnicodeDecodeError:
        raise ApiError(400, "Request body is not valid UTF-8") from None
    except (ValueError, RecursionError):
        raise ApiError(400, "Request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, "Request body must be a JSON object")
    return value


_request_schema = OptInRequestSchema()
_state_schema = OptInStateSchema()


def load_optin_status(data: bytes) -> Status:
    """The status a PUT body asks for, or an :class:`ApiError` with the seed's message."""
    try:
        loaded = _request_schema.load(parse_json_object(data))
    except ValidationError as exc:
        messages = exc.messages_dict.get("LOYALTY_OPTIN") or [INVALID_OPTIN]
        raise ApiError(400, messages[0]) from None
    return loaded["LOYALTY_OPTIN"]


def dump_state(record: OptInRecord) -> dict[str, Any]:
    """The GET body for ``record``."""
    return _state_schema.dump(record)
