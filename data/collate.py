"""Batch SFT examples into tensors, exactly as TRL 1.16's `DataCollatorForLanguageModeling`.

Two layouts:

- padded (default): rows right-padded to the longest (optionally to a multiple of `pad_to_multiple_of`);
  `input_ids` with the pad id, `labels` with -100, and an `attention_mask` of 1 on real tokens. The mask and the
  labels come from the example lengths, never from the pad id, so `pad == eos` cannot hide a real EOS.
- padding-free (TRL's layout for `bfd` packing, and for `padding_free=True`): every example is flattened into one
  row of shape (1, ΣT) with `position_ids` restarting at 0 at each document, and no attention mask, so that the
  attention (SDPA via transformers' packed-sequence detection, or flash-attention via `cu_seq_lens_*`) never
  crosses a document boundary. The label of each document's first token is set to -100: it would otherwise be
  predicted from the previous document's last token.

TRL uses the padded layout for `wrapped` packing (rows are single causal sequences) and the padding-free one for
`bfd` / `bfd_split`; `PrepReport.padding_free` (`data.report`) says which.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from data.common import IGNORE_INDEX


def right_pad(rows: list[Tensor], value: int, pad_to_multiple_of: int | None) -> Tensor:
    """Stack 1-D tensors into (B, T), padding on the right; T rounded up to a multiple of `pad_to_multiple_of`."""
    length = max(row.numel() for row in rows)
    if pad_to_multiple_of is not None and length % pad_to_multiple_of:
        length += pad_to_multiple_of - length % pad_to_multiple_of
    out = torch.full((len(rows), length), value, dtype=rows[0].dtype)  # (B, T)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row
    return out


def _document_positions(example: dict[str, Any]) -> Tensor:
    """Per-token positions: the packed ones if the example has them, else 0..T-1."""
    if "position_ids" in example:
        return torch.tensor(example["position_ids"])
    return torch.arange(len(example["input_ids"]))


def collate_sft(
    examples: list[dict[str, Any]],
    pad_token_id: int,
    padding_free: bool = False,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """Collate {"input_ids", "labels"[, "position_ids"]} examples into a batch.

    Args:
        examples: Prepared SFT examples (`data.sft.prepare_sft_dataset`). Missing `labels` default to `input_ids`.
        pad_token_id: Id written into padded `input_ids` positions (never read back: masks come from lengths).
        padding_free: Flatten the batch into one row with per-document `position_ids` (required for `bfd`
            packing, whose rows hold several documents).
        pad_to_multiple_of: Round the padded length up to a multiple of this.

    Returns:
        Padded: `input_ids` (B, T), `labels` (B, T), `attention_mask` (B, T).
        Padding-free: `input_ids` (1, ΣT), `labels` (1, ΣT), `position_ids` (1, ΣT), `cu_seq_lens_q` /
        `cu_seq_lens_k` (D+1,) int32 document boundaries, `max_length_q` / `max_length_k` (int, longest
        document) and `seq_idx` (1, ΣT) int32 document index — the keys TRL passes to the model.

    Raises:
        ValueError: Packed multi-document rows collated without `padding_free` (their documents would attend to
            each other).
    """
    input_ids = [torch.tensor(example["input_ids"]) for example in examples]
    labels = [torch.tensor(example.get("labels", example["input_ids"])) for example in examples]

    if not padding_free:
        for index, example in enumerate(examples):
            positions = example.get("position_ids")
            if positions is not None and any(p == 0 for p in positions[1:]):
                raise ValueError(
                    f"Example {index} packs several documents (position_ids restart at 0); collate it with "
                    "padding_free=True so that documents do not attend to each other."
                )
        return {
            "input_ids": right_pad(input_ids, pad_token_id, pad_to_multiple_of),  # (B, T)
            "labels": right_pad(labels, IGNORE_INDEX, pad_to_multiple_of),  # (B, T)
            "attention_mask": right_pad([torch.ones_like(ids) for ids in input_ids], 0, pad_to_multiple_of),
        }

    positions = [_document_positions(example) for example in examples]
    flat_ids = right_pad([torch.cat(input_ids)], pad_token_id, pad_to_multiple_of)  # (1, ΣT)
    flat_labels = right_pad([torch.cat(labels)], IGNORE_INDEX, pad_to_multiple_of)  # (1, ΣT)
    # Padding positions get position 0, i.e. each is a one-token document of its own.
    flat_positions = right_pad([torch.cat(positions)], 0, pad_to_multiple_of)  # (1, ΣT)
    # A document's first token has no in-document predecessor to be predicted from.
    flat_labels[flat_positions == 0] = IGNORE_INDEX

    starts = (flat_positions[0] == 0).nonzero().flatten()  # (D,)
    cu_seq_lens = torch.cat([starts, torch.tensor([flat_positions.size(1)])]).to(torch.int32)  # (D+1,)
    document_lengths = cu_seq_lens.diff()  # (D,)
    return {
        "input_ids": flat_ids,
        "labels": flat_labels,
        "position_ids": flat_positions,
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": int(document_lengths.max()),
        "max_length_k": int(document_lengths.max()),
        "seq_idx": torch.repeat_interleave(
            torch.arange(document_lengths.numel(), dtype=torch.int32), document_lengths
        )[None],  # (1, ΣT)
    }
