"""Proof that tests/trl_harness.py records what TRL 1.16 really did, and that the facts in its docstring hold.

The key tests recompute TRL's logged loss, metrics and clipped gradients in plain PyTorch (full logits,
log_softmax, no TRL code) from the recorded micro-batches and the recorded model state before each step.
If those agree, the recorded batches are exactly what TRL trained on and the formulas are the ones a loop must
implement. Tolerances: losses/metrics 1e-6 relative, gradients 1e-5 relative (fp32; TRL's chunked LM head and
a full `F.linear` round differently in the last bits).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tests.trl_harness import (
    make_tiny_model_dir,
    run_trl_dpo,
    run_trl_sft,
    trl_sample_order,
)

SFT_KEYS = {"loss", "grad_norm", "learning_rate", "entropy", "mean_token_accuracy", "num_tokens", "epoch", "step"}
DPO_KEYS = {
    "loss", "grad_norm", "learning_rate", "epoch", "step", "entropy", "num_tokens", "mean_token_accuracy",
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
}
WORDS = ["hello", "world", "good", "morning", "night", "blue", "red", "colour", "two", "four", "fox", "dog"]


def _sft_rows(n: int) -> list[dict]:
    # Distinct lengths and contents so every row is identifiable in a batch and padding is exercised.
    return [{"text": " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(2 + i % 6)) + f" {i}"} for i in range(n)]


def _dpo_rows(n: int) -> list[dict]:
    return [
        {
            "prompt": f"What is {WORDS[i % len(WORDS)]} {i}?",
            "chosen": " " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 4)),
            "rejected": " " + " ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(2 + i % 3)),
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("trl_harness")


@pytest.fixture(scope="module")
def llama_dir(workdir, tokenizer):
    return make_tiny_model_dir(workdir, "llama", vocab_size=len(tokenizer), seed=0)


@pytest.fixture(scope="module")
def smollm3_dir(workdir, tokenizer):
    return make_tiny_model_dir(workdir, "smollm3", vocab_size=len(tokenizer), seed=1)


# One SFT run shared by several tests: 16 rows, batch 2 x accumulation 2, 3 steps, a tiny max_grad_norm so
# every step is clipped, weight decay on so the decay/no-decay grouping is exercised.
SFT_MAX_GRAD_NORM = 0.05


@pytest.fixture(scope="module")
def sft_run(smollm3_dir, tokenizer):
    return run_trl_sft(
        smollm3_dir, tokenizer, Dataset.from_list(_sft_rows(16)),
        per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=1e-2, weight_decay=0.1, warmup_steps=1, max_grad_norm=SFT_MAX_GRAD_NORM,
    )


def _load(model_dir, state=None):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if state is not None:
        model.load_state_dict(state)
    model.train()  # as Trainer does; dropout is 0 in these configs
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _assert_grads_close(ours: dict, theirs: dict, tol: float = 1e-5) -> None:
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert _rel(ours[name], theirs[name]) < tol, name


def _sft_window_reference(model, micro_batches, max_grad_norm):
    """Plain-PyTorch SFT step: loss = total NLL of the window / target tokens of the window (labels[:, 1:])."""
    num_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    loss_total, entropies, accuracies = 0.0, [], []
    model.zero_grad()
    for b in micro_batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        logprobs = logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
        labels = b["labels"][:, 1:]  # (B, T-1)
        mask = labels != -100
        target_logps = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        loss = -(target_logps * mask).sum() / num_items
        loss.backward()
        loss_total += loss.item()
        with torch.no_grad():
            entropy = -(logprobs.exp() * logprobs).sum(-1)  # (B, T-1)
            entropies.append(entropy[mask].mean().item())
            accuracies.append((logprobs.argmax(-1) == labels)[mask].float().mean().item())
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    metrics = {"loss": loss_total, "entropy": sum(entropies) / len(entropies),
               "mean_token_accuracy": sum(accuracies) / len(accuracies)}
    return metrics, norm.item(), grads, num_items


def test_sft_logs_one_dict_per_step_with_expected_keys(sft_run):
    """3 steps, logging_steps=1 -> exactly 3 step logs with TRL's SFT keys, steps 1..3."""
    assert len(sft_run.logs) == 3
    assert [log["step"] for log in sft_run.logs] == [1, 2, 3]
    for log in sft_run.logs:
        assert set(log) == SFT_KEYS
    assert len(sft_run.grads) == len(sft_run.batches) == len(sft_run.states_before) == 3
    assert all(len(window) == 2 for window in sft_run.batches)  # gradient_accumulation_steps micro-batches
    assert "train_loss" in sft_run.summary


