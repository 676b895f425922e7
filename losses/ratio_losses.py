"""Reference-based preference losses on the raw log-ratios Δc, Δr (or raw log-probs): no f-divergence.

Notation as in `losses/dpo.py`. TRL 1.16 refuses a non-default f-divergence with these losses, and so does
`validate_loss_config`.
"""

import torch
import torch.nn.functional as F

from losses.registry import LossOptions, PreferenceBatch, register_loss
from losses.terms import log_ratios, smoothed_logistic


@register_loss(
    "nca_pair",
    trl_reference="DPOTrainer._compute_loss",
)
def nca_pair(batch: PreferenceBatch, opts: LossOptions) -> torch.Tensor:
    """NCA (pairwise): absolute per-response rewards, so the chosen likelihood cannot fall with the rejected.

    Formula:
        L = −log σ(βΔc) − ½·log σ(−βΔc) − ½·log σ(−βΔr)

    Shape:
        batch fields: (B,) -> output: (B,)

    Paper:
        Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards",
        arXiv:2402.05369 (pairwise NCA, K = 2).

    TRL:
        DPOConfig(loss_type="nca_pair").
    """
    chosen_ratio, rejected_ratio = log_ratios(batch)  # (B,), (B,)
    chosen_rewards, rejected_rewards = opts.beta * chosen_ratio, opts.beta * rejected_ratio
    return (
        -F.logsigmoid(chosen_rewards)
        - 0.5 * F.logsigmoid(-chosen_rewards)
        - 0.5 * F.logsigmoid(-rejected_rewards)
    )



@register_loss(
    "bco_pair",
    trl_reference="DPOTrainer._compute_loss",
)
def bco_pair(batch: PreferenceBatch, opts: LossOptions) -> torch.Tensor:
    """BCO (pairwise): binary classification of chosen vs rejected rewards, with no reward shift.

    Formula:
        L = −log σ(βΔc) − log σ(−βΔr)

    Shape:
        batch fields: (B,) -> output: (B,)

    Paper:
        Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment",
        arXiv:2404.04656, with the reward shift δ = 0.

    TRL:
        DPOConfig(loss_type="bco_pair"); 1.16 has no running mean δ (older TRL subtracted one).
    """
    chosen_ratio, rejected_ratio = log_ratios(batch)  # (B,), (B,)
    return -F.logsigmoid(opts.beta * chosen_ratio) - F.logsigmoid(-opts.beta * rejected_ratio)



@register_loss(
    "sppo_hard",
    trl_reference="DPOTrainer._compute_loss",
)
def sppo_hard(batch: PreferenceBatch, opts: LossOptions) -> torch.Tensor:
    """SPPO with hard win probabilities (P = 1 for the winner, 0 for the loser).

    Formula:
        L = (Δc − 1/(2β))² + (Δr + 1/(2β))²

    Shape:
        batch fields: (B,) -> output: (B,)

    Paper:
        Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment",
        arXiv:2405.00675, eq. 4.7 with P ∈ {0, 1}.

    TRL:
        DPOConfig(loss_type="sppo_hard").
    """
    chosen_ratio, rejected_ratio = log_ratios(batch)  # (B,), (B,)
    return (chosen_ratio - 0.5 / opts.beta) ** 2 + (rejected_ratio + 0.5 / opts.beta) ** 2



@register_loss(
    "aot",
    trl_reference="DPOTrainer._compute_loss",
    options=("beta", "label_smoothing"),
)
def aot(batch: PreferenceBatch, opts: LossOptions) -> torch.Tensor:
    """AOT (paired): distributional alignment by sorting policy and reference margins across the batch.

    Formula:
        δ = sort_b(c − r) − sort_b(c_ref − r_ref);  L = −(1−ε)·log σ(β·δ) − ε·log σ(−β·δ)

    Shape:
        batch fields: (B,) -> output: (B,) (entry i is the i-th order statistic, not pair i)

    Paper:
        Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
        arXiv:2406.05882 (paired AOT).

    TRL:
        DPOConfig(loss_type="aot").
    """
    policy_margins, _ = torch.sort(batch.chosen_logps - batch.rejected_logps, dim=0)  # (B,)
    ref_margins, _ = torch.sort(batch.ref_chosen_logps - batch.ref_rejected_logps, dim=0)  # (B,)
    return smoothed_logistic(policy_margins - ref_margins, opts)



@register_loss(
    "aot_unpaired",
    trl_reference="DPOTrainer._compute_loss",
    options=("beta", "label_smoothing"),
)
def aot_unpaired(batch: PreferenceBatch, opts: LossOptions) -> torch.Tensor:
    """AOT (unpaired): sort chosen and rejected log-ratios separately across the batch.

    Formula:
        δ = sort_b(Δc) − sort_b(Δr);  L = −(1−ε)·log σ(β·δ) − ε·log σ(−β·δ)

    Shape:
        batch fields: (B,) -> output: (B,) (entry i is the i-th order statistic, not pair i)

    Paper:
        Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
        arXiv:2406.05882 (unpaired AOT).

    TRL:
        DPOConfig(loss_type="aot_unpaired").
    """
    chosen_ratio, rejected_ratio = log_ratios(batch)  # (B,), (B,)
    chosen_sorted, _ = torch.sort(chosen_ratio, dim=0)  # (B,)
    rejected_sorted, _ = torch.sort(rejected_ratio, dim=0)  # (B,)
    return smoothed_logistic(chosen_sorted - rejected_sorted, opts)



@register_loss(
    "apo_zero",
    trl_reference="DPOTrainer._compute_loss",
)
def apo_zero(batch: PreferenceBatch, opts: LossOptions) -> torch.Tensor:
    """APO-zero: raise the chosen likelihood, lower the rejected (chosen better than the model's outputs).

    Formula:
        L = 1 − σ(βΔc) + σ(βΔr)

    Shape:
        batch fields: (B,) -> output: (B,)

    Paper:
        D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions",
        arXiv:2408.06266, eq. 7.

    TRL:
        DPOConfig(loss_type="apo_zero").
    """
    chosen_ratio, rejected_ratio = log_ratios(batch)  # (B,), (B,)
    return 1 - torch.sigmoid(opts.beta * chosen_ratio) + torch.sigmoid(opts.beta * rejected_ratio)



@register_loss(
    "apo_down",
    trl_reference="DPOTrainer._compute_loss",
)
def apo_down(batch: PreferenceBatch, opts: LossOptions) -> torch.Tensor:
    """APO-down: lower both likelihoods, the rejected more (chosen worse than the model's outputs).

    Formula:
        L = σ(βΔc) + 1 − σ(β(Δc − Δr))

    Shape:
        batch fields: (B,) -> output: (B,)

    Paper:
        D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions",
        arXiv:2408.06266, eq. 8.

    TRL:
        DPOConfig(loss_type="apo_down").
    """
    chosen_ratio, rejected_ratio = log_ratios(batch)  # (B,), (B,)
    return (
        torch.sigmoid(opts.beta * chosen_ratio)
        + 1
        - torch.sigmoid(opts.beta * (chosen_ratio - rejected_ratio))
    )

