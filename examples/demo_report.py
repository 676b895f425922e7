"""The built-in DPO demo's report: did alignment move the model towards the rule-checkable preference?

Made by the general comparison (`engine.compare`, as `scripts/compare.py`) with the demo's rule as the judge, on
the held-out split, for the reference (the SFT model DPO started from) and the policy:
- preference accuracy: share of pairs where the model gives the chosen completion a higher log-prob than the
  rejected one (the reference's own accuracy is the baseline; TRL's rewards/accuracies is 0 for it by definition);
- rule-judged generations: greedy completions of held-out prompts scored by `examples.demo_rule` (half a point for
  the preferred `a + b = n.` format, half for the correct result); the share in the format, the share correct,
  and the win rate of the policy's completion against the reference's on the same prompt (ties count half;
  0.5 = no change).
`demo_report.json` holds these numbers; the full comparison (report.json, report.md, margins.png,
training_curves.png) is written beside it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from engine.storage import write_text_atomically
from examples import demo_rule

MAX_NEW_TOKENS = 32


def demo_report(method, policy, reference, examples: list[dict], output_dir: Path, is_main_process: bool,
                reference_scope: Callable[[], AbstractContextManager] = nullcontext) -> dict[str, Any]:
    """Compare `policy` and `reference` on the held-out `examples` (DPO-prepared, the first `demo_eval_samples`).

    `method` is the run's DPOMethod (its config and tokenizer); `reference_scope()` is entered around every use
    of `reference` (e.g. `lambda: disable_adapters(policy)` when the reference is the policy with adapters off).
    Writes demo_report.json and the comparison's files into `output_dir` (main process) and returns the report.
    """
    from engine.compare import CompareOptions, Side, compare, write_report

    config = method.config
    examples = examples[: config.demo_eval_samples]
    policy.eval()
    use_cache = policy.config.use_cache
    policy.config.use_cache = True
    options = CompareOptions(beta=config.beta, max_new_tokens=MAX_NEW_TOKENS, max_length=config.max_length,
                             truncation_mode=config.truncation_mode, disable_tqdm=config.disable_tqdm)
    comparison = compare(Side("policy", policy), Side("reference", reference, reference_scope), method.tokenizer,
                         examples, [e["prompt_ids"] for e in examples], options, judge=demo_rule.judge)
    policy.config.use_cache = use_cache

    answers = comparison.texts["greedy"]

    def rate(check, side: str) -> float:
        return sum(check(p, c) for p, c in zip(comparison.prompts, answers[side], strict=True)) / len(examples)

    summary = comparison.summary
    report = {
        "heldout_pairs": len(examples),
        "preference_accuracy_reference": summary["reference"]["preference_accuracy"],
        "preference_accuracy_policy": summary["policy"]["preference_accuracy"],
        "format_rate_reference": rate(demo_rule.follows_format, "reference"),
        "format_rate_policy": rate(demo_rule.follows_format, "policy"),
        "correct_rate_reference": rate(demo_rule.is_correct, "reference"),
        "correct_rate_policy": rate(demo_rule.is_correct, "policy"),
        "rule_score_reference": rate(demo_rule.score, "reference"),
        "rule_score_policy": rate(demo_rule.score, "policy"),
        "win_rate_policy_vs_reference": summary["win_rate"],
    }
    if is_main_process:
        write_text_atomically(output_dir / "demo_report.json", json.dumps(report, indent=2) + "\n",
                              what="the demo report")
        write_report(comparison, output_dir, metrics_dir=output_dir)
        r = report
        print(
            f"[nanopost] DPO demo on {len(examples)} held-out pairs (reference -> policy): preference accuracy "
            f"{r['preference_accuracy_reference']:.3f} -> {r['preference_accuracy_policy']:.3f}; greedy answers in "
            f"the preferred format {r['format_rate_reference']:.3f} -> {r['format_rate_policy']:.3f}, correct "
            f"{r['correct_rate_reference']:.3f} -> {r['correct_rate_policy']:.3f}; rule-judged win rate of the "
            f"policy vs the reference {r['win_rate_policy_vs_reference']:.3f} (0.5 = no change); full comparison "
            f"in {output_dir / 'report.md'}",
            flush=True,
        )
    return report
