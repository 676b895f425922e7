"""Crash safety: atomic checkpoints, a clean stop on SIGTERM / Ctrl-C, SIGKILL + resume == an uninterrupted run,
non-finite values stop the run before anything corrupt is written, and the final model is never half-written
but complete-looking.

Real subprocesses get real signals. To hit a chosen moment (mid-step, mid-save) a subprocess runs train.py's own
`main()` through `_WRAPPER`, which only adds a `step_hook` (called after clipping, before optimizer.step) that
records the step and can pause there, and, for the mid-save kill, a `torch.save` that SIGKILLs its own process
right after writing one chosen file. The engine itself carries no test hooks.

Resumed runs must match the uninterrupted reference BITWISE (losses, grad norms, final tensors), not within a
tolerance: both run the same fp32 kernels in the same order on one CPU thread (no parallel-reduction
nondeterminism), and everything a resume restores is exact — fp32 weights through safetensors, optimizer /
scheduler / RNG state through torch.save, and the floats in trainer_state.json through JSON, which round-trips
Python floats exactly. The tiny model has attention dropout on, so an RNG state restored wrongly shows up too.

The subprocess runs are all started together the first time one is needed (`launched`), so their start-up
(importing torch / transformers, ~10 s each on a busy 2-core box) overlaps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.defaults import DEFAULT_TOKENIZER_DIR
from engine import checkpoint as ckpt
from engine import storage
from engine.config import parse_config
from engine.errors import UserError
from engine.loop import train
from engine.model import build_tiny_smollm3
from engine.storage import StorageError
from engine.tracking import read_metrics
from tests.launch import free_port, one_launch_at_a_time

REPO = Path(__file__).resolve().parents[1]
# What a finished run leaves at the top of output_dir; a failed or stopped run must leave none of them.
FINAL_MODEL_FILES = ("config.json", "model.safetensors", "adapter_config.json")
# What every complete checkpoint holds (full fine-tuning).
CHECKPOINT_FILES = ("model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                    "trainer_state.json", "tokenizer_config.json")

_WRAPPER = r'''
"""train.py's main() with a step_hook that marks each step and can pause; optionally SIGKILL inside a save."""
import os, signal, sys, time
from pathlib import Path

sys.path.insert(0, os.environ["CRASH_REPO"])
import torch
import engine.loop

marks = Path(os.environ["CRASH_MARKS"])
rank = os.environ.get("RANK", "0")  # set for data-parallel runs
pause_at = int(os.environ.get("CRASH_PAUSE_AT", "0"))
kill_after_writing = os.environ.get("CRASH_KILL_AFTER_WRITING")  # e.g. ".tmp-checkpoint-4/optimizer.pt"


def hook(step, model):
    (marks / f"step-{step}").touch()
    if step == pause_at:  # wait here (mid-step: after backward, before the optimizer step) for the test
        (marks / f"paused-{rank}").touch()
        deadline = time.time() + 300
        while not (marks / "release").exists() and time.time() < deadline:
            time.sleep(0.02)


if kill_after_writing:
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if str(f).endswith(kill_after_writing):
            os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save

real_train = engine.loop.train
engine.loop.train = lambda config, step_hook=None: real_train(config, step_hook=hook)
import train

