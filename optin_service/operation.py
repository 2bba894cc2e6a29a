"""What a view says about itself in the OpenAPI document, declared beside it.

A view of the API carries an :class:`Operation` (its decorator): what is its own
(id, summary, parameters, bodies, its 200 and the errors it raises). What every
operation shares, and what the app's settings add, is ``openapi.py``'s. Adding an
endpoint is writing its view and its ``@Operation(...)``::

    @bp.get("/things/<thing_id>")
    @Operation("getThing", "A thing", tag="consent", parameters=[THING],
               ok="The thing", returns=ThingSchema, errors={404: "No such thing"})
    def get_thing(thing_id: str) -> Response: ...
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from marshmallow import Schema

#: The tags an operation may name, with their descriptions, in the document's order.
TAGS = {"consent": "A member's consent", "operations": "Probes, metrics, this document"}
#: The view attribute holding its :class:`Operation`. Flask-Limiter wraps limited
#: views with ``functools.wraps``, which copies it to the wrapper.
_ATTRIBUTE = "openapi_operation"
View = TypeVar("View", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class Parameter:
    """A string parameter the service full-matches against ``pattern``, 1 to
    ``max_length`` characters: one component of the document, referenced by name."""

    name: str
    location: str  # "path" or "header"
    description: str
    pattern: re.Pattern[str]
    max_length: int
    example: str | None = None

    def component(self) -> dict[str, Any]:
        """The component; the pattern anchored, as JSON Schema (ECMA-262) reads it."""
        pattern, length = f"^{self.pattern.pattern}$", self.max_length
        schema = {"type": "string", "pattern": pattern, "minLength": 1, "maxLength": length}
        example = {} if self.example is None else {"example": self.example}
        return {"description": self.description, "schema": schema, **example}


@dataclasses.dataclass(frozen=True)
class Operation:
    """One operation of the API as its view declares it; the view's decorator.

    ``ok`` describes the 200, whose body ``returns`` (a marshmallow schema, or a
    JSON Schema) is sent as ``media``, with ``example`` and ``links``. ``errors``
    maps each error status the view itself answers to its description, or to
    ``(description, errorCode)`` for a code other than the status's own; 500 is
    "a bug" unless said otherwise. ``parameters`` are path and header parameters,
    ``query`` a marshmallow schema of the query string, ``body`` one of a JSON
    request body. A view ``enabled_by`` a setting that is off answers 404 instead.
    Authentication, rate limits and the headers are not declared here: the
    document adds them to every operation as the app's settings have them.
    """

    operation_id: str
    summary: str
    tag: str
    ok: str
    returns: type[Schema] | dict[str, Any]
    example: Any = None
    media: str = "application/json"
    links: Mapping[str, Any] | None = None
    description: str | None = None
    parameters: Sequence[Parameter] = ()
    query: type[Schema] | None = None
    body: type[Schema] | None = None
    body_example: Any = None
    errors: Mapping[int, str | tuple[str, str]] = dataclasses.field(default_factory=dict)
    enabled_by: str | None = None

    def __post_init__(self) -> None:
        if self.tag not in TAGS:
            raise ValueError(f"{self.operation_id}: tag {self.tag!r} is not one of {list(TAGS)}")

    def __call__(self, view: View) -> View:
        setattr(view, _ATTRIBUTE, self)
        return view


def declared(view: Callable[..., Any]) -> Operation | None:
    """The :class:`Operation` ``view`` carries (``None`` for a view that is not the API's)."""
    found = getattr(view, _ATTRIBUTE, None)
    return found if isinstance(found, Operation) else None
