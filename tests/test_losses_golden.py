"""Golden values: every loss on small fixed inputs equals a number derived by hand (arithmetic in docstrings).

Shared inputs (`PAIRS`), β = 0.5, two pairs:
    pair 0: c = −10, r = −12, c_ref = −11, r_ref = −11  ->  Δc = 1, Δr = −1, d = 2, β·d = 1
    pair 1: c = r = c_ref = r_ref = −5                  ->  Δc = Δr = 0,  d = 0, β·d = 0
    lengths |c| = [2, 4], |r| = [4, 2]
    chosen token log-probs [[−1, −2, ·, ·], [−3, −4, −5, −6]] (· = masked): token-mean NLL = 21/6 = 3.5
Identities used: −log σ(x) = log(1 + e^−x) =: sp(−x) (softplus); σ(−x) = 1 − σ(x); ln 2 = 0.693147.
"""

import math

import pytest
import torch

from losses import (
    LOSSES,
    LossOptions,
    PreferenceBatch,
    get_loss,
    needs_reference,
    next_token_labels,
    preference_loss,
    sequence_logps,
    sft_loss,
    token_logps,
    token_stats,
    validate_loss_config,
    wpo_weights,
)
from losses.errors import LossError

LN2 = math.log(2)


def sp(x: float) -> float:
    """softplus: log(1 + e^x) = −log σ(−x)."""
    return math.log1p(math.exp(x))


def sigm(x: float) -> float:
    return 1 / (1 + math.exp(-x))


PAIRS = PreferenceBatch(
    chosen_logps=torch.tensor([-10.0, -5.0], dtype=torch.float64),
    rejected_logps=torch.tensor([-12.0, -5.0], dtype=torch.float64),
    chosen_lengths=torch.tensor([2, 4]),
    rejected_lengths=torch.tensor([4, 2]),
    ref_chosen_logps=torch.tensor([-11.0, -5.0], dtype=torch.float64),
    ref_rejected_logps=torch.tensor([-11.0, -5.0], dtype=torch.float64),
    chosen_token_logps=torch.tensor(
        [[-1.0, -2.0, -9.0, -9.0], [-3.0, -4.0, -5.0, -6.0]], dtype=torch.float64
    ),
    chosen_token_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool),
)


def loss_of(name: str, **options) -> list[float]:
    return get_loss(name).fn(PAIRS, LossOptions(beta=0.5, **options)).tolist()


def test_sigmoid_at_zero_margin_is_ln2():
    """−log σ(0) = ln 2 = 0.693147 (DPO at step 1, policy = reference); pair 0: −log σ(1) = sp(−1) = 0.313262."""
    assert loss_of("sigmoid") == pytest.approx([sp(-1), LN2], abs=1e-12)
    assert LN2 == pytest.approx(0.693147, abs=1e-6)
    assert sp(-1) == pytest.approx(0.313262, abs=1e-6)


def test_sigmoid_ignores_label_smoothing():
    """TRL 1.16: ε does not touch `sigmoid`; same [0.313262, 0.693147] with ε = 0.3."""
    assert loss_of("sigmoid", label_smoothing=0.3) == pytest.approx([sp(-1), LN2], abs=1e-12)


def test_cdpo():
    """ε = 0.1: pair 0: 0.9·sp(−1) + 0.1·sp(1) = 0.9·0.313262 + 0.1·1.313262 = 0.413262; pair 1: ln 2."""
    assert loss_of("cdpo", label_smoothing=0.1) == pytest.approx([0.9 * sp(-1) + 0.1 * sp(1), LN2], abs=1e-12)
    assert 0.9 * sp(-1) + 0.1 * sp(1) == pytest.approx(0.413262, abs=1e-6)


def test_hinge():
    """max(0, 1 − β·d): pair 0: 1 − 1 = 0; pair 1: 1 − 0 = 1."""
    assert loss_of("hinge") == pytest.approx([0.0, 1.0], abs=1e-12)


def test_ipo_is_length_normalised():
    """1/(2β) = 1. pair 0: Δc/|c| − Δr/|r| = 1/2 + 1/4 = 0.75, (0.75 − 1)² = 0.0625; pair 1: (0 − 1)² = 1."""
    assert loss_of("ipo") == pytest.approx([0.0625, 1.0], abs=1e-12)


