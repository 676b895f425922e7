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
from tests.test_parity_dpo import assets as assets  # noqa: F401  (the parity modules' fixtures, reused)
from tests.test_parity_lora import llama_dir as llama_dir  # noqa: F401
from tests.test_parity_lora import workdir as workdir  # noqa: F401

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

    # Resumed without --sync_ref_model, the saved reference would be dropped: refused.
    plain = [a for a in tr_dpo_flags(tiny_model_dir, pairs_file, tmp_path / "plain", "--resume_from_checkpoint",
                                     str(checkpoint)) if a != "--sync_ref_model"]
    with pytest.raises(UserError, match="the checkpoint holds a TR-DPO reference"):
        train(parse_config(plain))

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


# ---------------------------------------------------------------------- DoRA and modules_to_save vs PEFT 0.21.2


def _peft_and_ours(arch: str, dtype=torch.float32, dropout: float = 0.0, **extra):
    """(ours, PEFT's) from one tiny base model, seeded identically, DoRA on q_proj / v_proj (plus `extra`)."""
    import copy

    from peft import LoraConfig, get_peft_model

    from lora import LoRAConfig, inject_lora
    from tests.test_lora import tiny_model

    base = tiny_model(arch, dtype)
    torch.manual_seed(1)
    ours = inject_lora(copy.deepcopy(base), LoRAConfig(r=4, alpha=8, dropout=dropout,
                                                       target_modules=["q_proj", "v_proj"], use_dora=True, **extra))
    torch.manual_seed(1)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"], use_dora=True,
        task_type="CAUSAL_LM", modules_to_save=extra.get("modules_to_save")))
    return ours, theirs


def _peft_key(our_name: str) -> str:
    """Our parameter name -> PEFT's: prefix, and the adapter name before the last part."""
    head, _, last = our_name.rpartition(".")
    return f"base_model.model.{head}.default.{last}"


def _perturb(ours, theirs, seed: int = 3) -> None:
    """The same random nonzero A, B, magnitude and copy in both (a fresh DoRA adapter is the base model)."""
    generator = torch.Generator().manual_seed(seed)
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator).to(param.dtype))
                theirs_params[_peft_key(name)].copy_(param)


@pytest.mark.parametrize("arch,dtype", [("smollm3", torch.float32), ("llama", torch.float32),
                                        ("llama", torch.bfloat16)])
def test_dora_init_forward_and_backward_equal_peft(arch, dtype):
    """Same seed: bit-identical A, zero B and magnitude m = ‖W‖_row (fp32 on a bf16 base, as PEFT upcasts it).
    With the same random A, B, m, both models give bit-identical logits and gradients (same operations in the same
    order, including the detached norm), in training mode too (dropout 0: PEFT's no-dropout path)."""
    ours, theirs = _peft_and_ours(arch, dtype)
    theirs_params = dict(theirs.named_parameters())
    trainable = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert {n for n, p in theirs.named_parameters() if p.requires_grad} == {_peft_key(n) for n in trainable}
    for name, param in trainable.items():
        assert param.dtype == torch.float32
        assert torch.equal(param, theirs_params[_peft_key(name)]), name
        if name.endswith("lora_magnitude_vector.weight"):
            module = ours.get_submodule(name.removesuffix(".lora_magnitude_vector.weight"))
            assert torch.equal(param, torch.linalg.norm(module.base_layer.weight, dim=1).float())
    _perturb(ours, theirs)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    for model in (ours, theirs):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    for name, param in trainable.items():
        assert torch.equal(param.grad, theirs_params[_peft_key(name)].grad), name


def test_dora_with_dropout_equals_peft_given_the_same_masks():
    """Dropout 0.2 in training mode: PEFT recomputes W·dropout(x) for the magnitude term; so do we. Same RNG
    state before each forward -> same masks -> bit-identical loss and gradients."""
    ours, theirs = _peft_and_ours("llama", dropout=0.2)
    _perturb(ours, theirs)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    losses = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(7)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    theirs_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        if param.requires_grad:
            assert torch.equal(param.grad, theirs_params[_peft_key(name)].grad), name


