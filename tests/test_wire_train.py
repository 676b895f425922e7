"""The training flags wired in issue 10 (--optim / --optim_args, --lr_scheduler_kwargs,
--gradient_checkpointing_kwargs, --use_cpu, --dtype, --neftune_noise_alpha, --torch_compile), each through the CLI on
a tiny model; where a flag changes the numbers, against TRL 1.16's SFTTrainer on the same model, data and seed.

Parity tolerance: the SFT parity rule of tests/test_parity_sft.py, |ours - trl| <= 1e-5 |trl| per logged scalar
(fp32 on CPU; TRL's fused LM head and our lean head sum in different orders, ~1e-7 apart).
"""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

import train as cli
from tests.trl_harness import make_tiny_model_dir, run_trl_sft

REL_TOL = 1e-5  # tests/test_parity_sft.py's bound
SEED = 42
WORDS = ["hello", "world", "good", "morning", "night", "blue", "red", "colour", "two", "four", "fox", "dog"]


def text_rows() -> list[dict]:
    """8 rows of 3 to 10 words: padded batches of different lengths."""
    return [{"text": " ".join(WORDS[(i * 5 + k) % len(WORDS)] for k in range(3 + i))} for i in range(8)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("wire_train")
    model_dir = make_tiny_model_dir(root, "smollm3", vocab_size=len(tokenizer), seed=0)
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text_rows()))
    return root, model_dir


def flags(assets, tokenizer_dir, out: str, *extra: str) -> list[str]:
    """Our CLI on the tiny model, fp32, 3 steps of batch 2 (lr 1e-3, clipping active); `extra` overrides."""
    root, model_dir = assets
    return ["--method", "sft", "--model_name_or_path", str(model_dir), "--tokenizer_name_or_path", str(tokenizer_dir),
            "--dataset_name", str(root / "data.jsonl"), "--output_dir", str(root / out), "--bf16", "false",
            "--logging_steps", "1", "--save_steps", "0", "--eval_steps", "0", "--disable_tqdm", "--seed", str(SEED),
            "--per_device_train_batch_size", "2", "--max_steps", "3", "--learning_rate", "1e-3",
            "--max_grad_norm", "1.0", *extra]


