"""The model the engine trains: a causal LM whose forward returns per-token statistics, not (B, T, V) logits.

    policy = LeanCausalLM(model)                     # model: any transformers causal LM (or one with LoRA)
    stats = policy(input_ids, labels, attention_mask)  # TokenStats, each (B, T-1): position t scores token t+1

`LeanCausalLM` is a real `nn.Module`: it is what accelerate prepares (DDP all-reduces its gradients, FSDP
gathers its weights, autocast wraps its forward), and every forward of the engine, policy or reference, goes
through it. Its forward runs the decoder once and applies the LM head only at positions whose next token is a
target, chunk by chunk (losses.logps.target_token_stats), which keeps DPO's policy + reference and long SFT
sequences inside memory. Numerically it is `log_softmax(model(...).logits)` gathered at the labels (fp32
log-sum-exp), which is also what TRL 1.16's fused LM head computes.

The wrapped model stays the plain transformers model (`.causal_lm`): LoRA, checkpoints and `save_pretrained` read
and write it with its own state-dict key names.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from engine.packed_attention import packed_forward
from losses.logps import IGNORE_INDEX, TokenStats, scatter_to_positions, target_token_stats, unpack_sequences

PREFIX = "causal_lm."  # what the wrapper adds to the plain model's state-dict keys


class LeanCausalLM(nn.Module):
    """Decoder + lean LM head: `forward(input_ids, labels, ...)` -> `TokenStats`."""

    def __init__(self, causal_lm: nn.Module) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        # FSDP's transformer auto-wrap policy reads the block classes from the model accelerate prepares.
        self._no_split_modules = getattr(causal_lm, "_no_split_modules", None)

    @property
    def config(self):
        return self.causal_lm.config

    def tie_weights(self) -> None:
        """Re-tie the LM head to the embeddings (accelerate's FSDP2 calls it after loading sharded weights)."""
        self.causal_lm.tie_weights()

    def forward(self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, log_sum_sq_probs: bool = False,
                sequence_index: Tensor | None = None, metrics: bool = True) -> TokenStats:
        """Score `labels` (same shape as input_ids, -100 = not a target), shifting by one.

        Returns entropy, mean logit and top-1 hits too (the metrics) unless `metrics=False` (a DPO reference
        needs only the log-probs; each metric is another pass over every chunk's (k, V) logits), and log Σp²
        when asked (WPO).

        Padding-free rows (several sequences in one row, `position_ids` restarting at 0 and no attention mask):
        transformers then masks attention block-diagonally (without a KV cache, hence `use_cache=False`); with
        SDPA, engine/packed_attention.py runs it per sequence instead (no ΣT × ΣT mask). A token at position 0 is
        never a target (nothing of its own sequence precedes it). With `sequence_index`
        (which sequence each token is in) the statistics come back one row per sequence
        (`losses.logps.unpack_sequences`), exactly as for the padded batch.

        Shape:
            input_ids, labels, attention_mask, position_ids, sequence_index: (B, T)
            each field of the result: (B, T-1), position t scoring the token at t + 1 (the logits of the last
            position predict no given token and are never computed); with `sequence_index`: (S, L-1)
        """
        kwargs = {"input_ids": input_ids, "use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if position_ids is not None and attention_mask is None and input_ids.shape[0] == 1:  # a packed row
            with packed_forward(self.causal_lm, position_ids) as packed:  # SDPA per sequence, not over the row
                hidden = self.causal_lm.get_decoder()(**kwargs, **packed).last_hidden_state[:, :-1]  # (1, ΣT-1, H)
        else:
            hidden = self.causal_lm.get_decoder()(**kwargs).last_hidden_state[:, :-1]  # (B, T-1, H)
        targets = labels[:, 1:]  # (B, T-1): the token each position predicts
        mask = targets != IGNORE_INDEX  # (B, T-1)
        if position_ids is not None:
            mask = mask & (position_ids[:, 1:] != 0)  # a sequence's first token: predicted by another sequence
        wanted = (("entropy", "mean_logits", "is_top1") if metrics else ()) + (
            ("log_sum_sq_probs",) if log_sum_sq_probs else ())
        values = target_token_stats(hidden[mask], targets[mask], self._project, wanted=wanted)  # each (N,)
        stats = TokenStats(mask, **{name: scatter_to_positions(value, mask) for name, value in values.items()})
        return stats if sequence_index is None else unpack_sequences(stats, sequence_index, position_ids)

    def _project(self, hidden: Tensor) -> Tensor:
        """The LM head on k rows of hidden states, with the model's logit scale / soft-cap: (k, H) -> (k, V)."""
        head = self.causal_lm.get_output_embeddings()
        logits = torch.nn.functional.linear(hidden, head.weight, head.bias)  # (k, V) in the compute dtype
        config = self.causal_lm.config.get_text_config()
        scale = float(getattr(config, "logit_scale", None) or 1.0)
        softcap = getattr(config, "final_logit_softcapping", None)
        if scale != 1.0:
            logits = logits * scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return logits


def plain_model(accelerator, policy: nn.Module) -> nn.Module:
    """The transformers model inside what accelerate prepared (DDP/FSDP wrapper -> LeanCausalLM -> model)."""
    unwrapped = accelerator.unwrap_model(policy)
    return unwrapped.causal_lm if isinstance(unwrapped, LeanCausalLM) else unwrapped


def plain_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A prepared `LeanCausalLM`'s full state dict with the plain model's key names (for save_pretrained)."""
    return {key.removeprefix(PREFIX): value for key, value in state_dict.items()}
