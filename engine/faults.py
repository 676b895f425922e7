"""Stopping safely: on request (SIGTERM / Ctrl-C) after the current step, or on a non-finite value before it
reaches a checkpoint or the final model."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from engine.errors import UserError


class StopRequest:
    """SIGTERM / Ctrl-C: finish the current step, checkpoint, exit with instructions (installed by the loop)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under a test runner thread): no handler
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n[nanopost] received signal {signum}: finishing this step, then saving a checkpoint.", flush=True)

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether to stop now, the same answer on every process: a signal can reach the processes at different
        moments (or only one of them), and a process that saved and exited while another ran on would hang both."""
        if accelerator.num_processes == 1:
            return self.requested
        flags = accelerator.gather(torch.tensor([int(self.requested)], device=accelerator.device))
        return bool(flags.max())

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_finite(value: torch.Tensor, step: int, what: str, last_checkpoint: Path | None) -> None:
    if not torch.isfinite(torch.as_tensor(value)).all():
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
        raise UserError(
            f"non-finite {what} at step {step}: stopping before it corrupts the model ({where}); "
            "try a lower --learning_rate, --max_grad_norm 1.0, or check the data"
        )


def check_finite_weights(accelerator: Accelerator, model, step: int, last_checkpoint: Path | None) -> None:
    """Refuse to write a checkpoint or final model holding non-finite weights.

    Finite gradients can still give non-finite weights (e.g. --learning_rate 1e39 is finite in Python but inf in
    fp32), and after the last step no further loss would reveal it; checked only when saving, so it costs nothing
    per step. Every process gets the same answer (a sharded model holds different weights on each), so all stop.
    """
    bad = [name for name, param in model.named_parameters()
           if param.requires_grad and not bool(torch.isfinite(param.detach()).all())]
    any_bad = bool(bad)
    if accelerator.num_processes > 1:
        any_bad = bool(accelerator.gather(torch.tensor([int(any_bad)], device=accelerator.device)).max())
    if any_bad:
        where = bad[0] if bad else "on another process"
        check_finite(torch.tensor(float("nan")), step, f"weights ({where}) after the optimizer step", last_checkpoint)
