"""The TRL loop flags applied by engine/loop.py (issue 10, phase 2), each through the CLI or train() on a tiny
model: the Hub preflight, model card and push; evaluation / saving / logging schedules; the best model;
trainer_state.json; drop_last and data_seed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import train as cli
from engine import hub


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("loop_flags")
    (root / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    rows = [{"messages": [{"role": "user", "content": f"Count to {i}."},
                          {"role": "assistant", "content": " ".join(str(k) for k in range(1, i + 2))}]}
            for i in range(12)]
    (root / "data").mkdir()
    for split, part in (("train", rows[:9]), ("test", rows[9:])):
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return root


def sft(assets, out: str, *extra: str) -> list[str]:
    return ["--method", "sft", "--model_name_or_path", str(assets / "model"), "--dataset_name", str(assets / "data"),
            "--output_dir", str(assets / out), "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--disable_tqdm", "--bf16", "false", *extra]


def records(assets, out: str) -> list[dict]:
    return [json.loads(line) for line in (assets / out / "metrics.jsonl").read_text().splitlines()]


class RecordingApi:
    """huggingface_hub.HfApi's methods that preflight and push call, recorded instead of sent."""

    calls: list = []

    def __init__(self, endpoint=None, token=None):
        pass

    def whoami(self, token=None):
        return {"name": "me"}

    def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False):
        RecordingApi.calls.append(("create_repo", repo_id))

    def create_branch(self, repo_id, *, branch, token=None, exist_ok=False):
        RecordingApi.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, *, repo_id, folder_path, commit_message, revision, ignore_patterns, token):
        from pathlib import Path

        files = sorted(p.name for p in Path(folder_path).iterdir())
        RecordingApi.calls.append(("upload_folder", repo_id, files))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc")


# ---------------------------------------------------------------------- 5. Hub: preflight, model card, push

def test_push_to_hub_checks_first_then_uploads_the_folder_with_its_card(assets, monkeypatch, capsys):
    """--push_to_hub: the repo is created before step 1 and the final folder (model, tokenizer, README.md model
    card, metrics) is uploaded once after the final save."""
    RecordingApi.calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_reachable", lambda endpoint: None)
    monkeypatch.setattr("huggingface_hub.HfApi", RecordingApi)
    assert cli.main(sft(assets, "pushed", "--max_steps", "2", "--push_to_hub", "--hub_model_id", "you/tiny-sft",
                        "--hub_token", "hf_x", "--hub_strategy", "end", "--save_steps", "1")) == 0
    assert [c[:2] for c in RecordingApi.calls] == [("create_repo", "you/tiny-sft"), ("upload_folder", "you/tiny-sft")]
    uploaded = RecordingApi.calls[1][2]
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl"} <= set(uploaded)
    card = (assets / "pushed" / "README.md").read_text()
    assert "base_model: " + str(assets / "model") in card and "# you/tiny-sft" in card and "train_loss" in card
    assert "pushed " in capsys.readouterr().out


