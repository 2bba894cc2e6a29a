"""``OptIn``: the Flask extension that mounts the opt-in API on an app."""

from __future__ import annotations

import dataclasses
import logging
import os

from flask import Flask, current_app

from . import defaults
from .api import bp
from .errors import register_error_handlers
from .headers import init_headers
from .registry import redact, store_from_url
from .storage import OptInStore

log = logging.getLogger(__name__)


@dataclasses.dataclass
class OptInState:
    """What one app needs at request time, kept in ``app.extensions["optin"]``."""

    store: OptInStore
    storage_url: str | None


def default_storage_url(app: Flask) -> str:
    """An SQLite file in the app's instance folder: durable with nothing else installed."""
    return "sqlite:///" + os.path.join(os.path.abspath(app.instance_path), "optin.db")


class OptIn:
    """Mounts the opt-in API on a Flask app: ``OptIn(app)`` or ``OptIn().init_app(app)``.

    ``store`` takes a ready store (for example one around the host's own Redis
    client); without it the store is built from ``OPTIN_STORAGE_URL``. Per-app
    state lives in ``app.extensions["optin"]``, so one extension object can
    serve several apps.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        store: OptInStore | None = None,
        url_prefix: str | None = None,
    ) -> None:
        if app is not None:
            self.init_app(app, store=store, url_prefix=url_prefix)

    def init_app(
        self,
        app: Flask,
        *,
        store: OptInStore | None = None,
        url_prefix: str | None = None,
    ) -> None:
        """Register routes, headers, error handlers and the store on ``app``."""
        defaults.apply(app.config)
        url = None
        if store is None:
            url = app.config["OPTIN_STORAGE_URL"] or default_storage_url(app)
            store = store_from_url(url)
            how = (
                ""
                if app.config["OPTIN_STORAGE_URL"]
                else " (default: OPTIN_STORAGE_URL is not set)"
            )
            log.info("opt-in storage: %s%s", redact(url), how)
        app.extensions["optin"] = OptInState(store=store, storage_url=url)
        app.register_blueprint(bp, url_prefix=url_prefix)
        register_error_handlers(app)
        init_headers(app)

    @property
    def store(self) -> OptInStore:
        """The store of the current app (needs an app context)."""
        return current_app.extensions["optin"].store
