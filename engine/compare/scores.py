"""What the report measures on held-out pairs and on generated answers, each computed as training computes it.

- `pair_logps`: summed completion log-probs of chosen and rejected, from the examples `data.dpo` prepares (chat
  template, TRL's prompt/completion split) batched by `data.collate_dpo` and scored by the engine's DPO log-prob
  path: the same numbers DPO logs as `logps/chosen` / `logps/rejected` (no LD-DPO weighting).
- `preference_summary`: preference accuracy = mean 1[log p(chosen) > log p(rejected)], mean margin.
- `implicit_reward_accuracy`: DPO's `rewards/accuracies` with the reference as reference:
  mean 1[β(c − c_ref) > β(r − r_ref)] (strict, as TRL).
- `token_kl`: mean over generated tokens of KL(π(·|x, y<t) ‖ π_ref(·|x, y<t)), the exact KL of the two next-token
  distributions at every position of the policy's own completions (not a one-sample estimate).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from engine.forward import LeanCausalLM


@dataclass
class Side:
    """One side of the comparison: a model, and the context in which it is itself (for a reference that is the
    policy with its LoRA adapters switched off: `lambda: disable_adapters(policy)`)."""

    name: str
    model: torch.nn.Module
    scope: Callable[[], AbstractContextManager] = field(default=nullcontext)


@torch.no_grad()
def pair_logps(side: Side, examples: list[dict], *, pad_token_id: int, max_length: int | None = 1024,
               truncation_mode: str = "keep_start", batch_size: int = 16, disable_tqdm: bool = False) -> Tensor:
    """Summed completion log-probs of every pair, in example order.

    Args:
        examples: prepared by `data.dpo.prepare_dpo_dataset` (`prompt_ids`, `chosen_ids`, `rejected_ids`).
        max_length, truncation_mode: the collator's truncation, as in training (`--max_length`).

    Shape:
        returns (N, 2): column 0 log p(chosen | prompt), column 1 log p(rejected | prompt), fp32 on the CPU.
    """
    from data.collate_dpo import collate_dpo
    from losses import sequence_logps

    device = next(side.model.parameters()).device
    scorer = LeanCausalLM(side.model)  # the engine's forward: decoder + lean LM head, as DPO training scores
    rows = []
    with side.scope(), tqdm(total=len(examples), desc=f"{side.name}: scoring pairs", unit="pair",
                            disable=disable_tqdm) as progress:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate_dpo(chunk, pad_token_id=pad_token_id, max_length=max_length,
                                truncation_mode=truncation_mode)
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)  # (2B, T)
            stats = scorer(batch["input_ids"], labels, attention_mask=batch["attention_mask"])  # each (2B, T-1)
            sums = sequence_logps(stats.logps, stats.mask).float().cpu()  # (2B,) [chosen; rejected]
            rows.append(torch.stack(sums.chunk(2), dim=1))  # (B, 2)
            progress.update(len(chunk))
    return torch.cat(rows)


def preference_summary(logps: Tensor) -> dict[str, float]:
    """Preference accuracy (strict: a tie is not a win) and mean margin of one model's (N, 2) pair log-probs."""
    margins = logps[:, 0] - logps[:, 1]  # (N,)
    return {"preference_accuracy": int((margins > 0).sum()) / len(margins), "mean_margin": float(margins.mean())}


def implicit_reward_accuracy(policy_logps: Tensor, reference_logps: Tensor, beta: float) -> dict[str, float]:
    """DPO's implicit rewards r = β·(log π − log π_ref) on held-out pairs: share with r(chosen) > r(rejected),
    and the mean reward margin (TRL's `rewards/accuracies`, `rewards/margins`).

    Shape:
        policy_logps, reference_logps: (N, 2) [chosen, rejected]
    """
    rewards = beta * (policy_logps - reference_logps)  # (N, 2)
    return {"implicit_reward_accuracy": int((rewards[:, 0] > rewards[:, 1]).sum()) / len(rewards),
            "implicit_reward_margin": float((rewards[:, 0] - rewards[:, 1]).mean())}


@torch.no_grad()
def token_kl(policy: Side, reference: Side, prompts_ids: list[list[int]], completions: list[list[int]], *,
             pad_token_id: int, batch_size: int = 8, disable_tqdm: bool = False) -> float:
    """Mean per-token KL(π ‖ π_ref) over the tokens of `completions` (the policy's own samples).

        KL_t = Σ_v π(v | x, y<t) · (log π(v | x, y<t) − log π_ref(v | x, y<t)),   mean over all t of all answers

    computed in fp32 from each model's full next-token logits at the completion positions only.

    Shape:
        prompts_ids, completions: P lists of ids each; returns a float (nats per token); 0.0 when no completion
        has a token.
    """
    total, count = 0.0, 0
    with tqdm(total=len(prompts_ids), desc="KL on policy samples", unit="answer", disable=disable_tqdm) as progress:
        for start in range(0, len(prompts_ids), batch_size):
            sequences = [p + c for p, c in zip(prompts_ids[start : start + batch_size],
                                                completions[start : start + batch_size], strict=True)]
            starts = [len(p) for p in prompts_ids[start : start + batch_size]]
            input_ids, attention_mask, target_mask = _right_padded(sequences, starts, pad_token_id)
            policy_logps = _target_log_softmax(policy, input_ids, attention_mask, target_mask)  # (N, V)
            reference_logps = _target_log_softmax(reference, input_ids, attention_mask, target_mask)
            reference_logps = reference_logps.to(policy_logps.device)  # (N, V)
            kl = (policy_logps.exp() * (policy_logps - reference_logps)).sum(-1)  # (N,)
            total += float(kl.double().sum())
            count += kl.numel()
            progress.update(len(sequences))
    return total / count if count else 0.0


def _right_padded(sequences: list[list[int]], completion_starts: list[int],
                  pad_token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """(b, T) ids and attention mask, and the (b, T-1) mask of positions that predict a completion token."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # (b, T)
    positions = torch.arange(width)  # (T,)
    lengths = torch.tensor([len(ids) for ids in sequences])  # (b,)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    attention_mask = (positions < lengths[:, None]).long()  # (b, T)
    is_completion = attention_mask.bool() & (positions >= torch.tensor(completion_starts)[:, None])  # (b, T)
    return input_ids, attention_mask, is_completion[:, 1:]  # position t predicts token t+1


def _target_log_softmax(side: Side, input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor) -> Tensor:
    """log softmax of `side`'s next-token logits at the positions in `target_mask`: (N, V) fp32."""
    device = next(side.model.parameters()).device
    with side.scope():
        logits = side.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                            use_cache=False).logits[:, :-1]  # (b, T-1, V)
    return torch.log_softmax(logits[target_mask.to(device)].float(), dim=-1)  # (N, V)
