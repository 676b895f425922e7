"""The files a transformers / TRL Trainer reads and writes in a checkpoint folder, so that nanopost's folders read
like TRL's and a TRL checkpoint given to --resume_from_checkpoint is recognised for what it is.

    write_trainer_state(folder, ...)   trainer_state.json that `transformers.TrainerState.load_from_json` loads
    checkpoint_kind(folder)            "nanopost" | "trainer" | None, and `describe_trainer_checkpoint` for errors
    refuse_trainer_checkpoint(folder)  --resume_from_checkpoint: one line saying what a Trainer checkpoint is

nanopost's own resume bookkeeping (data position, metric window, method) lives in a file of its own
(`NANOPOST_STATE_FILE`, written by engine/checkpoint.py), so trainer_state.json can hold exactly TrainerState's fields.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.storage import write_text_atomically

TRAINER_STATE_FILE = "trainer_state.json"
NANOPOST_STATE_FILE = "nanopost_state.json"
# What a transformers Trainer writes next to trainer_state.json (any one of them marks a Trainer checkpoint).
TRAINER_FILES = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth")


def write_trainer_state(folder: str | os.PathLike, *, global_step: int, epoch: float, max_steps: int,
                        num_train_epochs: float, log_history: list[dict[str, Any]], config,
                        num_input_tokens_seen: int = 0, best_metric: float | None = None,
                        best_global_step: int | None = None, best_model_checkpoint: str | None = None) -> Path:
    """Write TrainerState's fields. `log_history`: our metrics.jsonl records (each has "step"), in order."""
    state = {
        "epoch": epoch, "global_step": global_step, "max_steps": max_steps,
        "logging_steps": config.logging_steps, "eval_steps": config.eval_steps or config.logging_steps,
        "save_steps": config.save_steps, "train_batch_size": config.per_device_train_batch_size,
        "num_train_epochs": num_train_epochs, "num_input_tokens_seen": num_input_tokens_seen, "total_flos": 0,
        "log_history": [dict(record) for record in log_history],
        "best_metric": best_metric, "best_global_step": best_global_step,
        "best_model_checkpoint": best_model_checkpoint,
        "is_local_process_zero": True, "is_world_process_zero": True, "is_hyper_param_search": False,
        "trial_name": None, "trial_params": None, "stateful_callbacks": {},
    }
    path = Path(folder) / TRAINER_STATE_FILE
    write_text_atomically(path, json.dumps(state, indent=2, sort_keys=True) + "\n", what=TRAINER_STATE_FILE)
    return path


def checkpoint_kind(folder: str | os.PathLike) -> str | None:
    """"nanopost" (our bookkeeping file), "trainer" (a transformers/TRL Trainer checkpoint) or None."""
    folder = Path(folder)
    if (folder / NANOPOST_STATE_FILE).is_file():
        return "nanopost"
    state_file = folder / TRAINER_STATE_FILE
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(state, dict) and "method" in state and "log_history" not in state:
        return "nanopost"  # written before NANOPOST_STATE_FILE existed: our keys in trainer_state.json
    if isinstance(state, dict) and "log_history" in state and "global_step" in state:
        return "trainer"
    return None


def describe_trainer_checkpoint(folder: str | os.PathLike) -> str:
    """One line naming what a Trainer checkpoint holds: its step, its weights, its Trainer files."""
    folder = Path(folder)
    state = json.loads((folder / TRAINER_STATE_FILE).read_text())
    weights = "LoRA adapter" if (folder / "adapter_model.safetensors").is_file() else (
        "full model" if any(folder.glob("model*.safetensors")) else "no weights")
    files = [name for name in TRAINER_FILES if (folder / name).is_file()]
    return (f"a transformers/TRL Trainer checkpoint at step {state['global_step']} "
            f"(epoch {state.get('epoch', 0):g}; {weights}; {', '.join(files) or 'no optimizer state'})")


def refuse_trainer_checkpoint(folder: str | os.PathLike) -> None:
    """--resume_from_checkpoint with a transformers/TRL Trainer checkpoint: say what it is and what works instead
    (its weights load as a starting model), rather than failing on our bookkeeping keys it does not have."""
    if checkpoint_kind(folder) == "trainer":
        raise UserError(f"--resume_from_checkpoint {folder}: {describe_trainer_checkpoint(folder)}; resuming its "
                        f"optimizer and data position is not supported: start a new run from its weights with "
                        f"--model_name_or_path {folder}")
