"""Supervised fine-tuning loss: summed token NLL over the gradient-accumulation window's target count."""

import torch

from losses.logps import IGNORE_INDEX, next_token_labels, token_logps


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal-LM negative log-likelihood, normalised like TRL 1.16 `SFTTrainer.compute_loss`.

        L = −Σ_{b,t: y_{b,t+1} ≠ −100} log p(y_{b,t+1} | y_{b,≤t}) / max(N, 1)

    N = `num_items_in_batch`: the number of target tokens in the WHOLE accumulation window (all
    micro-batches of one optimizer step, all ranks), so the window's gradient is the token-mean over the
    window, not a mean of micro-batch means. With `num_items_in_batch=None`, N = this batch's target count.
    The clamp at 1 is TRL's: a batch with no target gives 0, not NaN. Otherwise numerically equal to
    transformers' `ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch)` (tests check it).

    Args:
        logits: model logits for the input ids (NOT shifted; the shift happens here).
        labels: the input ids with -100 where no loss is wanted (prompt, padding, packing boundaries).
        num_items_in_batch: target tokens in the accumulation window, or None for this batch's count.

    Returns:
        Scalar loss (fp32).

    Shape:
        logits: (B, T, V)
        labels: (B, T)
        output: ()
    """
    next_labels = next_token_labels(labels)  # (B, T), scored against logits[:, t]
    nll_sum = -token_logps(logits, next_labels).sum()  # ()
    if num_items_in_batch is None:
        num_items_in_batch = (next_labels != IGNORE_INDEX).sum()
    return nll_sum / torch.as_tensor(num_items_in_batch, device=nll_sum.device).clamp(min=1)


def nll_loss(token_logps: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """The same loss as `sft_loss`, from per-target log-probs already gathered (the engine's lean LM head).

        L = −Σ_i log p_i / max(N, 1),   N = num_items_in_batch, or the number of targets given

    Args:
        token_logps: log p(target) of each target token of the micro-batch.
        num_items_in_batch: target tokens in the whole accumulation window (all micro-batches, all ranks).

    Shape:
        token_logps: (N_batch,)
        output: ()
    """
    if num_items_in_batch is None:
        num_items_in_batch = token_logps.numel()
    return -token_logps.sum() / torch.as_tensor(num_items_in_batch, device=token_logps.device).clamp(min=1)
