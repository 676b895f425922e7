"""Two runs into one output folder: the second stops at start with one line naming the first; a lock whose holder
died (SIGKILL, power loss on another host) is taken over with a note, never stuck; with several processes only the
main one takes it, and every process stops with the same line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.errors import UserError
from engine.run_lock import LOCK_FILE, RunLock
from tests.launch import free_port, one_launch_at_a_time

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_a_second_run_stops_with_one_line_naming_the_first(tmp_path):
    first = RunLock(tmp_path, command="python train.py --method sft")
    assert first.acquire() is None
    record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert (record["pid"], record["host"], record["command"]) == (os.getpid(), socket.gethostname(),
                                                                  "python train.py --method sft")
    with pytest.raises(UserError) as caught:
        RunLock(tmp_path, command="python train.py --method dpo").acquire()
    assert str(caught.value) == (
        f"another run is writing to {tmp_path}: pid {os.getpid()} on {socket.gethostname()}, started "
        f"{record['started']} (python train.py --method sft); wait for it to finish, stop it, or choose another "
        f"--output_dir (lock file: {tmp_path / LOCK_FILE})")
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()  # a finished run leaves no lock
    with RunLock(tmp_path) as again:  # and the folder is free again
        assert json.loads(again.path.read_text())["pid"] == os.getpid()


def test_the_lock_of_a_killed_run_is_taken_over_with_a_note(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from engine.run_lock import RunLock; "
         f"RunLock({str(tmp_path)!r}, command='killed run').acquire(); print('held', flush=True); time.sleep(60)"],
        env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"another run is writing to .*: pid {holder.pid} "):
            RunLock(tmp_path).acquire()  # alive: held
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(tmp_path)
    note = lock.acquire()  # the kernel dropped the dead run's flock: free at once, not after a timeout
    assert note.startswith(f"took over the lock of pid {holder.pid} on {socket.gethostname()}, started ")
    assert note.endswith("(killed run), which is no longer running")
    lock.release()


def _foreign_record(tmp_path: Path, age_s: float) -> None:
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "other-node", "started": "earlier",
                                                  "command": "python train.py"}))
    past = time.time() - age_s
    os.utime(tmp_path / LOCK_FILE, (past, past))


def test_another_hosts_lock_holds_while_its_heartbeat_is_fresh(tmp_path):
    """On a shared file system another host's flock may not reach us: its heartbeat (the file's mtime) decides."""
    _foreign_record(tmp_path, age_s=60)
    with pytest.raises(UserError, match=r"pid 1 on other-node, started earlier \(python train.py\); .*; its "
                                        r"heartbeat is 60s old"):
        RunLock(tmp_path, stale_after_s=600).acquire()
    _foreign_record(tmp_path, age_s=900)
    lock = RunLock(tmp_path, stale_after_s=600)
    assert lock.acquire() == ("took over the lock of pid 1 on other-node, started earlier (python train.py): no "
                              "heartbeat for 900s")
    lock.release()


def test_the_holder_keeps_its_heartbeat_fresh(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    past = time.time() - 1000
    os.utime(lock.path, (past, past))
    time.sleep(0.5)
    assert time.time() - lock.path.stat().st_mtime < 1.0
    lock.release()


_TWO_PROCESSES = """
import sys
from accelerate import Accelerator
from engine.errors import UserError
from engine.main_process import decide_on_main
from engine.run_lock import RunLock

accelerator = Accelerator(cpu=True)
lock = RunLock(sys.argv[1], command="second run")

def take_lock():
    (lock.path.parent / f"tried-by-rank-{accelerator.process_index}").touch()
    return lock.acquire()

try:
    decide_on_main(accelerator, take_lock)
    print(f"rank {accelerator.process_index}: took the lock", flush=True)
except UserError as error:
    print(f"rank {accelerator.process_index}: error: {error}", flush=True)
"""


def test_with_two_processes_only_the_main_one_takes_the_lock_and_both_stop_alike(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESSES)
    output_dir = tmp_path / "out"
    with one_launch_at_a_time(), RunLock(output_dir, command="first run"):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(free_port()), str(script), str(output_dir)],
                              env=ENV, capture_output=True, text=True, timeout=300)
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("rank "))
    expected = (f"error: another run is writing to {output_dir}: pid {os.getpid()} on {socket.gethostname()}, "
                f"started ")
    assert [line.split(": ", 1)[0] for line in lines] == ["rank 0", "rank 1"], done.stderr[-2000:]
    assert all(line.split(": ", 1)[1].startswith(expected) for line in lines), lines
    assert lines[0].split(": ", 1)[1] == lines[1].split(": ", 1)[1]  # the same line on both
    assert sorted(p.name for p in output_dir.glob("tried-by-*")) == ["tried-by-rank-0"]  # only main tried


def test_an_output_folder_that_cannot_hold_the_lock_gives_one_line(tmp_path, monkeypatch):
    import errno

    from engine.storage import StorageError

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(StorageError) as caught:
        RunLock(tmp_path).acquire()
    assert str(caught.value) == (f"could not write the run lock ({tmp_path / LOCK_FILE}): the file system is "
                                 "read-only [EROFS]")
