"""Turn an ``OPTIN_STORAGE_URL`` into a store, through entry points.

Backends are entry points in the group ``optin_service.backends`` whose name is
the URL scheme. Only the entry for the scheme in use is loaded, so a broken
plugin that nobody asked for cannot stop start-up. :func:`register` is an escape
hatch for tests and for apps that build a backend in code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any
from urllib.parse import unquote, urlsplit

from .storage import OptInStore

GROUP = "optin_service.backends"

_registered: dict[str, type[OptInStore]] = {}


class BackendNotFound(LookupError):
    """No backend is installed for a URL's scheme."""


def register(scheme: str, backend: type[OptInStore]) -> None:
    """Make ``scheme`` resolve to ``backend`` in this process, ahead of entry points."""
    _registered[scheme] = backend


def unregister(scheme: str) -> None:
    """Undo :func:`register` (tests call this so a throwaway backend does not linger)."""
    _registered.pop(scheme, None)


def installed_schemes() -> list[str]:
    """Every scheme a store can be built for, without importing any backend."""
    return sorted(set(entry_points(group=GROUP).names) | set(_registered))


def backend_for(scheme: str) -> type[OptInStore]:
    """The backend class for ``scheme``; raises :class:`BackendNotFound` naming the choices."""
    if scheme in _registered:
        return _registered[scheme]
    found = entry_points(group=GROUP, name=scheme)
    if not found:
        known = ", ".join(installed_schemes()) or "none"
        raise BackendNotFound(
            f"no storage backend for URL scheme {scheme!r} "
            f"(entry-point group {GROUP!r}); installed: {known}"
        )
    entry = next(iter(found))
    try:
        return entry.load()
    except Exception as exc:  # a plugin's import error, reported with its name
        raise BackendNotFound(
            f"storage backend {scheme!r} ({entry.value}, entry-point group {GROUP!r}) "
            f"failed to load: {exc}"
        ) from exc


def store_from_url(url: str, config: Mapping[str, Any] | None = None) -> OptInStore:
    """Build the store named by ``url`` (for example ``redis://localhost:6379/0``).

    ``config`` (an app's config) gives the backend each setting its
    :attr:`~optin_service.storage.OptInStore.config_options` names, as the
    keyword argument it maps to; an option in the URL wins over it.
    """
    scheme = urlsplit(url).scheme
    if not scheme:
        raise BackendNotFound(
            f"storage URL {redact(url)!r} has no scheme; "
            f"installed: {', '.join(installed_schemes())}"
        )
    backend = backend_for(scheme)
    config = config or {}
    options = {
        keyword: config[key] for key, keyword in backend.config_options.items() if key in config
    }
    return backend.from_url(url, **options)


# A scheme and its slashes, if any (any number of them: libpq reads "postgresql:/"
# as a string of its own, which its messages quote).
_PREFIX = re.compile(r"\s*(?:[A-Za-z][A-Za-z0-9+.-]*:)?/*")
# A URL query's or a libpq "key=value" string's options; those whose name ends in
# "password" hold a secret (redis-py's password, sentinel_password, ssl_password;
# libpq's password, sslpassword).
# A key counts by its decoded name (drivers decode keys: "pass%77ord" is "password").
_OPTIONS = re.compile(r"(?:(?<=[?&;\s])|^)([^=&#;\s]+)(\s*=\s*)('[^']*'|[^&#;\s]*)")
# Where a parser may cut a password written without percent-encoding.
_CUTS = re.compile(r"[@/?#\s]+")


def _userinfo(url: str) -> tuple[int, int, int] | None:
    """Where the user part is (start, the colon before the password, the last ``@``).

    The user part is everything after the scheme up to the last ``@`` before the
    query (or the last ``@`` of all, when what looks like a query has no path before
    it: then its "?" is the password's): a driver may read
    a password up to an ``@`` whatever it holds (libpq: ``#`` and ``?`` included,
    where urllib would end it there and show the rest), and one written with an
    ``@`` or a ``/`` unencoded is still hidden whole.
    """
    start = _PREFIX.match(url).end()  # type: ignore[union-attr]
    if not url[:start].endswith("/"):
        start = len(url) - len(url.lstrip())  # "user:password@host": no scheme after all
    query = url.find("?", start)
    if query < 0:
        query = len(url)
    at = url.rfind("@", start, query)
    if at < 0 and "/" not in url[start:query]:  # "u:p?x@host": the "?" is the password's
        at = url.rfind("@", start)
    colon = url.find(":", start, at)
    return None if at < 0 or colon < 0 else (start, colon, at)


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and error messages."""
    where = _userinfo(url)
    if where is not None:
        _, colon, at = where
        url = f"{url[: colon + 1]}***{url[at:]}"
    return _OPTIONS.sub(_hide_secret_option, url)


def _secret_options(url: str) -> list[re.Match[str]]:
    return [m for m in _OPTIONS.finditer(url) if unquote(m.group(1)).lower().endswith("password")]


def _hide_secret_option(option: re.Match[str]) -> str:
    key, equals, _ = option.groups()
    return f"{key}{equals}***" if unquote(key).lower().endswith("password") else option.group(0)


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's message about ``url``, which may quote it in part) with
    ``url``'s passwords hidden: as written, percent-decoded, and each piece of
    three characters or more between the characters a parser may cut one at."""
    secrets: set[str] = set()
    where = _userinfo(url)
    if where is not None:
        secrets.add(url[where[1] + 1 : where[2]])
    secrets.update(match.group(3).strip("'") for match in _secret_options(url))
    for secret in list(secrets):
        secrets.add(unquote(secret, errors="replace"))
        secrets.update(piece for piece in _CUTS.split(secret) if len(piece) >= 3)
    text = text.replace(url, redact(url))
    for secret in sorted(secrets, key=len, reverse=True):  # a whole one before its pieces
        if secret:
            text = text.replace(secret, "***")
    return text
