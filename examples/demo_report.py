"""The built-in DPO demo's report: did alignment move the model towards the rule-checkable preference?

Two numbers on the held-out split, each for the reference (the SFT model DPO started from) and the policy:
- preference accuracy: share of pairs where the model gives the chosen completion a higher log-prob than the
  rejected one (the reference's own accuracy is the baseline; TRL's rewards/accuracies is 0 for it by definition);
- rule-judged generations: greedy completions of held-out prompts scored by `examples.demo_rule` (half a point for
  the preferred `a + b = n.` format, half for the correct result); the share in the format, the share correct,
  and the win rate of the policy's completion against the reference's on the same prompt (ties count half;
  0.5 = no change).

All of the computation is here, so that a general policy-vs-reference report can replace it in one place.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from examples import demo_rule


@torch.no_grad()
def preference_accuracy(method, model, examples, batch_size: int = 16) -> float:
    """Share of pairs whose chosen completion `model` gives the higher summed log-prob (as DPO scores it)."""
    correct = 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = method.collate(examples[start : start + batch_size])
        batch = {k: v.to(device) for k, v in batch.items()}
        sums = method.sequence_logps(model, batch)
        chosen, rejected = sums.chunk(2)
        correct += int((chosen > rejected).sum())
    return correct / max(len(examples), 1)


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts_ids: list[list[int]], max_new_tokens: int = 32,
                       batch_size: int = 16) -> list[str]:
    """Greedy decoding, batched with left padding; returns the decoded completions without special tokens."""
    completions = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts_ids), batch_size):
        chunk = prompts_ids[start : start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), do_sample=False,
            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
        )
        for row in output[:, width:]:
            completions.append(tokenizer.decode(row, skip_special_tokens=True))
    return completions


def demo_report(method, policy, reference, examples: list[dict], output_dir: Path, is_main_process: bool,
                reference_context: AbstractContextManager | None = None) -> dict[str, Any]:
    """Score `policy` and `reference` on the held-out `examples` (DPO-prepared, the first `demo_eval_samples`).

    `method` is the run's DPOMethod (its collator and log-probs); `reference_context` is entered around every use
    of `reference` (e.g. `disable_adapters(policy)` when the reference is the policy with its adapters off).
    Writes demo_report.json and demo_samples.json into `output_dir` (main process) and returns the report.
    """
    examples = examples[: method.config.demo_eval_samples]
    policy.eval()
    use_cache = policy.config.use_cache
    policy.config.use_cache = True

    prompts = [e["prompt_ids"] for e in examples]
    prompt_texts = [method.tokenizer.decode(p, skip_special_tokens=False) for p in prompts]
    # The trained model generates under the run's autocast, as it did when accelerate wrapped its own forward.
    policy_autocast = method.accelerator.autocast
    after_accuracy = preference_accuracy(method, policy, examples)
    with policy_autocast():
        policy_completions = greedy_completions(policy, method.tokenizer, prompts)
    with reference_context or nullcontext():
        before_accuracy = preference_accuracy(method, reference, examples)
        with policy_autocast() if reference is policy else nullcontext():
            reference_completions = greedy_completions(reference, method.tokenizer, prompts)
    policy.config.use_cache = use_cache

    def rate(check, completions) -> float:
        return sum(check(p, c) for p, c in zip(prompt_texts, completions, strict=True)) / len(examples)

    report = {
        "heldout_pairs": len(examples),
        "preference_accuracy_reference": before_accuracy,
        "preference_accuracy_policy": after_accuracy,
        "format_rate_reference": rate(demo_rule.follows_format, reference_completions),
        "format_rate_policy": rate(demo_rule.follows_format, policy_completions),
        "correct_rate_reference": rate(demo_rule.is_correct, reference_completions),
        "correct_rate_policy": rate(demo_rule.is_correct, policy_completions),
        "rule_score_reference": rate(demo_rule.score, reference_completions),
        "rule_score_policy": rate(demo_rule.score, policy_completions),
        "win_rate_policy_vs_reference": demo_rule.win_rate(policy_completions, reference_completions, prompt_texts),
    }
    if is_main_process:
        (output_dir / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
        samples = [{"prompt": p, "reference": r, "policy": c}
                   for p, r, c in list(zip(prompt_texts, reference_completions, policy_completions, strict=True))[:8]]
        (output_dir / "demo_samples.json").write_text(json.dumps(samples, indent=2) + "\n")
        r = report
        print(
            f"[nanopost] DPO demo on {len(examples)} held-out pairs (reference -> policy): preference accuracy "
            f"{r['preference_accuracy_reference']:.3f} -> {r['preference_accuracy_policy']:.3f}; greedy answers in "
            f"the preferred format {r['format_rate_reference']:.3f} -> {r['format_rate_policy']:.3f}, correct "
            f"{r['correct_rate_reference']:.3f} -> {r['correct_rate_policy']:.3f}; rule-judged win rate of the "
            f"policy vs the reference {r['win_rate_policy_vs_reference']:.3f} (0.5 = no change)",
            flush=True,
        )
    return report

