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

    Returns:
        `input_ids`, `attention_mask`, `completion_mask`: int64 `(2B, T)`, T the longest kept sequence
        (rounded up); plus `ref_chosen_logps`, `ref_rejected_logps`: `(B,)` when the first example has them.

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
