"""Golden regression curves: fixed reference runs whose per-step logs are stored in tests/golden/<run>.json.

    python scripts/golden.py --diff               # rerun every reference run, print what moved (exit 1 if anything)
    python scripts/golden.py --update             # the same, then rewrite tests/golden/*.json with the new curves
    python scripts/golden.py --diff --run dpo_ipo # one run (names: python scripts/golden.py --list)

A change that moves a curve on purpose is a reviewed update: run `--update`, read the printed diff, and commit
the JSON files with the change. `tests/test_golden.py` reruns every run and fails on any value outside `RTOL`.

Every run: CPU, fp32 (`--bf16 False`), one thread, seed 42, 5 optimizer steps, every step logged, no eval.
- Model: SmolLM3 built by `engine.model.build_tiny_smollm3(tokenizer, seed=0, **TINY_MODEL)` (64 hidden, 2
  layers), saved to a temporary folder, so the weights are a function of the config and the seed only.
- Tokenizer: the shipped one (data/assets/tokenizer). Data: the first `NUM_ROWS` rows of the bundled
  train.jsonl (data/bundled/chat for SFT, data/bundled/preference for DPO), written to a temporary file.
- AdamW epsilon 1e-3, as these runs are free (not lock-step like the TRL parity tests): with TRL's 1e-8 the
  first Adam steps are lr·g/(|g| + eps), a sign function whose slope at |g| ~ eps turns last-bit rounding of
  tiny gradient entries into visible weight changes. Measured here: with 1e-8, rounding-level noise (below)
  moves the LoRA run's grad_norm by 5e-6; with 1e-3 nothing moves by more than 1.04e-6.
- Learning rates (1e-3 full model, 1e-2 LoRA) are large on purpose: each step moves the weights enough that a
  change in one step's update shows in the next step's numbers.

Tolerance: a value passes if |new − golden| <= RTOL · (|golden| + floor), RTOL = 1e-5; floor is 0 except for
rewards/* and logits/*, small differences of large numbers (see `tolerance`).
Why 1e-5: on one machine with the same versions the runs are bit-for-bit reproducible (error 0, also with two
threads). Another CPU or BLAS build rounds differently; to size that, every weight of the tiny model was
multiplied by 1 ± 2^-23 (one fp32 rounding unit, random signs): the logged values then moved by at most 1.04e-6
of their scale (the hinge run's loss; most by < 4e-7). 1e-5 leaves a 10x margin over that, while the
smallest deliberate change tests/test_sensitivity.py makes (β or one loss scaled by 1.001) moves values by
~1e-3, 100x beyond it. 1e-6 would sit at the rounding noise floor and fail on a machine that rounds differently.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

GOLDEN_DIR = REPO_ROOT / "tests" / "golden"
RTOL = 1e-5
NUM_STEPS = 5
NUM_ROWS = 16
SEED = 42
MODEL_SEED = 0
TINY_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)

COMMON_FLAGS = [
    "--bf16", "False", "--logging_steps", "1", "--save_steps", "0", "--eval_steps", "0", "--disable_tqdm",
    "--report_to", "none", "--seed", str(SEED), "--max_steps", str(NUM_STEPS), "--demo_eval_samples", "0",
    "--adam_epsilon", "1e-3", "--per_device_train_batch_size", "4",
]
DPO_FLAGS = ["--method", "dpo", "--learning_rate", "1e-3", "--beta", "0.1"]


@dataclass(frozen=True)
class ReferenceRun:
    """One golden run: `flags` are train.py flags added to `COMMON_FLAGS` and the model/data/output paths."""

    description: str
    method: str
    flags: tuple[str, ...]
    losses: tuple[str, ...] = ()  # registered preference losses the run trains with (tests/test_sensitivity.py)
    reference_free: bool = False  # rewards are β·logp/|completion| (CPO convention), not a log-ratio difference

    @property
    def beta(self) -> float:
        return float(self.flags[self.flags.index("--beta") + 1]) if "--beta" in self.flags else 0.1


RUNS: dict[str, ReferenceRun] = {
    "sft": ReferenceRun(
        "SFT (nll) on chat messages, 2 micro-batches of 4 per step (the window-token normalisation)",
        "sft", ("--method", "sft", "--learning_rate", "1e-3", "--gradient_accumulation_steps", "2")),
    "dpo_sigmoid": ReferenceRun("DPO, sigmoid loss", "dpo", (*DPO_FLAGS, "--loss_type", "sigmoid"), ("sigmoid",)),
    "dpo_ipo": ReferenceRun("DPO, IPO loss (length-normalised)", "dpo", (*DPO_FLAGS, "--loss_type", "ipo"),
                            ("ipo",)),
    "dpo_hinge": ReferenceRun("DPO, SLiC hinge loss", "dpo", (*DPO_FLAGS, "--loss_type", "hinge"), ("hinge",)),
    "dpo_robust": ReferenceRun("DPO, robust loss with label_smoothing 0.1", "dpo",
                               (*DPO_FLAGS, "--loss_type", "robust", "--label_smoothing", "0.1"), ("robust",)),
    "dpo_rpo": ReferenceRun("RPO: sigmoid + 0.5 · sft (two losses, weighted)", "dpo",
                            (*DPO_FLAGS, "--loss_type", "sigmoid", "sft", "--loss_weights", "1", "0.5"),
                            ("sigmoid", "sft")),
    "dpo_simpo": ReferenceRun("SimPO (reference-free), beta 2, gamma 0.5", "dpo",
                              ("--method", "dpo", "--learning_rate", "1e-3", "--loss_type", "simpo", "--beta", "2.0",
                               "--simpo_gamma", "0.5"), ("simpo",), reference_free=True),
    # λ = 1 (TRL's default is 0.1): with 0.1 the odds-ratio term is 1% of the loss, and a 0.1% change of λ moved
    # the curve by only 1.3x the tolerance (tests/test_sensitivity.py); with 1 the term carries weight.
    "dpo_orpo": ReferenceRun("ORPO (reference-free), lambda (beta) 1.0", "dpo",
                             ("--method", "dpo", "--learning_rate", "1e-3", "--loss_type", "orpo", "--beta", "1.0"),
                             ("orpo",), reference_free=True),
    "lora_dpo": ReferenceRun("LoRA DPO, sigmoid (reference = adapters off), r 8, all linear layers", "dpo",
                             ("--method", "dpo", "--learning_rate", "1e-2", "--beta", "0.1", "--loss_type", "sigmoid",
                              "--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.0"),
                             ("sigmoid",)),
}


# ---------------------------------------------------------------------- assets and runs


@dataclass(frozen=True)
class Assets:
    """The tiny model folder and the data slices every run reads (built by `build_assets`)."""

    root: Path
    model_dir: Path
    tokenizer_dir: Path
    data: dict[str, Path]  # method -> jsonl file


def build_assets(root: Path) -> Assets:
    """Save the tiny model and the first `NUM_ROWS` rows of the bundled train data under `root`."""
    from data.defaults import DEFAULT_DPO_DATASET, DEFAULT_SFT_DATASET, DEFAULT_TOKENIZER_DIR
    from engine.model import build_tiny_smollm3, load_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(str(DEFAULT_TOKENIZER_DIR))
    model_dir = root / "tiny-smollm3"
    build_tiny_smollm3(tokenizer, seed=MODEL_SEED, **TINY_MODEL).save_pretrained(model_dir, safe_serialization=True)
    data = {}
    for method, folder in (("sft", DEFAULT_SFT_DATASET), ("dpo", DEFAULT_DPO_DATASET)):
        lines = (folder / "train.jsonl").read_text(encoding="utf-8").splitlines()[:NUM_ROWS]
        data[method] = root / f"{method}-{NUM_ROWS}.jsonl"
        data[method].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Assets(root, model_dir, DEFAULT_TOKENIZER_DIR, data)


def run_argv(name: str, assets: Assets) -> list[str]:
    """The train.py flags of run `name` (the same as `python train.py <these flags>`)."""
    run = RUNS[name]
    return [
        *COMMON_FLAGS, *run.flags,
        "--model_name_or_path", str(assets.model_dir), "--tokenizer_name_or_path", str(assets.tokenizer_dir),
        "--dataset_name", str(assets.data[run.method]), "--output_dir", str(assets.root / "runs" / name),
    ]


def run_reference(name: str, assets: Assets) -> list[dict[str, float]]:
    """Train run `name` in this process and return its per-step train logs (floats, full precision)."""
    import shutil

    import torch

    from engine.config import parse_config
    from engine.loop import train

    output_dir = assets.root / "runs" / name
    if output_dir.exists():
        shutil.rmtree(output_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order: bit-for-bit reproducible on one machine
    try:
        result = train(parse_config(run_argv(name, assets)))
    finally:
        torch.set_num_threads(threads)
    return [{key: float(value) for key, value in record.items()} for record in result.logs if "loss" in record]


def versions() -> dict[str, str]:
    import accelerate
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version()}


# ---------------------------------------------------------------------- stored curves and comparison


def golden_path(name: str, golden_dir: Path = GOLDEN_DIR) -> Path:
    return golden_dir / f"{name}.json"


def load_golden(name: str, golden_dir: Path = GOLDEN_DIR) -> dict[str, Any]:
    path = golden_path(name, golden_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: create it with `python scripts/golden.py --update --run {name}`")
    return json.loads(path.read_text(encoding="utf-8"))


def write_golden(name: str, steps: list[dict[str, float]], golden_dir: Path = GOLDEN_DIR) -> Path:
    run = RUNS[name]
    payload = {
        "run": name,
        "description": run.description,
        "command": "python train.py " + " ".join(run_argv_template(name)),
        "versions": versions(),
        "tolerance": f"|new - golden| <= {RTOL} * (|golden| + floor); see scripts/golden.py",
        "steps": steps,
    }
    golden_dir.mkdir(parents=True, exist_ok=True)
    path = golden_path(name, golden_dir)
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")  # json writes floats round-trip exact
    return path


def run_argv_template(name: str) -> list[str]:
    """`run_argv` with placeholders instead of temporary paths (for the JSON file's `command`)."""
    placeholder = Assets(Path("<tmp>"), Path("<tiny-smollm3: scripts/golden.py build_assets>"),
                         Path("data/assets/tokenizer"),
                         {m: Path(f"<first {NUM_ROWS} rows of data/bundled/{'chat' if m == 'sft' else 'preference'}"
                                  "/train.jsonl>") for m in ("sft", "dpo")})
    return run_argv(name, placeholder)


def tolerance(key: str, golden_step: dict[str, float], run: ReferenceRun) -> float:
    """Allowed |new − golden| for `key` at one step: RTOL · (|golden| + floor).

    floor = 0, except for values that are small differences of large numbers, whose rounding is relative to
    those numbers: rewards/* of reference-based runs, β·(logp − ref logp), get β · max(|logps/chosen|,
    |logps/rejected|); rewards/margins of reference-free runs (a difference of two rewards) gets the larger
    |reward|; logits/* (means over the vocabulary of logits of both signs, ~0 for a near-uniform model) get 1.0,
    the size of a logit.
    """
    floor = 0.0
    if key in ("rewards/chosen", "rewards/rejected", "rewards/margins") and not run.reference_free:
        floor = run.beta * max(abs(golden_step["logps/chosen"]), abs(golden_step["logps/rejected"]))
    elif key == "rewards/margins":
        floor = max(abs(golden_step["rewards/chosen"]), abs(golden_step["rewards/rejected"]))
    elif key.startswith("logits/"):
        floor = 1.0
    return RTOL * (abs(golden_step[key]) + floor)


@dataclass(frozen=True)
class Moved:
    """One value outside tolerance (or a missing / extra key or step)."""

    step: int
    key: str
    golden: float | None
    new: float | None
    allowed: float

    def describe(self) -> str:
        if self.golden is None or self.new is None:
            return f"  step {self.step:>2}  {self.key:<22} golden {_fmt(self.golden):>16}  new {_fmt(self.new):>16}"
        change = self.new - self.golden
        relative = abs(change) / abs(self.golden) if self.golden else math.inf
        return (f"  step {self.step:>2}  {self.key:<22} golden {_fmt(self.golden):>16}  new {_fmt(self.new):>16}  "
                f"change {change:+.3e} (rel {relative:.1e}, allowed {self.allowed:.1e})")


def _fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.9g}"


