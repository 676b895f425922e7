"""What makes a resume exact, recorded in each checkpoint and compared when resuming.

A resumed run replays exactly the micro-batches an uninterrupted one would see only if the prepared training set,
the batch layout (per-device batch size, accumulation, number of processes), the sequence length, the seed, the
data order's settings (--data_seed, --group_by_length) and the optimizer (--optim) are the same.
`ResumeFingerprint.of_run` records them; `differences` says in words what changed; `check_resume` refuses unless
the user passed `--ignore_resume_mismatch`, and then returns the warning the run prints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import UserError

IGNORE_FLAG = "--ignore_resume_mismatch"


def fingerprint_examples(examples: Iterable[Mapping[str, Any]]) -> str:
    """sha256 of the prepared training set: every example's token-id lists (and other JSON-able fields), in order,
    keys sorted, so a change of data, tokenizer, chat template or max_length is seen."""
    digest = hashlib.sha256()
    for example in examples:
        plain = {key: value.tolist() if hasattr(value, "tolist") else value for key, value in example.items()}
        digest.update(json.dumps(plain, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class ResumeFingerprint:
    training_data: str  # fingerprint_examples of the prepared training set
    num_examples: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    num_processes: int
    max_length: int | None
    seed: int
    # The data order's own settings (engine/data_order.py); defaults for checkpoints written before they were kept.
    data_seed: int | None = None
    group_by_length: bool = False
    optim: str | None = None  # the optimizer whose state the checkpoint holds (None: not recorded)

    @classmethod
    def of_run(cls, examples: list[Mapping[str, Any]], config: Any, num_processes: int) -> ResumeFingerprint:
        return cls(training_data=fingerprint_examples(examples), num_examples=len(examples),
                   per_device_train_batch_size=config.per_device_train_batch_size,
                   gradient_accumulation_steps=config.gradient_accumulation_steps,
                   num_processes=num_processes, max_length=config.max_length, seed=config.seed,
                   data_seed=config.data_seed, group_by_length=config.group_by_length, optim=config.optim)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any] | None) -> ResumeFingerprint | None:
        """The fingerprint a checkpoint recorded; None if it has none (written before fingerprints existed)."""
        if not saved:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in saved.items() if key in names})


_WORDS = {
    "per_device_train_batch_size": "--per_device_train_batch_size",
    "gradient_accumulation_steps": "--gradient_accumulation_steps",
    "num_processes": "the number of processes",
    "max_length": "--max_length",
    "seed": "--seed",
    "data_seed": "--data_seed",
    "group_by_length": "--group_by_length",
    "optim": "--optim",
}


def differences(saved: ResumeFingerprint, current: ResumeFingerprint) -> list[str]:
    """What changed since the checkpoint, one phrase each ("--seed was 42, now 7"); empty when the resume is exact."""
    changed = []
    if saved.training_data != current.training_data:
        sizes = (f" ({saved.num_examples} examples then, {current.num_examples} now)"
                 if saved.num_examples != current.num_examples else " (same number of examples, different content)")
        changed.append("the prepared training data changed" + sizes)
    for name, words in _WORDS.items():
        before, now = getattr(saved, name), getattr(current, name)
        if before != now and not (name == "optim" and before is None):  # older checkpoints did not record it
            changed.append(f"{words} was {before}, now {now}")
    return changed


def check_resume(checkpoint: Path, saved: ResumeFingerprint | None, current: ResumeFingerprint,
                 ignore_mismatch: bool) -> str | None:
    """Refuse a resume that cannot be exact (one line with every difference) unless `ignore_mismatch`; returns the
    note the run prints (the resume is no longer exact, or cannot be checked), or None when it is exact."""
    if saved is None:
        return (f"{checkpoint} records no resume fingerprint (written by an older nanopost): cannot check that "
                "this resume is exact")
    changed = differences(saved, current)
    if not changed:
        return None
    if not ignore_mismatch:
        raise UserError(f"--resume_from_checkpoint {checkpoint}: this run would not continue it exactly: "
                        f"{'; '.join(changed)}; restore the original settings, or pass {IGNORE_FLAG} to continue "
                        "anyway (no longer an exact resume)")
    return (f"resuming from {checkpoint} with changes ({'; '.join(changed)}), as {IGNORE_FLAG} asks: this run is "
            "NOT an exact continuation (data order, batches and metrics differ from an uninterrupted run)")
