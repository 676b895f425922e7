"""Per-token log-probabilities and logit statistics, chunked so the fp32 log-softmax never exists whole.

The ONE place log p(label) is computed, for the engine and for the library alike:
- `target_token_stats(rows, targets, project)` scores N target positions: `project` turns a chunk of rows
  into logits (the engine passes decoder hidden states and its lean LM head, engine/forward.py, so the full
  (B, T, V) logits never exist); each chunk runs under activation checkpointing, so its logits and fp32
  upcast are freed after the forward and recomputed in the backward (the projection and log p only: the
  metrics and the log-sum-exp are computed once, in the forward).
- `token_stats(logits, labels)` is the same computation for logits already at hand (tests, notebooks).

Alignment convention (used everywhere in `losses/`): `labels[b, t]` is the token that position `t` of
`logits[b, t]` is scored against, i.e. labels are ALREADY shifted to the next token. Build them from the
input ids with `next_token_labels(labels)` (`labels[:, 1:]` padded with one -100 at the end), the same
trick transformers' `ForCausalLMLoss` uses: the logits are never sliced, so no copy of them is made.
Positions whose label is -100 score 0 (and get a zero gradient).

Numerics follow TRL 1.16's fused LM head (`trl/kernels/chunked_logprob.py`): whatever the logits dtype,
the log-sum-exp, the gathered logit and every statistic are computed in fp32 (fp64 stays fp64), and the
results are fp32.

    labels = input_ids.masked_fill(completion_mask == 0, -100)           # (B, T)
    next_labels = next_token_labels(labels)                               # (B, T), last column -100
    stats = token_stats(logits, next_labels, entropy=True, is_top1=True)  # logits (B, T, V)
    sequence_logps = stats.logps.sum(-1)                                  # (B,)
"""

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
ROWS_PER_CHUNK = 1024  # target positions scored at once: (1024, V) fp32 logits ≈ 0.5 GB at V = 128k


@dataclass
class TokenStats:
    """Per-token statistics, each (B, T) over the positions of the logits scored, zero (False) off the targets.

    `token_stats(logits, labels)` returns them for every position of `logits` (labels aligned with
    `next_token_labels`); the engine's model (engine/forward.py) for the T-1 positions that predict a given token.

    Attributes:
        mask: which positions carry a label (`labels != -100`), bool.
        logps: log p(label), fp32, differentiable.
        entropy: H = logsumexp(z) − Σ_v p_v z_v (nats), detached; None unless requested.
        log_sum_sq_probs: log Σ_v p_v², detached (WPO weights); None unless requested.
        mean_logits: Σ_v z_v / V, detached (TRL's `logits/chosen` metric); None unless requested.
        is_top1: label == argmax_v z_v (first maximum wins, like `argmax`), bool; None unless requested.
    """

    mask: torch.Tensor
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


_STATISTICS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


class _TargetLogProb(torch.autograd.Function):
    """log p(target) = z_target − logsumexp(z) per row, and the log-sum-exp (reused as `known` when given).

    The forward's log-sum-exp is passed back as `known` when activation checkpointing re-runs the chunk for
    the backward, which spares that recomputation its max / exp / sum passes over the (k, V) logits. The
    backward writes the softmax gradient once and adds the target's share in place:
        dz = −g · exp(z − lse)  (torch's `logsumexp_backward`, same operations in the same order),
        dz[target] += g        (what gather's backward adds, without its (k, V) zeros and the extra add),
    so the gradient is torch autograd's to the bit (tests/test_head_work.py).

    Shape:
        z: (k, V); targets: (k,) in [0, V); known: (k,) or None; outputs: log p (k,), lse (k,) (no gradient)
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, targets: torch.Tensor, known: torch.Tensor | None):
        lse = torch.logsumexp(z, dim=-1) if known is None else known.clone()
        logps = z.gather(1, targets.unsqueeze(1)).squeeze(1) - lse
        ctx.save_for_backward(z, targets, lse)
        ctx.mark_non_differentiable(lse)
        return logps, lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _lse_grad: torch.Tensor | None):
        z, targets, lse = ctx.saved_tensors
        # One (k, V) buffer, written in place: at V = 128k each fresh one is 0.5 GiB of page faults.
        grad_z = torch.sub(z, lse.unsqueeze(-1)).exp_().mul_((-grad).unsqueeze(-1))  # (k, V)
        grad_z.scatter_add_(1, targets.unsqueeze(1), grad.unsqueeze(1))
        return grad_z, None, None


def _chunk_stats(rows: torch.Tensor, targets: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor] | None,
                 wanted: tuple[str, ...], memo: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(target) of k rows (differentiable), (k,). The first call (`memo` empty) stores in `memo` the chunk's
    log-sum-exp ("lse") and the `wanted` detached statistics (each (k,), by name).

    Under activation checkpointing the backward calls this again with the same, now filled, `memo`: the
    recomputation then does only what the gradient needs (the projection back to the logits), no log-sum-exp
    and no metric pass over the (k, V) logits.
    """
    recompute = "lse" in memo
    logits = rows if project is None else project(rows)  # (k, V) in the compute dtype
    z = logits.to(_compute_dtype(logits.dtype))  # (k, V): upcast, this chunk only
    logps, lse = _TargetLogProb.apply(z, targets, memo.get("lse"))  # (k,), (k,); d/dz_v = 1[v = y] − p_v
    if recompute:
        return logps
    memo["lse"] = lse.detach()
    with torch.no_grad():
        if "entropy" in wanted or "log_sum_sq_probs" in wanted:
            log_p = z - lse.unsqueeze(1)  # (k, V)
        if "log_sum_sq_probs" in wanted:
            memo["log_sum_sq_probs"] = torch.logsumexp(2 * log_p, dim=-1)
        if "entropy" in wanted:  # in place: log_p is spent, and a fresh (k, V) buffer costs its page faults
            memo["entropy"] = lse - log_p.exp_().mul_(z).sum(-1)
        if "mean_logits" in wanted:
            memo["mean_logits"] = z.mean(-1)
        if "is_top1" in wanted:
            memo["is_top1"] = z.argmax(-1) == targets
    return logps


