"""DPO's reference: one object, one method, whatever its kind.

    reference = build_reference(config, policy, ...)  # before step 1
    ref_chosen, ref_rejected = reference.logps(batch).chunk(2)   # (B,), (B,), no grad

Kinds (`build_reference` picks one, in this order of precedence):
- `Precomputed`: a table of every pair's reference log-probs (`--precompute_ref_log_probs`), computed once before
  step 1 and cached on disk; the reference model is then freed.
- `FrozenModel`: a separate model (`--ref_model_name_or_path`), or a frozen in-memory copy of the starting policy
  (never re-read from disk).
- `AdaptersOff`: the policy itself with its LoRA adapters switched off (`--use_peft`): the base model, no copy.

The timing rule: before step 1 the policy IS the starting model. `Precomputed` relies on it (without another
reference model it scores the policy itself, and never copies it), and `FrozenModel` copies the policy then.
Both happen in `build_reference`, which the engine calls before the optimizer exists (see `DPOMethod.setup`).

TR-DPO (`--sync_ref_model`, engine/ref_sync.py): `sync(policy, alpha)` moves the reference towards the policy after
every `--ref_model_sync_steps`-th optimizer step. Only a `FrozenModel` can follow (its weights are its own, and are
saved in each checkpoint: `state_tensors` / `load_state_tensors`); the other kinds are refused before step 1 with
the reason (`cannot_sync`), as TRL 1.16 refuses PEFT and precomputed references.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from engine import integrity, storage
from engine.errors import UserError
from engine.forward import LeanCausalLM
from engine.ref_sync import sync_reference

# (model, batch) -> per-row summed completion log-probs [chosen; rejected], (2B,): DPOMethod.sequence_logps
SequenceScorer = Callable[[nn.Module, dict[str, Tensor]], Tensor]


class Reference:
    """Reference log-probs for a batch of pairs: `logps(batch)` -> (2B,) [chosen; rejected], no grad."""

    model: nn.Module | None = None  # the reference model, when there is one (for reports)

    def logps(self, batch: dict[str, Tensor], train: bool = True) -> Tensor:
        raise NotImplementedError

    # Why this kind of reference cannot follow the policy (TR-DPO), or None when it can.
    cannot_sync: str | None = "this reference cannot follow the policy"

    def sync(self, policy: nn.Module, alpha: float) -> None:
        """TR-DPO: θ_ref ← α·θ_policy + (1 − α)·θ_ref, with `policy` the plain (unwrapped) policy model."""
        raise RuntimeError(f"--sync_ref_model: {self.cannot_sync}")

    def state_tensors(self) -> dict[str, Tensor]:
        """The reference's weights, when they change during the run (TR-DPO) and a checkpoint must hold them."""
        raise RuntimeError(f"--sync_ref_model: {self.cannot_sync}")

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        raise RuntimeError(f"--sync_ref_model: {self.cannot_sync}")


class FrozenModel(Reference):
    """A frozen model scored like the policy: a separate model, or a copy of the starting policy."""

    def __init__(self, model: nn.Module, score: SequenceScorer, device: torch.device) -> None:
        # eval(): no dropout, ever (nothing switches a reference back to training mode).
        self.model = model.requires_grad_(False).eval().to(device)
        if hasattr(self.model, "gradient_checkpointing_disable"):
            self.model.gradient_checkpointing_disable()
        self._lean = LeanCausalLM(self.model)
        self._score = score

    cannot_sync = None

    @torch.no_grad()
    def logps(self, batch: dict[str, Tensor], train: bool = True) -> Tensor:
        return self._score(self._lean, batch)

    def sync(self, policy: nn.Module, alpha: float) -> None:
        sync_reference(policy, self.model, alpha)

    def state_tensors(self) -> dict[str, Tensor]:
        # Parameters only (buffers such as rotary frequencies never change); tied weights appear once.
        return {name: param.detach() for name, param in self.model.named_parameters()}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        params = dict(self.model.named_parameters())
        if set(tensors) != set(params) or any(tensors[n].shape != p.shape for n, p in params.items()):
            raise UserError("the checkpoint's TR-DPO reference weights do not match this run's reference model "
                            "(another --ref_model_name_or_path?); resume with the flags of the run that saved it")
        for name, param in params.items():
            param.copy_(tensors[name])


