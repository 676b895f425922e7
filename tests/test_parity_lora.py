"""Training parity with TRL 1.16 + PEFT 0.21 for LoRA: SFT and DPO, step by step.

TRL (its SFTTrainer / DPOTrainer with `peft_config=LoraConfig(...)`, recorded by tests/trl_harness.py) and our
`engine.loop.train(... --use_peft ...)` train the SAME saved tiny model with the SAME tokenizer folder and rows for
a few steps on CPU in fp32, and must agree on:

- the initial adapter weights, bit for bit: both call set_seed(seed), load the model (no RNG), then create the
  adapters in `named_modules()` order with PEFT's init (kaiming-uniform A, zero B);
- every logged value per step (loss and every metric TRL logs, grad_norm, learning_rate, epoch, num_tokens);
- the clipped gradients of every adapter parameter each step (only adapter parameters have gradients);
- the final adapter (ours read back from <output_dir>/adapter_model.safetensors): on each side it is exactly
  fused AdamW applied to the clipped gradients that side's optimizer got and its learning rates (see
  `assert_final_adapter` for why the two free-run SFT adapters are not compared entry by entry at 1e-5); DPO
  runs lock-step (below), so its adapter before every step and its final adapter are TRL's, bit for bit.

DPO lock-step: our run records its clipped gradients and adapter weights each step, then hands the optimizer TRL's
clipped gradients of that step, so every step starts from TRL's weights (as tests/test_parity_dpo.py). Why: a free
run carries step 1's last-bit gradient rounding into step 2's weights, and Adam amplifies it. Step 1 (same initial
weights) agrees to 3.6e-7 of max|g|; in a free run (measured on an AMX / AVX-512-bf16 Xeon, one thread as in the
suite) the adapters after step 1 differ by up to 2.35e-6 (Adam moves an entry by lr * g / (|g| + 1e-8), a slope of
lr / (4e-8) for the entries whose |g| ~ 1e-8), and the clipped gradients of model.layers.1.self_attn.q_proj.lora_A
then differ by 9.8e-6 of max|g| at step 2 and 1.76e-5 at step 3 (over the 1e-5 bound). From TRL's weights
(lock-step) the same steps agree to 3.6e-7 (step 2) and 4.3e-7 (step 3), with the logs at <= 15% of their allowance
(4 threads: free 1.78e-5, lock-step 8.6e-7): rounding amplified through the update, not a computation difference.
Lock-step keeps the proof: step-1 gradients equal TRL's within the bound, our optimizer turns TRL's gradients into
TRL's adapter exactly (checked bitwise every step and in the saved adapter), and every later step's gradients,
computed at TRL's weights, equal TRL's within the bound.

DPO uses no second model: the reference is the policy with its adapters switched off (TRL: `use_adapter(model,
None)`; ours: `lora.disable_adapters`).

Tolerance rule (the issue's "1e-5 relative", as in test_parity_sft.py): scalars `|ours - trl| <= 1e-5 * |trl|`,
tensors `max|ours - trl| <= 1e-5 * max|trl|` per parameter (a zero tensor must then be exactly zero: the lora_A
gradients of step 1, where B = 0). Not bitwise because TRL's fused LM head chunks and reduces in another order
(observed: up to ~3e-6 on gradients, ~2e-7 on losses). DPO's rewards/* are small differences of large summed
log-probs, so they get an absolute floor of beta x 4 fp32 roundings of those log-probs (`reward_floor`).

LoRA dropout: TRL draws its dropout masks from a global RNG stream that our loop does not reproduce, see
`test_sft_lora_dropout_masks_match_trl_given_trls_rng_stream` for the exact difference and what matches.

Settings: r 8, alpha 16, targets q_proj and v_proj; lr 1e-2 (B must move far from 0 for step 2+ to depend on
step 1's update); a `max_grad_norm` below the gradient norm (asserted) so clipping is exercised; batch 2 x
accumulation 2; runs that cross an epoch boundary (a fresh permutation: seed + 1).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from engine.config import parse_config
from engine.dpo import DPOMethod
from engine.loop import train
from engine.reference import AdaptersOff
from engine.sft import SFTMethod
from lora import lora_parameters
from tests.trl_harness import TrlRun, make_tiny_model_dir, run_trl_dpo

REL_TOL = 1e-5
SEED = 42
LORA_R, LORA_ALPHA, TARGETS = 8, 16, ["q_proj", "v_proj"]
LR = 1e-2
WORDS = ["hello", "world", "good", "morning", "night", "blue", "red", "colour", "two", "four", "fox", "dog"]

SFT_ROWS = 12  # batch 2 x accumulation 2: 6 micro-batches, 3 steps per epoch; 4 steps cross into epoch 1
SFT_STEPS = 4
SFT_MAX_GRAD_NORM = 0.05
DPO_ROWS = 8  # batch 2 x accumulation 2: 2 steps per epoch; 3 steps cross into epoch 1
DPO_STEPS = 3
DPO_MAX_GRAD_NORM = 0.1
DPO_BETA = 0.1


def sft_rows() -> list[dict]:
    return [{"text": " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(2 + i % 6)) + f" {i}"}
            for i in range(SFT_ROWS)]


def dpo_rows() -> list[dict]:
    return [
        {
            "prompt": f"What is {WORDS[i % len(WORDS)]} {i}?",
            "chosen": " " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 4)),
            "rejected": " " + " ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(2 + i % 3)),
        }
        for i in range(DPO_ROWS)
    ]


def peft_config(dropout: float = 0.0):
    from peft import LoraConfig

    return LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=dropout, target_modules=list(TARGETS),
                      task_type="CAUSAL_LM")


def our_name(peft_name: str) -> str:
    """PEFT's parameter name -> ours: "base_model.model.X.lora_A.default.weight" -> "X.lora_A.weight"."""
    return peft_name.removeprefix("base_model.model.").replace(".default.", ".")


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The lora_A / lora_B entries of a PEFT model's state_dict, under our names."""
    return {our_name(k): v for k, v in state.items() if ".lora_" in k}