def test_dora_and_modules_to_save_adapter_loads_in_peft_and_back(tmp_path):
    """save_adapter with DoRA + modules_to_save [lm_head, embed_tokens]: PEFT's `PeftModel.from_pretrained` loads it
    (keys lora_magnitude_vector and lm_head.weight / model.embed_tokens.weight; use_dora true and modules_to_save in
    adapter_config.json) and gives our logits exactly; PEFT's own save of the same model has the same keys and
    config fields, and our load_adapter loads it back to the same logits. With the adapters off, both are the base
    model (the copies switched off too)."""
    from peft import PeftModel

    from lora import disable_adapters, load_adapter, save_adapter
    from tests.test_lora import tiny_model

    ours, theirs = _peft_and_ours("llama", modules_to_save=["lm_head", "embed_tokens"])
    _perturb(ours, theirs)
    ours.eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = ours(input_ids=ids).logits
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["modules_to_save"] == ["lm_head", "embed_tokens"]
    assert config["task_type"] == "CAUSAL_LM"
    keys = set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"} <= keys

    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours").eval()
    assert torch.equal(loaded(input_ids=ids).logits, expected)
    theirs.eval().save_pretrained(tmp_path / "peft")
    assert set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))) == keys
    back = load_adapter(tiny_model("llama"), tmp_path / "peft").eval()
    assert torch.equal(back(input_ids=ids).logits, expected)
    base_logits = tiny_model("llama")(input_ids=ids).logits
    with torch.no_grad(), disable_adapters(back):
        assert torch.equal(back(input_ids=ids).logits, base_logits)
    with loaded.disable_adapter():
        assert torch.equal(loaded(input_ids=ids).logits, base_logits)
    assert not torch.equal(expected, base_logits)