def test_ipo_unnormalized():
    """pair 0: (d − 1)² = (2 − 1)² = 1; pair 1: (0 − 1)² = 1."""
    assert loss_of("ipo_unnormalized") == pytest.approx([1.0, 1.0], abs=1e-12)


def test_robust():
    """ε = 0.1: pair 0: [0.9·sp(−1) − 0.1·sp(1)] / 0.8 = (0.281935 − 0.131326)/0.8 = 0.188262;
    pair 1: (0.9 − 0.1)·ln 2 / 0.8 = ln 2."""
    expected = (0.9 * sp(-1) - 0.1 * sp(1)) / 0.8
    assert expected == pytest.approx(0.188262, abs=1e-6)
    assert loss_of("robust", label_smoothing=0.1) == pytest.approx([expected, LN2], abs=1e-12)


def test_exo_pair():
    """ε = 0.1. pair 0: σ(1)(log σ(1) − ln 0.9) + σ(−1)(log σ(−1) − ln 0.1)
        = 0.731059·(−0.313262 + 0.105361) + 0.268941·(−1.313262 + 2.302585) = −0.151988 + 0.266070 = 0.114082
    pair 1: ½(−ln 2 − ln 0.9) + ½(−ln 2 − ln 0.1) = −ln 2 − ½ ln 0.09 = 0.510826."""
    pair0 = sigm(1) * (-sp(-1) - math.log(0.9)) + sigm(-1) * (-sp(1) - math.log(0.1))
    pair1 = -LN2 - 0.5 * math.log(0.09)
    assert (pair0, pair1) == pytest.approx((0.114082, 0.510826), abs=1e-6)
    assert loss_of("exo_pair", label_smoothing=0.1) == pytest.approx([pair0, pair1], abs=1e-12)


def test_nca_pair():
    """βΔc = 0.5, βΔr = −0.5. pair 0: sp(−0.5) + ½ sp(0.5) + ½ sp(−0.5) = 0.474077 + 0.487038 + 0.237039
    = 1.198154; pair 1: ln 2 + ½ ln 2 + ½ ln 2 = 2 ln 2."""
    pair0 = sp(-0.5) + 0.5 * sp(0.5) + 0.5 * sp(-0.5)
    assert pair0 == pytest.approx(1.198154, abs=1e-6)
    assert loss_of("nca_pair") == pytest.approx([pair0, 2 * LN2], abs=1e-12)


def test_bco_pair_has_no_running_mean():
    """pair 0: −log σ(0.5) − log σ(0.5) = 2·sp(−0.5) = 0.948154; pair 1: 2 ln 2. No δ shift, so the value
    is the same on every call (TRL 1.16 has no running mean)."""
    assert loss_of("bco_pair") == pytest.approx([2 * sp(-0.5), 2 * LN2], abs=1e-12)
    assert loss_of("bco_pair") == loss_of("bco_pair")


def test_sppo_hard():
    """1/(2β) = 1. pair 0: (1 − 1)² + (−1 + 1)² = 0; pair 1: (0 − 1)² + (0 + 1)² = 2."""
    assert loss_of("sppo_hard") == pytest.approx([0.0, 2.0], abs=1e-12)


def test_aot():
    """c − r = [2, 0] sorted [0, 2]; c_ref − r_ref = [0, 0]; δ = [0, 2], β·δ = [0, 1]; ε = 0:
    [ln 2, sp(−1)] (order statistics, not pairs)."""
    assert loss_of("aot") == pytest.approx([LN2, sp(-1)], abs=1e-12)


def test_aot_unpaired():
    """sort(Δc) = [0, 1], sort(Δr) = [−1, 0]; δ = [1, 1], β·δ = 0.5; ε = 0.2:
    0.8·sp(−0.5) + 0.2·sp(0.5) = 0.379262 + 0.194815 = 0.574077 for both."""
    expected = 0.8 * sp(-0.5) + 0.2 * sp(0.5)
    assert expected == pytest.approx(0.574077, abs=1e-6)
    assert loss_of("aot_unpaired", label_smoothing=0.2) == pytest.approx([expected, expected], abs=1e-12)