# ---------------------------------------------------------------------- comparisons


def scalar_error(ours: float, trl: float) -> float:
    """|ours - trl| / |trl| (0 when both are 0; inf when only trl is 0 and ours is not)."""
    if trl == 0:
        return 0.0 if ours == 0 else math.inf
    return abs(ours - trl) / abs(trl)


def tensor_error(ours: torch.Tensor, trl: torch.Tensor) -> float:
    """max|ours - trl| / max|trl| (0 when both are all-zero)."""
    diff = (ours.double() - trl.double()).abs().max().item()
    scale = trl.double().abs().max().item()
    if scale == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / scale


FP32_EPS = torch.finfo(torch.float32).eps


def reward_floor(trl_log: dict) -> float:
    """Absolute error allowed on DPO's rewards/* (on top of 1e-5 relative): beta x 4 fp32 roundings of the logps.

    A reward is beta * (logp - ref_logp), a difference of two summed log-probs of size ~50-80 that each carry fp32
    rounding (~1 ulp = 4e-6 to 8e-6 there; TRL's fused head and ours sum the tokens in another order). The reward
    itself is small (~1e-2), so that rounding, times beta, is up to ~2e-5 of it (observed: logps/chosen 1.9e-6
    apart = half an ulp at 53, rewards/chosen 1.9e-7 apart = beta x that). The logps themselves are held to 1e-5.
    """
    logps = max(abs(trl_log.get("logps/chosen", 0.0)), abs(trl_log.get("logps/rejected", 0.0)))
    return DPO_BETA * 4 * FP32_EPS * logps


