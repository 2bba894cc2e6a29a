"""Health and connections: ``check`` on a healthy store, ``close`` then use again."""

from __future__ import annotations

from datetime import timedelta

from optin_service.storage import OptInRecord, OptInStore
from optin_service.testing._helpers import _BASE

__all__ = ["LifecycleContract"]


class LifecycleContract:
    """``check`` returns None when healthy; ``close`` is harmless at any time, and the next
    call reopens with nothing lost."""

    def test_check_passes_on_a_healthy_store(self, store: OptInStore) -> None:
        assert store.check() is None
        store.set(OptInRecord("member-1", "accepted", _BASE))
        assert store.check() is None

    def test_close_then_use_again_reopens(self, store: OptInStore) -> None:
        record = OptInRecord("member-1", "accepted", _BASE)
        store.set(record)
        store.close()
        assert store.get("member-1") == record
        store.close()
        later = OptInRecord("member-1", "declined", _BASE + timedelta(seconds=1))
        store.set(later)
        store.close()
        store.check()
        assert store.get("member-1") == later
        store.close()
        assert store.history("member-1", 10) == [later, record]
        store.close()
        assert store.count_events() == 2
        store.close()
        assert store.import_events([record]) == 0
        store.close()
        assert len(list(store.events())) == 2

    def test_close_is_harmless_before_use_and_twice(self, store: OptInStore) -> None:
        store.close()
        store.close()
        assert store.get("member-1") is None
