"""``optin get`` and ``optin set``: one member's record, read or written."""

from __future__ import annotations

import uuid

import click
from flask.cli import with_appcontext

from ..formats import CORRELATION_ID, SOURCE
from ..storage import STATUSES, OptInRecord
from ._helpers import _check, _line, _store

__all__ = ["get_command", "set_command"]


@click.command("get")
@with_appcontext
@click.argument("correlation_id")
def get_command(correlation_id: str) -> None:
    """Print a member's current state as JSON."""
    record = _store().get(_check(correlation_id, CORRELATION_ID, "correlation id"))
    if record is None:
        raise click.ClickException(f"no opt-in recorded for {correlation_id}")
    click.echo(_line(record))


@click.command("set")
@with_appcontext
@click.argument("correlation_id")
@click.argument("status", type=click.Choice(STATUSES))
@click.option(
    "--source", default="CLI", show_default=True, help="The channel, as X-Consent-Source."
)
def set_command(correlation_id: str, status: str, source: str) -> None:
    """Record a member's answer now, as a new event; print the current state."""
    _check(correlation_id, CORRELATION_ID, "correlation id")
    _check(source, SOURCE, "source (1 to 32 of A-Z a-z 0-9 _ -)")
    record = OptInRecord.now(correlation_id, status, str(uuid.uuid4()), source)  # type: ignore[arg-type]
    click.echo(_line(_store().set(record)))
