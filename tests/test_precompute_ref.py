"""--precompute_ref_log_probs: computed once, stored on disk, reused by the next run, and refused when stale.

TRL users hit precomputed reference log-probs that were silently ignored or stale (loss stuck at ln 2 = 0.6931).
Here the cache file carries fingerprints of the reference weights and of the tokenized data; a run whose model or
data changed under the same names stops with a message instead of training against the wrong reference.
"""

from __future__ import annotations

import json
import math

import pytest

from engine.config import parse_config
from engine.errors import UserError
from engine.loop import train


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("precompute")
    (root / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    rows = [{"prompt": f"What is {i} + 3?", "chosen": f" {i + 3}.", "rejected": f" {i + 4}."} for i in range(8)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run(root, *extra):
    return train(parse_config([
        "--method", "dpo", "--model_name_or_path", str(root / "model"), "--dataset_name", str(root / "pairs.jsonl"),
        "--output_dir", str(root / "out"), "--precompute_ref_log_probs", "--bf16", "False", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1", "--save_steps", "0",
        "--disable_tqdm", *extra]))


def test_computed_once_then_reused_then_stale_refused(workspace, capsys):
    first = run(workspace)
    cache_files = list((workspace / "out").glob("ref_logps-*.pt"))
    assert len(cache_files) == 1
    assert "precomputed reference log-probs for 8 pairs" in capsys.readouterr().out
    # Step 1: policy == reference, so the loss is exactly ln 2; step 2 has moved away from it (the reference
    # log-probs are really used, not silently zero: then the loss would not start at ln 2 for a random model).
    assert first.logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first.logs[0]["rewards/accuracies"] == 0.0
    assert first.logs[1]["loss"] != pytest.approx(math.log(2), abs=1e-4)

    second = run(workspace)
    assert "reusing precomputed reference log-probs" in capsys.readouterr().out
    assert [r["loss"] for r in second.logs] == [r["loss"] for r in first.logs]  # same reference, same numbers

    # Same file name, new content: the tokenized data no longer matches the cached log-probs.
    path = workspace / "pairs.jsonl"
    path.write_text(path.read_text().replace(" 4.", " 40."))
    with pytest.raises(UserError, match="stale.*data changed.*delete that file"):
        run(workspace)


def test_evaluation_uses_the_reference_too(workspace):
    """With precomputed log-probs the reference copy is freed; evaluation must still compare against the
    reference (its held-out log-probs are computed before the copy goes), not against the policy itself — which
    would make every eval reward exactly 0. Expected: the same eval metrics as a run without precomputation."""
    folder = workspace / "split"
    folder.mkdir(exist_ok=True)
    rows = [{"prompt": f"What is {i} + 5?", "chosen": f" {i + 5}.", "rejected": f" {i + 7}."} for i in range(12)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[8:]))

    def eval_record(out: str, *extra: str) -> dict:
        result = train(parse_config([
            "--method", "dpo", "--model_name_or_path", str(workspace / "model"), "--dataset_name", str(folder),
            "--output_dir", str(workspace / out), "--bf16", "False", "--max_steps", "2", "--learning_rate", "1e-3",
            "--per_device_train_batch_size", "4", "--save_steps", "0", "--disable_tqdm", *extra]))
        return next(r for r in result.logs if "eval_loss" in r)

    with_precompute = eval_record("eval_pre", "--precompute_ref_log_probs")
    without = eval_record("eval_live")
    assert with_precompute["eval_rewards/margins"] != 0.0
    for key in ("eval_loss", "eval_rewards/chosen", "eval_rewards/margins", "eval_rewards/accuracies"):
        assert with_precompute[key] == pytest.approx(without[key], rel=1e-5, abs=1e-7), key
