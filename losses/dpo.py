"""DPO and its reference-based relatives: one pure function per loss, each returning per-pair losses (B,).

Notation (every docstring): c, r = policy log p(chosen), log p(rejected), summed over completion tokens;
c_ref, r_ref = the reference model's; Δc = c − c_ref, Δr = r − r_ref (log-ratios); s_c, s_r = Δc, Δr
passed through the f-divergence (`f_divergence_scores`; s = Δ for the default reverse KL);
d = s_c − s_r; β = `beta`; ε = `label_smoothing`; |c|, |r| = completion token counts.

TRL 1.16 facts these functions reproduce (`trl/trainer/dpo_trainer.py`, `_compute_loss`, D:1285-1530):
- The f-divergence reaches only the losses built on s_c, s_r: sigmoid, hinge, ipo, robust, exo_pair,
  discopop, sigmoid_norm (and sft, which ignores it). nca_pair, bco_pair, sppo_hard, apo_* use the raw
  log-ratios, aot the raw log-probs; TRL refuses a non-default f-divergence with them
  (`validate_loss_config` does too). Our cdpo and ipo_unnormalized are built on s and accept it.
- `label_smoothing` is read only by robust, exo_pair, aot and aot_unpaired. It does NOT touch sigmoid
  (TRL ≥ 0.29); the old conservative-DPO behaviour is the separate `cdpo` loss here.
- bco_pair has no running reward mean δ in 1.16 (older TRL subtracted a `RunningMoments` mean; 1.16 does
  not), so it is exactly −log σ(βΔc) − log σ(−βΔr), with nothing carried between steps.
- ipo and sigmoid_norm divide by the completion token count (clamped at 1); the original IPO (summed
  log-ratios) is `ipo_unnormalized`.

Losses on the f-divergence scores s_c, s_r are in `losses/dpo.py`, those on the raw log-ratios in `losses/ratio_losses.py`,
the reference-free ones in `losses/reference_free.py`, the shared terms in `losses/terms.py`.
"""

import torch
import torch.nn.functional as F

from losses.registry import LossOptions, PreferenceBatch, register_loss
from losses.terms import averaged_margin, chosen_nll, f_divergence_scores, log_ratios, smoothed_logistic

__all__ = ["chosen_nll", "f_divergence_scores", "log_ratios"]  # re-exported: where readers look for them


@register_loss(
    "sigmoid",
    trl_reference="DPOTrainer._compute_loss",
    f_divergence=True,
)
def sigmoid(batch: PreferenceBatch, opts: LossOptions) -> torch.Tensor:
    """DPO, the logistic (Bradley-Terry) loss.

    Formula:
        L = −log σ(β·d),  d = s_c − s_r

    Shape:
        batch fields: (B,) -> output: (B,)

    Paper:
        Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290, eq. 7.

    TRL:
        DPOConfig(loss_type="sigmoid"); `label_smoothing` is ignored (see `cdpo`).
    """
    chosen_scores, rejected_scores = f_divergence_scores(batch, opts)  # (B,), (B,)
    return -F.logsigmoid(opts.beta * (chosen_scores - rejected_scores))



@register_loss(
    "cdpo",
    trl_reference="CPOTrainer.cpo_loss",
    f_divergence=True,
    options=("beta", "label_smoothing"),
)
def cdpo(batch: PreferenceBatch, opts: LossOptions) -> torch.Tensor:
    """Conservative DPO: the sigmoid loss with the preference label smoothed by ε.

    Formula:
        L = −(1−ε)·log σ(β·d) − ε·log σ(−β·d)

    Shape:
        batch fields: (B,) -> output: (B,)

    Paper:
        Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO" (cDPO), as in
        eric-mitchell/direct-preference-optimization `trainers.py` `preference_loss(label_smoothing=ε)`.

    TRL:
        none in 1.16 (TRL < 0.29: `loss_type="sigmoid"` with `label_smoothing=ε`); the same algebra as
        CPOConfig(loss_type="sigmoid", label_smoothing=ε) applied to the log-ratios.
    """
    chosen_scores, rejected_scores = f_divergence_scores(batch, opts)  # (B,), (B,)
    return smoothed_logistic(chosen_scores - rejected_scores, opts)



