"""The reference plus the response headers the contract requires, and nothing else.

``bench/reference_app.py`` with the seed's 13 headers (15 with Permissions-Policy
and X-Request-Id) on its answer, built once, and a UUID4 request id per
response: the floor under any service that honours the vendor's header list,
since gunicorn and Werkzeug handle every header of every response in Python.
``bench/load.py --configs reference-headers`` pairs it with the plain reference.
"""

import uuid

from flask import Flask, Response, request

# The values of docs/api.md's "Headers on every response" (not imported from
# optin_service, which would load the whole service into this process).
RESPONSE_HEADERS = (
    ("Referrer-Policy", "no-referrer"),
    ("X-XSS-Protection", "1;mode=block"),
    ("Access-Control-Allow-Origin", "*"),
    ("Expect-CT", "max-age=86400"),
    ("Strict-Transport-Security", "max-age=31536000"),
    ("Feature-Policy", "vibrate 'none'; geolocation 'none'"),
    ("Permissions-Policy", "vibrate=(), geolocation=()"),
    ("X-Frame-Options", "sameorigin"),
    (
        "Content-Security-Policy",
        "connect-src 'none';object-src https://*.cloudfront.net;script-src https://*.cloudfront.net",
    ),
    ("cache-control", "no-cache, no-store, must-revalidate"),
    ("X-Content-Type-Options", "nosniff"),
)

app = Flask(__name__)
STATE: dict[str, str] = {}
BODY = b'{"message":"Opt-in updated."}'


@app.put("/client/users/<correlation_id>/profile/optin")
def put_optin(correlation_id: str) -> Response:
    body = request.get_json(silent=True)
    status = body.get("LOYALTY_OPTIN") if isinstance(body, dict) else None
    if status not in ("accepted", "declined"):
        return Response(b'{"message":"Invalid opt-in response provided"}', 400)
    STATE[correlation_id] = status
    rid = str(uuid.uuid4())
    headers = [*RESPONSE_HEADERS, ("x-amzn-RequestId", rid), ("X-Request-Id", rid)]
    return Response(BODY, 200, headers=headers, mimetype="application/json")
