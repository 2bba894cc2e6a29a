"""``OptIn``: the Flask extension that mounts the opt-in API on an app.

Embedded in a host app, it changes nothing of the host's own responses: the
JSON error envelope, the seed's headers and the request id apply only to the
opt-in routes and to routing errors (404, 405) under the API's mount point.
Standalone (``create_app``), the whole app is the opt-in API.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import weakref
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from flask import Flask, Request, Response, current_app, g, request
from werkzeug.exceptions import HTTPException

from . import defaults
from .api import API_PATHS, bp
from .auth import Authenticator, build_authenticator
from .cli import optin as optin_cli
from .errors import handle_http_exception, register_error_handlers
from .headers import RESPONSE_HEADERS, SEED_HEADERS, apply_headers, request_id
from .logs import ACCESS
from .metrics import observe_request
from .ratelimit import init_rate_limit
from .registry import redact, store_from_url
from .retention import Retention
from .storage import OptInStore

if TYPE_CHECKING:
    from flask_limiter import Limiter

log = logging.getLogger(__name__)


@dataclasses.dataclass
class OptInState:
    """What one app needs at request time, kept in ``app.extensions["optin"]``."""

    store: OptInStore
    #: The URL the store was built from (``None`` for a store passed in).
    storage_url: str | None
    #: Where the routes are mounted ("" for the root).
    url_prefix: str
    #: True when the whole app is the opt-in API (``create_app``).
    standalone: bool
    #: The backend's name in metrics and logs (the URL scheme, or the store's class).
    backend: str
    #: The store as the start-up log and every ``optin`` command name it (no password).
    store_name: str = ""
    #: ``OPTIN_METRICS``, ``OPTIN_MAX_BODY_BYTES`` and ``OPTIN_BODY_TIMEOUT_SECONDS``, read
    #: from ``app.config`` once, by ``init_app``, like every other setting.
    metrics: bool = True
    max_body_bytes: int = defaults.OPTIN_MAX_BODY_BYTES
    body_timeout: float = defaults.OPTIN_BODY_TIMEOUT_SECONDS
    #: Checks credentials (``None`` with ``OPTIN_AUTH=none``).
    authenticator: Authenticator | None = None
    #: Counts requests (``None`` without ``OPTIN_RATE_LIMIT``).
    limiter: Limiter | None = None
    #: The OpenAPI document as served, built on its first request.
    openapi: bytes | None = None
    #: When to prune the change feed (``None`` with ``OPTIN_CHANGES_RETENTION=0``).
    retention: Retention | None = None

    def owns(self, req: Request) -> bool:
        """Whether ``req`` is the opt-in API's to answer (envelope, headers, request id)."""
        if self.standalone or req.blueprint == bp.name:
            return True
        path = req.path
        if self.url_prefix:
            return path == self.url_prefix or path.startswith(self.url_prefix + "/")
        return path in API_PATHS or path.startswith(_BELOW_API_PATHS)


#: What lies below an API path ("/healthz/..."): "/healthz-db" is the host's.
_BELOW_API_PATHS = tuple(p.rstrip("/") + "/" for p in API_PATHS)


def default_storage_url(app: Flask) -> str:
    """An SQLite file in the app's instance folder: durable with nothing else installed.
    ``create_app`` puts that folder at ``./instance``; a host app keeps its own."""
    return "sqlite:///" + os.path.join(os.path.abspath(app.instance_path), "optin.db")


