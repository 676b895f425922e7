"""Supervised fine-tuning loss: summed token NLL over the gradient-accumulation window's target count.

This is the one place the SFT loss and its denominator are formed; the engine (engine/sft.py) calls it for every
micro-batch and the tests check it against transformers' `ForCausalLMLoss`.
"""

import torch


def sft_loss(
    token_logps: torch.Tensor,
    target_mask: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    num_processes: int = 1,
) -> torch.Tensor:
    """Causal-LM negative log-likelihood, normalised like TRL 1.16 `SFTTrainer.compute_loss`.

        L = −Σ_{b,t: mask} log p_{b,t} / max(N, 1) · P

    N = `num_items_in_batch`: the number of target tokens in the WHOLE accumulation window (all
    micro-batches of one optimizer step, all P processes), so the window's gradient is the token-mean over
    the window, not a mean of micro-batch means (which would over-weight short micro-batches; torchtune and
    TRL do the same). With `num_items_in_batch=None`, N = this batch's target count (evaluation). The clamp
    at 1 is TRL's: a batch with no target gives 0, not NaN. The factor P = `num_processes` undoes data
    parallel's gradient AVERAGE over processes: summed over the window's micro-batches and averaged over P
    processes, the gradients are exactly those of −Σ_window log p / N.

    Args:
        token_logps: log p(label) per position (`TokenStats.logps`), zero off the targets.
        target_mask: which positions are targets (`TokenStats.mask`).
        num_items_in_batch: target tokens in the accumulation window on all processes, or None for this
            batch's count.
        num_processes: data-parallel processes whose gradients are averaged (1 for a single process).

    Returns:
        Scalar loss (fp32).

    Shape:
        token_logps, target_mask: (B, T)
        output: ()
    """
    if num_items_in_batch is None:
        num_items_in_batch = target_mask.sum()
    nll_sum = -token_logps[target_mask].sum()  # over the targets only: (N,) in row-major order
    nll = nll_sum / torch.as_tensor(num_items_in_batch, device=token_logps.device).clamp(min=1)
    return nll * num_processes
