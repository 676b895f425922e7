"""Data parallel: 2 processes x batch 4 train exactly like 1 process x batch 8 (and like batch 4 x accumulation 2).

Every run trains the SAME saved tiny SmolLM3 (hidden 32, 2 layers) with the shipped tokenizer on the same 16 rows
(SFT: the first 16 bundled chat rows, plus 8 held-out rows evaluated at the last step; DPO: the first 16 bundled
preference pairs), on CPU in fp32, seed 42, 3 optimizer steps, lr 1e-3, `max_grad_norm` 0.5 (below the gradient
norm: clipping is active, checked), gradient checkpointing on (the default). The 1-process references run
in-process through `engine.loop.train`; the 2-process runs are real launches of train.py on the gloo backend:
`accelerate launch --config_file configs/accelerate/ddp_cpu.yaml` (the shipped config) and
`python -m torch.distributed.run --nproc_per_node 2`.

Why they must agree: the global micro-batch k is examples order[8k : 8k+8] in every layout (process p takes its
p-th slice of 4, `micro_batches_of_epoch`), SFT's loss is Σ token NLL over the whole window / targets on all
processes (each process's share is multiplied by the world size because gradients are averaged over processes),
DPO's is the mean over pairs (mean of the equal-sized micro-batch means); metrics are gathered before they are
averaged. So the same numbers are summed, only in a different order.

Tolerance, and why (fp32): every logged number and every final weight agrees to `RTOL = 1e-5` relative:
`|a - b| <= RTOL * (|b| + scale)` for logged values, and per weight tensor `max|a - b| <= RTOL * max|b|`.
Summation order changes results by a few fp32 ulps (eps = 1.2e-7) per reduction: gradients summed as g0 + g1
instead of over 8 rows at once, token sums split per process. Three AdamW steps carry that into the weights.
Observed (printed with -s): weights <= 3e-8 absolute (max|w| ~ 0.07, i.e. <= 5e-7 relative), logged values
<= 2e-7 relative (FSDP2's sharded grad_norm ~1e-6). 1e-5 leaves margin without hiding a real difference: with
gradients not synchronised over processes the step-1 grad_norm is already 6% off (checked by mutation), and a
missing world-size factor halves the loss.
AdamW's epsilon is 1e-3 here (not 1e-8), as in tests/test_parity_dpo.py: with eps 1e-8, Adam's first update is
a sign function of the gradient whose slope at |g| ~ eps amplifies 1-ulp gradient differences of the rare
near-zero gradient entries into ~1e-4 weight differences (chaos, not a bug); eps 1e-3 keeps that map well
conditioned. `scale` is 0 except for DPO's `rewards/*` (β·(logp − ref logp), a difference of summed log-probs of
size ~100 whose rounding is relative to the log-probs, not the small difference: scale = β·max|logps/*|) and
`logits/*` (means over the vocabulary of logits of both signs: scale = 1, the order of the logits).

Writes happen once: metrics.jsonl has exactly one line per logged step (+ the eval line), one checkpoint folder,
one final model; the main-process-only "done" line is printed once.

FSDP: accelerate 1.15 enables FSDP only for GPU process groups (on CPU it ignores the FSDP config and trains plain
data parallel), so the engine refuses configs/accelerate/fsdp.yaml on CPU (tested). To still run the engine's
FSDP2 path here, one test launches with fsdp.yaml and switches on exactly the state accelerate sets for an FSDP
config on GPUs (see FSDP_ON_CPU); from there on everything is accelerate's and torch's real FSDP2 on gloo.
DeepSpeed is not installed here: configs/accelerate/deepspeed_zero2.yaml is shipped untested.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.config import parse_config
from engine.loop import micro_batches_of_epoch, train
from tests.launch import free_port, one_launch_at_a_time
from tests.trl_harness import make_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-5
BETA = 0.1
MAX_STEPS = 3
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
LAUNCH_TIMEOUT_S = 300
FREE_PORT = "<free port>"  # in a launcher command: replaced by `free_port()` once the launch lock is held


# ---------------------------------------------------------------------- assets


def _first_rows(path: Path, count: int, skip: int = 0) -> str:
    lines = path.read_text().splitlines()[skip : skip + count]
    assert len(lines) == count
    return "".join(line + "\n" for line in lines)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoTokenizer

    from data.defaults import DEFAULT_DPO_DATASET, DEFAULT_SFT_DATASET, DEFAULT_TOKENIZER_DIR

    root = tmp_path_factory.mktemp("distributed")
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER_DIR)
    model = make_tiny_model_dir(root, vocab_size=len(tokenizer), **TINY)
    sft = root / "data" / "sft"  # a folder with train/test splits (outputs go elsewhere: the loader reads it all)
    sft.mkdir(parents=True)
    (sft / "train.jsonl").write_text(_first_rows(DEFAULT_SFT_DATASET / "train.jsonl", 16))
    (sft / "test.jsonl").write_text(_first_rows(DEFAULT_SFT_DATASET / "test.jsonl", 8))
    dpo = root / "data" / "dpo.jsonl"
    dpo.write_text(_first_rows(DEFAULT_DPO_DATASET / "train.jsonl", 16))
    return {"root": root, "model": model, "tokenizer": DEFAULT_TOKENIZER_DIR, "sft": sft, "dpo": dpo}


def _flags(assets: dict[str, Path], method: str, output_dir: Path, batch: int, accumulation: int) -> list[str]:
    flags = [
        "--method", method, "--model_name_or_path", str(assets["model"]),
        "--tokenizer_name_or_path", str(assets["tokenizer"]), "--output_dir", str(output_dir),
        "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation),
        "--per_device_eval_batch_size", "4", "--max_steps", str(MAX_STEPS), "--learning_rate", "1e-3",
        "--adam_epsilon", "1e-3", "--max_grad_norm", "0.5", "--bf16", "False", "--logging_steps", "1",
        "--save_steps", "2", "--seed", "42", "--disable_tqdm",
    ]
    if method == "sft":
        return flags + ["--dataset_name", str(assets["sft"]), "--eval_steps", str(MAX_STEPS)]
    return flags + ["--dataset_name", str(assets["dpo"]), "--eval_steps", "0", "--beta", str(BETA)]


def _run_launcher(launcher: list[str], script: Path, flags: list[str],
                  extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m <launcher> <script> <flags>` in its own process group, killed whole if it outlives the limit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO), **(extra_env or {})}
    with one_launch_at_a_time():
        port = str(free_port())  # chosen under the lock, right before the launcher binds it
        command = [sys.executable, "-m", *(port if arg == FREE_PORT else arg for arg in launcher), str(script), *flags]
        with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) as process:
            try:
                stdout, stderr = process.communicate(timeout=LAUNCH_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the launcher and the training processes it started
                stdout, stderr = process.communicate()
                pytest.fail(f"launch still running after {LAUNCH_TIMEOUT_S}s (a hang in a collective?):\n"
                            f"{stdout[-2000:]}\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _launch(launcher: list[str], flags: list[str], script: Path = REPO / "train.py") -> str:
    """Run `script` (train.py) under a multi-process launcher; returns its stdout (fails with the output's tail)."""
    done = _run_launcher(launcher, script, flags)
    assert done.returncode == 0, f"launch failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout


def _accelerate(num_processes: int, config_file: str = "ddp_cpu.yaml") -> list[str]:
    return ["accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate" / config_file),
            "--num_processes", str(num_processes), "--main_process_port", FREE_PORT]


