"""The blueprint: the seed's PUT, the GET of current state, the change feed, and
health checks.

Routes stay thin: check the id, validate the body, call the store. Each view
carries its own OpenAPI :class:`~.operation.Operation` (what it takes, what it
answers); ``openapi.py`` adds what every route shares.
"""

from __future__ import annotations

import functools
import json
from contextlib import AbstractContextManager, nullcontext

from flask import Blueprint, Response, current_app, request
from werkzeug.datastructures import Headers
from werkzeug.exceptions import NotFound

from .auth import check_request, client_name
from .body import read_body
from .errors import ApiError, register_error_handlers
from .feed import CursorExpired, CursorInvalid
from .headers import no_https_redirect, request_id
from .metrics import consent_changed, exposition, storage_operation
from .openapi import document
from .operation import Operation, Parameter
from .schemas import (
    CORRELATION_ID,
    CORRELATION_ID_RULE,
    IDEMPOTENCY_KEY,
    SOURCE,
    ChangesPageSchema,
    ChangesQuerySchema,
    HealthSchema,
    HistoryPageSchema,
    HistoryQuerySchema,
    OptInRequestSchema,
    OptInStateSchema,
    OptInUpdatedSchema,
    dump_changes,
    dump_page,
    dump_state,
    encode_cursor,
    load_changes_query,
    load_history_query,
    load_optin_status,
)
from .storage import DEFAULT_SOURCE, IdempotencyKeyReused, OptInRecord, OptInStore

bp = Blueprint("optin", __name__)
# Errors raised by these views get the envelope even when a host app has its own
# handlers: for the same status or class, Flask consults a blueprint's handlers first.
register_error_handlers(bp)
bp.before_request(check_request)


@bp.before_request
def _options() -> Response | None:
    """OPTIONS on an API path: 204 with ``Allow``, and no body, so no Content-Type
    (Flask's automatic answer is an empty ``text/html`` 200)."""
    if request.method != "OPTIONS":
        return None
    allowed = current_app.make_default_options_response().allow
    response = Response(status=204, headers={"Allow": ", ".join(sorted(allowed))})
    del response.headers["Content-Type"]
    return response


OPTIN_PATH = "/client/users/<correlation_id>/profile/optin"
CHANGES_PATH = "/client/optin/changes"
#: Path prefixes of the API when mounted without a url_prefix (its 404s and 405s).
API_PATHS = (
    "/client/users/",
    "/client/optin/",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
)
#: The seed's 200 body, exactly these 29 bytes (``jsonify`` would add a newline).
UPDATED_BODY = b'{"message":"Opt-in updated."}'

#: The parameters the views take, as the document describes and the views check them.
MEMBER = Parameter(
    "correlation_id",
    "path",
    f"The member: {CORRELATION_ID_RULE}",
    CORRELATION_ID,
    128,
    example="member-42",
)
CONSENT_SOURCE = Parameter(
    "X-Consent-Source",
    "header",
    "The channel the consent came through, stored with the event (default API)",
    SOURCE,
    32,
    example="STORE_42",
)
IDEMPOTENCY = Parameter(
    "Idempotency-Key",
    "header",
    "Makes a retry safe: the same key with the same answer for the same member within 24 "
    "hours returns the same 200 and records nothing new; the same key with another answer "
    "is a 422 IDEMPOTENCY_KEY_REUSED",
    IDEMPOTENCY_KEY,
    255,
)
#: What every route of a member can answer, besides its own.
MEMBER_ERRORS = {
    400: f"A correlation_id that is not {CORRELATION_ID_RULE}",
    500: "A bug or a storage fault (no details; see the log)",
    503: "Storage is unreachable or busy: retry after Retry-After",
}


def store() -> OptInStore:
    """The store of the app handling this request."""
    return current_app.extensions["optin"].store


def _timed(operation: str) -> AbstractContextManager[None]:
    """Time a storage call for the metrics (a no-op when metrics are off)."""
    state = current_app.extensions["optin"]
    if not state.metrics:
        return nullcontext()
    return storage_operation(state.backend, operation)


def _json(body: object, status: int = 200) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status, mimetype="application/json")


def _checked_id(correlation_id: str) -> str:
    if not CORRELATION_ID.fullmatch(correlation_id):
        raise ApiError(400, f"correlation_id must be {CORRELATION_ID_RULE}")
    return correlation_id


