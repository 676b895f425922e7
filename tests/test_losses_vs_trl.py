"""Our losses against TRL 1.16's own code, on controlled inputs (fp32, CPU).

DPO family: TRL's real `DPOTrainer._compute_loss` is called as a plain function on a stand-in `self`
(`_trl_dpo_self`: just the attributes it reads) with two tiny random Llamas patched with TRL's fused LM
head (policy and reference). Our side runs the same models' ordinary forward (full logits) through
`token_stats` -> `sequence_logps` -> `PreferenceBatch` -> `preference_loss` (+ `wpo_weights`). We expect
the loss, every parameter gradient and TRL's logged metrics to agree to fp32 rounding (rtol 1e-5): the
math is the same, only the matmul/summation order of the fused head differs.

SimPO, ORPO, cdpo, ipo_unnormalized: TRL's `CPOTrainer.cpo_loss` / `ORPOTrainer.odds_ratio_loss` called
the same way. SFT: transformers' `ForCausalLMLoss`. Per-token log-probs / entropy: log_softmax + gather
and TRL's `entropy_from_logits`.
"""

import math
import re
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer
from trl.trainer.dpo_config import DPOConfig
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.utils import add_fused_lm_head, entropy_from_logits

from losses import (
    LOSSES,
    LossOptions,
    PreferenceBatch,
    get_loss,
    next_token_labels,
    preference_loss,
    sequence_logps,
    sft_loss,
    token_entropy,
    token_logps,
    token_stats,
    wpo_weights,
)
from losses.dpo import chosen_nll, log_ratios

VOCAB = 48
RTOL, ATOL = 1e-5, 1e-6  # fp32 parity with TRL: relative 1e-5 (losses, grads normwise, metrics)


def _tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).float()
    # Bigger logits than the default init so losses and log-ratios are far from their trivial values.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def models():
    policy, ref = _tiny_llama(0), _tiny_llama(1)
    ref.requires_grad_(False)
    # TRL's fused head only replaces `forward(..., fused_lm_head=True)`; our plain forward is unchanged.
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))
    add_fused_lm_head(ref)
    return policy, ref


