"""The delivery loop: every change of the feed, in order, at least once.

Invariants:

- Only the lease holder sends (:class:`~.state.Lease`, renewed by a heartbeat
  thread, so a slow receiver never lets it lapse while this process lives).
- The stored position moves past a change only after a 2xx for it (or once its
  retries ran out and it is recorded in :data:`~.state.FAILED`), with
  compare-and-set from the value read: a replay or another deliverer that moved
  it is noticed and followed, never overwritten. A crash at any moment therefore
  loses nothing; at most the change in flight is sent again, under the same id.
- A change is tried until it succeeds, gets a 410, or its retries run out; the
  changes behind it wait (the order is the feed's).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any

from ..feed import Change, CursorExpired, CursorInvalid
from ..formats import format_time
from ..logs import OncePer
from ..registry import redact
from ..storage import OptInStore, StorageError
from . import state
from .config import WebhookSettings
from .message import Sender, payload, webhook_id
from .metrics import WebhookMetrics

log = logging.getLogger("optin_service.webhooks")
#: Storage failures repeat every poll while the store is down: one line a minute of each.
storage_log = logging.getLogger("optin_service.webhooks.storage")
storage_log.addFilter(OncePer(60.0))

#: Default seconds a lease lasts unrenewed: a dead holder's successor starts within
#: this plus a quarter of it (the standby's polling), 25 s.
LEASE_SECONDS = 20.0
#: Changes read per page of the feed.
BATCH = 100
#: Seconds between two counts of the changes waiting (for the metrics), and the most
#: changes one count reads: a large backlog is counted over several rounds rather
#: than holding up delivery.
LAG_SECONDS = 5.0
LAG_READ = 50_000


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    FAILED = "failed"  # retries ran out: recorded, and delivery moves on
    GONE = "gone"  # 410: the endpoint is disabled, the change stays undelivered
    INTERRUPTED = "interrupted"  # stopping, lease lost, or the position was moved


class Deliverer:
    """Pushes the store's change feed to one receiver. :meth:`run` blocks until
    :meth:`stop` (from a signal handler's thread or another thread)."""

    def __init__(
        self,
        store: OptInStore,
        settings: WebhookSettings,
        *,
        start: str = "oldest",
        lease_seconds: float = LEASE_SECONDS,
        poll_seconds: float = 1.0,
        batch: int = BATCH,
        holder: str | None = None,
        metrics: WebhookMetrics | None = None,
    ) -> None:
        if start not in ("oldest", "now"):
            raise ValueError(f"start must be 'oldest' or 'now', not {start!r}")
        self.store = store
        self.settings = settings
        self.start = start
        self.poll_seconds = poll_seconds
        self.batch = batch
        self.lease = state.Lease(store, holder or state.holder_name(), lease_seconds)
        self.sender = Sender(settings)
        self.metrics = metrics or WebhookMetrics()
        self._lag = _Lag()
        self.metrics.watch(lambda: self._lag.ahead, lambda: self._lag.head, lambda: self.lease.held)
        self._stop = threading.Event()
        self._done = threading.Event()  # run() has returned: the heartbeat ends too
        self._acquired = threading.Event()
        self._disabled: str | None = None  # the DISABLED value last seen
        self._expired: str | None = None  # a position found expired (logged once)
        self._retried = False  # the change in hand has a stored retry state to clear

    # --- the process ---------------------------------------------------------------

    def run(self) -> None:
        """Deliver until :meth:`stop`; then give the lease up."""
        log.info(
            "webhook deliverer %s started for %s (retries after %s s)",
            self.lease.holder,
            redact(self.settings.url),
            ",".join(f"{s:g}" for s in self.settings.schedule) or "none",
        )
        heartbeat = threading.Thread(target=self._heartbeat, name="optin-webhooks-lease")
        heartbeat.daemon = True
        heartbeat.start()
        try:
            while not self._stop.is_set():
                try:
                    if self.lease.held:
                        self._step()
                    else:
                        self._standby()
                except StorageError as exc:
                    storage_log.warning("webhook deliverer: storage failed (%s); retrying", exc)
                    self._stop.wait(self.poll_seconds)
        finally:
            self._stop.set()
            self._done.set()
            heartbeat.join()
            try:
                self.lease.release()
            except StorageError:
                pass  # it expires by itself
            self.sender.close()
            log.info("webhook deliverer %s stopped", self.lease.holder)

    def stop(self) -> None:
        """Ask :meth:`run` to return: a request in flight completes (and its change's
        position is saved) first."""
        self._stop.set()

    def _heartbeat(self) -> None:
        """Take the lease when free, then renew it every quarter of its TTL, until
        :meth:`run` returns (so a last request after :meth:`stop` is still covered)."""
        interval = self.lease.ttl / 4
        had = False
        while not self._done.is_set():
            try:
                if self._stop.is_set() and not had:
                    has = False  # stopping: take nothing new
                else:
                    has = self.lease.renew() if had else self.lease.acquire()
            except StorageError as exc:
                storage_log.warning("webhook lease: storage failed (%s)", exc)
                has = self.lease.held
            except Exception:  # a dead heartbeat would leave this deliverer idle for good
                log.exception("webhook lease: unexpected error")
                has = self.lease.held
            if has and not had:
                log.info("webhook deliverer %s holds the lease: delivering", self.lease.holder)
                self._acquired.set()
            elif had and not has:
                log.warning("webhook deliverer %s lost the lease: standing by", self.lease.holder)
            had = has
            self._done.wait(interval)

    def _standby(self) -> None:
        """Wait for the lease; keep the lag metrics current meanwhile."""
        self._lag_refresh(self.store.load_state(state.POSITION))
        self._acquired.wait(self.poll_seconds)
        self._acquired.clear()

    # --- one round: read a page after the position, deliver it in order ------------

    def _step(self) -> None:
        position = self._position()
        if self._is_disabled():
            self._lag_refresh(position)
            self._stop.wait(self.poll_seconds)
            return
        try:
            page = self.store.changes(state.cursor_of(position), self.batch)
        except (CursorExpired, CursorInvalid) as exc:
            self._position_unusable(position, exc)
            return
        if self._expired is not None:
            self._expired = None
            self.metrics.stalled.set(0)
        self._lag_refresh(position)
        if not page.changes:
            self._stop.wait(self.poll_seconds)
            return
        for change in page.changes:
            self._lag.head = change.event.updated_at.timestamp()
            outcome = self._deliver(change, position)
            if outcome in (Outcome.INTERRUPTED, Outcome.GONE):
                return
            if not self.store.save_state(state.POSITION, change.cursor, expected=position):
                log.info("webhook position was moved (a replay, or another deliverer): following")
                return
            if self._retried:
                state.save_json(self.store, state.RETRY, None)
            position = change.cursor
            self._lag.advanced(position)

    def _position(self) -> str:
        """The stored position; the first deliverer stores where to start."""
        while True:
            stored = self.store.load_state(state.POSITION)
            if stored is not None:
                return stored
            start = state.FROM_START if self.start == "oldest" else self._end_of_feed()
            if self.store.save_state(state.POSITION, start, expected=None):
                where = "the oldest change kept" if start == state.FROM_START else "the feed's end"
                log.info("webhook deliverer: no stored position; starting at %s", where)
                return start

    def _end_of_feed(self) -> str:
        after = None
        while True:
            page = self.store.changes(after, 1000)
            if not page.changes:
                # An empty feed: the start is the end (and stays valid after pruning).
                return state.FROM_START if after is None else after
            after = page.changes[-1].cursor

    def _is_disabled(self) -> bool:
        disabled = self.store.load_state(state.DISABLED)
        if disabled != self._disabled:
            if disabled is not None:
                log.error(
                    "webhook endpoint is disabled (it answered 410 Gone): nothing is sent "
                    "until `optin webhooks enable`; %s",
                    disabled,
                )
            elif self._disabled is not None:
                log.info("webhook endpoint enabled again: resuming delivery")
            self._disabled = disabled
            self.metrics.disabled.set(0 if disabled is None else 1)
        return disabled is not None

    def _position_unusable(self, position: str, exc: Exception) -> None:
        """The stored position is expired (retention, a rebuild) or not a cursor:
        nothing is skipped silently; an operator chooses with ``replay``."""
        if self._expired != position:
            log.error(
                "webhook position %s cannot be read on (%s): delivery is stopped; choose where "
                "to resume with `optin webhooks replay --after CURSOR` or `--from-start`",
                position,
                exc,
            )
            self._expired = position
            self.metrics.stalled.set(1)
        self._stop.wait(self.poll_seconds)

    # --- one change -----------------------------------------------------------------

    def _deliver(self, change: Change, position: str) -> Outcome:
        """Attempt ``change`` per the schedule (resuming a schedule a previous holder
        began); record what came of it."""
        msg_id, body = webhook_id(change), payload(change)
        attempts, first, next_at = self._resumed(msg_id, position)
        self._retried = attempts > 0
        while True:
            if next_at is not None and not self._wait_until(next_at, position):
                return Outcome.INTERRUPTED
            if self._stop.is_set() or not self.lease.held:
                return Outcome.INTERRUPTED
            result = self.sender.send(msg_id, body)
            attempts += 1
            if result.delivered:
                self.metrics.count("delivered")
                log.debug("webhook %s delivered (HTTP %s)", msg_id, result.status)
                return Outcome.DELIVERED
            if result.gone:
                self.metrics.count("disabled")
                self._disable(change, msg_id, position)
                return Outcome.GONE
            if attempts > len(self.settings.schedule):
                self.metrics.count("failed")
                self._fail(change, msg_id, position, attempts, first, result.error)
                return Outcome.FAILED
            self.metrics.count("retried")
            delay = self.settings.schedule[attempts - 1]
            next_at = time.time() + delay
            record = _describe(change, msg_id) | {
                "position": position,
                "attempts": attempts,
                "firstAttempt": first,
                "lastError": result.error,
                "nextAttempt": next_at,
            }
            state.save_json(self.store, state.RETRY, record)
            self._retried = True
            log.warning(
                "webhook %s attempt %d failed (%s); retry in %g s",
                msg_id,
                attempts,
                result.error,
                delay,
            )

    def _resumed(self, msg_id: str, position: str) -> tuple[int, float, float | None]:
        """``(attempts made, first attempt's time, next attempt's time)`` for the change
        after ``position``: from the stored retry state if it is this change's."""
        retry = state.load_json(self.store, state.RETRY)
        if (
            isinstance(retry, dict)
            and retry.get("webhookId") == msg_id
            and retry.get("position") == position
        ):
            try:
                attempts, first = int(retry["attempts"]), float(retry["firstAttempt"])
                return attempts, first, float(retry["nextAttempt"])
            except (KeyError, TypeError, ValueError):
                pass
        return 0, time.time(), None

    def _wait_until(self, deadline: float, position: str) -> bool:
        """Sleep until ``deadline`` (Unix time); ``False`` as soon as this deliverer
        is stopping, loses the lease, or the position is moved (a replay)."""
        check = min(self.lease.ttl / 4, 5.0)
        while (remaining := deadline - time.time()) > 0:
            if self._stop.wait(min(remaining, check)) or not self.lease.held:
                return False
            if self.store.load_state(state.POSITION) != position:
                log.info("webhook position was moved while waiting to retry: following")
                return False
        return True

    def _fail(
        self,
        change: Change,
        msg_id: str,
        position: str,
        attempts: int,
        first: float,
        error: str | None,
    ) -> None:
        # ``position`` (the cursor before the change) is what `replay --after` takes to
        # send it again.
        entry = _describe(change, msg_id) | {
            "position": position,
            "attempts": attempts,
            "firstAttempt": first,
            "failedAt": time.time(),
            "lastError": error,
        }
        state.add_failure(self.store, entry)
        log.error(
            "webhook %s failed for good after %d attempts (last: %s); moving on. "
            "Recorded in `optin webhooks status`",
            msg_id,
            attempts,
            error,
        )

    def _disable(self, change: Change, msg_id: str, position: str) -> None:
        record = _describe(change, msg_id) | {"position": position, "at": time.time()}
        state.save_json(self.store, state.DISABLED, record)
        state.save_json(self.store, state.RETRY, None)
        self._retried = False
        self._is_disabled()  # logs it, sets the gauge

    # --- lag ------------------------------------------------------------------------

    def _lag_refresh(self, position: str | None) -> None:
        try:
            self._lag.refresh(self.store, position)
        except (CursorExpired, CursorInvalid):
            self._lag.reset()


class _Lag:
    """How many changes wait after the position, counted incrementally: a full count
    only when the position moves by other means than this deliverer's advances
    (start, replay, takeover). Invariant: ``ahead`` changes lie in (position, tail]."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.base: str | None = None
        self.tail: str | None = None
        self.ahead = 0
        #: The oldest undelivered change's ``updatedAt`` (Unix time), ``None`` if none.
        self.head: float | None = None
        self._counted = 0.0

    def refresh(self, store: OptInStore, position: str | None) -> None:
        now = time.monotonic()
        if position is None:
            return
        if position != self.base:
            self.reset()
            self.base, self.tail = position, state.cursor_of(position)
        elif now - self._counted < LAG_SECONDS:
            return
        self._counted = now
        for _ in range(LAG_READ // 1000):
            page = store.changes(self.tail, 1000)
            if not page.changes:
                break
            if self.ahead == 0:
                self.head = page.changes[0].event.updated_at.timestamp()
            self.ahead += len(page.changes)
            self.tail = page.changes[-1].cursor

    def advanced(self, position: str) -> None:
        """This deliverer moved the position one change on."""
        self.base = position
        if self.ahead > 0:
            self.ahead -= 1
        else:
            self.tail = position
        if self.ahead == 0:
            self.head = None


def _describe(change: Change, msg_id: str) -> dict[str, Any]:
    """A change as the delivery state records it."""
    return {
        "webhookId": msg_id,
        "cursor": change.cursor,
        "correlationId": change.event.correlation_id,
        "version": change.version,
        "updatedAt": format_time(change.event.updated_at),
    }


def utc(seconds: float) -> str:
    """Unix time as ``2026-11-26T12:00:00Z`` (for ``status``)."""
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