def _header(headers: Headers, parameter: Parameter, rule: str) -> str | None:
    """The header's value if sent, checked as its documentation says; ``rule`` in words."""
    value = headers.get(parameter.name)
    if value is not None and not parameter.pattern.fullmatch(value):
        raise ApiError(400, f"{parameter.name} must be {rule}")
    return value


@bp.put(OPTIN_PATH)
@no_https_redirect
@Operation(
    "putOptIn",
    "Record the member's answer",
    tag="consent",
    description=(
        "Stores the answer as an immutable event (with the server's time, the request id "
        "and the source) and makes it the member's current state."
    ),
    parameters=[MEMBER, CONSENT_SOURCE, IDEMPOTENCY],
    body=OptInRequestSchema,
    body_example={"LOYALTY_OPTIN": "accepted"},
    ok="Recorded as a new consent event (or an idempotent replay): always these 29 bytes",
    returns=OptInUpdatedSchema,
    example={"message": "Opt-in updated."},
    links={
        "GetOptIn": {
            "operationId": "getOptIn",
            "parameters": {"correlation_id": "$request.path.correlation_id"},
        }
    },
    errors={
        **MEMBER_ERRORS,
        400: "A bad correlation_id, X-Consent-Source or Idempotency-Key; a body that is not one "
        "JSON object (NaN, Infinity and duplicate keys are refused); LOYALTY_OPTIN missing, "
        "or not exactly accepted or declined; a malformed chunked body, or one shorter "
        "than its Content-Length",
        408: "The body did not all arrive within OPTIN_BODY_TIMEOUT_SECONDS",
        413: "A body over OPTIN_MAX_BODY_BYTES",
        415: "A Content-Type other than application/json",
        422: (
            "The Idempotency-Key was already used for this member with another answer",
            "IDEMPOTENCY_KEY_REUSED",
        ),
    },
)
def put_optin(correlation_id: str) -> Response:
    """Record the member's answer as a new event; the body is the seed's, byte for byte."""
    correlation_id = _checked_id(correlation_id)
    headers = request.headers
    source = _header(headers, CONSENT_SOURCE, "1 to 32 characters of A-Z a-z 0-9 _ -")
    key = _header(headers, IDEMPOTENCY, "1 to 255 printable ASCII characters")
    if request.mimetype != "application/json":
        raise ApiError(415, "Content-Type must be application/json")
    state = current_app.extensions["optin"]
    status = load_optin_status(read_body(request, state.max_body_bytes, state.body_timeout))
    record = OptInRecord.now(
        correlation_id, status, request_id(), source or DEFAULT_SOURCE, client_name()
    )
    try:
        with _timed("set"):
            current = state.store.set(record, idempotency_key=key)
    except IdempotencyKeyReused:
        raise ApiError(
            422,
            "Idempotency-Key was already used for this member with a different request",
            "IDEMPOTENCY_KEY_REUSED",
        ) from None
    if state.metrics and current.request_id == record.request_id:
        consent_changed(status)
    response = Response(UPDATED_BODY, 200, mimetype="application/json")
    retention = state.retention
    if retention is not None and retention.due():
        # Once the answer is sent: the client never waits for the prune.
        response.call_on_close(functools.partial(retention.prune, state.store))
    return response


@bp.get(OPTIN_PATH)
@no_https_redirect
@Operation(
    "getOptIn",
    "The member's current answer",
    tag="consent",
    parameters=[MEMBER],
    ok="The member's current answer and when it was recorded (UTC, microseconds)",
    returns=OptInStateSchema,
    example={"LOYALTY_OPTIN": "accepted", "updatedAt": "2026-11-26T12:00:00.123456Z"},
    errors={**MEMBER_ERRORS, 404: "Nothing was ever recorded for this member"},
)
def get_optin(correlation_id: str) -> Response:
    """The member's current answer and when it was recorded."""
    with _timed("get"):
        record = store().get(_checked_id(correlation_id))
    if record is None:
        raise ApiError(404, f"No opt-in recorded for {correlation_id}")
    return _json(dump_state(record))


