"""The API's OpenAPI 3.1 document, generated with apispec from the marshmallow schemas.

:func:`build_spec` describes the API as one app serves it: its paths under the
extension's ``url_prefix`` (read off the app's URL map), the security
``OPTIN_AUTH`` asks for, ``/metrics`` as ``OPTIN_METRICS`` has it, and 429s only
when ``OPTIN_RATE_LIMIT`` is set. Bodies come from ``schemas.py``; headers and
patterns from the modules that enforce them, so the document cannot drift from
the code. :func:`document` builds it once per app and keeps the compact JSON
that ``GET /openapi.json`` answers.
"""

from __future__ import annotations

import json
import re
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask
from marshmallow import Schema, fields, validate

from .errors import ERROR_CODES
from .headers import RESPONSE_HEADERS
from .schemas import (
    CORRELATION_ID,
    CORRELATION_ID_RULE,
    IDEMPOTENCY_KEY,
    SOURCE,
    ErrorSchema,
    HealthSchema,
    HistoryPageSchema,
    HistoryQuerySchema,
    OptInRequestSchema,
    OptInStateSchema,
)
from .version import __version__

OPENAPI_VERSION = "3.1.0"
#: ``OPTIN_AUTH=jwt``: the scope each method needs (see ``auth.py``).
READ_SCOPE = "optin:read"
WRITE_SCOPE = "optin:write"
#: Endpoints without authentication or rate limits, whatever ``OPTIN_AUTH`` says.
OPEN_ENDPOINTS = ("healthz", "readyz", "metrics", "openapi")
#: Flask's ``<name>`` or ``<converter:name>`` in a rule.
_RULE_VARIABLE = re.compile(r"<(?:[^<>:]+:)?([^<>]+)>")


class OptInUpdatedSchema(Schema):
    """The PUT's 200 body, always the same 29 bytes: ``{"message":"Opt-in updated."}``."""

    message = fields.String(required=True, validate=validate.OneOf(["Opt-in updated."]))


#: Component name -> schema. Responses list every property as required: a dump has them all.
_BODIES: dict[str, type[Schema]] = {
    "OptInRequest": OptInRequestSchema,
    "OptInUpdated": OptInUpdatedSchema,
    "OptInState": OptInStateSchema,
    "HistoryPage": HistoryPageSchema,
    "Health": HealthSchema,
    "Error": ErrorSchema,
}
_DUMPED = ("OptInUpdated", "OptInState", "HistoryItem", "HistoryPage")


def _anchored(pattern: re.Pattern[str]) -> str:
    """A ``re`` pattern the service full-matches, as a JSON Schema (ECMA-262) pattern."""
    return f"^{pattern.pattern}$"


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


