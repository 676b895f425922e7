"""What a training method (SFT, DPO) is to the loop: the interface every method implements.

The loop knows nothing else about a method. A method turns raw rows into examples and examples into batches,
computes one micro-batch's loss and metrics, and may prepare something once before step 1 (DPO: its reference).
A method may also act after each optimizer step (TR-DPO: the reference follows the policy) and keep state that a
checkpoint must carry (`checkpoint_tensors`, restored on resume by `load_checkpoint_tensors`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor, nn

from engine.forward import LeanCausalLM
from engine.window import Window


class Method(ABC):
    """A post-training method, as the loop (engine/loop.py) calls it."""

    name: str

    @abstractmethod
    def prepare(self, dataset, *, split_name: str, shuffle_seed: int | None = None) -> tuple[list[dict], Any]:
        """Tokenize one split: (examples, a report whose `summary()` the loop prints for the training split)."""

    @abstractmethod
    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Pad a list of examples into one batch of tensors."""

    def setup(self, policy: LeanCausalLM, train_examples: list[dict], accelerator) -> LeanCausalLM:
        """Once, after the data is prepared and before the optimizer exists; returns the model to train."""
        return policy

    @abstractmethod
    def window(self, batches: list[dict[str, Tensor]]) -> Window:
        """What each micro-batch's loss of this accumulation window is normalised by (engine/window.py)."""

    @abstractmethod
    def loss(self, policy: nn.Module, batch: dict[str, Tensor], window: Window | None,
             train: bool = True) -> tuple[Tensor, dict[str, float]]:
        """One micro-batch: (loss to backpropagate, metrics; with train=True they include `num_tokens`).

        `policy` is what accelerate prepared (a `LeanCausalLM`, maybe wrapped by DDP/FSDP): calling it returns the
        per-token statistics. `window` is None in evaluation (the batch's own mean)."""

    @abstractmethod
    def evaluate_batch(self, policy: nn.Module, batch: dict[str, Tensor]) -> dict[str, float]:
        """One held-out batch's metrics (`loss` and the method's others), without gradients."""

    def after_optimizer_step(self, policy: nn.Module, global_step: int) -> None:
        """After optimizer step `global_step` (1-based), with the plain (unwrapped) policy. Default: nothing."""
        return None

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """State of the method itself that a checkpoint must hold to resume exactly (default: none)."""
        return {}

    def load_checkpoint_tensors(self, tensors: dict[str, Tensor] | None, global_step: int) -> None:
        """On resume: what `checkpoint_tensors` saved in the checkpoint of step `global_step` (None: none saved)."""
        return None
