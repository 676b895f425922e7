"""Storage faults: every write of a run fails with one line (what, why, what survived, how to resume), and leaves
no temporary file or half-written folder behind; free space is checked before a save that can be sized.

The full disk is real where the machine allows it (a small tmpfs: the kernel's own ENOSPC, also from torch's
C++ writer) and a patched Python writer everywhere (tests/disk_faults.py); each fault test runs on every kind
this machine offers.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from engine import storage
from engine.errors import UserError
from tests.disk_faults import DISK_KINDS, limited_disk

CAPACITY = 256 * 1024  # the simulated disk; every "big" write below is 4x larger
BIG = torch.zeros(256 * 1024)  # 1 MiB of fp32


def _oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@pytest.mark.parametrize(("code", "reason"), [
    (errno.ENOSPC, "no space left on the device [ENOSPC]"),
    (errno.EROFS, "the file system is read-only [EROFS]"),
    (errno.EDQUOT, "the disk quota is exceeded [EDQUOT]"),
    (errno.EACCES, "permission denied [EACCES]"),
])
def test_an_oserror_becomes_one_line_naming_what_and_why(code, reason):
    with pytest.raises(storage.StorageError) as caught:
        with storage.writing("metrics.jsonl", "/run/metrics.jsonl"):
            raise _oserror(code)
    assert str(caught.value) == f"could not write metrics.jsonl (/run/metrics.jsonl): {reason}"
    assert isinstance(caught.value, UserError)  # so the CLI prints it as `error: ...` and exits 2


def test_the_loop_adds_what_survived_and_the_resume_command(monkeypatch):
    monkeypatch.setattr("sys.argv", ["train.py", "--method", "sft", "--output_dir", "out",
                                     "--resume_from_checkpoint", "out/checkpoint-5"])
    fault = storage.StorageError("checkpoint 20", "out/.tmp-checkpoint-20", _oserror(errno.ENOSPC))
    assert str(fault.with_survivor(Path("out/checkpoint-10"))) == (
        "could not write checkpoint 20 (out/.tmp-checkpoint-20): no space left on the device [ENOSPC]; "
        "the newest whole checkpoint is out/checkpoint-10; free space (or choose another --output_dir), then "
        "resume with: python train.py --method sft --output_dir out --resume_from_checkpoint out/checkpoint-10")
    assert str(fault.with_survivor(None)).endswith(
        "[ENOSPC]; no checkpoint was saved before this; free space (or choose another --output_dir), then start "
        "the run again")
    # A fault that already says what survived is not rewritten by an outer handler.
    known = fault.with_survivor(Path("out/checkpoint-10"))
    assert known.with_survivor(None) is known


def test_resume_command_outside_train_py_keeps_the_flags_unknown():
    assert storage.resume_command(Path("o/checkpoint-3"), argv=["--lr", "1", "--resume_from_checkpoint=x"]) == (
        "python train.py --lr 1 --resume_from_checkpoint o/checkpoint-3")
    assert storage.resume_command(Path("o/checkpoint-3"), argv=["..."]) == (
        "python train.py ... --resume_from_checkpoint o/checkpoint-3")


def _small_checkpoint(folder: Path) -> None:
    torch.save({"w": torch.arange(8.0)}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text('{"global_step": 10}\n')


@pytest.mark.parametrize("kind", DISK_KINDS)
def test_a_full_disk_mid_checkpoint_leaves_the_previous_one_whole_and_no_temporary_folder(tmp_path, kind):
    with limited_disk(tmp_path, CAPACITY, kind) as disk:
        previous = storage.atomic_folder(disk / "checkpoint-10", _small_checkpoint, what="checkpoint 10")
        before = {p.name: p.read_bytes() for p in previous.iterdir()}

        def big_checkpoint(folder: Path) -> None:
            torch.save({"w": BIG}, folder / "optimizer.pt")  # 4x the disk: ENOSPC part-way

        with pytest.raises(storage.StorageError) as caught:
            storage.atomic_folder(disk / "checkpoint-20", big_checkpoint, what="checkpoint 20")
        assert "could not write checkpoint 20" in str(caught.value)
        assert "no space left on the device [ENOSPC]" in str(caught.value)
        assert sorted(p.name for p in disk.iterdir()) == ["checkpoint-10"]  # no .tmp-checkpoint-20
        assert {p.name: p.read_bytes() for p in previous.iterdir()} == before


@pytest.mark.parametrize("kind", DISK_KINDS)
def test_replacing_a_folder_on_a_full_disk_keeps_the_old_one(tmp_path, kind):
    """A save into an existing name (the final model, a re-saved step) fails: the old folder is still there."""
    with limited_disk(tmp_path, CAPACITY, kind) as disk:
        storage.atomic_folder(disk / "checkpoint-10", _small_checkpoint, what="checkpoint 10")
        with pytest.raises(storage.StorageError):
            storage.atomic_folder(disk / "checkpoint-10", lambda f: torch.save(BIG, f / "optimizer.pt"),
                                  what="checkpoint 10")
        assert sorted(p.name for p in disk.iterdir()) == ["checkpoint-10"]
        assert torch.load(disk / "checkpoint-10" / "optimizer.pt")["w"].tolist() == list(range(8))


def test_any_failure_while_writing_removes_the_temporary_folder(tmp_path):
    def interrupted(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # Ctrl-C mid-save

    with pytest.raises(KeyboardInterrupt):
        storage.atomic_folder(tmp_path / "checkpoint-3", interrupted, what="checkpoint 3")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", DISK_KINDS)
def test_a_full_disk_while_writing_a_cache_file_leaves_neither_it_nor_its_temporary(tmp_path, kind):
    with limited_disk(tmp_path, CAPACITY, kind) as disk:
        cache = disk / "ref_logps-abc.pt"
        with pytest.raises(storage.StorageError) as caught:
            with storage.atomic_file(cache, what="the reference log-prob cache") as tmp:
                torch.save({"logps": BIG}, tmp)
        assert str(caught.value).startswith(f"could not write the reference log-prob cache ({disk}/")
        assert list(disk.iterdir()) == []


def test_atomic_file_replaces_the_file_only_when_complete(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with storage.atomic_file(target, what="the report") as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"  # not visible until the block ends
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


@pytest.mark.parametrize("kind", DISK_KINDS)
def test_a_failed_metrics_append_leaves_whole_lines(tmp_path, kind):
    with limited_disk(tmp_path, CAPACITY, kind) as disk:
        metrics = disk / "metrics.jsonl"
        storage.append_line(metrics, '{"step": 1}', what="metrics.jsonl")
        # Leave about two 4 KiB pages free, so the long line below is written part-way before ENOSPC.
        (disk / "filler").write_bytes(b"\0" * (CAPACITY - 3 * 4096))
        with pytest.raises(storage.StorageError) as caught:
            storage.append_line(metrics, '{"step": 2, "pad": "' + "x" * 20000 + '"}', what="metrics.jsonl")
        assert str(caught.value).startswith(f"could not write metrics.jsonl ({metrics}): no space left")
        assert metrics.read_text() == '{"step": 1}\n'


def test_scratch_folder_is_gone_after_success_and_after_failure(tmp_path):
    with storage.scratch_folder(tmp_path / ".tmp-final-model", what="the final model") as scratch:
        (scratch / "config.json").write_text("{}")
        os.replace(scratch / "config.json", tmp_path / "config.json")
    with pytest.raises(storage.StorageError), storage.scratch_folder(tmp_path / ".tmp-final-model",
                                                                      what="the final model") as scratch:
        (scratch / "model.safetensors").write_bytes(b"x")
        raise _oserror(errno.EROFS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_recover_interrupted_saves_puts_back_a_moved_aside_checkpoint_and_removes_temporaries(tmp_path):
    (tmp_path / ".old-checkpoint-5").mkdir()  # died between "move old aside" and "move new in": the only copy
    (tmp_path / ".old-checkpoint-5" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / ".old-checkpoint-4").mkdir()  # died after "move new in": the old copy is garbage
    (tmp_path / ".tmp-checkpoint-6").mkdir()
    (tmp_path / ".tmp-ref_logps-1.pt").write_bytes(b"x")
    done = storage.recover_interrupted_saves(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-5"]
    assert (tmp_path / "checkpoint-5" / "trainer_state.json").is_file()
    assert done == ["removed .old-checkpoint-4 (left by an interrupted save)",
                    "restored checkpoint-5 (an interrupted save had moved it aside)",
                    "removed .tmp-checkpoint-6 (left by an interrupted save)",
                    "removed .tmp-ref_logps-1.pt (left by an interrupted save)"]


# ---------------------------------------------------------------------- sizing a save


def test_estimate_counts_weights_once_and_adamw_moments():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 4))
    weights = (4 * 3 + 3 + 3 * 4 + 4) * 4  # 31 fp32 numbers
    # No optimizer state yet: AdamW's two moments per trainable parameter.
    assert storage.estimate_checkpoint_bytes(model) == weights + 2 * weights
    # Frozen weights are not in an adapter checkpoint, and have no moments.
    model[0].requires_grad_(False)
    trainable = (3 * 4 + 4) * 4
    assert storage.estimate_checkpoint_bytes(model, adapter_only=True) == trainable + 2 * trainable
    # The same tensor under two names (tied embeddings) counts once.
    shared = torch.zeros(10)
    assert storage.tensor_bytes({"embed": shared, "lm_head": shared, "other": torch.zeros(2)}) == 48


def test_estimate_matches_the_bytes_a_checkpoint_writes(tmp_path):
    """Measured on a 1 MiB model after one AdamW step: the files are the tensor bytes plus small headers,
    within SPACE_MARGIN (5%) above the estimate."""
    from safetensors.torch import save_file

    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 256)).sum().backward()
    optimizer.step()
    estimate = storage.estimate_checkpoint_bytes(model, optimizer)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    written = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert estimate <= written <= estimate * storage.SPACE_MARGIN, (estimate, written)


def test_require_free_space_refuses_with_the_sizes_and_what_survived(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "free_bytes", lambda folder: 2_000_000_000)
    storage.require_free_space(tmp_path, 1_000_000_000, what="checkpoint 30")  # fits: no error
    with pytest.raises(UserError) as caught:
        storage.require_free_space(tmp_path, 3_000_000_000, what="checkpoint 30",
                                   survived=tmp_path / "checkpoint-20")
    assert str(caught.value).startswith(
        f"not enough free space for checkpoint 30 in {tmp_path}: it needs about 3.15 GB, 2.00 GB are free; "
        f"the newest whole checkpoint is {tmp_path}/checkpoint-20; free space (or choose another --output_dir), "
        "then resume with: python train.py")


def test_free_bytes_reads_the_nearest_existing_folder(tmp_path):
    import shutil

    assert abs(storage.free_bytes(tmp_path / "not" / "yet") - shutil.disk_usage(tmp_path).free) < 64 * 1024 * 1024


@pytest.mark.skipif("tmpfs" not in DISK_KINDS, reason="needs a mountable tmpfs to measure free space")
def test_free_bytes_on_a_small_disk(tmp_path):
    with limited_disk(tmp_path, CAPACITY, "tmpfs") as disk:
        assert storage.free_bytes(disk) == CAPACITY
        with pytest.raises(UserError, match="it needs about 1.10 MB, 0.26 MB are free"):
            storage.require_free_space(disk, 1_048_576, what="checkpoint 1")


def test_writer_failures_without_an_errno_are_recognised_and_bugs_are_not():
    """safetensors (Rust) and torch's C++ writer do not raise OSError; a bug that merely ran while an OSError was
    being handled is not a storage fault."""
    assert storage.as_os_error(RuntimeError("Error while serializing: I/O error: No space left on device "
                                            "(os error 28)"), "/x").errno == errno.ENOSPC
    try:
        try:
            raise _oserror(errno.EDQUOT)
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904
    except RuntimeError as wrapped:
        assert storage.as_os_error(wrapped, "/x").errno == errno.EDQUOT
    try:
        try:
            raise FileNotFoundError("config.json")
        except OSError:
            raise KeyError("a bug")  # noqa: B904
    except KeyError as bug:
        assert storage.as_os_error(bug, "/x") is None
        with pytest.raises(KeyError), storage.writing("the model card", "/x"):
            raise bug


@pytest.mark.parametrize("kind", DISK_KINDS)
def test_the_engines_own_checkpoint_writers_on_a_full_disk_give_one_line(tmp_path, kind, tiny_model_dir):
    """save_pretrained (safetensors) + tokenizer + torch.save of the optimizer, as engine/loop.py's checkpoint
    writes them, into a disk too small for the weights: the safetensors / torch errors come out as one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    weights = storage.tensor_bytes(model.state_dict())

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        torch.save({"state": {}}, folder / "optimizer.pt")

    with limited_disk(tmp_path, weights // 2, kind) as disk:
        with pytest.raises(storage.StorageError) as caught:
            storage.atomic_folder(disk / "checkpoint-1", write, what="checkpoint 1")
        assert str(caught.value).startswith(f"could not write checkpoint 1 ({disk}/.tmp-checkpoint-1")
        assert "no space left on the device [ENOSPC]" in str(caught.value)
        assert list(disk.iterdir()) == []