def test_apo_zero():
    """pair 0: 1 − σ(0.5) + σ(−0.5) = 2σ(−0.5) = 0.755081; pair 1: 1 − ½ + ½ = 1."""
    assert loss_of("apo_zero") == pytest.approx([2 * sigm(-0.5), 1.0], abs=1e-12)
    assert 2 * sigm(-0.5) == pytest.approx(0.755081, abs=1e-6)


def test_apo_down():
    """pair 0: σ(0.5) + 1 − σ(β·(Δc − Δr)) = 0.622459 + 1 − σ(1) = 0.622459 + 1 − 0.731059 = 0.891401;
    pair 1: ½ + 1 − ½ = 1."""
    assert loss_of("apo_down") == pytest.approx([sigm(0.5) + 1 - sigm(1), 1.0], abs=1e-12)
    assert sigm(0.5) + 1 - sigm(1) == pytest.approx(0.891401, abs=1e-6)


def test_discopop():
    """τ = 0.05. pair 0: z = 1, m = σ(20) = 1 − 2.06e−9: sp(−1)(1 − m) + e^−1·m ≈ 0.367879;
    pair 1: z = 0, m = ½: ½ ln 2 + ½·1 = 0.846574."""
    m = sigm(20)
    expected = [sp(-1) * (1 - m) + math.exp(-1) * m, 0.5 * LN2 + 0.5]
    assert expected == pytest.approx([0.367879, 0.846574], abs=1e-6)
    assert loss_of("discopop") == pytest.approx(expected, abs=1e-12)


def test_sigmoid_norm():
    """pair 0: β(Δc/|c| − Δr/|r|) = 0.5·0.75 = 0.375 -> sp(−0.375) = ln(1 + 0.687289) = 0.523123; pair 1: ln 2."""
    assert loss_of("sigmoid_norm") == pytest.approx([sp(-0.375), LN2], abs=1e-12)
    assert sp(-0.375) == pytest.approx(0.523123, abs=1e-6)


def test_sft_is_token_mean_over_the_batch():
    """(1 + 2 + 3 + 4 + 5 + 6) / 6 = 3.5 for every pair (not the mean of row means 1.5 and 4.5 = 3.0);
    the masked −9 entries are ignored."""
    assert loss_of("sft") == pytest.approx([3.5, 3.5], abs=1e-12)


def test_simpo():
    """β = 0.5, γ = 0.25. ā_c = [−10/2, −5/4] = [−5, −1.25], ā_r = [−12/4, −5/2] = [−3, −2.5];
    z = 0.5·[−2, 1.25] − 0.25 = [−1.25, 0.375]; L = sp(−z) = [ln(1 + 3.490343), ln(1 + 0.687289)]
    = [1.501929, 0.523123]."""
    assert loss_of("simpo", simpo_gamma=0.25) == pytest.approx([sp(1.25), sp(-0.375)], abs=1e-12)
    assert sp(1.25) == pytest.approx(1.501929, abs=1e-6)


def test_orpo():
    """λ = β = 0.5; ā_c = [−5, −1.25], ā_r = [−3, −2.5]; log odds = (ā_c − ā_r) − (ln(1 − e^ā_c) − ln(1 − e^ā_r)).
    pair 0: −2 − (ln(1 − e^−5) − ln(1 − e^−3)) = −2 − (−0.006761 + 0.051069) = −2.044308
    pair 1: 1.25 − (ln(1 − e^−1.25) − ln(1 − e^−2.5)) = 1.25 − (−0.337580 + 0.085650) = 1.501929
    L = NLL 3.5 + 0.5·sp(−log odds) = [3.5 + 0.5·2.166057, 3.5 + 0.5·0.201062] = [4.583028, 3.600531]."""
    odds = [
        -2 - (math.log(1 - math.exp(-5)) - math.log(1 - math.exp(-3))),
        1.25 - (math.log(1 - math.exp(-1.25)) - math.log(1 - math.exp(-2.5))),
    ]
    assert odds == pytest.approx([-2.044308, 1.501929], abs=1e-6)
    expected = [3.5 + 0.5 * sp(-o) for o in odds]
    assert expected == pytest.approx([4.583028, 3.600531], abs=1e-6)
    assert loss_of("orpo") == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "f_divergence_type, expected_pair0",
    [
        # s = 1 − e^−Δ: s_c = 1 − e^−1, s_r = 1 − e; d = e − e^−1 = 2 sinh 1; β·d = sinh 1 = 1.175201
        ("forward_kl", sp(-math.sinh(1))),
        # s = ln 2 + log σ(Δ): d = log σ(1) − log σ(−1) = 1 (log σ(x) − log σ(−x) = x); β·d = 0.5
        ("js_divergence", sp(-0.5)),
        # α = ½: s = (e^(−Δ/2) − 1)/(−½) = 2(1 − e^(−Δ/2)); d = 2(e^½ − e^−½) = 4 sinh ½; β·d = 2 sinh ½
        ("alpha_divergence", sp(-2 * math.sinh(0.5))),
        ("reverse_kl", sp(-1)),
    ],
)
def test_f_divergence_on_sigmoid(f_divergence_type, expected_pair0):
    """Pair 1 has Δ = 0: every f' maps t = 1 to the same score for chosen and rejected, so d = 0, ln 2."""
    got = loss_of("sigmoid", f_divergence_type=f_divergence_type, f_alpha_divergence_coef=0.5)
    assert got == pytest.approx([expected_pair0, LN2], abs=1e-12)