def ours(assets, tokenizer_dir, out: str, *extra: str) -> list[dict]:
    """The training records of a run of `flags`."""
    assert cli.main(flags(assets, tokenizer_dir, out, *extra)) == 0
    lines = (assets[0] / out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def trl(assets, tokenizer, **overrides) -> list[dict]:
    """TRL's SFTTrainer with the settings of `ours`."""
    root, model_dir = assets
    settings = dict(per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3, max_grad_norm=1.0, seed=SEED)
    run = run_trl_sft(model_dir, tokenizer, Dataset.from_list(text_rows()), **{**settings, **overrides})
    return run.logs


def assert_same_logs(our_logs: list[dict], trl_logs: list[dict], keys=("loss", "grad_norm", "learning_rate"),
                     steps: int = 3) -> None:
    assert [r["step"] for r in our_logs] == [r["step"] for r in trl_logs] == list(range(1, steps + 1))
    for our, their in zip(our_logs, trl_logs, strict=True):
        for key in keys:
            assert abs(our[key] - their[key]) <= REL_TOL * abs(their[key]), (our["step"], key, our[key], their[key])


# ---------------------------------------------------------------------- --optim, --optim_args

@pytest.mark.parametrize("optim, optim_args", [("sgd", "momentum=0.9"), ("adamw_torch", None)])
def test_optim_matches_trl(assets, tokenizer, tokenizer_dir, optim, optim_args):
    """Same optimizer class and hyperparameters as transformers builds for --optim / --optim_args, over the same
    decay / no-decay groups: the three steps' losses, grad norms and learning rates equal TRL's within 1e-5.
    Steps 2 and 3 depend on step 1's update, so a different optimizer (e.g. AdamW for SGD) fails here."""
    extra = ["--optim", optim] + (["--optim_args", optim_args] if optim_args else [])
    theirs = trl(assets, tokenizer, optim=optim, optim_args=optim_args)
    assert_same_logs(ours(assets, tokenizer_dir, f"optim-{optim}", *extra), theirs)


# ---------------------------------------------------------------------- --lr_scheduler_kwargs

@pytest.mark.parametrize("kind, kwargs", [("cosine_with_restarts", {"num_cycles": 2}),
                                          ("cosine_with_min_lr", {"min_lr_rate": 0.1})])
def test_lr_scheduler_kwargs_give_transformers_schedule(assets, tokenizer, tokenizer_dir, kind, kwargs):
    """The logged learning rates of 6 steps (1 warmup step) are TRL's exactly (both come from transformers'
    get_scheduler with these kwargs), and differ from the same schedule without them, so the kwargs were applied."""
    import torch
    from transformers import get_scheduler

    schedule = ["--lr_scheduler_type", kind, "--lr_scheduler_kwargs", json.dumps(kwargs), "--warmup_steps", "1",
                "--max_steps", "6"]
    our_rates = [r["learning_rate"] for r in ours(assets, tokenizer_dir, f"sched-{kind}", *schedule)]
    theirs = trl(assets, tokenizer, lr_scheduler_type=kind, lr_scheduler_kwargs=kwargs, warmup_steps=1, max_steps=6)
    assert our_rates == [r["learning_rate"] for r in theirs]
    default_kwargs = {"min_lr": 0.0} if kind == "cosine_with_min_lr" else {}  # it needs one of min_lr / min_lr_rate
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    without = get_scheduler(kind, optimizer, num_warmup_steps=1, num_training_steps=6,
                            scheduler_specific_kwargs=default_kwargs)
    plain_rates = []
    for _ in range(6):
        plain_rates.append(without.get_last_lr()[0])
        optimizer.step()
        without.step()
    assert our_rates[0] == plain_rates[0] == 0.0 and our_rates[1] == plain_rates[1] == 1e-3  # warmup
    assert our_rates[2:] != plain_rates[2:]


def test_lr_scheduler_kwargs_errors(capsys):
    """A key the schedule does not take, kwargs for a schedule that takes none, and a missing required key: one
    line each, exit 2, before anything runs."""
    for flags, message in [
        (["--lr_scheduler_type", "cosine", "--lr_scheduler_kwargs", '{"min_lr": 1}'],
         "'min_lr' is not an argument of the cosine schedule (it takes: num_cycles)"),
        (["--lr_scheduler_type", "linear", "--lr_scheduler_kwargs", '{"num_cycles": 2}'],
         "of the linear schedule (it takes: none)"),
        (["--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"num_cycles": 2}'],
         "needs exactly one of min_lr and min_lr_rate in --lr_scheduler_kwargs"),
        (["--lr_scheduler_type", "reduce_lr_on_plateau"], "--lr_scheduler_type 'reduce_lr_on_plateau': must be one of"),
    ]:
        assert cli.main(flags) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


# ---------------------------------------------------------------------- --gradient_checkpointing_kwargs

def test_gradient_checkpointing_kwargs_reach_torch_checkpoint(assets, tokenizer_dir, monkeypatch):
    """'{"use_reentrant": true, "every_n_layers": 2}' on the 2-layer model: transformers checkpoints layer 0 only,
    calling torch.utils.checkpoint with use_reentrant=True once per forward (3 steps = 3 calls); fp32 without dropout,
    recomputation changes no number, so the losses and grad norms equal those of a run without checkpointing."""
    import transformers.modeling_utils as modeling_utils

    calls = []
    original = modeling_utils.checkpoint

    def recording_checkpoint(function, *args, **kwargs):
        calls.append(kwargs)
        return original(function, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", recording_checkpoint)
    kwargs = json.dumps({"use_reentrant": True, "every_n_layers": 2})
    checkpointed = ours(assets, tokenizer_dir, "gc-kwargs", "--gradient_checkpointing_kwargs", kwargs)
    assert calls == [{"use_reentrant": True}] * 3
    calls.clear()
    plain = ours(assets, tokenizer_dir, "gc-off", "--gradient_checkpointing", "false")
    assert calls == []
    assert [(r["loss"], r["grad_norm"]) for r in checkpointed] == [(r["loss"], r["grad_norm"]) for r in plain]


def test_gradient_checkpointing_kwargs_errors(capsys):
    for flags, message in [
        (["--gradient_checkpointing", "false", "--gradient_checkpointing_kwargs", '{"use_reentrant": false}'],
         "needs --gradient_checkpointing true"),
        (["--gradient_checkpointing_kwargs", '{"use_reentrnt": false}'], "'use_reentrnt' is not a checkpointing"),
        (["--gradient_checkpointing_kwargs", '{"selective": true}'], "selective activation checkpointing"),
    ]:
        assert cli.main(flags) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


# ---------------------------------------------------------------------- --use_cpu

def test_use_cpu_reaches_the_accelerator(assets, tokenizer_dir, monkeypatch):
    """--use_cpu: the run's Accelerator is built with cpu=True, so it trains on the CPU even where a GPU is (without
    the flag: cpu=False in one process)."""
    import accelerate

    from engine import setup

    built = []

    class RecordingAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            built.append(kwargs["cpu"])
            super().__init__(*args, **kwargs)
            built.append(self.device.type)

    monkeypatch.setattr(setup, "Accelerator", RecordingAccelerator)
    ours(assets, tokenizer_dir, "use-cpu", "--use_cpu", "--max_steps", "1")
    ours(assets, tokenizer_dir, "no-use-cpu", "--max_steps", "1")
    assert built[:3] == [True, "cpu", False]  # the last: "cpu" here, "cuda" on a GPU machine


# ---------------------------------------------------------------------- --dtype

def test_dtype_bfloat16_trains_and_saves_bf16_weights(assets, tokenizer, tokenizer_dir, monkeypatch):
    """--dtype bfloat16 loads the weights in bf16 and trains them as they are, as TRL does (`trl sft --dtype
    bfloat16` sets model_init_kwargs dtype; no fp32 master copy, AdamW's state follows the weights' dtype): the
    three steps equal TRL's within 1e-5 (measured: losses and grad norms equal, one loss 7e-8 apart), the loss
    falls, and the saved model is bf16 with config.json saying so. The default (float32, TRL's) is unchanged;
    --dtype auto keeps a checkpoint's own dtype."""
    from safetensors.torch import load_file

    from engine import update

    seen = []
    original = update.build_optimizer

    def recording_build_optimizer(model, config):
        seen.append({p.dtype for p in model.parameters()})
        return original(model, config)

    monkeypatch.setattr("engine.loop.build_optimizer", recording_build_optimizer)
    root = assets[0]
    logs = ours(assets, tokenizer_dir, "dtype-bf16", "--dtype", "bfloat16")
    assert seen == [{torch.bfloat16}]
    assert_same_logs(logs, trl(assets, tokenizer, model_init_kwargs={"dtype": "bfloat16"}))
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert json.loads((root / "dtype-bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(str(root / "dtype-bf16" / "model.safetensors")).values()} == {torch.bfloat16}
    ours(assets, tokenizer_dir, "dtype-default", "--max_steps", "1")
    assert seen[1] == {torch.float32}
    # --dtype auto: the checkpoint's own dtype, here the bf16 model just saved
    ours(assets, tokenizer_dir, "dtype-auto", "--model_name_or_path", str(root / "dtype-bf16"), "--dtype", "auto",
         "--max_steps", "1")
    assert seen[2] == {torch.bfloat16}


def test_dtype_applies_to_the_built_in_model(tmp_path):
    """The built-in tiny SmolLM3 (built from a config, no --model_name_or_path) gets --dtype too."""
    from engine.config import parse_config
    from engine.loop import train

    result = train(parse_config(["--dtype", "bfloat16", "--bf16", "false", "--max_steps", "1", "--per_device_train_batch_size", "2",
                                 "--output_dir", str(tmp_path / "builtin"), "--disable_tqdm", "--eval_steps", "0",
                                 "--save_steps", "0"]))
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}
    assert json.loads((tmp_path / "builtin" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), (None, torch.float32)])
def test_dtype_applies_to_a_named_reference_model(assets, dtype, expected):
    """--ref_model_name_or_path is loaded in --dtype too (TRL builds a named reference with the policy's
    model_init_kwargs); without --dtype, fp32 as the policy. The fp32 checkpoint on disk makes a missed dtype show."""
    from types import SimpleNamespace

    from engine.reference import FrozenModel, build_reference

    config = SimpleNamespace(ref_model_name_or_path=str(assets[1]), model_revision="main", trust_remote_code=False,
                             attn_implementation=None, dtype=dtype, sync_ref_model=False,
                             precompute_ref_log_probs=False, use_peft=False)
    reference = build_reference(config, None, None, SimpleNamespace(device=torch.device("cpu")), None, [], None)
    assert isinstance(reference, FrozenModel)
    assert {p.dtype for p in reference.model.parameters()} == {expected}


# ---------------------------------------------------------------------- --neftune_noise_alpha

def test_neftune_matches_trl(assets, tokenizer, tokenizer_dir):
    """--neftune_noise_alpha 5: the noise comes from the global torch RNG as transformers' hook draws it, and our
    loop keeps TRL's RNG stream (seed after the model, one int64 per epoch for the DataLoader's base seed), so the
    noisy run equals TRL's with neftune_noise_alpha=5 over 5 steps that cross an epoch (4 batches per epoch)
    within 1e-5 (measured: <= 1.4e-7), and differs from the run without noise (by 0.06 to 0.36 in the loss)."""
    noisy = ours(assets, tokenizer_dir, "neftune", "--neftune_noise_alpha", "5", "--max_steps", "5")
    assert_same_logs(noisy, trl(assets, tokenizer, neftune_noise_alpha=5, max_steps=5), steps=5)
    clean = ours(assets, tokenizer_dir, "neftune-off", "--max_steps", "5")
    assert all(abs(n["loss"] - c["loss"]) > 1e-4 for n, c in zip(noisy, clean, strict=True))


# ---------------------------------------------------------------------- --torch_compile

def test_torch_compile_equals_eager(assets, tokenizer_dir, monkeypatch):
    """--torch_compile_backend aot_eager (dynamo + AOTAutograd, the compile pipeline without inductor's code
    generation, which takes ~90 s cold on this CPU) compiles the prepared module in place, and 2 steps give the
    eager run's losses and grad norms exactly: the same ops run in the same order. (inductor, measured by hand
    on the tiny model: equal to the last bit too, 90 s cold, 16 s with a warm cache.)"""
    import torch._dynamo

    compiled = []
    original = torch.nn.Module.compile

    def recording_compile(module, *args, **kwargs):
        compiled.append((type(module).__name__, kwargs))
        return original(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", recording_compile)
    torch._dynamo.reset()
    eager = ours(assets, tokenizer_dir, "eager", "--max_steps", "2")
    assert compiled == []
    fast = ours(assets, tokenizer_dir, "compiled", "--max_steps", "2", "--torch_compile_backend", "aot_eager")
    assert compiled == [("LeanCausalLM", {"backend": "aot_eager", "mode": None})]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # dynamo really traced it
    assert [(r["loss"], r["grad_norm"]) for r in fast] == [(r["loss"], r["grad_norm"]) for r in eager]
    torch._dynamo.reset()


def test_torch_compile_fails_fast(assets, tokenizer_dir, monkeypatch, capsys):
    """inductor on a CPU with no C++ compiler on PATH, an unknown backend, a mode for a backend without modes:
    one line each, exit 2, before the model is loaded (no metrics.jsonl)."""
    import shutil

    root = assets[0]
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert cli.main(flags(assets, tokenizer_dir, "no-cxx", "--torch_compile")) == 2
    assert "inductor on the CPU needs a C++ compiler (g++) and none is on PATH" in capsys.readouterr().err
    assert not (root / "no-cxx" / "metrics.jsonl").exists()
    monkeypatch.undo()
    for extra, message in [(["--torch_compile_backend", "nope"], "--torch_compile_backend nope: not a torch.compile"),
                           (["--torch_compile_backend", "aot_eager", "--torch_compile_mode", "max-autotune"],
                            "is an inductor option")]:
        assert cli.main(flags(assets, tokenizer_dir, "bad-compile", *extra)) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_neftune_leaves_evaluation_clean(assets, tokenizer_dir):
    """Evaluation runs in eval mode, where the hook adds nothing: --eval_on_start (the same starting weights) gives
    the same eval_loss with and without --neftune_noise_alpha, to the last bit."""
    split = assets[0] / "split"
    split.mkdir(exist_ok=True)
    rows = text_rows()
    for name, part in (("train", rows[:6]), ("test", rows[6:])):
        (split / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    eval_losses = []
    for out, extra in (("eval-noisy", ["--neftune_noise_alpha", "5"]), ("eval-clean", [])):
        assert cli.main(flags(assets, tokenizer_dir, out, "--dataset_name", str(split), "--eval_on_start",
                              "--eval_strategy", "steps", "--eval_steps", "100", "--max_steps", "1", *extra)) == 0
        records = [json.loads(line) for line in (assets[0] / out / "metrics.jsonl").read_text().splitlines()]
        eval_losses.append(next(r["eval_loss"] for r in records if r["step"] == 0 and "eval_loss" in r))
    assert eval_losses[0] == eval_losses[1]
