"""End-to-end behaviour of one SFT run that the parity tests do not look at: files written, metric names,
evaluation cadence, trackers, bf16 autocast on CPU, and the saved model loading with from_pretrained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.config import parse_config
from engine.loop import train

REPO = Path(__file__).resolve().parents[1]
TRL_SFT_KEYS = {"step", "epoch", "loss", "grad_norm", "learning_rate", "entropy", "mean_token_accuracy", "num_tokens"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("engine_run")
    (root / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    rows = [{"messages": [{"role": "user", "content": f"Count to {i}."},
                          {"role": "assistant", "content": " ".join(str(k) for k in range(1, i + 2))}]}
            for i in range(12)]
    for split, part in (("train", rows[:10]), ("test", rows[10:])):
        (root / "data").mkdir(exist_ok=True)
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return root


def flags(assets, out: str, *extra: str) -> list[str]:
    return ["--method", "sft", "--model_name_or_path", str(assets / "model"), "--dataset_name",
            str(assets / "data"), "--output_dir", str(assets / out), "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-3", "--disable_tqdm", "--save_steps", "0", *extra]


@pytest.fixture(scope="module")
def fp32_run(assets):
    return train(parse_config(flags(assets, "fp32", "--bf16", "False", "--max_steps", "4", "--logging_steps", "2",
                                    "--eval_steps", "2", "--report_to", "tensorboard")))


def test_metrics_file_has_trl_names_and_eval_every_eval_steps(fp32_run, assets):
    """logging_steps 2 over 4 steps: train records at steps 2 and 4 with exactly TRL's SFT metric names; eval
    records (eval_loss, eval_entropy, eval_mean_token_accuracy) at steps 2 and 4."""
    records = [json.loads(line) for line in (assets / "fp32" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    eval_records = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_records] == [2, 4]
    assert all(set(r) == TRL_SFT_KEYS for r in train_records)
    assert [r["step"] for r in eval_records] == [2, 4]
    assert set(eval_records[0]) == {"step", "epoch", "eval_loss", "eval_entropy", "eval_mean_token_accuracy"}
    assert records == fp32_run.logs  # the file and the returned logs are the same records, in order


def test_saved_model_and_config_load(fp32_run, assets):
    """The output folder is a from_pretrained folder (model + tokenizer) with the resolved config beside it."""
    out = assets / "fp32"
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.hidden_size == 32 and tokenizer.eos_token == "<|im_end|>"
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["learning_rate"] == 1e-3 and saved["max_steps"] == 4 and saved["method"] == "sft"


def test_tensorboard_tracker_writes_events(fp32_run, assets):
    """--report_to tensorboard goes through accelerate's tracker: an events file appears under the output dir."""
    assert list((assets / "fp32").rglob("events.out.tfevents.*"))


def test_bf16_autocast_on_cpu(fp32_run, assets):
    """bf16 autocast runs on CPU (in a subprocess: accelerate fixes the precision once per process). Both runs log
    the mean loss of steps 1-2 from the same weights and batches, so they may differ only by bf16 rounding of the
    matmuls: within 2% (8 mantissa bits, ~0.4% per product) — a wrong loss or a broken cast would be far off."""
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *flags(
        assets, "bf16", "--bf16", "True", "--max_steps", "2", "--logging_steps", "2", "--eval_steps", "0")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    bf16_loss = json.loads((assets / "bf16" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert bf16_loss == pytest.approx(fp32_run.logs[0]["loss"], rel=0.02)
    assert bf16_loss != fp32_run.logs[0]["loss"]  # it really ran in bf16