def assert_logs_match(trl_logs: list[dict], our_logs: list[dict]) -> float:
    """Every key TRL logs, every step, within 1e-5 relative (rewards/*: plus `reward_floor`); returns the worst
    relative error."""
    assert len(our_logs) == len(trl_logs)
    worst = 0.0
    for trl_log, our_log in zip(trl_logs, our_logs, strict=True):
        assert our_log["step"] == trl_log["step"]
        missing = set(trl_log) - set(our_log)
        assert not missing, f"step {trl_log['step']}: we do not log {sorted(missing)}"
        for key, value in trl_log.items():
            floor = reward_floor(trl_log) if key.startswith("rewards/") else 0.0
            difference = abs(float(our_log[key]) - float(value))
            assert difference <= REL_TOL * abs(value) + floor, (
                f"step {trl_log['step']} {key}: ours {our_log[key]!r} TRL {value!r}")
            worst = max(worst, scalar_error(float(our_log[key]), float(value)))
    return worst


def adamw_replay(initial: dict[str, torch.Tensor], grads: list[dict[str, torch.Tensor]],
                 learning_rates: list[float]) -> dict[str, torch.Tensor]:
    """The adapter after feeding `grads` (per step) to fused AdamW (TRL's `adamw_torch_fused`: betas 0.9/0.999,
    eps 1e-8, weight decay 0) from `initial`, at the given per-step learning rates."""
    params = {name: torch.nn.Parameter(value.clone()) for name, value in initial.items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=learning_rates[0], betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0, fused=True)
    for step_grads, lr in zip(grads, learning_rates, strict=True):
        optimizer.param_groups[0]["lr"] = lr
        for name, param in params.items():
            param.grad = step_grads[name].clone()
        optimizer.step()
    return {name: param.detach() for name, param in params.items()}


def assert_final_adapter(trl_run: TrlRun, ours: dict) -> None:
    """Each side's final adapter is exactly fused AdamW over the clipped grads its optimizer got (ours: our own
    grads, or TRL's in a lock-step run) and its logged learning rates.

    With the per-step gradients already shown equal to TRL's (1e-5) and the initial adapters bit-identical, this
    pins the rest: our optimizer update is TRL's, and our saved adapter is exactly what it produced (in lock-step
    that makes it TRL's final adapter bit for bit, checked). The two final adapters of a free run are NOT compared
    entry by entry at 1e-5: at lora_A's first non-zero gradient (step 2; step 1's is 0)
    Adam moves each entry by lr * g / (|g| + 1e-8), so an entry with |g| ~ 1e-8 turns the last-bit rounding of g
    (1e-7 of the tensor's max, a 0.3% change of that g) into a visible change of its update (seen in a free DPO run: one of
    512 entries of one lora_A, 1.9e-6 apart = 1.4e-5 of the tensor's max; replaying each side's grads reproduces
    each side's adapter bit for bit).
    """
    trl_grads = [{our_name(k): v for k, v in step.items()} for step in trl_run.grads]
    trl_final = adapter_state(trl_run.final_state_dict)
    trl_replayed = adamw_replay(adapter_state(trl_run.states_before[0]), trl_grads, trl_run.learning_rates)
    assert all(torch.equal(trl_replayed[name], value) for name, value in trl_final.items())
    our_lrs = [log["learning_rate"] for log in ours["result"].logs]
    assert our_lrs == trl_run.learning_rates
    our_replayed = adamw_replay(ours["initial"], ours["applied"], our_lrs)
    assert set(ours["final"]) == set(trl_final)
    assert all(torch.equal(our_replayed[name], value) for name, value in ours["final"].items())
    if ours["applied"] is not ours["grads"]:  # lock-step: our optimizer got TRL's grads, so it made TRL's adapter
        differ = [name for name, value in trl_final.items() if not torch.equal(ours["final"][name], value)]
        assert not differ, f"lock-step final adapter differs from TRL's: {differ}"
    # The adapters did train: B moved off 0.
    assert all(value.any() for name, value in ours["final"].items() if ".lora_B." in name)


