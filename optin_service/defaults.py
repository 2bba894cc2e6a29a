"""Every ``OPTIN_*`` setting and its default, in one place.

Each can be overridden by an environment variable of the same name, and then
by the mapping passed to :func:`optin_service.create_app` (or by the host app's
own config when the extension is embedded).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

#: Which backend and where (``memory://``, ``sqlite:///rel.db``, ``redis://host:6379/0``...).
#: ``None`` means an SQLite file named ``optin.db`` in the Flask instance folder, made if
#: missing: ``./instance`` for ``create_app`` (the service, ``optin``), the host's when embedded.
OPTIN_STORAGE_URL: str | None = None

#: Largest request body accepted, in bytes (becomes Flask's ``MAX_CONTENT_LENGTH``).
OPTIN_MAX_BODY_BYTES: int = 16384

#: Seconds a client has to send the whole request body, then 408. Keep it well below
#: gunicorn's worker timeout (30 s in gunicorn.conf.py): a worker stuck past that is killed.
#: Enforced where the server gives the app its socket (gunicorn does).
OPTIN_BODY_TIMEOUT_SECONDS: int = 5

#: Seconds a client is told to wait (``Retry-After``) when storage is unavailable.
OPTIN_RETRY_AFTER_SECONDS: int = 1

#: Serve Prometheus metrics at ``/metrics``.
OPTIN_METRICS: bool = True

#: ``json`` (one JSON object per line) or ``text``: the standalone service's log format.
OPTIN_LOG_FORMAT: str = "json"

#: Who may call the API: ``none`` (a gateway in front authenticates), ``api-key`` or ``jwt``.
OPTIN_AUTH: str = "none"

#: For ``api-key``: ``name:sha256-hex-of-key`` entries, separated by commas or spaces.
OPTIN_API_KEYS: str = ""

#: For ``jwt``: where the issuer publishes its signing keys (JWKS), or a PEM public key file.
OPTIN_JWT_JWKS_URL: str = ""
OPTIN_JWT_PUBLIC_KEY_FILE: str = ""
#: For ``jwt``: the ``iss`` and ``aud`` every token must carry.
OPTIN_JWT_ISSUER: str = ""
OPTIN_JWT_AUDIENCE: str = ""
#: For ``jwt``: accepted signature algorithms (asymmetric only).
OPTIN_JWT_ALGORITHMS: str = "RS256,ES256"

#: Requests per client (or per address without authentication), e.g. ``600/minute``; off if empty.
OPTIN_RATE_LIMIT: str = ""
#: Where rate-limit counters live: ``memory://`` (per worker) or ``redis://...`` (shared).
OPTIN_RATE_LIMIT_STORAGE_URL: str = "memory://"

#: Proxies in front whose ``X-Forwarded-For``/``-Proto`` are trusted (hops; standalone only).
OPTIN_TRUSTED_PROXIES: int = 0

#: Redis only: a PUT is answered 200 once this many replicas confirm the write (WAIT);
#: fewer within the wait timeout is a 503, safe to retry with the same Idempotency-Key.
#: 0 sends no WAIT. A ``min_replicas_acked`` option in OPTIN_STORAGE_URL takes precedence.
OPTIN_REDIS_MIN_REPLICAS_ACKED: int = 0

#: Days the change feed keeps a change (``GET /client/optin/changes``); 0 keeps every one.
#: Older changes are pruned after a PUT, at most once a minute per process; a reader whose
#: cursor points into them gets 410 CURSOR_EXPIRED. The events themselves are never pruned.
OPTIN_CHANGES_RETENTION: int = 0

#: Webhooks (``optin webhooks run``): the receiver every change is POSTed to; empty: none.
OPTIN_WEBHOOK_URL: str = ""
#: Webhooks: the signing secret, ``whsec_`` + base64 of at least 24 random bytes (Standard
#: Webhooks form). The deliverer refuses to start with a malformed one; it is never logged.
OPTIN_WEBHOOK_SECRET: str = ""
#: Webhooks: seconds to connect, send, and for each read of the answer; then the attempt failed.
OPTIN_WEBHOOK_TIMEOUT_SECONDS: int = 15
#: Webhooks: seconds to wait before each retry of a refused change (the first attempt is
#: immediate), comma-separated; then it is marked failed and delivery moves on. The default
#: is the Standard Webhooks schedule: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h (about 28 h).
OPTIN_WEBHOOK_RETRY_SCHEDULE: str = "5,300,1800,7200,18000,36000,36000"

DEFAULTS: dict[str, Any] = {
    name: value for name, value in globals().items() if name.startswith("OPTIN_")
}


def flag(name: str, raw: str | None, default: bool) -> bool:
    """An on/off setting's value (the app and gunicorn.conf.py read it alike).
    Unset or empty: ``default``; a word that is neither is refused, not guessed."""
    word = (raw or "").strip().lower()
    if not word:
        return default
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be one of 1 true yes on / 0 false no off, not {raw!r}")


def _from_env(name: str, default: Any, environ: Mapping[str, str]) -> Any:
    raw = environ[name]
    if isinstance(default, bool):
        return flag(name, raw, default)
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name} must be a whole number, not {raw!r}") from None
    return raw


def apply(config: MutableMapping[str, Any], environ: Mapping[str, str] | None = None) -> None:
    """Fill every ``OPTIN_*`` key ``config`` lacks: from ``environ`` if given and it has
    the name (``create_app`` passes ``os.environ``), else the default. An embedded
    ``OptIn`` passes none: it reads only its host's config."""
    environ = environ or {}
    for name, default in DEFAULTS.items():
        if name not in config:
            config[name] = _from_env(name, default, environ) if name in environ else default
        value, least = config[name], _LEAST.get(name, 0)
        if name in _WHOLE_NUMBERS and (type(value) is not int or value < least):
            raise ValueError(f"{name} must be a whole number >= {least}, not {value!r}")


#: Whole-number settings that must be above 0 (the others may be 0, none below):
#: OPTIN_TRUSTED_PROXIES=-1 made Werkzeug believe the client's own X-Forwarded-For.
_LEAST = {"OPTIN_MAX_BODY_BYTES": 1}
#: Checked where they are read, with their own messages (a timeout may be any
#: positive number).
_CHECKED_ELSEWHERE = {
    "OPTIN_BODY_TIMEOUT_SECONDS",
    "OPTIN_CHANGES_RETENTION",
    "OPTIN_WEBHOOK_TIMEOUT_SECONDS",
}
_WHOLE_NUMBERS = {n for n, d in DEFAULTS.items() if type(d) is int} - _CHECKED_ELSEWHERE