def compare(golden_steps: list[dict[str, float]], new_steps: list[dict[str, float]], run: ReferenceRun) -> list[Moved]:
    """Every value of `new_steps` that differs from `golden_steps` by more than `tolerance` (empty: all match)."""
    moved: list[Moved] = []
    for index in range(max(len(golden_steps), len(new_steps))):
        golden = golden_steps[index] if index < len(golden_steps) else {}
        new = new_steps[index] if index < len(new_steps) else {}
        step = int((golden or new).get("step", index + 1))
        for key in sorted(set(golden) | set(new)):
            if key not in golden or key not in new:
                moved.append(Moved(step, key, golden.get(key), new.get(key), 0.0))
                continue
            allowed = tolerance(key, golden, run)
            if not abs(new[key] - golden[key]) <= allowed:  # `not <=` also flags NaN
                moved.append(Moved(step, key, golden[key], new[key], allowed))
    return moved


def describe(name: str, moved: list[Moved], golden_versions: dict[str, str] | None = None) -> str:
    """A readable report of what moved in run `name`, one line per value."""
    if not moved:
        return f"{name}: unchanged (every value within {RTOL:g} relative)"
    lines = [f"{name}: {len(moved)} value(s) moved beyond {RTOL:g} relative ({RUNS[name].description})"]
    lines += [item.describe() for item in moved]
    now = versions()
    if golden_versions is not None:
        changed = {k: (v, now.get(k)) for k, v in golden_versions.items() if k != "python" and now.get(k) != v}
        if changed:
            lines.append("  note: the golden file was made with " + ", ".join(
                f"{k} {old} (now {new})" for k, (old, new) in changed.items())
                + "; if that explains the change, review it and run `python scripts/golden.py --update`")
    return "\n".join(lines)