class OptIn:
    """Mounts the opt-in API on a Flask app: ``OptIn(app)`` or ``OptIn().init_app(app)``.

    ``store`` takes a ready store (for example one around the host's own Redis
    client, which the host then keeps owning); without it the store is built
    from ``OPTIN_STORAGE_URL`` and closed when the app is garbage-collected.
    ``url_prefix`` mounts every route, health checks included, under a path.
    ``standalone`` makes the whole app the opt-in API (``create_app`` sets it).
    Per-app state lives in ``app.extensions["optin"]``, so one extension object
    can serve several apps.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        store: OptInStore | None = None,
        url_prefix: str | None = None,
        standalone: bool = False,
    ) -> None:
        if app is not None:
            self.init_app(app, store=store, url_prefix=url_prefix, standalone=standalone)

    def init_app(
        self,
        app: Flask,
        *,
        store: OptInStore | None = None,
        url_prefix: str | None = None,
        standalone: bool = False,
    ) -> None:
        """Register the routes, the store, and the envelope and headers on the API's responses."""
        if "optin" in app.extensions:
            raise RuntimeError("OptIn is already registered on this app")
        defaults.apply(app.config)
        _check_body_timeout(app.config["OPTIN_BODY_TIMEOUT_SECONDS"])
        retention = Retention(app.config["OPTIN_CHANGES_RETENTION"])
        url = None
        if store is None:
            configured = app.config["OPTIN_STORAGE_URL"]
            if not configured:
                # The one folder made on demand: the default's. A configured path's
                # folder must exist (the store refuses it otherwise).
                os.makedirs(app.instance_path, exist_ok=True)
            url = configured or default_storage_url(app)
            store = store_from_url(url, app.config)
            weakref.finalize(app, store.close)
            how = "" if configured else " (default: OPTIN_STORAGE_URL is not set)"
            store_name = redact(url) + how
        else:
            store_name = f"{type(store).__name__} (passed to OptIn)"
        log.info("opt-in storage: %s", store_name)
        prefix = (url_prefix or "").rstrip("/")
        backend = urlsplit(url).scheme if url else type(store).__name__
        config = app.config
        state = OptInState(
            store,
            url,
            prefix,
            standalone,
            backend,
            store_name,
            metrics=config["OPTIN_METRICS"],
            max_body_bytes=config["OPTIN_MAX_BODY_BYTES"],
            body_timeout=config["OPTIN_BODY_TIMEOUT_SECONDS"],
        )
        state.authenticator = build_authenticator(app.config)
        state.retention = retention if retention.days else None
        app.extensions["optin"] = state
        app.register_blueprint(bp, url_prefix=prefix or None)
        state.limiter = init_rate_limit(app, bp.name)
        app.cli.add_command(optin_cli)
        if standalone:
            register_error_handlers(app)
        else:
            # Routing errors happen before any blueprint is chosen, so only an
            # app-level hook sees a 404 or 405 under the mount point. It answers
            # those and leaves every other path to the host's own handlers. Last in
            # line: the host's own hooks run first, as its after_request hooks expect.
            app.before_request(_routing_errors)
        app.before_request_funcs.setdefault(None, []).insert(0, _start)
        # Flask runs app-level after_request functions last-registered first:
        # first in the list runs last, after a host's own Talisman or header
        # hooks, so the API's responses keep the seed's values whatever the host sets.
        app.after_request_funcs.setdefault(None, []).insert(0, _finish)

    @property
    def store(self) -> OptInStore:
        """The store of the current app (needs an app context)."""
        return current_app.extensions["optin"].store


def _routing_errors() -> Response | None:
    exc = request.routing_exception
    if isinstance(exc, HTTPException) and (exc.code or 0) >= 400:
        if current_app.extensions["optin"].owns(request):
            return handle_http_exception(exc)
    return None


def _check_body_timeout(seconds: object) -> None:
    """Refuse a deadline no body could meet (every PUT would answer 408)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"OPTIN_BODY_TIMEOUT_SECONDS must be a positive number, not {seconds!r}")


def _start() -> None:
    g.optin_started = time.perf_counter()


def _finish(response: Response) -> Response:
    """The API's last word on each of its responses: headers, metrics, the access log."""
    state = current_app.extensions["optin"]
    if not state.owns(request):
        return response
    rid = request_id()
    # Standalone, Talisman has set its own headers already (see headers.py).
    apply_headers(response, SEED_HEADERS if state.standalone else RESPONSE_HEADERS, rid)
    seconds = time.perf_counter() - g.get("optin_started", time.perf_counter())
    rule = request.url_rule
    route = rule.rule if rule is not None else "unmatched"
    method = request.method
    status = response.status_code
    if state.metrics:
        observe_request(route, method, status, seconds)
    ACCESS.info(
        "%s %s %s",
        method,
        route,
        status,
        extra={
            "request_id": rid,
            "method": method,
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "backend": state.backend,
            # Which gunicorn worker answered (the record's own ``process`` is
            # not among the JSON line's fields).
            "pid": os.getpid(),
        },
    )
    return response
