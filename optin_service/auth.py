"""Who may call the API, chosen by ``OPTIN_AUTH``.

- ``none`` (default): no check here; the service must sit behind a gateway that
  authenticates (a warning says so at start-up).
- ``api-key``: ``OPTIN_API_KEYS`` lists ``name:sha256-hex`` entries (never the keys
  themselves). A client sends ``Authorization: Bearer <key>`` or ``x-api-key: <key>``.
  Every configured digest is compared, in constant time, on bytes. A key may do
  everything.
- ``jwt``: OAuth 2.0 bearer access tokens (client credentials), verified with PyJWT
  against the issuer's JWKS (``OPTIN_JWT_JWKS_URL``) or a PEM public key
  (``OPTIN_JWT_PUBLIC_KEY_FILE``): signature, ``exp``, ``iss``, ``aud``. Scope
  ``optin:write`` for PUT, ``optin:read`` for GET.

Missing or bad credentials: 401 ``UNAUTHORIZED`` with ``WWW-Authenticate: Bearer``.
Valid but without the scope: 403 ``FORBIDDEN``. The health checks, ``/metrics``
and ``/openapi.json`` stay open.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from flask import Request, current_app, g, request

from .errors import ApiError
from .formats import CLIENT

if TYPE_CHECKING:  # PyJWT and cryptography are heavy: loaded for OPTIN_AUTH=jwt only
    import jwt

log = logging.getLogger(__name__)

READ = "optin:read"
WRITE = "optin:write"
ALL_SCOPES = frozenset({READ, WRITE})
#: Endpoints anyone may call: probes, scrapes and the API's own description.
OPEN_ENDPOINTS = frozenset({"optin.healthz", "optin.readyz", "optin.metrics", "optin.openapi"})
_NAME = re.compile(r"[A-Za-z0-9._:@-]{1,64}")
_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


@dataclasses.dataclass(frozen=True)
class Principal:
    """An authenticated caller: its name (recorded on consent events) and scopes."""

    name: str
    scopes: frozenset[str]


class Authenticator(Protocol):
    """Checks a request's credentials."""

    def authenticate(self, request: Request) -> Principal:
        """The caller, or an :class:`ApiError` 401 (or 503 if keys cannot be fetched)."""


def unauthorized(message: str, error: str = "invalid_token") -> ApiError:
    """A 401 that tells the client how to authenticate (RFC 6750)."""
    challenge = 'Bearer realm="optin"'
    if error:
        challenge += f', error="{error}"'
    return ApiError(401, message, headers={"WWW-Authenticate": challenge})


def forbidden(scope: str) -> ApiError:
    """A 403 for a valid caller without the scope this request needs."""
    challenge = f'Bearer realm="optin", error="insufficient_scope", scope="{scope}"'
    return ApiError(
        403, f"This request needs the scope {scope}", headers={"WWW-Authenticate": challenge}
    )


