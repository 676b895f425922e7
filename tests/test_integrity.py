"""Checkpoint integrity: a manifest of sizes and sha256s written last inside the atomic folder; a damaged, missing or
truncated file is named; `latest` skips a damaged newest checkpoint and says so; a damaged torch / safetensors
file gives one line, not PyTorch's "PytorchStreamReader failed reading zip archive" traceback."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import integrity, storage
from engine.errors import UserError


def _checkpoint(output_dir: Path, step: int) -> Path:
    """A checkpoint as the loop writes it (smaller): files, trainer_state.json, then the manifest, atomically."""
    def write(folder: Path) -> None:
        save_file({"w": torch.full((64,), float(step))}, folder / "model.safetensors")
        torch.save({"state": {0: {"exp_avg": torch.ones(256)}}}, folder / "optimizer.pt")
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "tokenizer.json").write_text("{}")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}) + "\n")
        integrity.write_manifest(folder)  # last: it covers every file above

    return storage.atomic_folder(output_dir / f"checkpoint-{step}", write, what=f"checkpoint {step}")


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_the_manifest_records_size_and_sha256_of_every_file(tmp_path):
    folder = _checkpoint(tmp_path, 10)
    manifest = json.loads((folder / integrity.MANIFEST_FILE).read_text())
    assert sorted(manifest["files"]) == ["model.safetensors", "optimizer.pt", "tokenizer/tokenizer.json",
                                         "trainer_state.json"]
    state = folder / "trainer_state.json"
    assert manifest["files"]["trainer_state.json"] == {
        "size": state.stat().st_size, "sha256": hashlib.sha256(state.read_bytes()).hexdigest()}
    assert integrity.damaged_files(folder) == []
    assert integrity.verify_checkpoint(folder) is None


def test_each_kind_of_damage_is_named(tmp_path):
    folder = _checkpoint(tmp_path, 10)
    size = (folder / "optimizer.pt").stat().st_size
    _truncate(folder / "optimizer.pt", 100)
    (folder / "tokenizer" / "tokenizer.json").unlink()
    weights = bytearray((folder / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF  # one flipped bit pattern in the last weight: same size, different content
    (folder / "model.safetensors").write_bytes(bytes(weights))
    assert integrity.damaged_files(folder) == [
        "model.safetensors is damaged (its sha256 differs from the one written with it)",
        f"optimizer.pt is truncated (100 of {size} bytes)",
        "tokenizer/tokenizer.json is missing",
    ]
    # Sizes alone (the cheap check) see the truncation and the missing file, not the flipped byte.
    assert integrity.damaged_files(folder, checksums=False) == [
        f"optimizer.pt is truncated (100 of {size} bytes)", "tokenizer/tokenizer.json is missing"]


def test_resuming_a_damaged_checkpoint_names_the_file_and_the_newest_whole_one(tmp_path):
    _checkpoint(tmp_path, 10)
    newest = _checkpoint(tmp_path, 20)
    size = (newest / "optimizer.pt").stat().st_size
    _truncate(newest / "optimizer.pt", size - 1)
    with pytest.raises(UserError) as caught:
        integrity.verify_checkpoint(newest)
    assert str(caught.value) == (
        f"checkpoint {newest} is damaged: optimizer.pt is truncated ({size - 1} of {size} bytes); resume from "
        f"{tmp_path / 'checkpoint-10'} (the newest other checkpoint whose files are all there) or `latest`")


def test_a_checkpoint_without_manifest_is_used_with_a_note(tmp_path):
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    (folder / "trainer_state.json").write_text("{}")
    assert integrity.damaged_files(folder) is None
    assert integrity.verify_checkpoint(folder) == (
        f"{folder} has no manifest.json (written by an older nanopost): its files cannot be verified")


def test_latest_skips_a_damaged_newest_checkpoint_and_says_so(tmp_path):
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 20)
    newest = _checkpoint(tmp_path, 30)
    assert integrity.resolve_latest(tmp_path) == (newest, [])  # all whole: the newest, nothing to say
    (newest / "model.safetensors").unlink()
    chosen, notes = integrity.resolve_latest(tmp_path)
    assert chosen == tmp_path / "checkpoint-20"
    assert notes == [f"skipping {newest}: model.safetensors is missing",
                     f"resuming from {chosen}, the newest whole checkpoint"]
    (newest / "trainer_state.json").unlink()  # now not a complete checkpoint at all: not listed
    assert integrity.resolve_latest(tmp_path) == (tmp_path / "checkpoint-20", [])


def test_latest_refuses_when_every_checkpoint_is_damaged(tmp_path):
    only = _checkpoint(tmp_path, 10)
    _truncate(only / "optimizer.pt", 10)
    with pytest.raises(UserError, match=r"every checkpoint in .* is damaged \(skipping .*checkpoint-10: "
                                        r"optimizer.pt is truncated \(10 of \d+ bytes\)\); start the run again"):
        integrity.resolve_latest(tmp_path)
    with pytest.raises(UserError, match="no complete checkpoint in"):
        integrity.resolve_latest(tmp_path / "empty")


def test_a_truncated_torch_file_reads_as_one_line(tmp_path):
    folder = _checkpoint(tmp_path, 10)
    path = folder / "optimizer.pt"
    _truncate(path, path.stat().st_size // 2)
    with pytest.raises(UserError) as caught, integrity.reading(path, what="optimizer state"):
        torch.load(path, weights_only=False)
    assert str(caught.value) == (
        f"cannot read optimizer state {path}: the file is damaged or not what a checkpoint writes (RuntimeError: "
        "PytorchStreamReader failed reading zip archive: failed finding central directory); resume from another "
        "checkpoint or `--resume_from_checkpoint latest`")
    assert "\n" not in str(caught.value)


def test_a_truncated_safetensors_file_reads_as_one_line(tmp_path):
    folder = _checkpoint(tmp_path, 10)
    path = folder / "model.safetensors"
    _truncate(path, path.stat().st_size - 8)
    with pytest.raises(UserError) as caught, integrity.reading(path, what="model weights"):
        load_file(path)
    assert str(caught.value).startswith(
        f"cannot read model weights {path}: the file is damaged or not what a checkpoint writes (SafetensorError: "
        "Error while deserializing header: ")


def test_reading_lets_other_errors_through(tmp_path):
    with pytest.raises(ZeroDivisionError), integrity.reading(tmp_path / "x.pt"):
        1 / 0  # noqa: B018  (a bug in the caller is not a damaged file)
