"""The response headers the seed shows, on every opt-in response, errors included.

In the standalone service (``create_app``) flask-talisman sets the headers it
can give with the seed's exact bytes: Referrer-Policy, X-Frame-Options,
Feature-Policy, Permissions-Policy and X-Content-Type-Options, configured by
:data:`TALISMAN_OPTIONS`. This module adds the rest, in one place:

- ``X-XSS-Protection: 1;mode=block`` (Talisman writes ``1; mode=block``);
- ``Content-Security-Policy`` (Talisman re-joins directives with ``"; "``);
- ``Strict-Transport-Security`` on plain HTTP too, as the seed shows it: TLS
  usually ends at a proxy in front of gunicorn (Talisman sends it on HTTPS only);
- ``Expect-CT``, ``Access-Control-Allow-Origin``, ``cache-control`` (not Talisman's);
- a fresh UUID4 request id in ``x-amzn-RequestId`` and ``X-Request-Id``.

Embedded in a host app, Talisman cannot be applied to the API's routes alone
(it hooks the whole app and changes its session cookie settings), so every
header comes from :data:`RESPONSE_HEADERS`; a test checks that Talisman's
output and these constants agree. Talisman never redirects to HTTPS here: a
302 on a PUT is replayed as a GET by most clients.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from flask import Response, g

#: Talisman's options in the standalone service: the headers it sets, with the seed's values.
TALISMAN_OPTIONS: dict[str, Any] = {
    "force_https": False,
    "strict_transport_security": False,  # the seed sends it on plain HTTP too: ours
    "frame_options": "sameorigin",
    "referrer_policy": "no-referrer",
    "feature_policy": "vibrate 'none'; geolocation 'none'",
    "permissions_policy": "vibrate=(), geolocation=()",
    "content_security_policy": None,  # ours: Talisman re-joins directives with "; "
    "x_content_type_options": True,
    "x_xss_protection": False,  # ours: Talisman writes "1; mode=block"
    "session_cookie_secure": False,
}

#: What Talisman sets with :data:`TALISMAN_OPTIONS`, with the seed's exact values.
TALISMAN_HEADERS: tuple[tuple[str, str], ...] = (
    ("Feature-Policy", "vibrate 'none'; geolocation 'none'"),
    ("Permissions-Policy", "vibrate=(), geolocation=()"),
    ("X-Frame-Options", "sameorigin"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)

#: What no library gives with the seed's exact bytes. Names keep the seed's casing.
SEED_HEADERS: tuple[tuple[str, str], ...] = (
    ("X-XSS-Protection", "1;mode=block"),
    ("Access-Control-Allow-Origin", "*"),
    ("Expect-CT", "max-age=86400"),
    ("Strict-Transport-Security", "max-age=31536000"),
    (
        "Content-Security-Policy",
        "connect-src 'none';object-src https://*.cloudfront.net;script-src https://*.cloudfront.net",
    ),
    ("cache-control", "no-cache, no-store, must-revalidate"),
)

#: Every fixed header of an opt-in response.
RESPONSE_HEADERS: tuple[tuple[str, str], ...] = TALISMAN_HEADERS + SEED_HEADERS
#: The two headers carrying the request id.
REQUEST_ID_HEADERS: tuple[str, str] = ("x-amzn-RequestId", "X-Request-Id")


#: Every option Talisman takes per view. Talisman fills a view's options dict with
#: its own app-wide defaults (``setdefault``), and a view function is shared by every
#: app that mounts the blueprint: with all of them given, no app's Talisman writes
#: its defaults into another app's answers.
_VIEW_OPTIONS: dict[str, Any] = {
    "force_https": False,
    "frame_options": TALISMAN_OPTIONS["frame_options"],
    "frame_options_allow_from": None,
    "content_security_policy": None,
    "content_security_policy_nonce_in": [],
    "permissions_policy": TALISMAN_OPTIONS["permissions_policy"],
    "document_policy": {},
    "feature_policy": TALISMAN_OPTIONS["feature_policy"],
}


def no_https_redirect(view: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``view`` the seed's Talisman options, and exempt it from any HTTPS redirect.

    A host app's Talisman with ``force_https`` would answer a plain-HTTP PUT with
    a 302 to https, which most clients replay as a GET: the client sees a 200
    while no consent was recorded. Over plain HTTP the API answers itself;
    redirecting is the proxy's job.
    """
    view.talisman_view_options = _VIEW_OPTIONS  # type: ignore[attr-defined]
    return view


def new_request_id() -> str:
    """A random (version 4) UUID as text."""
    return str(uuid.uuid4())


def request_id() -> str:
    """This request's id (made on first use, so error paths have one too)."""
    rid = g.get("optin_request_id")
    if rid is None:
        rid = g.optin_request_id = new_request_id()
    return rid


def apply_headers(response: Response, fixed: tuple[tuple[str, str], ...]) -> Response:
    """Set ``fixed`` headers and the request id on ``response``, replacing any already set
    (a host's own hook may have set some with other values)."""
    headers = response.headers
    for name, value in fixed:
        headers[name] = value
    rid = request_id()
    for name in REQUEST_ID_HEADERS:
        headers[name] = rid
    return response
