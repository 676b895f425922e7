"""Direct Preference Optimization: reference handling, log-probs, the loss call and TRL's metrics.

One micro-batch holds B pairs as 2B rows, [all chosen; all rejected], scored in one forward pass. Each row's
log-prob is the SUM of its completion tokens' log-probs (prompt and padding masked). The loss itself is a pure
function in losses/ picked by name (`--loss_type`), combined as Σ_k w_k · mean_batch(L_k) like TRL 1.16.

The reference is, in order of precedence: precomputed log-probs (`--precompute_ref_log_probs`, cached on disk),
an explicit `--ref_model_name_or_path`, the policy with its LoRA adapters switched off (`--use_peft`), or a frozen
in-memory copy of the starting model (never re-read from disk).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.config import TrainConfig
from engine.errors import UserError
from engine.forward import scatter_to_rows, token_stats
from engine.method import Method


class DPOMethod(Method):
    name = "dpo"
    normalise_by_window_tokens = False  # each micro-batch loss is divided by the number of micro-batches

    def __init__(self, config: TrainConfig, tokenizer, accelerator) -> None:
        from losses import LossOptions, needs_reference, validate_loss_config

        self.config = config
        self.tokenizer = tokenizer
        self.accelerator = accelerator
        self.loss_types = list(config.loss_type)
        self.loss_weights = list(config.loss_weights) if config.loss_weights else None
        self.options = LossOptions(
            beta=config.beta,
            label_smoothing=config.label_smoothing,
            f_divergence_type=config.f_divergence_type,
            f_alpha_divergence_coef=config.f_alpha_divergence_coef,
            discopop_tau=config.discopop_tau,
            simpo_gamma=config.simpo_gamma,
        )
        validate_loss_config(self.loss_types, self.loss_weights, self.options, use_weighting=config.use_weighting,
                             ld_alpha=config.ld_alpha)
        # `sft` alone needs no reference for its loss, but TRL 1.16 still runs one and logs rewards/* as
        # β·(logp − ref logp); only a truly reference-free preference loss (simpo, orpo) skips it.
        self.reference_free = not needs_reference(self.loss_types) and set(self.loss_types) != {"sft"}
        self.ref_model = None
        self.ref_logps: dict[int, tuple[float, float]] | None = None  # precomputed, training split
        self.eval_ref_logps: dict[int, tuple[float, float]] | None = None  # precomputed, held-out split
        self.eval_examples = None

    # ------------------------------------------------------------------ data
    def prepare(self, dataset, *, split_name: str, shuffle_seed: int | None = None):
        from data.column_map import normalize_dpo_columns
        from data.dpo import prepare_dpo_dataset

        dataset = normalize_dpo_columns(dataset, self.config.dataset_column_map)
        examples, report = prepare_dpo_dataset(
            dataset, self.tokenizer, max_length=self.config.max_length, truncation_mode=self.config.truncation_mode
        )
        for index, example in enumerate(examples):
            example["index"] = index  # key of the precomputed reference log-probs
        if split_name == self.config.dataset_test_split:
            self.eval_examples = examples
        return examples, report

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        from data.collate_dpo import collate_dpo
        from data.common import resolve_pad_token_id

        # TRL truncates in the collator (each prompt+completion to max_length), not at preparation.
        batch = collate_dpo(examples, pad_token_id=resolve_pad_token_id(self.tokenizer),
                            max_length=self.config.max_length, truncation_mode=self.config.truncation_mode)
        batch["index"] = torch.tensor([e["index"] for e in examples])
        return batch

    # ------------------------------------------------------------------ reference
    def setup(self, model, train_examples, accelerator):
        """Build the reference before training (a copy of the starting weights), or precompute its log-probs."""
        if self.reference_free:
            return model
        config = self.config
        if config.ref_model_name_or_path is not None:
            from engine.model import load_model
            from engine.setup import disable_dropout

            self.ref_model = load_model(config.ref_model_name_or_path, revision=config.model_revision,
                                        trust_remote_code=config.trust_remote_code,
                                        attn_implementation=config.attn_implementation,
                                        what="--ref_model_name_or_path")
            disable_dropout(self.ref_model)
        elif not config.use_peft and not config.precompute_ref_log_probs:
            self.ref_model = copy.deepcopy(model)  # the starting weights, frozen, in memory
        # With --precompute_ref_log_probs and no other reference, the policy still holds the starting weights
        # here: it scores itself once below, so no copy of the model is ever made.
        if self.ref_model is not None:
            self.ref_model.requires_grad_(False).eval().to(accelerator.device)
            if hasattr(self.ref_model, "gradient_checkpointing_disable"):
                self.ref_model.gradient_checkpointing_disable()
        if config.precompute_ref_log_probs:
            self.ref_logps = self._precomputed_ref_logps(model, train_examples, accelerator)
            if self.eval_examples:  # the held-out split's reference too, while it is at hand (not cached)
                self.eval_ref_logps = self._reference_logps_of(model, self.eval_examples, accelerator)
            self.ref_model = None  # an explicit reference model is not needed any more: free its memory
        return model

    def _reference_forward(self, model, batch: dict[str, Tensor]):
        """Reference log-prob sums (2B,) under no grad."""
        from lora import disable_adapters

        with torch.no_grad():
            if self.ref_model is not None:
                return self._sequence_logps(self.ref_model, batch)[0]
            if not self.config.use_peft:  # the precompute pass, before step 1: the policy is the starting model
                return self._sequence_logps(model, batch)[0]
            with disable_adapters(self.accelerator.unwrap_model(model)):
                return self._sequence_logps(model, batch)[0]

    def _precomputed_ref_logps(self, model, examples, accelerator) -> dict[int, tuple[float, float]]:
        """Reference log-probs of every training pair, computed once and cached on disk next to the output.

        The cache file is named after the run's model/data/max_length and carries fingerprints of the reference
        weights and of the tokenized data; a file whose fingerprints do not match is refused (stale), not used.
        """
        config = self.config
        key = hashlib.sha256(json.dumps([config.model_name_or_path, config.ref_model_name_or_path,
                                         config.dataset_name, config.dataset_train_split, config.max_length,
                                         config.ld_alpha, config.use_peft]).encode()).hexdigest()[:16]
        path = Path(config.output_dir) / f"ref_logps-{key}.pt"
        reference = self.ref_model if self.ref_model is not None else accelerator.unwrap_model(model)
        fingerprint = {"model": _weights_fingerprint(reference, adapters_off=self.ref_model is None),
                       "data": _data_fingerprint(examples), "ld_alpha": config.ld_alpha}
        if path.is_file():
            saved = torch.load(path, weights_only=False)
            if saved["fingerprint"] != fingerprint:
                changed = [k for k in fingerprint if saved["fingerprint"].get(k) != fingerprint[k]]
                raise UserError(
                    f"precomputed reference log-probs in {path} are stale (the {' and '.join(changed)} changed "
                    f"since they were computed); delete that file to recompute them"
                )
            if accelerator.is_main_process:
                print(f"[nanopost] reusing precomputed reference log-probs from {path}", flush=True)
            return saved["logps"]
        logps = self._reference_logps_of(model, examples, accelerator)
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"fingerprint": fingerprint, "logps": logps}, tmp)
            tmp.replace(path)
            print(f"[nanopost] precomputed reference log-probs for {len(logps)} pairs -> {path}", flush=True)
        return logps

    def _reference_logps_of(self, model, examples, accelerator) -> dict[int, tuple[float, float]]:
        """Reference (chosen, rejected) log-prob sums of every example, keyed by its index, in one unshuffled pass
        (every process computes the same)."""
        logps: dict[int, tuple[float, float]] = {}
        batch_size = self.config.precompute_ref_batch_size or self.config.per_device_train_batch_size  # as TRL
        for start in range(0, len(examples), batch_size):
            batch = self.collate(examples[start : start + batch_size])
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                sums = self._reference_forward(model, batch)
            chosen, rejected = sums.float().chunk(2)
            for index, c, r in zip(batch["index"].tolist(), chosen.tolist(), rejected.tolist(), strict=True):
                logps[index] = (c, r)
        return logps

    # ------------------------------------------------------------------ loss
    def _sequence_logps(self, model, batch: dict[str, Tensor]):
        """Per-row summed completion log-probs (2B,) (LD-DPO-weighted with --ld_alpha), and the token stats."""
        from losses import sequence_logps

        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)  # (2B, T)
        stats = token_stats(model, batch["input_ids"], labels, attention_mask=batch["attention_mask"],
                            want_log_sum_sq=self.config.use_weighting)
        per_token = scatter_to_rows(stats.logps, stats.mask)  # (2B, T-1), zero off the completion
        return sequence_logps(per_token, stats.mask, self.config.ld_alpha), per_token, stats

    def loss(self, model, batch: dict[str, Tensor], num_items_in_batch=None,
             train: bool = True) -> tuple[Tensor, dict[str, float]]:
        from losses import PreferenceBatch, preference_loss, wpo_weights

        sums, per_token, stats = self._sequence_logps(model, batch)
        chosen_logps, rejected_logps = sums.chunk(2)  # (B,), (B,)
        if self.reference_free:
            ref_chosen = ref_rejected = None
        elif (table := self.ref_logps if train else self.eval_ref_logps) is not None:
            pairs = torch.tensor([table[i] for i in batch["index"].tolist()], device=sums.device)
            ref_chosen, ref_rejected = pairs[:, 0].to(sums.dtype), pairs[:, 1].to(sums.dtype)
        else:
            ref_chosen, ref_rejected = self._reference_forward(model, batch).chunk(2)
        chosen_lengths, rejected_lengths = batch["completion_mask"].sum(-1).chunk(2)  # TRL: the unshifted mask
        pair = PreferenceBatch(
            chosen_logps=chosen_logps, rejected_logps=rejected_logps,
            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
            ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
            chosen_token_logps=per_token.chunk(2)[0], chosen_token_mask=stats.mask.chunk(2)[0],
        )
        weights = None
        if self.config.use_weighting:
            weights = wpo_weights(per_token.detach(), scatter_to_rows(stats.log_sum_sq, stats.mask), stats.mask)
        loss, loss_metrics = preference_loss(self.loss_types, self.loss_weights, pair, self.options,
                                             pair_weights=weights)
        return loss, self._metrics(batch, stats, loss_metrics, train)

    def _metrics(self, batch, stats, loss_metrics: dict[str, Tensor], train: bool) -> dict[str, float]:
        """TRL 1.16's DPO metrics for one micro-batch, over the pairs of every process.

        Token-level metrics are global sums divided by global counts; pair-level ones (rewards/*, logps/*) are
        the means computed by `preference_loss`, averaged over processes (equal per-process batch sizes).
        """
        mask = stats.mask  # (2B, T-1)
        chosen_mask, rejected_mask = mask.chunk(2)
        chosen_logits, rejected_logits = scatter_to_rows(stats.logit_mean, mask).chunk(2)
        chosen_top1 = scatter_to_rows(stats.is_top1.float(), mask).chunk(2)[0]
        sums = torch.stack([
            stats.entropy.sum(), mask.sum(), chosen_logits.sum(), chosen_mask.sum(), rejected_logits.sum(),
            rejected_mask.sum(), chosen_top1.sum(), batch["attention_mask"].sum(),
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


def _weights_fingerprint(model: torch.nn.Module, adapters_off: bool = False) -> str:
    """A cheap fingerprint of the weights: shapes plus a strided sample of every tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if adapters_off and "lora_" in name:
            continue
        flat = tensor.detach().reshape(-1)
        step = max(flat.numel() // 4096, 1)
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _data_fingerprint(examples: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            digest.update(json.dumps(example[key]).encode())
    return digest.hexdigest()

