"""The reference: the twenty lines of Flask a user would write instead of this service.

The same route and the same 29-byte answer as the service's PUT, the status kept
in a dict. ``bench/load.py`` runs it under the same ``gunicorn.conf.py`` as the
service: ``gunicorn -c gunicorn.conf.py bench.reference_app:app``.
"""

from flask import Flask, Response, request

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
    return Response(BODY, 200, mimetype="application/json")
