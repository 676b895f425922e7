"""Invariants of our SFT loop that hold whatever TRL does: how the batch is split, and stopping/resuming.

1. Batch 8 x accumulation 1 == batch 1 x accumulation 8. With the same seed both runs take the same 8 rows per
   optimizer step (the epoch order is one permutation, cut into consecutive micro-batches), and the SFT loss is
   (sum of token NLL over the window) / (target tokens in the window), not a mean of micro-batch means, so the
   loss and its gradient do not depend on how the window is split. Rows have different lengths, so the batch-8 run
   pads and the batch-1 run does not: padding must change nothing. Equal up to fp32 summation order: step-1
   gradients (same weights) and, in a lock-step run that follows batch 8's weights, every step's gradients within
   max|a - b| <= 1e-5 max|b|; the free runs' later gradients and final weights within ||a - b|| <= 1e-5 ||b||
   (AdamW amplifies rounding in near-zero gradients, see tests/test_parity_sft.py).
2. Resume: 6 steps straight == 3 steps, stop, resume from checkpoint-3 for steps 4-6 (the scheduler is built for
   6 steps in both: the stopped run is configured for 6 and interrupted by its step hook at step 4, before that
   step's optimizer update). Checkpoints hold the exact fp32 weights, AdamW state, scheduler state, RNG state and
   the data position, and the data order is a pure function of (seed, epoch, position); CPU kernels are
   deterministic for the same inputs, so the resumed run must be BITWISE identical: every logged value and every
   final weight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from engine.config import parse_config
from engine.loop import epoch_order, train
from engine.sft import SFTMethod
from tests.trl_harness import load_or_build_tokenizer, make_tiny_model_dir

REL_TOL = 1e-5  # fp32 summation order only; see each test for the rule
WORDS = ["hello", "world", "good", "morning", "night", "blue", "red", "colour", "two", "four", "fox", "dog"]


def _rows(n: int) -> list[dict]:
    # Lengths from 3 to ~25 tokens: the batch-8 micro-batches are padded, the batch-1 ones are not.
    return [{"text": " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(1 + (i * 7) % 11)) + f" {i}."}
            for i in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tokenizer folder, tiny SmolLM3 folder (tied embeddings), a 16-row jsonl; shared by every test here."""
    work = tmp_path_factory.mktemp("sft_invariants")
    tokenizer = load_or_build_tokenizer(work)
    tokenizer_dir = work / "tokenizer_saved"
    tokenizer.save_pretrained(str(tokenizer_dir))
    model_dir = make_tiny_model_dir(work, "smollm3", vocab_size=len(tokenizer), seed=3)
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _rows(16)))
    return work, tokenizer_dir, model_dir, data


def _flags(setup, output_dir: Path, *extra: str) -> list[str]:
    _, tokenizer_dir, model_dir, data = setup
    return [
        "--method", "sft", "--model_name_or_path", str(model_dir), "--tokenizer_name_or_path", str(tokenizer_dir),
        "--dataset_name", str(data), "--output_dir", str(output_dir), "--bf16", "False", "--logging_steps", "1",
        "--eval_steps", "0", "--disable_tqdm", "--seed", "7", "--learning_rate", "1e-3", "--max_grad_norm", "1.0",
        *extra,
    ]


