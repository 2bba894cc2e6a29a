"""A contract suite every :class:`~optin_service.storage.OptInStore` must pass.

Backends in this repository run it, and so can third-party plugins: subclass
:class:`StoreContract` under a ``Test`` name (so pytest collects it) and supply
a ``store`` fixture yielding a fresh, empty store that it closes afterwards::

    import pytest
    from optin_service.testing import StoreContract

    class TestMyStore(StoreContract):
        @pytest.fixture
        def store(self):
            store = MyStore.from_url("mine://localhost/optin-test")
            yield store
            store.close()

:class:`StoreContract` combines every mixin listed below. A backend still being
written can combine only the mixins for what it supports so far (and add the
rest as it grows), with the same ``store`` fixture::

    from optin_service.testing import BasicsContract, HistoryContract, OrderingContract

    class TestMyStore(BasicsContract, OrderingContract, HistoryContract):
        @pytest.fixture
        def store(self): ...

- :class:`BasicsContract`: set and get; ids, sources, clients and times round trip;
- :class:`OrderingContract`: precedence, arrival order, times across eras;
- :class:`HistoryContract`: newest first, pages and cursors;
- :class:`ImportsContract`: ``import_events``, ``import_rows``, ``events``, ``rows``
  and ``count_events``;
- :class:`IdempotencyContract`: ``Idempotency-Key`` replays and refusals;
- :class:`LifecycleContract`: ``check``, ``close`` and reopening;
- :class:`ConcurrencyContract`: one store shared by threads;
- :class:`FeedContract`: the change feed (``changes``, ``prune_changes``,
  ``rebuild_changes``) and the deliverer's state (``load_state``, ``save_state``),
  itself the combination of

  - :class:`ChangesContract`: which writes are changes, and their versions;
  - :class:`ImportedChangesContract`: the changes an import makes;
  - :class:`CursorsContract`: pages and cursors (a backend whose cursors are not
    ``encode_cursor("<generation>.<seq>")`` overrides
    :meth:`CursorsContract.cursor_past_the_end`);
  - :class:`RetentionContract`: ``prune_changes`` and ``rebuild_changes``;
  - :class:`StateContract`: ``load_state``, ``save_state`` and its compare-and-set;
  - :class:`TailingContract`: a reader tailing the feed while threads write;
- :class:`ModelContract`: a hypothesis state machine against a plain dict.

:func:`store_state_machine` is also usable on its own, with any settings.

What the suite holds a store to (see :class:`~optin_service.storage.OptInStore`):

- every ``set`` records an event; an event already stored (same member, time
  and request id) is skipped, even if its status or source differ;
- the current state is the event with the greatest
  :attr:`~optin_service.storage.OptInRecord.precedence` (newest, then
  ``declined``, then the greater request id): it depends on which events are
  stored, never on the order they arrived in;
- history is newest first by :attr:`~optin_service.storage.OptInRecord.position`,
  and a cursor is a position, so pages stay exact while events arrive;
- an ``Idempotency-Key`` replays (same fingerprint) or is refused (another
  fingerprint) per member, writing nothing either way;
- every event that becomes its member's state appends one change (versions 1, 2,
  3... per member), and nothing else does; an import applies each member's events
  oldest first; the feed reads in commit order, so a reader tailing it while
  writers run sees each change once, in the order a later reader sees them.

Every test uses only the public :class:`~optin_service.storage.OptInStore` API;
each mixin's tests may use any of its methods, not only the ones the mixin is
named for (an import test reads ``history``, for instance).

This package imports pytest and hypothesis, which are test dependencies: import
it from tests only, never from the service.
"""

from __future__ import annotations

from optin_service.testing._helpers import LONG_IDS, TRICKY_IDS
from optin_service.testing.basics import BasicsContract
from optin_service.testing.concurrency import ConcurrencyContract
from optin_service.testing.feed import (
    ChangesContract,
    CursorsContract,
    FeedContract,
    ImportedChangesContract,
    RetentionContract,
    StateContract,
    TailingContract,
)
from optin_service.testing.history import HistoryContract
from optin_service.testing.idempotency import IdempotencyContract
from optin_service.testing.imports import ImportsContract
from optin_service.testing.lifecycle import LifecycleContract
from optin_service.testing.model import STATE_MACHINE_SETTINGS, ModelContract, store_state_machine
from optin_service.testing.ordering import OrderingContract

__all__ = [
    "LONG_IDS",
    "STATE_MACHINE_SETTINGS",
    "TRICKY_IDS",
    "BasicsContract",
    "ChangesContract",
    "ConcurrencyContract",
    "CursorsContract",
    "FeedContract",
    "HistoryContract",
    "IdempotencyContract",
    "ImportedChangesContract",
    "ImportsContract",
    "LifecycleContract",
    "ModelContract",
    "OrderingContract",
    "RetentionContract",
    "StateContract",
    "StoreContract",
    "TailingContract",
    "store_state_machine",
]


class StoreContract(
    BasicsContract,
    OrderingContract,
    HistoryContract,
    ImportsContract,
    IdempotencyContract,
    LifecycleContract,
    ConcurrencyContract,
    FeedContract,
    ModelContract,
):
    """What every store must do: all the mixins. Subclass as ``Test...`` and supply a
    ``store`` fixture."""