def assert_tensors_match(trl: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], what: str) -> float:
    assert set(ours) == set(trl), f"{what}: names differ ({sorted(set(ours) ^ set(trl))[:4]})"
    worst = 0.0
    for name, value in trl.items():
        error = tensor_error(ours[name], value)
        assert error <= REL_TOL, f"{what} {name}: relative error {error:.3g}"
        worst = max(worst, error)
    return worst


# ---------------------------------------------------------------------- runs


def run_trl_sft_peft(model_dir: Path, tokenizer, rows: list[dict], peft, **overrides) -> tuple[TrlRun, list]:
    """TRL's SFTTrainer with `peft_config`, recorded like tests/trl_harness.run_trl_sft (which takes no
    peft_config), plus the global torch RNG state at each training micro-batch (where its dropout masks start)."""
    from trl import SFTConfig, SFTTrainer

    from tests.trl_harness import _base_config_kwargs, _make_recorder, _train

    args = SFTConfig(**{**_base_config_kwargs(None), **overrides})
    run = TrlRun(logs=[], grads=[], batches=[], final_state_dict={}, args=args)
    trainer = SFTTrainer(model=str(model_dir), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=peft, callbacks=[_make_recorder(run)])
    rng_states: list[torch.Tensor] = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            rng_states.append(torch.get_rng_state())
        return compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    trainer.compute_loss = recording_compute_loss
    return _train(trainer, run), rng_states


def run_ours(method: str, model_dir: Path, tokenizer_dir: Path, data_file: Path, output_dir: Path, steps: int,
             max_grad_norm: float, dropout: float = 0.0, extra: list[str] | None = None,
             lockstep_grads: list[dict[str, torch.Tensor]] | None = None) -> dict:
    """`train(parse_config(...))` with the LoRA flags; records the clipped grads, the adapter each step starts
    from and the initial adapter. With `lockstep_grads` (TRL's clipped grads per step, under our names) the
    optimizer gets those instead of ours (module docstring, "DPO lock-step"); "applied" is what it got."""
    grads: list[dict[str, torch.Tensor]] = []
    states_before: list[dict[str, torch.Tensor]] = []
    trainable: list[set[str]] = []

    def hook(step: int, model: torch.nn.Module) -> None:
        # After clipping, before optimizer.step(): the weights are those this step's gradients were taken at.
        states_before.append({k: v.detach().clone() for k, v in lora_parameters(model).items()})
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        trainable.append({n for n, p in model.named_parameters() if p.requires_grad})
        if lockstep_grads is not None:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if param.grad is not None:
                        param.grad.copy_(lockstep_grads[step - 1][name])

    flags = [
        "--method", method, "--model_name_or_path", str(model_dir), "--tokenizer_name_or_path", str(tokenizer_dir),
        "--dataset_name", str(data_file), "--output_dir", str(output_dir), "--bf16", "False",
        "--logging_steps", "1", "--save_steps", "0", "--eval_steps", "0", "--disable_tqdm", "--seed", str(SEED),
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--max_steps", str(steps),
        "--learning_rate", str(LR), "--max_grad_norm", str(max_grad_norm),
        "--use_peft", "--lora_r", str(LORA_R), "--lora_alpha", str(LORA_ALPHA), "--lora_dropout", str(dropout),
        "--lora_target_modules", *TARGETS, *(extra or []),
    ]
    result = train(parse_config(flags), step_hook=hook)
    final = load_file(str(output_dir / "adapter_model.safetensors"))
    final = {k.removeprefix("base_model.model."): v for k, v in final.items()}
    return dict(result=result, grads=grads, initial=states_before[0], states_before=states_before,
                trainable=trainable, final=final, applied=grads if lockstep_grads is None else lockstep_grads)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("parity_lora")