@bp.get(OPTIN_PATH + "/history")
@no_https_redirect
@Operation(
    "getOptInHistory",
    "The member's consent events, a page at a time",
    tag="consent",
    parameters=[MEMBER],
    query=HistoryQuerySchema,
    ok="The member's consent events, newest first; `next` is null on the last page",
    returns=HistoryPageSchema,
    links={
        "NextPage": {
            "operationId": "getOptInHistory",
            "parameters": {
                "correlation_id": "$request.path.correlation_id",
                "cursor": "$response.body#/next",
            },
        }
    },
    errors={
        **MEMBER_ERRORS,
        400: "A bad correlation_id, a limit that is not a whole number from 1 to 100, "
        "or a cursor this service did not give out",
        404: "No events for this member",
    },
)
def get_history(correlation_id: str) -> Response:
    """The member's consent events, newest first, a page at a time."""
    correlation_id = _checked_id(correlation_id)
    limit, before = load_history_query(request.args)
    with _timed("history"):
        events = store().history(correlation_id, limit + 1, before)
    if not events and before is None:
        raise ApiError(404, f"No opt-in history for {correlation_id}")
    page = events[:limit]
    next_cursor = encode_cursor(page[-1].position) if len(events) > limit else None
    return _json(dump_page(page, next_cursor))


@bp.get(CHANGES_PATH)
@no_https_redirect
@Operation(
    "getOptInChanges",
    "The change feed: every change of a member's state, in commit order",
    tag="consent",
    description=(
        "A change is an event that became its member's current state (a PUT, an imported "
        "newer event), appended atomically with it. Pages come in commit order: a reader "
        "tailing the feed while writers run sees each change once, in the order a reader "
        "from the start sees them later. Pass `next` back as `after`; an empty page is the "
        "end for now (poll again from the same cursor). `version` counts a member's "
        "changes without a gap."
    ),
    query=ChangesQuerySchema,
    ok="Up to `limit` changes after `after`, oldest first, and the cursor to read on from",
    returns=ChangesPageSchema,
    links={
        "NextPage": {
            "operationId": "getOptInChanges",
            "parameters": {"after": "$response.body#/next"},
        }
    },
    errors={
        400: "A limit that is not a whole number from 1 to 1000, or an after this service "
        "did not give out",
        410: "The changes after this cursor are no longer kept (OPTIN_CHANGES_RETENTION, or "
        "the feed was rebuilt): resynchronise, then read from the start without after",
        500: "A bug or a storage fault (no details; see the log)",
        503: "Storage is unreachable or busy: retry after Retry-After",
    },
)
def get_changes() -> Response:
    """The change feed: up to ``limit`` changes in commit order, after the cursor ``after``."""
    limit, after = load_changes_query(request.args)
    try:
        with _timed("changes"):
            page = store().changes(after, limit)
    except CursorInvalid:
        raise ApiError(400, "after is not a cursor this service gave out") from None
    except CursorExpired:
        raise ApiError(
            410,
            "The changes after this cursor are no longer kept (retention, or the feed was "
            "rebuilt): read the feed again from the start, without after",
        ) from None
    return _json(dump_changes(page))


@bp.get("/healthz")
@no_https_redirect
@Operation(
    "getHealth",
    "Liveness",
    tag="operations",
    ok="The process is up (storage is not checked)",
    returns=HealthSchema,
    example={"status": "ok"},
)
def healthz() -> Response:
    """The process is up (says nothing about storage)."""
    return _json({"status": "ok"})


@bp.get("/readyz")
@no_https_redirect
@Operation(
    "getReadiness",
    "Readiness",
    tag="operations",
    ok="Storage answers",
    returns=HealthSchema,
    example={"status": "ready"},
    errors={503: "Storage does not answer: retry after Retry-After"},
)
def readyz() -> Response:
    """The store answers; 503 (with Retry-After) while it does not."""
    with _timed("check"):
        store().check()
    return _json({"status": "ready"})


@bp.get("/metrics")
@no_https_redirect
@Operation(
    "getMetrics",
    "Prometheus metrics",
    tag="operations",
    ok="Prometheus text exposition, summed over the workers",
    returns={"type": "string"},
    media="text/plain",
    enabled_by="OPTIN_METRICS",
)
def metrics() -> Response:
    """Prometheus metrics (summed over gunicorn workers); 404 when OPTIN_METRICS is off."""
    if not current_app.extensions["optin"].metrics:
        raise NotFound()
    body, content_type = exposition()
    return Response(body, 200, content_type=content_type)


@bp.get("/openapi.json", endpoint="openapi")
@no_https_redirect
@Operation(
    "getOpenApi",
    "This document",
    tag="operations",
    ok="This document (OpenAPI 3.1)",
    returns={"type": "object"},
)
def openapi_document() -> Response:
    """This API's OpenAPI 3.1 document, built once per app."""
    state = current_app.extensions["optin"]
    if state.openapi is None:  # built on first use: every blueprint is registered by then
        state.openapi = document(current_app)
    return Response(state.openapi, 200, mimetype="application/json")
