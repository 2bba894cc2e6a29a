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
from urllib.parse import urlsplit

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


# Query options holding a secret: redis-py's password, sentinel_password, ssl_password.
_SECRET_OPTIONS = re.compile(r"(?<=[?&])([^=&#]*password)=[^&#]*", re.IGNORECASE)


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and error messages.

    The user part is everything after ``://`` up to the last ``@`` before the
    path, as a driver may read it: libpq takes a password up to its ``@``, ``#``
    and ``?`` included, where urllib would end it at the ``#`` and show the rest.
    """
    scheme, slashes, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    if slashes and at and ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        url = f"{scheme}://{user}:***@{hosts}{slash}{path}"
    return _SECRET_OPTIONS.sub(r"\1=***", url)
