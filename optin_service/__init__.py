"""optin-service: record a loyalty member's consent to communications.

``create_app()`` builds the standalone service (``wsgi.py`` runs it under
gunicorn); :class:`OptIn` mounts the same API on an existing Flask app.

Importing the package (or a leaf such as ``optin_service.defaults``) loads
nothing of the app: the gunicorn master reads a setting from ``defaults``
before it points prometheus-client at the workers' metrics folder, and
prometheus-client chooses between one process and many when it is first
imported. The app's modules load on first use of ``create_app`` or ``OptIn``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from flask import Flask

    from .extension import OptIn

__all__ = ["OptIn", "__version__", "create_app"]


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """The standalone service: Flask, its ``OPTIN_*`` config, and the opt-in API.

    Settings come from ``defaults.py``, then same-named environment variables,
    then ``config``. An unknown storage scheme raises here, so gunicorn refuses
    to start rather than serve errors.

    The instance folder (the default store's) is ``./instance`` under the working
    directory, wherever the package is installed: gunicorn, ``optin`` and ``flask
    optin`` started in one folder share one default store.
    """
    from flask import Flask
    from flask_talisman import Talisman
    from werkzeug.middleware.proxy_fix import ProxyFix

    from . import defaults, logs
    from .extension import OptIn
    from .headers import TALISMAN_OPTIONS

    app = Flask(__name__, instance_path=os.path.abspath("instance"), instance_relative_config=True)
    if config:
        app.config.update(config)
    defaults.apply(app.config, os.environ)
    logs.configure(app.config["OPTIN_LOG_FORMAT"])
    hops = app.config["OPTIN_TRUSTED_PROXIES"]
    if hops:
        # Only these proxies' X-Forwarded-For/-Proto are believed (rate limits, HTTPS).
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]
    Talisman(app, **TALISMAN_OPTIONS)
    OptIn(app, standalone=True)
    return app


def __getattr__(name: str) -> Any:
    """``OptIn``, loaded on first use (see the module's docstring)."""
    if name == "OptIn":
        from .extension import OptIn

        return OptIn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
