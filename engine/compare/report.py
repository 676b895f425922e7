"""Compare a policy with its reference, and write the report: report.json, report.md and PNG plots.

    comparison = compare(Side("policy", policy), Side("reference", reference), tokenizer, examples, prompts_ids,
                         CompareOptions(beta=0.1), judge=my_judge)
    write_report(comparison, "report/", metrics_dir="output/dpo")

`compare` measures, on the held-out pairs, each model's preference accuracy and mean margin and the policy's
implicit-reward accuracy against the reference; on the prompts, both models' greedy and sampled answers, their
mean length, the judge's win rate of policy over reference (greedy answers), and the policy-reference KL on the
policy's own sampled answers. The built-in DPO demo's report is made by this same code with its rule judge.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from engine import storage
from engine.compare.generate import Sampling, decode_completions, generate
from engine.compare.load import Judge
from engine.compare.plots import save_margin_histogram, save_training_curves
from engine.compare.scores import Side, implicit_reward_accuracy, pair_logps, preference_summary, token_kl
from engine.errors import UserError

SIDES = ("policy", "reference")


@dataclass(frozen=True)
class CompareOptions:
    """How the comparison scores and generates (the flags of scripts/compare.py)."""

    beta: float = 0.1  # β of the implicit reward β·(log π − log π_ref)
    max_new_tokens: int = 64
    sampling: Sampling = field(default_factory=Sampling)
    batch_size: int = 16  # pairs scored / prompts answered at once
    max_length: int | None = 1024  # the collator's truncation of prompt + completion, as in training
    truncation_mode: str = "keep_start"
    disable_tqdm: bool = False


@dataclass
class Comparison:
    """Everything measured: per-pair log-probs, the answers (token ids) and the summary numbers."""

    logps: dict[str, Tensor]  # side -> (N, 2) [chosen, rejected] summed completion log-probs
    prompts: list[str]  # the prompts as the models saw them (chat template applied)
    answers: dict[str, dict[str, list[list[int]]]]  # decoding ("greedy", "sampled") -> side -> completion ids
    texts: dict[str, dict[str, list[str]]]  # same, decoded without special tokens
    summary: dict[str, Any]  # the numbers of report.json (without the samples)

    def report(self) -> dict[str, Any]:
        samples = [{"prompt": prompt, "decoding": decoding, **{side: self.texts[decoding][side][i] for side in SIDES}}
                   for decoding in self.texts for i, prompt in enumerate(self.prompts)]
        return {**self.summary, "samples": samples}


def compare(policy: Side, reference: Side, tokenizer, examples: list[dict], prompts_ids: list[list[int]],
            options: CompareOptions, judge: Judge | None = None) -> Comparison:
    """Score the held-out pairs and answer the prompts with both models (see the module docstring).

    Args:
        examples: held-out pairs prepared by `data.dpo.prepare_dpo_dataset`.
        prompts_ids: the prompts to answer, as token ids (chat template applied).
        judge: `judge(prompt, a, b) -> float` in [0, 1], how much answer a beats answer b; None: no win rate.
    """
    if not examples:
        raise UserError("no held-out preference pair to score")
    if not prompts_ids:
        raise UserError("no prompt to answer")
    pad = tokenizer.pad_token_id
    sides = {"policy": policy, "reference": reference}
    logps = {name: pair_logps(side, examples, pad_token_id=pad, max_length=options.max_length,
                              truncation_mode=options.truncation_mode, batch_size=options.batch_size,
                              disable_tqdm=options.disable_tqdm) for name, side in sides.items()}
    answers: dict[str, dict[str, list[list[int]]]] = {"greedy": {}, "sampled": {}}
    for name, side in sides.items():
        for decoding, sampling in (("greedy", None), ("sampled", options.sampling)):
            with side.scope():
                answers[decoding][name] = generate(side.model, tokenizer, prompts_ids,
                                                   max_new_tokens=options.max_new_tokens, sampling=sampling,
                                                   batch_size=options.batch_size, desc=f"{name}: {decoding} answers",
                                                   disable_tqdm=options.disable_tqdm)
    texts = {decoding: {name: decode_completions(tokenizer, ids) for name, ids in by_side.items()}
             for decoding, by_side in answers.items()}
    prompts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in prompts_ids]

    summary: dict[str, Any] = {"heldout_pairs": len(examples), "prompts": len(prompts)}
    for name in SIDES:
        greedy = answers["greedy"][name]
        summary[name] = {**preference_summary(logps[name]),
                         "mean_length": sum(len(ids) for ids in greedy) / len(greedy)}
    summary["beta"] = options.beta
    summary.update(implicit_reward_accuracy(logps["policy"], logps["reference"], options.beta))
    summary["kl_policy_reference"] = token_kl(policy, reference, prompts_ids, answers["sampled"]["policy"],
                                              pad_token_id=pad, batch_size=options.batch_size,
                                              disable_tqdm=options.disable_tqdm)
    if judge is not None:
        summary["win_rate"] = win_rate(judge, prompts, texts["greedy"]["policy"], texts["greedy"]["reference"])
    summary["generation"] = {"max_new_tokens": options.max_new_tokens, **asdict(options.sampling)}
    return Comparison(logps=logps, prompts=prompts, answers=answers, texts=texts, summary=summary)


def win_rate(judge: Judge, prompts: list[str], policy_answers: list[str], reference_answers: list[str]) -> float:
    """Mean of judge(prompt, policy answer, reference answer): 1 = the policy wins everywhere, 0.5 = no change."""
    total = 0.0
    for index, (prompt, a, b) in enumerate(zip(prompts, policy_answers, reference_answers, strict=True)):
        value = judge(prompt, a, b)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0 \
                or math.isnan(value):
            raise UserError(f"the judge returned {value!r} for prompt {index}; a judge returns a number in [0, 1] "
                            "(1 = the first answer wins, 0.5 = tie, 0 = it loses)")
        total += value
    return total / len(prompts)


def write_report(comparison: Comparison, output_dir: str | Path, metrics_dir: str | Path | None = None) -> list[Path]:
    """report.json, report.md, margins.png, and training_curves.png when `metrics_dir` holds a metrics.jsonl.

    Each file is written whole or not at all (engine/storage.py); a full disk or a read-only folder stops with one
    line naming the file that could not be written, why, and the files written whole before it.

    Returns:
        the files written.
    """
    output_dir = Path(output_dir)
    report = comparison.report()
    written: list[Path] = []

    def put(name: str, write: Callable[[Path], object]) -> None:
        with storage.atomic_file(output_dir / name, what=f"the comparison report's {name}") as tmp:
            write(tmp)
        written.append(output_dir / name)

    metrics_file = Path(metrics_dir) / "metrics.jsonl" if metrics_dir is not None else None
    margins = {name: (comparison.logps[name][:, 0] - comparison.logps[name][:, 1]).tolist() for name in ("reference", "policy")}
    try:
        put("report.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8"))
        put("report.md", lambda tmp: tmp.write_text(markdown(report), encoding="utf-8"))
        put("margins.png", lambda tmp: save_margin_histogram(margins, tmp))
        if metrics_file is not None and metrics_file.is_file():
            from engine.tracking import read_metrics

            try:
                records = read_metrics(metrics_dir)
                put("training_curves.png", lambda tmp: save_training_curves(records, tmp, title=str(metrics_dir)))
            except (ValueError, json.JSONDecodeError) as error:
                raise UserError(f"{metrics_file}: cannot draw the training curves ({error})") from None
    except storage.StorageError as fault:
        kept = ", ".join(path.name for path in written) or "none"
        raise UserError(f"{fault}; written whole before it: {kept}; fix the cause and run scripts/compare.py "
                        "again") from fault
    return written


def markdown(report: dict[str, Any]) -> str:
    """report.md: the numbers in a table, then every prompt with both answers side by side."""
    policy, reference = report["policy"], report["reference"]
    rows = [
        ("preference accuracy: log p(chosen) > log p(rejected)", reference["preference_accuracy"],
         policy["preference_accuracy"]),
        ("mean margin log p(chosen) − log p(rejected) (nats)", reference["mean_margin"], policy["mean_margin"]),
        ("mean length of greedy answers (tokens)", reference["mean_length"], policy["mean_length"]),
        (f"implicit reward accuracy (β = {report['beta']:g})", None, report["implicit_reward_accuracy"]),
        ("KL(policy ‖ reference) per token, on policy samples (nats)", None, report["kl_policy_reference"]),
    ]
    if "win_rate" in report:
        rows.append(("judge's win rate, policy vs reference (0.5 = tie)", None, report["win_rate"]))
    lines = [
        "# Policy vs reference", "",
        f"{report['heldout_pairs']} held-out pairs; {report['prompts']} prompts answered greedily and sampled "
        f"({_sampling_text(report['generation'])}).", "",
        "| | reference | policy |", "|---|---|---|",
        *(f"| {name} | {'' if ref is None else f'{ref:.3f}'} | {pol:.3f} |" for name, ref, pol in rows),
        "", "## Answers", "",
        "| prompt | decoding | reference | policy |", "|---|---|---|---|",
        *(f"| {_cell(s['prompt'])} | {s['decoding']} | {_cell(s['reference'])} | {_cell(s['policy'])} |"
          for s in report["samples"]),
    ]
    return "\n".join(lines) + "\n"


def _sampling_text(generation: dict[str, Any]) -> str:
    return (f"at most {generation['max_new_tokens']} new tokens; sampled with temperature "
            f"{generation['temperature']:g}, top_p {generation['top_p']:g}, seed {generation['seed']}")


def _cell(text: str) -> str:
    """Text that stays inside one markdown table cell, shown as written (`<|im_start|>` is not an HTML tag)."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return text.replace("\r", "").replace("\n", "<br>") or " "