@pytest.fixture(scope="module")
def dpo_inputs():
    """B = 3 pairs, [chosen; rejected], right-padded. Row 2 has an EMPTY prompt (completion from position 0):
    TRL counts its length from the unshifted completion_mask but scores one token fewer; we pass the same."""
    g = torch.Generator().manual_seed(7)
    # (prompt_len, completion_len) for chosen rows then rejected rows
    layout = [(3, 4), (2, 6), (0, 5), (3, 7), (2, 2), (0, 3)]
    seq_len = max(p + c for p, c in layout)
    input_ids = torch.zeros(len(layout), seq_len, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for row, (p, c) in enumerate(layout):
        input_ids[row, : p + c] = torch.randint(1, VOCAB, (p + c,), generator=g)
        attention_mask[row, : p + c] = 1
        completion_mask[row, p : p + c] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def _trl_dpo_self(policy, ref, loss_types, loss_weights, options: LossOptions, ld_alpha, use_weighting):
    """Just the attributes `DPOTrainer._compute_loss` reads, set as `DPOTrainer.__init__` sets them."""
    accelerator = SimpleNamespace(
        device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
    )
    return SimpleNamespace(
        model=policy,
        ref_model=ref,
        accelerator=accelerator,
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        beta=options.beta,
        label_smoothing=options.label_smoothing,
        f_divergence_type=options.f_divergence_type,
        f_alpha_divergence_coef=options.f_alpha_divergence_coef,
        loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types),
        ld_alpha=ld_alpha,
        use_weighting=use_weighting,
        args=SimpleNamespace(discopop_tau=options.discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )


def _trl_dpo(models, inputs, loss_types, loss_weights, options, ld_alpha=None, use_weighting=False):
    """TRL's loss, gradients and logged metrics."""
    policy, ref = models
    fake_self = _trl_dpo_self(policy, ref, loss_types, loss_weights, options, ld_alpha, use_weighting)
    policy.zero_grad()
    loss = DPOTrainer._compute_loss(fake_self, policy, dict(inputs), return_outputs=False)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    metrics = {k: v[0] for k, v in fake_self._metrics["train"].items()}
    return loss.detach(), grads, metrics


def _ours(models, inputs, loss_types, loss_weights, options, ld_alpha=None, use_weighting=False):
    """Our loss, gradients and metrics for the same batch; metrics computed the TRL way from `token_stats`."""
    policy, ref = models
    completion_mask = inputs["completion_mask"]  # (2B, T)
    labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)  # (2B, T)
    next_labels = next_token_labels(labels)  # (2B, T)
    scored = next_labels != -100  # (2B, T)
    batch_size = labels.shape[0] // 2
    policy.zero_grad()
    logits = policy(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
    ).logits  # (2B, T, V)
    stats = token_stats(
        logits, next_labels, entropy=True, mean_logits=True, is_top1=True, log_sum_sq_probs=use_weighting
    )
    with torch.no_grad():
        ref_logits = ref(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        ref_logps = sequence_logps(token_logps(ref_logits, next_labels), scored, ld_alpha)  # (2B,)
    logps = sequence_logps(stats.logps, scored, ld_alpha)  # (2B,)
    lengths = completion_mask.sum(dim=1)  # (2B,)
    batch = PreferenceBatch(
        chosen_logps=logps[:batch_size],
        rejected_logps=logps[batch_size:],
        chosen_lengths=lengths[:batch_size],
        rejected_lengths=lengths[batch_size:],
        ref_chosen_logps=ref_logps[:batch_size],
        ref_rejected_logps=ref_logps[batch_size:],
        chosen_token_logps=stats.logps[:batch_size],
        chosen_token_mask=scored[:batch_size],
    )
    pair_weights = wpo_weights(stats.logps, stats.log_sum_sq_probs, scored) if use_weighting else None
    loss, metrics = preference_loss(loss_types, loss_weights, batch, options, pair_weights)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    chosen_scored = scored[:batch_size]
    metrics = {k: v.item() for k, v in metrics.items()}
    metrics["entropy"] = (stats.entropy * scored).sum().item() / scored.sum().item()
    metrics["logits/chosen"] = stats.mean_logits[:batch_size][chosen_scored].mean().item()
    metrics["logits/rejected"] = stats.mean_logits[batch_size:][scored[batch_size:]].mean().item()
    metrics["mean_token_accuracy"] = stats.is_top1[:batch_size][chosen_scored].float().mean().item()
    return loss.detach(), grads, metrics


def _assert_same(models, inputs, loss_types, loss_weights=None, *, options: LossOptions, **kwargs):
    trl_loss, trl_grads, trl_metrics = _trl_dpo(models, inputs, loss_types, loss_weights, options, **kwargs)
    our_loss, our_grads, our_metrics = _ours(models, inputs, loss_types, loss_weights, options, **kwargs)
    # Relative comparison only (atol 0): WPO-weighted losses are ~1e-4 here, and an absolute tolerance
    # would make them pass trivially. The guard rejects a degenerate case (zero loss) for the same reason.
    assert trl_loss.item() != 0.0
    torch.testing.assert_close(our_loss, trl_loss, rtol=RTOL, atol=0.0)
    for name, grad in trl_grads.items():
        # fp32 rounding scales with the largest entry of a gradient, so compare normwise: 1e-5 of the max.
        error = (our_grads[name] - grad).abs().max().item()
        assert error <= RTOL * grad.abs().max().item() + 1e-9, f"grad of {name}: max error {error}"
    for key in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "entropy",
        "logits/chosen",
        "logits/rejected",
        "mean_token_accuracy",
    ]:
        assert our_metrics[key] == pytest.approx(trl_metrics[key], rel=RTOL, abs=ATOL), key


def _trl_loss_types() -> list[str]:
    """The loss types TRL 1.16 lists in DPOConfig's help text."""
    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    return re.findall(r"`'(\w+)'`", help_text)


DPO_PARITY = sorted(name for name, spec in LOSSES.items() if spec.trl_reference == "DPOTrainer._compute_loss")


def test_every_trl_loss_type_is_registered_and_parity_tested():
    """Expected: our DPOTrainer-parity set is exactly TRL 1.16's 15 loss types (so LOSSES.md's claim holds)."""
    assert sorted(_trl_loss_types()) == DPO_PARITY
    assert len(DPO_PARITY) == 15


@pytest.mark.parametrize("loss_type", DPO_PARITY)
def test_dpo_loss_matches_trl(models, dpo_inputs, loss_type):
    """Each TRL loss type alone; ε = 0.1 so robust/exo_pair/aot* exercise label smoothing (others ignore it)."""
    _assert_same(models, dpo_inputs, [loss_type], options=LossOptions(beta=0.5, label_smoothing=0.1))


@pytest.mark.parametrize("f_divergence_type", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "discopop"])
def test_f_divergence_matches_trl(models, dpo_inputs, loss_type, f_divergence_type):
    """f-DPO scores replace the log-ratios in the difference-based losses exactly as in TRL (α = 0.3)."""
    options = LossOptions(beta=0.5, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=0.3)
    _assert_same(models, dpo_inputs, [loss_type], options=options)


def test_multi_loss_weights_match_trl(models, dpo_inputs):
    """MPO-like mix with explicit weights: TRL sums w_k · mean(L_k)."""
    _assert_same(
        models, dpo_inputs, ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], options=LossOptions(beta=0.5)
    )


