"""Evaluation on the held-out split: per-batch metrics averaged over examples and processes."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from engine.data_order import micro_batches_of_epoch
from engine.method import Method


def _gathered_means(accelerator: Accelerator, means: dict[str, float]) -> dict[str, float]:
    if accelerator.num_processes == 1 or not means:
        return means
    keys = sorted(means)
    values = accelerator.gather(torch.tensor([means[k] for k in keys], device=accelerator.device).unsqueeze(0))
    return dict(zip(keys, values.mean(0).tolist(), strict=True))


@torch.no_grad()
def evaluate(method: Method, model, examples: list[dict], batch_size: int,
             accelerator: Accelerator) -> dict[str, float]:
    """Mean of per-batch metrics over the eval split, batches weighted by their size; keys prefixed eval_."""
    model.eval()
    totals: dict[str, float] = {}
    count = 0
    order = list(range(len(examples)))
    for indices in micro_batches_of_epoch(order, batch_size, accelerator.num_processes, accelerator.process_index):
        batch = method.collate([examples[i] for i in indices])
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with accelerator.autocast():
            metrics = method.evaluate_batch(model, batch)
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value * len(indices)
        count += len(indices)
    means = {f"eval_{k}": v / max(count, 1) for k, v in totals.items()}
    return _gathered_means(accelerator, means)
