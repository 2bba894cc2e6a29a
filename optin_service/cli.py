"""The ``optin`` command line: read and write records, export, import, migrate; the
change feed (``optin changes``) and its webhooks (``optin webhooks``); the store's schema
(``optin db upgrade``).

Available as ``flask --app optin_service optin ...`` (and on any app that
mounts :class:`~optin_service.OptIn`) and as the console script ``optin``.
It uses the store of the app, so it reads ``OPTIN_STORAGE_URL`` like the service.
Progress bars show on a terminal and stay quiet when output is piped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import IO, Any

import click
from flask import current_app
from flask.cli import AppGroup, with_appcontext

from .feed import CursorExpired, CursorInvalid
from .registry import redact, store_from_url
from .retention import cutoff
from .schemas import (
    CORRELATION_ID,
    SOURCE,
    SUBMICROSECOND,
    cut,
    dump_change,
    dump_event,
    format_time,
    load_event,
)
from .storage import (
    EARLIEST,
    LATEST,
    STATUSES,
    EventRow,
    OptInRecord,
    OptInStore,
    StorageError,
)
from .version import __version__
from .webhooks.cli import webhooks


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


def _store() -> OptInStore:
    return current_app.extensions["optin"].store


class _Quiet:
    """Stands in for a progress bar when stderr is not a terminal."""

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, steps: int) -> None:
        return None


def _progress(label: str, length: Callable[[], int]) -> Any:
    """A progress bar on stderr when it is a terminal; silence when piped."""
    if not sys.stderr.isatty():
        return _Quiet()
    return click.progressbar(length=length(), label=label, file=sys.stderr)


def _line(record: OptInRecord) -> str:
    return json.dumps(dump_event(record), separators=(",", ":"))


def _check(value: str, pattern: Any, what: str) -> str:
    if not pattern.fullmatch(value):
        raise click.BadParameter(f"{cut(value, quote=True)} is not a valid {what}")
    return value


@optin.command("get")
@click.argument("correlation_id")
def get_command(correlation_id: str) -> None:
    """Print a member's current state as JSON."""
    record = _store().get(_check(correlation_id, CORRELATION_ID, "correlation id"))
    if record is None:
        raise click.ClickException(f"no opt-in recorded for {correlation_id}")
    click.echo(_line(record))


@optin.command("set")
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


@contextlib.contextmanager
def _replaced_when_done(path: str) -> Iterator[IO[str]]:
    """``path`` to write: "-" is stdout; a FIFO or a character device (named, or reached
    through a symbolic link) is written through; a regular file, or a new one, is
    written beside it and moved over it only if the block ends without error, so a
    failed export (storage down halfway) leaves the previous file as it was. (click's
    atomic files replace it anyway.) A new file is created 0600 (an export is every
    member's consent); a replaced one keeps its mode. Nothing else is ever replaced:
    a symbolic link to a regular file, or any other kind of file, is refused."""
    if path == "-":
        with click.open_file("-", "w") as out:
            yield out
        return
    try:
        kind = os.lstat(path).st_mode
    except FileNotFoundError:
        kind = None
    except OSError as exc:
        raise _bad_output(path, exc.strerror) from None
    if kind is not None and not stat.S_ISREG(kind):
        with _written_through(path) as out:
            yield out
        return
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise _bad_output(path, exc.strerror) from None
    try:
        with open(fd, "w", encoding="utf-8") as out:
            yield out
        if kind is not None:
            shutil.copymode(path, temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def _written_through(path: str) -> Iterator[IO[str]]:
    """``path``, which is not a regular file, opened as it is if it is a FIFO or a
    character device (no O_CREAT, no O_TRUNC: the node is never created or replaced;
    the kernel's checks on following links apply)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOCTTY)
    except FileNotFoundError:  # only a link to nothing gets here
        raise _bad_output(path, f"a symbolic link to nothing; {_NAME_THE_FILE}") from None
    except OSError as exc:
        raise _bad_output(path, exc.strerror) from None
    kind = os.fstat(fd).st_mode
    if not (stat.S_ISFIFO(kind) or stat.S_ISCHR(kind)):
        os.close(fd)
        what = "a symbolic link to a regular file" if stat.S_ISREG(kind) else "not a file"
        raise _bad_output(path, f"{what}; {_NAME_THE_FILE}")
    with open(fd, "w", encoding="utf-8") as out:
        yield out


_NAME_THE_FILE = "name the file itself, which is replaced once the export is complete"


def _bad_output(path: str, reason: str | None) -> click.BadParameter:
    return click.BadParameter(f"{path!r}: {reason}", param_hint="'-o'")


@optin.command("export")
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
    with _replaced_when_done(output) as out, _progress("exporting", store.count_events) as bar:
        for record in store.events(since):
            out.write(_line(record) + "\n")
            count += 1
            if count % 1000 == 0:
                bar.update(1000)
        bar.update(count % 1000)
    click.echo(f"exported {count} events", err=True)


@optin.command("import")
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
        for number, line in enumerate(file, 1):
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

    added = store.import_rows(rows())
    click.echo(
        f"imported {read} events: {added} new, {read - added} already present; "
        f"{failed} lines failed",
        err=True,
    )
    if failed:
        sys.exit(1)


@optin.command("migrate")
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
            added = target.import_rows(counted())
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


@optin.group("db")
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


@optin.group("changes")
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
    type=click.IntRange(min=0),
    required=True,
    help="Remove the changes appended more than this many days ago.",
)
def changes_prune_command(days: int) -> None:
    """Remove old changes now, once (OPTIN_CHANGES_RETENTION does it as the service runs).
    A reader whose cursor points into them gets 410 CURSOR_EXPIRED; events stay."""
    before = cutoff(days)
    removed = _store().prune_changes(before)
    click.echo(f"removed {removed} changes appended before {format_time(before)}")


optin.add_command(webhooks)
