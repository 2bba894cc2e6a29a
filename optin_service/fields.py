"""The marshmallow fields the schemas are built from: a time, a whole number in a query,
a value that must match a format whole, a member's answer, a page's limit."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from marshmallow import ValidationError, fields, validate

from .formats import SUBMICROSECOND, cut, format_time
from .storage import EARLIEST, LATEST, STATUSES

__all__ = ["INVALID_OPTIN", "FullMatch", "QueryInteger", "Timestamp", "page_limit", "status_field"]

#: The seed's message for an answer other than ``accepted`` or ``declined``.
INVALID_OPTIN = "Invalid opt-in response provided"


class FullMatch(validate.Validator):
    """The whole value matches ``pattern`` (marshmallow's Regexp only anchors the
    start); the error quotes the value, cut to :data:`~optin_service.formats.SHOWN` characters."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern

    def __call__(self, value: str) -> str:
        if self.pattern.fullmatch(value) is None:
            raise ValidationError(f"{cut(value, quote=True)} is not valid")
        return value


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


def status_field(**kwargs: Any) -> fields.String:
    """A member's answer, ``accepted`` or ``declined``; anything else is the seed's
    :data:`INVALID_OPTIN`."""
    return fields.String(
        validate=validate.OneOf(STATUSES, error=INVALID_OPTIN),
        metadata={"description": "The member's answer", "enum": list(STATUSES)},
        **kwargs,
    )


class QueryInteger(fields.Integer):
    """A whole number written in ASCII digits only (``int()`` would also take
    spaces, signs, underscores and non-ASCII digits)."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> int:
        if not (isinstance(value, str) and value.isascii() and value.isdigit()):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


def page_limit(default: int, most: int, what: str) -> QueryInteger:
    """A page's ``limit``: 1 to ``most`` ``what`` per page, ``default`` without one."""
    rule = f"limit must be a whole number from 1 to {most}"
    return QueryInteger(
        load_default=default,
        validate=validate.Range(1, most, error=rule),
        error_messages={"invalid": rule},
        metadata={"description": f"{what} per page, 1 to {most}"},
    )
