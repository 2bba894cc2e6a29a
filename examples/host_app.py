"""A host Flask app with its own pages, error pages, Talisman and JSON settings,
with the opt-in API mounted under ``/loyalty``.

Run it::

    OPTIN_STORAGE_URL=sqlite:///host-optin.db .venv/bin/flask --app examples.host_app run

then ``curl -X PUT localhost:5000/loyalty/client/users/m1/profile/optin
-H 'Content-Type: application/json' -d '{"LOYALTY_OPTIN":"accepted"}'``.
"""

from __future__ import annotations

from flask import Flask, jsonify
from flask_talisman import Talisman

from optin_service import OptIn
from optin_service.storage import OptInStore

HOST_CSP = {"default-src": "'self'", "img-src": "*"}


def create_host_app(
    *, with_optin: bool = True, store: OptInStore | None = None, url_prefix: str = "/loyalty"
) -> Flask:
    """The host's app; ``with_optin=False`` builds it exactly as it was before the API."""
    app = Flask(__name__)
    app.json.sort_keys = False  # the host's own JSON settings
    app.json.compact = False
    Talisman(app, force_https=False, content_security_policy=HOST_CSP)

    @app.get("/")
    def home() -> str:
        return "<!doctype html><title>Shop</title><h1>Welcome to the shop</h1>"

    @app.get("/api/profile")
    def profile():  # noqa: ANN202 - a Flask view
        return jsonify(name="Ada", tier="gold", points=1200)

    @app.errorhandler(404)
    def not_found(error):  # noqa: ANN001, ANN202 - a Flask error handler
        return "<!doctype html><title>Lost</title><p>No such page in the shop.</p>", 404

    if with_optin:
        OptIn(app, store=store, url_prefix=url_prefix)
    return app


app = create_host_app()