sys.exit(train.main(sys.argv[1:]))
'''


# ---------------------------------------------------------------------- workspace and runs


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny SmolLM3 (hidden 32, 2 layers, attention dropout 0.1) + the shipped tokenizer, 16 chats, 16 pairs."""
    root = tmp_path_factory.mktemp("crash")
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER_DIR)
    model = build_tiny_smollm3(tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               attention_dropout=0.1)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    chats = [{"messages": [{"role": "user", "content": f"Count to {i}."},
                           {"role": "assistant", "content": " ".join(str(k) for k in range(1, i + 2))}]}
             for i in range(16)]
    pairs = [{"prompt": f"What is {i} + 1?", "chosen": f" {i + 1}.", "rejected": f" {i + 2}."} for i in range(16)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (root / "wrapper.py").write_text(_WRAPPER)
    return root


def sft_flags(ws: Path, out: Path) -> list[str]:
    """12 steps of 2 micro-batches of 2: 4 steps per epoch, so 3 epochs; a checkpoint every 2 steps."""
    return ["--method", "sft", "--model_name_or_path", str(ws / "model"), "--dataset_name", str(ws / "chat.jsonl"),
            "--output_dir", str(out), "--bf16", "False", "--disable_tqdm", "--seed", "42", "--logging_steps", "1",
            "--eval_steps", "0", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--max_steps", "12", "--save_steps", "2", "--learning_rate", "1e-3"]


def dpo_flags(ws: Path, out: Path) -> list[str]:
    """8 steps of 2 pairs; a checkpoint every step, only the newest 2 kept (pruning runs during the test)."""
    return ["--method", "dpo", "--model_name_or_path", str(ws / "model"), "--dataset_name", str(ws / "pairs.jsonl"),
            "--output_dir", str(out), "--bf16", "False", "--disable_tqdm", "--seed", "42", "--logging_steps", "1",
            "--eval_steps", "0", "--per_device_train_batch_size", "2", "--max_steps", "8", "--save_steps", "1",
            "--save_total_limit", "2", "--learning_rate", "1e-3"]


# name -> (flags builder, environment for the wrapper)
RUNS = {
    "sft_kill": (sft_flags, {"CRASH_PAUSE_AT": "6"}),  # SIGKILLed mid-step 6: checkpoint-4 is the newest
    "dpo_kill": (dpo_flags, {"CRASH_PAUSE_AT": "5"}),  # SIGKILLed mid-step 5: checkpoints 3 and 4 kept
    "sft_kill_in_save": (sft_flags, {"CRASH_KILL_AFTER_WRITING": f".tmp-checkpoint-4{os.sep}optimizer.pt"}),
    "sft_sigterm": (sft_flags, {"CRASH_PAUSE_AT": "3"}),  # SIGTERM arrives mid-step 3 (not a save_steps step)
    "sft_ddp_sigint": (sft_flags, {"CRASH_PAUSE_AT": "3"}),  # 2 processes; only rank 1 gets the SIGINT
}


class Run:
    """One training run: its process (or, data parallel, one process per rank), output folder and marker folder."""

    def __init__(self, processes: list[subprocess.Popen], out: Path, marks: Path) -> None:
        self.processes, self.out, self.marks = processes, out, marks
        self.process = processes[0]  # rank 0

    def output(self, timeout: float = 120) -> tuple[str, str]:
        """Wait for every process; their stdout and their stderr, each joined over the ranks."""
        outputs = [process.communicate(timeout=timeout) for process in self.processes]
        return "".join(out for out, _ in outputs), "".join(err for _, err in outputs)

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.communicate()

    def wait_until_paused(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while not all((self.marks / f"paused-{rank}").exists() for rank in range(len(self.processes))):
            if any(process.poll() is not None for process in self.processes):
                self.kill()
                pytest.fail(f"{self.out.name} ended before its pause step")
            assert time.time() < deadline, "the run never reached its pause step"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def launched(workspace):
    """Start every subprocess run now, in parallel; each test drives its own. Leftovers are killed at the end.

    The data-parallel run starts its 2 processes the way torch.distributed.run would (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT in the environment; accelerate reads them), without a launcher process of its own. The runs
    hold the multi-process launch lock (tests/launch.py) while they live.
    """
    with one_launch_at_a_time():
        yield from _launch_runs(workspace)


def _launch_runs(workspace):
    """Start the runs of `RUNS`, yield them by name, kill what is left of them afterwards."""
    runs = {}
    for name, (flags, extra_env) in RUNS.items():
        out, marks = workspace / name, workspace / f"{name}-marks"
        marks.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "CRASH_REPO": str(REPO), "CRASH_MARKS": str(marks), **extra_env}
        ranks = 2 if "ddp" in name else 1
        if ranks > 1:
            env.update(WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(free_port()))
        processes = [
            subprocess.Popen([sys.executable, str(workspace / "wrapper.py"), *flags(workspace, out)], cwd=workspace,
                             env={**env, **({"RANK": str(r), "LOCAL_RANK": str(r)} if ranks > 1 else {})},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r in range(ranks)
        ]
        runs[name] = Run(processes, out, marks)
    yield runs
    for run in runs.values():
        run.kill()  # only those a test failed to end (or that were deselected)


@pytest.fixture(scope="module")
def sft_reference(workspace):
    """The uninterrupted SFT run every interrupted one must reproduce."""
    out = workspace / "sft_reference"
    train(parse_config(sft_flags(workspace, out)))
    return out


@pytest.fixture(scope="module")
def dpo_reference(workspace):
    out = workspace / "dpo_reference"
    train(parse_config(dpo_flags(workspace, out)))
    return out


def assert_same_run(resumed: Path, reference: Path, steps: int) -> None:
    """Every logged value of every step and every final tensor equal bit for bit (see the module docstring)."""
    got, want = read_metrics(resumed), read_metrics(reference)
    assert [r["step"] for r in got] == list(range(1, steps + 1)), "each step logged exactly once, in order"
    assert got == want
    final, expected = load_file(str(resumed / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert final.keys() == expected.keys()
    for name in expected:
        assert torch.equal(final[name], expected[name]), name


def assert_complete_checkpoint(folder: Path, step: int) -> None:
    for name in CHECKPOINT_FILES:
        assert (folder / name).is_file(), f"{folder} lacks {name}"
    assert ckpt.read_state(folder)["global_step"] == step
    weights = load_file(str(folder / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def assert_no_final_model(out: Path) -> None:
    left = [name for name in FINAL_MODEL_FILES if (out / name).exists()]
    assert not left, f"{out} looks like a finished model: {left}"


# ---------------------------------------------------------------------- SIGKILL, then resume


def test_sft_sigkill_mid_training_then_resume_latest_matches_uninterrupted(launched, workspace, sft_reference):
    """Killed mid-step 6 with checkpoints 2 and 4 on disk (and step 5 done and logged, but never saved).

    `latest` must pick checkpoint-4 — a checkpoint at an epoch boundary (4 steps per epoch), so the resumed data
    stream starts a fresh epoch — and the resumed run redoes step 5 and must end bitwise equal to the reference.
    """
    run = launched["sft_kill"]
    run.wait_until_paused()
    assert [r["step"] for r in read_metrics(run.out)] == [1, 2, 3, 4, 5]
    run.process.send_signal(signal.SIGKILL)
    run.output()
    assert run.process.returncode == -signal.SIGKILL
    assert ckpt.list_checkpoints(run.out) == [run.out / "checkpoint-2", run.out / "checkpoint-4"]
    assert_complete_checkpoint(run.out / "checkpoint-4", 4)
    assert_no_final_model(run.out)

    train(parse_config(sft_flags(workspace, run.out) + ["--resume_from_checkpoint", "latest"]))
    assert_same_run(run.out, sft_reference, steps=12)


def test_dpo_sigkill_mid_training_then_resume_true_matches_uninterrupted(launched, workspace, dpo_reference):
    """DPO, killed mid-step 5; with --save_total_limit 2 only checkpoints 3 and 4 remain. `True` (as TRL users
    write it) means the newest complete one, checkpoint-4; the resumed run must equal the reference bitwise
    (its reference model is still the starting weights, not the checkpoint's)."""
    run = launched["dpo_kill"]
    run.wait_until_paused()
    run.process.send_signal(signal.SIGKILL)
    run.output()
    assert run.process.returncode == -signal.SIGKILL
    assert ckpt.list_checkpoints(run.out) == [run.out / "checkpoint-3", run.out / "checkpoint-4"]
    assert ckpt.resolve_resume_path("True", str(run.out)) == run.out / "checkpoint-4"
    assert_no_final_model(run.out)

    train(parse_config(dpo_flags(workspace, run.out) + ["--resume_from_checkpoint", "True"]))
    assert_same_run(run.out, dpo_reference, steps=8)


def test_sigkill_while_saving_keeps_previous_checkpoint_and_resume_matches(launched, workspace, sft_reference):
    """SIGKILL right after optimizer.pt of checkpoint-4 was written: the weights and optimizer are on disk but not
    scheduler / RNG / trainer_state. Only `.tmp-checkpoint-4` may hold them; checkpoint-2 stays whole and is what
    `latest` (and `True`) resume from; the next save of step 4 replaces the leftover folder."""
    run = launched["sft_kill_in_save"]
    run.output()
    assert run.process.returncode == -signal.SIGKILL
    partial = run.out / ".tmp-checkpoint-4"
    assert (partial / "model.safetensors").is_file() and (partial / "optimizer.pt").is_file()
    assert not (partial / "trainer_state.json").exists()
    assert not (run.out / "checkpoint-4").exists()
    assert_complete_checkpoint(run.out / "checkpoint-2", 2)
    for value in ("latest", "True", "true"):
        assert ckpt.resolve_resume_path(value, str(run.out)) == run.out / "checkpoint-2"
    assert_no_final_model(run.out)

    train(parse_config(sft_flags(workspace, run.out) + ["--resume_from_checkpoint", "latest"]))
    assert_same_run(run.out, sft_reference, steps=12)
    assert not partial.exists()


# ---------------------------------------------------------------------- SIGTERM / Ctrl-C


def _stop_with(run: Run, signum: int, rank: int = 0) -> tuple[str, str]:
    """Send `signum` to one process while the run is paused mid-step 3 (steps 1-2 logged), let it go on."""
    run.wait_until_paused()
    assert [r["step"] for r in read_metrics(run.out)] == [1, 2]
    run.processes[rank].send_signal(signum)
    (run.marks / "release").touch()
    stdout, stderr = run.output(timeout=60)  # a hang fails here; stopping takes a few seconds
    assert f"received signal {signum}: finishing this step, then saving a checkpoint" in stdout
    return stdout, stderr


def assert_stopped_cleanly_at_step_3(run: Run, stderr: str) -> None:
    """Step 3, in flight when the signal came, completed and was logged; checkpoint-3 was written though 3 is not
    a save_steps step; every process exited with 2 (the CLI's one-line-error code) and one line naming the step,
    the checkpoint and the flag to resume with. No final model: the run is not finished."""
    assert [process.returncode for process in run.processes] == [2] * len(run.processes), stderr[-3000:]
    assert "Traceback" not in stderr
    error_lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == len(run.processes), stderr[-3000:]  # one per process
    for message in error_lines:
        assert "stopped at step 3" in message
        assert str(run.out / "checkpoint-3") in message
        assert "--resume_from_checkpoint" in message
    assert [r["step"] for r in read_metrics(run.out)] == [1, 2, 3]
    assert ckpt.list_checkpoints(run.out) == [run.out / "checkpoint-2", run.out / "checkpoint-3"]
    assert_complete_checkpoint(run.out / "checkpoint-3", 3)
    assert_no_final_model(run.out)


def test_sigterm_finishes_step_saves_checkpoint_and_says_how_to_resume(launched):
    run = launched["sft_sigterm"]
    stdout, stderr = _stop_with(run, signal.SIGTERM)
    assert_stopped_cleanly_at_step_3(run, stderr)


def test_resume_after_sigterm_matches_uninterrupted(launched, workspace, sft_reference):
    """The stop checkpoint (step 3, off the save_steps grid) resumes to the reference run bitwise."""
    run = launched["sft_sigterm"]
    if run.process.returncode is None:  # this test run alone (-k): stop it here
        _stop_with(run, signal.SIGTERM)
    assert run.process.returncode == 2
    train(parse_config(sft_flags(workspace, run.out) + ["--resume_from_checkpoint", "latest"]))
    assert_same_run(run.out, sft_reference, steps=12)


def test_ctrl_c_reaching_one_of_two_processes_stops_both_at_the_same_step(launched):
    """Data parallel (2 processes, gloo), Ctrl-C (SIGINT) delivered to rank 1 only, mid-step 3 — a signal can
    reach the processes at different moments, or only some of them. Both must agree to stop after step 3 and
    save checkpoint-3 together. Before they agreed on the flag, rank 1 entered the save's barrier while rank 0
    went on into step 4's gradient all-reduce, and the run hung."""
    run = launched["sft_ddp_sigint"]
    stdout, stderr = _stop_with(run, signal.SIGINT, rank=1)
    assert_stopped_cleanly_at_step_3(run, stderr)


# ---------------------------------------------------------------------- non-finite values


def _first_weight(model: torch.nn.Module) -> torch.nn.Parameter:
    return next(p for p in model.parameters() if p.requires_grad)


def _short_sft(workspace: Path, out: Path, **overrides: str):
    """The SFT flags with 6 steps (or `overrides`, e.g. save_steps="1")."""
    flags = sft_flags(workspace, out)
    for name, value in {"max_steps": "6", **overrides}.items():
        if f"--{name}" in flags:
            flags[flags.index(f"--{name}") + 1] = value
        else:
            flags += [f"--{name}", value]
    return parse_config(flags)


def test_nan_loss_names_step_and_last_good_checkpoint(workspace):
    """The hook makes a weight NaN during step 3 (checkpoint-2 exists; 3 is not a save step), so step 4's loss is
    NaN: the run must stop at step 4, name checkpoint-2, and write neither checkpoint-4 nor a final model."""
    out = workspace / "nan_loss"

    def poison(step: int, model: torch.nn.Module) -> None:
        if step == 3:
            _first_weight(model).data[0, 0] = float("nan")

    with pytest.raises(UserError) as caught:
        train(_short_sft(workspace, out), step_hook=poison)
    message = str(caught.value)
    assert "non-finite loss at step 4" in message
    assert f"last good checkpoint is {out / 'checkpoint-2'}" in message
    assert ckpt.list_checkpoints(out) == [out / "checkpoint-2"]
    assert_complete_checkpoint(out / "checkpoint-2", 2)
    assert_no_final_model(out)


def test_inf_gradient_names_step_and_last_good_checkpoint(workspace):
    """From step 3 on, a gradient hook turns one parameter's gradient into inf while the loss stays finite: the
    run must stop at step 3 on the gradient norm and name checkpoint-2."""
    out = workspace / "inf_grad"

    def poison(step: int, model: torch.nn.Module) -> None:
        if step == 2:  # registered after step 2's backward, so it fires from step 3's backward on
            _first_weight(model).register_hook(lambda grad: grad * float("inf"))

    with pytest.raises(UserError) as caught:
        train(_short_sft(workspace, out), step_hook=poison)
    message = str(caught.value)
    assert "non-finite gradient norm at step 3" in message
    assert f"last good checkpoint is {out / 'checkpoint-2'}" in message
    assert_no_final_model(out)


def test_non_finite_weights_are_never_saved(workspace):
    """Finite loss and gradients can still give non-finite weights. (a) The hook NaNs a gradient after the check,
    in step 3 with a save every step: checkpoint-3 must be refused, naming checkpoint-2. (b) --learning_rate 1e39
    is a finite Python float but inf in fp32: one step makes the weights non-finite and, with no later loss to
    reveal it, the final model must be refused (no checkpoint exists)."""
    out = workspace / "nan_weights"

    def poison(step: int, model: torch.nn.Module) -> None:
        if step == 3:
            _first_weight(model).grad.fill_(float("nan"))

    with pytest.raises(UserError) as caught:
        train(_short_sft(workspace, out, save_steps="1"), step_hook=poison)
    assert "non-finite weights" in str(caught.value) and "at step 3" in str(caught.value)
    assert f"last good checkpoint is {out / 'checkpoint-2'}" in str(caught.value)
    assert ckpt.list_checkpoints(out) == [out / "checkpoint-1", out / "checkpoint-2"]
    assert_no_final_model(out)

    out = workspace / "huge_lr"
    with pytest.raises(UserError) as caught:
        train(_short_sft(workspace, out, max_steps="1", save_steps="0", learning_rate="1e39", max_grad_norm="0"))
    assert "non-finite weights" in str(caught.value) and "at step 1" in str(caught.value)
    assert "no checkpoint was saved yet" in str(caught.value)
    assert_no_final_model(out)


# ---------------------------------------------------------------------- checkpoint folders


def _fake_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    if complete:
        (folder / ckpt.STATE_FILE).write_text(json.dumps({"global_step": step}))
    return folder


def test_latest_is_newest_complete_checkpoint(tmp_path):
    """Only `checkpoint-<n>` folders with trainer_state.json count, newest by number (10 > 9, not by text):
    a leftover `.tmp-` or `.old-` folder, a `checkpoint-11` without its state file, and `checkpoint-x` are not
    checkpoints. `latest`, `True`, `true` all mean the newest; `False` / none mean a fresh start."""
    _fake_checkpoint(tmp_path / "checkpoint-9", 9)
    newest = _fake_checkpoint(tmp_path / "checkpoint-10", 10)
    _fake_checkpoint(tmp_path / "checkpoint-11", 11, complete=False)
    _fake_checkpoint(tmp_path / ".tmp-checkpoint-12", 12)
    _fake_checkpoint(tmp_path / ".old-checkpoint-13", 13)
    _fake_checkpoint(tmp_path / "checkpoint-x", 14)
    assert ckpt.list_checkpoints(tmp_path) == [tmp_path / "checkpoint-9", newest]
    for value in ("latest", "True", "true", "LATEST"):
        assert ckpt.resolve_resume_path(value, str(tmp_path)) == newest
    for value in (None, "False", "false", "none", ""):
        assert ckpt.resolve_resume_path(value, str(tmp_path)) is None
    with pytest.raises(UserError, match="not a complete checkpoint"):
        ckpt.resolve_resume_path(str(tmp_path / "checkpoint-11"), str(tmp_path))
    with pytest.raises(UserError, match="no complete checkpoint"):
        ckpt.resolve_resume_path("latest", str(tmp_path / "empty"))


def test_atomic_folder_crash_mid_write_leaves_previous_whole(tmp_path):
    """A write that dies halfway (here: raises after one file) leaves `final` as it was — absent, or the previous
    complete version — and removes its partial `.tmp-` folder on the way out (engine/storage.py)."""
    final = tmp_path / "checkpoint-4"

    def crash(folder: Path) -> None:
        (folder / "model.safetensors").write_text("new, partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        storage.atomic_folder(final, crash, what="checkpoint 4")
    assert not final.exists() and not (tmp_path / ".tmp-checkpoint-4").exists()

    storage.atomic_folder(final, lambda folder: (folder / "model.safetensors").write_text("old, whole"),
                          what="checkpoint 4")
    assert not (tmp_path / ".tmp-checkpoint-4").exists()
    with pytest.raises(KeyboardInterrupt):
        storage.atomic_folder(final, crash, what="checkpoint 4")
    assert (final / "model.safetensors").read_text() == "old, whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_pruning_killed_midway_leaves_no_complete_looking_checkpoint(tmp_path, monkeypatch):
    """--save_total_limit deletes old checkpoints; a kill in the middle of deleting one must not leave a folder
    that still has trainer_state.json but lost its weights. Simulated: rmtree deletes the weights, then dies."""
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path / f"checkpoint-{step}", step)

    def dying_rmtree(path, ignore_errors=False):
        (Path(path) / "model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", dying_rmtree)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune_checkpoints(tmp_path, keep=1)
    assert ckpt.list_checkpoints(tmp_path) == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-3"]


# ---------------------------------------------------------------------- the final model


@pytest.fixture(scope="module")
def final_model_parts(workspace):
    """Two tiny models with different weights (A, B), the tokenizer, a full-model config and an accelerator."""
    from engine.setup import build_accelerator

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER_DIR)
    model_a = AutoModelForCausalLM.from_pretrained(workspace / "model")
    model_b = AutoModelForCausalLM.from_pretrained(workspace / "model")
    with torch.no_grad():
        for param in model_b.parameters():
            param.add_(1.0)
    config = parse_config(["--method", "sft", "--output_dir", str(workspace / "unused"), "--bf16", "False"])
    return model_a, model_b, tokenizer, config, build_accelerator(config)  # as train() builds it


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def _same_weights(got: dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    return all(torch.equal(got[name], value) for name, value in model.state_dict().items())


def test_final_model_write_failure_keeps_previous_model_whole(tmp_path, final_model_parts, monkeypatch):
    """The rule: output_dir holds one complete save with its config.json, or no config.json at all.

    (1) A save into a fresh folder that fails midway (the tokenizer write raises after the weights were written)
    leaves no config.json and no weights at the top. (2) Model A saved; saving B fails the same way: A is still
    there, whole (B's weights went only to the temporary folder). (3) A later successful save gives B and removes
    the temporary folder.
    """
    from engine.setup import save_final_model

    model_a, model_b, tokenizer, config, accelerator = final_model_parts
    real_save = type(tokenizer).save_pretrained

    def failing_save(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", failing_save)
    with pytest.raises(StorageError, match="could not write the final model .*: No space left on device"):
        save_final_model(config, accelerator, model_a, tokenizer, tmp_path)
    assert_no_final_model(tmp_path)

    monkeypatch.setattr(type(tokenizer), "save_pretrained", real_save)
    save_final_model(config, accelerator, model_a, tokenizer, tmp_path)
    monkeypatch.setattr(type(tokenizer), "save_pretrained", failing_save)
    with pytest.raises(StorageError):
        save_final_model(config, accelerator, model_b, tokenizer, tmp_path)
    assert _same_weights(_weights(tmp_path), model_a)

    monkeypatch.setattr(type(tokenizer), "save_pretrained", real_save)
    save_final_model(config, accelerator, model_b, tokenizer, tmp_path)
    assert _same_weights(_weights(tmp_path), model_b)
    assert not (tmp_path / ".tmp-final-model").exists()


def test_final_model_crash_while_moving_in_leaves_no_config(tmp_path, final_model_parts, monkeypatch):
    """Model A in output_dir; B's files are moved in one by one and the second move fails. Some of B's files and
    some of A's now sit together: config.json must be gone, so from_pretrained refuses the folder instead of
    loading a mix."""
    import engine.setup
    from engine.setup import save_final_model

    model_a, model_b, tokenizer, config, accelerator = final_model_parts
    save_final_model(config, accelerator, model_a, tokenizer, tmp_path)
    real_replace, moves = os.replace, []

    def failing_replace(source, target):
        moves.append(Path(target).name)
        if len(moves) == 2:
            raise OSError("disk gone")
        real_replace(source, target)

    monkeypatch.setattr(engine.setup.os, "replace", failing_replace)
    with pytest.raises(StorageError, match="could not write the final model .*: disk gone"):
        save_final_model(config, accelerator, model_b, tokenizer, tmp_path)
    assert "config.json" not in moves[:2]  # config.json is moved in last
    assert not (tmp_path / "config.json").exists()
    with pytest.raises((OSError, ValueError)):  # transformers: "Unrecognized model ... config.json"
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_final_model_replaces_a_previous_weight_layout(tmp_path, final_model_parts, monkeypatch):
    """Model A saved as one model.safetensors; B saved as shards (+ index). A's model.safetensors must not stay:
    from_pretrained prefers it over the index and would load A's weights under B's config."""
    from engine.setup import save_final_model

    model_a, model_b, tokenizer, config, accelerator = final_model_parts
    save_final_model(config, accelerator, model_a, tokenizer, tmp_path)
    real_save = type(model_b).save_pretrained

    def sharded_save(self, folder, **kwargs):
        return real_save(self, folder, **{**kwargs, "max_shard_size": "100KB"})

    monkeypatch.setattr(type(model_b), "save_pretrained", sharded_save)
    save_final_model(config, accelerator, model_b, tokenizer, tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    assert _same_weights(_weights(tmp_path), model_b)
