"""--report_to trackio through the real CLI, offline: the run's logged metrics land in trackio's local store
(TRACKIO_DIR) under --project / --run_name, exactly as metrics.jsonl has them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_trackio_store_holds_the_runs_metrics(tmp_path, tiny_model_dir):
    rows = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]}
            for i in range(8)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--method", "sft", "--model_name_or_path", str(tiny_model_dir),
         "--dataset_name", str(data), "--output_dir", str(out), "--max_steps", "3", "--logging_steps", "1",
         "--per_device_train_batch_size", "2", "--bf16", "false", "--save_steps", "0", "--eval_steps", "0",
         "--disable_tqdm", "--report_to", "trackio", "--project", "nanopost-test", "--run_name", "tiny-sft"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    # Read back in a fresh process: trackio resolves TRACKIO_DIR when imported.
    read = subprocess.run(
        [sys.executable, "-c", "import json; from trackio.sqlite_storage import SQLiteStorage as S; "
         "print(json.dumps(S.get_logs('nanopost-test', 'tiny-sft')))"],
        env=env, capture_output=True, text=True, timeout=120)
    assert read.returncode == 0, read.stderr[-2000:]
    logged = {row["step"]: row for row in json.loads(read.stdout.strip().splitlines()[-1])}
    expected = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in expected] == [1, 2, 3]  # logging_steps 1 over 3 steps
    for record in expected:  # the same numbers, step by step, at full precision
        assert logged[record["step"]]["loss"] == record["loss"]
        assert logged[record["step"]]["learning_rate"] == record["learning_rate"]
