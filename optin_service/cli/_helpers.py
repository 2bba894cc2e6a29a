"""What the ``optin`` commands share: the app's store, a progress bar, an event as a line,
an argument checked against a format.

Private to :mod:`optin_service.cli`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click
from flask import current_app

from ..formats import cut
from ..schemas import dump_event
from ..storage import OptInRecord, OptInStore


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
