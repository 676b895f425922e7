"""Direct Preference Optimization: reference handling, log-probs, the loss call and TRL's metrics.

One micro-batch holds B pairs as 2B rows, [all chosen; all rejected], scored in one forward pass. Each row's
log-prob is the SUM of its completion tokens' log-probs (prompt and padding masked). The loss itself is a pure
function in losses/ picked by name (`--loss_type`), combined as Σ_k w_k · mean_batch(L_k) like TRL 1.16.

Where the reference log-probs come from: `self.reference.logps(batch)`, one object whatever its kind
(precomputed, a separate or copied frozen model, adapters off), built in `setup` by engine/reference.py. With
--sync_ref_model (TR-DPO) it follows the policy after optimizer steps (`after_optimizer_step`), and its weights
travel in checkpoints (`checkpoint_tensors`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from data.collate_dpo import completion_lengths, num_real_tokens
from engine.config import TrainConfig
from engine.errors import UserError
from engine.forward import LeanCausalLM
from engine.method import Method
from engine.ref_sync import should_sync
from engine.reference import Reference, build_reference
from engine.window import Window
from losses.logps import TokenStats


class DPOMethod(Method):
    name = "dpo"

    def __init__(self, config: TrainConfig, tokenizer, accelerator) -> None:
        from losses import needs_reference

        self.config = config
        self.tokenizer = tokenizer
        self.accelerator = accelerator
        self.loss_types = list(config.loss_type)
        self.loss_weights = list(config.loss_weights) if config.loss_weights else None
        self.options = config.loss_options()  # validated once, with the config
        # `sft` alone needs no reference for its loss, but TRL 1.16 still runs one and logs rewards/* as
        # β·(logp − ref logp); only a truly reference-free preference loss (simpo, orpo) skips it.
        self.reference_free = not needs_reference(self.loss_types) and set(self.loss_types) != {"sft"}
        self.reference: Reference | None = None  # built by `setup`; None for reference-free losses
        self.eval_examples = None

    # ------------------------------------------------------------------ data
    def prepare(self, dataset, *, split_name: str, shuffle_seed: int | None = None):
        from data.column_map import normalize_dpo_columns
        from data.dpo import prepare_dpo_dataset

        dataset = normalize_dpo_columns(dataset, self.config.dataset_column_map)
        examples, report = prepare_dpo_dataset(
            dataset, self.tokenizer, max_length=self.config.max_length, truncation_mode=self.config.truncation_mode,
            max_prompt_length=self.config.max_prompt_length,
        )
        for index, example in enumerate(examples):
            example["index"] = index  # key of the precomputed reference log-probs
        if split_name == self.config.dataset_test_split:
            self.eval_examples = examples
        return examples, report

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        from data.collate_dpo import collate_dpo
        from data.common import pad_multiple, resolve_pad_token_id

        # TRL truncates in the collator (each prompt+completion to max_length), not at preparation.
        batch = collate_dpo(examples, pad_token_id=resolve_pad_token_id(self.tokenizer),
                            max_length=self.config.max_length, truncation_mode=self.config.truncation_mode,
                            pad_to_multiple_of=pad_multiple(self.config.pad_to_multiple_of),
                            padding_free=self.config.padding_free)
        batch["index"] = torch.tensor([e["index"] for e in examples])
        return batch

    # ------------------------------------------------------------------ reference
    def setup(self, policy: LeanCausalLM, train_examples, accelerator) -> LeanCausalLM:
        """Build the reference (engine/reference.py) before step 1, while the policy is the starting model."""
        if not self.reference_free:
            self.reference = build_reference(self.config, policy, self.sequence_logps, accelerator, self.collate,
                                             train_examples, self.eval_examples)
        return policy

    def after_optimizer_step(self, policy: nn.Module, global_step: int) -> None:
        """TR-DPO (--sync_ref_model): after every ref_model_sync_steps-th step, as TRL's SyncRefModelCallback."""
        if self.config.sync_ref_model and should_sync(global_step, self.config.ref_model_sync_steps):
            self.reference.sync(policy, self.config.ref_model_mixup_alpha)

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """TR-DPO's reference has moved away from the starting model: a checkpoint holds its weights."""
        return self.reference.state_tensors() if self.config.sync_ref_model else {}

    def load_checkpoint_tensors(self, tensors: dict[str, Tensor] | None, global_step: int) -> None:
        if not self.config.sync_ref_model:
            if tensors:
                raise UserError("the checkpoint holds a TR-DPO reference (it was trained with --sync_ref_model); "
                                "resume with --sync_ref_model and the same --ref_model_* flags")
            return
        if tensors:
            self.reference.load_state_tensors(tensors)
        elif global_step >= self.config.ref_model_sync_steps:  # a sync happened, and its result was not saved
            raise UserError(f"--sync_ref_model: the checkpoint of step {global_step} holds no reference weights "
                            "(it was trained without --sync_ref_model); resume without it, or start again")

    @property
    def ref_model(self):
        """The reference model, when the reference is a model held in memory (the demo report generates with it)."""
        return None if self.reference is None else self.reference.model

    # ------------------------------------------------------------------ loss
    def sequence_logps(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Per-row summed completion log-probs (2B,) [chosen; rejected], LD-DPO-weighted with --ld_alpha.

        What the reference is scored with: log-probs only, none of the policy's metrics (entropy, mean logit,
        top-1), which would cost a pass over every (k, V) logit chunk each and are never read."""
        return self.score(model, batch, metrics=False)[0]

    def score(self, model: nn.Module, batch: dict[str, Tensor], metrics: bool = True) -> tuple[Tensor, TokenStats]:
        """Per-row summed completion log-probs (2B,) and the per-token statistics (each (2B, T-1)) of one forward;
        `metrics=False` (the reference): log-probs only, no metrics and no WPO log Σp²."""
        from losses import sequence_logps

        if isinstance(model, PreTrainedModel):
            model = LeanCausalLM(model)  # a plain transformers model (reports, scripts)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)  # (2B, T)
        stats = model(batch["input_ids"], labels, attention_mask=batch.get("attention_mask"),
                      position_ids=batch.get("position_ids"), sequence_index=batch.get("sequence_index"),
                      log_sum_sq_probs=self.config.use_weighting and metrics,
                      metrics=metrics)  # each (2B, T-1), zero off the completion
        return sequence_logps(stats.logps, stats.mask, self.config.ld_alpha), stats

    def window(self, batches: list[dict[str, Tensor]]) -> Window:
        """TRL's DPO convention: each micro-batch's loss is a batch mean, divided by the window's micro-batches."""
        return Window(num_micro_batches=len(batches))

    def loss(self, policy: nn.Module, batch: dict[str, Tensor], window: Window | None = None,
             train: bool = True) -> tuple[Tensor, dict[str, float]]:
        from losses import PreferenceBatch, preference_loss, wpo_weights

        sums, stats = self.score(policy, batch)  # (2B,), each (2B, T-1)
        chosen_logps, rejected_logps = sums.chunk(2)  # (B,), (B,)
        ref_chosen = ref_rejected = None
        if self.reference is not None:
            ref_chosen, ref_rejected = self.reference.logps(batch, train=train).to(sums.dtype).chunk(2)  # (B,), (B,)
        chosen_lengths, rejected_lengths = completion_lengths(batch).chunk(2)  # TRL: the unshifted mask
        pair = PreferenceBatch(
            chosen_logps=chosen_logps, rejected_logps=rejected_logps,
            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
            ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
            chosen_token_logps=stats.logps.chunk(2)[0], chosen_token_mask=stats.mask.chunk(2)[0],
        )
        weights = None
        if self.config.use_weighting:
            weights = wpo_weights(stats.logps.detach(), stats.log_sum_sq_probs, stats.mask)
        loss, loss_metrics = preference_loss(self.loss_types, self.loss_weights, pair, self.options,
                                             pair_weights=weights)
        if window is not None:
            loss = loss / window.num_micro_batches  # a mean of micro-batch means (TRL's DPO convention)
        return loss, self._metrics(batch, stats, loss_metrics, train)

    def _metrics(self, batch, stats, loss_metrics: dict[str, Tensor], train: bool) -> dict[str, float]:
        """TRL 1.16's DPO metrics for one micro-batch, over the pairs of every process.

        Token-level metrics are global sums divided by global counts; pair-level ones (rewards/*, logps/*) are
        the means computed by `preference_loss`, averaged over processes (equal per-process batch sizes).
        """
        mask = stats.mask  # (2B, T-1)
        chosen_mask, rejected_mask = mask.chunk(2)
        chosen_logits, rejected_logits = stats.mean_logits.chunk(2)  # (B, T-1) each, zero off the completion
        chosen_top1 = stats.is_top1.float().chunk(2)[0]  # (B, T-1)
        sums = torch.stack([
            stats.entropy[mask].sum(), mask.sum(), chosen_logits.sum(), chosen_mask.sum(), rejected_logits.sum(),
            rejected_mask.sum(), chosen_top1.sum(), num_real_tokens(batch),
        ]).detach().float()
        entropy, tokens, chosen_logit_sum, chosen_tokens, rejected_logit_sum, rejected_tokens, correct, seen = (
            self.accelerator.gather(sums.unsqueeze(0)).sum(0).tolist())

        def ratio(numerator: float, denominator: float) -> float:
            return numerator / denominator if denominator > 0 else 0.0

        pair_means = {k: v.detach().float() for k, v in loss_metrics.items() if k.split("/")[0] in ("rewards", "logps")}
        if pair_means:
            names = sorted(pair_means)
            gathered = self.accelerator.gather(torch.stack([pair_means[k] for k in names]).unsqueeze(0)).mean(0)
            pair_means = dict(zip(names, gathered.tolist(), strict=True))
        metrics = {
            "entropy": ratio(entropy, tokens),
            "logits/chosen": ratio(chosen_logit_sum, chosen_tokens),
            "logits/rejected": ratio(rejected_logit_sum, rejected_tokens),
            "mean_token_accuracy": ratio(correct, chosen_tokens),
            **pair_means,
        }
        if train:
            metrics["num_tokens"] = seen
        return metrics

    @torch.no_grad()
    def evaluate_batch(self, model, batch: dict[str, Tensor]) -> dict[str, float]:
        loss, metrics = self.loss(model, batch, train=False)
        return {"loss": float(loss), **metrics}

