"""Reading a Redis storage URL: hosts, query options, timeouts and retries.

Options of our own, on every scheme (:data:`OUR_OPTIONS`): ``prefix``,
``min_replicas_acked``, ``wait_timeout_ms`` and ``import_batch``. A
``min_replicas_acked`` in the URL wins over the keyword of the same name that
``from_url`` takes from the app's config. ``redis://`` passes every other option
to redis-py; ``redis+sentinel://`` and ``redis+cluster://`` take only the
timeouts (and the Sentinels' own credentials) besides, and refuse the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, unquote

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

DEFAULT_PREFIX = "optin:"
SOCKET_TIMEOUT = 0.5
CONNECT_TIMEOUT = 0.5
#: Per Sentinel asked: they are asked in turn, so three hung ones cost 0.6 s.
SENTINEL_TIMEOUT = 0.2
DEFAULT_WAIT_TIMEOUT_MS = 500

#: Query options every scheme takes, consumed here (never passed to redis-py).
OUR_OPTIONS = ("prefix", "min_replicas_acked", "wait_timeout_ms", "import_batch")
#: Timeouts (seconds) that ``redis+sentinel://`` and ``redis+cluster://`` take too.
TIMEOUT_OPTIONS = ("socket_timeout", "socket_connect_timeout")


def store_options(
    options: list[tuple[str, str]], min_replicas_acked: int | str | None = None
) -> dict[str, Any]:
    """The store's keyword arguments from our URL options: ``prefix``,
    ``min_replicas_acked`` (the URL's, else the keyword's, else 0),
    ``wait_timeout_ms``, and ``import_batch`` when the URL gives one."""
    found = dict(options)
    if "min_replicas_acked" in found:
        replicas = integer("min_replicas_acked", found["min_replicas_acked"], low=0)
    elif min_replicas_acked is not None:  # from the app's config: an int, or a str
        raw = min_replicas_acked
        raw = str(int(raw)) if isinstance(raw, int) else str(raw).strip()
        replicas = integer("min_replicas_acked", raw, low=0)
    else:
        replicas = 0
    wait_ms = integer(
        "wait_timeout_ms", found.get("wait_timeout_ms", str(DEFAULT_WAIT_TIMEOUT_MS)), low=1
    )
    kwargs: dict[str, Any] = {
        "prefix": found.get("prefix", DEFAULT_PREFIX),
        "min_replicas_acked": replicas,
        "wait_timeout_ms": wait_ms,
    }
    if "import_batch" in found:
        kwargs["import_batch"] = integer("import_batch", found["import_batch"], low=1)
    return kwargs


def netloc(netloc: str, default_port: int) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    """``[user:password@]host[:port][,host[:port]...]`` -> (user, password, addresses)."""
    userinfo, _, hostlist = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None
    addresses = []
    for part in hostlist.split(","):
        part = part.strip()
        if part.startswith("["):  # [IPv6]:port
            host, _, rest = part[1:].partition("]")
            if rest and not rest.startswith(":"):
                raise ValueError(f"bad address {part!r} in the storage URL")
            port = rest[1:]
        else:
            host, _, port = part.partition(":")
        if not host:
            raise ValueError(f"empty host in the storage URL's host list {hostlist!r}")
        number = integer("port", port, low=1, high=65535) if port else default_port
        addresses.append((unquote(host), number))
    return username, password, addresses


def query_options(query: str) -> list[tuple[str, str]]:
    """A URL's query options; one given twice is refused (which should win is a guess)."""
    options = parse_qsl(query, keep_blank_values=True)
    names = [name for name, _ in options]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"option(s) given twice in the storage URL: {', '.join(repeated)}")
    return options


def refuse_unknown(options: list[tuple[str, str]], known: Sequence[str], scheme: str) -> None:
    """Raise :class:`ValueError` naming any option not in ``known``."""
    unknown = sorted({k for k, _ in options} - set(known))
    if unknown:
        raise ValueError(
            f"unknown {scheme}:// option(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )


def refuse_unknown_driver_options(pool: redis.ConnectionPool, scheme: str) -> None:
    """Build one connection (without connecting) as the pool will: an option redis-py
    does not know fails here, at start-up, instead of on every request."""
    try:
        pool.connection_class(**pool.connection_kwargs)
    except TypeError as exc:
        raise ValueError(f"a {scheme}:// option is unknown: {exc}") from None
    except redis.RedisError as exc:  # a value it refuses: ssl_cert_reqs=maybe
        raise ValueError(f"a {scheme}:// option is refused: {exc}") from None


def integer(name: str, raw: str, low: int, high: int | None = None) -> int:
    """``raw`` as a whole number between ``low`` and ``high``, else :class:`ValueError`."""
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, not {raw!r}") from None
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be between {low} and {high or 'any'}, not {value}")
    return value


def _seconds(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, not {raw!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number of seconds, not {raw!r}")
    return value


def socket_timeout(replicas: int, wait_ms: int) -> float:
    """The default read timeout: a read must outlast the WAIT it may be waiting for."""
    return SOCKET_TIMEOUT + wait_ms / 1000 if replicas else SOCKET_TIMEOUT


def timeouts(options: list[tuple[str, str]], replicas: int, wait_ms: int) -> dict[str, float]:
    """``socket_timeout`` and ``socket_connect_timeout``: the URL's, else our defaults."""
    found = dict(options)
    return {
        "socket_timeout": (
            _seconds("socket_timeout", found["socket_timeout"])
            if "socket_timeout" in found
            else socket_timeout(replicas, wait_ms)
        ),
        "socket_connect_timeout": (
            _seconds("socket_connect_timeout", found["socket_connect_timeout"])
            if "socket_connect_timeout" in found
            else CONNECT_TIMEOUT
        ),
    }


def retry() -> Retry:
    """One retry after a short backoff: what reconnects after Redis restarts, while a
    dead server still costs a request about a second, not redis-py's default minute."""
    return Retry(ExponentialBackoff(cap=0.1, base=0.02), retries=1)
