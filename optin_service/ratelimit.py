"""Rate limits with Flask-Limiter: ``OPTIN_RATE_LIMIT`` per client, off by default.

One limit shared by every API route, counted per authenticated client (else per
remote address, as ProxyFix reports it). Counters live in
``OPTIN_RATE_LIMIT_STORAGE_URL``: ``memory://`` counts per worker; point it at
Redis so all workers (and hosts) share one count. The health checks, metrics
and the OpenAPI document are never limited.

A counter store that fails never refuses a consent update: each worker then
counts in memory (Flask-Limiter's in-memory fallback, so the limit still holds,
per worker) and asks the store again after 1, 2, 4... 32 seconds, going back to
it once it answers. Only the request that meets the failure and those that ask
again wait, each for at most the Redis timeouts below, not redis-py's default.
The standalone service logs the fall-back and the recovery (see ``logs.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from flask import Flask, Response, g, request

from .auth import OPEN_ENDPOINTS, client_name

if TYPE_CHECKING:  # Flask-Limiter and limits are heavy: loaded when a limit is set
    from flask_limiter import Limiter


#: Options of a Redis counter store's client: the Redis storage backend's own timeouts
#: (backends/redis.py; a test keeps them equal), so a hung Redis costs a request half
#: a second. No retry: the in-memory fallback, not a second wait, answers a failure.
#: Options in the URL's query (``?socket_timeout=1``) take precedence.
REDIS_OPTIONS = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}
#: The ``limits`` library's Redis (and Valkey) schemes, before any ``+unix``, ``+sentinel``...
_REDIS_SCHEMES = frozenset({"redis", "rediss", "valkey", "valkeys"})


def _key() -> str:
    client = client_name()
    return f"client:{client}" if client else f"addr:{request.remote_addr or '-'}"


def init_rate_limit(app: Flask, blueprint_name: str) -> Limiter | None:
    """Limit the API's routes on ``app`` if ``OPTIN_RATE_LIMIT`` is set."""
    rate = app.config["OPTIN_RATE_LIMIT"]
    if not rate:
        return None
    from flask_limiter import Limiter
    from limits import parse_many

    try:  # Flask-Limiter would log the mistake on each request and let every one through
        parse_many(rate)
    except ValueError as exc:
        raise ValueError(
            f"OPTIN_RATE_LIMIT={rate!r} is not a rate such as 100/minute: {exc}"
        ) from None

    # Flask-Limiter puts its window's end in Retry-After on every limited route's
    # response, over the API's own (a 503's OPTIN_RETRY_AFTER_SECONDS): only a 429
    # keeps it. Hooks run last-registered first: this one after the limiter's...
    app.after_request(_only_429_retries_after_the_window)
    storage_uri = app.config["OPTIN_RATE_LIMIT_STORAGE_URL"]
    redis = urlsplit(storage_uri).scheme.partition("+")[0] in _REDIS_SCHEMES
    limiter = Limiter(
        _key,
        app=app,
        storage_uri=storage_uri,
        storage_options=dict(REDIS_OPTIONS) if redis else {},
        default_limits=[],
        headers_enabled=True,
        key_prefix="optin",
        swallow_errors=True,
        in_memory_fallback_enabled=True,
    )
    # Applied around each view, so it runs after authentication has named the client.
    shared = limiter.shared_limit(
        rate, scope="optin-api", error_message=f"Too many requests: the limit is {rate}"
    )
    for endpoint, view in list(app.view_functions.items()):
        if endpoint.startswith(blueprint_name + ".") and endpoint not in OPEN_ENDPOINTS:
            app.view_functions[endpoint] = shared(view)
    app.after_request(_keep_own_retry_after)  # ...and this one before it.
    return limiter


def _keep_own_retry_after(response: Response) -> Response:
    g.optin_retry_after = response.headers.get("Retry-After")
    return response


def _only_429_retries_after_the_window(response: Response) -> Response:
    if response.status_code == 429 or "optin_retry_after" not in g:
        return response
    own = g.pop("optin_retry_after")
    if own is None:
        response.headers.pop("Retry-After", None)
    else:
        response.headers["Retry-After"] = own
    return response