def _torchrun(num_processes: int) -> list[str]:
    return ["torch.distributed.run", "--nproc_per_node", str(num_processes), "--master_port", FREE_PORT]


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "model.safetensors"))


# ---------------------------------------------------------------------- comparisons


def _scale(key: str, record: dict) -> float:
    """Magnitude a value's fp32 rounding is relative to (see the module docstring)."""
    if key.startswith("rewards/") and key != "rewards/accuracies":
        return BETA * max(abs(record["logps/chosen"]), abs(record["logps/rejected"]))
    if key.startswith("logits/"):
        return 1.0
    return 0.0


# Logged as the mean over the step's micro-batches of a per-micro-batch token ratio (TRL's logging): with
# accumulation the micro-batches are smaller, so these are a different (correct) average, not the same number.
PER_MICRO_BATCH_RATIOS = {"entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected"}
# Evaluation: every run uses --per_device_eval_batch_size 4, so 1 process evaluates batches [0:4], [4:8] and 2
# processes evaluate [0:4] and [4:8] at once. eval_loss (mean over batches of each batch's token mean) is the same
# number; the token ratios are gathered per evaluation step (as TRL does), i.e. over 4 rows with 1 process and 8
# rows with 2: a different, correct, average. They are compared only between runs with equal process counts.
EVAL_PER_STEP_RATIOS = {"eval_entropy", "eval_mean_token_accuracy"}


