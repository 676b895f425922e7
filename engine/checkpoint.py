"""Checkpoints in transformers' layout, written atomically.

    <output_dir>/checkpoint-<step>/
        model.safetensors, config.json     (or adapter_model.safetensors + adapter_config.json with LoRA)
        optimizer.pt, scheduler.pt, rng_state.pth
        method_state.safetensors           (only when the method has state of its own: TR-DPO's reference)
        nanopost_state.json                (ours: global_step, epoch, data position, metric window, method)
        trainer_state.json                 (transformers' TrainerState, written last: marks the folder complete)

Each checkpoint is written to a `.tmp-checkpoint-<step>` folder and renamed into place only when complete, so a
run killed while saving leaves the previous checkpoint whole and never a half-written one that looks complete
(engine/storage.py). Its manifest.json (engine/integrity.py) records every file's size and sha256; a resume
verifies them, and the run's resume fingerprint (engine/resume_fingerprint.py) in trainer_state.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from engine import integrity, storage
from engine.config import TrainConfig
from engine.errors import UserError
from engine.forward import plain_model
from engine.integrity import list_checkpoints as list_checkpoints  # re-exported: the loop and tests use it
from engine.main_process import decide_on_main
from engine.setup import full_state_dict, load_model_files, save_model_files
from engine.tracking import MetricWindow
from engine.trl_checkpoint import (
    NANOPOST_STATE_FILE,
    TRAINER_STATE_FILE,
    refuse_trainer_checkpoint,
    write_trainer_state,
)

STATE_FILE = TRAINER_STATE_FILE  # the completion marker, written last
METHOD_STATE_FILE = "method_state.safetensors"  # Method.checkpoint_tensors(), e.g. TR-DPO's moving reference


@dataclass
class TrainingState:
    """Where a run stands after an optimizer step: what a checkpoint's trainer_state.json holds, and all the loop
    needs to continue exactly where it stopped (with the weights, optimizer, schedule and RNG saved beside it)."""

    global_step: int = 0
    epoch: float = 0.0
    micro_batches_seen: int = 0  # the data position: the data order is a function of it (engine/data_order.py)
    num_tokens: float = 0.0  # tokens seen on all processes (TRL's num_tokens)
    metric_window: MetricWindow = field(default_factory=MetricWindow)  # metrics collected since the last log
    method: str = "sft"
    model_name_or_path: str | None = None
    total_steps: int = 0
    loss_since_log: float = 0.0  # sum of the step losses since the last log
    steps_since_log: int = 0
    best_metric: float | None = None  # --metric_for_best_model's best value so far, and the checkpoint that has it
    best_model_checkpoint: str | None = None
    resume_fingerprint: dict[str, Any] | None = None  # ResumeFingerprint.to_dict() of the run that saved it

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**values, "metric_window": self.metric_window.state_dict()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingState:
        """From trainer_state.json; keys that older checkpoints lack keep their defaults."""
        known = {f.name for f in dataclasses.fields(cls)} - {"metric_window"}
        state = cls(**{k: v for k, v in values.items() if k in known})
        state.metric_window.load_state_dict(values.get("metric_window", {}))
        return state


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


def resolve_resume_path(value: str | None, output_dir: str, notes: list[str] | None = None) -> Path | None:
    """`--resume_from_checkpoint`: a folder, or `latest` / `true` for the newest whole one in output_dir (damaged
    newer ones are skipped). The folder's files are verified against its manifest; what the user should know
    (a skipped checkpoint, a checkpoint without manifest) is appended to `notes`."""
    notes = notes if notes is not None else []
    if value is None or str(value).lower() in ("false", "none", ""):
        return None
    if str(value).lower() in ("latest", "true"):
        path, skipped = integrity.resolve_latest(output_dir)  # verified already
        notes.extend(skipped)
        if (path / integrity.MANIFEST_FILE).is_file():
            return path
    else:
        path = Path(value)
        if not (path / STATE_FILE).is_file():
            raise UserError(
                f"--resume_from_checkpoint {value}: not a complete checkpoint folder (no {STATE_FILE}); "
                f"use a checkpoint-<step> folder or `latest`"
            )
    note = integrity.verify_checkpoint(path)
    if note:
        notes.append(note)
    return path


def read_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's resume state as written (`TrainingState.from_dict` types it): nanopost_state.json, or our
    keys in trainer_state.json (checkpoints written before nanopost_state.json). A transformers/TRL Trainer
    checkpoint is refused with one line saying what it is; a damaged file is one line naming it."""
    path = checkpoint / NANOPOST_STATE_FILE
    if not path.is_file():
        refuse_trainer_checkpoint(checkpoint)
        path = checkpoint / STATE_FILE
    with integrity.reading(path, what="the training state"):
        state = json.loads(path.read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        return state


def write_trainer_state_of(folder: Path, state: TrainingState, config: TrainConfig, output_dir: Path) -> None:
    """trainer_state.json as transformers' TrainerState writes it; its log_history is metrics.jsonl up to now."""
    history_file = output_dir / "metrics.jsonl"
    history = [json.loads(line) for line in history_file.read_text().splitlines() if line] \
        if history_file.is_file() else []
    best = state.best_model_checkpoint
    write_trainer_state(folder, global_step=state.global_step, epoch=state.epoch, max_steps=state.total_steps,
                        num_train_epochs=config.num_train_epochs, config=config,
                        log_history=[r for r in history if r.get("step", 0) <= state.global_step],
                        num_input_tokens_seen=int(state.num_tokens), best_metric=state.best_metric,
                        best_global_step=int(Path(best).name.split("-")[-1]) if best else None,
                        best_model_checkpoint=best)


def check_resume_compatible(folder: Path, method: str, model_name_or_path: str | None) -> None:
    """Refuse to continue a checkpoint of another method or another starting model."""
    saved = TrainingState.from_dict(read_state(folder))
    if not (folder / "optimizer.pt").is_file():
        raise UserError(f"--resume_from_checkpoint {folder}: it was saved with --save_only_model (weights only, no "
                        f"optimizer, schedule or RNG state), so it cannot be resumed; start a new run from its "
                        f"weights with --model_name_or_path {folder}")
    if saved.method != method:
        raise UserError(
            f"--resume_from_checkpoint {folder}: it is a {saved.method} checkpoint but this run is "
            f"--method {method}; resume with the same method or start fresh"
        )
    if saved.model_name_or_path != model_name_or_path:
        raise UserError(
            f"--resume_from_checkpoint {folder}: it was trained from {saved.model_name_or_path} but this "
            f"run names {model_name_or_path}; resume with the same --model_name_or_path"
        )


def check_free_space_for_run(config: TrainConfig, accelerator: Accelerator, model) -> None:
    """Before training: refuse (one line, every process) when the disk cannot hold one checkpoint (or, when none
    is saved, the final model's weights)."""
    if config.save_steps:
        needed, what = storage.estimate_checkpoint_bytes(model, adapter_only=config.use_peft), "one checkpoint"
    else:
        needed, what = storage.weight_bytes(model, adapter_only=config.use_peft), "the final model"
    decide_on_main(accelerator, lambda: storage.require_free_space(Path(config.output_dir), needed, what=what))


def save_checkpoint(output_dir: Path, state: TrainingState, accelerator: Accelerator, model, optimizer, scheduler,
                    config: TrainConfig, tokenizer, last_checkpoint: Path | None,
                    method_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `<output_dir>/checkpoint-<step>` atomically with its manifest (every process calls it; the main process
    writes), after checking the disk can hold it; `last_checkpoint` is what survives if it cannot. `method_state`:
    the method's own tensors (`Method.checkpoint_tensors`), saved when not empty."""
    final = output_dir / f"checkpoint-{state.global_step}"
    what = f"checkpoint {state.global_step}"
    needed = storage.estimate_checkpoint_bytes(plain_model(accelerator, model), optimizer,
                                               adapter_only=config.use_peft)
    needed += storage.tensor_bytes(method_state) if method_state else 0  # e.g. TR-DPO's reference weights
    decide_on_main(accelerator, lambda: storage.require_free_space(output_dir, needed, what=what,
                                                                   survived=last_checkpoint))
    state_dict = full_state_dict(accelerator, model)  # every process takes part when the model is sharded
    accelerator.wait_for_everyone()

    def write(folder: Path) -> None:
        save_model_files(config.use_peft, plain_model(accelerator, model), tokenizer, folder,
                         state_dict=state_dict)
        if not config.save_only_model:  # --save_only_model: the weights alone (not resumable)
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(scheduler.state_dict(), folder / "scheduler.pt")
            torch.save(rng_state(), folder / "rng_state.pth")
            if method_state:
                save_file({k: v.detach().cpu().contiguous() for k, v in method_state.items()},
                          str(folder / METHOD_STATE_FILE), metadata={"format": "pt"})
        (folder / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        (folder / NANOPOST_STATE_FILE).write_text(json.dumps(state.to_dict(), indent=2) + "\n")
        write_trainer_state_of(folder, state, config, output_dir)  # marks the folder complete
        integrity.write_manifest(folder)  # last: covers every file above

    def save() -> None:
        storage.atomic_folder(final, write, what=what)
        prune_checkpoints(output_dir, config.save_total_limit, spare=state.best_model_checkpoint)

    if accelerator.is_main_process:
        save()
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(folder: Path, accelerator: Accelerator, model, optimizer, scheduler,
                    use_peft: bool) -> TrainingState:
    """Weights, optimizer, schedule and RNG from `folder` into the live run; returns its TrainingState."""
    state = TrainingState.from_dict(read_state(folder))
    with integrity.reading(folder, what="the model weights in"):
        load_model_files(use_peft, plain_model(accelerator, model), folder)
    with integrity.reading(folder / "optimizer.pt", what="the optimizer state"):
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False, map_location="cpu"))
    with integrity.reading(folder / "scheduler.pt", what="the schedule state"):
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    with integrity.reading(folder / "rng_state.pth", what="the RNG state"):
        set_rng_state(torch.load(folder / "rng_state.pth", weights_only=False))
    return state


def read_method_state(folder: Path) -> dict[str, torch.Tensor] | None:
    """The method's own tensors saved in checkpoint `folder` (method_state.safetensors), or None if it has none."""
    path = folder / METHOD_STATE_FILE
    if not path.is_file():
        return None
    with integrity.reading(path, what="the method state"):
        return load_file(str(path))


def prune_checkpoints(output_dir: str | os.PathLike, keep: int | None, spare: str | None = None) -> None:
    """Keep the newest `keep` checkpoints, and `spare` (the best model's, as transformers keeps it)."""
    if keep is None or keep < 1:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        if spare is not None and old == Path(spare):
            continue
        # The completion marker goes first: a run killed mid-delete leaves a folder `latest` ignores, not a
        # half-deleted one that still looks complete.
        (old / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)