def check_run(name: str, assets: Assets, golden_dir: Path = GOLDEN_DIR) -> tuple[list[dict[str, float]], list[Moved], str]:
    """Rerun `name` and compare it with its golden file: (new steps, what moved, readable report)."""
    steps = run_reference(name, assets)
    golden = load_golden(name, golden_dir) if golden_path(name, golden_dir).is_file() else None
    if golden is None:
        return steps, [Moved(0, "<no golden file>", None, None, 0.0)], f"{name}: no golden file yet"
    moved = compare(golden["steps"], steps, RUNS[name])
    return steps, moved, describe(name, moved, golden.get("versions"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--diff", action="store_true", help="rerun and print what moved; exit 1 if anything did")
    mode.add_argument("--update", action="store_true", help="rerun, print what moved, rewrite the golden files")
    mode.add_argument("--list", action="store_true", help="list the reference runs")
    parser.add_argument("--run", nargs="+", choices=sorted(RUNS), help="only these runs (default: all)")
    parser.add_argument("--golden_dir", default=str(GOLDEN_DIR), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.list:
        for name, run in RUNS.items():
            print(f"{name:<12} {run.description}\n             python train.py {' '.join(run_argv_template(name))}")
        return 0

    import torch

    torch.set_num_threads(1)
    golden_dir = Path(args.golden_dir)
    names = args.run or list(RUNS)
    any_moved = False
    with tempfile.TemporaryDirectory(prefix="nanopost-golden-") as tmp:
        assets = build_assets(Path(tmp))
        reports = []
        for name in names:
            steps, moved, report = check_run(name, assets, golden_dir)
            reports.append(report)
            any_moved |= bool(moved)
            if args.update and moved:
                write_golden(name, steps, golden_dir)
    print("\n" + "\n".join(reports))
    if args.update:
        print(f"\nrewrote the golden files of the runs that moved in {golden_dir}" if any_moved
              else "\nnothing moved; golden files left as they are")
        return 0
    return 1 if any_moved else 0


if __name__ == "__main__":
    sys.exit(main())
