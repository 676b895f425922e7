"""Preference-loss registry: a name -> pure function map, and the one combinator the engine calls.

Adding a loss = one function + one decorator line, in any module of `losses/` (e.g. a new `losses/my_loss.py`):

    @register_loss("my_loss", reference_free=False)
    def my_loss(batch: PreferenceBatch, opts: LossOptions) -> torch.Tensor:
        '''Title.  Formula: ...  Shape: ...  Paper: ...  TRL: ...'''
        return ...  # (B,) per-pair losses

then `python train.py --method dpo --loss_type my_loss`, and `python scripts/gen_losses_md.py` to add it to
LOSSES.md. A new module needs no import anywhere: `discover_losses` imports every module of the package the
first time a loss is looked up. Every loss reads what it needs from a `PreferenceBatch` (per-pair tensors) and
a `LossOptions` (hyper-parameters) and returns per-pair losses. `preference_loss` combines several of them
exactly as TRL 1.16 `DPOTrainer._compute_loss` does.
"""

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from losses.errors import LossError

F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass(frozen=True)
class PreferenceBatch:
    """Per-pair inputs of every preference loss. B = number of (chosen, rejected) pairs.

    Attributes:
        chosen_logps: policy log p(chosen completion | prompt), SUMMED over completion tokens (with LD-DPO
            weighting already applied when `ld_alpha` is set: see `sequence_logps`).
        rejected_logps: same for the rejected completion.
        chosen_lengths: number of completion tokens, `completion_mask.sum(1)` of the chosen rows (TRL counts
            the unshifted mask; equal to the number of scored tokens whenever the prompt is non-empty).
        rejected_lengths: same for the rejected rows.
        ref_chosen_logps: reference-model counterpart of `chosen_logps`; None for reference-free losses.
        ref_rejected_logps: reference-model counterpart of `rejected_logps`; None for reference-free losses.
        chosen_token_logps: per-token policy log-probs of the chosen rows, zero off the completion, NOT
            LD-weighted; only the `sft` and `orpo` losses read it.
        chosen_token_mask: which entries of `chosen_token_logps` are scored completion tokens.

    Shape:
        chosen_logps, rejected_logps, chosen_lengths, rejected_lengths: (B,)
        ref_chosen_logps, ref_rejected_logps: (B,) or None
        chosen_token_logps, chosen_token_mask: (B, L) or None
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    chosen_token_logps: torch.Tensor | None = None
    chosen_token_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class LossOptions:
    """Hyper-parameters of the preference losses; defaults are TRL 1.16's `DPOConfig` / `CPOConfig` ones.

    Attributes:
        beta: β, strength of the reference (KL) constraint; IPO's τ; SimPO's β; ORPO's λ (as in TRL).
        label_smoothing: ε, read by `robust`, `exo_pair`, `aot`, `aot_unpaired`, `cdpo`, `simpo` only.
        f_divergence_type: f-DPO divergence: reverse_kl (standard DPO), forward_kl, js_divergence,
            alpha_divergence; only losses registered with `f_divergence=True` accept a non-default value.
        f_alpha_divergence_coef: α of `alpha_divergence`.
        discopop_tau: τ of `discopop`.
        simpo_gamma: SimPO's target margin γ (TRL `CPOConfig.simpo_gamma`; the SimPO repo's
            `gamma_beta_ratio` is γ/β).
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5


