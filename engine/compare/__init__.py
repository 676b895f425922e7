"""Compare a policy with its reference after alignment: held-out preference scores, answers side by side, plots.

    python scripts/compare.py --model_name_or_path output/dpo --ref_model_name_or_path output/sft \
        --dataset_name data/bundled/preference --output_dir report/
    python scripts/plot_metrics.py output/dpo

Modules: load.py (models, adapters, tokenizer, held-out split, prompts, judge), scores.py (pair log-probs as DPO
computes them, implicit rewards, KL), generate.py (batched greedy / sampled answers), report.py (`compare`,
`write_report`: report.json, report.md), plots.py (margin histogram, training curves).
"""

from engine.compare.generate import Sampling, decode_completions, generate
from engine.compare.report import CompareOptions, Comparison, compare, win_rate, write_report
from engine.compare.scores import Side

__all__ = [
    "CompareOptions",
    "Comparison",
    "Sampling",
    "Side",
    "compare",
    "decode_completions",
    "generate",
    "win_rate",
    "write_report",
]
