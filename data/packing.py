"""Pack tokenized SFT examples into rows of at most `seq_length` tokens, exactly as TRL 1.16's `pack_dataset`.

Strategies:

- `bfd` (best-fit decreasing, TRL's default): each document is cut to `seq_length` (the overflow is discarded),
  documents are sorted by length (longest first, ties in dataset order) and each goes into the open row whose free
  space is the smallest that still fits it (ties: the row that reached that free space first), or into a new row.
  Rows come out in the order they were opened; inside a row documents keep the order they were placed in.
  Documents never attend to each other: `position_ids` restart at 0 at each document, and the padding-free
  collator masks the label of each document's first token (see `data/collate.py`).
- `bfd_split`: as `bfd`, but a document longer than `seq_length` is cut into `seq_length` pieces (the last one
  shorter) that are packed as separate documents, so no token is lost.
- `wrapped`: concatenate everything and cut every `seq_length` tokens, ignoring document boundaries; the
  collator then uses ordinary causal attention over the whole row.

TRL packs through `datasets.Dataset.map(batched=True)`, whose default batch is 1000 rows: packing happens within
consecutive blocks of 1000 documents (a block's last `wrapped` row is short, and `bfd` never mixes blocks). We
reproduce that so that the packed rows are the same.

    [a a a a a] [b b] [c c c] [d]   --bfd, seq_length 5-->   [a a a a a] [c c c b b] [d]
    position_ids                                             [0 1 2 3 4] [0 1 2 0 1] [0]
"""

from __future__ import annotations

import bisect
from collections import defaultdict, deque
from typing import Any

PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")

PACK_BLOCK_ROWS = 1000
"""Rows per packing block: the default `batch_size` of `datasets.Dataset.map`, through which TRL packs."""


def split_long_documents(lengths: list[int], seq_length: int, split: bool) -> list[tuple[int, int, int]]:
    """Cut each document to `seq_length`, or into `seq_length` pieces when `split`.

    Returns:
        (document index, start, end) per piece, in document order; empty documents are skipped.
    """
    pieces = []
    for index, length in enumerate(lengths):
        if length == 0:
            continue
        if not split:
            pieces.append((index, 0, min(length, seq_length)))
            continue
        for start in range(0, length, seq_length):
            pieces.append((index, start, min(start + seq_length, length)))
    return pieces


def best_fit_decreasing(lengths: list[int], seq_length: int) -> list[list[int]]:
    """Assign items of the given lengths (each 1..seq_length) to bins of capacity `seq_length`.

    Best-fit decreasing (Johnson 1973; used for LM packing in "Fewer Truncations Improve Language Modeling",
    Ding et al. 2024): items in order of decreasing length (stable), each into the open bin with the least free
    space that still fits it, first-opened first among equals; a new bin when none fits.

    Returns:
        Item indices per bin, bins in opening order.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep dataset order
    bins: list[list[int]] = []
    bins_with_space: dict[int, deque[int]] = defaultdict(deque)  # free space -> bins, first reached first
    open_spaces: list[int] = []  # sorted distinct free spaces (> 0) of open bins
    for item in order:
        length = lengths[item]
        position = bisect.bisect_left(open_spaces, length)
        if position < len(open_spaces):
            space = open_spaces[position]
            bin_index = bins_with_space[space].popleft()
            if not bins_with_space[space]:
                open_spaces.pop(position)
        else:
            space = seq_length
            bin_index = len(bins)
            bins.append([])
        bins[bin_index].append(item)
        space -= length
        if space > 0:
            if not bins_with_space[space]:
                bisect.insort(open_spaces, space)
            bins_with_space[space].append(bin_index)
    return bins


def _pack_block_bfd(block: list[dict[str, Any]], seq_length: int, split: bool) -> list[dict[str, Any]]:
    pieces = split_long_documents([len(example["input_ids"]) for example in block], seq_length, split)
    bins = best_fit_decreasing([end - start for _, start, end in pieces], seq_length)
    packed = []
    for piece_indices in bins:
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        for piece_index in piece_indices:
            document, start, end = pieces[piece_index]
            input_ids += block[document]["input_ids"][start:end]
            labels += block[document]["labels"][start:end]
            position_ids += range(end - start)
        packed.append({"input_ids": input_ids, "labels": labels, "position_ids": position_ids})
    return packed


def _pack_block_wrapped(block: list[dict[str, Any]], seq_length: int) -> list[dict[str, Any]]:
    input_ids = [token for example in block for token in example["input_ids"]]
    labels = [label for example in block for label in example["labels"]]
    return [
        {
            "input_ids": input_ids[start : start + seq_length],
            "labels": labels[start : start + seq_length],
            # One causal sequence per row, as TRL's non-padding-free collator treats it.
            "position_ids": list(range(len(input_ids[start : start + seq_length]))),
        }
        for start in range(0, len(input_ids), seq_length)
    ]


def pack_examples(examples: list[dict[str, Any]], seq_length: int, strategy: str = "bfd") -> list[dict[str, Any]]:
    """Pack {"input_ids", "labels"} examples into rows of at most `seq_length` tokens.

    Args:
        examples: Tokenized examples; `labels` has the length of `input_ids`.
        seq_length: Row capacity (TRL's `max_length`).
        strategy: "bfd", "bfd_split" or "wrapped" (see the module docstring).

    Returns:
        Rows {"input_ids", "labels", "position_ids"}; `position_ids` restart at 0 at each document (bfd) or run
        0..len-1 over the row (wrapped).
    """
    if strategy not in PACKING_STRATEGIES:
        raise ValueError(f"Unknown packing strategy {strategy!r}; expected one of {PACKING_STRATEGIES}.")
    if seq_length < 1:
        raise ValueError(f"seq_length must be positive, got {seq_length}.")
    packed: list[dict[str, Any]] = []
    for block_start in range(0, len(examples), PACK_BLOCK_ROWS):
        block = examples[block_start : block_start + PACK_BLOCK_ROWS]
        if strategy == "wrapped":
            packed += _pack_block_wrapped(block, seq_length)
        else:
            packed += _pack_block_bfd(block, seq_length, split=strategy == "bfd_split")
    return packed
