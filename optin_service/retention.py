"""``OPTIN_CHANGES_RETENTION``: the change feed forgets changes older than this.

The events stay the evidence, whatever the feed keeps (``optin changes rebuild``
makes a feed from them again); the feed only tells readers what changed, so it
needs to keep changes as long as its slowest reader may lag. A reader whose
cursor points into pruned changes gets a 410 ``CURSOR_EXPIRED`` and resynchronises.

The app prunes after a successful PUT, at most once every :data:`PRUNE_INTERVAL`
seconds per process, once the response is sent (the client never waits for it,
and a prune that fails is only logged).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone

from .storage import OptInStore, StorageUnavailable

log = logging.getLogger(__name__)

#: Seconds between two prunes of one process.
PRUNE_INTERVAL = 60.0


def _now() -> datetime:
    """The wall clock changes are dated by (a function, so tests can move it)."""
    return datetime.now(timezone.utc)


def _monotonic() -> float:
    """The clock the interval is measured on (a function, so tests can move it)."""
    return time.monotonic()


def cutoff(days: int) -> datetime:
    """The time before which changes are ``days`` old: ``prune_changes``'s ``before``."""
    return _now() - timedelta(days=days)


def check_days(name: str, days: object) -> int:
    """``days`` as a whole number of days, 0 or more, or a ``ValueError`` naming ``name``."""
    if isinstance(days, bool) or not isinstance(days, int) or days < 0:
        raise ValueError(f"{name} must be a whole number of days, 0 or more, not {days!r}")
    return days


class Retention:
    """One app's pruning schedule: claim a prune with :meth:`due`, run it with :meth:`prune`."""

    def __init__(self, days: int) -> None:
        self.days = check_days("OPTIN_CHANGES_RETENTION", days)
        self._lock = threading.Lock()
        self._next: float | None = None  # when the next prune is due (monotonic)

    def due(self) -> bool:
        """Whether the caller should prune now; then the next one is due an interval
        later, whatever this one's outcome (a failing store is not retried in a loop)."""
        now = _monotonic()
        with self._lock:
            if self._next is not None and now < self._next:
                return False
            self._next = now + PRUNE_INTERVAL
            return True

    def prune(self, store: OptInStore) -> int | None:
        """Remove the changes older than the retention; how many went, or ``None`` if
        the store failed (logged, never raised: a PUT's answer does not depend on it)."""
        before = cutoff(self.days)
        try:
            removed = store.prune_changes(before)
        except StorageUnavailable as exc:
            log.warning("could not prune the change feed (tried again a minute later): %s", exc)
            return None
        except Exception:
            log.exception("could not prune the change feed (tried again a minute later)")
            return None
        if removed:
            log.info("pruned %d changes appended before %s", removed, before.isoformat())
        return removed
