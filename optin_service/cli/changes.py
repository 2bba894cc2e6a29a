"""``optin changes list|rebuild|prune``: read the change feed, rebuild it, prune it."""

from __future__ import annotations

import json

import click
from flask.cli import AppGroup

from ..feed import CursorExpired, CursorInvalid
from ..formats import format_time
from ..retention import cutoff
from ..schemas import dump_change
from ._helpers import _store

__all__ = [
    "changes_group",
    "changes_list_command",
    "changes_prune_command",
    "changes_rebuild_command",
]


@click.group("changes", cls=AppGroup)
def changes_group() -> None:
    """Read, rebuild or prune the change feed (what GET /client/optin/changes serves)."""


@changes_group.command("list")
@click.option("--after", help="The cursor to read on from (a change's or a page's next).")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Changes to print at most.",
)
def changes_list_command(after: str | None, limit: int) -> None:
    """Print changes in commit order, one JSON object per line, then the cursor to pass
    as --after next time as the last line of stderr (the same cursor again when there
    is nothing new)."""
    try:
        page = _store().changes(after, limit)
    except CursorInvalid:
        raise click.BadParameter(
            "not a cursor this store gave out", param_hint="'--after'"
        ) from None
    except CursorExpired:
        raise click.ClickException(
            "the changes after this cursor are no longer kept (retention, or the feed was "
            "rebuilt): read the feed again from the start, without --after"
        ) from None
    for change in page.changes:
        click.echo(json.dumps(dump_change(change), separators=(",", ":")))
    click.echo(page.next, err=True)


@changes_group.command("rebuild")
def changes_rebuild_command() -> None:
    """Replace the feed with one made from the events: each member's events oldest
    first, each a change (versions from 1). Every earlier cursor expires (410).

    A maintenance command: stop the writers first (gunicorn, imports); a change
    written while it runs may be missing from the rebuilt feed on some backends.
    """
    count = _store().rebuild_changes()
    click.echo(f"rebuilt the change feed: {count} changes; every earlier cursor has expired")


@changes_group.command("prune")
@click.option(
    "--days",
    # 0 (every change) is refused: OPTIN_CHANGES_RETENTION=0 means "keep them all".
    type=click.IntRange(min=1),
    required=True,
    help="Remove the changes appended more than this many days ago (1 or more).",
)
def changes_prune_command(days: int) -> None:
    """Remove old changes now, once (OPTIN_CHANGES_RETENTION does it as the service runs).
    A reader whose cursor points into them gets 410 CURSOR_EXPIRED; events stay."""
    before = cutoff(days)
    removed = _store().prune_changes(before)
    click.echo(f"removed {removed} changes appended before {format_time(before)}")
