"""The ``optin`` command line: read and write records, export, import, migrate; the
change feed (``optin changes``) and its webhooks (``optin webhooks``); the store's schema
(``optin db upgrade``).

Available as ``flask --app optin_service optin ...`` (and on any app that
mounts :class:`~optin_service.OptIn`) and as the console script ``optin``.
It uses the store of the app, so it reads ``OPTIN_STORAGE_URL`` like the service.
Progress bars show on a terminal and stay quiet when output is piped.

The group is here; its commands are in one module per concern: :mod:`.records`
(``get``, ``set``), :mod:`.transfer` (``export``, ``import``, ``migrate``),
:mod:`.changes` (``changes list|rebuild|prune``), :mod:`.db` (``db upgrade``), and
:mod:`optin_service.webhooks.cli` (``webhooks ...``). Each command is wrapped in
``with_appcontext`` as :class:`~flask.cli.AppGroup` wraps the commands it makes, and
the ``db`` and ``changes`` groups are ``AppGroup`` too.
"""

from __future__ import annotations

from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup, with_appcontext

from ..storage import StorageError
from ..version import __version__
from ..webhooks.cli import webhooks
from .changes import (
    changes_group,
    changes_list_command,
    changes_prune_command,
    changes_rebuild_command,
)
from .db import db_group, upgrade_command
from .records import get_command, set_command
from .transfer import export_command, import_command, migrate_command

__all__ = [
    "changes_group",
    "changes_list_command",
    "changes_prune_command",
    "changes_rebuild_command",
    "db_group",
    "export_command",
    "get_command",
    "import_command",
    "migrate_command",
    "optin",
    "set_command",
    "upgrade_command",
]


class _OptInGroup(AppGroup):
    """Storage that fails (unreachable, read-only) ends a command with one
    ``Error:`` line and exit code 1, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StorageError as exc:
            raise click.ClickException(f"storage: {exc}") from None


@click.group("optin", cls=_OptInGroup)
@click.version_option(__version__, prog_name="optin-service")
@with_appcontext
def optin() -> None:
    """Read and write opt-in records; export, import, migrate; upgrade the schema."""
    # Which store a command uses is never a guess: one line on stderr, first
    # (stdout stays the command's own output).
    click.echo(f"opt-in storage: {current_app.extensions['optin'].store_name}", err=True)


optin.add_command(get_command)
optin.add_command(set_command)
optin.add_command(export_command)
optin.add_command(import_command)
optin.add_command(migrate_command)
optin.add_command(db_group)
optin.add_command(changes_group)
optin.add_command(webhooks)