def _assert_same_logs(ours: list[dict], reference: list[dict], what: str, same_micro_batches: bool = True,
                      same_processes: bool = False) -> float:
    """Same records, keys and steps; every number within RTOL. Returns the largest relative difference seen.

    `same_micro_batches=False` (accumulation vs none): PER_MICRO_BATCH_RATIOS are not compared;
    `same_processes=False`: EVAL_PER_STEP_RATIOS are not compared.
    """
    assert [r["step"] for r in ours] == [r["step"] for r in reference], what
    worst = 0.0
    for mine, theirs in zip(ours, reference, strict=True):
        assert set(mine) == set(theirs), f"{what}: step {theirs['step']} keys {sorted(set(mine) ^ set(theirs))}"
        for key, expected in theirs.items():
            if (not same_micro_batches and key in PER_MICRO_BATCH_RATIOS) or (
                    not same_processes and key in EVAL_PER_STEP_RATIOS):
                continue
            bound = RTOL * (abs(expected) + _scale(key, theirs))
            difference = abs(mine[key] - expected)
            assert difference <= bound, f"{what}: step {theirs['step']} {key}: {mine[key]!r} vs {expected!r}"
            worst = max(worst, difference / bound * RTOL if bound else 0.0)
    return worst


def _assert_same_weights(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], what: str) -> float:
    """Per tensor max|a - b| <= RTOL * max|b|; returns the largest max|a - b| seen."""
    assert set(ours) == set(reference), what
    worst = 0.0
    for name, expected in reference.items():
        difference = (ours[name] - expected).abs().max().item()
        assert difference <= RTOL * expected.abs().max().item(), f"{what}: {name} differs by {difference:.3e}"
        worst = max(worst, difference)
    return worst


def _assert_written_once(output_dir: Path, stdout: str, logged_lines: int) -> None:
    """One metrics line per logged step, one checkpoint (save_steps 2 of 3 steps), one final model, one 'done'."""
    assert len((output_dir / "metrics.jsonl").read_text().splitlines()) == logged_lines
    entries = sorted(p.name for p in output_dir.iterdir() if p.is_dir())
    assert entries == ["checkpoint-2"], entries  # no second checkpoint, no .tmp-* leftovers
    assert (output_dir / "checkpoint-2" / "model.safetensors").is_file()
    assert len(list(output_dir.rglob("model.safetensors"))) == 2  # the checkpoint's and the final model
    assert stdout.count("[nanopost] done:") == 1, stdout


def _one_line_errors(done: subprocess.CompletedProcess) -> list[str]:
    """The `error: ...` messages train.py printed (one per process), after checking no traceback came first.

    The processes share one stderr pipe, so two messages can land on one line: split at each `error: `.
    """
    assert done.returncode != 0
    assert "Traceback (most recent call last)" not in done.stderr.split("error: ")[0], done.stderr[-3000:]
    return re.findall(r"error: (.*?)(?=error: |\n|$)", done.stderr)


