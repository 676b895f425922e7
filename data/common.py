"""Small helpers shared by the SFT and DPO preparation."""

from collections.abc import Sequence


def common_prefix_length(ids: Sequence[int], other_ids: Sequence[int]) -> int:
    """Number of leading tokens two id lists share: where a tokenized prompt stops being a prefix of the
    tokenized prompt + completion (tokens can merge across the boundary), as TRL 1.16 splits them."""
    length = 0
    for token, other_token in zip(ids, other_ids, strict=False):
        if token != other_token:
            break
        length += 1
    return length
