"""A disk that fills up, for tests: a small real tmpfs where this machine allows mounting one, else a patched writer.

`limited_disk(tmp_path, capacity)` yields a folder on which writes fail with OSError(ENOSPC) once about
`capacity` bytes are used:

- "tmpfs": `mount -t tmpfs -o size=<capacity>` (needs root, or CAP_SYS_ADMIN); the kernel raises ENOSPC from any
  writer (Python, torch's C++ writer, safetensors' Rust writer). Unmounted afterwards.
- "patched": Python's `open` (so also pathlib, and `torch.save(obj, path)` and safetensors' `save_file` as used by
  save_pretrained and lora/, routed through it) is wrapped for paths under the folder: the writes are counted and
  the one that would pass `capacity` raises OSError(ENOSPC) after writing what fits, as a full disk does. Writers
  reached by another name are not limited.

`DISK_KINDS` holds the kinds this machine offers, so a test parameterised over it runs on the real tmpfs here and
on the patched writer everywhere.
"""

from __future__ import annotations

import builtins
import errno
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch


def _can_mount_tmpfs() -> bool:
    if os.geteuid() != 0:
        return False
    probe = Path(f"/tmp/nanopost-tmpfs-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                                 capture_output=True).returncode == 0
        if mounted:
            subprocess.run(["umount", str(probe)], check=True)
        return mounted
    except (OSError, subprocess.CalledProcessError):
        return False
    finally:
        probe.rmdir()


DISK_KINDS = ("tmpfs", "patched") if _can_mount_tmpfs() else ("patched",)


class _FullDiskFile:
    """A writable file under the limited folder: counts bytes against the shared budget."""

    def __init__(self, inner, budget: list[int]) -> None:
        self._inner, self._budget = inner, budget

    def write(self, data) -> int:
        data = data if isinstance(data, str) else bytes(data)
        size = len(data.encode() if isinstance(data, str) else data)
        if size > self._budget[0]:
            fits = self._budget[0]
            self._inner.write(data[:fits])
            self._budget[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget[0] -= size
        return self._inner.write(data)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __iter__(self):
        return iter(self._inner)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._inner.close()


@contextmanager
def _patched(folder: Path, capacity: int):
    budget = [capacity]
    real_open, real_save = builtins.open, torch.save
    root = str(folder.resolve())

    def limited_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        inside = isinstance(file, (str, os.PathLike)) and os.path.abspath(os.fspath(file)).startswith(root)
        if inside and any(flag in mode for flag in "wax+"):
            return _FullDiskFile(handle, budget)
        return handle

    def limited_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            with limited_open(f, "wb") as handle:
                return real_save(obj, handle, *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    def limited_safetensors(tensors, filename, metadata=None):
        from safetensors.torch import save

        with limited_open(filename, "wb") as handle:
            handle.write(save(tensors, metadata=metadata))

    # safetensors' Rust writer bypasses Python's files: route it (and the names that import it) through them.
    with mock.patch("builtins.open", limited_open), mock.patch("io.open", limited_open), \
            mock.patch("torch.save", limited_save), \
            mock.patch("safetensors.torch.save_file", limited_safetensors), \
            mock.patch("transformers.modeling_utils.safe_save_file", limited_safetensors), \
            mock.patch("lora.peft_io.save_file", limited_safetensors):
        yield folder


@contextmanager
def _tmpfs(folder: Path, capacity: int):
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={capacity}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@contextmanager
def limited_disk(tmp_path: Path, capacity: int, kind: str = DISK_KINDS[0]):
    """A folder where writes fail with ENOSPC once about `capacity` bytes are used (tmpfs rounds up to pages)."""
    folder = tmp_path / f"disk-{kind}"
    folder.mkdir(parents=True, exist_ok=True)
    with (_tmpfs if kind == "tmpfs" else _patched)(folder, capacity) as limited:
        yield limited