def test_dora_merge_gives_the_adapted_model():
    """--merge_adapter with DoRA: W <- m/‖W + s·B·A‖_row · (W + s·B·A) computes what the adapter computes (fp32
    rounding: 1e-6), and unmerge gives W back (1e-6)."""
    from lora import merge_lora, unmerge_lora

    ours, theirs = _peft_and_ours("llama")
    _perturb(ours, theirs)
    ours.eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    before = ours(input_ids=ids).logits
    weight = ours.get_submodule("model.layers.0.self_attn.q_proj").base_layer.weight.clone()
    merge_lora(ours)
    torch.testing.assert_close(ours(input_ids=ids).logits, before, rtol=1e-6, atol=1e-6)
    unmerge_lora(ours)
    torch.testing.assert_close(ours.get_submodule("model.layers.0.self_attn.q_proj").base_layer.weight, weight,
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- LoRA-DPO with DoRA + modules_to_save vs TRL


def test_lora_dpo_with_dora_and_modules_to_save_matches_trl_peft(workdir, tokenizer, tokenizer_dir, llama_dir):  # noqa: F811
    """`--use_peft --use_dora --lora_modules_to_save lm_head` DPO (sigmoid, Llama, 3 steps, batch 2 x accumulation
    2, across an epoch boundary) against TRL's DPOTrainer with PEFT's LoraConfig(use_dora=True,
    modules_to_save=["lm_head"]), lock-step as tests/test_parity_lora.py: same initial adapter, magnitude and
    lm_head copy bit for bit; every logged value (1e-5 relative, rewards with that file's floor) and every clipped
    gradient (1e-5 of max|g|: A, B, magnitudes and the lm_head copy) each step; the saved adapter is TRL's final
    one bit for bit (our optimizer applied TRL's gradients). The reference is the model with adapters AND the
    lm_head copy off: step 1's loss is ln 2 in both."""
    from datasets import Dataset
    from peft import LoraConfig

    from tests.test_parity_lora import (
        DPO_BETA,
        DPO_MAX_GRAD_NORM,
        LORA_ALPHA,
        LORA_R,
        LR,
        SEED,
        TARGETS,
        assert_logs_match,
        assert_tensors_match,
        dpo_rows,
        our_name,
        run_ours,
        write_jsonl,
    )
    from tests.trl_harness import run_trl_dpo

    peft = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(TARGETS),
                      task_type="CAUSAL_LM", use_dora=True, modules_to_save=["lm_head"])
    trl_run = run_trl_dpo(llama_dir, tokenizer, Dataset.from_list(dpo_rows()), peft_config=peft,
                          per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
                          learning_rate=LR, beta=DPO_BETA, max_grad_norm=DPO_MAX_GRAD_NORM, seed=SEED)
    trl_grads = [{our_name(k): v for k, v in step.items()} for step in trl_run.grads]
    ours = run_ours("dpo", llama_dir, tokenizer_dir, write_jsonl(workdir / "dpo_dora.jsonl", dpo_rows()),
                    workdir / "out_dpo_dora", 3, DPO_MAX_GRAD_NORM,
                    extra=["--beta", str(DPO_BETA), "--use_dora", "--lora_modules_to_save", "lm_head"],
                    lockstep_grads=trl_grads)
    trainable = {our_name(k) for k in trl_grads[0]}
    assert "lm_head.modules_to_save.weight" in trainable
    assert any(k.endswith("lora_magnitude_vector.weight") for k in trainable)
    assert ours["trainable"][0] == trainable

    for step, trl_state in enumerate(trl_run.states_before):
        trl_state = {our_name(k): v for k, v in trl_state.items() if our_name(k) in trainable}
        ours_state = ours["states_before"][step]
        assert [k for k in ours_state if not torch.equal(ours_state[k], trl_state[k])] == [], f"step {step + 1}"
    log_error = assert_logs_match(trl_run.logs, ours["result"].logs)
    grad_error = max(assert_tensors_match(trl_grads[step], ours["grads"][step], f"step {step + 1} grad")
                     for step in range(3))
    print(f"\n[LoRA-DPO DoRA + modules_to_save] worst relative error: logs {log_error:.2e}, grads {grad_error:.2e}")
    assert trl_run.logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert ours["result"].logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)

    # The saved adapter (PEFT's key names) is TRL's final state bit for bit.
    final_trl = {our_name(k): v for k, v in trl_run.final_state_dict.items()}
    for key, value in ours["final"].items():
        name = key + ".weight" if key.endswith("lora_magnitude_vector") else key
        name = "lm_head.modules_to_save.weight" if name == "lm_head.weight" else name
        assert torch.equal(value, final_trl[name]), key
    assert not torch.equal(final_trl["lm_head.modules_to_save.weight"], final_trl["lm_head.original_module.weight"])


# ---------------------------------------------------------------------- LoRA flags through the CLI, and resume