# ---------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def references(assets) -> dict[tuple[str, str], Path]:
    """The 1-process runs, in-process, shared by the tests: (method, "1x8" | "1x4x2") -> output folder."""
    runs = {}
    for method in ("sft", "dpo"):
        for layout, batch, accumulation in (("1x8", 8, 1), ("1x4x2", 4, 2)):
            output_dir = assets["root"] / method / layout
            result = train(parse_config(_flags(assets, method, output_dir, batch=batch, accumulation=accumulation)))
            assert _metrics(output_dir) == result.logs  # the file is what train() logged
            runs[method, layout] = output_dir
    return runs


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_two_processes_match_one_process(assets, references, method):
    """2 x 4 (accelerate launch with the shipped ddp_cpu.yaml for SFT, torchrun for DPO) == 1 x 8 == 1 x 4 with
    accumulation 2.

    Expected: identical steps and metric keys; every logged value and every final weight within RTOL (module
    docstring); the references themselves agree too (1 x 8 vs 4 x 2 accumulation); clipping was active.
    """
    root = assets["root"] / method
    launcher = _accelerate(2) if method == "sft" else _torchrun(2)
    stdout = _launch(launcher, _flags(assets, method, root / "2x4", batch=4, accumulation=1))

    reference = _metrics(references[method, "1x8"])
    train_steps = [r for r in reference if "loss" in r]
    assert len(train_steps) == MAX_STEPS and all(r["grad_norm"] > 0.5 for r in train_steps)  # clipping active
    assert train_steps[1]["loss"] != train_steps[0]["loss"]  # step 2 depends on step 1's update
    logs = {
        "1x4 accumulate 2 vs 1x8": _assert_same_logs(_metrics(references[method, "1x4x2"]), reference, "accumulation",
                                                     same_micro_batches=False, same_processes=True),
        "2x4 vs 1x8": _assert_same_logs(_metrics(root / "2x4"), reference, "2 processes"),
    }
    reference_weights = _weights(references[method, "1x8"])
    weights = {
        "1x4 accumulate 2 vs 1x8": _assert_same_weights(_weights(references[method, "1x4x2"]), reference_weights,
                                                        "accumulation"),
        "2x4 vs 1x8": _assert_same_weights(_weights(root / "2x4"), reference_weights, "2 processes"),
    }
    print(f"\n{method}: max relative log difference {logs}; max abs weight difference {weights}")
    _assert_written_once(root / "2x4", stdout, logged_lines=MAX_STEPS + (1 if method == "sft" else 0))


def test_two_processes_with_accumulation(assets, references):
    """SFT 2 x 2 with accumulation 2 (torchrun) == 1 x 8: the loss normalises by the targets of the whole window
    on BOTH processes, so splitting over processes and over micro-batches at once changes nothing (within RTOL).
    Its micro-batch metrics equal those of 1 x 4 with accumulation 2 (global micro-batches of 4 in both).
    """
    output_dir = assets["root"] / "sft" / "2x2x2"
    stdout = _launch(_torchrun(2), _flags(assets, "sft", output_dir, batch=2, accumulation=2))
    reference = references["sft", "1x8"]
    worst_log = max(
        _assert_same_logs(_metrics(output_dir), _metrics(reference), "2 x 2 x 2 vs 1 x 8", same_micro_batches=False),
        _assert_same_logs(_metrics(output_dir), _metrics(references["sft", "1x4x2"]), "2 x 2 x 2 vs 1 x 4 x 2"),
    )
    worst_weight = _assert_same_weights(_weights(output_dir), _weights(reference), "2 processes x accumulation 2")
    print(f"\nsft 2x2x2 vs 1x8: max relative log difference {worst_log:.2e}; max abs weight difference "
          f"{worst_weight:.2e}")
    _assert_written_once(output_dir, stdout, logged_lines=MAX_STEPS + 1)


def test_uneven_last_batch_is_topped_up_from_the_epoch_start():
    """14 examples, 2 processes x 4: the last global batch has 6 examples; accelerate's even_batches tops it up to 8
    from the start of the epoch, so both processes take 2 micro-batches of 4 (equal step counts: no process waits
    forever in a collective). With 1 process the short batch of 6 is kept (transformers' Trainer).
    """
    order = list(range(100, 114))
    assert micro_batches_of_epoch(order, 4, 2, 0) == [[100, 101, 102, 103], [108, 109, 110, 111]]
    assert micro_batches_of_epoch(order, 4, 2, 1) == [[104, 105, 106, 107], [112, 113, 100, 101]]
    assert micro_batches_of_epoch(order, 8, 1, 0) == [order[:8], order[8:]]


