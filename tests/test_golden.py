"""Golden regression curves: every reference run of scripts/golden.py reproduces its stored per-step logs.

Each run (tiny SmolLM3 from a config + seed, the first 16 bundled rows, CPU, fp32, 5 steps) is trained again and
every logged value of every step is compared with tests/golden/<run>.json: |new − golden| must be within
RTOL · (|golden| + floor), RTOL = 1e-5 (why that number: scripts/golden.py's docstring, measured there).

A failure prints what moved, step by step. If the change is deliberate: `python scripts/golden.py --update`,
review the printed diff, commit the JSON files with the change.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.script_modules import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]



golden = load_script("golden")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return golden.build_assets(tmp_path_factory.mktemp("golden"))


def test_every_run_has_a_golden_file_and_every_file_a_run():
    """Expected: the stored files are exactly tests/golden/<run>.json for the runs of scripts/golden.py (9 runs),
    so no run goes unchecked and no stale file lingers."""
    stored = {path.stem for path in golden.GOLDEN_DIR.glob("*.json")}
    assert stored == set(golden.RUNS)
    assert len(golden.RUNS) == 9


@pytest.mark.parametrize("name", list(golden.RUNS))
def test_golden_file_records_versions_and_steps(name):
    """Each file records the torch / transformers versions it was made with, the command, and steps 1..5 with
    the loss, grad_norm and learning rate of every step (lr 1e-3 (1e-2 for LoRA) decaying linearly to 0: the
    k-th step used lr·(5 − k + 1)/5)."""
    stored = golden.load_golden(name)
    assert set(stored["versions"]) >= {"torch", "transformers"}
    assert stored["command"].startswith("python train.py ")
    steps = stored["steps"]
    assert [step["step"] for step in steps] == [1, 2, 3, 4, 5]
    peak = 1e-2 if name == "lora_dpo" else 1e-3
    for k, step in enumerate(steps):
        assert math.isfinite(step["loss"]) and step["grad_norm"] > 0
        assert step["learning_rate"] == pytest.approx(peak * (5 - k) / 5, rel=1e-12)


@pytest.mark.parametrize("name", list(golden.RUNS))
def test_run_matches_golden(name, assets):
    """Expected: every logged value of steps 1-5 equals the stored one within RTOL (nothing moved)."""
    steps = golden.run_reference(name, assets)
    stored = golden.load_golden(name)
    moved = golden.compare(stored["steps"], steps, golden.RUNS[name])
    assert not moved, "\n" + golden.describe(name, moved, stored["versions"])


def test_dpo_runs_start_at_the_known_first_step():
    """Step 1 of the reference-based DPO runs: the policy is its own reference, so every log-ratio is 0 and
    sigmoid's loss is −log σ(0) = ln 2, hinge's max(0, 1 − 0) = 1, IPO's (0 − 1/(2·0.1))² = 25, robust's
    ln 2·(1 − 2ε)/(1 − 2ε) = ln 2, and the rewards are exactly 0. (Pins the stored files to known numbers.)"""
    expected = {"dpo_sigmoid": math.log(2), "dpo_hinge": 1.0, "dpo_ipo": 25.0, "dpo_robust": math.log(2),
                "lora_dpo": math.log(2), "dpo_rpo": None}
    for name, loss in expected.items():
        first = golden.load_golden(name)["steps"][0]
        if loss is not None:
            assert first["loss"] == pytest.approx(loss, rel=1e-6), name
        assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0, name


def test_tolerance_is_what_the_docstring_says():
    """RTOL = 1e-5 relative: a change of 0.5·RTOL·|value| passes, 2·RTOL·|value| is reported (loss of step 3);
    rewards/* also get the floor β·max|logps| (here 0.1·83.6 = 8.36, so ±4e-5 on a reward of 0.12 passes and
    ±2e-4 does not)."""
    steps = golden.load_golden("dpo_sigmoid")["steps"]
    run = golden.RUNS["dpo_sigmoid"]
    assert golden.RTOL == 1e-5 and run.beta == 0.1

    def nudged(key: str, step: int, change: float) -> list[dict[str, float]]:
        copy = json.loads(json.dumps(steps))
        copy[step - 1][key] += change
        return copy

    loss3 = steps[2]["loss"]
    assert golden.compare(steps, nudged("loss", 3, 0.5e-5 * loss3), run) == []
    moved = golden.compare(steps, nudged("loss", 3, 2e-5 * loss3), run)
    assert [(item.step, item.key) for item in moved] == [(3, "loss")]
    assert golden.compare(steps, nudged("rewards/chosen", 2, 4e-5), run) == []
    assert [item.key for item in golden.compare(steps, nudged("rewards/chosen", 2, 2e-4), run)] == [
        "rewards/chosen"]
    # a missing key and a NaN are reported too
    missing = json.loads(json.dumps(steps))
    del missing[0]["entropy"]
    missing[1]["loss"] = float("nan")
    assert {(item.step, item.key) for item in golden.compare(steps, missing, run)} == {(1, "entropy"),
                                                                                           (2, "loss")}


def test_diff_and_update_commands(tmp_path, capsys):
    """`--diff` on a golden file whose step-3 loss was edited by +0.01 prints that value (golden, new, change) and
    exits 1; `--update` rewrites the file so that a second `--diff` prints "unchanged" and exits 0, and the file
    holds the real curve again.

    The printed change is new − golden of that line: −0.01 only up to the rerun's rounding, since another CPU
    reproduces the stored curve within RTOL, not bit for bit (an AMX / AVX-512-bf16 Xeon reruns this loss as
    7.39920616 against the stored 7.39920521, so the change prints as -9.999e-03, not -1.000e-02). So the line is
    checked against the rerun itself (`--update` writes the same rerun: one thread, bit-for-bit reproducible on
    one machine), and the change against −0.01 within the golden tolerance of that loss."""
    run = golden.RUNS["dpo_orpo"]
    real_steps = golden.load_golden("dpo_orpo")["steps"]
    golden_dir = tmp_path / "golden"
    golden_dir.mkdir()
    stored = golden.load_golden("dpo_orpo")
    edited_loss = stored["steps"][2]["loss"] + 0.01
    stored["steps"][2]["loss"] = edited_loss
    (golden_dir / "dpo_orpo.json").write_text(json.dumps(stored))

    assert golden.main(["--diff", "--run", "dpo_orpo", "--golden_dir", str(golden_dir)]) == 1
    out = capsys.readouterr().out
    moved_lines = [line for line in out.splitlines() if line.startswith("  step ")]
    assert len(moved_lines) == 1, out  # only the edited value is reported
    fields = moved_lines[0].split()  # step 3 loss golden <g> new <n> change <c> (rel ..., allowed ...)
    assert fields[:6] == ["step", "3", "loss", "golden", f"{edited_loss:.9g}", "new"] and fields[7] == "change"

    assert golden.main(["--update", "--run", "dpo_orpo", "--golden_dir", str(golden_dir)]) == 0
    capsys.readouterr()
    assert golden.main(["--diff", "--run", "dpo_orpo", "--golden_dir", str(golden_dir)]) == 0
    assert "dpo_orpo: unchanged" in capsys.readouterr().out
    rewritten = json.loads((golden_dir / "dpo_orpo.json").read_text())["steps"]
    assert golden.compare(real_steps, rewritten, run) == []  # back to the real curve (the edit is gone)
    rerun_loss = rewritten[2]["loss"]
    assert fields[6] == f"{rerun_loss:.9g}" and fields[8] == f"{rerun_loss - edited_loss:+.3e}"
    assert abs((rerun_loss - edited_loss) - (-0.01)) <= golden.tolerance("loss", real_steps[2], run)


def test_losses_md_names_the_golden_runs():
    """LOSSES.md (generated) says, per loss, which golden runs train with it: e.g. `dpo_sigmoid, dpo_rpo,
    lora_dpo` for sigmoid; a loss without one says so."""
    text = (REPO_ROOT / "LOSSES.md").read_text(encoding="utf-8")
    for loss in {name for run in golden.RUNS.values() for name in run.losses}:
        runs = [name for name, run in golden.RUNS.items() if loss in run.losses]
        section = text.split(f"### {loss}\n", 1)[1].split("\n### ", 1)[0]
        assert f"- Golden curve: {', '.join(f'`{run}`' for run in runs)}" in section, loss
    assert "- Golden curve: none" in text.split("### nca_pair\n", 1)[1].split("\n### ", 1)[0]