@pytest.fixture(scope="module")
def smollm3_dir(workdir, tokenizer) -> Path:
    return make_tiny_model_dir(workdir, "smollm3", vocab_size=len(tokenizer), seed=1)


@pytest.fixture(scope="module")
def llama_dir(workdir, tokenizer) -> Path:
    return make_tiny_model_dir(workdir, "llama", vocab_size=len(tokenizer), seed=0)


@pytest.fixture(scope="module")
def sft_pair(workdir, tokenizer, tokenizer_dir, smollm3_dir):
    """LoRA SFT on SmolLM3 (tied embeddings, NoPE layers), dropout 0: TRL's run and ours."""
    trl_run, _ = run_trl_sft_peft(
        smollm3_dir, tokenizer, sft_rows(), peft_config(0.0), per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=SFT_STEPS, learning_rate=LR, max_grad_norm=SFT_MAX_GRAD_NORM,
        seed=SEED,
    )
    ours = run_ours("sft", smollm3_dir, tokenizer_dir, write_jsonl(workdir / "sft.jsonl", sft_rows()),
                    workdir / "out_sft", SFT_STEPS, SFT_MAX_GRAD_NORM)
    return trl_run, ours


@pytest.fixture(scope="module")
def dpo_pair(workdir, tokenizer, tokenizer_dir, llama_dir):
    """LoRA DPO (sigmoid) on Llama, reference = adapters off: TRL's run and ours lock-step with it (module
    docstring), plus our DPOMethod."""
    trl_run = run_trl_dpo(
        llama_dir, tokenizer, Dataset.from_list(dpo_rows()), peft_config=peft_config(0.0),
        per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=DPO_STEPS, learning_rate=LR,
        beta=DPO_BETA, max_grad_norm=DPO_MAX_GRAD_NORM, seed=SEED,
    )
    methods: list[DPOMethod] = []
    original_loss = DPOMethod.loss

    def loss(self, *args, **kwargs):
        methods.append(self)
        return original_loss(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DPOMethod, "loss", loss)
        ours = run_ours("dpo", llama_dir, tokenizer_dir, write_jsonl(workdir / "dpo.jsonl", dpo_rows()),
                        workdir / "out_dpo", DPO_STEPS, DPO_MAX_GRAD_NORM, extra=["--beta", str(DPO_BETA)],
                        lockstep_grads=[{our_name(k): v for k, v in step.items()} for step in trl_run.grads])
    ours["method"] = methods[0]
    return trl_run, ours


# ---------------------------------------------------------------------- SFT


def test_sft_lora_initial_adapter_is_peft_init_under_the_same_seed(sft_pair):
    """TRL: set_seed(42) -> from_pretrained -> get_peft_model; ours: set_seed(42) -> load -> inject_lora. Same
    RNG draws in the same order, so A is bit-identical and B is exactly 0 in both."""
    trl_run, ours = sft_pair
    trl_initial = adapter_state(trl_run.states_before[0])
    assert len(trl_initial) == 2 * 2 * len(TARGETS)  # 2 layers x 2 targets x (A, B)
    assert set(ours["initial"]) == set(trl_initial)
    for name, value in trl_initial.items():
        assert torch.equal(ours["initial"][name], value), name
        if ".lora_B." in name:
            assert not value.any()


def test_sft_lora_logs_match_trl_every_step(sft_pair):
    """loss, entropy, mean_token_accuracy, num_tokens, grad_norm, learning_rate, epoch: within 1e-5 relative at
    each of the 4 steps. Clipping is active (grad_norm > max_grad_norm every step) and the loss moves."""
    trl_run, ours = sft_pair
    worst = assert_logs_match(trl_run.logs, ours["result"].logs)
    assert all(log["grad_norm"] > SFT_MAX_GRAD_NORM for log in trl_run.logs)
    assert trl_run.logs[-1]["loss"] != trl_run.logs[0]["loss"]
    print(f"SFT LoRA logs: worst relative error {worst:.2e}")