def test_alpha_divergence_with_alpha_one_is_reverse_kl():
    """α = 1 is the log limit of (t^(α−1) − 1)/(α − 1): same as reverse KL, [sp(−1), ln 2]."""
    got = loss_of("sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
    assert got == pytest.approx([sp(-1), LN2], abs=1e-12)


def test_preference_loss_weights_and_metrics():
    """RPO: 1.0·mean(sigmoid) + 0.5·sft = (0.313262 + 0.693147)/2 + 0.5·3.5 = 0.503204 + 1.75 = 2.253204.
    rewards/chosen = mean β·Δc = mean(0.5, 0) = 0.25; rejected = mean(−0.5, 0) = −0.25; margins 0.5;
    accuracies: pair 0 0.5 > −0.5 yes, pair 1 0 > 0 no (strict) -> 0.5; logps/chosen = −7.5, rejected −8.5."""
    loss, metrics = preference_loss(["sigmoid", "sft"], [1.0, 0.5], PAIRS, LossOptions(beta=0.5))
    assert loss.item() == pytest.approx((sp(-1) + LN2) / 2 + 1.75, abs=1e-12)
    assert loss.item() == pytest.approx(2.253204, abs=1e-6)
    expected = {
        "rewards/chosen": 0.25,
        "rewards/rejected": -0.25,
        "rewards/margins": 0.5,
        "rewards/accuracies": 0.5,
        "logps/chosen": -7.5,
        "logps/rejected": -8.5,
        "loss/sigmoid": (sp(-1) + LN2) / 2,
        "loss/sft": 3.5,
    }
    assert {k: v.item() for k, v in metrics.items()} == pytest.approx(expected, abs=1e-12)


def test_preference_loss_default_weights_are_one():
    """loss_weights=None: (0.503204) + 3.5 = 4.003204, TRL's `[1.0] * len(loss_type)`."""
    loss, _ = preference_loss(["sigmoid", "sft"], None, PAIRS, LossOptions(beta=0.5))
    assert loss.item() == pytest.approx((sp(-1) + LN2) / 2 + 3.5, abs=1e-12)


def test_preference_loss_pair_weights():
    """WPO weights ω = [2, 0.5] scale each pair before the mean: (2·0.313262 + 0.5·0.693147)/2 = 0.486549."""
    loss, _ = preference_loss(["sigmoid"], None, PAIRS, LossOptions(beta=0.5), torch.tensor([2.0, 0.5]))
    assert loss.item() == pytest.approx((2 * sp(-1) + 0.5 * LN2) / 2, abs=1e-12)


def test_reference_free_rewards_use_average_logps():
    """No reference: rewards = β·ā (CPO/ORPO convention): chosen mean(0.5·[−5, −1.25]) = −1.5625,
    rejected mean(0.5·[−3, −2.5]) = −1.375; accuracies: −2.5 > −1.5 no, −0.625 > −1.25 yes -> 0.5."""
    batch = PreferenceBatch(
        PAIRS.chosen_logps, PAIRS.rejected_logps, PAIRS.chosen_lengths, PAIRS.rejected_lengths
    )
    _, metrics = preference_loss(["simpo"], None, batch, LossOptions(beta=0.5))
    assert metrics["rewards/chosen"].item() == pytest.approx(-1.5625, abs=1e-12)
    assert metrics["rewards/rejected"].item() == pytest.approx(-1.375, abs=1e-12)
    assert metrics["rewards/accuracies"].item() == 0.5


def test_unknown_loss_lists_available_names():
    """A typo is a LossError naming every registered loss (19 of them), not a KeyError."""
    with pytest.raises(LossError, match="unknown loss_type 'sigmod'.*aot, aot_unpaired, apo_down") as info:
        preference_loss(["sigmod"], None, PAIRS, LossOptions())
    assert all(name in str(info.value) for name in LOSSES)
    assert len(LOSSES) == 19


@pytest.mark.parametrize(
    "loss_types, kwargs, message",
    [
        (["sigmoid"], {"loss_weights": [1.0, 2.0]}, "loss_weights has 2 values for 1 loss types"),
        (
            ["bco_pair"],
            {"options": LossOptions(f_divergence_type="js_divergence")},
            "does not apply to loss_type",
        ),
        (["sigmoid"], {"options": LossOptions(f_divergence_type="chi2")}, "unknown f_divergence_type 'chi2'"),
        (["exo_pair"], {}, "needs label_smoothing > 0"),
        (["robust"], {"options": LossOptions(label_smoothing=0.5)}, "0 <= label_smoothing < 0.5"),
        (["aot"], {"use_weighting": True}, "use_weighting"),
        (["sigmoid", "sft"], {"use_weighting": True}, r"\['sft'\]"),
        (["sigmoid"], {"ld_alpha": 1.5}, "ld_alpha must be in"),
        (["sigmoid"], {"options": LossOptions(beta=0.0)}, "beta must be > 0"),
        ([], {}, "loss_type is empty"),
    ],
)
def test_validate_loss_config_rejects(loss_types, kwargs, message):
    """Settings TRL 1.16 rejects (or that are meaningless) raise a LossError naming the fix."""
    options = kwargs.pop("options", LossOptions())
    loss_weights = kwargs.pop("loss_weights", None)
    with pytest.raises(LossError, match=message):
        validate_loss_config(loss_types, loss_weights, options, **kwargs)


def test_validate_loss_config_accepts_trl_valid_settings():
    """f-divergence with every TRL-allowed loss, WPO with sigmoid, LD-DPO α = 0: no error (returns None)."""
    options = LossOptions(f_divergence_type="forward_kl", label_smoothing=0.1)
    allowed = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
    assert validate_loss_config(allowed, None, options) is None
    assert validate_loss_config(["sigmoid"], [1.0], LossOptions(), use_weighting=True, ld_alpha=0.0) is None


def test_needs_reference():
    """simpo/orpo/sft (and CPO-SimPO = simpo + sft) run without a reference model; any reference-based loss in
    the mix needs one."""
    assert needs_reference(["simpo"]) is False
    assert needs_reference(["orpo"]) is False
    assert needs_reference(["simpo", "sft"]) is False
    assert needs_reference(["simpo", "sigmoid"]) is True


def test_missing_reference_is_an_error():
    """A reference-based loss given a batch without reference log-probs fails loudly (no silent zeros)."""
    batch = PreferenceBatch(
        PAIRS.chosen_logps, PAIRS.rejected_logps, PAIRS.chosen_lengths, PAIRS.rejected_lengths
    )
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        preference_loss(["sigmoid"], None, batch, LossOptions())


# --------------------------------------------------------------------------- per-token helpers


def test_token_stats_by_hand():
    """logits [0, ln 3] -> p = [1/4, 3/4]. Label 1: log p = ln 0.75 = −0.287682; H = −(¼ ln ¼ + ¾ ln ¾)
    = 0.562335; log Σp² = ln(1/16 + 9/16) = ln 0.625 = −0.470004; mean logit = ln 3 / 2 = 0.549306; top-1 yes.
    Position 1 has label −100: every field 0 / False."""
    logits = torch.tensor([[[0.0, math.log(3)], [5.0, 1.0]]])  # (1, 2, 2)
    labels = torch.tensor([[1, -100]])
    stats = token_stats(logits, labels, entropy=True, log_sum_sq_probs=True, mean_logits=True, is_top1=True)
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert stats.logps.tolist()[0] == pytest.approx([math.log(0.75), 0.0], abs=1e-6)
    assert stats.entropy.tolist()[0] == pytest.approx([entropy, 0.0], abs=1e-6)
    assert stats.log_sum_sq_probs.tolist()[0] == pytest.approx([math.log(0.625), 0.0], abs=1e-6)
    assert stats.mean_logits.tolist()[0] == pytest.approx([math.log(3) / 2, 0.0], abs=1e-6)
    assert stats.is_top1.tolist() == [[True, False]]


def test_sft_loss_by_hand():
    """logits: position 0 [0, ln 3] predicts labels[1] = 1 (p = ¾), position 1 [ln 3, 0] predicts labels[2] = 0
    (p = ¾); position 2 predicts nothing. NLL sum = 2·ln(4/3) = 0.575364.
    N = None -> 2 targets: 0.287682; N = 4 (accumulation window) -> 0.143841; N = 0 -> clamp to 1: 0.575364."""
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(3), 0.0], [7.0, -7.0]]])  # (1, 3, 2)
    labels = torch.tensor([[-100, 1, 0]])
    nll = 2 * math.log(4 / 3)
    stats = token_stats(logits, next_token_labels(labels))  # (1, 3) each
    assert sft_loss(stats.logps, stats.mask).item() == pytest.approx(nll / 2, abs=1e-6)
    assert sft_loss(stats.logps, stats.mask, num_items_in_batch=4).item() == pytest.approx(nll / 4, abs=1e-6)
    assert sft_loss(stats.logps, stats.mask, num_items_in_batch=torch.tensor(0)).item() == pytest.approx(nll, abs=1e-6)
    # Data parallel: each of P = 2 processes' share times P, so that DDP's gradient average is the global mean.
    assert sft_loss(stats.logps, stats.mask, 4, num_processes=2).item() == pytest.approx(nll / 2, abs=1e-6)


