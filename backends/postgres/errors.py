"""psycopg's errors as the store's: the one place where they are translated.

Retrying later may succeed (503): the server is unreachable, restarting or shutting
down (SQLSTATE classes 08 and 57, which psycopg raises as ``OperationalError``), a
statement was cancelled at its deadline (57014), the server is short of resources
(53) or hit a deadlock or serialisation failure (40), no pooled connection came in
time (``PoolTimeout``), or the server is a standby or read-only (25006). Anything
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
    return StorageError(message)
