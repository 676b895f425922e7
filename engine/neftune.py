"""NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning", arXiv:2310.05914).

While training, the input embeddings get uniform noise:

    E' = E + U(-m, m),   m = alpha / sqrt(L * d)      E: (B, L, d), L the padded sequence length

Evaluation and generation (module.eval()) see the clean embeddings. `--neftune_noise_alpha` (TRL suggests 5 to 15).
"""

from __future__ import annotations

import torch
from torch import nn


def neftune_noise(embeddings: torch.Tensor, alpha: float) -> torch.Tensor:
    """Noise for one batch of embeddings.

    Shape:
        embeddings: (B, L, d) -> (B, L, d)
    """
    _, length, dim = embeddings.shape
    # The bound in float32 from an integer tensor, as transformers computes it, so that from the same RNG state the
    # noise is bit-identical to TRL's.
    bound = alpha / torch.sqrt(torch.tensor(length * dim))
    return torch.zeros_like(embeddings).uniform_(-bound, bound)


def add_neftune_hook(model: nn.Module, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """Add NEFTune noise to the output of `model.get_input_embeddings()` in training mode; returns the handle
    (`handle.remove()` turns it off)."""

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return output + neftune_noise(output, alpha) if module.training else output

    return model.get_input_embeddings().register_forward_hook(hook)