def test_sft_lora_clipped_grads_match_trl_and_only_adapters_have_grads(sft_pair):
    """Per step, the post-clip gradient of every lora_A / lora_B (the only parameters with requires_grad and
    with a gradient, in both) matches TRL's; at step 1 lora_A's gradient is exactly 0 in both (B = 0)."""
    trl_run, ours = sft_pair
    worst = 0.0
    for step, (trl_grads, our_grads) in enumerate(zip(trl_run.grads, ours["grads"], strict=True), start=1):
        assert all(".lora_A." in n or ".lora_B." in n for n in our_grads)
        assert ours["trainable"][step - 1] == set(our_grads)
        worst = max(worst, assert_tensors_match({our_name(k): v for k, v in trl_grads.items()}, our_grads,
                                                f"step {step} grad"))
    assert all(not g.any() for n, g in ours["grads"][0].items() if ".lora_A." in n)
    print(f"SFT LoRA grads: worst relative error {worst:.2e}")


def test_sft_lora_final_adapter_is_adamw_over_the_matching_grads(sft_pair):
    """The adapter in <output_dir>/adapter_model.safetensors is fused AdamW over our grads, TRL's is over TRL's
    (both exact); see `assert_final_adapter`."""
    trl_run, ours = sft_pair
    assert_final_adapter(trl_run, ours)
    worst = max(tensor_error(ours["final"][n], v) for n, v in adapter_state(trl_run.final_state_dict).items())
    print(f"SFT LoRA final adapter vs TRL's (information only): worst relative error {worst:.2e}")


def test_sft_lora_dropout_masks_match_trl(workdir, tokenizer, tokenizer_dir, smollm3_dir,
                                                                sft_pair):
    """lora_dropout = 0.1: our global RNG follows TRL's stream, so the dropout masks and every number match.

    TRL's stream (asserted below at every micro-batch): the adapter init draws from the RNG after set_seed(42), then
    `Trainer.__init__` calls set_seed(42) AGAIN, and every `iter(dataloader)` (once per epoch) draws one int64 from
    the global RNG for its worker base seed; the dropout masks come after that. engine/loop.py does the same
    (second set_seed after model set-up, one int64 at each epoch start), so our RNG state equals TRL's before EVERY
    micro-batch, and every logged value, clipped gradient and the final adapter match. So our dropout draws masks in PEFT's order
    (layer by layer, q_proj before v_proj, on the adapter input only), and gradient checkpointing's recompute
    replays the same masks, as in TRL.
    """

    dropout = 0.1
    trl_run, trl_rng = run_trl_sft_peft(
        smollm3_dir, tokenizer, sft_rows(), peft_config(dropout), per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=SFT_STEPS, learning_rate=LR, max_grad_norm=SFT_MAX_GRAD_NORM,
        seed=SEED,
    )
    our_rng: list[torch.Tensor] = []
    original_loss = SFTMethod.loss

    def record_rng(self, model, batch, window, train=True):
        if train:
            our_rng.append(torch.get_rng_state())
        return original_loss(self, model, batch, window, train)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SFTMethod, "loss", record_rng)  # observe only: the loop itself follows TRL's stream
        ours = run_ours("sft", smollm3_dir, tokenizer_dir, write_jsonl(workdir / "sft_dropout.jsonl", sft_rows()),
                        workdir / "out_sft_dropout", SFT_STEPS, SFT_MAX_GRAD_NORM, dropout=dropout)

    assert len(our_rng) == len(trl_rng) == SFT_STEPS * 2
    for index, (mine, theirs) in enumerate(zip(our_rng, trl_rng, strict=True)):
        assert torch.equal(mine, theirs), f"RNG state before micro-batch {index} differs from TRL's"
    assert_logs_match(trl_run.logs, ours["result"].logs)
    for step, (trl_grads, our_grads) in enumerate(zip(trl_run.grads, ours["grads"], strict=True), start=1):
        assert_tensors_match({our_name(k): v for k, v in trl_grads.items()}, our_grads, f"step {step} grad")
    assert_final_adapter(trl_run, ours)
    # Dropout really acted: B's step-1 gradient is taken through dropout(x), so grad_norm differs from the
    # dropout-free run on the same data and seed (by ~1%; far above the 1e-5 parity tolerance).
    no_dropout = sft_pair[1]["result"].logs[0]["grad_norm"]
    assert scalar_error(ours["result"].logs[0]["grad_norm"], no_dropout) > 1e-3


