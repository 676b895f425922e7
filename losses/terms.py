"""The terms the preference losses are built from: log-ratios, f-divergence scores, averaged margins.

Notation as in `losses/dpo.py`. Every function here is shared by two or more losses (one place per idea).
"""

import math

import torch
import torch.nn.functional as F

from losses.registry import LossOptions, PreferenceBatch


def log_ratios(batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy/reference log-ratios Δc = c − c_ref, Δr = r − r_ref.

    Shape:
        output: (B,), (B,)
    """
    return batch.chosen_logps - batch.ref_chosen_logps, batch.rejected_logps - batch.ref_rejected_logps


def f_divergence_scores(batch: PreferenceBatch, opts: LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores s = f'(π/π_ref) of the f-DPO generalisation (Wang et al. 2023, arXiv:2309.16240), as TRL 1.16.

        reverse_kl:        s = Δ                         (standard DPO)
        forward_kl:        s = 1 − e^(−Δ)
        js_divergence:     s = log 2 + log σ(Δ)
        alpha_divergence:  s = (e^((α−1)Δ) − 1) / (α − 1),  exponent clamped at 80 in fp32 (11 in fp16)
                           like TRL; α = 1 falls back to reverse_kl

    Shape:
        output: (B,), (B,)
    """
    chosen_ratio, rejected_ratio = log_ratios(batch)  # (B,), (B,)
    kind = opts.f_divergence_type
    if kind == "reverse_kl":
        return chosen_ratio, rejected_ratio
    if kind == "forward_kl":
        return 1 - torch.exp(-chosen_ratio), 1 - torch.exp(-rejected_ratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(chosen_ratio), math.log(2) + F.logsigmoid(rejected_ratio)
    if kind == "alpha_divergence":
        alpha = opts.f_alpha_divergence_coef
        if abs(alpha - 1.0) < 1e-6:  # f'(t) -> log t
            return chosen_ratio, rejected_ratio
        dtype = chosen_ratio.dtype
        # TRL computes exp in fp32 (fp64 stays fp64 here) and caps the exponent so it stays finite in `dtype`.
        clamp_max = 11.0 if dtype == torch.float16 else 80.0
        compute = torch.float64 if dtype == torch.float64 else torch.float32

        def score(ratio: torch.Tensor) -> torch.Tensor:
            exponent = torch.clamp(((alpha - 1.0) * ratio).to(compute), max=clamp_max)
            return (torch.exp(exponent) - 1.0).to(dtype) * (1.0 / (alpha - 1.0))

        return score(chosen_ratio), score(rejected_ratio)
    raise ValueError(f"unknown f_divergence_type {kind!r}")



def averaged_margin(chosen: torch.Tensor, rejected: torch.Tensor, batch: PreferenceBatch) -> torch.Tensor:
    """Per-token average margin chosen/|c| − rejected/|r| (lengths clamped at 1): IPO's and DPO-norm's d.

    Shape:
        chosen, rejected: (B,) -> output: (B,)
    """
    return chosen / batch.chosen_lengths.clamp(min=1) - rejected / batch.rejected_lengths.clamp(min=1)


def smoothed_logistic(delta: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    """The logistic loss with the preference label smoothed by ε: −(1−ε)·log σ(β·δ) − ε·log σ(−β·δ).

    Shape:
        delta: (B,) -> output: (B,)
    """
    eps = opts.label_smoothing
    return -F.logsigmoid(opts.beta * delta) * (1 - eps) - F.logsigmoid(-opts.beta * delta) * eps


def chosen_nll(batch: PreferenceBatch) -> torch.Tensor:
    """Token-mean NLL of the chosen completions over the whole micro-batch (not a mean of row means).

    Shape:
        batch.chosen_token_logps, batch.chosen_token_mask: (B, L) -> output: ()
    """
    return -batch.chosen_token_logps[batch.chosen_token_mask.bool()].mean()

