"""Self-contained pieces that the restructured loop wires in (issue 9, phase 2), each checked against the TRL /
transformers code it replaces: the --optim factory, NEFTune noise, the TR-DPO reference sync, trainer_state.json
and Trainer-checkpoint recognition, and --max_prompt_length."""

import copy
import json

import pytest
import torch
from torch import nn

from data.dpo import truncate_prompt
from engine.config import parse_config
from engine.errors import UserError
from engine.neftune import add_neftune_hook, neftune_noise
from engine.optim import build_optimizer
from engine.ref_sync import should_sync, sync_reference
from engine.trl_checkpoint import (
    checkpoint_kind,
    describe_trainer_checkpoint,
    refuse_trainer_checkpoint,
    write_trainer_state,
)


def _params():
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))]


@pytest.mark.parametrize("optim, optim_args", [
    ("adamw_torch_fused", None), ("adamw_torch", None), ("sgd", "momentum=0.9,nesterov=True"),
    ("adagrad", "lr_decay=0.01"), ("rmsprop", "momentum=0.5,centered=True,alpha=0.9"),
])
def test_optimizer_matches_transformers(optim, optim_args, tmp_path):
    """Same class and the same hyperparameters as transformers' Trainer.get_optimizer_cls_and_kwargs for the same
    --optim / --optim_args / learning rate / Adam settings."""
    from transformers import Trainer, TrainingArguments

    flags = ["--optim", optim, "--learning_rate", "3e-4", "--adam_beta2", "0.95", "--adam_epsilon", "1e-6"]
    config = parse_config(flags + (["--optim_args", optim_args] if optim_args else []))
    ours = build_optimizer([{"params": _params(), "weight_decay": 0.0}], config)
    args = TrainingArguments(output_dir=str(tmp_path), optim=optim, optim_args=optim_args, learning_rate=3e-4,
                             adam_beta2=0.95, adam_epsilon=1e-6, report_to=[])
    their_class, their_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    theirs = their_class([{"params": _params(), "weight_decay": 0.0}], **their_kwargs)
    assert type(ours) is type(theirs)
    assert ours.defaults == theirs.defaults


def test_optim_args_errors():
    with pytest.raises(UserError, match=r"--optim_args 'betas=1': 'betas=1' is not key=value for sgd"):
        parse_config(["--optim", "sgd", "--optim_args", "betas=1"])
    with pytest.raises(UserError, match="momentum must be a number"):
        parse_config(["--optim", "sgd", "--optim_args", "momentum=lots"])


def test_neftune_noise_is_transformers_noise_bit_for_bit():
    """From the same RNG state our hook and transformers' neftune_post_forward_hook give identical embeddings
    (same bound alpha / sqrt(L * d) in float32, same uniform_ draw); in eval mode the embeddings are clean."""
    from transformers.integrations.neftune import neftune_post_forward_hook

    embedding = nn.Embedding(50, 16)
    ids = torch.randint(0, 50, (2, 7))
    model = nn.Module()
    model.get_input_embeddings = lambda: embedding
    handle = add_neftune_hook(model, alpha=5.0)
    torch.manual_seed(1)
    ours = embedding(ids)
    handle.remove()

    embedding.neftune_noise_alpha = 5.0
    handle = embedding.register_forward_hook(neftune_post_forward_hook)
    torch.manual_seed(1)
    theirs = embedding(ids)
    handle.remove()
    assert torch.equal(ours, theirs)
    clean = embedding(ids)
    assert 0 < (ours - clean).abs().max() <= 5.0 / (7 * 16) ** 0.5

    add_neftune_hook(model, alpha=5.0)
    embedding.eval()
    assert torch.equal(embedding(ids), clean)


def test_neftune_noise_shape_and_bound():
    noise = neftune_noise(torch.zeros(3, 10, 8), alpha=10.0)
    assert noise.shape == (3, 10, 8) and noise.abs().max() <= 10.0 / (10 * 8) ** 0.5