def test_sequence_logps_ld_alpha_by_hand():
    """Chosen row tokens [−1, −2, −3] (3 tokens), rejected [−4, −5] (2): shared length 2.
    α = None: [−6, −9]. α = 0.5: chosen −1 − 2 + 0.5·(−3) = −4.5; rejected −4 − 5 = −9 (no tail).
    Masked entries (−100 in the token tensor) never count."""
    token = torch.tensor([[-100.0, -1.0, -2.0, -3.0], [-100.0, -4.0, -5.0, -100.0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    assert sequence_logps(token, mask).tolist() == [-6.0, -9.0]
    assert sequence_logps(token, mask, ld_alpha=0.5).tolist() == [-4.5, -9.0]
    assert sequence_logps(token, mask, ld_alpha=1.0).tolist() == [-6.0, -9.0]


def test_wpo_weights_by_hand():
    """Chosen tokens: logp − log Σp² = [−1 − (−0.5), −2 − (−1)] = [−0.5, −1], mean −0.75;
    rejected: one token, −3 − (−1) = −2. ω = e^−0.75 · e^−2 = e^−2.75 = 0.063928; detached."""
    logps = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]], requires_grad=True)
    lssp = torch.tensor([[-0.5, -1.0], [-1.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    weights = wpo_weights(logps, lssp, mask)
    assert weights.tolist() == pytest.approx([math.exp(-2.75)], abs=1e-7)
    assert not weights.requires_grad


def test_chunked_logps_keep_no_fp32_copy_for_backward():
    """Memory: for bf16 logits autograd keeps only the label-carrying rows of the logits in bf16 (no fp32 upcast:
    the chunks are recomputed in backward), their labels, and the (B, T) bool mask for the gather and the scatter
    back: 2·3·50·2 + 2·3·8 + 2·(2·3) = 660 bytes here, vs 1200 for a whole fp32 copy."""
    logits = torch.randn(2, 3, 50).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 50, (2, 3))
    saved_bytes = []

    def pack(tensor):
        saved_bytes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        token_logps(logits, labels, chunk_rows=1)
    assert sum(saved_bytes) == 2 * 3 * 50 * 2 + 2 * 3 * 8 + 2 * (2 * 3)
