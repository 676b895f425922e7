"""scripts/bench.py: the side-by-side benchmark runs and reports; its FLOP count and README rewrite are right.

No timed assertion anywhere: timings depend on the machine and its load. The smoke test checks that the
documented `--quick` command runs both engines and prints the table with sane (finite, in-range) values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.script_modules import load_script

REPO = Path(__file__).resolve().parents[1]
bench = load_script("bench")
workload = sys.modules["workload"]


def test_quick_command_runs_both_engines_and_prints_the_table(tmp_path):
    assert "python scripts/bench.py --quick" in (REPO / "README.md").read_text()  # the documented command
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Machine: " in done.stdout and "torch " in done.stdout
    assert "| sft | tiny | fp32 |" in done.stdout
    (row,) = json.loads((tmp_path / "results.json").read_text())["rows"]
    for impl in ("ours", "trl"):
        result = row[impl]
        assert result["s_per_step"] > 0 and result["tokens_per_s"] > 0 and result["peak_mib"] > 0
        # Both pad each micro-batch to its longest row (same data, same order): the same padding share, in (0, 1).
        assert 0 < result["padding"] < 1
        assert 0 < result["mfu"] < 1
    assert row["ours"]["padding"] == pytest.approx(row["trl"]["padding"])


def test_matmul_params_of_the_small_llama():
    """Per layer q, o 256x256; k, v 256x128 (4 of 8 heads); MLP 3 x 256x768; 4 layers; LM head 8192x256.
    LoRA r=16 on every Linear but the head: r x (in + out) each."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(workload.TOKENIZER_DIR))
    n, n_lora = workload.matmul_params(workload.SHAPES["llama-7m"], tokenizer)
    per_layer = 2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 768
    assert n == 4 * per_layer + 8192 * 256 == 5_242_880
    assert n_lora == 4 * 16 * (2 * 512 + 2 * 384 + 3 * 1024)


def test_flops_per_token_formulas():
    n, n_lora = 1000, 10
    assert workload.flops_per_token("sft", n, n_lora) == 6000  # forward 2N + backward 4N
    assert workload.flops_per_token("dpo", n, n_lora) == 8000  # + reference forward 2N
    assert workload.flops_per_token("dpo-precompute", n, n_lora) == 6000  # reference done before training
    assert workload.flops_per_token("lora-dpo", n, n_lora) == 6060  # frozen base: no weight grads (4N) + ref 2N


def test_summary_uses_only_the_steps_after_warmup():
    raw = {"stamps": [0.0, 10.0, 11.0, 13.0, 14.0], "num_tokens": [100, 200, 300, 400, 500],
           "pad_tokens": 25, "input_tokens": 100, "peak_mib": 1.0, "wall_s": 20.0}
    summary = bench.summarise(raw, steps=5, warmup=2, flops_tok=6, peak=6000.0)
    assert summary["step_times"] == [1.0, 2.0, 1.0]  # steps 3..5; step 2's 10 s is warm-up
    assert summary["s_per_step"] == 1.0
    assert summary["tokens_per_s"] == pytest.approx(300 / 4.0)  # tokens of steps 3..5 over their 4 s
    assert summary["padding"] == 0.25
    assert summary["mfu"] == pytest.approx(6 * 75 / 6000)


def test_rewrite_readme_replaces_only_the_marked_block():
    start, end = bench.MARKERS
    text = f"intro\n{start}\nold table\n{end}\noutro\n"
    assert bench.rewrite_readme(text, "new table") == f"intro\n{start}\nnew table\n{end}\noutro\n"
    assert start in (REPO / "README.md").read_text() and end in (REPO / "README.md").read_text()
    with pytest.raises(SystemExit, match="markers"):
        bench.rewrite_readme("no markers", "table")


def test_every_documented_bench_command_parses():
    """The README's measurement commands run for minutes, so only --quick runs here; the others must at least be
    valid invocations (a renamed flag would fail here, not in the reader's terminal)."""
    import shlex

    commands = [line.strip() for line in (REPO / "README.md").read_text().splitlines()
                if line.strip().startswith("python scripts/bench.py")]
    assert len(commands) >= 2
    for command in commands:
        args = bench.parse_args(shlex.split(command)[2:])
        assert set(args.jobs) <= set(workload.JOBS) and args.steps > args.warmup >= 1
