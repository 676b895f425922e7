"""Tests that start several processes (a DDP run, a launcher): a free port, and one such start at a time.

The suite runs on pytest-xdist workers (pyproject.toml). Two multi-process runs at once would compete for the
2 CI cores inside their collectives and could race for a port between `free_port()` choosing it and the
launcher binding it, so every multi-process start holds one machine-wide lock while it runs.
"""

import fcntl
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = Path(tempfile.gettempdir()) / "nanopost-tests-multiprocess.lock"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def one_launch_at_a_time() -> Iterator[None]:
    """Hold the machine-wide lock of multi-process test runs (released when the block ends or the worker dies)."""
    with open(LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
