"""Losses: per-token log-probs (`logps`), the SFT loss (`sft`), and the registry of preference losses.

    from losses import LossOptions, PreferenceBatch, preference_loss
    loss, metrics = preference_loss(["sigmoid"], None, batch, LossOptions(beta=0.1))

Importing this package registers every loss in `dpo.py`, `ratio_losses.py` and `reference_free.py`; see LOSSES.md.
"""

from losses import dpo, ratio_losses, reference_free  # noqa: F401  (registers the losses)
from losses.logps import (
    IGNORE_INDEX,
    TokenStats,
    next_token_labels,
    scatter_to_positions,
    sequence_logps,
    target_token_stats,
    token_entropy,
    token_logps,
    token_stats,
    wpo_weights,
)
from losses.registry import (
    LOSSES,
    LossOptions,
    LossSpec,
    PreferenceBatch,
    get_loss,
    needs_reference,
    preference_loss,
    register_loss,
    validate_loss_config,
)
from losses.sft import sft_loss

__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "LossOptions",
    "LossSpec",
    "PreferenceBatch",
    "TokenStats",
    "get_loss",
    "needs_reference",
    "next_token_labels",
    "preference_loss",
    "register_loss",
    "scatter_to_positions",
    "sequence_logps",
    "sft_loss",
    "token_entropy",
    "token_logps",
    "target_token_stats",
    "token_stats",
    "validate_loss_config",
    "wpo_weights",
]
