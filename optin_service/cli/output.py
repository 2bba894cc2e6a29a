"""Where an export writes: stdout, a FIFO or a device written through, or a regular file
replaced only once the export is complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterator
from typing import IO

import click

__all__ = ["replaced_when_done"]


@contextlib.contextmanager
def replaced_when_done(path: str) -> Iterator[IO[str]]:
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
