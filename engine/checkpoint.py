"""Checkpoints in transformers' layout, written atomically.

    <output_dir>/checkpoint-<step>/
        model.safetensors, config.json     (or adapter_model.safetensors + adapter_config.json with LoRA)
        optimizer.pt, scheduler.pt, rng_state.pth
        trainer_state.json                 (global_step, epoch, data position, metric window, method)

Each checkpoint is written to a `.tmp-checkpoint-<step>` folder and renamed into place only when complete, so a
run killed while saving leaves the previous checkpoint whole and never a half-written one that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from engine.errors import UserError

STATE_FILE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_directory(final: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` then rename tmp to `final`; `final` either is complete or does not exist."""
    tmp = final.parent / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    for file in tmp.rglob("*"):  # make the bytes durable before the rename makes them visible
        if file.is_file():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
    if final.exists():
        old = final.parent / f".old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (those with a trainer_state.json), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_NAME.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def resolve_resume_path(value: str | None, output_dir: str) -> Path | None:
    """`--resume_from_checkpoint`: a folder, or `latest` / `true` for the newest complete one in output_dir."""
    if value is None or str(value).lower() in ("false", "none", ""):
        return None
    if str(value).lower() in ("latest", "true"):
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise UserError(f"--resume_from_checkpoint {value}: no complete checkpoint in {output_dir}")
        return checkpoints[-1]
    path = Path(value)
    if not (path / STATE_FILE).is_file():
        raise UserError(
            f"--resume_from_checkpoint {value}: not a complete checkpoint folder (no {STATE_FILE}); "
            f"use a checkpoint-<step> folder or `latest`"
        )
    return path


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())


def prune_checkpoints(output_dir: str | os.PathLike, keep: int | None) -> None:
    if keep is None or keep < 1:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        # The completion marker goes first: a run killed mid-delete leaves a folder `latest` ignores, not a
        # half-deleted one that still looks complete.
        (old / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)