def test_sft_recorded_grads_are_post_clip(sft_run):
    """max_grad_norm=0.05 is far below the tiny model's grad norm (~1-5), so every step is clipped: the recorded
    grads' global norm is 0.05 * norm/(norm + 1e-6) <= 0.05 (+1e-6 for fp32), and the logged grad_norm is the
    pre-clip norm."""
    for log, pre_norm, grads in zip(sft_run.logs, sft_run.grad_norms, sft_run.grads, strict=True):
        assert log["grad_norm"] == pre_norm
        assert pre_norm > SFT_MAX_GRAD_NORM
        clipped = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item()
        assert clipped <= SFT_MAX_GRAD_NORM + 1e-6
        assert clipped == pytest.approx(SFT_MAX_GRAD_NORM * pre_norm / (pre_norm + 1e-6), rel=1e-5)


def test_sft_recomputed_from_recorded_batches_matches_logs(sft_run, smollm3_dir):
    """The key proof: plain PyTorch on (state before step k, recorded micro-batches of step k) reproduces
    TRL's logged loss / entropy / mean_token_accuracy (1e-6 rel), the pre-clip grad norm and the clipped
    grads (1e-5 rel), and num_items_in_batch = target tokens of the whole window."""
    assert sft_run.logs[-1]["mean_token_accuracy"] > 0  # the accuracy formula is tested on non-zero values
    for k, log in enumerate(sft_run.logs):
        model = _load(smollm3_dir, sft_run.states_before[k])
        metrics, norm, grads, num_items = _sft_window_reference(model, sft_run.batches[k], SFT_MAX_GRAD_NORM)
        assert num_items == sft_run.num_items_in_batch[k]
        for key in ("loss", "entropy", "mean_token_accuracy"):
            assert metrics[key] == pytest.approx(log[key], rel=1e-6, abs=1e-7), key
        assert norm == pytest.approx(log["grad_norm"], rel=1e-5)
        _assert_grads_close(grads, sft_run.grads[k])


def test_sft_lr_epoch_and_num_tokens_follow_the_documented_formulas(sft_run):
    """lr: linear warmup 1 step then linear decay over 3 steps; the logged value is the lr the step used
    (read before scheduler.step()): 1e-2 * [0/1, (3-1)/(3-1), (3-2)/(3-1)] = [0, 1e-2, 5e-3].
    epoch = (micro-batches seen) / len(dataloader) = 2k / 8 for 16 rows, batch 2.
    num_tokens = cumulative sum of attention_mask over every micro-batch so far."""
    expected_lr = [0.0, 1e-2, 5e-3]
    assert [log["learning_rate"] for log in sft_run.logs] == pytest.approx(expected_lr, abs=1e-12)
    assert sft_run.learning_rates == pytest.approx(expected_lr, abs=1e-12)
    assert [log["epoch"] for log in sft_run.logs] == [0.25, 0.5, 0.75]
    running = 0
    for log, window in zip(sft_run.logs, sft_run.batches, strict=True):
        running += sum(int(b["attention_mask"].sum()) for b in window)
        assert log["num_tokens"] == running


def test_sft_optimizer_is_fused_adamw_with_norm_and_bias_params_excluded_from_decay(sft_run):
    """Replaying the recorded clipped grads and lrs through torch.optim.AdamW(fused=True) -- weight decay 0.1 on
    every param except the norms (no biases in these models), betas (0.9, 0.999), eps 1e-8 -- reproduces every
    recorded next state bit for bit; the for-loop AdamW differs only by fp32 rounding (< 1e-6 rel). A wrong
    decay grouping would be off by ~lr * wd = 1e-3 relative."""
    names = list(sft_run.grads[0])  # named_parameters() order; the tied lm_head is not a separate param
    no_decay = [n for n in names if "norm" in n.lower() or "bias" in n.lower()]
    assert len(no_decay) == 5 and all(n.endswith("norm.weight") for n in no_decay)  # 2 layers x 2 + final
    targets = sft_run.states_before[1:] + [sft_run.final_state_dict]
    for impl in ({"fused": True}, {"foreach": False}):
        params = {n: torch.nn.Parameter(sft_run.states_before[0][n].clone()) for n in names}
        optimizer = torch.optim.AdamW(
            [{"params": [params[n] for n in names if n not in no_decay], "weight_decay": 0.1},
             {"params": [params[n] for n in no_decay], "weight_decay": 0.0}],
            lr=1e-2, betas=(0.9, 0.999), eps=1e-8, **impl,
        )
        for grads, lr, target in zip(sft_run.grads, sft_run.learning_rates, targets, strict=True):
            for group in optimizer.param_groups:
                group["lr"] = lr
            for n in names:
                params[n].grad = grads[n].clone()
            optimizer.step()
            for n in names:
                if impl.get("fused"):
                    assert torch.equal(params[n].detach(), target[n]), n
                else:
                    assert _rel(params[n].detach(), target[n]) < 1e-6, n
    trl_optimizer = sft_run.trainer.optimizer.optimizer  # accelerate wraps it
    assert trl_optimizer.defaults["fused"] is True


