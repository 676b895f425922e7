"""Batch prepared preference examples into `[all chosen; all rejected]` tensors, as TRL 1.16's DataCollatorForPreference.

    from data.collate_dpo import collate_dpo
    from data.common import resolve_pad_token_id
    batch = collate_dpo(examples, resolve_pad_token_id(tokenizer), max_length=1024)
    batch["input_ids"]        # (2B, T): rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected
    batch["attention_mask"]   # (2B, T): 1 on real tokens
    batch["completion_mask"]  # (2B, T): 1 on chosen/rejected tokens (the ones whose log-probs are summed)

Truncation lives here (not in data preparation), as in TRL: each prompt+completion sequence is cut to
`max_length` tokens, keeping its start (`keep_start`) or its end (`keep_end`), then right-padded. Both masks
are built from sequence lengths, never by comparing ids with the pad id, so `pad_token_id == eos_token_id`
cannot mask away a real EOS. Precomputed reference log-probs ride along under TRL's names,
`ref_chosen_logps` and `ref_rejected_logps`, each `(B,)`, when the examples carry them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from data.collate import right_pad
from data.common import check_length_options

REF_LOGPS_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
"""Per-example precomputed reference log-probs (TRL's column names), passed through as `(B,)` tensors."""


def collate_dpo(
    examples: Sequence[Mapping[str, Any]],
    pad_token_id: int,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    pad_to_multiple_of: int | None = None,
    padding_free: bool = False,
) -> dict[str, Tensor]:
    """Pad B preference examples into one batch of 2B sequences.

    Args:
        examples: B mappings with `prompt_ids`, `chosen_ids`, `rejected_ids` (lists of ints, as produced by
            `data.dpo.prepare_dpo_dataset`), optionally `ref_chosen_logps` / `ref_rejected_logps` (floats);
            other keys are ignored.
        pad_token_id: id written into padding positions (masked out, so it may equal the EOS id).
        max_length: cut each prompt+completion sequence to this many tokens before padding; None keeps all.
        truncation_mode: "keep_start" keeps the first `max_length` tokens, "keep_end" the last.
        pad_to_multiple_of: round T up to a multiple of this (TRL's `pad_to_multiple_of`).
        padding_free: pack the 2B sequences into one row instead (see `pack_sequences`).

    Returns:
        `input_ids`, `attention_mask`, `completion_mask`: int64 `(2B, T)`, T the longest kept sequence
        (rounded up); plus `ref_chosen_logps`, `ref_rejected_logps`: `(B,)` when the first example has them.
        Padding-free: `input_ids`, `completion_mask`, `position_ids`, `sequence_index`, each `(1, ΣT)` (rounded
        up), and no attention mask.

    Shape:
        B = len(examples); rows `[:B]` are prompt+chosen, rows `[B:]` prompt+rejected of the same examples.
    """
    if not examples:
        raise ValueError("collate_dpo needs at least one example")
    check_length_options(max_length, truncation_mode)

    sequences: list[list[int]] = []  # 2B token lists, chosen block first
    prompt_lengths: list[int] = []  # prompt tokens at the start of each sequence (before truncation)
    for completion_key in ("chosen_ids", "rejected_ids"):
        for example in examples:
            sequences.append(list(example["prompt_ids"]) + list(example[completion_key]))
            prompt_lengths.append(len(example["prompt_ids"]))

    full_lengths = torch.tensor([len(ids) for ids in sequences])  # (2B,)
    prompt_kept = torch.tensor(prompt_lengths)  # (2B,)
    if max_length is not None:
        if truncation_mode == "keep_start":
            sequences = [ids[:max_length] for ids in sequences]
        else:
            cut = (full_lengths - max_length).clamp(min=0)  # (2B,) tokens removed from the front
            sequences = [ids[len(ids) - min(len(ids), max_length) :] for ids in sequences]
            prompt_kept = prompt_kept - cut
    lengths = torch.tensor([len(ids) for ids in sequences])  # (2B,)
    prompt_kept = prompt_kept.clamp(min=0).minimum(lengths)  # (2B,) prompt tokens left in the kept window

    if padding_free:
        batch = pack_sequences(sequences, prompt_kept.tolist(), pad_token_id, pad_to_multiple_of)
    else:
        input_ids = right_pad([torch.tensor(ids, dtype=torch.long) for ids in sequences], pad_token_id,
                              pad_to_multiple_of)  # (2B, T)
        width = input_ids.size(1)
        positions = torch.arange(width)  # (T,)
        attention_mask = (positions < lengths[:, None]).long()  # (2B, T)
        completion_mask = attention_mask * (positions >= prompt_kept[:, None]).long()  # (2B, T)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    for key in REF_LOGPS_KEYS:
        if key in examples[0]:
            batch[key] = torch.tensor([example[key] for example in examples])  # (B,)
    return batch


def pack_sequences(sequences: list[list[int]], prompt_lengths: list[int], pad_token_id: int,
                   pad_to_multiple_of: int | None = None) -> dict[str, Tensor]:
    """--padding_free: the 2B (already truncated) sequences end to end in one row, no padding.

    `position_ids` restart at 0 at each sequence, which is how transformers keeps packed sequences from attending
    to each other (no attention mask is passed); `sequence_index` says which of the 2B sequences each token
    belongs to, so the model's per-token statistics can be laid out one row per sequence again
    (`losses.logps.unpack_sequences`) and summed per sequence exactly as in the padded layout. With
    `pad_to_multiple_of`, the row is padded at its end with one-token "sequences" at position 0 that have
    `sequence_index` -1 and no completion token.

    Shape:
        sequences: 2B lists, the n-th of T_n tokens -> each output (1, ΣT_n) (rounded up)
    """
    input_ids = torch.tensor([token for ids in sequences for token in ids], dtype=torch.long)  # (ΣT,)
    positions = torch.cat([torch.arange(len(ids)) for ids in sequences])  # (ΣT,)
    completion = torch.cat([(torch.arange(len(ids)) >= kept).long()
                            for ids, kept in zip(sequences, prompt_lengths, strict=True)])  # (ΣT,)
    index = torch.cat([torch.full((len(ids),), n) for n, ids in enumerate(sequences)])  # (ΣT,)
    return {
        "input_ids": right_pad([input_ids], pad_token_id, pad_to_multiple_of),  # (1, ΣT)
        "completion_mask": right_pad([completion], 0, pad_to_multiple_of),
        "position_ids": right_pad([positions], 0, pad_to_multiple_of),
        "sequence_index": right_pad([index], -1, pad_to_multiple_of),
    }


def completion_lengths(batch: Mapping[str, Tensor]) -> Tensor:
    """Completion tokens of each of the 2B sequences, (2B,), in either layout (TRL: the unshifted mask)."""
    if "sequence_index" not in batch:
        return batch["completion_mask"].sum(-1)
    index = batch["sequence_index"][batch["completion_mask"].bool()]  # (N_completion,)
    return torch.bincount(index, minlength=int(batch["sequence_index"].max()) + 1)


def num_real_tokens(batch: Mapping[str, Tensor]) -> Tensor:
    """Tokens that are not padding, in either layout (TRL's `num_tokens`)."""
    if "sequence_index" not in batch:
        return batch["attention_mask"].sum()
    return (batch["sequence_index"] >= 0).sum()
