"""Reference-free preference losses (no reference model is run): SimPO and ORPO.

Both work on AVERAGE log-probs ā = logp / |y| (summed completion log-prob over its token count, the
count clamped at 1), as TRL's CPOTrainer (`loss_type="simpo"`) and ORPOTrainer compute them.

Defaults: TRL 1.16's `CPOConfig` has beta 0.1, simpo_gamma 0.5, label_smoothing 0 and cpo_alpha 1.0 (an
extra NLL term). Pure SimPO is `cpo_alpha=0`, here `--loss_type simpo`; "CPO-SimPO" is
`--loss_type simpo sft --loss_weights 1 <cpo_alpha>` (CPO's NLL is also the chosen-completion token mean).
`ORPOConfig` has beta (= λ) 0.1. The SimPO paper tunes β in about 2-10 and γ/β in about 0.3-1.6 per
model: our `beta` default 0.1 is TRL's, not the paper's.
"""

import torch
import torch.nn.functional as F

from losses.registry import LossOptions, PreferenceBatch, register_loss
from losses.terms import chosen_nll


def average_logps(batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token average policy log-probs ā_c = c/|c|, ā_r = r/|r| (lengths clamped at 1).

    Shape:
        output: (B,), (B,)
    """
    return (
        batch.chosen_logps / batch.chosen_lengths.clamp(min=1),
        batch.rejected_logps / batch.rejected_lengths.clamp(min=1),
    )


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x < 0, stable on both sides of x = −ln 2 (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@register_loss(
    "simpo",
    trl_reference="CPOTrainer.cpo_loss",
    reference_free=True,
    options=("beta", "simpo_gamma", "label_smoothing"),
)
def simpo(batch: PreferenceBatch, opts: LossOptions) -> torch.Tensor:
    """SimPO: the logistic loss on the length-normalised margin, minus a target margin γ.

    Formula:
        z = β·(ā_c − ā_r) − γ;  L = −(1−ε)·log σ(z) − ε·log σ(−z)   (ε = 0: the paper's −log σ(z))

    Shape:
        batch fields: (B,) -> output: (B,)

    Paper:
        Meng, Xia, Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
        arXiv:2405.14734, §2 (the SimPO objective; γ = β · gamma_beta_ratio in the authors' code).

    TRL:
        CPOConfig(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=γ) in trl.experimental.cpo.
    """
    chosen_avg, rejected_avg = average_logps(batch)  # (B,), (B,)
    # TRL's algebra: β·((ā_c − ā_r) − γ/β), kept so the rounding matches CPOTrainer.cpo_loss
    logits = opts.beta * ((chosen_avg - rejected_avg) - opts.simpo_gamma / opts.beta)  # (B,)
    eps = opts.label_smoothing
    return -F.logsigmoid(logits) * (1 - eps) - F.logsigmoid(-logits) * eps


@register_loss(
    "orpo",
    trl_reference="ORPOTrainer.odds_ratio_loss",
    reference_free=True,
    needs_token_logps=True,
)
def orpo(batch: PreferenceBatch, opts: LossOptions) -> torch.Tensor:
    """ORPO: chosen NLL plus a log-odds-ratio penalty; λ is `beta`, as in TRL's ORPOConfig.

    Formula:
        log_odds = (ā_c − ā_r) − (log(1 − e^ā_c) − log(1 − e^ā_r));
        L = NLL_chosen − λ·log σ(log_odds)   (NLL_chosen: token-mean over the micro-batch's chosen tokens)

    Shape:
        batch fields: (B,); chosen_token_logps, chosen_token_mask: (B, L) -> output: (B,)

    Paper:
        Hong, Lee, Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
        arXiv:2403.07691, §3 (L_ORPO = L_SFT + λ·L_OR).

    TRL:
        ORPOConfig(beta=λ) / ORPOTrainer (trl.experimental.orpo). TRL's NLL also covers the prompt tokens;
        here it is on the chosen completion only, as the paper's L_SFT. The odds-ratio term equals TRL's.
    """
    chosen_avg, rejected_avg = average_logps(batch)  # (B,), (B,)
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))  # (B,)
    return chosen_nll(batch) - opts.beta * F.logsigmoid(log_odds)