# ---------------------------------------------------------------------- DPO


def test_dpo_lora_reference_is_the_policy_with_adapters_off(dpo_pair):
    """No second model: our DPOMethod's reference holds no model and no precomputed log-probs: it is the
    policy under `disable_adapters` (engine.reference.AdaptersOff). At step 1, B = 0 makes policy == reference: loss = ln 2 exactly, rewards 0."""
    trl_run, ours = dpo_pair
    method = ours["method"]
    assert type(method.reference) is AdaptersOff and method.reference.model is None
    first = ours["result"].logs[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert trl_run.logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)


def test_dpo_lora_initial_adapter_is_peft_init_under_the_same_seed(dpo_pair):
    """As for SFT: the same seed gives bit-identical initial adapters (DPOTrainer also seeds before loading)."""
    trl_run, ours = dpo_pair
    trl_initial = adapter_state(trl_run.states_before[0])
    assert set(ours["initial"]) == set(trl_initial)
    assert all(torch.equal(ours["initial"][name], value) for name, value in trl_initial.items())


def test_dpo_lora_logs_match_trl_every_step(dpo_pair):
    """loss, rewards/{chosen,rejected,accuracies,margins}, logps/*, logits/*, entropy, mean_token_accuracy,
    num_tokens, grad_norm, learning_rate, epoch: within 1e-5 relative at each of the 3 steps; clipping is active
    and the rewards move away from 0 after step 1."""
    trl_run, ours = dpo_pair
    worst = assert_logs_match(trl_run.logs, ours["result"].logs)
    assert all(log["grad_norm"] > DPO_MAX_GRAD_NORM for log in trl_run.logs)
    assert trl_run.logs[-1]["rewards/margins"] != 0.0
    print(f"DPO LoRA logs: worst relative error {worst:.2e}")


def test_dpo_lora_clipped_grads_and_final_adapter_match_trl(dpo_pair):
    """Lock-step (module docstring): every step starts from TRL's adapter bit for bit, and there the clipped
    adapter gradients (the only gradients) match TRL's (1e-5); each final adapter is exactly fused AdamW over the
    grads its optimizer got, so ours is TRL's bit for bit (`assert_final_adapter`)."""
    trl_run, ours = dpo_pair
    assert len(ours["states_before"]) == len(trl_run.states_before) == DPO_STEPS
    for step, (trl_state, our_state) in enumerate(zip(trl_run.states_before, ours["states_before"], strict=True),
                                                   start=1):
        trl_adapter = adapter_state(trl_state)
        assert set(our_state) == set(trl_adapter)
        differ = [name for name, value in trl_adapter.items() if not torch.equal(our_state[name], value)]
        assert not differ, f"adapter before step {step} differs from TRL's: {differ}"
    worst = 0.0
    for step, (trl_grads, our_grads) in enumerate(zip(trl_run.grads, ours["grads"], strict=True), start=1):
        assert all(".lora_A." in n or ".lora_B." in n for n in our_grads)
        worst = max(worst, assert_tensors_match({our_name(k): v for k, v in trl_grads.items()}, our_grads,
                                                f"step {step} grad"))
    assert_final_adapter(trl_run, ours)
    print(f"DPO LoRA grads: worst relative error {worst:.2e}")
