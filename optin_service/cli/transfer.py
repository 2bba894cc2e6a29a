"""``optin export``, ``optin import`` and ``optin migrate``: every event out, in, or
across to another store."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import IO

import click
from flask import current_app
from flask.cli import with_appcontext

from ..formats import SUBMICROSECOND, cut
from ..registry import redact, store_from_url
from ..schemas import load_event
from ..storage import EARLIEST, LATEST, EventRow, StorageError
from ._helpers import _line, _progress, _store
from .output import replaced_when_done

__all__ = ["export_command", "import_command", "migrate_command"]


def _parse_since(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    if SUBMICROSECOND.search(value):  # it would be cut: earlier events would pass
        raise click.BadParameter(f"{cut(value, quote=True)} has more than six fractional digits")
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{cut(value, quote=True)} is not an ISO 8601 time") from None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    if not EARLIEST <= moment <= LATEST:
        raise click.BadParameter(
            f"must be between {EARLIEST.isoformat()} and {LATEST.isoformat()} (what stores keep)"
        )
    return moment


@click.command("export")
@with_appcontext
@click.option(
    "--since",
    callback=_parse_since,
    help="Only events at or after this ISO 8601 time (UTC if no zone).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, allow_dash=True),
    default="-",
    help=(
        "File to write (default: stdout); replaced only once the export is complete, "
        "created 0600 if new. A FIFO or a device is written through."
    ),
)
def export_command(since: datetime | None, output: str) -> None:
    """Write every event as JSON Lines, streamed in constant memory."""
    store = _store()
    count = 0
    try:
        with replaced_when_done(output) as out, _progress("exporting", store.count_events) as bar:
            for record in store.events(since):
                out.write(_line(record) + "\n")
                count += 1
                if count % 1000 == 0:
                    bar.update(1000)
            bar.update(count % 1000)
    except OSError as exc:  # the disk full, the device gone: the previous file is kept
        where = "standard output" if output == "-" else output
        raise click.ClickException(f"cannot write {where}: {exc.strerror or exc}") from None
    click.echo(f"exported {count} events", err=True)


#: The longest line ``optin import`` reads (an event is a few hundred bytes): a longer
#: one is reported and skipped without being held, so memory stays bounded whatever
#: the input (``/dev/zero`` is one endless line).
MAX_LINE_BYTES = 64 * 1024


def _lines(file: IO[bytes]) -> Iterator[bytes | None]:
    """``file``'s lines, None for each one over :data:`MAX_LINE_BYTES` (read past in
    pieces of that size, never whole)."""
    while line := file.readline(MAX_LINE_BYTES + 1):
        if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
            yield line
            continue
        while not line.endswith(b"\n") and (line := file.readline(MAX_LINE_BYTES)):
            pass
        yield None


#: What to do after a failure halfway (every backend skips the events it has).
_RUN_AGAIN = (
    "what was stored before the failure stays: run the command again to complete it "
    "(events already stored are skipped)"
)


@click.command("import")
@with_appcontext
@click.argument("file", type=click.File("rb"))
def import_command(file: IO[bytes]) -> None:
    """Apply events from a JSON Lines FILE (or - for stdin).

    An event older than a member's current state goes into history only;
    events already stored are skipped, so importing a file twice changes nothing
    the second time. A malformed line is reported with its number and skipped;
    the exit code is 1 if any line failed.
    """
    store = _store()
    read = failed = 0

    def rows() -> Iterator[EventRow]:
        nonlocal read, failed
        for number, line in enumerate(_lines(file), 1):
            if line is None:
                failed += 1
                click.echo(f"line {number}: longer than {MAX_LINE_BYTES} bytes", err=True)
                continue
            if not line.strip():
                continue
            try:
                row = load_event(line).row
            except ValueError as exc:
                failed += 1
                click.echo(f"line {number}: {exc}", err=True)
                continue
            read += 1
            yield row

    try:
        added = store.import_rows(rows())
    except StorageError as exc:
        raise click.ClickException(f"storage: {exc}; {_RUN_AGAIN}") from None
    click.echo(
        f"imported {read} events: {added} new, {read - added} already present; "
        f"{failed} lines failed",
        err=True,
    )
    if failed:
        sys.exit(1)


@click.command("migrate")
@with_appcontext
@click.option("--to", "target_url", required=True, help="Storage URL to copy every event into.")
def migrate_command(target_url: str) -> None:
    """Copy every member's events to another backend, in batches; verify counts."""
    source = _store()
    try:
        target = store_from_url(target_url, current_app.config)
    except (LookupError, ValueError) as exc:  # an unknown scheme, a bad URL option
        raise click.ClickException(str(exc)) from None
    try:
        total = source.count_events()
        before = target.count_events()
        copied = 0
        started = time.monotonic()
        with _progress("migrating", lambda: total) as bar:

            def counted() -> Iterator[EventRow]:
                nonlocal copied
                for row in source.rows():
                    yield row
                    copied += 1
                    if copied % 1000 == 0:
                        bar.update(1000)

            # The target batches the stream itself (pipelines, ordered transactions).
            try:
                added = target.import_rows(counted())
            except StorageError as exc:
                raise click.ClickException(f"storage: {exc}; {_RUN_AGAIN}") from None
            bar.update(copied % 1000)
        seconds = time.monotonic() - started
        after = target.count_events()
    finally:
        target.close()
    rate = copied / seconds if seconds else 0.0
    click.echo(
        f"copied {copied} events ({added} new) to {redact(target_url)} "
        f"in {seconds:.1f} s ({rate:,.0f} events/s); target holds {after} events",
        err=True,
    )
    # Fewer read than the source held means some were missed. More is not an error: a
    # Redis SCAN may return a key twice (while its table resizes), events written to
    # the source during the copy are read too, and the target skips what it has.
    if copied < total or after != before + added:
        raise click.ClickException(
            f"count mismatch: source had {total} events, {copied} copied; "
            f"target went from {before} to {after} with {added} new"
        )
