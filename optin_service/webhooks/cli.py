"""``optin webhooks run|status|enable|replay``: the deliverer and its controls.

Every command acts through the store, so it reaches a deliverer running in
another process (or on another host): ``enable`` and ``replay`` change the
stored state, which the deliverer reads before each change it sends.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from typing import Any

import click
from flask import current_app

from ..feed import CursorExpired, CursorInvalid
from ..formats import format_time
from ..registry import redact
from ..storage import OptInStore
from . import state
from .config import WebhookSettings
from .deliverer import LEASE_SECONDS, Deliverer, utc
from .metrics import WebhookMetrics


def _store() -> OptInStore:
    return current_app.extensions["optin"].store


@click.group("webhooks")
def webhooks() -> None:
    """Push every change of the feed to OPTIN_WEBHOOK_URL, signed, in order."""


@webhooks.command("run")
@click.option(
    "--start",
    type=click.Choice(["oldest", "now"]),
    default="oldest",
    show_default=True,
    help="Where to begin when no position is stored yet: the oldest change kept, or "
    "the feed's end (skip what is already there).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus metrics on this port (default: not served).",
)
@click.option(
    "--metrics-address",
    default="127.0.0.1",
    show_default=True,
    help="The address the metrics port listens on.",
)
@click.option(
    "--lease-seconds",
    type=click.FloatRange(1, 60),
    default=LEASE_SECONDS,
    show_default=True,
    help="How long the lease outlives its holder: a standby takes over within 1.25 times this.",
)
def run_command(
    start: str, metrics_port: int | None, metrics_address: str, lease_seconds: float
) -> None:
    """Deliver changes until stopped (SIGTERM or Ctrl-C). Run it beside gunicorn; run
    several for failover: one delivers, the others stand by."""
    try:
        settings = WebhookSettings.from_config(current_app.config)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    # `optin` quiets the service's start-up lines; the deliverer's own lines are its output.
    logging.getLogger("optin_service.webhooks").setLevel(logging.INFO)
    metrics = WebhookMetrics()
    if metrics_port is not None:
        try:
            metrics.serve(metrics_port, metrics_address)
        except OSError as exc:
            raise click.ClickException(
                f"metrics: cannot listen on {metrics_address}:{metrics_port}: {exc.strerror}"
            ) from None
    deliverer = Deliverer(
        _store(), settings, start=start, lease_seconds=lease_seconds, metrics=metrics
    )

    def stop(signum: int, frame: Any) -> None:
        # From another thread: the handler runs on the main thread, which may be
        # inside the very Event.wait that stop() sets (its lock is not reentrant).
        threading.Thread(target=deliverer.stop).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    deliverer.run()


@webhooks.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status_command(as_json: bool) -> None:
    """Position, lag, retries, failures, disabled or not, lease holder."""
    report = status(_store(), current_app.config.get("OPTIN_WEBHOOK_URL") or "")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(_text(report))


@webhooks.command("enable")
def enable_command() -> None:
    """Resume delivery after a 410, from the change that got it."""
    store = _store()
    disabled = store.load_state(state.DISABLED)
    if disabled is None:
        click.echo("the webhook endpoint is not disabled")
        return
    if not store.save_state(state.DISABLED, None, expected=disabled):
        raise click.ClickException("the disabled state changed meanwhile; run enable again")
    record = _loads(disabled)
    click.echo(
        "webhook endpoint enabled; delivery resumes with "
        f"{record.get('webhookId', 'the change that got the 410')}"
    )


@webhooks.command("replay")
@click.option("--after", "cursor", help="Send again every change after this cursor.")
@click.option("--from-start", is_flag=True, help="Send again from the oldest change kept.")
def replay_command(cursor: str | None, from_start: bool) -> None:
    """Send changes again, from a cursor, with the same webhook ids as before.

    The cursor is one the feed gave out (a change's cursor in `status`, a page's
    `next`); a running deliverer follows within a second or two.
    """
    if (cursor is None) == (not from_start):
        raise click.UsageError("give exactly one of --after CURSOR or --from-start")
    store = _store()
    if cursor is not None:
        try:
            store.changes(cursor, 1)
        except CursorInvalid as exc:
            raise click.BadParameter(str(exc), param_hint="'--after'") from None
        except CursorExpired as exc:
            raise click.ClickException(
                f"--after: {exc}; use a newer cursor or --from-start"
            ) from None
    position = state.FROM_START if cursor is None else cursor
    state.move_position(store, position)
    where = "the oldest change kept" if cursor is None else f"after {cursor}"
    click.echo(f"webhook delivery replays from {where}")
    if store.load_state(state.DISABLED) is not None:
        click.echo("note: the endpoint is disabled; nothing is sent until `optin webhooks enable`")


# --- status ---------------------------------------------------------------------------


def status(store: OptInStore, url: str) -> dict[str, Any]:
    """The delivery state as one JSON-ready object."""
    now = time.time()
    position = store.load_state(state.POSITION)
    report: dict[str, Any] = {
        "url": redact(url) if url else None,
        "disabled": state.load_json(store, state.DISABLED),
        "position": position,
        "waiting": None,
        "oldestUndelivered": None,
        "positionError": None,
        "retrying": state.load_json(store, state.RETRY),
        "failed": state.load_json(store, state.FAILED) or [],
        "lease": None,
    }
    try:
        waiting, oldest = _lag(store, None if position is None else state.cursor_of(position))
        report["waiting"] = waiting
        if oldest is not None:
            at = oldest.pop("at")
            report["oldestUndelivered"] = {**oldest, "ageSeconds": round(now - at, 3)}
    except (CursorExpired, CursorInvalid) as exc:
        report["positionError"] = str(exc)
    lease = state.lease_info(store)
    if lease is not None:
        holder, expires = lease
        report["lease"] = {"holder": holder, "expires": expires, "live": expires > now}
    return report


def _lag(store: OptInStore, after: str | None) -> tuple[int, dict[str, Any] | None]:
    """How many changes follow ``after``, and the first of them."""
    count, first = 0, None
    while (page := store.changes(after, 1000)).changes:
        if first is None:
            change = page.changes[0]
            first = {
                "cursor": change.cursor,
                "correlationId": change.event.correlation_id,
                "version": change.version,
                "updatedAt": format_time(change.event.updated_at),
                "at": change.event.updated_at.timestamp(),
            }
        count += len(page.changes)
        after = page.changes[-1].cursor
    return count, first


def _text(report: dict[str, Any]) -> str:
    lines = [f"endpoint: {report['url'] or '(OPTIN_WEBHOOK_URL not set)'}"]
    disabled = report["disabled"]
    if disabled:
        lines.append(
            f"DISABLED since {utc(disabled.get('at', 0))}: the receiver answered 410 to "
            f"{disabled.get('webhookId')}; `optin webhooks enable` resumes from that change"
        )
    else:
        lines.append("enabled")
    position = report["position"]
    shown = {None: "none stored (no deliverer has run)", state.FROM_START: "the feed's start"}
    lines.append(f"position: {shown.get(position, position)}")
    if report["positionError"]:
        lines.append(
            f"position unusable: {report['positionError']}; choose where to resume with "
            "`optin webhooks replay`"
        )
    else:
        oldest = report["oldestUndelivered"]
        age = f", oldest {oldest['ageSeconds']:.0f} s old" if oldest else ""
        lines.append(f"waiting: {report['waiting']} changes{age}")
    retry = report["retrying"]
    if retry:
        lines.append(
            f"retrying: {retry.get('webhookId')} ({retry.get('correlationId')} "
            f"v{retry.get('version')}), {retry.get('attempts')} attempts, last error "
            f"{retry.get('lastError')}, next at {utc(retry.get('nextAttempt', 0))}"
        )
    failed = report["failed"]
    lines.append(f"failed: {len(failed)}" + (" (most recent last)" if failed else ""))
    for entry in failed[-10:]:
        after = entry.get("position")
        resend = "--from-start" if after == state.FROM_START else f"--after {after}"
        lines.append(
            f"  {utc(entry.get('failedAt', 0))} {entry.get('webhookId')} "
            f"{entry.get('correlationId')} v{entry.get('version')}: {entry.get('lastError')} "
            f"after {entry.get('attempts')} attempts (to resend: replay {resend})"
        )
    lease = report["lease"]
    if lease is None:
        lines.append("lease: free (no deliverer running)")
    else:
        state_word = "until" if lease["live"] else "expired"
        lines.append(f"lease: {lease['holder']} {state_word} {utc(lease['expires'])}")
    return "\n".join(lines)


def _loads(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
