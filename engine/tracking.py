"""Metrics: accumulate per micro-batch, average per logging window, append to metrics.jsonl, forward to trackers.

TRL logs the mean of the per-micro-batch values collected since the last log; `MetricWindow` does the same.
Values are written at full precision (no rounding), one JSON object per logged step.

Trackers (`--report_to`) are accelerate's. As in TRL, trackio files the run under `--project` with the name
`--run_name`, in its local store (`TRACKIO_DIR`, default ~/.cache/huggingface/trackio): `trackio show` draws it.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

from engine.errors import UserError
from engine.storage import append_line, write_text_atomically, writing


def start_trackers(accelerator, config) -> None:
    """Start the trackers of `--report_to` (already checked to be installed) with the run's scalar settings."""
    if not config.report_to:
        return
    settings = {k: v for k, v in vars(config).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
    init_kwargs = {"trackio": {"name": config.run_name}} if config.run_name else {}
    try:
        accelerator.init_trackers(config.project, config=settings, init_kwargs=init_kwargs)
    except Exception as error:  # a tracker that is installed but cannot start (not logged in, no space left)
        raise UserError(f"--report_to {' '.join(config.report_to)}: could not start the tracker ({error})") from error


class MetricWindow:
    """Collects per-micro-batch metrics between two logs and averages them."""

    def __init__(self) -> None:
        self._values: dict[str, list[float]] = defaultdict(list)

    def add(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._values[key].append(float(value))

    def mean_and_reset(self) -> dict[str, float]:
        means = {key: math.fsum(values) / len(values) for key, values in self._values.items() if values}
        self._values.clear()
        return means

    def state_dict(self) -> dict[str, list[float]]:
        return {key: list(values) for key, values in self._values.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self._values = defaultdict(list, {key: list(values) for key, values in state.items()})


class MetricsWriter:
    """Appends one JSON line per log to `<output_dir>/metrics.jsonl`; only the main process writes."""

    def __init__(self, output_dir: str | os.PathLike, accelerator, resume_step: int = 0) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        if accelerator.is_main_process:
            with writing("metrics.jsonl", self.path):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the file reads as one uninterrupted run (and a last
        line cut short by a crash while it was appended)."""
        if not self.path.exists():
            return
        if step == 0:
            self.path.unlink()
            return
        kept = [line for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines()
                if (record := _record(line)) is not None and record.get("step", 0) <= step]
        write_text_atomically(self.path, "".join(line + "\n" for line in kept), what="metrics.jsonl")

    def write(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        append_line(self.path, json.dumps(record), what="metrics.jsonl")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.accelerator.trackers:
            self.accelerator.log(scalars, step=record["step"])


def _record(line: str) -> dict | None:
    """One metrics.jsonl line as a record; None for a blank line or one a crash cut short."""
    try:
        record = json.loads(line) if line.strip() else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]