class _Builder:
    """Builds one app's document."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.auth = app.config["OPTIN_AUTH"]
        self.rate_limited = bool(app.config.get("OPTIN_RATE_LIMIT"))
        self.metrics_on = bool(app.config["OPTIN_METRICS"])
        self.plugin = MarshmallowPlugin()
        self.spec = APISpec(
            title="optin-service",
            version=__version__,
            openapi_version=OPENAPI_VERSION,
            plugins=[self.plugin],
            info={"description": self._description()},
        )

    # --- components ------------------------------------------------------------

    def components(self) -> None:
        components = self.spec.components
        for name, schema in _BODIES.items():
            components.schema(name, schema=schema)
        for name, value in RESPONSE_HEADERS:
            components.header(
                name,
                {
                    "description": "On every response of the API, errors included",
                    "required": True,
                    "schema": {"type": "string", "const": value},
                },
            )
        for name in ("x-amzn-RequestId", "X-Request-Id"):
            components.header(
                name,
                {
                    "description": "This request's id (a new UUID4); the same in both headers",
                    "required": True,
                    "schema": {"type": "string", "format": "uuid"},
                },
            )
        components.header(
            "Retry-After",
            {
                "description": "Seconds to wait before retrying",
                "required": True,
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            },
        )
        components.header(
            "Allow",
            {
                "description": "The methods this path answers",
                "required": True,
                "schema": {"type": "string"},
            },
        )
        components.header(
            "WWW-Authenticate",
            {
                "description": "How to authenticate (RFC 6750): a Bearer challenge",
                "required": True,
                "schema": {"type": "string", "pattern": "^Bearer "},
            },
        )
        components.parameter(
            "correlation_id",
            "path",
            {
                "description": f"The member: {CORRELATION_ID_RULE}",
                "schema": {
                    "type": "string",
                    "pattern": _anchored(CORRELATION_ID),
                    "minLength": 1,
                    "maxLength": 128,
                },
                "example": "member-42",
            },
        )
        components.parameter(
            "X-Consent-Source",
            "header",
            {
                "description": (
                    "The channel the consent came through, stored with the event (default API)"
                ),
                "schema": {
                    "type": "string",
                    "pattern": _anchored(SOURCE),
                    "minLength": 1,
                    "maxLength": 32,
                },
                "example": "STORE_42",
            },
        )
        components.parameter(
            "Idempotency-Key",
            "header",
            {
                "description": (
                    "Makes a retry safe: the same key with the same answer for the same member "
                    "within 24 hours returns the same 200 and records nothing new; the same key "
                    "with another answer is a 422 IDEMPOTENCY_KEY_REUSED"
                ),
                "schema": {
                    "type": "string",
                    "pattern": _anchored(IDEMPOTENCY_KEY),
                    "minLength": 1,
                    "maxLength": 255,
                },
            },
        )
        # Not an operation's answer but a path's, for any method it does not list.
        components.response(
            "MethodNotAllowed",
            self._error(405, "A method this path does not answer; Allow lists those it does"),
        )
        if self.auth == "api-key":
            components.security_scheme(
                "bearerAuth",
                {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key, as `Authorization: Bearer <key>`",
                },
            )
            components.security_scheme(
                "apiKeyAuth",
                {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-api-key",
                    "description": "An API key, as `x-api-key: <key>`",
                },
            )
        elif self.auth == "jwt":
            components.security_scheme(
                "bearerAuth",
                {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": self._jwt_description(),
                },
            )

    def _description(self) -> str:
        lines = [
            "Records a loyalty member's consent to communications.",
            "",
            "Every error answers the envelope "
            '`{"statusCode": 400, "errorCode": "INVALID_REQUEST", "errorMessage": "..."}`. '
            "Every response, errors included, carries the security headers and a request id "
            "(`x-amzn-RequestId`, also `X-Request-Id`). Any other method on a path is a 405 "
            "`METHOD_NOT_ALLOWED` with an `Allow` header, except OPTIONS: an empty 204 with "
            "`Allow`. A path that matches no route (an empty id, or one holding `/`) is a 404.",
            "",
        ]
        if self.auth == "api-key":
            lines.append(
                "Authentication: an API key, as `Authorization: Bearer <key>` or "
                "`x-api-key: <key>`; without one, 401. "
                "The health checks, `/metrics` and this document are open."
            )
        elif self.auth == "jwt":
            lines.append(
                "Authentication: an OAuth 2.0 access token (JWT) as `Authorization: Bearer`; "
                f"`{WRITE_SCOPE}` for PUT, `{READ_SCOPE}` for GET. Without a valid token, 401; "
                "without the scope, 403. The health checks, `/metrics` and this document are open."
            )
        else:
            lines.append(
                "Authentication: none in the service (`OPTIN_AUTH=none`); "
                "a gateway in front is expected to authenticate."
            )
        if self.rate_limited:
            lines.append(
                f"Rate limit: {self.app.config['OPTIN_RATE_LIMIT']} per client, then 429 "
                "with `Retry-After` (and `X-RateLimit-*` headers)."
            )
        return "\n".join(lines)

    def _jwt_description(self) -> str:
        config = self.app.config
        text = (
            "An OAuth 2.0 access token (JWT, client credentials) "
            f"with scope `{WRITE_SCOPE}` for PUT and `{READ_SCOPE}` for GET"
        )
        if config.get("OPTIN_JWT_ISSUER"):
            text += f"; issuer `{config['OPTIN_JWT_ISSUER']}`"
        if config.get("OPTIN_JWT_AUDIENCE"):
            text += f", audience `{config['OPTIN_JWT_AUDIENCE']}`"
        return text

    # --- responses -------------------------------------------------------------

    def _headers(self, *extra: str) -> dict[str, Any]:
        names = [name for name, _ in RESPONSE_HEADERS]
        names += ["x-amzn-RequestId", "X-Request-Id", *extra]
        return {name: _ref("headers", name) for name in names}

    def _ok(self, description: str, schema: str, example: Any = None) -> dict[str, Any]:
        media: dict[str, Any] = {"schema": _ref("schemas", schema)}
        if example is not None:
            media["example"] = example
        return {
            "description": description,
            "headers": self._headers(),
            "content": {"application/json": media},
        }

    def _error(self, status: int, description: str, code: str | None = None) -> dict[str, Any]:
        """The envelope, with ``statusCode`` and ``errorCode`` pinned to this status's."""
        code = code or ERROR_CODES[status]
        extra = {
            401: ("WWW-Authenticate",),
            403: ("WWW-Authenticate",),
            405: ("Allow",),
            429: ("Retry-After",),
            503: ("Retry-After",),
        }.get(status, ())
        schema = {
            "allOf": [_ref("schemas", "Error")],
            "properties": {"statusCode": {"const": status}, "errorCode": {"const": code}},
        }
        return {
            "description": description,
            "headers": self._headers(*extra),
            "content": {
                "application/json": {
                    "schema": schema,
                    "example": {"statusCode": status, "errorCode": code, "errorMessage": "..."},
                }
            },
        }

    def _guarded(self, responses: dict[int, Any], scope: str) -> dict[int, Any]:
        """Add what authentication and rate limits answer on a protected route."""
        if self.auth in ("api-key", "jwt"):
            responses[401] = self._error(401, "No credentials, or not valid ones")
        if self.auth == "jwt":
            responses[403] = self._error(403, f"A valid token without the scope {scope}")
            responses[503] = self._error(
                503,
                responses[503]["description"] + "; or the token issuer's keys cannot be fetched",
            )
        if self.rate_limited:
            responses[429] = self._error(429, "Over the rate limit")
        return responses

    # --- operations ------------------------------------------------------------

    def _member_errors(self) -> dict[int, Any]:
        return {
            400: self._error(400, f"A correlation_id that is not {CORRELATION_ID_RULE}"),
            500: self._error(500, "A bug or a storage fault (no details; see the log)"),
            503: self._error(503, "Storage is unreachable or busy: retry after Retry-After"),
        }

    def put_optin(self) -> dict[str, Any]:
        responses = self._member_errors()
        responses[400]["description"] = (
            "A bad correlation_id, X-Consent-Source or Idempotency-Key; a body that is not one "
            "JSON object (NaN, Infinity and duplicate keys are refused); LOYALTY_OPTIN missing, "
            "or not exactly accepted or declined; a malformed chunked body, or one shorter "
            "than its Content-Length"
        )
        responses[408] = self._error(
            408, "The body did not all arrive within OPTIN_BODY_TIMEOUT_SECONDS"
        )
        responses[413] = self._error(413, "A body over OPTIN_MAX_BODY_BYTES")
        responses[415] = self._error(415, "A Content-Type other than application/json")
        responses[422] = self._error(
            422,
            "The Idempotency-Key was already used for this member with another answer",
            "IDEMPOTENCY_KEY_REUSED",
        )
        responses[200] = self._ok(
            "Recorded as a new consent event (or an idempotent replay): always these 29 bytes",
            "OptInUpdated",
            {"message": "Opt-in updated."},
        )
        responses[200]["links"] = {
            "GetOptIn": {
                "operationId": "getOptIn",
                "parameters": {"correlation_id": "$request.path.correlation_id"},
            }
        }
        return {
            "operationId": "putOptIn",
            "tags": ["consent"],
            "summary": "Record the member's answer",
            "description": (
                "Stores the answer as an immutable event (with the server's time, the request id "
                "and the source) and makes it the member's current state."
            ),
            "parameters": [
                "correlation_id",
                "X-Consent-Source",
                "Idempotency-Key",
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": _ref("schemas", "OptInRequest"),
                        "example": {"LOYALTY_OPTIN": "accepted"},
                    }
                },
            },
            "responses": self._guarded(responses, WRITE_SCOPE),
        }

    def get_optin(self) -> dict[str, Any]:
        responses = self._member_errors()
        responses[404] = self._error(404, "Nothing was ever recorded for this member")
        responses[200] = self._ok(
            "The member's current answer and when it was recorded (UTC, microseconds)",
            "OptInState",
            {"LOYALTY_OPTIN": "accepted", "updatedAt": "2026-11-26T12:00:00.123456Z"},
        )
        return {
            "operationId": "getOptIn",
            "tags": ["consent"],
            "summary": "The member's current answer",
            "parameters": ["correlation_id"],
            "responses": self._guarded(responses, READ_SCOPE),
        }

    def get_history(self) -> dict[str, Any]:
        query = self.plugin.converter.schema2parameters(HistoryQuerySchema, location="query")
        notes = {
            "limit": "Events per page, 1 to 100",
            "cursor": "The `next` of the previous page; only cursors this service gave out",
        }
        for parameter in query:
            schema = parameter["schema"]
            # A query parameter is a string or absent, never null.
            if schema.get("default", 0) is None:
                del schema["default"]
            if isinstance(schema.get("type"), list):
                schema["type"] = next(t for t in schema["type"] if t != "null")
                schema["minLength"] = 1
            parameter["description"] = notes[parameter["name"]]
        responses = self._member_errors()
        responses[400]["description"] = (
            "A bad correlation_id, a limit that is not a whole number from 1 to 100, "
            "or a cursor this service did not give out"
        )
        responses[404] = self._error(404, "No events for this member")
        responses[200] = self._ok(
            "The member's consent events, newest first; `next` is null on the last page",
            "HistoryPage",
        )
        responses[200]["links"] = {
            "NextPage": {
                "operationId": "getOptInHistory",
                "parameters": {
                    "correlation_id": "$request.path.correlation_id",
                    "cursor": "$response.body#/next",
                },
            }
        }
        return {
            "operationId": "getOptInHistory",
            "tags": ["consent"],
            "summary": "The member's consent events, a page at a time",
            "parameters": ["correlation_id", *query],
            "responses": self._guarded(responses, READ_SCOPE),
        }

    def _open(self, operation: dict[str, Any]) -> dict[str, Any]:
        operation["tags"] = ["operations"]
        if self.auth in ("api-key", "jwt"):
            operation["security"] = []
        operation["responses"][500] = self._error(500, "A bug (no details; see the log)")
        return operation

    def healthz(self) -> dict[str, Any]:
        ok = self._ok("The process is up (storage is not checked)", "Health", {"status": "ok"})
        return self._open(
            {"operationId": "getHealth", "summary": "Liveness", "responses": {200: ok}}
        )

    def readyz(self) -> dict[str, Any]:
        ok = self._ok("Storage answers", "Health", {"status": "ready"})
        down = self._error(503, "Storage does not answer: retry after Retry-After")
        return self._open(
            {
                "operationId": "getReadiness",
                "summary": "Readiness",
                "responses": {200: ok, 503: down},
            }
        )

    def metrics(self) -> dict[str, Any]:
        responses: dict[int, Any]
        if self.metrics_on:
            responses = {
                200: {
                    "description": "Prometheus text exposition, summed over the workers",
                    "headers": self._headers(),
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            }
        else:
            responses = {404: self._error(404, "OPTIN_METRICS is off")}
        return self._open(
            {"operationId": "getMetrics", "summary": "Prometheus metrics", "responses": responses}
        )

    def openapi(self) -> dict[str, Any]:
        ok = {
            "description": "This document (OpenAPI 3.1)",
            "headers": self._headers(),
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
        return self._open(
            {"operationId": "getOpenApi", "summary": "This document", "responses": {200: ok}}
        )

    # --- the whole -------------------------------------------------------------

    def build(self) -> dict[str, Any]:
        from .api import bp  # api.py serves this module's document

        self.components()
        spec = self.spec
        if self.auth == "api-key":
            spec.options["security"] = [{"bearerAuth": []}, {"apiKeyAuth": []}]
        spec.tag({"name": "consent", "description": "A member's consent"})
        spec.tag({"name": "operations", "description": "Probes, metrics, this document"})
        paths: dict[str, dict[str, Any]] = {}
        operations = {
            "put_optin": self.put_optin,
            "get_optin": self.get_optin,
            "get_history": self.get_history,
            "healthz": self.healthz,
            "readyz": self.readyz,
            "metrics": self.metrics,
            "openapi": self.openapi,
        }
        for rule in self.app.url_map.iter_rules():
            blueprint, _, endpoint = rule.endpoint.partition(".")
            if blueprint != bp.name or endpoint not in operations:
                continue
            operation = operations[endpoint]()
            operation["responses"] = {
                str(status): operation["responses"][status]
                for status in sorted(operation["responses"])
            }
            if self.auth == "jwt" and endpoint not in OPEN_ENDPOINTS:
                scope = WRITE_SCOPE if "PUT" in (rule.methods or ()) else READ_SCOPE
                operation["security"] = [{"bearerAuth": [scope]}]
            path = _RULE_VARIABLE.sub(r"{\1}", rule.rule)
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                paths.setdefault(path, {})[method.lower()] = operation
        for path, by_method in paths.items():
            spec.path(path=path, operations=by_method)
        document = spec.to_dict()
        schemas = document["components"]["schemas"]
        for name in _DUMPED:
            schemas[name]["required"] = list(schemas[name]["properties"])
        return document


def build_spec(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the opt-in API mounted on ``app`` (built anew)."""
    return _Builder(app).build()


def document(app: Flask) -> bytes:
    """``build_spec(app)`` as compact JSON, what ``GET /openapi.json`` answers."""
    return json.dumps(build_spec(app), separators=(",", ":")).encode()
