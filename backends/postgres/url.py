"""A ``postgresql://`` storage URL: libpq's own syntax, plus this backend's options.

libpq reads the URL (multi-host ``host1:5432,host2:5432``, ``target_session_attrs``,
``sslmode``, ``options``...). The options in :data:`OPTIONS` are this backend's: they
are taken out before the URL reaches libpq. Anything libpq does not know either, an
option given twice, or a value out of range is refused here, at start-up, rather
than on the first connection.
"""

from __future__ import annotations

import dataclasses
from urllib.parse import unquote

from psycopg import Error as DriverError
from psycopg.conninfo import conninfo_to_dict, timeout_from_conninfo

from optin_service.registry import redact, scrub

#: libpq's ``connect_timeout`` (seconds, per host) when the URL gives none: libpq's
#: own floor. The pool waits for a connection only ``pool_timeout_ms``, whatever it is.
CONNECT_TIMEOUT = 2
APPLICATION_NAME = "optin-service"


@dataclasses.dataclass(frozen=True)
class Options:
    """This backend's options, from the URL's query or keyword arguments."""

    #: Server-side ``statement_timeout``, and the client's deadline for a request
    #: (a COMMIT waiting for a synchronous standby included, which the server's
    #: timeout does not bound). Below gunicorn's 30 s worker timeout.
    statement_timeout_ms: int = 5000
    #: Connections each process keeps open (1: a sync gunicorn worker needs one).
    pool_min_size: int = 1
    #: Connections each process may open (``--threads`` share them).
    pool_max_size: int = 10
    #: How long a request waits for a connection before a 503: with the server
    #: down, every connection attempt fails and this is how long a request takes.
    pool_timeout_ms: int = 1000
    #: Events per transaction of a bulk import (``optin import`` and ``migrate``).
    import_batch: int = 50_000
    #: Sessions an import stages and merges its members on, at once (each member's
    #: events in one): the server merges on as many cores.
    import_connections: int = 2

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            least = 0 if field.name == "pool_min_size" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{field.name} must be an integer >= {least}, not {value!r}")
        if self.pool_max_size < self.pool_min_size:
            raise ValueError(
                f"pool_max_size ({self.pool_max_size}) is below pool_min_size "
                f"({self.pool_min_size})"
            )


OPTIONS = frozenset(field.name for field in dataclasses.fields(Options))


def split(url: str) -> tuple[str, dict[str, int]]:
    """``url`` without this backend's options (what libpq gets), and those options.

    Raises :class:`ValueError` (the password redacted) for an option libpq does
    not know either, one given twice, or a value that is not a whole number.
    """
    base, _, query = url.partition("?")
    kept, ours, seen = [], {}, set()
    for part in query.split("&") if query else []:
        name = unquote(part.partition("=")[0])
        if name in seen:
            raise ValueError(f"postgresql URL option {name!r} is given twice: {redact(url)}")
        seen.add(name)
        if name in OPTIONS:
            value = unquote(part.partition("=")[2])
            try:
                ours[name] = int(value)
            except ValueError:
                raise ValueError(
                    f"postgresql URL option {name}={value!r} is not a whole number"
                ) from None
        else:
            kept.append(part)
    libpq_url = base + ("?" + "&".join(kept) if kept else "")
    try:
        params = conninfo_to_dict(libpq_url)
        timeout_from_conninfo(params)  # a connect_timeout libpq would refuse on connecting
    except DriverError as exc:
        # libpq's message quotes what it could not read, a password included.
        known = ", ".join(sorted(OPTIONS))
        raise ValueError(
            f"postgresql URL {redact(url)} refused: {scrub(str(exc).strip(), url)} "
            f"(libpq's options are accepted, and this backend's: {known})"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(
            f"postgresql URL {redact(url)} refused: a percent-encoded value is not UTF-8"
        ) from None
    problem = _checked_on_connect(params)
    if problem:
        raise ValueError(f"postgresql URL {redact(url)} refused: {scrub(problem, url)}")
    return libpq_url, ours


# Values libpq checks only when it connects: a mistake there would be a 503 on
# every request instead of a refusal at start-up.
_CHOICES = {
    "sslmode": {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"},
    "target_session_attrs": {
        "any", "read-write", "read-only", "primary", "standby", "prefer-standby",
    },
}  # fmt: skip


def _checked_on_connect(params: dict[str, object]) -> str | None:
    if "@" in str(params.get("host", "")):
        # libpq ends the user part at the first "@": the rest of a password went into
        # the host name, which every failed connection would then log.
        return "an '@' in the user name or password must be written %40"
    for name, choices in _CHOICES.items():
        value = params.get(name)
        if value is not None and value not in choices:
            return f"{name}={value!r} is not one of {', '.join(sorted(choices))}"
    ports = str(params.get("port", "")).split(",")
    for port in ports:
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            return f"port {port!r} is not a port number"
    hosts = max(len(str(params.get(name, "")).split(",")) for name in ("host", "hostaddr"))
    if len(ports) > 1 and len(ports) != hosts:
        return f"{len(ports)} ports for {hosts} hosts (give one port, or one per host)"
    for name in _INTEGERS:
        value = str(params.get(name, "0")).strip()
        if not value.lstrip("-").isdigit():
            return f"{name}={value!r} is not a whole number"
    return None


_INTEGERS = ("keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count")


def connection_defaults(libpq_url: str) -> dict[str, str | int]:
    """What psycopg adds to the URL: a short ``connect_timeout`` and an
    ``application_name`` (for ``pg_stat_activity``), unless the URL sets them."""
    params = conninfo_to_dict(libpq_url)
    defaults: dict[str, str | int] = {}
    if "connect_timeout" not in params:
        defaults["connect_timeout"] = CONNECT_TIMEOUT
    if "application_name" not in params:
        defaults["application_name"] = APPLICATION_NAME
    return defaults
