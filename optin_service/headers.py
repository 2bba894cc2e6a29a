"""The response headers the seed shows, on every response, errors included.

Talisman owns the headers it can emit with the seed's exact values:
Referrer-Policy, X-Frame-Options, Feature-Policy, Permissions-Policy,
X-Content-Type-Options, and Strict-Transport-Security on HTTPS requests.

This module adds, in one place, what Talisman 1.1.0 cannot give byte for byte:
- ``X-XSS-Protection: 1;mode=block`` (Talisman writes ``1; mode=block``);
- ``Content-Security-Policy`` (Talisman re-joins directives with ``"; "``);
- ``Expect-CT``, ``Access-Control-Allow-Origin``, ``cache-control`` (not Talisman's);
- ``Strict-Transport-Security`` on plain HTTP too (TLS usually ends at a proxy
  in front of gunicorn, and Talisman only sends it on HTTPS);
- a fresh UUID4 request id in ``x-amzn-RequestId`` and ``X-Request-Id``.
Talisman never redirects to HTTPS here: a 302 on a PUT is replayed as a GET.
"""

from __future__ import annotations

import uuid

from flask import Flask, Response, g
from flask_talisman import Talisman

HSTS = "max-age=31536000"
FEATURE_POLICY = "vibrate 'none'; geolocation 'none'"
PERMISSIONS_POLICY = "vibrate=(), geolocation=()"

#: Set on every response, overwriting whatever a view set. Names keep the seed's casing.
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


def request_id() -> str:
    """This request's id (made on first use, so error paths have one too)."""
    rid = g.get("optin_request_id")
    if rid is None:
        rid = g.optin_request_id = str(uuid.uuid4())
    return rid


def _apply_headers(response: Response) -> Response:
    headers = response.headers
    for name, value in SEED_HEADERS:
        headers[name] = value
    headers.setdefault("Strict-Transport-Security", HSTS)
    rid = request_id()
    headers["x-amzn-RequestId"] = rid
    headers["X-Request-Id"] = rid
    return response


def init_headers(app: Flask) -> Talisman:
    """Install the seed's headers on every response of ``app``."""
    # Flask runs after_request functions last-registered first: registering ours
    # before Talisman's makes ours run after it, so HSTS is only filled in where
    # Talisman left it out.
    app.after_request(_apply_headers)
    return Talisman(
        app,
        force_https=False,
        strict_transport_security=True,
        strict_transport_security_max_age=31536000,
        strict_transport_security_include_subdomains=False,
        frame_options="sameorigin",
        referrer_policy="no-referrer",
        feature_policy=FEATURE_POLICY,
        permissions_policy=PERMISSIONS_POLICY,
        content_security_policy=None,
        x_content_type_options=True,
        x_xss_protection=False,
        session_cookie_secure=False,
    )
