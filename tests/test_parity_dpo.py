"""Training parity with TRL 1.16 `DPOTrainer`: same tiny model, tokenizer and data; every logged number and the
clipped gradients of every optimizer step must agree.

Each case trains twice from the SAME saved tiny model dir, tokenizer dir and jsonl file, on CPU in fp32:
TRL through `tests/trl_harness.run_trl_dpo` (which records its logs, clipped grads and batches), and our engine
through `engine.loop.train(parse_config([... "--method", "dpo", ...]), step_hook=...)`, whose hook sees the
clipped gradients right before `optimizer.step()` (where the harness records TRL's).

Set-up, chosen so that a mismatch anywhere shows up:
- 16 pairs of varied length (padding in every batch), shuffled by the seeded sampler (seed 42), 2 optimizer
  steps of 4 pairs (or 2 x 2 micro-batches with gradient accumulation);
- learning rate 1e-2, large for DPO on purpose: step 2's loss, rewards and gradients depend on step 1's update
  (checked: step 1 moves the weights by > 1% relative L2);
- `max_grad_norm` 0.5 (0.1 for sigmoid_norm), below the gradient norm of at least one step of every case, so clipping is active
  (checked per case) and the clip factor enters the gradients compared;
- AdamW epsilon 1e-3 instead of 1e-8, on both sides. Why: at step 1 Adam's update is lr·g/(|g| + eps), a sign
  function for |g| >> eps, whose slope at |g| ~ eps is lr/(4·eps) = 2.5e5 with eps = 1e-8. TRL's fused LM-head
  backward and ours round differently (step-1 gradients agree to ~3e-7 of their max), and for the few weights
  whose step-1 gradient is ~1e-8 that rounding is amplified into weight differences of ~1e-4, which then make
  step-2 gradients differ by ~1e-5 relative: chaos, not a bug. With eps 1e-3 the map from gradients to update
  is well conditioned (slope <= lr/eps = 10), so step 2 tests the engine, not the amplification.

Comparison rule (fp32):
- every key TRL logs is in our log; for each value `|ours - trl| <= RTOL * (|trl| + scale)` with RTOL = 1e-5,
  where scale = 0 except for `rewards/chosen|rejected|margins`, which are β·(logp − ref logp): a difference of
  two summed log-probs of size ~100 whose fp32 rounding (1 ulp of 100 is 7.6e-6, and step 2's policy log-probs
  differ from TRL's by that ulp, inherited from step 1's gradient rounding) is relative to the log-probs, not to
  the small difference. For them scale = β · max(|logps/chosen|, |logps/rejected|) of that step.
  Likewise `logits/chosen|rejected` are means over the vocabulary of logits of both signs (they can be ~1e-5
  while the logits are ~0.1; TRL folds the vocabulary in chunks, we do not, so the sums round differently): for
  them scale = the mean |logit| over the step's completion positions, recomputed from TRL's recorded
  weights and batches.
- per parameter, `max|g_ours - g_trl| <= RTOL * max|g_trl|` for the clipped gradients of every step, with the
  same parameter names on both sides.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from datasets import Dataset

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
    adam_epsilon=1e-3, beta=BETA, max_grad_norm=MAX_GRAD_NORM, seed=SEED,
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
             **options: Any) -> tuple[Any, Any, list[dict[str, torch.Tensor]]]:
    """Train TRL and our engine on the same files and settings; (trl_run, our TrainResult, our clipped grads).

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
    grads: list[dict[str, torch.Tensor]] = []

    def hook(step: int, model: torch.nn.Module) -> None:
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    result = train(parse_config(argv), step_hook=hook)
    assets["runs"][name] = (trl_run, result, grads)
    return trl_run, result, grads


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


def assert_parity(assets, trl_run, result, grads) -> dict[str, float]:
    """Every logged value and every clipped gradient of every step agree (module docstring's rule).

    Returns the worst error per key, as a fraction of the allowed RTOL-scale (|trl| + scale), for the report.
    """
    ours_logs = [record for record in result.logs if "loss" in record]
    assert len(trl_run.logs) == len(ours_logs) == MAX_STEPS
    assert len(grads) == len(trl_run.grads) == MAX_STEPS
    worst: dict[str, float] = {}
    for step, (trl_log, our_log) in enumerate(zip(trl_run.logs, ours_logs, strict=True), start=1):
        assert our_log["step"] == trl_log["step"] == step
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
    norms = [log["grad_norm"] for log in trl_run.logs]
    assert any(norm > trl_run.args.max_grad_norm for norm in norms), f"clipping never active: grad norms {norms}"
    # Step 2 depends on step 1's update: the weights step 2 starts from moved by > 1% (relative L2) from the
    # initial ones, so matching step-2 gradients means our step-1 update matched TRL's too.
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