class AdaptersOff(Reference):
    """The policy with its LoRA adapters switched off: the base model it started from, no second copy."""

    cannot_sync = ("with --use_peft the reference is the base model under the adapters, which the adapters "
                   "cannot move (TRL 1.16 refuses sync_ref_model with PEFT too); train the full model for TR-DPO")

    def __init__(self, policy: LeanCausalLM, score: SequenceScorer) -> None:
        self._policy = policy
        self._score = score

    @torch.no_grad()
    def logps(self, batch: dict[str, Tensor], train: bool = True) -> Tensor:
        from lora import disable_adapters

        with disable_adapters(self._policy.causal_lm):
            return self._score(self._policy, batch)


class Precomputed(Reference):
    """Reference log-probs looked up by each pair's `index`: the training table, or the held-out one."""

    cannot_sync = ("precomputed reference log-probs are fixed before step 1 (TRL 1.16 refuses the combination "
                   "too); drop --precompute_ref_log_probs for TR-DPO")

    def __init__(self, train_table: dict[int, tuple[float, float]],
                 eval_table: dict[int, tuple[float, float]] | None) -> None:
        self.train_table, self.eval_table = train_table, eval_table

    def logps(self, batch: dict[str, Tensor], train: bool = True) -> Tensor:
        table = self.train_table if train else self.eval_table
        if table is None:
            raise RuntimeError("no precomputed reference log-probs for the held-out split")
        pairs = torch.tensor([table[i] for i in batch["index"].tolist()], device=batch["input_ids"].device)  # (B, 2)
        return torch.cat([pairs[:, 0], pairs[:, 1]])  # (2B,) fp32, [chosen; rejected]


def build_reference(config, policy: LeanCausalLM, score: SequenceScorer, accelerator, collate,
                    train_examples, eval_examples) -> Reference:
    """The run's reference, built before step 1 while `policy` still holds the starting weights."""
    if config.ref_model_name_or_path is not None:
        from engine.model import load_model, torch_dtype

        # In --dtype, as TRL loads a named reference with the policy's model_init_kwargs.
        model = load_model(config.ref_model_name_or_path, revision=config.model_revision,
                           trust_remote_code=config.trust_remote_code, dtype=torch_dtype(config.dtype),
                           attn_implementation=config.attn_implementation, what="--ref_model_name_or_path")
        reference: Reference = FrozenModel(model, score, accelerator.device)
    elif config.use_peft:
        reference = AdaptersOff(policy, score)
    elif config.precompute_ref_log_probs:
        reference = _StartingPolicy(policy, score)  # scored once below, so the policy is never copied
    else:
        reference = FrozenModel(copy.deepcopy(policy.causal_lm), score, accelerator.device)
    if config.sync_ref_model:  # (config_checks already refuses it with --precompute_ref_log_probs / --use_peft)
        check_can_sync(Precomputed if config.precompute_ref_log_probs else reference, policy, accelerator,
                       config.ref_model_name_or_path)
    if not config.precompute_ref_log_probs:
        return reference
    table = _cached_table(config, reference, policy, accelerator, collate, train_examples)
    eval_table = None
    if eval_examples:  # the held-out split's reference too, while it is at hand (not cached)
        eval_table = _reference_table(reference, accelerator, collate, eval_examples, config)
    return Precomputed(table, eval_table)  # any reference model is not needed any more: its memory is freed


