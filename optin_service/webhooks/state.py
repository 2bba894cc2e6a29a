"""The delivery state, kept in the store (``load_state``/``save_state``), so any
deliverer process can resume it and ``optin webhooks ...`` commands can change it.

Keys, each a JSON or plain string value:

- :data:`POSITION`: the cursor of the last change handled (delivered, or failed
  for good); :data:`FROM_START` for "from the oldest change kept"; absent until a
  deliverer first runs. Written with compare-and-set from the value read, so a
  replay or another deliverer's write is noticed, never overwritten.
- :data:`LEASE`: ``{"holder", "expires"}``; who may deliver, until when (Unix time).
- :data:`DISABLED`: set when the receiver answered 410; what and when.
- :data:`RETRY`: the change being retried: its attempts so far and the next one's
  time, so a deliverer that takes over keeps to the schedule.
- :data:`FAILED`: the last :data:`MAX_FAILED` changes whose retries ran out.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ..storage import OptInStore

POSITION = "webhooks.position"
LEASE = "webhooks.lease"
DISABLED = "webhooks.disabled"
RETRY = "webhooks.retry"
FAILED = "webhooks.failed"

#: A :data:`POSITION` meaning "from the oldest change kept" (``changes(after=None)``).
FROM_START = ""
#: How many failed changes :data:`FAILED` keeps (the oldest go first).
MAX_FAILED = 100
#: Compare-and-set rounds before giving up on a key another process keeps changing.
_CAS_ROUNDS = 20


def cursor_of(position: str) -> str | None:
    """The ``after`` to read the feed from for a stored :data:`POSITION`."""
    return None if position == FROM_START else position


def load_json(store: OptInStore, key: str) -> Any:
    """The JSON value under ``key``, ``None`` if absent or not JSON."""
    raw = store.load_state(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def save_json(store: OptInStore, key: str, value: Any) -> None:
    """Store ``value`` as JSON under ``key`` (``None`` deletes it), unconditionally."""
    store.save_state(key, None if value is None else _dumps(value))


def add_failure(store: OptInStore, entry: dict[str, Any]) -> None:
    """Append ``entry`` to :data:`FAILED`, keeping the last :data:`MAX_FAILED`."""
    for _ in range(_CAS_ROUNDS):
        raw = store.load_state(FAILED)
        try:
            items = json.loads(raw) if raw else []
        except ValueError:
            items = []
        items = [*items, entry][-MAX_FAILED:]
        if store.save_state(FAILED, _dumps(items), expected=raw):
            return
    raise RuntimeError(f"{FAILED} kept changing; failure not recorded: {entry}")


def move_position(store: OptInStore, position: str) -> str | None:
    """Set :data:`POSITION` to ``position`` whatever it holds (compare-and-set from the
    value read, so a deliverer saving at the same moment notices); clears
    :data:`RETRY`. Returns the position it replaced."""
    for _ in range(_CAS_ROUNDS):
        before = store.load_state(POSITION)
        if store.save_state(POSITION, position, expected=before):
            store.save_state(RETRY, None)
            return before
    raise RuntimeError(f"{POSITION} kept changing; try again")


def holder_name() -> str:
    """A lease holder's id: host, process, and a random part (a pid is reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Lease:
    """Exclusive right to deliver, kept in the store under :data:`LEASE`.

    :meth:`acquire` takes it when it is free or expired; :meth:`renew` extends it
    with compare-and-set from the value this holder wrote, so a lease taken by
    another process is noticed. :attr:`held` is judged on this process's
    monotonic clock and ends a quarter of the TTL before the stored expiry, so
    this holder stops sending before another may start. (Expiry is stored in
    Unix time: deliverers on several hosts need clocks in step, within a few
    seconds.) Thread-safe: a heartbeat thread renews while the main thread sends.
    """

    def __init__(
        self,
        store: OptInStore,
        holder: str,
        ttl: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.holder = holder
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._value: str | None = None  # what this holder last wrote, while it holds it
        self._valid_until = 0.0  # monotonic

    @property
    def held(self) -> bool:
        with self._lock:
            return self._value is not None and time.monotonic() < self._valid_until

    def acquire(self) -> bool:
        """Take the lease if it is free, expired or ours; whether this holder has it."""
        started = time.monotonic()
        raw = self.store.load_state(LEASE)
        current = _parse_lease(raw)
        if current is not None and current[0] != self.holder and current[1] > self._clock():
            self._drop()
            return False
        return self._write(raw, started)

    def renew(self) -> bool:
        """Extend the lease this holder has; ``False`` (and not held) if it was taken."""
        with self._lock:
            mine = self._value
        if mine is None:
            return False
        return self._write(mine, time.monotonic())

    def release(self) -> None:
        """Give the lease up (another deliverer may take it at once)."""
        with self._lock:
            mine, self._value = self._value, None
        if mine is not None:
            self.store.save_state(LEASE, None, expected=mine)

    def _write(self, expected: str | None, started: float) -> bool:
        value = _dumps({"holder": self.holder, "expires": round(self._clock() + self.ttl, 3)})
        if not self.store.save_state(LEASE, value, expected=expected):
            self._drop()
            return False
        with self._lock:
            self._value = value
            self._valid_until = started + self.ttl * 0.75
        return True

    def _drop(self) -> None:
        with self._lock:
            self._value = None


def _parse_lease(raw: str | None) -> tuple[str, float] | None:
    """``(holder, expires)`` from a stored lease; ``None`` if absent or unreadable
    (an unreadable lease is treated as free, and replaced with compare-and-set)."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
        return str(value["holder"]), float(value["expires"])
    except (ValueError, TypeError, KeyError):
        return None


def lease_info(store: OptInStore) -> tuple[str, float] | None:
    """``(holder, expires)`` of the stored lease, for ``status``."""
    return _parse_lease(store.load_state(LEASE))


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
