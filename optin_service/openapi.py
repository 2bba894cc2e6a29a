"""The API's OpenAPI 3.1 document: each view's own :class:`~.operation.Operation`,
plus what every operation shares.

:func:`build_spec` finds the views that declare an operation on the app's URL
map (so paths follow the extension's ``url_prefix``) and adds what depends on the
app rather than the view: the response headers (``headers.py``), the error
envelope with each status's code and extra header, the security and the
401/403/429 answers that ``OPTIN_AUTH`` and ``OPTIN_RATE_LIMIT`` put on every
route but the open ones (``auth.py``), and the components. Bodies are the
marshmallow schemas that validate and dump them, through apispec.
:func:`document` is what ``GET /openapi.json`` answers.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask

from .auth import OPEN_ENDPOINTS, READ, WRITE, required_scope, security_schemes
from .errors import ERROR_CODES
from .headers import REQUEST_ID_HEADERS, RESPONSE_HEADERS
from .operation import TAGS, Operation, declared
from .schemas import ErrorSchema
from .version import __version__

OPENAPI_VERSION = "3.1.0"
#: Flask's ``<name>`` or ``<converter:name>`` in a rule.
_RULE_VARIABLE = re.compile(r"<(?:[^<>:]+:)?([^<>]+)>")
#: The document's description: the API, and what all its answers have in common.
_ABOUT = (
    "Records a loyalty member's consent to communications.\n\nEvery error answers the envelope "
    '`{"statusCode": 400, "errorCode": "INVALID_REQUEST", "errorMessage": "..."}`. '
    "Every response, errors included, carries the security headers and a request id "
    "(`x-amzn-RequestId`, also `X-Request-Id`). Any other method on a path is a 405 "
    "`METHOD_NOT_ALLOWED` with an `Allow` header, except OPTIONS: an empty 204 with "
    "`Allow`. A path that matches no route (an empty id, or one holding `/`) is a 404.\n\n"
)
_OPEN = "The health checks, `/metrics` and this document are open."
#: Per ``OPTIN_AUTH``: how to authenticate, in words.
_AUTH = {
    "none": "Authentication: none in the service (`OPTIN_AUTH=none`); "
    "a gateway in front is expected to authenticate.",
    "api-key": "Authentication: an API key, as `Authorization: Bearer <key>` or "
    f"`x-api-key: <key>`; without one, 401. {_OPEN}",
    "jwt": "Authentication: an OAuth 2.0 access token (JWT) as `Authorization: Bearer`; "
    f"`{WRITE}` for PUT, `{READ}` for GET. Without a valid token, 401; "
    f"without the scope, 403. {_OPEN}",
}


def _header(description: str, **schema: str) -> dict[str, Any]:
    return {"description": description, "required": True, "schema": {"type": "string", **schema}}


_HEADERS = {
    **{
        name: _header("On every response of the API, errors included", const=value)
        for name, value in RESPONSE_HEADERS
    },
    **{
        name: _header("This request's id (a new UUID4); the same in both headers", format="uuid")
        for name in REQUEST_ID_HEADERS
    },
    "Retry-After": _header("Seconds to wait before retrying", pattern="^[0-9]+$"),
    "Allow": _header("The methods this path answers"),
    "WWW-Authenticate": _header(
        "How to authenticate (RFC 6750): a Bearer challenge", pattern="^Bearer "
    ),
}
#: The header an error status carries besides every response's.
_STATUS_HEADER = {
    401: "WWW-Authenticate",
    403: "WWW-Authenticate",
    405: "Allow",
    429: "Retry-After",
    503: "Retry-After",
}


def _example(value: Any) -> dict[str, Any]:
    return {} if value is None else {"example": value}


class _Builder:
    """Builds one app's document."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.config = app.config
        self.auth = app.config["OPTIN_AUTH"]
        self.plugin = MarshmallowPlugin()
        self.parameters: set[str] = set()  # the components registered so far
        description = _ABOUT + _AUTH[self.auth]
        if self.config.get("OPTIN_RATE_LIMIT"):
            description += (
                f"\nRate limit: {self.config['OPTIN_RATE_LIMIT']} per client, then 429 "
                "with `Retry-After` (and `X-RateLimit-*` headers)."
            )
        # With API keys, either scheme, on every operation that does not say otherwise.
        either = {"security": [{"bearerAuth": []}, {"apiKeyAuth": []}]}
        self.spec = APISpec(
            title="optin-service",
            version=__version__,
            openapi_version=OPENAPI_VERSION,
            plugins=[self.plugin],
            info={"description": description},
            **(either if self.auth == "api-key" else {}),
        )
        for name, header in _HEADERS.items():
            self.spec.components.header(name, header)
        for name, scheme in security_schemes(self.config).items():
            self.spec.components.security_scheme(name, scheme)
        # Not an operation's answer but a path's, for any method it does not list.
        not_allowed = "A method this path does not answer; Allow lists those it does"
        self.spec.components.response("MethodNotAllowed", self._error(405, not_allowed))
        for name, description in TAGS.items():
            self.spec.tag({"name": name, "description": description})

    def _response(self, status: int, description: str, media: str, body: Any) -> dict[str, Any]:
        names = [*(name for name, _ in RESPONSE_HEADERS), *REQUEST_ID_HEADERS]
        names += [_STATUS_HEADER[status]] if status in _STATUS_HEADER else []
        headers = {name: {"$ref": f"#/components/headers/{name}"} for name in names}
        return {"description": description, "headers": headers, "content": {media: body}}

    def _error(self, status: int, description: str, code: str | None = None) -> dict[str, Any]:
        """The envelope, with ``statusCode`` and ``errorCode`` pinned to this status's."""
        code = code or ERROR_CODES[status]
        pinned = {"statusCode": {"const": status}, "errorCode": {"const": code}}
        example = {"statusCode": status, "errorCode": code, "errorMessage": "..."}
        body = {"schema": {"allOf": [ErrorSchema], "properties": pinned}, "example": example}
        return self._response(status, description, "application/json", body)

    def _parameters(self, declared: Operation) -> list[Any]:
        """The declared parameters as components (by name), then the query string's."""
        for parameter in declared.parameters:
            if parameter.name not in self.parameters:
                self.parameters.add(parameter.name)
                component = parameter.component()
                self.spec.components.parameter(parameter.name, parameter.location, component)
        query = []
        if declared.query:
            query = self.plugin.converter.schema2parameters(declared.query, location="query")
        for schema in (parameter["schema"] for parameter in query):
            # A query parameter is a string or absent, never null.
            if schema.get("default", 0) is None:
                del schema["default"]
            if isinstance(schema.get("type"), list):
                schema["type"] = next(t for t in schema["type"] if t != "null")
        return [parameter.name for parameter in declared.parameters] + query

    def _operation(self, declared: Operation, endpoint: str, method: str) -> dict[str, Any]:
        """The view's declaration, with what this app's settings add to it."""
        operation: dict[str, Any] = {
            "operationId": declared.operation_id,
            "tags": [declared.tag],
            "summary": declared.summary,
        }
        if declared.description:
            operation["description"] = declared.description
        if parameters := self._parameters(declared):
            operation["parameters"] = parameters
        if declared.body:
            body = {"schema": declared.body, **_example(declared.body_example)}
            operation["requestBody"] = {"required": True, "content": {"application/json": body}}
        responses: dict[int, Any] = {}
        errors: dict[int, tuple[str, str | None]] = {}
        if declared.enabled_by and not self.config[declared.enabled_by]:
            errors[404] = (f"{declared.enabled_by} is off", None)
        else:
            for status, error in declared.errors.items():
                errors[status] = (error, None) if isinstance(error, str) else error
            # apispec resolves schema classes inside a JSON Schema in place: a copy.
            body = {"schema": copy.deepcopy(declared.returns), **_example(declared.example)}
            responses[200] = self._response(200, declared.ok, declared.media, body)
            if declared.links:
                responses[200]["links"] = dict(declared.links)
        scope = required_scope(method)
        if endpoint in OPEN_ENDPOINTS:
            if self.auth != "none":
                operation["security"] = []
        else:  # what check_request and the rate limit answer before the view
            if self.auth != "none":
                errors[401] = ("No credentials, or not valid ones", None)
            if self.auth == "jwt":
                operation["security"] = [{"bearerAuth": [scope]}]
                errors[403] = (f"A valid token without the scope {scope}", None)
                keys = "the token issuer's keys cannot be fetched"
                text = f"{errors[503][0]}; or {keys}" if 503 in errors else keys.capitalize()
                errors[503] = (text, None)
            if self.config.get("OPTIN_RATE_LIMIT"):
                errors[429] = ("Over the rate limit", None)
        errors.setdefault(500, ("A bug (no details; see the log)", None))
        for status, (description, code) in errors.items():
            responses[status] = self._error(status, description, code)
        operation["responses"] = {str(status): responses[status] for status in sorted(responses)}
        return operation

    def build(self) -> dict[str, Any]:
        paths: dict[str, dict[str, Any]] = {}
        for rule in self.app.url_map.iter_rules():
            operation = declared(self.app.view_functions[rule.endpoint])
            if operation is None:  # not the API's: the host's own, or Flask's static files
                continue
            path = _RULE_VARIABLE.sub(r"{\1}", rule.rule)
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                built = self._operation(operation, rule.endpoint, method)
                paths.setdefault(path, {})[method.lower()] = built
        for path, operations in paths.items():
            self.spec.path(path=path, operations=operations)
        # A copy: the document shares nothing with the declarations or this module's tables.
        return copy.deepcopy(self.spec.to_dict())


def build_spec(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the opt-in API mounted on ``app`` (built anew)."""
    return _Builder(app).build()


def document(app: Flask) -> bytes:
    """``build_spec(app)`` as compact JSON, what ``GET /openapi.json`` answers."""
    return json.dumps(build_spec(app), separators=(",", ":")).encode()
