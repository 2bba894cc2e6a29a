"""The deliverer's state: ``load_state`` and ``save_state``, its compare-and-set, and one
winner among threads racing for it."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from optin_service.storage import OptInStore

__all__ = ["StateContract"]


class StateContract:
    """Named strings a store keeps for the webhook deliverer (its position, its lease):
    saved, replaced, deleted, and compared-and-set atomically."""

    def test_save_state_and_load_state(self, store: OptInStore) -> None:
        assert store.load_state("position") is None
        assert store.save_state("position", "abc") is True
        assert store.load_state("position") == "abc"
        assert store.save_state("position", "é" * 300) is True
        assert store.load_state("position") == "é" * 300
        assert store.save_state("lease", "") is True
        assert store.load_state("lease") == ""
        assert store.load_state("position") == "é" * 300
        assert store.save_state("position", None) is True
        assert store.load_state("position") is None
        assert store.save_state("position", None) is True  # deleting nothing
        store.close()
        assert store.load_state("lease") == ""

    def test_save_state_compare_and_set(self, store: OptInStore) -> None:
        # expected=None: only if absent.
        assert store.save_state("k", "v1", expected=None) is True
        assert store.save_state("k", "v2", expected=None) is False
        assert store.load_state("k") == "v1"
        # expected=value: only if that is the stored value.
        assert store.save_state("k", "v2", expected="v0") is False
        assert store.save_state("k", "v2", expected="") is False
        assert store.load_state("k") == "v1"
        assert store.save_state("k", "v2", expected="v1") is True
        assert store.save_state("k", "v2", expected="v2") is True  # the same value again
        assert store.load_state("k") == "v2"
        # Deleting, with and without an expected value.
        assert store.save_state("k", None, expected="v1") is False
        assert store.load_state("k") == "v2"
        assert store.save_state("k", None, expected="v2") is True
        assert store.load_state("k") is None
        assert store.save_state("k", None, expected="v2") is False
        assert store.save_state("k", None, expected=None) is True
        assert store.save_state("k", "", expected="") is False  # "" is a value, not absence
        assert store.load_state("k") is None

    def test_save_state_compare_and_set_has_one_winner_among_threads(
        self, store: OptInStore
    ) -> None:
        threads, expected = 8, None
        barrier = threading.Barrier(threads)
        with ThreadPoolExecutor(threads) as pool:
            for round_ in range(4):

                def attempt(t: int, round_: int = round_, expected: str | None = expected) -> bool:
                    barrier.wait()
                    return store.save_state("lease", f"{round_}-{t}", expected=expected)

                won = list(pool.map(attempt, range(threads)))
                assert won.count(True) == 1, won
                expected = f"{round_}-{won.index(True)}"
                assert store.load_state("lease") == expected
