"""How the weights are updated: the --optim optimizer over decay / no-decay groups as TRL sets it up, the schedule,
clipping."""

from __future__ import annotations

import json
import math
import re

import torch
from accelerate import Accelerator

from engine import optim
from engine.config import TrainConfig
from engine.errors import UserError

# transformers' convention (what TRL uses): no weight decay on biases and normalisation weights.
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The --optim optimizer (engine/optim.py) over TRL's groups: weight decay on all trainable parameters but
    biases, norms and LayerNorm weights, which get none."""
    no_decay_modules = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = _NO_DECAY.search(name.lower()) or id(param) in no_decay_modules
        (no_decay if skip else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return optim.build_optimizer([g for g in groups if g["params"]], config)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """transformers' schedule --lr_scheduler_type with --lr_scheduler_kwargs, as Trainer.create_scheduler builds it;
    --warmup_steps wins over --warmup_ratio (as TRL)."""
    from transformers import get_scheduler

    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    try:
        return get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                             num_training_steps=total_steps, scheduler_specific_kwargs=config.lr_scheduler_kwargs)
    except (TypeError, ValueError) as error:  # a value transformers refuses, e.g. lr_end above the learning rate
        raise UserError(f"--lr_scheduler_type {config.lr_scheduler_type} --lr_scheduler_kwargs "
                        f"'{json.dumps(config.lr_scheduler_kwargs)}': {str(error).splitlines()[0]}") from error


def clip_gradients(accelerator: Accelerator, model, max_grad_norm: float) -> torch.Tensor:
    """Global gradient norm before clipping (what TRL logs as grad_norm); clips in place when max_grad_norm > 0."""
    if max_grad_norm > 0:
        return accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else torch.tensor(0.0)
