"""The blueprint: the seed's PUT, the GET of current state, and health checks.

Routes stay thin: check the id, validate the body, call the store.
"""

from __future__ import annotations

import json
import re

from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from .errors import ApiError, register_error_handlers
from .headers import no_https_redirect
from .schemas import dump_state, load_optin_status
from .storage import OptInRecord, OptInStore

bp = Blueprint("optin", __name__)
# Errors raised by these views get the envelope even when a host app has its own
# handlers: Flask consults a blueprint's handlers before the app's.
register_error_handlers(bp)

OPTIN_PATH = "/client/users/<correlation_id>/profile/optin"
#: Path prefixes of the API when mounted without a url_prefix (its 404s and 405s).
API_PATHS = ("/client/users/", "/healthz", "/readyz")
#: The seed's 200 body, exactly these 29 bytes (``jsonify`` would add a newline).
UPDATED_BODY = b'{"message":"Opt-in updated."}'
_CORRELATION_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


def store() -> OptInStore:
    """The store of the app handling this request."""
    return current_app.extensions["optin"].store


def _json(body: object, status: int = 200) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status, mimetype="application/json")


def _checked_id(correlation_id: str) -> str:
    if not _CORRELATION_ID.fullmatch(correlation_id):
        raise ApiError(400, "correlation_id must be 1 to 128 characters of A-Z a-z 0-9 . _ : @ -")
    return correlation_id


def _body() -> bytes:
    """The request body, at most ``OPTIN_MAX_BODY_BYTES`` long (else 413)."""
    limit = current_app.config["OPTIN_MAX_BODY_BYTES"]
    # Set per request (Flask >= 3.1) so a host app's own limit is left alone. One
    # byte of headroom: a body without Content-Length (chunked) is cut at the limit
    # silently, and that extra byte tells a body that fits from one that does not.
    request.max_content_length = limit + 1
    data = request.get_data(cache=False)
    if len(data) > limit:
        raise RequestEntityTooLarge()
    return data


@bp.put(OPTIN_PATH)
@no_https_redirect
def put_optin(correlation_id: str) -> Response:
    """Record the member's answer; the body is the seed's, byte for byte."""
    correlation_id = _checked_id(correlation_id)
    if request.mimetype != "application/json":
        raise ApiError(415, "Content-Type must be application/json")
    status = load_optin_status(_body())
    store().set(OptInRecord.now(correlation_id, status))
    return Response(UPDATED_BODY, 200, mimetype="application/json")


@bp.get(OPTIN_PATH)
@no_https_redirect
def get_optin(correlation_id: str) -> Response:
    """The member's current answer and when it was recorded."""
    record = store().get(_checked_id(correlation_id))
    if record is None:
        raise ApiError(404, f"No opt-in recorded for {correlation_id}")
    return _json(dump_state(record))


@bp.get("/healthz")
@no_https_redirect
def healthz() -> Response:
    """The process is up (says nothing about storage)."""
    return _json({"status": "ok"})


@bp.get("/readyz")
@no_https_redirect
def readyz() -> Response:
    """The store answers; 503 (with Retry-After) while it does not."""
    store().check()
    return _json({"status": "ready"})
