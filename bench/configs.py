"""The servers the benchmarks compare: the service on each backend, the reference, the ceilings.

Not a script: ``bench/load.py`` runs these under gunicorn, ``bench/inproc.py`` calls
their WSGI apps directly.

- The **reference** (``bench/reference_app.py``) is the twenty lines of Flask a user
  would write instead of the service. Every other server is paired with a reference
  of its worker count, and its figures are given as ratios to that reference.
- A **ceiling** (``bench/reference_headers_app.py``, ``bench/ceiling_app.py``) is the
  reference plus the least the contract and one storage require: no implementation
  of the service on that storage can beat it. ``-bare`` leaves the contract's headers
  out, ``-history`` also appends the history event in the same write, ``-libs``
  imports the libraries the service is built on without using them (their RSS).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

REFERENCE_APP = "bench.reference_app:app"
SERVICE_APP = "wsgi:app"

SQLITE_FULL = "sqlite:///{dir}/full.db"
SQLITE_NORMAL = "sqlite:///{dir}/normal.db?synchronous=NORMAL"
REDIS = "redis://127.0.0.1:{redis_port}/0"
# A private server (bench/servers.py postgres_server), its defaults: fsync and
# synchronous_commit on, no standby.
POSTGRES = "postgresql://postgres@127.0.0.1:{postgres_port}/postgres"

# Threaded workers, which keep connections alive (wrk reuses its 16): not the shipped
# default; run beside the sync rows to see what the choice of worker class costs.
GTHREAD = ("--worker-class", "gthread", "--threads", "4")

# Upper bounds of the service's p99 latency and RSS per worker, as ratios to the reference's.
P99_TARGET = 1.5
RSS_TARGET = 1.25


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    #: gunicorn's app spec, ``module:name`` or ``module:factory()``.
    app: str
    workers: int
    #: ``OPTIN_STORAGE_URL``, a template of ``{dir}`` (the run's temp dir), ``{redis_port}``
    #: and ``{postgres_port}``.
    storage: str | None = None
    #: The least requests/s ratio to the paired reference (None: no target).
    target: float | None = None
    note: str = ""
    #: Given to gunicorn after the shipped config, for this server and its reference.
    gunicorn_args: tuple[str, ...] = ()

    @property
    def uses_redis(self) -> bool:
        return bool(self.storage and self.storage.startswith("redis"))

    @property
    def uses_postgres(self) -> bool:
        return bool(self.storage and self.storage.startswith("postgresql"))

    def storage_url(
        self, workdir: Path, redis_port: int | None, postgres_port: int | None = None
    ) -> str | None:
        if self.storage is None:
            return None
        return self.storage.format(dir=workdir, redis_port=redis_port, postgres_port=postgres_port)


def reference(workers: int, gunicorn_args: tuple[str, ...] = ()) -> Config:
    """The reference paired with a server of ``workers`` workers run with ``gunicorn_args``."""
    suffix = "-" + "".join(gunicorn_args[1:2]) if gunicorn_args else ""
    return Config(
        f"reference-{workers}w{suffix}",
        REFERENCE_APP,
        workers,
        note="bench/reference_app.py",
        gunicorn_args=gunicorn_args,
    )


def _services() -> list[Config]:
    """The service as shipped (sync workers); ``memory://`` allows one worker only."""
    return [
        Config("memory", SERVICE_APP, 1, "memory://", target=0.92, note="1 worker vs 1"),
        Config("sqlite-full", SERVICE_APP, 2, SQLITE_FULL, 0.70, "synchronous=FULL (default)"),
        Config("sqlite-normal", SERVICE_APP, 2, SQLITE_NORMAL, 0.85, "synchronous=NORMAL"),
        Config("redis", SERVICE_APP, 2, REDIS + "?prefix=bench:", 0.80, "redis-server, AOF off"),
        Config("postgres", SERVICE_APP, 2, POSTGRES, None, "PostgreSQL, its defaults"),
    ]


def _gthread_services() -> list[Config]:
    """The same with gthread workers and keep-alive (not in the default run)."""
    return [
        dataclasses.replace(
            service,
            name=f"{service.name}-gthread",
            target=None,
            note="gthread, 4 threads per worker, keep-alive",
            gunicorn_args=GTHREAD,
        )
        for service in _services()
    ]


def _ceilings() -> list[Config]:
    # memory:// needs no more than the reference's dict: its ceiling is the headers alone.
    headers_only = Config(
        "reference-headers",
        "bench.reference_headers_app:app",
        1,
        target=0.92,
        note="reference + the 15 response headers",
    )
    storages = (
        ("sqlite-full", SQLITE_FULL, 0.70),
        ("sqlite-normal", SQLITE_NORMAL, 0.85),
        ("redis", REDIS, 0.80),
        ("postgres", POSTGRES, None),
    )
    variants = (
        ("", "headers", " + the 15 headers"),
        ("-bare", "bare", ""),
        ("-history", "history", " and its history event + the 15 headers"),
        ("-libs", "libraries", " + the 15 headers + the service's libraries"),
    )
    return [headers_only] + [
        Config(
            f"ceiling{suffix}-{name}",
            f"bench.ceiling_app:{factory}()",
            2,
            storage,
            target=target,
            note=f"reference + one {name} write{note}",
        )
        for name, storage, target in storages
        for suffix, factory, note in variants
    ]


CONFIGS: dict[str, Config] = {c.name: c for c in (*_services(), *_gthread_services(), *_ceilings())}

# Each service, then its ceilings.
DEFAULT_CONFIGS = (
    "memory",
    "reference-headers",
    "sqlite-full",
    "ceiling-sqlite-full",
    "sqlite-normal",
    "ceiling-sqlite-normal",
    "redis",
    "ceiling-redis",
    "ceiling-history-redis",
    "ceiling-libs-redis",
)

# The ceiling each service is held against: the least that keeps the contract's headers
# and its history event (consent is evidence); then the least requests/s and the most p99
# latency the service may have as ratios to that ceiling's (None: no target).
CEILING_OF: dict[str, tuple[str, float | None, float | None]] = {
    "memory": ("reference-headers", 0.85, 1.3),
    "sqlite-full": ("ceiling-history-sqlite-full", 0.95, 1.3),
    "sqlite-normal": ("ceiling-history-sqlite-normal", None, None),
    "redis": ("ceiling-history-redis", 0.85, 1.3),
    "postgres": ("ceiling-history-postgres", 0.85, 1.3),
}