def _train_recording(flags: list[str], stop_at: int | None = None,
                     inject: list[dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
    """Run `train`; return {"logs": train records (None if stopped), "grads": per-step clipped grads,
    "batches": the collated micro-batches in order, "final": the saved weights (None if stopped)}.

    `stop_at`: raise in the hook at that step. `inject`: after recording step k's clipped grads, replace them by
    `inject[k - 1]`, so that the run follows another run's weights step by step (lock-step)."""
    run: dict[str, Any] = {"logs": None, "grads": [], "batches": [], "final": None}

    def hook(step: int, model) -> None:
        if step == stop_at:
            raise _Interrupt(step)
        run["grads"].append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        if inject is not None:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if param.grad is not None:
                        param.grad.copy_(inject[step - 1][name])

    original_collate = SFTMethod.collate

    def recording_collate(self, examples):
        batch = original_collate(self, examples)
        run["batches"].append({k: v.clone() for k, v in batch.items() if torch.is_tensor(v)})
        return batch

    config = parse_config(flags)
    try:
        with mock.patch.object(SFTMethod, "collate", recording_collate):
            result = train(config, step_hook=hook)
    except _Interrupt:
        return run
    run["logs"] = [r for r in result.logs if "loss" in r]
    run["final"] = load_file(str(Path(config.output_dir) / "model.safetensors"))
    return run


class _Interrupt(Exception):
    """Raised by a step hook to stop a run the way a crash would: after a checkpoint, before an update."""


def _max_rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max|a - b| / max|b| per tensor."""
    diff = (ours.double() - theirs.double()).abs().max().item()
    return diff / theirs.double().abs().max().item() if diff else 0.0


def _norm_rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """||a - b||_2 / ||b||_2 per tensor."""
    diff = (ours.double() - theirs.double()).norm().item()
    return diff / theirs.double().norm().item() if diff else 0.0


# ---------------------------------------------------------------------- batch 8 x GA 1 == batch 1 x GA 8


@pytest.fixture(scope="module")
def split_runs(setup) -> dict[str, Any]:
    """Batch 8 x GA 1, batch 1 x GA 8, and batch 1 x GA 8 in lock-step with batch 8's weights; 3 steps each."""
    work = setup[0]
    # AdamW epsilon 1e-6: AdamW's update is sensitive to gradient rounding as lr / eps where |g| << eps, which
    # would turn fp32 summation-order noise in a few near-zero gradients into visible weight differences by step 2
    # (see tests/test_parity_sft.py's docstring); 1e-6 keeps that amplification far below the tolerance.
    common = ("--max_steps", "3", "--adam_epsilon", "1e-6", "--save_steps", "0")
    big = _train_recording(_flags(setup, work / "b8ga1", "--per_device_train_batch_size", "8",
                                  "--gradient_accumulation_steps", "1", *common))
    small_flags = ("--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "8", *common)
    small = _train_recording(_flags(setup, work / "b1ga8", *small_flags))
    lockstep = _train_recording(_flags(setup, work / "b1ga8-lockstep", *small_flags), inject=big["grads"])
    return {"big": big, "small": small, "lockstep": lockstep, "initial": load_file(str(setup[2] / "model.safetensors"))}


def test_split_runs_train_on_the_same_rows_per_step(split_runs):
    """Step k of batch 8 is one padded micro-batch of 8 rows; step k of batch 1 x 8 is 8 unpadded micro-batches:
    the same rows in the same order (one permutation of seed + epoch, cut at the same places), and padding is
    the only difference. 16 rows -> 2 steps per epoch; step 3 starts epoch 1 with a new permutation."""
    big, small = split_runs["big"]["batches"], split_runs["small"]["batches"]
    assert len(big) == 3 and len(small) == 24
    lengths = set()
    for step, padded in enumerate(big):
        for row in range(8):
            single = small[8 * step + row]
            length = int(padded["attention_mask"][row].sum())
            lengths.add(length)
            assert single["input_ids"].shape == (1, length)
            assert torch.equal(single["input_ids"][0], padded["input_ids"][row, :length])
            assert torch.equal(single["labels"][0], padded["labels"][row, :length])
            assert (padded["labels"][row, length:] == -100).all()
    assert len(lengths) > 4  # rows of many different lengths: padding is really exercised
    assert epoch_order(16, 7, 1) != epoch_order(16, 7, 0)


def test_split_loss_and_logged_values_agree(split_runs):
    """Per step: loss (window token-mean NLL), grad_norm, learning_rate, num_tokens (non-padding tokens) and epoch
    agree within 1e-5 relative. (entropy and mean_token_accuracy are, as in TRL, plain means over micro-batches,
    so they differ by definition between 1 and 8 micro-batches and are not compared.)"""
    big_logs, small_logs = split_runs["big"]["logs"], split_runs["small"]["logs"]
    assert [r["step"] for r in big_logs] == [r["step"] for r in small_logs] == [1, 2, 3]
    for big, small in zip(big_logs, small_logs, strict=True):
        for key in ("loss", "grad_norm", "learning_rate", "num_tokens", "epoch"):
            assert abs(small[key] - big[key]) <= REL_TOL * abs(big[key]), (big["step"], key, small[key], big[key])
    assert [r["epoch"] for r in big_logs] == [0.5, 1.0, 1.5]
    assert any(r["grad_norm"] > 1.0 for r in big_logs)  # clipping is active, so the clip is compared too


def test_split_gradients_agree(split_runs):
    """Clipped grads per parameter. Step 1 (same weights): max|a - b| <= 1e-5 max|b|. Steps 2-3 start from weights
    that already differ by fp32 rounding: ||a - b|| <= 1e-5 ||b||."""
    big_grads, small_grads = split_runs["big"]["grads"], split_runs["small"]["grads"]
    assert len(big_grads) == len(small_grads) == 3
    for step, (big, small) in enumerate(zip(big_grads, small_grads, strict=True), start=1):
        assert big.keys() == small.keys()
        rule = _max_rel if step == 1 else _norm_rel
        for name in big:
            rel = rule(small[name], big[name])
            assert rel <= REL_TOL, f"step {step} {name}: relative error {rel:.2e}"


def test_split_lockstep_gradients_agree_at_every_step(split_runs):
    """Batch 1 x 8 driven along batch 8's weights (its hook installs batch 8's clipped grads after recording its
    own): from the same weights at every step, its loss within 1e-5 relative and its clipped grads within
    max|a - b| <= 1e-5 max|b| per parameter at EVERY step; the split changes nothing but rounding."""
    big, lock = split_runs["big"], split_runs["lockstep"]
    assert len(lock["grads"]) == len(big["grads"]) == 3
    for big_log, lock_log in zip(big["logs"], lock["logs"], strict=True):
        for key in ("loss", "grad_norm"):
            assert abs(lock_log[key] - big_log[key]) <= REL_TOL * abs(big_log[key]), (big_log["step"], key)
    for step, (big_grads, lock_grads) in enumerate(zip(big["grads"], lock["grads"], strict=True), start=1):
        for name in big_grads:
            rel = _max_rel(lock_grads[name], big_grads[name])
            assert rel <= REL_TOL, f"step {step} {name}: relative error {rel:.2e}"


def test_split_final_weights_agree(split_runs):
    """After 3 steps (lr 1e-3: every weight moved by ~3e-3), the final weights agree: ||a - b|| <= 1e-5 ||b||
    per tensor, and they differ from the initial weights (the comparison is not vacuous)."""
    big, small = split_runs["big"]["final"], split_runs["small"]["final"]
    assert big.keys() == small.keys()
    for name in big:
        rel = _norm_rel(small[name], big[name])
        assert rel <= REL_TOL, f"{name}: relative error {rel:.2e}"
    assert _norm_rel(big["model.embed_tokens.weight"], split_runs["initial"]["model.embed_tokens.weight"]) > 1e-2


# ---------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def resume_runs(setup) -> dict[str, Any]:
    work = setup[0]
    # 16 rows, batch 2 x accumulation 2: 4 steps per epoch, so step 3 is mid-epoch and steps 5-6 are in epoch 1.
    common = ("--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--max_steps", "6")
    straight = _train_recording(_flags(setup, work / "straight", *common, "--save_steps", "0"))
    stopped_dir = work / "stopped"
    stopped = _train_recording(_flags(setup, stopped_dir, *common, "--save_steps", "3"), stop_at=4)
    assert stopped["logs"] is None, "the hook should have stopped the run at step 4"
    stopped_metrics = _read_metrics(stopped_dir)
    resumed = _train_recording(_flags(setup, stopped_dir, *common, "--save_steps", "3",
                                      "--resume_from_checkpoint", str(stopped_dir / "checkpoint-3")))
    return dict(straight=straight, stopped_metrics=stopped_metrics, resumed=resumed,
                resumed_metrics=_read_metrics(stopped_dir), initial=load_file(str(setup[2] / "model.safetensors")))


def _read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line]


def test_stopped_run_logged_three_steps_and_checkpointed_at_three(resume_runs):
    """The interrupted run logged steps 1-3 (step 4 never finished) and they equal the straight run's, bitwise:
    same config, same scheduler (built for 6 steps)."""
    stopped = [r for r in resume_runs["stopped_metrics"] if "loss" in r]
    assert [r["step"] for r in stopped] == [1, 2, 3]
    assert stopped == resume_runs["straight"]["logs"][:3]


def test_resumed_run_continues_with_identical_steps(resume_runs):
    """After resuming from checkpoint-3 the run does steps 4-6 only, and every logged value (loss, grad_norm,
    learning_rate, entropy, mean_token_accuracy, num_tokens, epoch) equals the straight run's bitwise; so do the
    clipped gradients of steps 4-6. metrics.jsonl reads as one uninterrupted run of 6 steps."""
    straight, resumed = resume_runs["straight"], resume_runs["resumed"]
    assert [r["step"] for r in straight["logs"]] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in resumed["logs"]] == [4, 5, 6]
    assert resumed["logs"] == straight["logs"][3:]
    assert [r for r in resume_runs["resumed_metrics"] if "loss" in r] == straight["logs"]
    assert len(resumed["grads"]) == 3
    for step, (resumed_grads, straight_grads) in enumerate(
            zip(resumed["grads"], straight["grads"][3:], strict=True), start=4):
        for name, grad in straight_grads.items():
            assert torch.equal(resumed_grads[name], grad), f"step {step} {name}"
    # The resumed run continued the data stream where it stopped: its micro-batches are the straight run's 7-12
    # (steps 4-6 x 2), the last two steps in epoch 1's permutation.
    assert len(straight["batches"]) == 12 and len(resumed["batches"]) == 6
    for ours, theirs in zip(resumed["batches"], straight["batches"][6:], strict=True):
        assert torch.equal(ours["input_ids"], theirs["input_ids"])


def test_resumed_final_weights_are_bitwise_equal(resume_runs):
    """Final weights of the resumed run == the straight run's, bit for bit (and not the initial weights)."""
    straight, resumed = resume_runs["straight"]["final"], resume_runs["resumed"]["final"]
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    assert not torch.equal(straight["model.embed_tokens.weight"], resume_runs["initial"]["model.embed_tokens.weight"])
