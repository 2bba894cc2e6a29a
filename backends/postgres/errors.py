"""psycopg's errors as the store's: the one place where they are translated.

Retrying later may succeed (503): the server is unreachable, restarting or shutting
down (SQLSTATE classes 08 and 57, which psycopg raises as ``OperationalError``), a
statement was cancelled at its deadline (57014), the server is short of resources
(53) or hit a deadlock or serialisation failure (40), no pooled connection came in
time (``PoolTimeout``), or the server is a standby or read-only (25006). A role
without a privilege it needs (42501) is a 503 too, naming it: an operator fixes it,
as with a read-only server, and ``/readyz`` says the same. Anything
else (a bug, a schema someone changed by hand, a value the server refuses) is a
:class:`StorageError` (500).
"""

from __future__ import annotations

import psycopg
from psycopg import errors as sqlstate

from optin_service.storage import StorageError, StorageUnavailable

_UNAVAILABLE: tuple[type[Exception], ...] = (
    psycopg.OperationalError,  # includes psycopg_pool.PoolTimeout
    sqlstate.ReadOnlySqlTransaction,
    psycopg.InterfaceError,  # a connection closed under the operation
)


def wrap(exc: psycopg.Error) -> StorageError:
    """The store's error for a driver error (raise it ``from exc``)."""
    message = f"postgresql: {type(exc).__name__}: {str(exc).strip()}"
    if isinstance(exc, _UNAVAILABLE):
        return StorageUnavailable(message)
    if isinstance(exc, sqlstate.InsufficientPrivilege):
        # Not a bug: the role the service connects as was not given what it needs
        # (on PostgreSQL 15 and later, CREATE on the schema public only for its owner).
        return StorageUnavailable(
            message,
            reason="the database user lacks a privilege on the service's tables or "
            "schema: see docs/postgres.md",
        )
    return StorageError(message)
