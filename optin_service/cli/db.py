"""``optin db upgrade``: the store's own tables, brought to what this release needs."""

from __future__ import annotations

import click
from flask.cli import AppGroup

from ._helpers import _store

__all__ = ["db_group", "upgrade_command"]


@click.group("db", cls=AppGroup)
def db_group() -> None:
    """The store's own tables: upgrade them for a newer release."""


@db_group.command("upgrade")
def upgrade_command() -> None:
    """Bring the store's schema to what this release needs (stores that have a schema:
    their ``upgrade()`` applies it and returns the version before and after)."""
    store = _store()
    upgrade = getattr(store, "upgrade", None)
    if upgrade is None:
        click.echo(f"{type(store).__name__} has no schema to upgrade", err=True)
        return
    before, after = upgrade()
    if before == after:
        click.echo(f"schema version {after}: up to date", err=True)
    else:
        click.echo(f"schema upgraded from version {before} to {after}", err=True)
