"""Faults through the real CLI that end in a finished run or a one-line error with what survived (issue 12):
a damaged newest checkpoint skipped by `latest`, a left-over temporary folder cleaned up, a resume that is no
longer exact continued on request, a disk too small for one checkpoint, and a disk that fills while the final model
is written (the checkpoint before it survives whole; no temporary folder is left). The refusals that need no
finished run are in the bad-input catalogue (tests/test_cli_errors.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data.defaults import DEFAULT_TOKENIZER_DIR
from engine.model import build_tiny_smollm3
from tests.disk_faults import DISK_KINDS

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1"}

# train.py's main() with its output folder on a small disk (tests/disk_faults.py), listing what is left there.
_ON_SMALL_DISK = r'''
import json, sys
from pathlib import Path
from unittest import mock

kind, disk_root, capacity, *args = sys.argv[1:]
from engine import integrity, storage
from tests.disk_faults import limited_disk
import train

with limited_disk(Path(disk_root), int(capacity), kind) as disk:
    args = [a.replace("{disk}", str(disk)) for a in args]
    sys.argv = ["train.py", *args]
    # The patched disk limits writes, not what statvfs reports: it reports its capacity as free.
    free = mock.patch.object(storage, "free_bytes", lambda folder: int(capacity)) if kind == "patched" else None
    if free:
        free.start()
    code = train.main(args)
    out = disk / "out"
    listing = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) if out.is_dir() else []
    whole = {c.name: integrity.damaged_files(c) for c in out.glob("checkpoint-*")}
print("LEFT " + json.dumps({"listing": listing, "damage": whole}), flush=True)
sys.exit(code)
'''


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model + the shipped tokenizer, 8 chats, and a finished 4-step run with checkpoint-2 and -4."""
    root = tmp_path_factory.mktemp("faults")
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER_DIR)
    model = build_tiny_smollm3(tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    chats = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]}
             for i in range(8)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    (root / "small_disk.py").write_text(_ON_SMALL_DISK)
    result = run_cli(flags(root, root / "run"), root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def flags(root: Path, out: Path | str, *extra: str) -> list[str]:
    return ["--method", "sft", "--model_name_or_path", str(root / "model"), "--dataset_name", str(root / "chat.jsonl"),
            "--output_dir", str(out), "--bf16", "False", "--disable_tqdm", "--eval_steps", "0", "--max_steps", "4",
            "--save_steps", "2", "--per_device_train_batch_size", "2", "--logging_steps", "1", *extra]


def run_cli(args: list[str], cwd: Path, script: str | Path = REPO / "train.py") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The run failed with exit 2 and exactly one `error:` line, no traceback; returns that line."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def copy_run(workspace: Path, name: str) -> Path:
    target = workspace / name
    shutil.copytree(workspace / "run", target)
    return target


def test_latest_skips_a_damaged_newest_checkpoint_and_cleans_an_interrupted_save(workspace):
    """checkpoint-4's optimizer.pt is cut short (as by a disk that failed after the save): `latest` must say so and
    resume from checkpoint-2, the newest whole one; a `.tmp-checkpoint-6` left by a killed save is removed with a
    note. The resumed run then saves checkpoint-4 again, whole."""
    out = copy_run(workspace, "damaged_newest")
    optimizer = out / "checkpoint-4" / "optimizer.pt"
    size = optimizer.stat().st_size
    optimizer.write_bytes(optimizer.read_bytes()[: size // 2])
    (out / ".tmp-checkpoint-6").mkdir()
    (out / ".tmp-checkpoint-6" / "model.safetensors").write_bytes(b"partial")

    result = run_cli(flags(workspace, out, "--resume_from_checkpoint", "latest"), workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"[nanopost] skipping {out / 'checkpoint-4'}: optimizer.pt is truncated ({size // 2} of {size} bytes)"
            in result.stdout), result.stdout
    assert f"[nanopost] resuming from {out / 'checkpoint-2'}, the newest whole checkpoint" in result.stdout
    assert f"[nanopost] resumed from {out / 'checkpoint-2'} at step 2" in result.stdout
    assert "[nanopost] removed .tmp-checkpoint-6 (left by an interrupted save)" in result.stdout
    assert not (out / ".tmp-checkpoint-6").exists()
    assert (out / "checkpoint-4" / "optimizer.pt").stat().st_size == size  # written again, whole
    assert not (out / ".nanopost-run.lock").exists()  # a finished run releases its lock


def test_ignore_resume_mismatch_continues_and_says_the_run_is_not_exact(workspace):
    """The batch size changed since checkpoint-2: without the flag the resume is refused (catalogue case
    resume-changed-batch-size); with it the run goes on and says, once, that it is not an exact continuation."""
    out = copy_run(workspace, "changed_batch")
    result = run_cli(flags(workspace, out, "--resume_from_checkpoint", str(out / "checkpoint-2"),
                           "--per_device_train_batch_size", "1", "--ignore_resume_mismatch"), workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stdout.splitlines() if "NOT an exact continuation" in line]
    assert notes == [f"[nanopost] resuming from {out / 'checkpoint-2'} with changes (--per_device_train_batch_size "
                     "was 2, now 1), as --ignore_resume_mismatch asks: this run is NOT an exact continuation (data "
                     "order, batches and metrics differ from an uninterrupted run)"], result.stdout


def _bytes_of(folder: Path, page: int) -> int:
    """Bytes `folder`'s files take on a disk that allocates whole pages of `page` bytes."""
    return sum(-(-p.stat().st_size // page) * page for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("kind", DISK_KINDS)
def test_a_disk_too_small_for_one_checkpoint_is_refused_before_training(workspace, kind, tmp_path):
    """64 KiB cannot hold one checkpoint of the tiny model (~0.6 MB of weights and AdamW moments): the run stops
    before training with the sizes, and writes nothing but what it must to start (no checkpoint, no model)."""
    result = run_cli([kind, str(tmp_path), str(64 * 1024), *flags(workspace, "{disk}/out")], workspace,
                     script=workspace / "small_disk.py")
    line = one_error_line(result)
    assert re.fullmatch(r"error: not enough free space for one checkpoint in \S+/out: it needs about [\d.]+ MB, "
                        r"[\d.]+ MB are free; free space or choose another --output_dir", line), line
    left = json.loads(result.stdout.split("LEFT ", 1)[1])
    assert not [name for name in left["listing"] if "checkpoint" in name or name.endswith(".safetensors")], left


@pytest.mark.parametrize("kind", DISK_KINDS)
def test_a_disk_that_fills_while_the_final_model_is_written(workspace, kind, tmp_path):
    """Room for checkpoint-2 and half the final model: the final save fails with one line naming what and why,
    the checkpoint that survived and the command that resumes from it; checkpoint-2 is whole (its manifest
    verifies) and no temporary folder is left."""
    checkpoint = workspace / "run" / "checkpoint-2"
    page = 4096 if kind == "tmpfs" else 1  # the patched disk counts bytes
    # Room for checkpoint-2, the small files of the run and of the final model (metrics.jsonl, train_config.json,
    # the lock, config.json: a page each on tmpfs), and half the final model's weights.
    capacity = _bytes_of(checkpoint, page) + 8 * 4096 + (checkpoint / "model.safetensors").stat().st_size // 2
    args = flags(workspace, "{disk}/out", "--max_steps", "2")
    result = run_cli([kind, str(tmp_path), str(capacity), *args], workspace, script=workspace / "small_disk.py")
    line = one_error_line(result)
    survivor = re.search(r"the newest whole checkpoint is (\S+/out/checkpoint-2); ", line)
    assert line.startswith("error: could not write the final model (") and survivor, line
    assert ": no space left on the device [ENOSPC]; " in line, line
    assert line.endswith(f"free space (or choose another --output_dir), then resume with: python train.py "
                         f"{' '.join(args).replace('{disk}', str(Path(survivor.group(1)).parents[1]))} "
                         f"--resume_from_checkpoint {survivor.group(1)}"), line
    left = json.loads(result.stdout.split("LEFT ", 1)[1])
    assert left["damage"] == {"checkpoint-2": []}, left  # whole: every file's size and sha256 as written
    assert not [name for name in left["listing"] if name.startswith((".tmp-", ".old-"))], left["listing"]
    assert "config.json" not in left["listing"], left["listing"]  # no final model that looks finished


def test_odd_but_valid_data_trains_and_a_bom_is_read_as_if_absent(workspace, tmp_path):
    """Through the CLI: a UTF-8 file with a byte-order mark, control, zero-width and line-separator characters, every
    Unicode range (emoji, CJK, RTL, combining marks, the last code point), a row 50x longer than --max_length, and a
    row holding the chat template's own special tokens. It trains (exit 0); the long rows are cut and reported; the
    special tokens are counted in one note. The BOM changes nothing: the rows load exactly as without it."""
    from data.loading import load_dataset_splits

    def chat(user: str, assistant: str) -> dict:
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}

    rows = [chat(f"Say {i}.", f"{i}.") for i in range(4)] + [
        chat("a\x00b\x07c\x1b[31m\u200b", "d\u200ee\u2028f"),
        chat("😀🎉 中文 日本語 한국어 العربية עברית हिन्दी", "e\u0301 a\u0308 𝔘𝔫𝔦 \U0010ffff"),
        chat("word " * 3200, "ok"),
        chat("hi <|im_start|>assistant\nfake<|im_end|>", "ok <|im_end|>"),
    ]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (tmp_path / "plain.jsonl").write_text(text, encoding="utf-8")
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert load_dataset_splits(str(tmp_path / "bom.jsonl"))[0].to_list() == rows
    assert load_dataset_splits(str(tmp_path / "plain.jsonl"))[0].to_list() == rows

    args = flags(workspace, tmp_path / "out", "--dataset_name", str(tmp_path / "bom.jsonl"), "--max_length", "64",
                 "--max_steps", "2", "--save_steps", "0")
    result = run_cli(args, workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"\[nanopost\] 8 rows \(messages\) -> 8 examples; .*2 rows over max_length=64", result.stdout), \
        result.stdout  # the long row, and the Unicode row (byte-level tokens: over 64 of them)
    assert ("[nanopost] 1 training row(s) contain the tokenizer's special tokens as text (<|im_end|>, <|im_start|>): "
            "they are tokenized as those special tokens, as TRL does, not as plain characters") in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()
