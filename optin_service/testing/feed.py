"""The change feed: which writes are changes, versions, pages and cursors, retention,
rebuild, the deliverer's state, and a reader tailing the feed while threads write.

:class:`FeedContract` combines the feed's mixins, one per capability; a backend may
subclass only some of them while it grows.
"""

from __future__ import annotations

# Backend tests import these from here to check a feed of their own.
from optin_service.testing._feed import _assert_consistent, _difference, _read_all  # noqa: F401
from optin_service.testing.changes import ChangesContract
from optin_service.testing.cursors import CursorsContract
from optin_service.testing.imported_changes import ImportedChangesContract
from optin_service.testing.retention import RetentionContract
from optin_service.testing.state import StateContract
from optin_service.testing.tailing import TailingContract

__all__ = [
    "ChangesContract",
    "CursorsContract",
    "FeedContract",
    "ImportedChangesContract",
    "RetentionContract",
    "StateContract",
    "TailingContract",
]


class FeedContract(
    ChangesContract,
    ImportedChangesContract,
    CursorsContract,
    RetentionContract,
    StateContract,
    TailingContract,
):
    """Every event that becomes its member's state appends one change, atomically; the
    feed reads in commit order, a page at a time, after cursors the store validates
    (:meth:`~CursorsContract.cursor_past_the_end` is the hook for a backend's own
    cursor form)."""
