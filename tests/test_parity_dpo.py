"""Training parity with TRL 1.16 `DPOTrainer`: same tiny model, tokenizer and data; every logged number and the
clipped gradients of every optimizer step must agree.

Each case trains twice from the SAME saved tiny model dir, tokenizer dir and jsonl file, on CPU in fp32:
TRL through `tests/trl_harness.run_trl_dpo` (which records its logs, clipped grads, batches and the weights each
step starts from), and our engine through `engine.loop.train(parse_config([... "--method", "dpo", ...]),
step_hook=...)`, whose hook sees the clipped gradients right before `optimizer.step()` (where the harness records
TRL's). Our run is lock-step with TRL's: the hook records our clipped gradients and the weights, then hands the
optimizer TRL's gradients of that step, so every step starts from TRL's weights (as tests/test_parity_sft.py).

Set-up, chosen so that a mismatch anywhere shows up:
- 16 pairs of varied length (padding in every batch), shuffled by the seeded sampler (seed 42), 2 optimizer
  steps of 4 pairs (or 2 x 2 micro-batches with gradient accumulation);
- learning rate 1e-2, large for DPO on purpose: step 2's loss, rewards and gradients are computed at weights
  step 1's update moved by > 1% relative L2 (checked), with the second lr of the linear schedule;
- `max_grad_norm` 0.5 (0.1 for sigmoid_norm), below the gradient norm of at least one step of every case, so
  clipping is active (checked per case) and the clip factor enters the gradients compared;
- AdamW as TRL's default (fused, eps 1e-8): our optimizer must turn TRL's clipped gradients into TRL's weights
  BIT FOR BIT, before step 2 and in the saved final model (checked).

Why lock-step, not a free run of ours. Step 1 starts from the same weights, and the clipped gradients agree to
~3e-7 of their max (TRL's fused LM head and ours sum in different orders). A free run carries that last-bit
rounding into step 2's weights, and how much it moves step 2 depends on the CPU's rounding and on the loss's
curvature, not on what is computed. Measured on an AMX / AVX-512-bf16 Xeon (eps 1e-3, the free-run setting
this file used before): the weights after step 1 differ by up to 6e-8, the step-2 margin by 4e-7, and discopop's
step-2 gradient of model.layers.0.input_layernorm.weight by 9.7e-9 = 1.8e-5 of its max|g| 5.3e-4 (over the 1e-5 bound; the same
free run gives sigmoid 1.2e-6, exo_pair 8.5e-7). DiscoPOP is the sensitive one: its per-pair gradient coefficient
L'(z) moves with the margin z at up to |L''| = 13 for |z| <= 0.5 (τ = 0.05), against sigmoid's 0.25, and this
parameter's gradient is a small sum of cancelling per-pair terms. From the same weights (lock-step) the same case
agrees to 5.2e-7, and our discopop is bitwise TRL 1.16's formula (value and gradient, fp32 and fp64, 200 random
batches): rounding amplified through the update, not a formula difference. With TRL's eps 1e-8 the free run is
worse (AdamW's slope lr/(4·eps) at |g| ~ eps: step-2 weights differ by 3.6e-5), lock-step is unaffected (discopop
5.0e-7). Lock-step keeps the proof: step-1 gradients equal TRL's within the bound, our optimizer maps TRL's
gradients to TRL's weights exactly, and step-2 gradients, at TRL's step-2 weights, equal TRL's within the bound;
so our step 2 equals TRL's up to the rounding of step 1's gradients. Observed: grads <= 1.0e-6 of max|g| in every
case (use_weighting), logged values <= 2.2e-7 of their allowance.

Comparison rule (fp32):
- every key TRL logs is in our log; for each value `|ours - trl| <= RTOL * (|trl| + scale)` with RTOL = 1e-5,
  where scale = 0 except for `rewards/chosen|rejected|margins`, which are β·(logp − ref logp): a difference of
  two summed log-probs of size ~100 whose fp32 rounding (1 ulp of 100 is 7.6e-6; the two sides sum the
  log-probs in different orders) is relative to the log-probs, not to the small difference. For them scale =
  β · max(|logps/chosen|, |logps/rejected|) of that step.
  Likewise `logits/chosen|rejected` are means over the vocabulary of logits of both signs (they can be ~1e-5
  while the logits are ~0.1; TRL folds the vocabulary in chunks, we do not, so the sums round differently): for
  them scale = the mean |logit| over the step's completion positions, recomputed from TRL's recorded
  weights and batches.
- per parameter, `max|g_ours - g_trl| <= RTOL * max|g_trl|` for the clipped gradients of every step, with the
  same parameter names on both sides.
- the weights before every step and the saved final weights: bitwise equal to TRL's.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from engine.config import parse_config
from engine.loop import train
from tests.trl_harness import load_or_build_tokenizer, make_tiny_model_dir, run_trl_dpo

RTOL = 1e-5
SEED = 42
MAX_STEPS = 2
BETA = 0.1
MAX_GRAD_NORM = 0.5
BASE_SETTINGS = dict(
    per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=MAX_STEPS, learning_rate=1e-2,
    adam_epsilon=1e-8, beta=BETA, max_grad_norm=MAX_GRAD_NORM, seed=SEED,
)
LOG_KEYS = {
    "loss", "grad_norm", "learning_rate", "epoch", "num_tokens", "entropy", "mean_token_accuracy",
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
}
REWARD_DIFFERENCES = {"rewards/chosen", "rewards/rejected", "rewards/margins"}

# ---------------------------------------------------------------------- data: 16 pairs, four layouts

WORDS = ["hello", "world", "good", "morning", "night", "blue", "red", "colour", "two", "four", "fox", "dog",
         "quick", "brown", "lazy", "jumps"]
SYSTEM = "You are a helpful assistant."
N_PAIRS = 16


def _prompt(i: int) -> str:
    return f"Question {i}: what comes after " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 5)) + "?"


def _chosen(i: int) -> str:
    # "Yes..." vs "No...": an implicit prompt ends right before the answer.
    return "Yes, " + " ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(1 + (i * 5) % 7)) + "."


def _rejected(i: int) -> str:
    return "No, " + " ".join(WORDS[(5 * i + 2 * j) % len(WORDS)] for j in range(2 + (i * 3) % 6)) + "."


def _rows(layout: str) -> list[dict[str, Any]]:
    """16 preference pairs: explicit or implicit prompt, plain text or conversational."""
    rows = []
    for i in range(N_PAIRS):
        prompt, chosen, rejected = _prompt(i), _chosen(i), _rejected(i)
        if layout == "text":
            rows.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
        elif layout == "text_implicit":
            rows.append({"chosen": f"User: {prompt} Assistant: {chosen}",
                         "rejected": f"User: {prompt} Assistant: {rejected}"})
        elif layout == "conversational":
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
        elif layout == "conversational_implicit":
            head = [{"role": "system", "content": SYSTEM}] if i % 2 else []
            head = head + [{"role": "user", "content": prompt}]
            rows.append({"chosen": head + [{"role": "assistant", "content": chosen}],
                         "rejected": head + [{"role": "assistant", "content": rejected}]})
        else:
            raise ValueError(layout)
    return rows


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Any]:
    """Built once per module: tokenizer dir, policy and (different) reference model dirs, four jsonl files."""
    root = tmp_path_factory.mktemp("parity_dpo")
    tokenizer = load_or_build_tokenizer(None)
    tokenizer_dir = root / "tokenizer"
    tokenizer.save_pretrained(str(tokenizer_dir))
    policy_dir = make_tiny_model_dir(root, "smollm3", vocab_size=len(tokenizer), seed=0)
    ref_dir = make_tiny_model_dir(root, "smollm3", vocab_size=len(tokenizer), seed=1)
    data = {}
    for layout in ("text", "text_implicit", "conversational", "conversational_implicit"):
        path = root / f"{layout}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in _rows(layout)))
        data[layout] = path
    return {"root": root, "tokenizer": tokenizer, "tokenizer_dir": tokenizer_dir, "policy_dir": policy_dir,
            "ref_dir": ref_dir, "data": data, "runs": {}}


# ---------------------------------------------------------------------- running both sides


def run_both(assets: dict[str, Any], name: str, data: str = "text", ref_model: bool = False,
             **options: Any) -> tuple[Any, Any, dict[str, list[dict[str, torch.Tensor]]]]:
    """Train TRL, then our engine lock-step with it, on the same files and settings: (trl_run, our TrainResult,
    ours), ours = {"grads": our clipped grads per step, "states_before": our weights at the start of each step}.

    `options` override BASE_SETTINGS; the names are both DPOConfig fields and our flags. Runs are cached by name.
    """
    if name in assets["runs"]:
        return assets["runs"][name]
    settings = {**BASE_SETTINGS, **options}
    ref_dir = assets["ref_dir"] if ref_model else None
    rows = [json.loads(line) for line in assets["data"][data].read_text().splitlines()]
    trl_run = run_trl_dpo(assets["policy_dir"], assets["tokenizer"], Dataset.from_list(rows), ref_model_dir=ref_dir,
                          output_dir=str(assets["root"] / f"trl-{name}"), **settings)

    argv = [
        "--method", "dpo", "--model_name_or_path", str(assets["policy_dir"]),
        "--tokenizer_name_or_path", str(assets["tokenizer_dir"]), "--dataset_name", str(assets["data"][data]),
        "--output_dir", str(assets["root"] / f"ours-{name}"), "--bf16", "False", "--logging_steps", "1",
        "--save_steps", "0", "--eval_steps", "0", "--disable_tqdm", "--report_to", "none",
        "--demo_eval_samples", "0",
    ]
    if ref_dir is not None:
        argv += ["--ref_model_name_or_path", str(ref_dir)]
    for key, value in settings.items():
        argv += [f"--{key}", *(str(v) for v in (value if isinstance(value, list) else [value]))]
    ours: dict[str, list[dict[str, torch.Tensor]]] = {"grads": [], "states_before": []}

    def lockstep_hook(step: int, model: torch.nn.Module) -> None:
        # After clipping, before optimizer.step(): record our clipped grads and the weights this step started
        # from, then hand the optimizer TRL's grads, so the next step starts from TRL's weights (module docstring).
        ours["grads"].append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        ours["states_before"].append({k: v.detach().clone() for k, v in model.state_dict().items()})
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param.grad is not None:
                    param.grad.copy_(trl_run.grads[step - 1][param_name])

    result = train(parse_config(argv), step_hook=lockstep_hook)
    assets["runs"][name] = (trl_run, result, ours)
    return trl_run, result, ours


def _mean_abs_logit(assets: dict[str, Any], trl_run, step: int) -> float:
    """Mean |logit| over the completion positions of step `step`'s micro-batches, for the weights TRL's step
    started from: the magnitude the vocabulary means in `logits/*` are rounded relative to."""
    from transformers import AutoModelForCausalLM

    if "scale_model" not in assets:
        assets["scale_model"] = AutoModelForCausalLM.from_pretrained(str(assets["policy_dir"]), dtype=torch.float32)
    model = assets["scale_model"]
    model.load_state_dict(trl_run.states_before[step - 1])
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in trl_run.batches[step - 1]:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            mask = batch["completion_mask"][:, 1:].bool()  # (2B, T-1): positions that predict a completion token
            total += float(logits.abs().mean(-1)[mask].sum())
            count += int(mask.sum())
    return total / count


def _tolerance(key: str, trl_log: dict[str, float], logit_scale: float) -> float:
    scale = 0.0
    if key in REWARD_DIFFERENCES:  # β·(logp − ref logp): rounding is relative to the log-probs (module docstring)
        scale = BETA * max(abs(trl_log["logps/chosen"]), abs(trl_log["logps/rejected"]))
    elif key.startswith("logits/"):  # a mean of logits of both signs: rounding is relative to |logit|
        scale = logit_scale
    return RTOL * (abs(trl_log[key]) + scale)


def assert_parity(assets, trl_run, result, ours) -> dict[str, float]:
    """Every logged value and every clipped gradient of every step agree (module docstring's rule), and every
    step starts from TRL's weights bit for bit.

    Returns the worst error per key, as a fraction of the allowed RTOL-scale (|trl| + scale), for the report.
    """
    ours_logs = [record for record in result.logs if "loss" in record]
    assert len(trl_run.logs) == len(ours_logs) == MAX_STEPS
    grads = ours["grads"]
    assert len(grads) == len(trl_run.grads) == len(ours["states_before"]) == MAX_STEPS
    worst: dict[str, float] = {}
    for step, (trl_log, our_log) in enumerate(zip(trl_run.logs, ours_logs, strict=True), start=1):
        assert our_log["step"] == trl_log["step"] == step
        # Step 1: same initial weights. Step 2: our optimizer applied TRL's step-1 grads (lock-step) and must have
        # made TRL's update exactly (same fused AdamW, param groups, lr): bitwise equal weights.
        our_state, trl_state = ours["states_before"][step - 1], trl_run.states_before[step - 1]
        assert set(our_state) == set(trl_state)
        differ = [key for key in trl_state if not torch.equal(our_state[key], trl_state[key])]
        assert not differ, f"weights before step {step} differ from TRL's: {differ}"
        assert set(trl_log) - {"step"} == LOG_KEYS, f"TRL logged {sorted(trl_log)}"
        missing = LOG_KEYS - set(our_log)
        assert not missing, f"step {step}: our log lacks {sorted(missing)}"
        logit_scale = _mean_abs_logit(assets, trl_run, step)
        bad = {k: (our_log[k], trl_log[k]) for k in LOG_KEYS
               if abs(our_log[k] - trl_log[k]) > _tolerance(k, trl_log, logit_scale)}
        assert not bad, f"step {step}: (ours, TRL) differ: {bad}"
        for key in LOG_KEYS:
            allowed = _tolerance(key, trl_log, logit_scale) / RTOL
            if allowed > 0:
                worst[key] = max(worst.get(key, 0.0), abs(our_log[key] - trl_log[key]) / allowed)
        trl_grads, our_grads = trl_run.grads[step - 1], grads[step - 1]
        assert set(our_grads) == set(trl_grads), f"parameter names differ: {sorted(set(our_grads) ^ set(trl_grads))}"
        for name, expected in trl_grads.items():
            scale = float(expected.abs().max())
            error = float((our_grads[name] - expected).abs().max())
            assert error <= RTOL * scale, f"step {step}, grad of {name}: max|diff| {error:.3g} vs max|g| {scale:.3g}"
            if scale > 0:
                worst["grads"] = max(worst.get("grads", 0.0), error / scale)
    # ... and applied TRL's step-2 grads exactly too: the saved final model is TRL's, bit for bit.
    final = load_file(str(result.output_dir / "model.safetensors"))
    assert "model.embed_tokens.weight" in final and set(final) <= set(trl_run.final_state_dict)
    differ = [key for key, value in final.items() if not torch.equal(value, trl_run.final_state_dict[key])]
    assert not differ, f"final weights differ from TRL's: {differ}"
    norms = [log["grad_norm"] for log in trl_run.logs]
    assert any(norm > trl_run.args.max_grad_norm for norm in norms), f"clipping never active: grad norms {norms}"
    # Step 2 is computed at weights step 1's update moved by > 1% (relative L2) from the initial ones, so its
    # comparison is not step 1's again.
    before, after = trl_run.states_before
    moved = torch.linalg.vector_norm(torch.cat([(after[k] - before[k]).flatten() for k in before]))
    size = torch.linalg.vector_norm(torch.cat([before[k].flatten() for k in before]))
    assert moved > 1e-2 * size, f"step 1 barely moved the weights ({float(moved / size):.2g} relative)"
    return worst


def _report(name: str, worst: dict[str, float]) -> None:
    print(f"\n[{name}] worst |ours - TRL| / (|TRL| + scale): "
          + ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())))


# ---------------------------------------------------------------------- tests

# Every loss type TRL 1.16 DPOTrainer accepts. label_smoothing > 0 where TRL 1.16 reads it (robust, exo_pair,
# aot, aot_unpaired); the others ignore it, so it stays 0 there.
LOSS_TYPES = [
    ("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1), ("exo_pair", 0.1), ("nca_pair", 0.0),
    ("bco_pair", 0.0), ("sppo_hard", 0.0), ("aot", 0.1), ("aot_unpaired", 0.1), ("apo_zero", 0.0),
    ("apo_down", 0.0), ("discopop", 0.0), ("sigmoid_norm", 0.0), ("sft", 0.0),
]


@pytest.mark.parametrize("loss_type,label_smoothing", LOSS_TYPES, ids=[name for name, _ in LOSS_TYPES])
def test_loss_type_parity(assets, loss_type, label_smoothing):
    """Each loss type alone, text data with explicit prompts: both steps' metrics and clipped gradients match TRL."""
    options = dict(loss_type=[loss_type], label_smoothing=label_smoothing)
    if loss_type == "sigmoid_norm":
        options["max_grad_norm"] = 0.1  # per-token normalised: gradients ~1/|completion| of sigmoid's
    runs = run_both(assets, loss_type, **options)
    _report(loss_type, assert_parity(assets, *runs))


# name -> run_both keyword arguments (beyond the loss defaults: sigmoid, no smoothing)
FEATURE_CASES = {
    # RPO-style weighted sum: loss = 1·mean(sigmoid) + 0.5·mean(sft).
    "multi_loss": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    # 2 micro-batches of 2 pairs per step: each micro-batch loss / 2, metrics averaged over micro-batches.
    "grad_accumulation": dict(per_device_train_batch_size=2, gradient_accumulation_steps=2),
    "text_implicit_prompt": dict(data="text_implicit"),
    "conversational": dict(data="conversational"),
    "conversational_implicit_prompt": dict(data="conversational_implicit"),
    "ref_model": dict(ref_model=True),
    # Both precompute in batches of per_device_train_batch_size (precompute_ref_batch_size unset), padded alike.
    "precompute_ref_log_probs": dict(precompute_ref_log_probs=True),
    "use_weighting": dict(use_weighting=True),
    "ld_alpha": dict(ld_alpha=0.5),
    "f_divergence_alpha": dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
}


@pytest.mark.parametrize("case", list(FEATURE_CASES))
def test_feature_parity(assets, case):
    """Sigmoid DPO with one feature changed at a time: both steps' metrics and clipped gradients match TRL."""
    runs = run_both(assets, case, **FEATURE_CASES[case])
    _report(case, assert_parity(assets, *runs))


def test_ref_model_is_the_given_one(assets):
    """With --ref_model_name_or_path a different model, the policy starts away from the reference: step 1's
    rewards are nonzero (they would be exactly 0 with the policy as its own reference)."""
    trl_run, result, _ = run_both(assets, "ref_model", ref_model=True)
    assert trl_run.logs[0]["rewards/chosen"] != 0.0
    assert result.logs[0]["rewards/chosen"] != 0.0


def test_precompute_used_cached_reference(assets):
    """The precompute case really ran precomputed: TRL's batches carry ref_chosen_logps and ours wrote its cache."""
    trl_run, result, _ = run_both(assets, "precompute_ref_log_probs", **FEATURE_CASES["precompute_ref_log_probs"])
    assert "ref_chosen_logps" in trl_run.batches[0][0]
    assert list(result.output_dir.glob("ref_logps-*.pt"))


def test_sigmoid_golden_first_step(assets):
    """Step 1 of sigmoid DPO: policy == reference, every log-ratio is 0, so loss = -log sigmoid(0) = ln 2 and
    rewards/chosen, rewards/rejected, rewards/margins are exactly 0, and rewards/accuracies is 0 (strict >)."""
    _, result, _ = run_both(assets, "sigmoid", loss_type=["sigmoid"], label_smoothing=0.0)
    first = result.logs[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["rewards/accuracies"] == 0.0
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
