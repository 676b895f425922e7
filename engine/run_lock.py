"""One run per output folder: a lock file that names its holder and that a crashed run does not leave stuck.

    <output_dir>/.nanopost-run.lock   {"pid": 1234, "host": "node7", "started": "2026-12-01T08:00:00+00:00",
                                       "command": "python train.py ..."}

The holder keeps an exclusive `flock` on the file while it runs: the kernel drops it when the process ends, however
it ends, so on one host a lock whose holder died is free at once (its record is taken over, with a note). Across
hosts (a shared file system whose locks do not reach every host) the record's heartbeat decides: the holder's
thread touches the file's mtime every `HEARTBEAT_S`; a record from another host whose heartbeat is older than
`STALE_AFTER_S` is taken over too. Only the main process takes the lock (see `engine.main_process.decide_on_main`).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine import storage
from engine.errors import UserError
from engine.integrity import newest_whole_checkpoint
from engine.main_process import decide_on_main
from engine.storage import writing

LOCK_FILE = ".nanopost-run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _describe(record: dict[str, Any]) -> str:
    return (f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}"
            f" ({record.get('command', 'command unknown')})")


class RunLock:
    """`acquire()` at start (raises one line if another run holds the folder), `release()` at the end."""

    def __init__(self, output_dir: str | os.PathLike, *, command: str | None = None,
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.command = command if command is not None else shlex.join([Path(sys.executable).name, *sys.argv])
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ taking the lock
    def acquire(self) -> str | None:
        """Take the lock; returns a note when it took over a dead run's lock, raises UserError when it is held."""
        while True:
            with writing("the run lock", self.path):  # a read-only or full output folder: one line
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record = self._read(fd)
                os.close(fd)
                raise UserError(self._held_line(record)) from None
            # The holder releases by unlinking the file: if the path names another file now, ours is an orphan.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            note = self._take_over_note(fd)
            with writing("the run lock", self.path):
                self._write(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._thread = threading.Thread(target=self._beat, name="nanopost-lock-heartbeat", daemon=True)
        self._thread.start()
        return note

    def _held_line(self, record: dict[str, Any]) -> str:
        return (f"another run is writing to {self.path.parent}: {_describe(record)}; wait for it to finish, stop "
                f"it, or choose another --output_dir (lock file: {self.path})")

    def _take_over_note(self, fd: int) -> str | None:
        """We hold the flock: a record left in the file is a dead run's, unless it comes from another host
        (whose flock may not reach us) and its heartbeat is fresh."""
        record = self._read(fd)
        if not record:
            return None
        age = time.time() - os.fstat(fd).st_mtime
        if record.get("host") != socket.gethostname():
            if age < self.stale_after_s:
                raise UserError(self._held_line(record) + f"; its heartbeat is {age:.0f}s old")
            return f"took over the lock of {_describe(record)}: no heartbeat for {age:.0f}s"
        state = "is no longer running" if not _pid_alive(int(record.get("pid", -1))) else "no longer holds it"
        return f"took over the lock of {_describe(record)}, which {state}"

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            raw = os.pread(fd, 1 << 16, 0)
            record = json.loads(raw.decode()) if raw.strip() else {}
        except (OSError, ValueError):
            return {"pid": "?", "host": "?", "started": "?", "command": "unreadable lock record"}
        return record if isinstance(record, dict) else {}

    def _write(self, fd: int) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": self.command}
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    # ------------------------------------------------------------------ holding and releasing
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:  # a full or vanished disk: the run itself reports it when it writes
                pass

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.path.unlink(missing_ok=True)  # while still holding the flock: no one can take a half-gone lock
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------- a whole run


@contextmanager
def holding_output_dir(output_dir: Path, accelerator) -> Iterator[None]:
    """One run's hold on its output folder, around everything it does after the folder check:

    - the run lock (taken on the main process; every process gets its outcome), released at the end;
    - cleanup of an interrupted save (a `.tmp-*` folder, a checkpoint moved aside), once the lock is ours;
    - a storage fault anywhere comes out as one line that also names the newest whole checkpoint and the resume
      command.
    """
    lock = RunLock(output_dir)

    def take() -> list[str]:
        note = lock.acquire()
        return ([note] if note else []) + storage.recover_interrupted_saves(output_dir)

    try:
        for note in decide_on_main(accelerator, take):
            if accelerator.is_main_process:
                print(f"[nanopost] {note}", flush=True)
        yield
    except storage.StorageError as fault:
        raise fault.with_survivor(newest_whole_checkpoint(output_dir)) from fault
    finally:
        lock.release()