def test_gradient_checkpointing_default_changes_no_number(smollm3_dir, tokenizer, sft_run):
    """TRL 1.16 turns gradient checkpointing on by default; in fp32 without dropout the recomputed forward is
    the same arithmetic, so an otherwise identical run with it off gives bit-identical logs and grads."""
    assert sft_run.args.gradient_checkpointing is True
    off = run_trl_sft(
        smollm3_dir, tokenizer, Dataset.from_list(_sft_rows(16)),
        per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=1e-2, weight_decay=0.1, warmup_steps=1, max_grad_norm=SFT_MAX_GRAD_NORM,
        gradient_checkpointing=False,
    )
    assert [log["loss"] for log in off.logs] == [log["loss"] for log in sft_run.logs]
    for ours, theirs in zip(off.grads, sft_run.grads, strict=True):
        assert all(torch.equal(ours[n], theirs[n]) for n in theirs)


def _rows_of(window: list[dict]) -> list[list[int]]:
    """Unpadded input_ids of every row in a window's micro-batches, in order."""
    rows = []
    for b in window:
        for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True):
            rows.append(ids[mask.bool()].tolist())
    return rows


def test_sample_order_default_seed_matches_trl(sft_run):
    """Default seed 42, no data_seed: TRL's sampler yields randperm(16) seeded with 42 + 0, and the recorded
    micro-batches hold exactly those prepared rows, in that order (12 rows in 3 steps of 2x2)."""
    expected = trl_sample_order(16, seed=42, epoch=0)
    seen = sft_run.sample_indices[0]
    assert seen == expected[: len(seen)] and len(seen) >= 12
    fed = [row for window in sft_run.batches for row in _rows_of(window)]
    assert fed == [sft_run.train_dataset[i]["input_ids"] for i in expected[:12]]


def test_sample_order_uses_data_seed_plus_epoch_and_windows_stop_at_epoch_end(llama_dir, tokenizer):
    """seed=3, data_seed=11, 2 epochs of 10 rows, batch 4 x accumulation 2: epoch e visits randperm(10) seeded
    with 11 + e (a new permutation each epoch; the model seed does not enter). Each epoch has micro-batches of
    4, 4, 2 rows -> windows [4, 4] and [2]: a window never crosses an epoch, so there are 4 steps, the short
    window's loss is normalised by its own target-token count, and epoch = e + (micro-batches seen in e) / 3."""
    run = run_trl_sft(
        llama_dir, tokenizer, Dataset.from_list(_sft_rows(10)),
        per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=2, seed=3, data_seed=11,
        learning_rate=1e-2, max_grad_norm=1.0,
    )
    order = trl_sample_order(10, 11, 0) + trl_sample_order(10, 11, 1)
    assert run.sample_indices == [trl_sample_order(10, 11, 0), trl_sample_order(10, 11, 1)]
    assert trl_sample_order(10, 11, 0) != trl_sample_order(10, 11, 1)
    assert [[len(b["input_ids"]) for b in window] for window in run.batches] == [[4, 4], [2], [4, 4], [2]]
    fed = [row for window in run.batches for row in _rows_of(window)]
    assert fed == [run.train_dataset[i]["input_ids"] for i in order]
    assert [log["epoch"] for log in run.logs] == pytest.approx([2 / 3, 1.0, 1 + 2 / 3, 2.0], abs=1e-12)
    for k, log in enumerate(run.logs):
        model = _load(llama_dir, run.states_before[k])
        metrics, _, grads, num_items = _sft_window_reference(model, run.batches[k], max_grad_norm=1.0)
        assert num_items == run.num_items_in_batch[k]
        assert metrics["loss"] == pytest.approx(log["loss"], rel=1e-6), k
        _assert_grads_close(grads, run.grads[k])


# ---------------------------------------------------------------- DPO

DPO_BETA = 0.1