def _bearer(request: Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("Authorization must be 'Bearer <credentials>'")
    return token.strip()


def _missing() -> ApiError:
    return unauthorized("Credentials are required", error="")


class ApiKeys:
    """API keys, kept as SHA-256 digests and compared in constant time."""

    def __init__(self, entries: str) -> None:
        self._digests: list[tuple[bytes, str]] = []
        for entry in entries.replace(",", " ").split():
            name, _, digest = entry.partition(":")
            if not _NAME.fullmatch(name) or not _DIGEST.fullmatch(digest):
                raise ValueError(
                    "OPTIN_API_KEYS entries must be name:sha256-hex-of-key "
                    f"(name of A-Z a-z 0-9 . _ : @ -), not {entry[:80]!r}"
                )
            self._digests.append((bytes.fromhex(digest), name))
        if not self._digests:
            raise ValueError("OPTIN_AUTH=api-key needs OPTIN_API_KEYS (name:sha256-hex entries)")

    def authenticate(self, request: Request) -> Principal:
        key = _bearer(request) or request.headers.get("x-api-key")
        if not key:
            raise _missing()
        # WSGI header values are latin-1 strings: their bytes, whatever they hold.
        digest = hashlib.sha256(key.encode("latin-1", "replace")).digest()
        found = None
        for known, name in self._digests:  # no early exit: the time does not tell which
            if hmac.compare_digest(digest, known):
                found = name
        if found is None:
            raise unauthorized("Unknown API key")
        return Principal(found, ALL_SCOPES)


class JwtBearer:
    """OAuth 2.0 bearer access tokens (JWT), verified with PyJWT."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.issuer = config["OPTIN_JWT_ISSUER"]
        self.audience = config["OPTIN_JWT_AUDIENCE"]
        self.algorithms = [a.strip() for a in config["OPTIN_JWT_ALGORITHMS"].split(",") if a]
        if not self.issuer or not self.audience:
            raise ValueError("OPTIN_AUTH=jwt needs OPTIN_JWT_ISSUER and OPTIN_JWT_AUDIENCE")
        if any(a.upper().startswith("HS") or a.lower() == "none" for a in self.algorithms):
            raise ValueError(
                "OPTIN_JWT_ALGORITHMS takes asymmetric algorithms only (RS256, ES256...)"
            )
        import jwt
        from cryptography.hazmat.primitives import serialization

        self._jwks: jwt.PyJWKClient | None = None
        self._key: Any = None
        if config["OPTIN_JWT_JWKS_URL"]:
            self._jwks = jwt.PyJWKClient(config["OPTIN_JWT_JWKS_URL"], lifespan=300, timeout=2)
        elif config["OPTIN_JWT_PUBLIC_KEY_FILE"]:
            with open(config["OPTIN_JWT_PUBLIC_KEY_FILE"], "rb") as file:
                self._key = serialization.load_pem_public_key(file.read())
            # A token may only name an algorithm that fits the key (an ES256 token
            # checked against an RSA key is invalid, not an error).
            fitting = [a for a in self.algorithms if a.startswith(_family(self._key))]
            if not fitting:
                raise ValueError(
                    f"OPTIN_JWT_PUBLIC_KEY_FILE holds a {type(self._key).__name__}, which "
                    f"none of OPTIN_JWT_ALGORITHMS ({', '.join(self.algorithms)}) verifies"
                )
            self.algorithms = fitting
        else:
            raise ValueError("OPTIN_AUTH=jwt needs OPTIN_JWT_JWKS_URL or OPTIN_JWT_PUBLIC_KEY_FILE")

    def authenticate(self, request: Request) -> Principal:
        import jwt

        token = _bearer(request)
        if token is None:
            raise _missing()
        try:
            key, algorithms = self._key, self.algorithms
            if self._jwks is not None:
                jwk = self._jwks.get_signing_key_from_jwt(token)
                # Only the algorithm the issuer published for this key.
                key, algorithms = jwk.key, [a for a in algorithms if a == jwk.algorithm_name]
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iss", "aud"]},
                leeway=30,
            )
        except jwt.PyJWKClientConnectionError as exc:
            log.warning("cannot fetch the JWKS: %s", exc)
            retry_after = str(current_app.config["OPTIN_RETRY_AFTER_SECONDS"])
            raise ApiError(
                503, "Cannot verify tokens right now", headers={"Retry-After": retry_after}
            ) from None
        except (jwt.PyJWTError, ValueError) as exc:
            raise unauthorized(f"Invalid token: {exc}") from None
        return Principal(_client_name(claims), _scopes(claims))


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """The token's scopes: ``scope`` as a space-separated string (RFC 8693), else ``scp``
    as such a string or a list of strings. Any other value grants nothing: a token
    whose scopes cannot be read is a token without them."""
    if "scope" in claims:
        value = claims["scope"]
        return frozenset(value.split()) if isinstance(value, str) else frozenset()
    value = claims.get("scp")
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list) and all(isinstance(scope, str) for scope in value):
        return frozenset(value)
    return frozenset()


#: The claims that may name a token's client, in the order they are tried.
_CLIENT_CLAIMS = ("client_id", "azp", "sub")


def _client_name(claims: Mapping[str, Any]) -> str:
    """The token's client as the events record it: printable ASCII, as export and
    import carry it. Other characters are written as JSON escapes ("Zoë" becomes
    "Zo\\u00eb"), so the record still names the client."""
    for claim in _CLIENT_CLAIMS:
        name = claims.get(claim)
        if isinstance(name, int) and not isinstance(name, bool):
            name = str(name)  # some issuers send numeric client ids
        if isinstance(name, str) and name:
            break
    else:
        if any(claims.get(claim) for claim in _CLIENT_CLAIMS):
            raise unauthorized("Invalid token: its client_id, azp or sub is not a string")
        return "unknown"
    if CLIENT.fullmatch(name[:128]):
        return name[:128]
    recorded = ""
    for char in name:  # whole escapes only, up to 128 characters
        piece = char if CLIENT.fullmatch(char) else json.dumps(char)[1:-1]
        if len(recorded) + len(piece) > 128:
            break
        recorded += piece
    return recorded


def build_authenticator(config: Mapping[str, Any]) -> Authenticator | None:
    """The authenticator ``OPTIN_AUTH`` asks for (``None`` for ``none``)."""
    mode = config["OPTIN_AUTH"]
    if mode == "none":
        log.warning(
            "OPTIN_AUTH=none: the API accepts every caller; "
            "it must sit behind a gateway that authenticates"
        )
        return None
    if mode == "api-key":
        return ApiKeys(config["OPTIN_API_KEYS"])
    if mode == "jwt":
        return JwtBearer(config)
    raise ValueError(f"OPTIN_AUTH must be none, api-key or jwt, not {mode!r}")


def required_scope(method: str) -> str:
    """The scope a request method needs."""
    return READ if method in ("GET", "HEAD") else WRITE


def security_schemes(config: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """The OpenAPI security schemes of ``OPTIN_AUTH``: where its authenticator reads
    credentials, and which scopes a token needs."""
    bearer = {"type": "http", "scheme": "bearer"}
    if config["OPTIN_AUTH"] == "api-key":
        return {
            "bearerAuth": {**bearer, "description": "An API key, as `Authorization: Bearer <key>`"},
            "apiKeyAuth": {
                "type": "apiKey",
                "in": "header",
                "name": "x-api-key",
                "description": "An API key, as `x-api-key: <key>`",
            },
        }
    if config["OPTIN_AUTH"] != "jwt":
        return {}
    text = (
        "An OAuth 2.0 access token (JWT, client credentials) "
        f"with scope `{WRITE}` for PUT and `{READ}` for GET"
    )
    if config.get("OPTIN_JWT_ISSUER"):
        text += f"; issuer `{config['OPTIN_JWT_ISSUER']}`"
    if config.get("OPTIN_JWT_AUDIENCE"):
        text += f", audience `{config['OPTIN_JWT_AUDIENCE']}`"
    return {"bearerAuth": {**bearer, "bearerFormat": "JWT", "description": text}}


def check_request() -> None:
    """Before each API request: authenticate, check the scope, remember the caller."""
    authenticator = current_app.extensions["optin"].authenticator
    if authenticator is None or request.endpoint in OPEN_ENDPOINTS or request.method == "OPTIONS":
        return
    principal = authenticator.authenticate(request)
    scope = required_scope(request.method)
    if scope not in principal.scopes:
        raise forbidden(scope)
    g.optin_client = principal.name


def client_name() -> str:
    """The authenticated caller of this request ("" without authentication)."""
    return g.get("optin_client", "")


def _family(key: object) -> tuple[str, ...]:
    """The prefixes of the JWT algorithms a public key verifies."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    if isinstance(key, rsa.RSAPublicKey):
        return ("RS", "PS")
    if isinstance(key, ec.EllipticCurvePublicKey):
        return ("ES",)
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return ("EdDSA",)
    return ()
