"""TR-DPO (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment", arXiv:2404.09656):
the reference model follows the policy by a soft update every `--ref_model_sync_steps` optimizer steps:

    θ_ref ← α · θ_policy + (1 − α) · θ_ref          α = --ref_model_mixup_alpha (TRL: 0.6)

α = 1 copies the policy (hard update, TR-DPO^τ); TRL applies it at the end of a step whose number divides by
`ref_model_sync_steps`, after the optimizer step.
"""

from __future__ import annotations

import torch
from torch import nn


def should_sync(global_step: int, sync_steps: int) -> bool:
    """After optimizer step `global_step` (1-based): is it a sync step?"""
    return global_step % sync_steps == 0


@torch.no_grad()
def sync_reference(policy: nn.Module, reference: nn.Module, alpha: float) -> None:
    """Soft-update `reference` in place towards `policy` (same architecture, parameters in the same order)."""
    policy_params = list(policy.parameters())
    reference_params = list(reference.parameters())
    if len(policy_params) != len(reference_params):
        raise ValueError(f"policy has {len(policy_params)} parameter tensors, reference {len(reference_params)}")
    for ref_param, policy_param in zip(reference_params, policy_params, strict=True):
        ref_param.mul_(1.0 - alpha).add_(policy_param.to(ref_param.dtype), alpha=alpha)
