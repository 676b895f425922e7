"""What SFT and DPO preparation and collation share: the no-loss label, option checks, the pad token, row access."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from data.errors import DataError

IGNORE_INDEX = -100
"""Label of a token that carries no loss (PyTorch's `cross_entropy` default, TRL's and transformers' too)."""

TRUNCATION_MODES = ("keep_start", "keep_end")


def check_length_options(max_length: int | None, truncation_mode: str) -> None:
    """Raise a DataError for a `max_length` that is not a positive integer (or None) or an unknown truncation mode."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise DataError(f"--max_length must be a positive integer or None, got {max_length!r}.")
    if truncation_mode not in TRUNCATION_MODES:
        raise DataError(f"--truncation_mode {truncation_mode}: must be one of {list(TRUNCATION_MODES)}.")


def pad_multiple(pad_to_multiple_of: str | int | None) -> int | None:
    """`--pad_to_multiple_of` as the collators take it: an int, or None for no rounding.

    TRL 1.16 turns "auto" into 128 on AWS Neuron devices and None elsewhere; nanopost never runs on Neuron.
    """
    if pad_to_multiple_of is None or str(pad_to_multiple_of).lower() in ("auto", "none", "null"):
        return None
    return int(pad_to_multiple_of)


def resolve_pad_token_id(tokenizer: Any) -> int:
    """The pad id TRL 1.16's SFTTrainer and DPOTrainer both settle on: the pad token, else the EOS token.

    Raises:
        DataError: the tokenizer has neither, or the token is not in its vocabulary.
    """
    pad_token = tokenizer.pad_token or tokenizer.eos_token
    if pad_token is None:
        raise DataError("The tokenizer has neither a pad_token nor an eos_token to pad with; set tokenizer.pad_token.")
    if pad_token not in tokenizer.get_vocab():
        raise DataError(f"The tokenizer's pad token {pad_token!r} is not in its vocabulary; set tokenizer.pad_token.")
    return tokenizer.convert_tokens_to_ids(pad_token)


def common_prefix_length(ids: Sequence, other_ids: Sequence) -> int:
    """Number of leading items two sequences share: where a tokenized prompt stops being a prefix of the
    tokenized prompt + completion (tokens can merge across the boundary), as TRL 1.16 splits them; or where two
    renderings of a conversation stop agreeing (strings, by character)."""
    length = 0
    for token, other_token in zip(ids, other_ids, strict=False):
        if token != other_token:
            break
        length += 1
    return length


def to_rows(dataset: Any) -> list[dict[str, Any]]:
    """A `datasets.Dataset`, a list of dicts or any iterable of row mappings, as a list of rows."""
    if isinstance(dataset, list):
        return dataset
    if hasattr(dataset, "to_list"):  # datasets.Dataset: one conversion instead of a Python loop over Arrow rows
        return dataset.to_list()
    return list(dataset)


def padded_length(example: dict[str, Any]) -> int:
    """The width an example needs in a padded batch: its tokens (SFT), or the prompt plus the longer completion
    (DPO, before --max_length truncation). What --group_by_length groups by."""
    if "input_ids" in example:
        return len(example["input_ids"])
    return len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"]))


def shuffled(items: list, seed: int) -> list:
    """Reorder like `datasets.Dataset.shuffle(seed=seed)` (NumPy's default PCG64 generator)."""
    permutation = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in permutation]