def lora_sft_flags(model_dir: Path, tokenizer_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """6 SFT steps of 2 rows with DoRA and a trained lm_head copy, a checkpoint every 3 steps."""
    return ["--method", "sft", "--model_name_or_path", str(model_dir), "--tokenizer_name_or_path", str(tokenizer_dir),
            "--dataset_name", str(data), "--output_dir", str(out), "--bf16", "False", "--disable_tqdm",
            "--seed", "42", "--logging_steps", "1", "--eval_steps", "0", "--per_device_train_batch_size", "2",
            "--max_steps", "6", "--save_steps", "3", "--learning_rate", "1e-2", "--report_to", "none",
            "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0",
            "--lora_target_modules", "q_proj", "v_proj", "--use_dora", "--lora_modules_to_save", "lm_head",
            "--lora_task_type", "CAUSAL_LM", *extra]


def test_dora_modules_to_save_run_resumes_exactly_and_loads_in_peft(tmp_path, llama_dir, tokenizer_dir):  # noqa: F811
    """Through the CLI: a DoRA + modules_to_save SFT run that dies in step 4 and resumes from checkpoint-3 ends
    with the uninterrupted run's logs and adapter bit for bit (magnitudes and lm_head copy included). The final
    adapter loads with PeftModel.from_pretrained and gives our logits exactly; --merge_adapter's merged model gives
    them up to fp32 rounding of the merge (1e-5)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora import load_adapter

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"text": f"count {i} to {i + 3}: " + " ".join(map(str, range(i, i + 4)))})
                            + "\n" for i in range(12)))
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    assert cli.main(lora_sft_flags(llama_dir, tokenizer_dir, data, whole, "--merge_adapter")) == 0

    def die_at_step_4(step: int, model: torch.nn.Module) -> None:
        if step == 4:
            raise _Crash

    with pytest.raises(_Crash):
        train(parse_config(lora_sft_flags(llama_dir, tokenizer_dir, data, crashed)), step_hook=die_at_step_4)
    assert cli.main(lora_sft_flags(llama_dir, tokenizer_dir, data, crashed, "--merge_adapter",
                                   "--resume_from_checkpoint", str(crashed / "checkpoint-3"))) == 0
    records = [[json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
               for out in (whole, crashed)]
    assert [r["step"] for r in records[1]] == list(range(1, 7)) and records[0] == records[1]
    expected, resumed = (load_file(str(out / "adapter_model.safetensors")) for out in (whole, crashed))
    assert expected.keys() == resumed.keys() and "base_model.model.lm_head.weight" in expected
    assert [k for k in expected if not torch.equal(expected[k], resumed[k])] == []
    assert json.loads((whole / "adapter_config.json").read_text())["use_dora"] is True

    ids = torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(llama_dir), whole).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), whole).eval()
    merged = AutoModelForCausalLM.from_pretrained(whole / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        logits = ours(input_ids=ids).logits
        assert torch.equal(peft(input_ids=ids).logits, logits)
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base(input_ids=ids).logits, logits, atol=1e-3)  # the adapter trained


@pytest.mark.parametrize("extra,message", [
    (["--lora_task_type", "SEQ_CLS"], "--lora_task_type 'SEQ_CLS': must be CAUSAL_LM"),
    (["--use_dora"], "--use_dora True: is a LoRA option; add --use_peft"),
    (["--lora_modules_to_save", "lm_head"], "is a LoRA option; add --use_peft"),
    (["--use_peft", "--lora_modules_to_save", "lm_head"], "shares its weight with 'model.embed_tokens.weight'"),
    (["--use_peft", "--lora_modules_to_save", "no_such_module"], "match no module"),
])
def test_lora_flag_refusals_are_one_line(tmp_path, tiny_model_dir, capsys, extra, message):
    """Bad LoRA flags: exit 2 and one `error:` line (the tiny SmolLM3 ties lm_head to the embeddings, so training
    a separate lm_head copy would untie them: refused, not done silently)."""
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"text": "one two three"}) + "\n")
    argv = ["--method", "sft", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data),
            "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--disable_tqdm", "--report_to", "none",
            "--bf16", "False",
            *extra]
    assert cli.main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_check_can_sync_refuses_kinds_that_cannot_follow(tiny_model_dir):
    """The reference kinds TR-DPO cannot move, each one line: adapters off (TRL refuses PEFT too), precomputed
    log-probs, and a sharded policy (FSDP / DeepSpeed, which a CPU run cannot launch: a stand-in accelerator)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from transformers import AutoModelForCausalLM

    from engine.forward import LeanCausalLM
    from engine.reference import AdaptersOff, FrozenModel, Precomputed, check_can_sync

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    policy = LeanCausalLM(model)
    plain = SimpleNamespace(distributed_type=DistributedType.NO)
    with pytest.raises(UserError, match="--sync_ref_model: with --use_peft the reference is the base model"):
        check_can_sync(AdaptersOff(policy, None), policy, plain, None)
    with pytest.raises(UserError, match="--sync_ref_model: precomputed reference log-probs are fixed"):
        check_can_sync(Precomputed, policy, plain, None)
    frozen = FrozenModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir), None, torch.device("cpu"))
    check_can_sync(frozen, policy, plain, None)  # a copy of the policy's architecture: fine
    with pytest.raises(UserError, match="--sync_ref_model with FSDP is not supported"):
        check_can_sync(frozen, policy, SimpleNamespace(distributed_type=DistributedType.FSDP), None)