@register_loss(
    "hinge",
    trl_reference="DPOTrainer._compute_loss",
    f_divergence=True,
)
def hinge(batch: PreferenceBatch, opts: LossOptions) -> torch.Tensor:
    """SLiC hinge loss on the DPO log-ratio margin.

    Formula:
        L = max(0, 1 − β·d)

    Shape:
        batch fields: (B,) -> output: (B,)

    Paper:
        Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", arXiv:2305.10425
        (calibration loss, margin δ = 1/β).

    TRL:
        DPOConfig(loss_type="hinge").
    """
    chosen_scores, rejected_scores = f_divergence_scores(batch, opts)  # (B,), (B,)
    return torch.relu(1 - opts.beta * (chosen_scores - rejected_scores))



@register_loss(
    "ipo",
    trl_reference="DPOTrainer._compute_loss",
    f_divergence=True,
)
def ipo(batch: PreferenceBatch, opts: LossOptions) -> torch.Tensor:
    """IPO with length-normalised log-ratios (TRL's form; β plays the paper's τ).

    Formula:
        L = (s_c/|c| − s_r/|r| − 1/(2β))²,  lengths clamped at 1

    Shape:
        batch fields: (B,) -> output: (B,)

    Paper:
        Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
        arXiv:2310.12036, eq. 17, with per-token averaging (TRL, confirmed with the authors).

    TRL:
        DPOConfig(loss_type="ipo").
    """
    chosen_scores, rejected_scores = f_divergence_scores(batch, opts)  # (B,), (B,)
    delta = averaged_margin(chosen_scores, rejected_scores, batch)  # (B,)
    return (delta - 1 / (2 * opts.beta)) ** 2



@register_loss(
    "ipo_unnormalized",
    trl_reference="CPOTrainer.cpo_loss",
    f_divergence=True,
)
def ipo_unnormalized(batch: PreferenceBatch, opts: LossOptions) -> torch.Tensor:
    """IPO exactly as the paper writes it, on summed (not length-averaged) log-ratios.

    Formula:
        L = (s_c − s_r − 1/(2β))²

    Shape:
        batch fields: (B,) -> output: (B,)

    Paper:
        Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
        arXiv:2310.12036, eq. 17 (τ = β).

    TRL:
        none in 1.16 DPO (its `ipo` is length-normalised); equals `ipo` with all lengths 1, and
        CPOConfig(loss_type="ipo") applied to the log-ratios.
    """
    chosen_scores, rejected_scores = f_divergence_scores(batch, opts)  # (B,), (B,)
    return (chosen_scores - rejected_scores - 1 / (2 * opts.beta)) ** 2



@register_loss(
    "robust",
    trl_reference="DPOTrainer._compute_loss",
    f_divergence=True,
    options=("beta", "label_smoothing"),
)
def robust(batch: PreferenceBatch, opts: LossOptions) -> torch.Tensor:
    """Robust DPO: unbiased under preference labels flipped with probability ε ∈ [0, 0.5).

    Formula:
        L = [−(1−ε)·log σ(β·d) + ε·log σ(−β·d)] / (1 − 2ε)

    Shape:
        batch fields: (B,) -> output: (B,)

    Paper:
        Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback",
        arXiv:2403.00409.

    TRL:
        DPOConfig(loss_type="robust", label_smoothing=ε).
    """
    chosen_scores, rejected_scores = f_divergence_scores(batch, opts)  # (B,), (B,)
    logits = opts.beta * (chosen_scores - rejected_scores)  # (B,)
    eps = opts.label_smoothing
    return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)



