"""The ``optin`` console script (also ``python -m optin_service``): the commands of
:mod:`optin_service.cli` on the standalone service's store.

Apart from the package, so the command group (which every app mounting the
extension registers) imports nothing of the app factory.
"""

from __future__ import annotations

import logging
import sys

import click

from . import create_app
from .cli import optin


def main(argv: list[str] | None = None) -> None:
    """The ``optin`` console script: the same commands, on ``create_app()``'s store."""
    # The service's start-up lines (storage in use, authentication mode) are noise
    # around a command's own output; errors still show.
    logging.getLogger("optin_service").setLevel(logging.ERROR)
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["--version"], ["--help"]):  # answered before any command runs
        optin.main(args=args, prog_name="optin")
    try:
        app = create_app()
    except (LookupError, ValueError) as exc:  # a setting the service would refuse too
        click.ClickException(str(exc)).show()
        sys.exit(1)
    with app.app_context():
        optin.main(args=argv, prog_name="optin")


if __name__ == "__main__":
    main()
