"""What a training method (SFT, DPO) is to the loop: the interface every method implements.

The loop knows nothing else about a method. A method turns raw rows into examples and examples into batches,
computes one micro-batch's loss and metrics, and may prepare something once before step 1 (DPO: its reference).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import Tensor


class Method(ABC):
    """A post-training method, as the loop (engine/loop.py) calls it."""

    name: str
    # True (SFT): each micro-batch's loss is divided by the target tokens of the whole window on every process,
    # which the loop counts with `count_targets`. False (DPO): each micro-batch loss is a batch mean and the loop
    # averages the window's micro-batches.
    normalise_by_window_tokens: bool

    @abstractmethod
    def prepare(self, dataset, *, split_name: str, shuffle_seed: int | None = None) -> tuple[list[dict], Any]:
        """Tokenize one split: (examples, a report whose `summary()` the loop prints for the training split)."""

    @abstractmethod
    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Pad a list of examples into one batch of tensors."""

    def count_targets(self, batch: dict[str, Tensor]) -> int:
        """Tokens that carry loss in `batch` (only called when `normalise_by_window_tokens`)."""
        raise NotImplementedError(f"{type(self).__name__} does not normalise by the window's tokens")

    def setup(self, model: torch.nn.Module, train_examples: list[dict], accelerator) -> torch.nn.Module:
        """Once, after the data is prepared and before the optimizer exists; returns the model to train."""
        return model

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, Tensor], num_items_in_batch: Tensor | None,
             train: bool = True) -> tuple[Tensor, dict[str, float]]:
        """One micro-batch: (loss to backpropagate, metrics; with train=True they include `num_tokens`)."""

    @abstractmethod
    def evaluate_batch(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> dict[str, float]:
        """One held-out batch's metrics (`loss` and the method's others), without gradients."""



def call_through(model, accelerator, fn: Callable[[torch.nn.Module], Any]) -> Any:
    """Run `fn(plain_model)` as the forward of the prepared (possibly wrapped) model, and return its result.

    The methods call the plain model's decoder and LM head (engine/forward.py's lean head), not its forward.
    But DDP all-reduces gradients, FSDP gathers sharded weights and DeepSpeed hooks in only when the prepared
    model itself is called: calling the plain model directly would fail on a DDP wrapper, train each process on
    its own gradients, or fail on sharded weights (FSDP). So the plain model's `forward` is `fn` for the length
    of one call of the prepared model; with one process and no wrapper this is just `fn(model)`.
    """
    plain = accelerator.unwrap_model(model)
    own = plain.__dict__.get("forward")  # accelerate's autocast wrapper, if any; restored below
    plain.forward = lambda *args, **kwargs: fn(plain)
    try:
        return model()
    finally:
        if own is None:
            del plain.forward
        else:
            plain.forward = own
