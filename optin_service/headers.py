"""The response headers the seed shows, on every opt-in response, errors included.

Talisman owns the headers it can emit with the seed's exact values:
Referrer-Policy, X-Frame-Options, Feature-Policy, Permissions-Policy,
X-Content-Type-Options and Strict-Transport-Security. Its options are below;
what it emits for them is captured once, at import, from a private app, and
replayed on each opt-in response. That keeps Talisman's behaviour without its
per-request cost (it re-reads its options and re-parses policies on every
response), and keeps it off a host app's own pages when the API is embedded.

This module adds, in one place, what Talisman 1.1.0 cannot give byte for byte:
- ``X-XSS-Protection: 1;mode=block`` (Talisman writes ``1; mode=block``);
- ``Content-Security-Policy`` (Talisman re-joins directives with ``"; "``);
- ``Expect-CT``, ``Access-Control-Allow-Origin``, ``cache-control`` (not Talisman's);
- a fresh UUID4 request id in ``x-amzn-RequestId`` and ``X-Request-Id``.
Strict-Transport-Security goes on plain HTTP too, as the seed shows it: TLS
usually ends at a proxy in front of gunicorn. Talisman never redirects to HTTPS
here: a 302 on a PUT is replayed as a GET by most clients.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, g
from flask_talisman import Talisman
from werkzeug.datastructures import Headers

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

TALISMAN_OPTIONS = {
    "force_https": False,
    "strict_transport_security": True,
    "strict_transport_security_max_age": 31536000,
    "strict_transport_security_include_subdomains": False,
    "frame_options": "sameorigin",
    "referrer_policy": "no-referrer",
    "feature_policy": "vibrate 'none'; geolocation 'none'",
    "permissions_policy": "vibrate=(), geolocation=()",
    "content_security_policy": None,
    "x_content_type_options": True,
    "x_xss_protection": False,
    "session_cookie_secure": False,
}

#: What Talisman cannot give with the seed's exact bytes. Names keep the seed's casing.
SEED_HEADERS: tuple[tuple[str, str], ...] = (
    ("X-XSS-Protection", "1;mode=block"),
    ("Access-Control-Allow-Origin", "*"),
    ("Expect-CT", "max-age=86400"),
    (
        "Content-Security-Policy",
        "connect-src 'none';object-src https://*.cloudfront.net;script-src https://*.cloudfront.net",
    ),
    ("cache-control", "no-cache, no-store, must-revalidate"),
)


def _talisman_headers() -> tuple[tuple[str, str], ...]:
    """The headers Talisman sets with our options, read off one HTTPS response."""
    probe = Flask(__name__)
    Talisman(probe, **TALISMAN_OPTIONS)
    probe.add_url_rule("/", "probe", lambda: "")
    # A bare WSGI call: Flask's test client would load flask.testing, click.testing
    # and pdb into every worker (about 0.8 MiB) for this one request.
    environ = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/",
        "QUERY_STRING": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "443",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "https",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    sent: list[tuple[str, str]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if not status.startswith("200 "):
            raise RuntimeError(f"the Talisman probe answered {status}")
        sent.extend(headers)
        return None

    body = probe(environ, start_response)
    getattr(body, "close", lambda: None)()
    skip = {"content-type", "content-length"}
    return tuple((k, v) for k, v in sent if k.lower() not in skip)


#: Every fixed header of an opt-in response, computed once.
RESPONSE_HEADERS: tuple[tuple[str, str], ...] = _talisman_headers() + SEED_HEADERS
#: Lower-cased names of every header :func:`apply_headers` sets.
_OWN_NAMES = frozenset(
    name.lower() for name in (*dict(RESPONSE_HEADERS), "x-amzn-RequestId", "X-Request-Id")
)
for _name, _value in RESPONSE_HEADERS:  # checked once here, so added unchecked per response
    if "\r" in _value or "\n" in _value:
        raise ValueError(f"header {_name} has a newline")


def no_https_redirect(view: Callable[..., Any]) -> Callable[..., Any]:
    """Exempt ``view`` from a host app's Talisman ``force_https`` redirect.

    A 302 to https on a PUT is replayed as a GET by most clients: the client
    sees a 200 while no consent was recorded. Over plain HTTP the API answers
    itself; redirecting is the proxy's job.
    """
    view.talisman_view_options = {"force_https": False}  # type: ignore[attr-defined]
    return view


def new_request_id() -> str:
    """A random (version 4) UUID as text: what ``str(uuid.uuid4())`` gives, in half the time."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def request_id(ctx: Any = None) -> str:
    """This request's id (made on first use, so error paths have one too).

    ``ctx`` is this request's ``flask.g``, for a caller that holds it already.
    """
    if ctx is None:
        ctx = g._get_current_object()  # type: ignore[attr-defined]
    rid = ctx.get("optin_request_id")
    if rid is None:
        rid = ctx.optin_request_id = new_request_id()
    return rid


def apply_headers(response: Response, ctx: Any = None) -> Response:
    """Set the seed's headers and a request id on ``response``, replacing any already set.

    ``ctx`` is this request's ``flask.g``, for a caller that holds it already.
    """
    headers = response.headers
    rid = request_id(ctx)
    items = getattr(headers, "_list", None)
    if type(items) is list and not any(k.lower() in _OWN_NAMES for k, _ in items):
        # The usual case (only Content-Type and Content-Length so far): append the
        # constant, pre-checked pairs in one go instead of 15 set() calls that each
        # re-check the value and scan the list.
        items.extend(RESPONSE_HEADERS)
        items.append(("x-amzn-RequestId", rid))
        items.append(("X-Request-Id", rid))
        return response
    for name, value in RESPONSE_HEADERS:  # some already set (a host's hook): replace them
        headers[name] = value
    headers["x-amzn-RequestId"] = rid
    headers["X-Request-Id"] = rid
    return response


#: Headers that make Werkzeug rewrite the WSGI header list (see :class:`ApiResponse`).
_REWRITTEN = frozenset({"location", "content-location"})


class ApiResponse(Response):
    """The opt-in API's response: Flask's, with a cheaper copy of its headers on the way out.

    Werkzeug's ``get_wsgi_headers`` copies the header list through
    ``Headers.add``, which re-checks every value (17 per opt-in response),
    although each was checked when it was set. When that method would change
    nothing but the copy (a body status, a Content-Length, no Location), the
    list is copied as it is; anything else goes through Werkzeug.
    """

    def get_wsgi_headers(self, environ: WSGIEnvironment) -> Headers:
        """The headers to send: the same as Werkzeug's, copied without re-checking."""
        headers = self.headers
        items = getattr(headers, "_list", None)
        status = self.status_code
        if type(headers) is not Headers or type(items) is not list or status < 200:
            return super().get_wsgi_headers(environ)
        if status == 204 or status == 304:  # Werkzeug drops headers of these
            return super().get_wsgi_headers(environ)
        has_length = False
        for name, _ in items:
            lower = name.lower()
            if lower in _REWRITTEN:
                return super().get_wsgi_headers(environ)
            if lower == "content-length":
                has_length = True
        if not has_length:
            return super().get_wsgi_headers(environ)
        copy = Headers()
        copy._list = items.copy()  # values were checked when they were set
        return copy
