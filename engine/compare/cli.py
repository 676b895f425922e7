"""What the report scripts share: an argument parser whose errors are one line, and a `main` that turns any
user error into one `error:` line and exit status 2 (as train.py does)."""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Callable

from engine.errors import USER_ERRORS, UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag raises UserError (one line) instead of printing the usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{message} (see python scripts/{self.prog} --help)")


def run_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], object],
             argv: list[str] | None = None) -> int:
    """Parse `argv` and run; a user error prints `error: ...` on stderr and returns 2, success returns 0."""
    try:
        run(parser.parse_args(argv))
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0