def test_tr_dpo_sync_matches_trl():
    """θ_ref ← α θ_policy + (1 − α) θ_ref, as TRL's SyncRefModelCallback._sync_target_model (α = 0.6); α = 1 copies."""
    from trl.trainer.callbacks import SyncRefModelCallback

    torch.manual_seed(0)
    policy, reference = nn.Linear(5, 3), nn.Linear(5, 3)
    ours, theirs = copy.deepcopy(reference), copy.deepcopy(reference)
    sync_reference(policy, ours, alpha=0.6)
    SyncRefModelCallback._sync_target_model(policy, theirs, 0.6)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    sync_reference(policy, ours, alpha=1.0)
    assert torch.equal(ours.weight, policy.weight)
    assert [step for step in range(1, 11) if should_sync(step, 4)] == [4, 8]  # TRL: global_step % sync_steps == 0


def test_trainer_state_loads_in_transformers(tmp_path):
    """transformers' TrainerState.load_from_json reads our trainer_state.json: step, epoch, history, best model."""
    from transformers import TrainerState

    config = parse_config(["--logging_steps", "2", "--save_steps", "4", "--per_device_train_batch_size", "3"])
    history = [{"step": 2, "loss": 1.5, "learning_rate": 1e-5}, {"step": 4, "eval_loss": 1.25}]
    write_trainer_state(tmp_path, global_step=4, epoch=0.5, max_steps=8, num_train_epochs=1, log_history=history,
                        config=config, best_metric=1.25, best_global_step=4,
                        best_model_checkpoint=str(tmp_path / "checkpoint-4"))
    state = TrainerState.load_from_json(str(tmp_path / "trainer_state.json"))
    assert (state.global_step, state.epoch, state.max_steps, state.logging_steps) == (4, 0.5, 8, 2)
    assert (state.save_steps, state.train_batch_size, state.best_metric) == (4, 3, 1.25)
    assert state.log_history == history
    assert checkpoint_kind(tmp_path) == "trainer"


def test_checkpoint_kinds(tmp_path):
    """Ours (old layout: our keys in trainer_state.json; new: nanopost_state.json), a Trainer's, or neither."""
    ours_old = tmp_path / "old"
    ours_old.mkdir()
    (ours_old / "trainer_state.json").write_text(json.dumps({"global_step": 3, "method": "sft"}))
    ours_new = tmp_path / "new"
    ours_new.mkdir()
    (ours_new / "nanopost_state.json").write_text("{}")
    trainer = tmp_path / "checkpoint-500"
    trainer.mkdir()
    (trainer / "trainer_state.json").write_text(json.dumps({"global_step": 500, "epoch": 1.0, "log_history": []}))
    for name in ("optimizer.pt", "scheduler.pt", "model.safetensors"):
        (trainer / name).write_bytes(b"")
    assert [checkpoint_kind(p) for p in (ours_old, ours_new, trainer, tmp_path)] == ["nanopost", "nanopost",
                                                                                     "trainer", None]
    assert describe_trainer_checkpoint(trainer) == (
        "a transformers/TRL Trainer checkpoint at step 500 (epoch 1; full model; optimizer.pt, scheduler.pt)")
    with pytest.raises(UserError, match=r"checkpoint-500: a transformers/TRL Trainer checkpoint at step 500 .*"
                                        r"--model_name_or_path .*checkpoint-500$"):
        refuse_trainer_checkpoint(trainer)
    refuse_trainer_checkpoint(ours_old)  # ours: no objection


def test_max_prompt_length_keeps_the_end_of_the_prompt():
    """TRL < 1.0: prompt_input_ids[-max_prompt_length:]."""
    assert truncate_prompt([1, 2, 3, 4, 5], 3) == [3, 4, 5]
    assert truncate_prompt([1, 2], 3) == [1, 2] and truncate_prompt([1, 2], None) == [1, 2]
