"""Draw the training curves of a run (SFT or DPO) from its metrics.jsonl to a PNG.

    python scripts/plot_metrics.py output/dpo                      # -> output/dpo/training_curves.png
    python scripts/plot_metrics.py output/sft --output sft.png

One panel per metric group the run logged (loss, rewards/margins, rewards/accuracies, rewards and log-probs of
chosen and rejected, mean_token_accuracy, entropy, learning_rate, grad_norm), against the optimizer step;
evaluation values (eval_*) are drawn as dashed lines with markers in the panel of their training metric.
Bad input ends with one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as a script

from engine.compare.cli import OneLineParser, run_main  # noqa: E402
from engine.errors import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="plot_metrics.py", allow_abbrev=False,
                     description="Draw a run's training curves (metrics.jsonl) to a PNG.")
    parser.add_argument("run_dir", help="a run's output folder (holds metrics.jsonl)")
    parser.add_argument("--output", default=None, help="the PNG to write (default <run_dir>/training_curves.png)")
    return parser


def plot_run(run_dir: str, output: str | None = None) -> tuple[Path, tuple[int, int]]:
    """Write the run's curves; returns the PNG's path and its size in pixels (width, height)."""
    from engine.compare.plots import save_training_curves
    from engine.tracking import read_metrics

    folder = Path(run_dir)
    if not (folder / "metrics.jsonl").is_file():
        what = "no such folder" if not folder.is_dir() else "holds no metrics.jsonl (is it a run's --output_dir?)"
        raise UserError(f"{run_dir}: {what}")
    try:
        records = read_metrics(folder)
    except json.JSONDecodeError as error:
        raise UserError(f"{folder / 'metrics.jsonl'}: not valid JSON lines ({error})") from None
    path = Path(output) if output is not None else folder / "training_curves.png"
    if path.suffix.lower() != ".png":
        raise UserError(f"--output {output}: must end in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        size = save_training_curves(records, path, title=str(folder))
    except ValueError as error:
        raise UserError(f"{folder / 'metrics.jsonl'}: {error}") from None
    return path, size


def run(args: argparse.Namespace) -> None:
    path, (width, height) = plot_run(args.run_dir, args.output)
    print(f"[nanopost] wrote {path} ({width}x{height})", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
