"""Per-token log-probabilities and logit statistics, chunked so the fp32 log-softmax never exists whole.

Alignment convention (used everywhere in `losses/`): `labels[b, t]` is the token that position `t` of
`logits[b, t]` is scored against, i.e. labels are ALREADY shifted to the next token. Build them from the
input ids with `next_token_labels(labels)` (`labels[:, 1:]` padded with one -100 at the end), the same
trick transformers' `ForCausalLMLoss` uses: the logits are never sliced, so no copy of them is made.
Positions whose label is -100 score 0 (and get a zero gradient).

Numerics follow TRL 1.16's fused LM head (`trl/kernels/chunked_logprob.py`): whatever the logits dtype,
the log-sum-exp, the gathered logit and every statistic are computed in fp32 (fp64 stays fp64), and the
results are fp32. Memory: only label-carrying positions are read, gathered and upcast a chunk of about
`_CHUNK_ELEMENTS` logits at a time. The backward is hand-written and recomputes the softmax per chunk, so
autograd keeps no fp32 copy of the logits either (the gradient of the logits is, of course, full size).

    labels = input_ids.masked_fill(completion_mask == 0, -100)           # (B, T)
    next_labels = next_token_labels(labels)                               # (B, T), last column -100
    stats = token_stats(logits, next_labels, entropy=True, is_top1=True)  # logits (B, T, V)
    sequence_logps = stats.logps.sum(-1)                                  # (B,)
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# About 16M logits per chunk: 64 MiB in fp32, whatever the vocabulary size.
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class TokenStats:
    """Per-token outputs of `token_stats`; each (B, T), zero (False) where the label is -100.

    Attributes:
        logps: log p(label), fp32, differentiable w.r.t. the logits.
        entropy: H = logsumexp(z) − Σ_v p_v z_v (nats), detached; None unless requested.
        log_sum_sq_probs: log Σ_v p_v², detached (WPO weights); None unless requested.
        mean_logits: Σ_v z_v / V, detached (TRL's `logits/chosen` metric); None unless requested.
        is_top1: label == argmax_v z_v (first maximum wins, like `argmax`), bool; None unless requested.
    """

    logps: torch.Tensor
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """Align labels with the logits that predict them: `labels[:, 1:]` padded with -100 at the end.

    Args:
        labels: token ids with -100 where no loss is wanted.

    Returns:
        Labels such that `out[:, t]` is scored against `logits[:, t]`; the last column is -100.

    Shape:
        labels: (B, T) -> (B, T)
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 for bf16/fp16/fp32 logits like TRL; fp64 is kept so gradcheck can run in double precision.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scored_chunks(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int | None):
    """Yield `(batch_idx, time_idx)`, index tensors (k,) of at most `chunk_rows` label-carrying positions.

    Only positions with a label are ever read (prompt and padding are skipped, like TRL's compact mode), and
    one `nonzero` for the whole batch means one host sync, not one per chunk.
    """
    rows = chunk_rows or max(1, _CHUNK_ELEMENTS // logits.shape[-1])
    batch_idx, time_idx = (labels != IGNORE_INDEX).nonzero(as_tuple=True)  # (K,), (K,)
    for start in range(0, batch_idx.numel(), rows):
        yield batch_idx[start : start + rows], time_idx[start : start + rows]


class _ChunkedTokenStats(torch.autograd.Function):
    """log p(label) per token (differentiable) plus optional detached statistics, one pass over the logits."""

    @staticmethod
    def forward(ctx, logits, labels, chunk_rows, want_entropy, want_lssp, want_mean_logits, want_top1):
        ctx.set_materialize_grads(False)
        batch, seq_len, _ = logits.shape
        dtype = _compute_dtype(logits.dtype)
        zeros = dict(device=logits.device, dtype=dtype)
        logps = torch.zeros(batch, seq_len, **zeros)  # (B, T)
        log_z = torch.zeros(batch, seq_len, **zeros)  # (B, T), saved for the backward
        entropy = torch.zeros(batch, seq_len, **zeros) if want_entropy else None
        lssp = torch.zeros(batch, seq_len, **zeros) if want_lssp else None
        mean_logits = torch.zeros(batch, seq_len, **zeros) if want_mean_logits else None
        is_top1 = torch.zeros(batch, seq_len, device=logits.device, dtype=torch.bool) if want_top1 else None

        for where in _scored_chunks(logits, labels, chunk_rows):
            z = logits[where].to(dtype)  # (k, V): a copy of k rows only, upcast
            targets = labels[where]  # (k,)
            lse = torch.logsumexp(z, dim=-1)  # (k,)
            target_z = z.gather(1, targets.unsqueeze(1)).squeeze(1)  # (k,)
            logps[where] = target_z - lse
            log_z[where] = lse
            if want_entropy or want_lssp:
                log_p = z - lse.unsqueeze(1)  # (k, V)
            if want_entropy:
                entropy[where] = lse - (log_p.exp() * z).sum(-1)
            if want_lssp:
                lssp[where] = torch.logsumexp(2 * log_p, dim=-1)
            if want_mean_logits:
                mean_logits[where] = z.mean(-1)
            if want_top1:
                is_top1[where] = z.argmax(-1) == targets

        ctx.save_for_backward(logits, labels, log_z)
        ctx.chunk_rows = chunk_rows
        extras = [x for x in (entropy, lssp, mean_logits, is_top1) if x is not None]
        ctx.mark_non_differentiable(*extras)
        return logps, entropy, lssp, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_logps, *_unused):
        logits, labels, log_z = ctx.saved_tensors
        if grad_logps is None or not ctx.needs_input_grad[0]:
            return (None,) * 7
        dtype = _compute_dtype(logits.dtype)
        grad_logits = torch.zeros_like(logits)  # (B, T, V)
        for where in _scored_chunks(logits, labels, ctx.chunk_rows):
            z = logits[where].to(dtype)  # (k, V)
            targets = labels[where]  # (k,)
            upstream = grad_logps[where].to(dtype)  # (k,)
            probs = (z - log_z[where].unsqueeze(1)).exp()  # (k, V) softmax, recomputed
            # d log p_y / d z_v = 1[v = y] − p_v
            grad = -upstream.unsqueeze(1) * probs  # (k, V)
            grad.scatter_add_(1, targets.unsqueeze(1), upstream.unsqueeze(1))
            grad_logits[where] = grad.to(logits.dtype)
        return grad_logits, None, None, None, None, None, None


def _check_shapes(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    vocab = logits.shape[-1]
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        raise ValueError(f"labels must be -100 or in [0, {vocab}); found {labels[bad][0].item()}")


def token_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    entropy: bool = False,
    log_sum_sq_probs: bool = False,
    mean_logits: bool = False,
    is_top1: bool = False,
    chunk_rows: int | None = None,
) -> TokenStats:
    """Per-token log p(label) and, on request, entropy / log Σp² / mean logit / top-1 hit, in one pass.

    Equals `log_softmax(logits.float(), -1).gather(-1, labels)` where labels != -100 and 0 elsewhere, as
    TRL 1.16's fused LM head returns it (`FusedCausalLMOutput.log_probs` and friends).

    Args:
        logits: model logits, any float dtype.
        labels: next-token labels ALIGNED with `logits` (see `next_token_labels`), -100 = not scored.
        entropy, log_sum_sq_probs, mean_logits, is_top1: which detached statistics to compute.
        chunk_rows: rows per chunk; default keeps a chunk near 16M logits.

    Returns:
        `TokenStats`; every field is zero / False at positions whose label is -100.

    Shape:
        logits: (B, T, V)
        labels: (B, T)
        each field of the result: (B, T)
    """
    _check_shapes(logits, labels)
    outputs = _ChunkedTokenStats.apply(
        logits, labels, chunk_rows, entropy, log_sum_sq_probs, mean_logits, is_top1
    )
    return TokenStats(*outputs)


def token_logps(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """log p(label) per token, 0 where the label is -100 (fp32, differentiable, chunked).

    Args:
        logits: model logits, any float dtype.
        labels: next-token labels ALIGNED with `logits` (`labels[b, t]` is scored by `logits[b, t]`; build
            them with `next_token_labels`), -100 = not scored.
        chunk_rows: rows per chunk; default keeps a chunk near 16M logits.

    Returns:
        Per-token log-probabilities of the labels.

    Shape:
        logits: (B, T, V)
        labels: (B, T)
        output: (B, T)
    """
    return token_stats(logits, labels, chunk_rows=chunk_rows).logps


def token_entropy(logits: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Entropy of the next-token distribution at every position, in nats (fp32, detached: a metric).

    H = logsumexp(z) − Σ_v softmax(z)_v · z_v, the form TRL's fused kernel uses.

    Args:
        logits: model logits, any float dtype.
        chunk_rows: rows per chunk; default keeps a chunk near 16M logits.

    Shape:
        logits: (B, T, V)
        output: (B, T)
    """
    with torch.no_grad():
        every_position = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)  # (B, T)
        return token_stats(logits, every_position, entropy=True, chunk_rows=chunk_rows).entropy


def sequence_logps(
    token_logps: torch.Tensor, completion_mask: torch.Tensor, ld_alpha: float | None = None
) -> torch.Tensor:
    """Sequence log-probs of [chosen; rejected] rows: a plain sum, or LD-DPO's down-weighted tail.

    With `ld_alpha=None` (default): Σ_t token_logps · mask. With `ld_alpha` (LD-DPO, Liu et al. 2024,
    "Length Desensitization in Direct Preference Optimization", arXiv:2409.06411), per pair
    ℓ_s = min(|chosen|, |rejected|) and, for each row, with k = rank of a token within its completion:

        logp = Σ_{k ≤ ℓ_s} logp_k + α · Σ_{k > ℓ_s} logp_k

    as TRL 1.16 `DPOTrainer._compute_loss` / `compute_ref_log_probs` do (D:1303-1315, 1269-1281): apply
    the same call to the policy and the reference token log-probs.

    Args:
        token_logps: per-token log-probs (`token_logps`/`token_stats`), rows ordered [chosen; rejected].
        completion_mask: 1 where a token is a scored completion token, aligned with `token_logps` (with the
            `next_token_labels` convention: `next_labels != -100`; TRL: `completion_mask[:, 1:]`).
        ld_alpha: LD-DPO α in [0, 1]; 1.0 equals the plain sum, 0.0 drops the longer response's tail.

    Returns:
        Per-row sequence log-probs, [chosen; rejected].

    Shape:
        token_logps: (2B, T)
        completion_mask: (2B, T)
        output: (2B,)
    """
    mask = completion_mask.bool()  # (2B, T)
    masked = token_logps * mask  # (2B, T)
    if ld_alpha is None:
        return masked.sum(dim=1)
    rank = mask.long().cumsum(dim=1)  # (2B, T) 1-based position within the completion
    chosen_lengths, rejected_lengths = mask.sum(dim=1).chunk(2, dim=0)  # (B,), (B,)
    shared = torch.minimum(chosen_lengths, rejected_lengths).repeat(2).unsqueeze(1)  # (2B, 1)
    shared_logps = (masked * (rank <= shared)).sum(dim=1)  # (2B,)
    tail_logps = (masked * (rank > shared)).sum(dim=1)  # (2B,)
    return shared_logps + ld_alpha * tail_logps


def wpo_weights(
    token_logps: torch.Tensor, token_log_sum_sq_probs: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """WPO pair weights (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization",
    arXiv:2406.11827, eq. 2 with TRL 1.16's sampling-aligned normalisation, D:1518-1526).

        w(y) = exp( Σ_t m_t (log p_t − log Σ_v p_{t,v}²) / max(Σ_t m_t, 1) ),   ω = w(chosen) · w(rejected)

    Detached: the weights scale the loss but carry no gradient. Pass ω as `pair_weights` to
    `preference_loss`, which multiplies every loss type's per-pair values by it before the batch mean.

    Args:
        token_logps: per-token policy log-probs (NOT LD-weighted), rows ordered [chosen; rejected].
        token_log_sum_sq_probs: `TokenStats.log_sum_sq_probs` of the same forward.
        completion_mask: scored completion tokens, aligned with `token_logps` (TRL: `completion_mask[:, 1:]`).

    Returns:
        ω per pair.

    Shape:
        token_logps, token_log_sum_sq_probs, completion_mask: (2B, T)
        output: (B,)
    """
    with torch.no_grad():
        mask = completion_mask.to(token_logps.dtype)  # (2B, T)
        lengths = mask.sum(dim=1).clamp(min=1)  # (2B,)
        mean_aligned = ((token_logps - token_log_sum_sq_probs) * mask).sum(dim=1) / lengths  # (2B,)
        chosen_weights, rejected_weights = mean_aligned.exp().chunk(2, dim=0)  # (B,), (B,)
        return chosen_weights * rejected_weights
