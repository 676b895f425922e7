"""What the report scripts share: an argument parser whose errors are one line, and a `main` that turns any
user error into one `error:` line and exit status 2 (as train.py does), and Ctrl-C / SIGTERM into one line and
128 + the signal's number (the report's files are written whole or not at all: engine/compare/report.py)."""

from __future__ import annotations

import argparse
import signal
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
    stopped_by: list[int] = []

    def interrupt(signum, frame) -> None:
        stopped_by.append(signum)
        raise KeyboardInterrupt

    previous = {}
    try:
        previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread (a test runner's): signals stay as they are
        pass
    try:
        run(parser.parse_args(argv))
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        signum = stopped_by[0] if stopped_by else signal.SIGINT
        print(f"error: stopped by {signal.Signals(signum).name}; no report file was left half-written",
              file=sys.stderr, flush=True)
        return 128 + signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