def _sequence_logps(model, batch):
    """Summed log-probs of completion tokens per row, plus the per-token stats TRL's metrics use."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logprobs = logits[:, :-1].float().log_softmax(-1)  # (2B, T-1, V)
    labels = batch["input_ids"][:, 1:]  # (2B, T-1)
    mask = batch["completion_mask"][:, 1:].bool()  # (2B, T-1)
    target = logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (2B, T-1)
    logps = (target * mask).sum(-1)  # (2B,)
    with torch.no_grad():
        entropy = -(logprobs.exp() * logprobs).sum(-1)  # (2B, T-1)
        mean_logits = logits[:, :-1].float().mean(-1)  # (2B, T-1)
        is_top1 = logprobs.argmax(-1) == labels
    return logps, mask, entropy, mean_logits, is_top1


def _dpo_window_reference(policy, reference, micro_batches, max_grad_norm):
    """Plain-PyTorch sigmoid DPO step: each micro-batch loss is a mean over its pairs, divided by the number
    of micro-batches; metrics are per-micro-batch values averaged over the window."""
    steps = len(micro_batches)
    per_micro = []
    loss_total = 0.0
    policy.zero_grad()
    for b in micro_batches:
        logps, mask, entropy, mean_logits, is_top1 = _sequence_logps(policy, b)
        with torch.no_grad():
            ref_logps = _sequence_logps(reference, b)[0]
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        margin = (chosen - ref_chosen) - (rejected - ref_rejected)  # (B,)
        loss = -F.logsigmoid(DPO_BETA * margin).mean()  # Rafailov et al. 2023, eq. 7
        (loss / steps).backward()
        loss_total += (loss / steps).item()
        chosen_mask, rejected_mask = mask.chunk(2)
        reward_c = DPO_BETA * (chosen - ref_chosen).detach()
        reward_r = DPO_BETA * (rejected - ref_rejected).detach()
        per_micro.append({
            "rewards/chosen": reward_c.mean().item(),
            "rewards/rejected": reward_r.mean().item(),
            "rewards/accuracies": (reward_c > reward_r).float().mean().item(),
            "rewards/margins": (reward_c - reward_r).mean().item(),
            "logps/chosen": chosen.mean().item(),
            "logps/rejected": rejected.mean().item(),
            "logits/chosen": mean_logits.chunk(2)[0][chosen_mask].mean().item(),
            "logits/rejected": mean_logits.chunk(2)[1][rejected_mask].mean().item(),
            "mean_token_accuracy": is_top1.chunk(2)[0][chosen_mask].float().mean().item(),
            "entropy": entropy[mask].mean().item(),
        })
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    metrics = {key: sum(m[key] for m in per_micro) / steps for key in per_micro[0]}
    metrics["loss"] = loss_total
    return metrics, norm.item(), grads


@pytest.fixture(scope="module")
def dpo_run(llama_dir, tokenizer):
    # 10 pairs, batch 2 x accumulation 2, one epoch: windows of 2, 2 and 1 micro-batches (3 steps), so the last
    # step checks that the loss is divided by the window's own micro-batch count. lr large enough that the
    # rewards move after step 1.
    return run_trl_dpo(
        llama_dir, tokenizer, Dataset.from_list(_dpo_rows(10)),
        per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=1,
        learning_rate=5e-3, beta=DPO_BETA, max_grad_norm=1.0,
    )


def test_dpo_first_step_is_ln2_with_zero_rewards(dpo_run):
    """Step 1: policy == reference, so every log-ratio is 0: loss = -log sigmoid(0) = ln 2, rewards and margins
    exactly 0 and accuracies 0 (strict >)."""
    first = dpo_run.logs[0]
    assert set(first) == DPO_KEYS
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert first[key] == 0.0, key
    assert len(dpo_run.logs) == 3 and [log["step"] for log in dpo_run.logs] == [1, 2, 3]
    assert dpo_run.num_items_in_batch == [None, None, None]  # DPO does not normalise by a token count


def test_dpo_recomputed_from_recorded_batches_matches_logs(dpo_run, llama_dir):
    """The key proof for DPO: plain PyTorch on (policy state before step k, reference = the initial model,
    recorded micro-batches) reproduces the logged loss (mean of micro-batch means), all reward/logp/logit
    metrics, the pre-clip grad norm and the clipped grads. Step 3 is a 1-micro-batch window: its loss is that
    micro-batch's mean, not half of it."""
    assert [len(window) for window in dpo_run.batches] == [2, 2, 1]
    assert [log["epoch"] for log in dpo_run.logs] == pytest.approx([0.4, 0.8, 1.0], abs=1e-12)
    reference = _load(llama_dir)
    assert dpo_run.logs[1]["rewards/margins"] != 0.0  # later steps really test the reward formulas
    for k, log in enumerate(dpo_run.logs):
        policy = _load(llama_dir, dpo_run.states_before[k])
        metrics, norm, grads = _dpo_window_reference(policy, reference, dpo_run.batches[k], max_grad_norm=1.0)
        for key, value in metrics.items():
            assert value == pytest.approx(log[key], rel=1e-6, abs=1e-6), key
        assert norm == pytest.approx(log["grad_norm"], rel=1e-5)
        _assert_grads_close(grads, dpo_run.grads[k])


