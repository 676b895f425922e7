"""Per-token log-probs from a causal LM without materialising the full (B, T, V) logits.

The backbone runs once; the LM head is applied only at positions whose next token is a target, in chunks of
rows, each chunk under activation checkpointing so its (chunk, V) logits are freed after the forward and
recomputed in backward. That is what keeps DPO's policy + reference and long SFT sequences inside memory.
Numerically it is the same computation as `log_softmax(model(...).logits)` gathered at the labels (fp32
log-sum-exp), which is also what TRL 1.16's fused LM head computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from losses.logps import token_stats as chunk_token_stats

ROWS_PER_CHUNK = 1024  # target positions projected at once: (1024, V) fp32 logits ≈ 0.5 GB at V = 128k


@dataclass
class TokenStats:
    """Per-target-token statistics, each (N,) over the N positions where `labels != -100` (row-major)."""

    logps: Tensor  # log p(label), differentiable
    entropy: Tensor  # entropy of the next-token distribution (no grad)
    is_top1: Tensor  # argmax == label (bool)
    logit_mean: Tensor  # mean logit over the vocabulary (no grad), for DPO's logits/* metrics
    mask: Tensor  # (B, T-1) bool: which shifted positions are targets
    log_sum_sq: Tensor | None = None  # log Σ_v p_v² (no grad), for WPO's weights; only when asked for


def _head_stats(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, scale: float,
                softcap: float | None, want_log_sum_sq: bool) -> tuple[Tensor, ...]:
    """Project one chunk of target positions through the LM head and score it (losses.logps does the math)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)  # (n, V) in the compute dtype
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    stats = chunk_token_stats(logits.unsqueeze(0), targets.unsqueeze(0), entropy=True, mean_logits=True,
                              is_top1=True, log_sum_sq_probs=want_log_sum_sq)
    log_sum_sq = stats.log_sum_sq_probs if want_log_sum_sq else torch.zeros_like(stats.logps)
    return stats.logps[0], stats.entropy[0], stats.is_top1[0], stats.mean_logits[0], log_sum_sq[0]


def _logit_transform(model) -> tuple[float, float | None]:
    config = model.config.get_text_config()
    scale = getattr(config, "logit_scale", None) or 1.0
    return float(scale), getattr(config, "final_logit_softcapping", None)


def token_stats(model, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, want_log_sum_sq: bool = False) -> TokenStats:
    """Run `model` and score `labels` (same shape as input_ids, -100 = not a target), shifting by one.

    Shape:
        input_ids, labels, attention_mask, position_ids: (B, T)
        returns per-target tensors of shape (N,), N = (labels[:, 1:] != -100).sum()
    """
    kwargs = {"input_ids": input_ids, "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    hidden = model.get_decoder()(**kwargs).last_hidden_state[:, :-1]  # (B, T-1, H)
    targets = labels[:, 1:]  # (B, T-1): the token each position predicts
    mask = targets != -100
    hidden, targets = hidden[mask], targets[mask]  # (N, H), (N,)

    head = model.get_output_embeddings()
    scale, softcap = _logit_transform(model)
    outputs = []
    for start in range(0, targets.numel(), ROWS_PER_CHUNK):
        chunk = slice(start, start + ROWS_PER_CHUNK)
        args = (hidden[chunk], head.weight, head.bias, targets[chunk], scale, softcap, want_log_sum_sq)
        if torch.is_grad_enabled():
            outputs.append(checkpoint(_head_stats, *args, use_reentrant=False))
        else:
            outputs.append(_head_stats(*args))
    if not outputs:  # no target at all: keep the graph connected so backward still works
        zero = hidden.sum() * 0.0
        empty = hidden.new_zeros(0)
        return TokenStats(empty + zero, empty, empty.bool(), empty, mask, empty)
    logps, entropy, is_top1, logit_mean, log_sum_sq = (torch.cat(parts) for parts in zip(*outputs, strict=True))
    return TokenStats(logps, entropy, is_top1, logit_mean, mask, log_sum_sq if want_log_sum_sq else None)


def per_sequence_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Scatter per-target values (N,) back to rows and sum: (B,)."""
    dense = values.new_zeros(mask.shape)
    dense = dense.masked_scatter(mask, values)
    return dense.sum(-1)


def scatter_to_rows(values: Tensor, mask: Tensor) -> Tensor:
    """Per-target values (N,) back to a (B, T-1) tensor, zero where `mask` is False."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)
