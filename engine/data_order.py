"""Which examples each micro-batch holds: a pure function of (seed, epoch, position).

A resumed run therefore needs only its position (micro-batches seen) to see exactly the micro-batches an
uninterrupted one would, and the order matches TRL's seeded sampler.
"""

from __future__ import annotations

from collections.abc import Iterator
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
            order = epoch_order(self.num_examples, self.seed, epoch)
            yield from micro_batches_of_epoch(order, self.batch_size, self.num_processes, self.process_index,
                                              self.drop_last)[offset:]
            epoch, offset = epoch + 1, 0