def test_push_preflight_fails_before_training(assets, monkeypatch, capsys):
    """HF_HUB_OFFLINE=1 with --push_to_hub: one line, exit 2, and no model was trained (no metrics.jsonl)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(sft(assets, "offline", "--max_steps", "2", "--push_to_hub", "--hub_token", "hf_x")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --push_to_hub: HF_HUB_OFFLINE=1 is set")
    assert not (assets / "offline" / "metrics.jsonl").exists()


def test_every_run_writes_a_model_card_and_push_false_with_an_id_pushes_nothing(assets, monkeypatch, capsys):
    """The course YAML: hub_model_id with push_to_hub false is accepted, nothing is pushed, the card is written."""
    monkeypatch.setattr("huggingface_hub.HfApi", None)  # any Hub call would fail
    assert cli.main(sft(assets, "nopush", "--max_steps", "1", "--push_to_hub", "false", "--hub_model_id",
                        "you/tiny", "--save_steps", "0")) == 0
    assert "nothing is pushed to you/tiny" in capsys.readouterr().out
    assert (assets / "nopush" / "README.md").read_text().startswith("---\nbase_model: ")
    assert cli.main(sft(assets, "nopush2", "--max_steps", "1", "--hub_model_id", "you/tiny")) == 2
    assert "add --push_to_hub" in capsys.readouterr().err


# ---------------------------------------------------------------------- 1. evaluation / saving / logging schedules
# 9 training rows, batch 2: 5 micro-batches = 5 optimizer steps per epoch; --max_steps 7 ends inside epoch 2.

def checkpoints(assets, out: str) -> list[str]:
    return sorted((p.name for p in (assets / out).glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


def test_strategies_steps_epoch_and_ratios(assets):
    """logging by epoch (+ first step, + nanopost's last-step record): steps 1, 5, 7. --eval_steps 0.5 of 7 steps
    = every ceil(3.5) = 4 steps, and the last step (as transformers): 4, 7. --save_strategy epoch: checkpoint-5."""
    assert cli.main(sft(assets, "sched", "--max_steps", "7", "--logging_strategy", "epoch", "--logging_first_step",
                        "--eval_strategy", "steps", "--eval_steps", "0.5", "--save_strategy", "epoch")) == 0
    logged = records(assets, "sched")
    assert [r["step"] for r in logged if "loss" in r] == [1, 5, 7]
    assert [r["step"] for r in logged if "eval_loss" in r] == [4, 7]
    assert checkpoints(assets, "sched") == ["checkpoint-5"]


def test_eval_on_start_eval_delay_in_epochs_and_no_logging(assets):
    """--eval_on_start: a record at step 0. --eval_strategy epoch with --eval_delay 1: not before epoch 1, so at
    the end of epoch 1 (step 5) and the last step (7). --logging_strategy no: no training records;
    --save_strategy no: no checkpoint although --save_steps 1."""
    assert cli.main(sft(assets, "delay", "--max_steps", "7", "--eval_on_start", "--eval_strategy", "epoch",
                        "--eval_delay", "1", "--logging_strategy", "no", "--save_strategy", "no",
                        "--save_steps", "1")) == 0
    logged = records(assets, "delay")
    assert [r["step"] for r in logged] == [0, 5, 7] and all("eval_loss" in r for r in logged)
    assert checkpoints(assets, "delay") == []


def test_explicit_eval_strategy_no_never_evaluates(assets):
    """TRL's meaning: --eval_strategy no evaluates nothing, although the data has a test split (without the flag,
    nanopost evaluates the last step: tests/test_engine_run.py)."""
    assert cli.main(sft(assets, "noeval", "--max_steps", "2", "--eval_strategy", "no", "--save_steps", "0")) == 0
    assert not [r for r in records(assets, "noeval") if "eval_loss" in r]


# ---------------------------------------------------------------------- 2. the best model

def test_load_best_model_at_end_takes_the_best_checkpoints_weights(assets):
    """Evaluate and save every step for 4 steps; --greater_is_better true on the loss makes an early, worse
    checkpoint the "best" one, so the final weights must be that checkpoint's, not the last step's.
    --save_total_limit 1 keeps the newest checkpoint and spares the best (as transformers)."""
    from safetensors.torch import load_file

    assert cli.main(sft(assets, "best", "--max_steps", "4", "--learning_rate", "1e-2", "--eval_strategy", "steps",
                        "--eval_steps", "1", "--save_steps", "1", "--load_best_model_at_end", "--greater_is_better",
                        "true", "--save_total_limit", "1")) == 0
    evals = [r for r in records(assets, "best") if "eval_loss" in r]
    best = max(evals, key=lambda r: r["eval_loss"])["step"]
    assert best < 4, "the loss should fall, so the largest eval_loss is before the last step"
    final = load_file(str(assets / "best" / "model.safetensors"))
    chosen = load_file(str(assets / "best" / f"checkpoint-{best}" / "model.safetensors"))
    assert all(torch.equal(final[k], chosen[k]) for k in chosen)
    assert set(checkpoints(assets, "best")) == {f"checkpoint-{best}", "checkpoint-4"}


def test_save_strategy_best_saves_only_improvements(assets):
    """--save_strategy best (metric: the loss, lower is better): a checkpoint exactly at each step whose
    eval_loss beat every earlier one; never at the last step (that state is the final model)."""
    assert cli.main(sft(assets, "savebest", "--max_steps", "4", "--learning_rate", "1e-2", "--eval_strategy",
                        "steps", "--eval_steps", "1", "--save_strategy", "best")) == 0
    evals = [r for r in records(assets, "savebest") if "eval_loss" in r]
    expected, best = [], float("inf")
    for r in evals:
        if r["eval_loss"] < best:
            best = r["eval_loss"]
            if r["step"] < 4:
                expected.append(f"checkpoint-{r['step']}")
    assert checkpoints(assets, "savebest") == expected and expected


# ---------------------------------------------------------------------- 4. trainer_state.json and Trainer checkpoints

def test_trainer_state_json_loads_in_transformers_and_resume_uses_our_own_file(assets):
    """Each checkpoint and the output folder hold a trainer_state.json that transformers' TrainerState loads, with
    the run's step, max_steps and log history (metrics.jsonl); the resume bookkeeping is nanopost_state.json, and
    resuming from checkpoint-2 continues to the same step count."""
    from transformers import TrainerState

    assert cli.main(sft(assets, "tstate", "--max_steps", "3", "--logging_steps", "1", "--save_steps", "2")) == 0
    folder = assets / "tstate" / "checkpoint-2"
    state = TrainerState.load_from_json(str(folder / "trainer_state.json"))
    assert (state.global_step, state.max_steps, [r["step"] for r in state.log_history]) == (2, 3, [1, 2])
    assert json.loads((folder / "nanopost_state.json").read_text())["micro_batches_seen"] == 2
    final = TrainerState.load_from_json(str(assets / "tstate" / "trainer_state.json"))
    assert final.global_step == 3 and final.log_history == records(assets, "tstate")
    assert cli.main(sft(assets, "tstate", "--max_steps", "3", "--logging_steps", "1", "--save_steps", "2",
                        "--resume_from_checkpoint", str(folder))) == 0
    assert [r["step"] for r in records(assets, "tstate")] == [1, 2, 3, 3]  # 3's train record, then its eval


def test_a_trainer_checkpoint_is_refused_saying_what_it_is(assets, tmp_path, capsys):
    """A folder as transformers' Trainer writes it (TrainerState.save_to_json, optimizer.pt, weights): one line
    naming it a Trainer checkpoint at its step, never "a None checkpoint"."""
    import shutil

    from transformers import TrainerState

    folder = tmp_path / "checkpoint-50"
    shutil.copytree(assets / "model", folder)
    TrainerState(global_step=50, epoch=1.0, log_history=[{"loss": 1.0, "step": 50}]).save_to_json(
        str(folder / "trainer_state.json"))
    (folder / "optimizer.pt").write_bytes(b"")
    assert cli.main(sft(assets, "fromtrl", "--max_steps", "1", "--resume_from_checkpoint", str(folder))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a transformers/TRL Trainer checkpoint at step 50" in err[0]
    assert "None" not in err[0]


def test_save_only_model_checkpoints_hold_weights_only_and_refuse_resume(assets, capsys):
    """--save_only_model: checkpoint-2 has the model but no optimizer.pt / scheduler.pt / rng_state.pth, and
    resuming from it stops with one line saying why (the optimizer state to continue exactly is missing)."""
    assert cli.main(sft(assets, "onlymodel", "--max_steps", "2", "--save_steps", "2", "--save_only_model")) == 0
    folder = assets / "onlymodel" / "checkpoint-2"
    assert (folder / "model.safetensors").is_file()
    assert not [n for n in ("optimizer.pt", "scheduler.pt", "rng_state.pth") if (folder / n).exists()]
    capsys.readouterr()
    assert cli.main(sft(assets, "onlymodel", "--max_steps", "3", "--resume_from_checkpoint", str(folder))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "saved with --save_only_model" in err[0]


# ---------------------------------------------------------------------- 3. drop_last and data_seed

def test_dataloader_drop_last_drops_the_short_last_batch(assets):
    """9 rows in batches of 2: 5 micro-batches an epoch (the last holds 1 row), 4 with --dataloader_drop_last, so
    one epoch is 4 optimizer steps instead of 5, and it ends at epoch 1.0 exactly."""
    assert cli.main(sft(assets, "droplast", "--num_train_epochs", "1", "--logging_steps", "1", "--save_steps", "0",
                        "--dataloader_drop_last")) == 0
    train_records = [r for r in records(assets, "droplast") if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4] and train_records[-1]["epoch"] == 1.0


def test_data_seed_sets_the_data_order_and_seed_the_rest(assets, monkeypatch):
    """--data_seed 11 with --seed 3: every epoch's order is drawn from 11 (+ epoch), as transformers' data_seed;
    without --data_seed it is --seed's. Recorded at engine.data_order.epoch_order."""
    from engine import data_order

    seeds = []
    real = data_order.epoch_order
    monkeypatch.setattr(data_order, "epoch_order", lambda n, seed, epoch: seeds.append(seed) or real(n, seed, epoch))
    assert cli.main(sft(assets, "dseed", "--max_steps", "6", "--seed", "3", "--data_seed", "11", "--save_steps",
                        "0")) == 0
    assert seeds == [11, 11]  # epochs 0 and 1 (6 steps of 5 per epoch)
    seeds.clear()
    assert cli.main(sft(assets, "dseed2", "--max_steps", "1", "--seed", "3", "--save_steps", "0")) == 0
    assert seeds == [3]


def test_best_model_needs_every_evaluation_saved_with_the_default_eval_steps(capsys):
    """--eval_steps not given evaluates every --logging_steps (10): --save_steps 15 would leave evaluated models
    unsaved, so the best could not be loaded; refused in one line (as transformers)."""
    assert cli.main(["--eval_strategy", "steps", "--load_best_model_at_end", "--save_steps", "15"]) == 2
    assert "--save_steps 15: must be a multiple of --eval_steps 10" in capsys.readouterr().err
