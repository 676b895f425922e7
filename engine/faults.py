"""Stopping safely: on request (SIGTERM / Ctrl-C), or on a non-finite value before it reaches a checkpoint or the
final model.

    with stop_at_once(output_dir):      # the whole run: a signal stops it at once, with one line (`Interrupted`)
        ...prepare data, pre-compute the reference...
        with StopRequest(output_dir) as stop:  # the training steps: finish the step, checkpoint, then stop
            ...

Stopping at once is safe because every writer of the run is atomic (engine/storage.py): a file or folder being
written when the signal comes is removed on the way out, and what was written before stays whole.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from engine.errors import UserError


class Interrupted(KeyboardInterrupt):
    """A signal outside the training steps (data preparation, the reference pre-computation, the final save).

    A KeyboardInterrupt, not an Exception, so that no `except Exception` on the way (a data loader naming the row
    it failed on, a chat template's error wrapper) mistakes it for a failure of its own; train.py prints it as one
    line and exits 128 + the signal's number, as a shell does.
    """

    def __init__(self, signum: int, output_dir: Path) -> None:
        from engine.integrity import newest_whole_checkpoint
        from engine.storage import survival_sentence

        self.exit_code = 128 + signum
        survived = newest_whole_checkpoint(output_dir) if output_dir.is_dir() else None
        how_to_go_on = (survival_sentence(survived, "when you are ready") if survived is not None
                        else "run the same command again to start over")
        super().__init__(f"stopped by {signal.Signals(signum).name} before the run finished; nothing was left "
                         f"half-written (files being written were removed); {how_to_go_on}")


@contextmanager
def stop_at_once(output_dir: str | os.PathLike) -> Iterator[None]:
    """SIGTERM / SIGINT raise `Interrupted` wherever the run is (the training steps install `StopRequest` over it).
    Outside the main thread (a test runner's) signals cannot be handled there, and stay as they are."""

    def interrupt(signum, frame) -> None:
        raise Interrupted(signum, Path(output_dir))

    previous: dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, interrupt)
    except ValueError:
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StopRequest:
    """SIGTERM / Ctrl-C: finish the current step, checkpoint, exit with instructions (installed by the loop)."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)
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
        if self.requested:  # second signal: stop now (a checkpoint being written is removed, as any signal's)
            raise Interrupted(signum, self.output_dir)
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
