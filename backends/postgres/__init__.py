"""``postgresql://`` and ``postgres://``: PostgreSQL, the system of record most teams run.

The URL is libpq's (``postgresql://user:password@host1:5432,host2:5432/db?
target_session_attrs=read-write&sslmode=require``...), plus this backend's options
(:class:`~backends.postgres.url.Options`: ``statement_timeout_ms``,
``pool_min_size``, ``pool_max_size``, ``pool_timeout_ms``, ``import_batch``).

- Tables ``optin`` (current state), ``optin_event`` (history),
  ``optin_idempotency``, ``optin_health`` and ``optin_schema_version``, created on
  first use; ``optin db upgrade`` applies what a newer release needs.
- A write is one statement: the event, the current state (precedence in the
  upsert's WHERE) and the idempotency key together or not at all.
- ``synchronous_commit`` is the server's (on by default). A write whose COMMIT
  sent a WARNING (its wait for a synchronous standby was cancelled, so it is
  committed here but maybe not there) is answered as unavailable (503); a retry
  with the same ``Idempotency-Key`` waits for the standby again before its 200.
- Connections: a pool per process, opened on first use (after gunicorn's fork);
  a down server answers 503 within about ``pool_timeout_ms``; a statement past
  ``statement_timeout_ms`` is cancelled, and its connection cut if the server
  does not answer the cancel.

Needs psycopg 3 and psycopg-pool: ``pip install 'optin-service[postgres]'``. The
registry imports this package only for its schemes, so the other backends never
need them.
"""

try:
    import psycopg  # noqa: F401
    import psycopg_pool  # noqa: F401
except ImportError as exc:
    raise ImportError(
        f"the postgresql:// storage backend needs psycopg 3 and psycopg-pool ({exc}): "
        "pip install 'optin-service[postgres]'"
    ) from exc

from .store import PostgresStore

__all__ = ["PostgresStore"]
