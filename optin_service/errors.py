"""The JSON error envelope, and the handlers that give every error status one.

Every error, whichever layer raises it (routing, body limit, validation,
storage, a bug), answers ``{"statusCode": ..., "errorCode": ..., "errorMessage": ...}``
and never an HTML page or a stack trace.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException, default_exceptions

from .headers import REQUEST_ID_HEADERS, RESPONSE_HEADERS, new_request_id, request_id
from .storage import StorageError, StorageUnavailable

log = logging.getLogger(__name__)

#: The ``errorCode`` of each status the API answers, gunicorn's own included (it
#: refuses some requests before the app runs: 400, 414, 417, 431, 501; see
#: ``http_error``). The README's error table lists the same.
ERROR_CODES: dict[int, str] = {
    400: "INVALID_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "REQUEST_TIMEOUT",
    410: "CURSOR_EXPIRED",
    413: "PAYLOAD_TOO_LARGE",
    414: "REQUEST_URI_TOO_LONG",
    415: "UNSUPPORTED_MEDIA_TYPE",
    417: "EXPECTATION_FAILED",
    429: "TOO_MANY_REQUESTS",
    431: "REQUEST_HEADER_FIELDS_TOO_LARGE",
    500: "INTERNAL_ERROR",
    501: "NOT_IMPLEMENTED",
    503: "SERVICE_UNAVAILABLE",
}


class ApiError(HTTPException):
    """An error answered with the envelope: raise it from anywhere in a request."""

    def __init__(
        self,
        status: int,
        message: str,
        error_code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = status
        self.error_code = error_code
        self.extra_headers = headers or {}


def error_response(
    status: int,
    message: str,
    error_code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """The envelope as a response. Codes not in the table are derived from the reason."""
    body = envelope(status, message, error_code)
    return Response(body, status, headers=headers, mimetype="application/json")


def envelope(status: int, message: str, error_code: str | None = None) -> str:
    """The envelope's JSON text."""
    if error_code is None:
        error_code = ERROR_CODES.get(status) or _reason_code(status)
    # A message may quote the client's text, which may hold a lone surrogate (a JSON
    # key "\ud800"): UTF-8 has no bytes for one, so it is written as its escape.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return json.dumps(
        {"statusCode": status, "errorCode": error_code, "errorMessage": message},
        separators=(",", ":"),
        ensure_ascii=False,
    )


def http_error(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 error response: the envelope, the seed's headers and a request
    id, for the errors gunicorn answers itself (a request it cannot parse, before any
    app runs), which it would otherwise answer with an HTML page."""
    body = envelope(status, message or ("Internal error" if status >= 500 else reason)).encode()
    rid = new_request_id()
    head = [
        f"HTTP/1.1 {status} {reason}",
        "Connection: close",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in RESPONSE_HEADERS),
        *(f"{name}: {rid}" for name in REQUEST_ID_HEADERS),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def _reason_code(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.upper().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "INTERNAL_ERROR" if status >= 500 else "INVALID_REQUEST"


def _message(exc: HTTPException) -> str:
    """Short, specific messages for what Werkzeug raises; ours carry their own."""
    if isinstance(exc, ApiError):
        return exc.description or ""
    if exc.code == 404:
        return f"No such resource: {request.path}"
    if exc.code == 405:
        return f"Method {request.method} is not allowed on {request.path}"
    if exc.code == 413:
        limit = current_app.config.get("OPTIN_MAX_BODY_BYTES")
        return f"Request body is larger than {limit} bytes"
    return exc.description or exc.name


def handle_http_exception(exc: HTTPException) -> Response:
    """Routing, body-limit and our own :class:`ApiError` errors."""
    headers = dict(getattr(exc, "extra_headers", {}))
    if exc.code == 405 and getattr(exc, "valid_methods", None):
        headers["Allow"] = ", ".join(exc.valid_methods)
    status = exc.code or 500
    return error_response(status, _message(exc), getattr(exc, "error_code", None), headers)


def handle_storage_unavailable(exc: StorageUnavailable) -> Response:
    """Storage down or busy: the client may retry after a moment."""
    rid = request_id()
    log.warning("storage unavailable (request id %s): %s", rid, exc, extra={"request_id": rid})
    retry_after = str(current_app.config.get("OPTIN_RETRY_AFTER_SECONDS", 1))
    message = "Storage is unavailable, please retry later"
    if exc.reason:
        message += f": {exc.reason}"
    return error_response(503, message, headers={"Retry-After": retry_after})


def handle_unexpected(exc: Exception) -> Response:
    """A bug or a storage fault: logged with its trace, answered without details."""
    rid = request_id()
    log.error(
        "unhandled error on %s %s (request id %s)",
        request.method,
        request.path,
        rid,
        exc_info=exc,
        extra={"request_id": rid, "method": request.method, "path": request.path},
    )
    return error_response(500, "Internal error")


def register_error_handlers(target: Flask | Blueprint) -> None:
    """Give every error raised in ``target`` (an app, or a blueprint's views) the envelope."""
    target.register_error_handler(HTTPException, handle_http_exception)
    # By status too: Flask looks for a handler by status (the blueprint's, then the
    # app's) before it looks by class, so a host's errorhandler(413) would answer them.
    for code in default_exceptions:
        target.register_error_handler(code, handle_http_exception)
    target.register_error_handler(StorageUnavailable, handle_storage_unavailable)
    target.register_error_handler(StorageError, handle_unexpected)
    target.register_error_handler(Exception, handle_unexpected)
