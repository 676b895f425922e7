"""TR-DPO (--sync_ref_model) and the LoRA flags --use_dora, --lora_modules_to_save, --lora_task_type, wired into
the engine (issue 10): parity with TRL 1.16 + PEFT 0.21.2, resume, and one-line refusals through the CLI.

TR-DPO parity reuses tests/test_parity_dpo.py's set-up (same tiny SmolLM3, tokenizer and 16 text pairs, lr 1e-2,
lock-step: each of our steps starts from TRL's weights, checked bit for bit) for 4 steps with
`ref_model_sync_steps` 2, so the reference moves after steps 2 and 4 and steps 3 and 4 are scored against a
synced reference. Tolerances are that file's (`_tolerance`: 1e-5 relative, with its scales for rewards/* and
logits/*; gradients 1e-5 of max|g|). The reference after the run is TRL's bit for bit: the sync is the same
`ref.mul_(1 - α).add_(policy, alpha=α)` applied to bit-identical weights.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train as cli
from engine import checkpoint as ckpt
from engine.config import parse_config
from engine.dpo import DPOMethod
from engine.errors import UserError
from engine.loop import train
from tests.test_parity_dpo import LOG_KEYS, RTOL, _mean_abs_logit, _tolerance, run_both
from tests.test_parity_dpo import assets as assets  # noqa: F401  (the parity module's fixture, reused)

TR_STEPS = 4
TR_SETTINGS = dict(max_steps=TR_STEPS, sync_ref_model=True, ref_model_sync_steps=2)


# ---------------------------------------------------------------------- TR-DPO parity with TRL


def _run_tr_dpo(assets, alpha: float):  # noqa: F811
    """TRL and ours (lock-step), 4 steps of TR-DPO; also our DPOMethod, for its reference."""
    methods: list[DPOMethod] = []
    original = DPOMethod.after_optimizer_step

    def recording(self, policy, global_step):
        methods.append(self)
        return original(self, policy, global_step)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DPOMethod, "after_optimizer_step", recording)
        trl_run, result, ours = run_both(assets, f"tr_dpo_{alpha}", ref_model_mixup_alpha=alpha, **TR_SETTINGS)
    return trl_run, result, ours, methods[0] if methods else None


def _assert_tr_dpo_parity(assets, trl_run, result, ours) -> dict[str, float]:  # noqa: F811
    """Every step: weights before it bitwise TRL's; every logged value and clipped gradient within the parity
    tolerances of tests/test_parity_dpo.py. Returns the worst error per key as a fraction of its allowance."""
    assert len(trl_run.logs) == len(result.logs) == len(ours["grads"]) == TR_STEPS
    worst: dict[str, float] = {}
    for step, (trl_log, our_log) in enumerate(zip(trl_run.logs, result.logs, strict=True), start=1):
        trl_state, our_state = trl_run.states_before[step - 1], ours["states_before"][step - 1]
        assert [k for k in trl_state if not torch.equal(our_state[k], trl_state[k])] == [], f"step {step}"
        logit_scale = _mean_abs_logit(assets, trl_run, step)
        for key in LOG_KEYS:
            allowed = _tolerance(key, trl_log, logit_scale)
            assert abs(our_log[key] - trl_log[key]) <= allowed, (step, key, our_log[key], trl_log[key])
            if allowed > 0:
                worst[key] = max(worst.get(key, 0.0), abs(our_log[key] - trl_log[key]) / allowed * RTOL)
        for name, expected in trl_run.grads[step - 1].items():
            scale = float(expected.abs().max())
            error = float((ours["grads"][step - 1][name] - expected).abs().max())
            assert error <= RTOL * scale, f"step {step}, grad of {name}: {error:.3g} vs max|g| {scale:.3g}"
            worst["grads"] = max(worst.get("grads", 0.0), error / scale if scale else 0.0)
    return worst


@pytest.mark.parametrize("alpha", [0.6, 1.0])
def test_tr_dpo_matches_trl_step_by_step(assets, alpha):  # noqa: F811
    """sync every 2 steps with α = 0.6 (TRL's default) and α = 1.0 (hard copy): logs, clipped gradients and the
    weights each step starts from match TRL's DPOTrainer(sync_ref_model=True); the final reference is TRL's bit for
    bit and differs from the starting model (the syncs happened)."""
    trl_run, result, ours, method = _run_tr_dpo(assets, alpha)
    worst = _assert_tr_dpo_parity(assets, trl_run, result, ours)
    print(f"\n[tr_dpo alpha={alpha}] worst |ours - TRL| / allowance x 1e-5: "
          + ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())))
    trl_reference = trl_run.trainer.ref_model.state_dict()
    our_reference = method.reference.model.state_dict()
    assert [k for k in trl_reference if not torch.equal(our_reference[k], trl_reference[k])] == []
    start = trl_run.states_before[0]
    assert not torch.equal(our_reference["model.norm.weight"], start["model.norm.weight"])


def test_tr_dpo_hard_sync_makes_the_policy_its_own_reference(assets):  # noqa: F811
    """α = 1 copies the policy into the reference after step 2, so step 3 starts with policy == reference:
    every log-ratio is 0, loss = -log σ(0) = ln 2 and the rewards are exactly 0 (as at step 1), in TRL and ours.
    Without the sync, step 3's rewards would be β·(logp - ref logp) of two steps of training, far from 0."""
    trl_run, result, _, _ = _run_tr_dpo(assets, 1.0)
    for logs in (trl_run.logs, result.logs):
        assert logs[2]["loss"] == pytest.approx(math.log(2), abs=1e-7)
        assert logs[2]["rewards/chosen"] == logs[2]["rewards/rejected"] == 0.0
        assert abs(logs[1]["rewards/margins"]) > 1e-3  # step 2: before the sync, the policy had moved


# ---------------------------------------------------------------------- TR-DPO resume and refusals


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tr_dpo") / "pairs.jsonl"
    rows = [{"prompt": f"What is {i} + 1?", "chosen": f" {i + 1}.", "rejected": f" {i + 2}."} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tr_dpo_flags(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """6 steps of 2 pairs, sync every 2 steps at α 0.6, a checkpoint every 3 steps."""
    return ["--method", "dpo", "--model_name_or_path", str(model_dir), "--dataset_name", str(data),
            "--output_dir", str(out), "--bf16", "False", "--disable_tqdm", "--seed", "42", "--logging_steps", "1",
            "--eval_steps", "0", "--per_device_train_batch_size", "2", "--max_steps", "6", "--save_steps", "3",
            "--learning_rate", "1e-3", "--report_to", "none", "--sync_ref_model", "--ref_model_sync_steps", "2",
            "--ref_model_mixup_alpha", "0.6", *extra]


class _Crash(Exception):
    pass


def test_tr_dpo_resume_equals_uninterrupted_run(tmp_path, tiny_model_dir, pairs_file):
    """A run that dies in step 4 and resumes from checkpoint-3 (the reference synced at step 2 is in its
    method_state.safetensors) logs every step and ends with the final model of the uninterrupted run, bit for bit.
    Steps 4-6 are scored against the synced reference, so a resume that lost it would differ."""
    reference_out, crashed_out = tmp_path / "whole", tmp_path / "crashed"
    assert cli.main(tr_dpo_flags(tiny_model_dir, pairs_file, reference_out)) == 0

    def die_at_step_4(step: int, model: torch.nn.Module) -> None:
        if step == 4:
            raise _Crash

    with pytest.raises(_Crash):
        train(parse_config(tr_dpo_flags(tiny_model_dir, pairs_file, crashed_out)), step_hook=die_at_step_4)
    checkpoint = crashed_out / "checkpoint-3"
    saved = ckpt.read_method_state(checkpoint)
    assert saved is not None and "model.norm.weight" in saved
    assert "method_state.safetensors" in json.loads((checkpoint / "manifest.json").read_text())["files"]
    assert cli.main(tr_dpo_flags(tiny_model_dir, pairs_file, crashed_out,
                                 "--resume_from_checkpoint", str(checkpoint))) == 0

    def records(out: Path) -> list[dict]:
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in records(crashed_out)] == list(range(1, 7))
    assert records(crashed_out) == records(reference_out)
    final, expected = (load_file(str(out / "model.safetensors")) for out in (crashed_out, reference_out))
    assert final.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(final[k], expected[k])] == []

    # The saved reference is the synced one: neither the starting model nor the policy of step 3.
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    policy_3 = load_file(str(checkpoint / "model.safetensors"))
    assert not torch.equal(saved["model.norm.weight"], start["model.norm.weight"])
    assert not torch.equal(saved["model.norm.weight"], policy_3["model.norm.weight"])

    # Without its reference weights the checkpoint is refused (the manifest names the missing file).
    damaged = tmp_path / "damaged" / "checkpoint-3"
    shutil.copytree(checkpoint, damaged)
    (damaged / "method_state.safetensors").unlink()
    with pytest.raises(UserError, match="method_state.safetensors is missing"):
        train(parse_config(tr_dpo_flags(tiny_model_dir, pairs_file, tmp_path / "damaged",
                                        "--resume_from_checkpoint", str(damaged))))


@pytest.mark.parametrize("extra,message", [
    (["--loss_type", "simpo"], "uses no reference model, so there is none to sync"),
    (["--use_peft"], "needs a separate reference model"),
    (["--precompute_ref_log_probs", "True"], "needs a separate reference model"),
    (["--ref_model_sync_steps", "0"], "must be >= 1"),
    (["--ref_model_mixup_alpha", "1.5"], "must be in [0, 1]"),
])
def test_tr_dpo_refusals_are_one_line(tmp_path, tiny_model_dir, pairs_file, capsys, extra, message):
    """Combinations TR-DPO cannot run: exit 2, one line saying why, nothing trained."""
    assert cli.main(tr_dpo_flags(tiny_model_dir, pairs_file, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --") and message in err and "\n" not in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_tr_dpo_refuses_a_reference_of_another_architecture(tmp_path, tiny_model_dir, pairs_file, capsys):
    """--ref_model_name_or_path with other shapes cannot be mixed with the policy: refused before step 1."""
    from transformers import AutoTokenizer

    from engine.model import build_tiny_smollm3

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    build_tiny_smollm3(tokenizer, hidden_size=48, intermediate_size=64, num_hidden_layers=2).save_pretrained(
        tmp_path / "wider")
    argv = tr_dpo_flags(tiny_model_dir, pairs_file, tmp_path / "out", "--ref_model_name_or_path",
                        str(tmp_path / "wider"))
    assert cli.main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (above it: the loading progress bars)
    assert last.startswith("error: --sync_ref_model") and "has another architecture than the policy" in last
    assert not list((tmp_path / "out").glob("checkpoint-*"))