@register_loss(
    "exo_pair",
    trl_reference="DPOTrainer._compute_loss",
    f_divergence=True,
    options=("beta", "label_smoothing"),
)
def exo_pair(batch: PreferenceBatch, opts: LossOptions) -> torch.Tensor:
    """EXO (pairwise): reverse KL from the model's pair distribution to the ε-smoothed label.

    Formula:
        L = σ(β·d)·(log σ(β·d) − log(1−ε)) + σ(−β·d)·(log σ(−β·d) − log ε),  ε > 0

    Shape:
        batch fields: (B,) -> output: (B,)

    Paper:
        Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment",
        arXiv:2402.00856, eq. 16 (K = 2).

    TRL:
        DPOConfig(loss_type="exo_pair", label_smoothing=ε); the paper suggests ε = 1e-3.
    """
    chosen_scores, rejected_scores = f_divergence_scores(batch, opts)  # (B,), (B,)
    logits = opts.beta * (chosen_scores - rejected_scores)  # (B,)
    # ε as a tensor of the batch dtype, so log ε is rounded exactly as TRL rounds it
    eps = torch.tensor(opts.label_smoothing, dtype=logits.dtype, device=logits.device)
    win = torch.sigmoid(logits) * (F.logsigmoid(logits) - torch.log1p(-eps))
    lose = torch.sigmoid(-logits) * (F.logsigmoid(-logits) - torch.log(eps))
    return win + lose



@register_loss(
    "discopop",
    trl_reference="DPOTrainer._compute_loss",
    f_divergence=True,
    options=("beta", "discopop_tau"),
)
def discopop(batch: PreferenceBatch, opts: LossOptions) -> torch.Tensor:
    """DiscoPOP (log-ratio modulated loss): a σ(z/τ)-blend of the logistic and exponential losses.

    Formula:
        z = β·d,  m = σ(z/τ);  L = −log σ(z)·(1 − m) + e^(−z)·m

    Shape:
        batch fields: (B,) -> output: (B,)

    Paper:
        Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language
        Models", arXiv:2406.08414, eq. 5 (τ = 0.05).

    TRL:
        DPOConfig(loss_type="discopop", discopop_tau=τ).
    """
    chosen_scores, rejected_scores = f_divergence_scores(batch, opts)  # (B,), (B,)
    logits = (chosen_scores - rejected_scores) * opts.beta  # (B,)
    modulation = torch.sigmoid(logits / opts.discopop_tau)  # (B,)
    return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation



@register_loss(
    "sigmoid_norm",
    trl_reference="DPOTrainer._compute_loss",
    f_divergence=True,
)
def sigmoid_norm(batch: PreferenceBatch, opts: LossOptions) -> torch.Tensor:
    """Length-normalised DPO: the sigmoid loss on per-token average log-ratios.

    Formula:
        L = −log σ(β·(s_c/|c| − s_r/|r|)),  lengths clamped at 1

    Shape:
        batch fields: (B,) -> output: (B,)

    Paper:
        Meng et al. 2024 (SimPO), arXiv:2405.14734, §2 length normalisation, applied to the DPO reward;
        cf. Tulu 3 "DPO-norm" (Lambert et al. 2024, arXiv:2411.15124).

    TRL:
        DPOConfig(loss_type="sigmoid_norm").
    """
    chosen_scores, rejected_scores = f_divergence_scores(batch, opts)  # (B,), (B,)
    delta = averaged_margin(chosen_scores, rejected_scores, batch)  # (B,)
    return -F.logsigmoid(opts.beta * delta)



@register_loss(
    "sft",
    trl_reference="DPOTrainer._compute_loss",
    reference_free=True,
    f_divergence=True,
    needs_token_logps=True,
    options=(),
)
def sft(batch: PreferenceBatch, opts: LossOptions) -> torch.Tensor:
    """Supervised NLL on the chosen completions, for mixing with a preference loss (RPO, MPO).

    Formula:
        L = −Σ_{b,t} m_{b,t}·log p_{b,t}(chosen) / Σ_{b,t} m_{b,t}   (same value for every pair)

    Shape:
        batch.chosen_token_logps, batch.chosen_token_mask: (B, L) -> output: (B,)

    Paper:
        Pang et al. 2024, "Iterative Reasoning Preference Optimization" (RPO), arXiv:2404.19733, eq. 1
        (the NLL term; weight α via `loss_weights`).

    TRL:
        DPOConfig(loss_type="sft"); RPO is loss_type=["sigmoid", "sft"], loss_weights=[1.0, α]. Uses the raw
        (not LD-weighted) log-probs. Also CPO's NLL term: CPO-SimPO = ["simpo", "sft"], weights [1, cpo_alpha].
    """
    return chosen_nll(batch).expand(batch.chosen_logps.shape[0])
