"""Compare an aligned policy with the model it started from, on held-out preference pairs and generated answers.

    python scripts/compare.py --model_name_or_path output/dpo --ref_model_name_or_path output/sft \\
        --dataset_name data/bundled/preference --output_dir report/
    python scripts/compare.py --model_name_or_path output/dpo_lora --ref_model_name_or_path output/sft \\
        --dataset_name my_prefs/ --dataset_test_split "train[-200:]" --prompts prompts.txt \\
        --judge my_judges:judge --temperature 0.7 --top_p 0.9 --max_new_tokens 128 --seed 1

Either side is a model folder, a LoRA adapter folder (ours or PEFT's: its base model is loaded, then the adapter)
or a Hub id. The held-out pairs are the dataset's test split, or the split or slice `--dataset_test_split` names;
their log-probs are computed as DPO training computes them (chat template, the same prompt/completion split, the
summed completion log-probs DPO logs as logps/chosen). The prompts answered are those of the held-out pairs, or the
lines of `--prompts`, the first `--max_prompts` (200) of them. Writes to --output_dir:
    report.json   per model: preference_accuracy, mean_margin, mean_length (tokens of its greedy answers); and
                  implicit_reward_accuracy (β·log-ratio, DPO's rewards/accuracies), kl_policy_reference (mean
                  per-token KL on the policy's sampled answers), win_rate (with --judge), samples (every prompt
                  with both models' greedy and sampled answers)
    report.md     the numbers in a table, then the answers side by side
    margins.png   the distribution of log p(chosen) − log p(rejected) of both models
    training_curves.png   when the policy folder holds the run's metrics.jsonl
Bad input ends with one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as a script

from engine.compare.cli import OneLineParser, run_main  # noqa: E402
from engine.errors import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="compare.py", allow_abbrev=False,
                     description="Compare a policy with its reference on held-out preference pairs and answers.")
    models = parser.add_argument_group("models")
    models.add_argument("--model_name_or_path", required=True,
                        help="the policy: model folder, LoRA adapter folder or Hub id")
    models.add_argument("--ref_model_name_or_path", required=True,
                        help="the reference: model folder, LoRA adapter folder or Hub id")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", required=True, help="preference data (prompt/chosen/rejected), as train.py")
    data.add_argument("--dataset_config", default=None, help="Hub configuration, or sub-folder of a local dataset")
    data.add_argument("--dataset_test_split", default="test",
                      help="held-out split, or a slice of one: test, train[-200:], train[90%%:] (default test)")
    data.add_argument("--dataset_column_map", nargs="+", default=None,
                      help="map other columns onto prompt/chosen/rejected, as train.py: a preset or source=target "
                           "pairs")
    data.add_argument("--max_eval_samples", type=int, default=None,
                      help="score and answer only the first N held-out pairs (default: all)")
    data.add_argument("--max_length", type=int, default=1024,
                      help="truncate prompt + completion to this many tokens, as training does (default 1024)")
    data.add_argument("--prompts", default=None,
                      help="text file, one prompt per line, to answer instead of the held-out prompts")
    data.add_argument("--max_prompts", type=int, default=200,
                      help="answer at most the first N prompts (default 200; generation is the slow part)")
    scoring = parser.add_argument_group("scoring and generation")
    scoring.add_argument("--beta", type=float, default=0.1, help="β of the implicit reward (default 0.1)")
    scoring.add_argument("--judge", default=None,
                         help="module:function, judge(prompt, a, b) -> float in [0, 1]: adds win_rate")
    scoring.add_argument("--max_new_tokens", type=int, default=64, help="answer length limit (default 64)")
    scoring.add_argument("--temperature", type=float, default=1.0, help="sampled answers (default 1.0)")
    scoring.add_argument("--top_p", type=float, default=1.0, help="sampled answers' nucleus (default 1.0)")
    scoring.add_argument("--seed", type=int, default=42, help="seed of the sampled answers (default 42)")
    scoring.add_argument("--batch_size", type=int, default=16, help="pairs / prompts per batch (default 16)")
    parser.add_argument("--output_dir", default="report", help="where the report goes (default report/)")
    parser.add_argument("--disable_tqdm", action="store_true", help="no progress bars")
    return parser


def _check_ranges(args: argparse.Namespace) -> None:
    checks = [
        ("--max_new_tokens", args.max_new_tokens >= 1, "at least 1"),
        ("--batch_size", args.batch_size >= 1, "at least 1"),
        ("--max_length", args.max_length >= 1, "at least 1"),
        ("--max_eval_samples", args.max_eval_samples is None or args.max_eval_samples >= 1, "at least 1"),
        ("--max_prompts", args.max_prompts >= 1, "at least 1"),
        ("--temperature", args.temperature > 0, "above 0 (greedy answers are always in the report)"),
        ("--top_p", 0 < args.top_p <= 1, "in (0, 1]"),
        ("--beta", args.beta > 0, "above 0"),
    ]
    for flag, ok, rule in checks:
        if not ok:
            raise UserError(f"{flag} {getattr(args, flag[2:])}: must be {rule}")


def run(args: argparse.Namespace) -> list[Path]:
    import torch

    from data.column_map import normalize_dpo_columns
    from data.dpo import prepare_dpo_dataset
    from engine.compare import CompareOptions, Sampling, Side, compare, write_report
    from engine.compare.load import (
        load_heldout_split,
        load_judge,
        load_prompts,
        load_shared_tokenizer,
        load_side,
    )

    _check_ranges(args)
    judge = load_judge(args.judge) if args.judge is not None else None
    rows = load_heldout_split(args.dataset_name, args.dataset_config, args.dataset_test_split)
    if args.max_eval_samples is not None:
        rows = rows.select(range(min(args.max_eval_samples, len(rows))))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy, policy_tokenizer = load_side(args.model_name_or_path, "--model_name_or_path", device)
    reference, reference_tokenizer = load_side(args.ref_model_name_or_path, "--ref_model_name_or_path", device)
    tokenizer = load_shared_tokenizer(policy_tokenizer, reference_tokenizer, policy, reference)
    rows = normalize_dpo_columns(rows, args.dataset_column_map)
    examples, _ = prepare_dpo_dataset(rows, tokenizer, max_length=args.max_length)
    prompts = load_prompts(args.prompts, tokenizer) if args.prompts else [e["prompt_ids"] for e in examples]
    prompts = prompts[: args.max_prompts]
    options = CompareOptions(beta=args.beta, max_new_tokens=args.max_new_tokens,
                             sampling=Sampling(args.temperature, args.top_p, args.seed),
                             batch_size=args.batch_size, max_length=args.max_length, disable_tqdm=args.disable_tqdm)
    comparison = compare(Side("policy", policy), Side("reference", reference), tokenizer, examples, prompts,
                         options, judge=judge)
    policy_dir = Path(args.model_name_or_path).expanduser()
    files = write_report(comparison, args.output_dir, metrics_dir=policy_dir if policy_dir.is_dir() else None)
    summary = comparison.summary
    print(f"[nanopost] {summary['heldout_pairs']} held-out pairs, reference -> policy: preference accuracy "
          f"{summary['reference']['preference_accuracy']:.3f} -> {summary['policy']['preference_accuracy']:.3f}, "
          f"mean margin {summary['reference']['mean_margin']:.3f} -> {summary['policy']['mean_margin']:.3f}; "
          f"implicit reward accuracy {summary['implicit_reward_accuracy']:.3f}; KL {summary['kl_policy_reference']:.4f}"
          + (f"; win rate {summary['win_rate']:.3f}" if "win_rate" in summary else ""), flush=True)
    print(f"[nanopost] wrote {', '.join(str(f) for f in files)}", flush=True)
    return files


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
