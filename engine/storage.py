"""Writing the run's files when the disk can fail: one line instead of a traceback, nothing half-written left behind.

Every writer of a run (checkpoint folders, the final model, metrics.jsonl, the reference log-prob cache, reports)
goes through `writing(what, path)`, which turns an OSError (no space, read-only, quota, permission) into a
`StorageError`: one line naming what could not be written and why. The loop adds what survived with
`StorageError.with_survivor(last_checkpoint)`, so the line ends with the newest whole checkpoint and the command
that resumes from it.

Temporary names follow one rule, `.tmp-<final name>` next to the final path, so that `recover_interrupted_saves`
can clean up after a run that died mid-write (only the run holding the output folder's lock may call it).

    with writing("metrics.jsonl", path):             # any OSError inside -> StorageError
        ...
    atomic_folder(output_dir / "checkpoint-10", write, what="checkpoint 10")
    with atomic_file(cache_path, what="the reference log-prob cache") as tmp:
        torch.save(obj, tmp)
    require_free_space(output_dir, estimate_checkpoint_bytes(model, optimizer), what="checkpoint 10")
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from engine.errors import UserError

TEMPORARY_PREFIX = ".tmp-"
_REPLACED_PREFIX = ".old-"  # engine/checkpoint.py's name for a folder being replaced (see recover_interrupted_saves)

# Why a write failed, in the words a user acts on.
_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "the file is larger than the file system or ulimit allows",
    errno.EIO: "an input/output error on the device",
}
_FIXES = {
    errno.ENOSPC: "free space (or choose another --output_dir)",
    errno.EDQUOT: "free space within your quota (or choose another --output_dir)",
    errno.EROFS: "choose a writable --output_dir",
    errno.EACCES: "make the folder writable (or choose another --output_dir)",
    errno.EPERM: "make the folder writable (or choose another --output_dir)",
}
_UNKNOWN = object()  # StorageError.survived before the loop said what survived


def resume_command(checkpoint: Path, argv: list[str] | None = None) -> str:
    """The command that resumes from `checkpoint`: this run's own flags (from sys.argv when it ran train.py),
    with --resume_from_checkpoint replaced."""
    if argv is None:
        argv = sys.argv[1:] if sys.argv and Path(sys.argv[0]).name == "train.py" else ["..."]
    kept: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg == "--resume_from_checkpoint":
            skip_value = True
        elif not arg.startswith("--resume_from_checkpoint="):
            kept.append(arg)
    return shlex.join(["python", "train.py", *kept, "--resume_from_checkpoint", str(checkpoint)])


def survival_sentence(survived: Path | None, fix: str = "fix the cause") -> str:
    """What survived and how to go on: shared by every fault message of the run."""
    if survived is None:
        return f"no checkpoint was saved before this; {fix}, then start the run again"
    return f"the newest whole checkpoint is {survived}; {fix}, then resume with: {resume_command(survived)}"


class StorageError(UserError):
    """A write of the run failed: `what` (in words), `path`, the OSError, and (once the loop knows) what survived."""

    def __init__(self, what: str, path: str | os.PathLike, error: OSError, survived: Any = _UNKNOWN) -> None:
        self.what, self.path, self.error, self.survived = what, Path(path), error, survived
        super().__init__(self._line())

    @property
    def reason(self) -> str:
        return _REASONS.get(self.error.errno, self.error.strerror or str(self.error))

    def _line(self) -> str:
        code = errno.errorcode.get(self.error.errno, "") if self.error.errno else ""
        line = f"could not write {self.what} ({self.path}): {self.reason}" + (f" [{code}]" if code else "")
        if self.survived is _UNKNOWN:
            return line
        return f"{line}; {survival_sentence(self.survived, _FIXES.get(self.error.errno, 'fix the cause'))}"

    def with_survivor(self, survived: Path | None) -> StorageError:
        """The same fault, now saying what survived (the loop's last whole checkpoint, or None)."""
        if self.survived is not _UNKNOWN:
            return self
        return StorageError(self.what, self.path, self.error, survived)


# Writers that do not raise OSError: safetensors (Rust) says "... (os error 28)"; torch.save's C++ writer says
# "basic_ios::clear: iostream error" / "unexpected pos" and loses the errno (with a Python file object the OSError
# is its __context__).
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")
_WRITER_IO_FAILURE = re.compile(r"iostream error|unexpected pos|file write failed|PytorchStreamWriter failed")
_LOW_SPACE = 1 << 20


def _diagnose(path: Path) -> int | None:
    """Why writing under `path` fails, read from the file system itself (for writers that lost the errno)."""
    folder = Path(path).absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if min(stats.f_bavail, stats.f_bfree) * stats.f_frsize < _LOW_SPACE:
        return errno.ENOSPC
    if not os.access(folder, os.W_OK):
        return errno.EACCES
    return None


def as_os_error(error: BaseException, path: str | os.PathLike) -> OSError | None:
    """The OSError behind a failed write, whichever writer raised it; None when it was not the storage (an error
    that merely happened while another OSError was being handled is not taken for a write failure)."""
    if isinstance(error, OSError):
        return error
    text = str(error)
    code = _OS_ERROR_CODE.search(text)
    if code:
        return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
    if not _WRITER_IO_FAILURE.search(text):
        return None
    cause = error.__cause__ or error.__context__
    while cause is not None:
        if isinstance(cause, OSError):
            return cause
        cause = cause.__cause__ or cause.__context__
    diagnosed = _diagnose(Path(path))
    return OSError(diagnosed, os.strerror(diagnosed)) if diagnosed is not None else None


@contextmanager
def writing(what: str, path: str | os.PathLike, survived: Any = _UNKNOWN) -> Iterator[None]:
    """Turn a failed write inside (an OSError, or torch's / safetensors' wrapping of one) into one StorageError
    line about `what` at `path`. Other errors pass through unchanged."""
    try:
        yield
    except StorageError:
        raise
    except Exception as error:
        os_error = as_os_error(error, path)
        if os_error is None:
            raise
        raise StorageError(what, getattr(os_error, "filename", None) or path, os_error, survived) from error


def _fsync_tree(folder: Path) -> None:
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_directory(folder)


def _fsync_directory(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def remove_quietly(path: Path) -> None:
    """Remove a temporary file or folder; never raises (it runs while another error is on its way out)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def atomic_folder(final: Path, write: Callable[[Path], None], *, what: str) -> Path:
    """`write(tmp)`, make it durable, then rename tmp to `final`: `final` is either complete or absent.

    On any failure (a full disk, a signal, a bug in `write`) the temporary folder is removed and a previous
    `final` is left as it was; an OSError comes out as one StorageError line about `what`.
    """
    tmp = final.parent / f"{TEMPORARY_PREFIX}{final.name}"
    replaced = final.parent / f"{_REPLACED_PREFIX}{final.name}"
    try:
        with writing(what, tmp):
            remove_quietly(tmp)
            tmp.mkdir(parents=True)
            write(tmp)
            _fsync_tree(tmp)
            if final.exists():
                remove_quietly(replaced)
                final.rename(replaced)
                tmp.rename(final)
                remove_quietly(replaced)
            else:
                tmp.rename(final)
            _fsync_directory(final.parent)
    except BaseException:
        remove_quietly(tmp)
        if replaced.exists() and not final.exists():
            replaced.rename(final)  # the old folder, moved aside just before the failure, goes back
        raise
    return final


@contextmanager
def atomic_file(final: Path, *, what: str) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `final` (durably), on failure it is removed."""
    tmp = final.parent / f"{TEMPORARY_PREFIX}{final.name}"
    try:
        with writing(what, final):
            final.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, final)
            _fsync_directory(final.parent)
    except BaseException:
        remove_quietly(tmp)
        raise


def write_text_atomically(final: Path, text: str, *, what: str) -> None:
    """`final` holds `text` (UTF-8) whole, or keeps what it held before."""
    with atomic_file(final, what=what) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def scratch_folder(folder: Path, *, what: str) -> Iterator[Path]:
    """A fresh temporary folder that is gone afterwards, whether the block succeeds or fails (what it moved out
    stays where it was moved)."""
    try:
        with writing(what, folder):
            remove_quietly(folder)
            folder.mkdir(parents=True)
            yield folder
    finally:
        remove_quietly(folder)


def append_line(path: Path, line: str, *, what: str) -> None:
    """Append one line and flush it. A failed append is truncated back, so the file never ends mid-line."""
    with writing(what, path):
        with path.open("a", encoding="utf-8") as handle:
            start = handle.tell()
            try:
                handle.write(line + "\n")
                handle.flush()
            except OSError:
                try:
                    handle.truncate(start)
                except OSError:
                    pass
                raise


def recover_interrupted_saves(output_dir: Path) -> list[str]:
    """After a run died mid-write: put back a checkpoint that was moved aside to be replaced, remove temporary
    files and folders. Returns what was done, in words. Call only while holding the output folder's lock."""
    done: list[str] = []
    if not output_dir.is_dir():
        return done
    for entry in sorted(output_dir.iterdir()):
        if entry.name.startswith(_REPLACED_PREFIX):
            final = output_dir / entry.name[len(_REPLACED_PREFIX):]
            if final.exists():
                remove_quietly(entry)
                done.append(f"removed {entry.name} (left by an interrupted save)")
            else:
                entry.rename(final)
                done.append(f"restored {final.name} (an interrupted save had moved it aside)")
        elif entry.name.startswith(TEMPORARY_PREFIX):
            remove_quietly(entry)
            done.append(f"removed {entry.name} (left by an interrupted save)")
    return done


# ---------------------------------------------------------------------- free space


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a (nested) state dict; a tensor shared under two names counts once."""
    seen: set[tuple[int, int]] = set()

    def walk(value: Any) -> int:
        if torch.is_tensor(value):
            # A meta tensor or a sharded DTensor (FSDP2) has no local storage to compare: count it by identity.
            # numel() is the full (unsharded) size, which is what a save writes.
            local = value.device.type != "meta" and not isinstance(value, DTensor)
            key = (value.untyped_storage().data_ptr(), value.storage_offset()) if local else (id(value), 0)
            if key in seen:
                return 0
            seen.add(key)
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        return 0

    return walk(obj)


# AdamW keeps two moments (exp_avg, exp_avg_sq) per trainable parameter, in the parameter's dtype.
_ADAMW_MOMENTS = 2


def weight_bytes(model: torch.nn.Module, *, adapter_only: bool = False) -> int:
    """The bytes of the weights a save writes: all of them, or the trainable adapter with `adapter_only`."""
    if adapter_only:
        return tensor_bytes({name: p for name, p in model.named_parameters() if p.requires_grad})
    return tensor_bytes(model.state_dict())


def estimate_checkpoint_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                              adapter_only: bool = False) -> int:
    """The size of one checkpoint, from tensor bytes: its weights (`weight_bytes`) plus the optimizer state
    (measured when the optimizer has state, else AdamW's two moments per trainable parameter). Tokenizer and JSON
    files are small and ignored."""
    weights = weight_bytes(model, adapter_only=adapter_only)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    optimizer_state = tensor_bytes(optimizer.state_dict()["state"]) if optimizer is not None else 0
    return weights + (optimizer_state or _ADAMW_MOMENTS * trainable)


def free_bytes(folder: Path) -> int:
    """Free bytes (for this user) on the file system that holds `folder`, or its nearest existing parent."""
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _gigabytes(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e7 else f"{count / 1e6:.2f} MB"


# Headroom over the tensor-byte estimate: serialisation headers, tokenizer files, JSON.
SPACE_MARGIN = 1.05


def require_free_space(folder: Path, needed: int, *, what: str, survived: Any = _UNKNOWN) -> None:
    """Refuse (one line) before writing `what` when the disk holding `folder` has less than `needed` bytes free."""
    needed = int(needed * SPACE_MARGIN)
    free = free_bytes(folder)
    if free >= needed:
        return
    line = (f"not enough free space for {what} in {folder}: it needs about {_gigabytes(needed)}, "
            f"{_gigabytes(free)} are free")
    if survived is not _UNKNOWN:
        line += f"; {survival_sentence(survived, 'free space (or choose another --output_dir)')}"
    else:
        line += "; free space or choose another --output_dir"
    raise UserError(line)