def test_fsdp_config_on_cpu_is_refused(assets, tmp_path):
    """The shipped fsdp.yaml on a machine without GPUs: accelerate 1.15 ignores FSDP for CPU process groups and
    would train plain data parallel, so the engine refuses with a one-line error (exit 2) naming the fix.
    """
    done = _run_launcher(_accelerate(2, "fsdp.yaml"), REPO / "train.py",
                         _flags(assets, "sft", tmp_path / "fsdp", batch=4, accumulation=1))
    errors = _one_line_errors(done)
    assert len(errors) == 2, done.stderr[-3000:]  # each process refuses
    assert "FSDP" in errors[0] and "only on GPUs" in errors[0] and "ddp_cpu.yaml" in errors[0], errors


def test_builtin_dpo_demo_without_cached_sft_model_is_refused_with_two_processes(tmp_path):
    """`torchrun ... train.py --method dpo` with no --model_name_or_path and no cached demo SFT model: that model is
    trained on first use, which cannot run inside a 2-process run (the nested run's collectives would come from
    one process, and its end_training() would destroy the process group). Expected: one-line error on both
    processes, naming the one-process command, before any training.
    """
    done = _run_launcher(_torchrun(2), REPO / "train.py",
                         ["--method", "dpo", "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
                          "--disable_tqdm"], extra_env={"NANOPOST_CACHE": str(tmp_path / "cache")})
    errors = _one_line_errors(done)
    assert len(errors) == 2 and all("cached SFT model" in e and "ONE process" in e for e in errors), errors
    assert not (tmp_path / "cache" / "default-sft").exists()


# Runs train.py with accelerate's FSDP state switched on for a CPU process group: exactly what
# AcceleratorState.__init__ does for an FSDP config on GPUs (accelerate/state.py: distributed_type = FSDP, the
# plugin built from the FSDP_* variables that `accelerate launch --config_file fsdp.yaml` exported, mirrored into
# PartialState), which accelerate skips when the processes are CPUs. Everything after that is accelerate's and
# the engine's real FSDP2 path: fully_shard per decoder layer, sharded AdamW, DTensor clipping, gathered saving.
FSDP_ON_CPU = """
import sys
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
import engine.setup

def accelerator_with_fsdp(*args, **kwargs):
    accelerator = Accelerator(*args, **kwargs)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator

engine.setup.Accelerator = accelerator_with_fsdp
sys.argv[0] = "train.py"
import train
sys.exit(train.main())
"""


def test_fsdp2_on_two_cpu_processes_matches_one_process(assets, references, tmp_path):
    """The shipped fsdp.yaml (FSDP2, FULL_STATE_DICT), 2 x 4, with accelerate's GPU-only FSDP switch forced on
    (FSDP_ON_CPU) == 1 x 8: logs and final weights within RTOL, the saved model has the same tensor names as an
    unsharded save (tied lm_head not duplicated), one checkpoint, written once.

    Sharded clipping sums squared gradient norms per shard before the all-reduce: grad_norm differs by ~2e-6
    relative (observed), the rest by ~1e-7 as in plain data parallel.
    """
    script = tmp_path / "train_fsdp_on_cpu.py"
    script.write_text(FSDP_ON_CPU)
    output_dir = assets["root"] / "sft" / "fsdp2x4"
    stdout = _launch(_accelerate(2, "fsdp.yaml"), _flags(assets, "sft", output_dir, batch=4, accumulation=1),
                     script=script)
    reference = references["sft", "1x8"]
    worst_log = _assert_same_logs(_metrics(output_dir), _metrics(reference), "FSDP2")
    worst_weight = _assert_same_weights(_weights(output_dir), _weights(reference), "FSDP2")
    assert set(load_file(str(output_dir / "checkpoint-2" / "model.safetensors"))) == set(_weights(reference))
    print(f"\nsft FSDP2 2x4 vs 1x8: max relative log difference {worst_log:.2e}; max abs weight difference "
          f"{worst_weight:.2e}")
    _assert_written_once(output_dir, stdout, logged_lines=MAX_STEPS + 1)