def test_dpo_batches_follow_sample_order_and_chosen_rejected_layout(dpo_run):
    """Each micro-batch is [chosen rows; rejected rows] of the pairs the sampler picked (seed 42), with
    completion_mask marking exactly chosen_ids / rejected_ids after prompt_ids."""
    order = trl_sample_order(10, seed=42, epoch=0)
    assert dpo_run.sample_indices[0] == order[: len(dpo_run.sample_indices[0])]
    position = 0
    for window in dpo_run.batches:
        for b in window:
            pairs = [dpo_run.train_dataset[i] for i in order[position: position + 2]]
            position += 2
            rows = [p["prompt_ids"] + p["chosen_ids"] for p in pairs] + [
                p["prompt_ids"] + p["rejected_ids"] for p in pairs]
            completion_lengths = [len(p["chosen_ids"]) for p in pairs] + [len(p["rejected_ids"]) for p in pairs]
            for ids, attention, completion, row, n in zip(
                b["input_ids"], b["attention_mask"], b["completion_mask"], rows, completion_lengths, strict=True
            ):
                assert ids[attention.bool()].tolist() == row
                assert int(completion.sum()) == n and completion[len(row) - n: len(row)].all()


def test_dpo_lora_reference_is_base_and_adapter_init_is_seeded(llama_dir, tokenizer):
    """LoRA via peft_config: only adapter params get grads; the reference is the base model (adapters off);
    the adapter init equals set_seed(args.seed) -> from_pretrained -> get_peft_model (TRL seeds just before
    loading the model). The recomputed loss/grads match as in the full fine-tuning case."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    def lora():
        return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                          task_type="CAUSAL_LM")

    run = run_trl_dpo(
        llama_dir, tokenizer, Dataset.from_list(_dpo_rows(4)), peft_config=lora(),
        per_device_train_batch_size=2, max_steps=2, learning_rate=5e-2, beta=DPO_BETA, max_grad_norm=1.0,
    )
    assert run.logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0 at init: policy == base
    assert run.grads[0] and all(".lora_" in name for name in run.grads[0])
    set_seed(42)
    policy = get_peft_model(_load(llama_dir), lora())
    assert all(torch.equal(policy.state_dict()[k], v) for k, v in run.states_before[0].items())
    reference = _load(llama_dir)
    for k, log in enumerate(run.logs):
        policy.load_state_dict(run.states_before[k])
        metrics, norm, grads = _dpo_window_reference(policy, reference, run.batches[k], max_grad_norm=1.0)
        assert metrics["loss"] == pytest.approx(log["loss"], rel=1e-6)
        # rewards/margins = β·(small difference of summed log-probs of ~-50..-100): its rounding is relative to
        # those sums (one fp32 ulp of 100 is 7.6e-6), not to the margin, so the floor scales with β·|logps|.
        logps_scale = max(abs(log["logps/chosen"]), abs(log["logps/rejected"]))
        floor = 1e-5 * DPO_BETA * logps_scale
        assert metrics["rewards/margins"] == pytest.approx(log["rewards/margins"], rel=1e-5, abs=floor)
        _assert_grads_close(grads, run.grads[k])
    assert run.logs[1]["rewards/margins"] != 0.0


def test_dpo_precomputed_reference_logps_are_the_initial_model_sums(llama_dir, tokenizer):
    """precompute_ref_log_probs=True: one pass of the initial model before training; each micro-batch then
    carries ref_chosen_logps / ref_rejected_logps (B,) equal to the summed completion log-probs of the
    initial model on those rows (1e-6 rel: the precompute pass pads differently; seen ~1e-7), and step 1 is
    ln 2."""
    run = run_trl_dpo(
        llama_dir, tokenizer, Dataset.from_list(_dpo_rows(4)), precompute_ref_log_probs=True,
        per_device_train_batch_size=2, max_steps=2, learning_rate=5e-3, beta=DPO_BETA,
    )
    assert run.logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    reference = _load(llama_dir)
    for window in run.batches:
        for b in window:
            with torch.no_grad():
                ref_chosen, ref_rejected = _sequence_logps(reference, b)[0].chunk(2)
            assert torch.allclose(b["ref_chosen_logps"], ref_chosen, rtol=1e-6, atol=0)
            assert torch.allclose(b["ref_rejected_logps"], ref_rejected, rtol=1e-6, atol=0)
