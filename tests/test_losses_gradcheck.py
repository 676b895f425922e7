"""torch.autograd.gradcheck (float64) of every registered loss, the f-divergences, and the token helpers.

gradcheck compares our analytic gradients with central finite differences; it passes (returns True) only
if they agree to atol 1e-5 / rtol 1e-3. Inputs are random but chosen away from non-differentiable points
(hinge's kink at β·d = 1, ties in aot's sort).
"""

import pytest
import torch
from torch.autograd import gradcheck

from losses import (
    LOSSES,
    LossOptions,
    PreferenceBatch,
    get_loss,
    next_token_labels,
    sequence_logps,
    sft_loss,
    token_logps,
)

B, L = 4, 5


def _inputs(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    # summed log-probs around −10 with log-ratios of order 1; distinct values, so sorts have no ties
    logps = -10 + torch.randn(4, B, generator=g, dtype=torch.float64) * 2
    token_logps = -torch.rand(B, L, generator=g, dtype=torch.float64) * 3 - 0.1
    return tuple(x.requires_grad_(True) for x in (logps[0], logps[1], logps[2], logps[3], token_logps))


LENGTHS = (torch.tensor([3, 5, 2, 7]), torch.tensor([4, 1, 6, 2]))
TOKEN_MASK = torch.tensor(
    [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool
)
OPTIONS = LossOptions(beta=0.3, label_smoothing=0.1, discopop_tau=0.5, simpo_gamma=0.2)


def _loss_function(name: str, options: LossOptions):
    def per_pair(chosen, rejected, ref_chosen, ref_rejected, token_logps):
        batch = PreferenceBatch(
            chosen,
            rejected,
            *LENGTHS,
            ref_chosen,
            ref_rejected,
            chosen_token_logps=token_logps,
            chosen_token_mask=TOKEN_MASK,
        )
        return get_loss(name).fn(batch, options)

    return per_pair


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_gradcheck(name):
    """Expected True: analytic = numeric gradient w.r.t. policy, reference and token log-probs."""
    inputs = _inputs(seed=sorted(LOSSES).index(name))
    if name == "hinge":
        # d = Δc − Δr = [0.5, −1, 2, 0.1]: every β·d < 1, away from the kink, so no gradient is zero
        with torch.no_grad():
            inputs[0].copy_(inputs[2] + torch.tensor([0.5, -1.0, 2.0, 0.1], dtype=torch.float64))
            inputs[1].copy_(inputs[3])
    assert gradcheck(_loss_function(name, OPTIONS), inputs)


@pytest.mark.parametrize("f_divergence_type", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize(
    "name", sorted(n for n, spec in LOSSES.items() if spec.f_divergence and n != "hinge")
)
def test_f_divergence_gradcheck(name, f_divergence_type):
    """Expected True for every f-divergence-capable loss under each non-default divergence (α = 0.3)."""
    options = LossOptions(
        beta=0.3,
        label_smoothing=0.1,
        discopop_tau=0.5,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=0.3,
    )
    # log-ratios of order 1 keep exp(±Δ) moderate for forward_kl / alpha
    inputs = _inputs(seed=11)
    assert gradcheck(_loss_function(name, options), inputs)


def test_token_logps_gradcheck():
    """The hand-written backward of the chunked log-softmax (1[v = y] − p_v) is exact; -100 rows get 0."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 6, (2, 4), generator=g)
    labels[0, 1] = -100
    assert gradcheck(lambda x: token_logps(x, labels, chunk_rows=3), (logits,))


def test_sft_loss_gradcheck():
    """token_logps -> sft_loss (the engine's path: shift, gather, divide by N) w.r.t. the logits, N = 5."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 6, (2, 4), generator=g)
    labels[1, :2] = -100
    next_labels = next_token_labels(labels)  # (2, 4)
    mask = next_labels != -100
    assert gradcheck(lambda x: sft_loss(token_logps(x, next_labels), mask, num_items_in_batch=5), (logits,))


def test_sequence_logps_ld_alpha_gradcheck():
    """LD-DPO sums: gradient 1 on shared tokens, α on the tail, 0 off the completion."""
    g = torch.Generator().manual_seed(5)
    token = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]])
    assert gradcheck(lambda x: sequence_logps(x, mask, ld_alpha=0.3), (token,))