def test_multi_loss_default_weights_match_trl(models, dpo_inputs):
    """loss_weights=None means 1.0 for every loss type (RPO with α = 1)."""
    _assert_same(models, dpo_inputs, ["sigmoid", "sft"], None, options=LossOptions(beta=0.5))


@pytest.mark.parametrize("ld_alpha", [0.0, 0.4])
def test_ld_alpha_matches_trl(models, dpo_inputs, ld_alpha):
    """LD-DPO: policy and reference sequence log-probs both use the shared-length split (and sft the raw ones)."""
    _assert_same(
        models, dpo_inputs, ["sigmoid", "sft"], [1.0, 0.3], options=LossOptions(beta=0.5), ld_alpha=ld_alpha
    )


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_down"])
def test_wpo_weighting_matches_trl(models, dpo_inputs, loss_type):
    """WPO weights exp(mean(logp − log Σp²)) of chosen × rejected, detached, multiply each pair's loss."""
    _assert_same(models, dpo_inputs, [loss_type], options=LossOptions(beta=0.5), use_weighting=True)


def _pair_batch(seed: int, batch_size: int = 5) -> PreferenceBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 20, (2, batch_size), generator=g)
    logps = -torch.rand(4, batch_size, generator=g) * lengths.repeat(2, 1) * 2  # about −2 nats/token at most
    token_logps = -torch.rand(batch_size, 6, generator=g) * 3
    return PreferenceBatch(
        chosen_logps=logps[0],
        rejected_logps=logps[1],
        chosen_lengths=lengths[0],
        rejected_lengths=lengths[1],
        ref_chosen_logps=logps[2],
        ref_rejected_logps=logps[3],
        chosen_token_logps=token_logps,
        chosen_token_mask=torch.rand(batch_size, 6, generator=g) > 0.3,
    )


def _cpo_self(loss_type: str, options: LossOptions):
    accelerator = SimpleNamespace(device=torch.device("cpu"))
    return SimpleNamespace(
        alpha=0.0,
        beta=options.beta,
        simpo_gamma=options.simpo_gamma,
        accelerator=accelerator,
        label_smoothing=options.label_smoothing,
        loss_type=loss_type,
    )


def test_parity_references_are_all_exercised():
    """Expected: every `trl_reference` in the registry is one this file tests (no untested parity claim)."""
    tested = {"DPOTrainer._compute_loss", "CPOTrainer.cpo_loss", "ORPOTrainer.odds_ratio_loss"}
    claimed = {spec.trl_reference for spec in LOSSES.values() if spec.trl_reference is not None}
    assert claimed == tested
    assert {n for n, s in LOSSES.items() if s.trl_reference == "CPOTrainer.cpo_loss"} == {
        "simpo",
        "cdpo",
        "ipo_unnormalized",
    }
    assert {n for n, s in LOSSES.items() if s.trl_reference == "ORPOTrainer.odds_ratio_loss"} == {"orpo"}


def test_simpo_matches_trl_cpo():
    """CPO `simpo` on average log-probs (CPOTrainer averages them for simpo), γ = 0.7, ε = 0.1, β = 2."""
    options = LossOptions(beta=2.0, simpo_gamma=0.7, label_smoothing=0.1)
    batch = _pair_batch(1)
    chosen_avg = batch.chosen_logps / batch.chosen_lengths
    rejected_avg = batch.rejected_logps / batch.rejected_lengths
    expected, _, _ = CPOTrainer.cpo_loss(_cpo_self("simpo", options), chosen_avg, rejected_avg)
    torch.testing.assert_close(get_loss("simpo").fn(batch, options), expected, rtol=1e-6, atol=1e-7)


def test_cdpo_matches_trl_cpo_sigmoid_on_log_ratios():
    """cDPO is CPO's smoothed `sigmoid` applied to the DPO log-ratios (logits = Δc − Δr), ε = 0.2."""
    options = LossOptions(beta=0.3, label_smoothing=0.2)
    batch = _pair_batch(2)
    chosen_ratio, rejected_ratio = log_ratios(batch)
    expected, _, _ = CPOTrainer.cpo_loss(_cpo_self("sigmoid", options), chosen_ratio, rejected_ratio)
    torch.testing.assert_close(get_loss("cdpo").fn(batch, options), expected, rtol=1e-6, atol=1e-7)


def test_ipo_unnormalized_matches_trl_cpo_ipo_on_log_ratios():
    """Azar et al.'s IPO = CPO's `ipo` (x − 1/(2β))² with x = Δc − Δr (summed, not averaged)."""
    options = LossOptions(beta=0.3)
    batch = _pair_batch(3)
    chosen_ratio, rejected_ratio = log_ratios(batch)
    expected, _, _ = CPOTrainer.cpo_loss(_cpo_self("ipo", options), chosen_ratio, rejected_ratio)
    torch.testing.assert_close(
        get_loss("ipo_unnormalized").fn(batch, options), expected, rtol=1e-6, atol=1e-7
    )