def target_token_stats(
    rows: torch.Tensor,
    targets: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    wanted: tuple[str, ...] = (),
    chunk_rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """log p(target) and the `wanted` statistics at N target positions, `chunk_rows` rows at a time.

    Each chunk projects its rows to logits (`project`, e.g. the LM head; None: the rows ARE logits) and
    scores them; with autograd on, the chunk runs under activation checkpointing, so no chunk's (k, V)
    logits outlive its forward.

    Args:
        rows: one row per target position (hidden states, or logits when `project` is None).
        targets: the token each row is scored against, in [0, V).
        project: rows (k, ·) -> logits (k, V), or None.
        wanted: names among "entropy", "log_sum_sq_probs", "mean_logits", "is_top1".
        chunk_rows: rows per chunk (default `ROWS_PER_CHUNK`).

    Returns:
        {"logps": ..., **{name: ... for name in wanted}}, each (N,).

    Shape:
        rows: (N, H) or (N, V); targets: (N,); each output: (N,)
    """
    unknown = set(wanted) - set(_STATISTICS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; available: {', '.join(_STATISTICS)}")
    wanted = tuple(name for name in _STATISTICS if name in wanted)  # a fixed order for the chunks' outputs
    size = chunk_rows or ROWS_PER_CHUNK
    outputs = []
    for chunk, chunk_targets in zip(rows.split(size), targets.split(size), strict=True):
        memo: dict[str, torch.Tensor] = {}
        if torch.is_grad_enabled():
            logps = checkpoint(_chunk_stats, chunk, chunk_targets, project, wanted, memo, use_reentrant=False)
        else:
            logps = _chunk_stats(chunk, chunk_targets, project, wanted, memo)
        outputs.append((logps, *(memo[name] for name in wanted)))
    if not outputs:  # no target at all: keep the graph connected so backward still works
        empty = torch.zeros(0, device=rows.device, dtype=_compute_dtype(rows.dtype))
        values = {"logps": empty + rows.sum() * 0.0}
        values.update({name: empty.bool() if name == "is_top1" else empty for name in wanted})
        return values
    columns = [torch.cat(parts) for parts in zip(*outputs, strict=True)]
    return dict(zip(("logps", *wanted), columns, strict=True))


def scatter_to_positions(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-target values (N,) back to their (B, T) positions, zero (False) where `mask` is False."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def unpack_sequences(stats: TokenStats, sequence_index: torch.Tensor, position_ids: torch.Tensor) -> TokenStats:
    """Statistics of one packed row (padding-free) laid out one row per sequence, as a padded batch has them.

    Packed position j scores token j+1, which is token p = position_ids[j+1] of sequence s = sequence_index[j+1];
    a padded row of that sequence scores it at column p - 1. A sequence's first token (p = 0) is never a target
    and padding (s = -1) never is either, so every target has a place. Differentiable (index_put).

    Shape:
        stats fields: (1, N-1); sequence_index, position_ids: (1, N)
        result fields: (S, L-1), S = max(sequence_index) + 1 sequences, L = max(position_ids) + 1 tokens
    """
    targets = stats.mask[0]  # (N-1,)
    rows = sequence_index[0, 1:][targets]  # (n,)
    columns = position_ids[0, 1:][targets] - 1  # (n,)
    shape = (int(sequence_index.max()) + 1, int(position_ids.max()))

    def place(values: torch.Tensor | None) -> torch.Tensor | None:
        if values is None:
            return None
        return values.new_zeros(shape).index_put((rows, columns), values[0][targets])

    return TokenStats(**{field.name: place(getattr(stats, field.name)) for field in fields(TokenStats)})


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
    TRL 1.16's fused LM head returns it (`FusedCausalLMOutput.log_probs` and friends). The label-carrying
    rows are gathered once and scored by `target_token_stats`, as the engine scores its hidden states.

    Args:
        logits: model logits, any float dtype.
        labels: next-token labels ALIGNED with `logits` (see `next_token_labels`), -100 = not scored.
        entropy, log_sum_sq_probs, mean_logits, is_top1: which detached statistics to compute.
        chunk_rows: rows per chunk (default `ROWS_PER_CHUNK`).

    Returns:
        `TokenStats`; every field is zero / False at positions whose label is -100.

    Shape:
        logits: (B, T, V)
        labels: (B, T)
        each field of the result: (B, T)
    """
    _check_shapes(logits, labels)
    mask = labels != IGNORE_INDEX  # (B, T)
    flags = dict(entropy=entropy, log_sum_sq_probs=log_sum_sq_probs, mean_logits=mean_logits, is_top1=is_top1)
    values = target_token_stats(logits[mask], labels[mask], wanted=tuple(k for k, v in flags.items() if v),
                                chunk_rows=chunk_rows)  # each (N,)
    return TokenStats(mask, **{name: scatter_to_positions(value, mask) for name, value in values.items()})


def token_logps(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """log p(label) per token, 0 where the label is -100 (fp32, differentiable, chunked).

    Args:
        logits: model logits, any float dtype.
        labels: next-token labels ALIGNED with `logits` (`labels[b, t]` is scored by `logits[b, t]`; build
            them with `next_token_labels`), -100 = not scored.
        chunk_rows: rows per chunk (default `ROWS_PER_CHUNK`).

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
        chunk_rows: rows per chunk (default `ROWS_PER_CHUNK`).

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