LossFn = Callable[[PreferenceBatch, LossOptions], torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    """Registry entry. `fn` returns per-pair losses (B,); the rest is metadata for checks and LOSSES.md
    (the docstring of `fn` supplies the title, formula, paper and TRL equivalent).

    Attributes:
        name: the `--loss_type` value.
        fn: the loss function.
        trl_reference: the TRL function tests/test_losses_vs_trl.py compares `fn` against, or None.
        reference_free: True if the loss needs no reference model.
        f_divergence: True if `f_divergence_type` applies (losses of the chosen−rejected score difference).
        needs_token_logps: True if `batch.chosen_token_logps` / `chosen_token_mask` must be given.
        options: the `LossOptions` fields the loss reads.
    """

    name: str
    fn: LossFn
    trl_reference: str | None
    reference_free: bool
    f_divergence: bool
    needs_token_logps: bool
    options: tuple[str, ...]


LOSSES: dict[str, LossSpec] = {}


def register_loss(
    name: str,
    *,
    trl_reference: str | None = None,
    reference_free: bool = False,
    f_divergence: bool = False,
    needs_token_logps: bool = False,
    options: tuple[str, ...] = ("beta",),
) -> Callable[[LossFn], LossFn]:
    """Decorator: register `fn` under `name` (see `LossSpec` for the arguments)."""

    def decorator(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(
                f"loss {name!r} is registered twice ({LOSSES[name].fn.__qualname__}, {fn.__qualname__})"
            )
        LOSSES[name] = LossSpec(
            name, fn, trl_reference, reference_free, f_divergence, needs_token_logps, options
        )
        return fn

    return decorator


_discovered = False


def discover_losses() -> None:
    """Import every module of the `losses` package (once), so that each one's `@register_loss` lines run.

    This is what makes a new loss one file: `losses/my_loss.py` registers its loss when it is imported, and
    it is imported here, by file name, the first time any loss is looked up. A module that fails to import
    raises its own error (with its traceback), not "unknown loss_type".
    """
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = __name__.rpartition(".")[0]  # "losses"
    for module in pkgutil.iter_modules([str(Path(__file__).resolve().parent)]):
        importlib.import_module(f"{package}.{module.name}")


def get_loss(name: str) -> LossSpec:
    """The registry entry for `name`; LossError listing the available names if unknown."""
    discover_losses()
    if name not in LOSSES:
        raise LossError(
            f"unknown loss_type {name!r}; available: {', '.join(sorted(LOSSES))} (set --loss_type to one of them)"
        )
    return LOSSES[name]


def needs_reference(loss_types: list[str]) -> bool:
    """True if any of `loss_types` needs reference-model log-probs (so the engine must run a reference)."""
    return any(not get_loss(name).reference_free for name in loss_types)


def validate_loss_config(
    loss_types: list[str],
    loss_weights: list[float] | None,
    options: LossOptions,
    *,
    use_weighting: bool = False,
    ld_alpha: float | None = None,
) -> None:
    """Reject loss settings TRL 1.16 rejects (or that make a loss meaningless), before training starts.

    Raises:
        LossError: naming the option and the fix.
    """
    if not loss_types:
        raise LossError("loss_type is empty; pass at least one, e.g. --loss_type sigmoid")
    specs = [get_loss(name) for name in loss_types]
    if loss_weights is not None and len(loss_weights) != len(loss_types):
        raise LossError(
            f"loss_weights has {len(loss_weights)} values for {len(loss_types)} loss types {loss_types}; "
            "give one weight per loss type, or none for all 1.0"
        )
    if options.beta <= 0:
        raise LossError(f"beta must be > 0, got {options.beta}")
    if options.f_divergence_type not in F_DIVERGENCE_TYPES:
        raise LossError(
            f"unknown f_divergence_type {options.f_divergence_type!r}; available: {', '.join(F_DIVERGENCE_TYPES)}"
        )
    if options.f_divergence_type != "reverse_kl":
        # TRL 1.16: the f-DPO reparameterisation only cancels log Z(x) in the chosen−rejected difference.
        unsupported = [spec.name for spec in specs if not spec.f_divergence]
        if unsupported:
            supported = sorted(name for name, spec in LOSSES.items() if spec.f_divergence)
            raise LossError(
                f"f_divergence_type={options.f_divergence_type!r} does not apply to loss_type {unsupported}; "
                f"use it only with {supported}, or keep f_divergence_type='reverse_kl'"
            )
    if "exo_pair" in loss_types and options.label_smoothing <= 0:
        raise LossError("loss_type 'exo_pair' needs label_smoothing > 0 (log ε); the EXO paper uses 1e-3")
    if "robust" in loss_types and not 0 <= options.label_smoothing < 0.5:
        # TRL only warns; at 0.5 the loss divides by zero and beyond it flips sign, so refuse.
        raise LossError(f"loss_type 'robust' needs 0 <= label_smoothing < 0.5, got {options.label_smoothing}")
    if "discopop" in loss_types and options.discopop_tau <= 0:
        raise LossError(f"discopop_tau must be > 0, got {options.discopop_tau}")
    if use_weighting:
        # TRL 1.16: aot/aot_unpaired sort the batch (weights would be misaligned); 'sft' crashes there.
        bad = [name for name in loss_types if name in ("aot", "aot_unpaired", "sft", "orpo")]
        if bad:
            raise LossError(
                f"use_weighting (WPO) is not defined for loss_type {bad}; drop --use_weighting or them"
            )
    if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
        raise LossError(
            f"ld_alpha must be in [0, 1] (1 = plain DPO, 0 = cut at the shared length), got {ld_alpha}"
        )


def _check_batch(specs: list[LossSpec], batch: PreferenceBatch) -> None:
    for spec in specs:
        if not spec.reference_free and (batch.ref_chosen_logps is None or batch.ref_rejected_logps is None):
            raise ValueError(f"loss {spec.name!r} needs ref_chosen_logps and ref_rejected_logps in the batch")
        if spec.needs_token_logps and (batch.chosen_token_logps is None or batch.chosen_token_mask is None):
            raise ValueError(
                f"loss {spec.name!r} needs chosen_token_logps and chosen_token_mask in the batch"
            )


def preference_loss(
    loss_types: list[str],
    loss_weights: list[float] | None,
    batch: PreferenceBatch,
    options: LossOptions,
    pair_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of batch-mean preference losses, as TRL 1.16 `DPOTrainer._compute_loss` combines them.

        loss = Σ_k w_k · mean_b(ω_b · L_k(b)),   w = loss_weights or [1.0] * K,   ω = pair_weights or 1

    e.g. RPO = `["sigmoid", "sft"]` with weights `[1, α]`; MPO = `["sigmoid", "bco_pair", "sft"]`.
    The engine divides the result by the number of micro-batches under gradient accumulation (TRL does).
    The settings are checked once before training (`validate_loss_config`, from the config's validation), not
    here on every micro-batch.

    Args:
        loss_types: registered loss names (`LOSSES`).
        loss_weights: one weight per loss type, or None for all 1.0 (TRL's default).
        batch: per-pair log-probs (see `PreferenceBatch`).
        options: hyper-parameters.
        pair_weights: WPO weights from `wpo_weights` (detached), applied to every loss, or None.

    Returns:
        (loss, metrics). `loss` is a differentiable scalar. `metrics` holds detached batch means, TRL's
        names: `rewards/chosen` = mean β(c − c_ref), `rewards/rejected`, `rewards/margins`,
        `rewards/accuracies` = mean 1[reward_c > reward_r] (strict), `logps/chosen`, `logps/rejected`
        (means of the summed, LD-weighted when set, log-probs), and `loss/<name>` = mean_b L_k per loss
        (unweighted by w_k, weighted by ω). For reference-free runs, rewards are β · c / |c| (average
        log-probs), TRL's CPO/ORPO convention.

    Shape:
        batch fields: (B,)
        pair_weights: (B,) or None
        loss: ()
    """
    specs = [get_loss(name) for name in loss_types]
    _check_batch(specs, batch)
    if loss_weights is None:
        loss_weights = [1.0] * len(loss_types)

    total = torch.zeros((), device=batch.chosen_logps.device)
    metrics: dict[str, torch.Tensor] = {}
    for spec, weight in zip(specs, loss_weights, strict=True):
        per_pair = spec.fn(batch, options)  # (B,)
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        loss_k = per_pair.mean()
        total = total + weight * loss_k
        metrics[f"loss/{spec.name}"] = loss_k.detach()

    with torch.no_grad():
        if batch.ref_chosen_logps is not None and batch.ref_rejected_logps is not None:
            chosen_rewards = options.beta * (batch.chosen_logps - batch.ref_chosen_logps)  # (B,)
            rejected_rewards = options.beta * (batch.rejected_logps - batch.ref_rejected_logps)  # (B,)
        else:
            chosen_rewards = options.beta * batch.chosen_logps / batch.chosen_lengths.clamp(min=1)
            rejected_rewards = options.beta * batch.rejected_logps / batch.rejected_lengths.clamp(min=1)
        metrics["rewards/chosen"] = chosen_rewards.mean()
        metrics["rewards/rejected"] = rejected_rewards.mean()
        metrics["rewards/accuracies"] = (chosen_rewards > rejected_rewards).float().mean()
        metrics["rewards/margins"] = (chosen_rewards - rejected_rewards).mean()
        metrics["logps/chosen"] = batch.chosen_logps.detach().mean()
        metrics["logps/rejected"] = batch.rejected_logps.detach().mean()
    return total, metrics
