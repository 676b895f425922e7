"""Which examples each micro-batch holds: a pure function of (seed, epoch, position).

A resumed run therefore needs only its position (micro-batches seen) to see exactly the micro-batches an
uninterrupted one would, and the order matches TRL's seeded sampler.

--group_by_length: transformers' `LengthGroupedSampler` order (`get_length_grouped_indices`, called as the Trainer
calls it: batch size = per-device batch x gradient accumulation): a random permutation cut into megabatches of
min(50, n / (4 x batch)) batches, each sorted by length, longest first, the longest example of all moved to the
front. Its permutation comes from a generator seeded with `seed + epoch`, like the random order, so the order is
still a function of (seed, epoch) and resume stays exact. transformers draws that permutation from the global
torch RNG instead (accelerate's seedable sampler replaces only a plain RandomSampler), whose state depends on
everything that drew random numbers before the epoch started; so TRL's grouped order is not reproducible, not
even by TRL on resume, and we match its algorithm, not its draws.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch.

    Same as accelerate's seedable sampler under transformers' Trainer: `randperm(n)` from a generator seeded with
    `seed + epoch`. Deterministic, so resuming needs only the position, not a saved sampler.
    """
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def length_grouped_order(lengths: Sequence[int], group_batch_size: int, seed: int, epoch: int) -> list[int]:
    """One epoch's --group_by_length order: transformers' `get_length_grouped_indices` with the permutation drawn
    from a generator seeded with `seed + epoch` (see the module docstring)."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return get_length_grouped_indices(list(lengths), group_batch_size, generator=generator)


def micro_batches_of_epoch(order: list[int], batch_size: int, num_processes: int, process_index: int,
                           drop_last: bool = False) -> list[list[int]]:
    """Split an epoch's order into this process's micro-batches.

    Global micro-batch k holds order[k*B*P : (k+1)*B*P]; process p takes its p-th slice of B. A short last global
    batch is topped up from the start of the epoch so every process gets B examples (accelerate's even_batches);
    with one process the short last batch is kept as it is (as transformers' Trainer does). `drop_last`
    (--dataloader_drop_last) drops a short last global batch instead.
    """
    global_size = batch_size * num_processes
    batches = []
    for start in range(0, len(order), global_size):
        chunk = order[start : start + global_size]
        if len(chunk) < global_size and drop_last:
            break
        if len(chunk) < global_size and num_processes > 1:
            chunk = chunk + order[: global_size - len(chunk)]
        batches.append(chunk[process_index * batch_size : (process_index + 1) * batch_size])
    return [b for b in batches if b]


@dataclass(frozen=True)
class DataOrder:
    """The training split's micro-batches for this process, epoch after epoch."""

    num_examples: int
    batch_size: int
    seed: int
    num_processes: int = 1
    process_index: int = 0
    drop_last: bool = False  # --dataloader_drop_last
    lengths: tuple[int, ...] | None = None  # --group_by_length: each example's padded length (None: random order)
    group_batch_size: int = 1  # --group_by_length: per-device batch x gradient accumulation (transformers')

    def epoch_order(self, epoch: int) -> list[int]:
        """The example order of `epoch`: seeded random, or length-grouped with --group_by_length."""
        if self.lengths is not None:
            return length_grouped_order(self.lengths, self.group_batch_size, self.seed, epoch)
        return epoch_order(self.num_examples, self.seed, epoch)

    @property
    def micro_batches_per_epoch(self) -> int:
        return len(micro_batches_of_epoch(list(range(self.num_examples)), self.batch_size, self.num_processes,
                                          self.process_index, self.drop_last))

    def stream(self, position: int) -> Iterator[list[int]]:
        """The example indices of each micro-batch from micro-batch `position` on, epoch after epoch."""
        per_epoch = self.micro_batches_per_epoch
        epoch, offset = position // per_epoch, position % per_epoch
        while True:
            if offset == 0:  # a new epoch: a torch DataLoader draws its worker base seed here; keep TRL's stream
                torch.empty((), dtype=torch.int64).random_()
            order = self.epoch_order(epoch)
            yield from micro_batches_of_epoch(order, self.batch_size, self.num_processes, self.process_index,
                                              self.drop_last)[offset:]
            epoch, offset = epoch + 1, 0


def grouping(config, examples: list[dict]) -> tuple[tuple[int, ...] | None, int]:
    """`DataOrder`'s (lengths, group_batch_size) for a run: set with --group_by_length, else (None, 1)."""
    from data.common import padded_length

    if not config.group_by_length:
        return None, 1
    lengths = tuple(padded_length(example) for example in examples)
    return lengths, config.per_device_train_batch_size * config.gradient_accumulation_steps