def test_orpo_odds_term_matches_trl():
    """ORPO − NLL = −λ·log σ(log odds); TRL's `odds_ratio_loss` returns +λ·log σ(log odds) (it subtracts it)."""
    options = LossOptions(beta=0.25)
    batch = _pair_batch(4)
    chosen_avg = batch.chosen_logps / batch.chosen_lengths
    rejected_avg = batch.rejected_logps / batch.rejected_lengths
    trl_self = SimpleNamespace(beta=options.beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_terms = ORPOTrainer.odds_ratio_loss(trl_self, chosen_avg, rejected_avg)[0]
    ours = get_loss("orpo").fn(batch, options) - chosen_nll(batch)
    torch.testing.assert_close(ours, -trl_terms, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("num_items_in_batch", [None, 37])
def test_sft_loss_matches_transformers(num_items_in_batch):
    """token_stats -> sft_loss == transformers' ForCausalLMLoss (sum/N with N given, token mean without), grads included."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 9, 50, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9), generator=g)
    labels[0, :4] = -100  # a masked prompt
    labels[2, 6:] = -100  # padding
    stats = token_stats(logits, next_token_labels(labels))  # the engine's path: per-token log-probs, then the loss
    ours = sft_loss(stats.logps, stats.mask, num_items_in_batch)
    (our_grad,) = torch.autograd.grad(ours, logits)
    kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}
    expected = ForCausalLMLoss(logits, labels, vocab_size=50, **kwargs)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(our_grad, expected_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logps_match_log_softmax_gather(dtype):
    """token_logps == log_softmax(logits).gather(labels), 0 at -100, vs an fp64 reference; chunking changes nothing.

    Tolerance: log p = z_y − logsumexp(z) cancels two fp32 numbers of size up to max|z| (≈ 16 here), so the
    fp32 result is exact to a few ulps of max|z|: we allow 8 · eps_fp32 · max|z| ≈ 1.5e-5.
    """
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(2, 7, 33, generator=g) * 4).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 33, (2, 7), generator=g)
    labels[1, :3] = -100
    exact_logits = logits.detach().double().requires_grad_(True)
    expected = torch.log_softmax(exact_logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = expected * (labels != -100)
    atol = 8 * torch.finfo(torch.float32).eps * logits.detach().float().abs().max().item()
    for chunk_rows in (None, 1, 3):
        ours = token_logps(logits, labels, chunk_rows=chunk_rows)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), expected, rtol=0, atol=atol)
    weights = torch.arange(7.0)  # distinct upstream gradients per position
    (our_grad,) = torch.autograd.grad((ours * weights).sum(), logits)
    (expected_grad,) = torch.autograd.grad((expected * weights.double()).sum(), exact_logits)
    assert our_grad.dtype == dtype
    # gradient = w·(onehot − p): entries ≤ 6 in size; fp32 error a few ulps of that, bf16 rounding 2^-8 of it
    grad_atol = 6 * (2**-8 if dtype == torch.bfloat16 else 8 * torch.finfo(torch.float32).eps)
    torch.testing.assert_close(our_grad.double(), expected_grad, rtol=0, atol=grad_atol)


def test_token_entropy_matches_trl_entropy_from_logits():
    """Our entropy (logsumexp − Σ p·z, fp32) equals TRL's −Σ p log p helper."""
    logits = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(8)) * 3
    torch.testing.assert_close(
        token_entropy(logits, chunk_rows=2), entropy_from_logits(logits), rtol=0, atol=1e-5
    )
    assert math.isfinite(token_entropy(logits).sum().item())


def test_token_stats_extras_match_direct_formulas():
    """log Σp², mean logit and first-argmax top-1 match their direct full-softmax definitions."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 6, 30, generator=g) * 3
    logits[0, 1, 4] = logits[0, 1, 7] = 50.0  # tie: argmax is 4 (first), so label 7 is NOT top-1
    labels = torch.randint(0, 30, (2, 6), generator=g)
    labels[0, 1] = 7
    labels[1, 0] = -100
    stats = token_stats(logits, labels, log_sum_sq_probs=True, mean_logits=True, is_top1=True)
    valid = labels != -100
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(stats.log_sum_sq_probs, (probs**2).sum(-1).log() * valid, rtol=0, atol=1e-5)
    torch.testing.assert_close(stats.mean_logits, logits.mean(-1) * valid, rtol=0, atol=1e-6)
    assert torch.equal(stats.is_top1, (logits.argmax(-1) == labels) & valid)
    assert not stats.is_top1[0, 1]
