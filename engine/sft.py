"""Supervised fine-tuning: data preparation hook-up and the per-micro-batch loss and metrics.

The loss of one optimizer step is Σ token NLL over the whole accumulation window / N, with N the number of target
tokens in the window on all processes (TRL 1.16, torchtune) — not a mean of per-micro-batch means, which would
over-weight short micro-batches. `window` counts N once per step; `losses.sft.sft_loss` forms the loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from engine.config import TrainConfig
from engine.method import Method
from engine.window import Window
from losses.sft import sft_loss


class SFTMethod(Method):
    name = "sft"

    def __init__(self, config: TrainConfig, tokenizer, accelerator) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.accelerator = accelerator
        self.padding_free = False

    # ------------------------------------------------------------------ data
    def prepare(self, dataset, *, split_name: str, shuffle_seed: int | None = None):
        from data.column_map import normalize_sft_columns
        from data.sft import prepare_sft_dataset

        dataset = normalize_sft_columns(dataset, self.config.dataset_column_map)
        examples, report = prepare_sft_dataset(
            dataset,
            self.tokenizer,
            max_length=self.config.max_length,
            completion_only_loss=self.config.completion_only_loss,
            assistant_only_loss=self.config.assistant_only_loss,
            dataset_text_field=self.config.dataset_text_field,
            packing=self.config.packing,
            packing_strategy=self.config.packing_strategy,
            truncation_mode=self.config.truncation_mode,
            shuffle_seed=shuffle_seed,
        )
        # --padding_free, or bfd packing (TRL turns it on for bfd): one row per batch, documents kept apart.
        self.padding_free = report.padding_free or self.config.padding_free
        return examples, report

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        from data.collate import collate_sft
        from data.common import pad_multiple, resolve_pad_token_id

        return collate_sft(examples, pad_token_id=resolve_pad_token_id(self.tokenizer), padding_free=self.padding_free,
                           pad_to_multiple_of=pad_multiple(self.config.pad_to_multiple_of))

    def window(self, batches: list[dict[str, Tensor]]) -> Window:
        """The window's target tokens on every process (the label of position t is predicted at t - 1)."""
        local = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches)
        num_targets = self.accelerator.gather(torch.tensor(local, device=self.accelerator.device)).sum()
        return Window(len(batches), num_targets.clamp(min=1), self.accelerator.num_processes)

    # ------------------------------------------------------------------ loss
    def loss(self, policy, batch: dict[str, Tensor], window: Window | None,
             train: bool = True) -> tuple[Tensor, dict[str, float]]:
        """Loss of one micro-batch (normalised by the window, see `sft_loss`) and its metrics."""
        stats = policy(batch["input_ids"], batch["labels"], attention_mask=batch.get("attention_mask"),
                       position_ids=batch.get("position_ids"))  # each (B, T-1)
        if window is None:  # evaluation: this batch's token mean
            loss = sft_loss(stats.logps, stats.mask)
        else:
            loss = sft_loss(stats.logps, stats.mask, window.num_targets, window.num_processes)
        # Metrics over the targets of every process (TRL gathers the sums, then divides).
        tokens = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].new_tensor(
            batch["input_ids"].numel())  # padding-free: every position is a real token
        sums = torch.stack([stats.entropy[stats.mask].sum(), stats.is_top1.sum(), stats.mask.sum(),
                            tokens.to(stats.logps.dtype)]).detach().float()
        entropy_sum, correct, targets, tokens = self.accelerator.gather(sums.unsqueeze(0)).sum(0).tolist()
        metrics = {
            "entropy": entropy_sum / targets if targets else 0.0,
            "mean_token_accuracy": correct / targets if targets else 0.0,
        }
        if train:
            metrics["num_tokens"] = tokens
        return loss, metrics

    @torch.no_grad()
    def evaluate_batch(self, model, batch: dict[str, Tensor]) -> dict[str, float]:
        loss, metrics = self.loss(model, batch, None, train=False)
        return {"loss": float(loss), **metrics}
