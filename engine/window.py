"""The accumulation window: the micro-batches of one optimizer step, as a method's loss needs to know them."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Window:
    """What each micro-batch's loss is normalised by (built once per step by the method's `window(batches)`).

    Attributes:
        num_micro_batches: micro-batches in the window (DPO divides each batch-mean loss by it, as TRL).
        num_targets: target tokens in the window on ALL processes (SFT divides its summed NLL by it), or None.
        num_processes: data-parallel processes whose gradients are averaged (SFT multiplies back by it).
    """

    num_micro_batches: int
    num_targets: Tensor | None = None
    num_processes: int = 1