def check_can_sync(reference: Reference | type[Reference], policy: LeanCausalLM, accelerator, ref_name: str | None) -> None:
    """Before step 1: refuse `--sync_ref_model` (one line, why, what instead) where the reference cannot follow."""
    from engine.setup import is_sharded

    if reference.cannot_sync is not None:
        raise UserError(f"--sync_ref_model: {reference.cannot_sync}")
    if is_sharded(accelerator):
        raise UserError(f"--sync_ref_model with {accelerator.distributed_type.value} is not supported (the policy "
                        "is sharded, the reference is not); use plain data parallel: "
                        "--config_file configs/accelerate/ddp_gpu.yaml")
    policy_shapes = [tuple(p.shape) for p in policy.causal_lm.parameters()]
    reference_shapes = [tuple(p.shape) for p in reference.model.parameters()]
    if policy_shapes != reference_shapes:
        raise UserError(f"--sync_ref_model: --ref_model_name_or_path {ref_name} has another architecture than the "
                        f"policy ({len(reference_shapes)} parameter tensors of "
                        f"{sum(math.prod(s) for s in reference_shapes):,} values, the policy "
                        f"{len(policy_shapes)} of {sum(math.prod(s) for s in policy_shapes):,}), so it cannot be "
                        "mixed with it; give a reference of the policy's architecture, or none")


class _StartingPolicy(Reference):
    """The policy before step 1, which IS the starting model: valid only inside `build_reference`."""

    def __init__(self, policy: LeanCausalLM, score: SequenceScorer) -> None:
        self._policy, self._score = policy, score

    @torch.no_grad()
    def logps(self, batch: dict[str, Tensor], train: bool = True) -> Tensor:
        # No gradient has been computed yet, so no optimizer step has changed the weights.
        assert all(p.grad is None for p in self._policy.parameters()), "the policy has trained: not the start"
        return self._score(self._policy, batch)


def _reference_table(reference: Reference, accelerator, collate, examples, config) -> dict[int, tuple[float, float]]:
    """Reference (chosen, rejected) log-prob sums of every example, keyed by its index, in one unshuffled pass
    (every process computes the same)."""
    logps: dict[int, tuple[float, float]] = {}
    batch_size = config.precompute_ref_batch_size or config.per_device_train_batch_size  # as TRL
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            sums = reference.logps(batch)
        chosen, rejected = sums.float().chunk(2)
        for index, c, r in zip(batch["index"].tolist(), chosen.tolist(), rejected.tolist(), strict=True):
            logps[index] = (c, r)
    return logps


def _cached_table(config, reference: Reference, policy: LeanCausalLM, accelerator, collate,
                  examples) -> dict[int, tuple[float, float]]:
    """The training pairs' reference log-probs, computed once and cached on disk next to the output.

    The cache file is named after the run's model/data/max_length and carries fingerprints of the reference
    weights and of the tokenized data; a file whose fingerprints do not match is refused (stale), not used.
    """
    key = hashlib.sha256(json.dumps([config.model_name_or_path, config.ref_model_name_or_path,
                                     config.dataset_name, config.dataset_train_split, config.max_length,
                                     config.ld_alpha, config.use_peft]).encode()).hexdigest()[:16]
    path = Path(config.output_dir) / f"ref_logps-{key}.pt"
    weights = reference.model if reference.model is not None else policy.causal_lm
    fingerprint = {"model": _weights_fingerprint(weights, adapters_off=reference.model is None),
                   "data": _data_fingerprint(examples), "ld_alpha": config.ld_alpha}
    if path.is_file():
        with integrity.reading(path, what="the reference log-prob cache"):
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
    logps = _reference_table(reference, accelerator, collate, examples, config)
    if accelerator.is_main_process:
        with storage.atomic_file(path, what="the reference log-prob cache") as tmp:
            torch.save({"fingerprint": fingerprint, "logps": logps}, tmp)
        print(f"[nanopost] precomputed reference log-probs for {len(logps)} pairs -> {path}", flush=True)
    return logps


def _weights_fingerprint(model: nn.Module, adapters_off: bool = False) -> str:
    """A cheap fingerprint of the weights: shapes plus a strided sample of every tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if adapters_off and ("lora_" in name or ".modules_to_save." in name):  # what the adapters add
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
