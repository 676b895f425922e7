"""scripts/plot_metrics.py: any run's metrics.jsonl (SFT or DPO) to a PNG of the stated size; bad input -> one line.

The runs are real (4 steps of the 2-layer tiny SmolLM3, in-process); the PNG is decoded by matplotlib and its
pixel size compared with the one the script reports: one 480x320 panel per logged metric group, 3 per row.
"""

from __future__ import annotations

import json

import matplotlib.image
import pytest

from data.defaults import DEFAULT_DPO_DATASET, DEFAULT_SFT_DATASET
from engine.compare.plots import curve_panels
from engine.config import parse_config
from engine.loop import train
from tests.script_modules import load_script


def plot(*argv: str) -> int:
    return load_script("plot_metrics").main(list(argv))


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("plot_metrics")
    for method, source in (("sft", DEFAULT_SFT_DATASET), ("dpo", DEFAULT_DPO_DATASET)):
        (root / f"{method}_data").mkdir()
        for split, count in (("train", 8), ("test", 4)):
            lines = (source / f"{split}.jsonl").read_text().splitlines()[:count]
            (root / f"{method}_data" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        train(parse_config(["--method", method, "--model_name_or_path", str(tiny_model_dir), "--dataset_name",
                            str(root / f"{method}_data"), "--output_dir", str(root / method), "--max_steps", "4",
                            "--per_device_train_batch_size", "2", "--logging_steps", "1", "--eval_steps", "2",
                            "--disable_tqdm", "--save_steps", "0", "--bf16", "False"]))
    return root


@pytest.mark.parametrize("method, panels", [
    # SFT logs loss, mean_token_accuracy, entropy, learning_rate, grad_norm (+ eval_*): 5 panels, 3 + 2.
    ("sft", ["loss", "mean_token_accuracy", "entropy", "learning_rate", "grad_norm"]),
    # DPO adds rewards/margins, rewards/accuracies, rewards/chosen|rejected, logps/chosen|rejected: 9 panels, 3 x 3.
    ("dpo", ["loss", "rewards/margins", "rewards/accuracies", "rewards/chosen and rejected",
             "logps/chosen and rejected", "mean_token_accuracy", "entropy", "learning_rate", "grad_norm"]),
])
def test_curves_png_of_a_run(method, panels, run_dirs, capsys):
    records = [json.loads(line) for line in (run_dirs / method / "metrics.jsonl").read_text().splitlines()]
    assert [title for title, _ in curve_panels(records)] == panels
    assert ("eval_loss" in curve_panels(records)[0][1])  # eval records drawn in the loss panel
    assert plot(str(run_dirs / method)) == 0
    rows = -(-len(panels) // 3)
    width, height = 3 * 480, rows * 320
    assert capsys.readouterr().out.strip() == \
        f"[nanopost] wrote {run_dirs / method / 'training_curves.png'} ({width}x{height})"
    image = matplotlib.image.imread(run_dirs / method / "training_curves.png")
    assert image.shape[:2] == (height, width)
    assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas


def test_output_flag(run_dirs, tmp_path):
    assert plot(str(run_dirs / "sft"), "--output", str(tmp_path / "sub" / "curves.png")) == 0
    assert matplotlib.image.imread(tmp_path / "sub" / "curves.png").shape[:2] == (2 * 320, 3 * 480)


@pytest.mark.parametrize("case, words", [
    ("missing", "no such folder"),
    ("no_metrics", "holds no metrics.jsonl"),
    ("broken_json", "not valid JSON lines"),
    ("nothing_to_plot", "no plottable metric"),
    ("not_png", "must end in .png"),
])
def test_bad_input_is_one_line_and_exit_2(case, words, run_dirs, tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    extra: list[str] = []
    if case == "missing":
        folder = tmp_path / "nowhere"
    elif case == "broken_json":
        (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss"\n')
    elif case == "nothing_to_plot":
        (folder / "metrics.jsonl").write_text('{"step": 1, "something_else": 0.5}\n')
    elif case == "not_png":
        folder = run_dirs / "sft"
        extra = ["--output", str(tmp_path / "curves.jpg")]
    assert plot(str(folder), *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err, err


def test_plot_metrics_help_runs():
    with pytest.raises(SystemExit) as exit_info:
        plot("--help")
    assert exit_info.value.code == 0


def test_missing_argument_is_one_line(capsys):
    assert plot() == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the following arguments are required: run_dir") and "\n" not in err

