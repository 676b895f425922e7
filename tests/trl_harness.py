"""Run TRL 1.16's SFTTrainer / DPOTrainer offline on tiny models and record everything a parity test needs.

Our engine must reproduce TRL step for step (loss, metrics, clipped gradients; fp32 on CPU). This module runs
the real TRL trainers and records, per optimizer step: every `on_log` dict at full precision, the clipped
gradients, the pre-clip gradient norm, the learning rate used, the model state before the step, the exact
micro-batches TRL fed to `compute_loss`, and the dataset indices its sampler yielded.

    from tests.trl_harness import load_or_build_tokenizer, make_tiny_model_dir, run_trl_sft
    tok = load_or_build_tokenizer(tmp_path)
    model_dir = make_tiny_model_dir(tmp_path, "llama", vocab_size=len(tok))
    run = run_trl_sft(model_dir, tok, Dataset.from_list(rows), per_device_train_batch_size=4, max_steps=3)
    run.logs[0]["loss"], run.grads[0]["model.norm.weight"], run.batches[0][0]["input_ids"]

Facts about TRL 1.16.0 / transformers 5.23 / accelerate 1.15 that a loop must follow to match exactly
(each one read from the source and checked by experiment: tests/test_trl_harness.py)
=====================================================================================================

Seeds and data order
- `Trainer.__init__` calls `set_seed(args.seed)` (random, numpy, torch) first; SFTTrainer/DPOTrainer also call
  `set_seed(args.seed)` before loading the model (so PEFT adapter init is seeded by `args.seed`).
- Sampler: transformers builds `RandomSampler(train_dataset)`; `accelerator.prepare` replaces it with accelerate's
  `SeedableRandomSampler` (`AcceleratorConfig.use_seedable_sampler` defaults to True). Its seed is
  `initial_seed + epoch`, where `initial_seed = args.data_seed` if set, else `torch.initial_seed()` at the time
  `train()` builds the dataloader, which is `args.seed` (set by `set_seed` in `__init__`; a
  `torch.manual_seed(x)` by user code between trainer construction and `train()` would silently make it x).
  The order for epoch `e` is
  `torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)).tolist()` (see `trl_sample_order`),
  cut into batches of `per_device_train_batch_size`, the last one short (`dataloader_drop_last=False`).
  Epoch `e` counts from 0; a new permutation each epoch. Optimizer steps take `gradient_accumulation_steps`
  consecutive micro-batches; the last window of an epoch may be shorter (windows never cross epochs).
- SFT `shuffle_dataset` defaults to False in 1.16. If True, `_prepare_dataset` ends with
  `dataset.shuffle(seed=args.seed)` (and also shuffles once more, same seed, just before packing).
  DPO never shuffles at prep time. Dataset prep drops nothing in SFT unless a row is fully masked after
  truncation; DPO drops rows whose prompt alone is >= max_length (keep_start).

Per micro-batch forward
- `model.train()` is called before every micro-batch; `use_cache=False` is passed. `gradient_checkpointing`
  defaults to True in both configs (mapped to transformers' `activation_checkpointing`); in fp32 without dropout
  it changes no number (checked: grads bit-identical with it on and off). SFT does not disable dropout
  (tiny configs have dropout 0); DPO `disable_dropout=True` zeroes every nn.Dropout p in policy and reference.
- Log-probs come from TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`): backbone hidden states
  `h[:, :-1]` projected by `lm_head.weight` in vocab chunks, log-sum-exp folded in fp32; labels `[:, 1:]`;
  every per-token field is 0 where label == -100. `is_top1` = label is the FIRST argmax (ties with an earlier
  vocab id count as wrong). `entropy` = -sum p log p of the full next-token distribution.

SFT loss and metrics (per optimizer step = window of G micro-batches)
- `num_items_in_batch` N = sum over the window's micro-batches of `(labels[:, 1:] != -100).sum()` (counted
  before any forward). Micro-batch loss = sum(-logp over targets) / N; it is NOT divided by G again
  (loss counts as scaled for GA because the model forward accepts **kwargs). Backward on each micro-batch
  loss, grads accumulate; so the step gradient is that of (total NLL of the window) / N.
- logged `loss` = float32 sum of the G micro-batch losses (= window token-mean NLL), divided by the number of
  optimizer steps since the last log (1 with logging_steps=1). `.item()` of an fp32 tensor.
- `entropy`, `mean_token_accuracy`: per micro-batch, sum over target tokens / number of target tokens
  (0.0 if none), `.item()`; logged = plain mean over the micro-batches since the last log (not token-weighted
  across micro-batches).
- `num_tokens` = cumulative (since training start) sum of `attention_mask` over all micro-batches so far
  (padding not counted); logged value is the running total at log time.
SFT collator: right-pads input_ids with pad_token_id, labels with -100, attention_mask 1/0, padded to the
longest row of the micro-batch (no pad_to_multiple_of by default). Batch keys: input_ids, attention_mask, labels.

DPO loss and metrics
- Batch: `[chosen rows; rejected rows]` (2B, T), T = longest prompt+completion of the 2B, right-padded;
  keys input_ids, attention_mask, completion_mask (+ ref_chosen_logps/ref_rejected_logps when precomputed).
  labels = input_ids with completion_mask == 0 set to -100. logps = SUM over completion tokens.
- Reference: explicit ref_model; else PEFT -> same model with adapters disabled; else a second copy loaded
  from `model.config._name_or_path` (so the model must be on disk); `precompute_ref_log_probs=True` -> one
  pass before training over the prepared dataset in order (no shuffle), batch size
  `precompute_ref_batch_size or per_device_train_batch_size`, cached as dataset columns.
- micro-batch loss = mean over the B pairs of the per-pair loss (weighted sum over `loss_type` list);
  DPOTrainer sets `loss_is_scaled_for_ga = False`, so Trainer divides each micro-batch loss by G
  (`current_gradient_accumulation_steps`, = the window's actual number of micro-batches) before backward.
  logged `loss` = sum over the window of (micro loss / G) = mean of micro-batch means.
- Metrics, each a per-micro-batch scalar, logged as the plain mean over micro-batches since the last log:
  `rewards/chosen` = mean(beta*(c - rc)), `rewards/rejected` = mean(beta*(r - rr)),
  `rewards/accuracies` = mean((beta*(c-rc) > beta*(r-rr)).float()), `rewards/margins` = mean of the difference,
  `logps/chosen` = mean(c), `logps/rejected` = mean(r) (summed logps),
  `logits/chosen` = sum over chosen completion tokens of (mean logit over vocab) / #chosen completion tokens
  (same for rejected), `mean_token_accuracy` = is_top1 over CHOSEN completion tokens only / their count,
  `entropy` = over all 2B completion tokens (chosen and rejected) / their count,
  `num_tokens` = cumulative sum of attention_mask (both halves), as in SFT.
- DPO `padding_free=True` is ignored in 1.16 (warns, falls back to padding). There is no `use_logits_to_keep`
  option in 1.16.

Optimizer, clipping, schedule, logging order (one optimizer step)
- Optimizer: `optim` defaults to "adamw_torch_fused" (torch >= 2.8): `torch.optim.AdamW(fused=True)`, lr =
  learning_rate, betas (adam_beta1, adam_beta2) = (0.9, 0.999), eps 1e-8, weight_decay 0.0 by default.
  Two param groups: decay = params whose lowercased dotted name matches none of `bias`, `layernorm`, `rmsnorm`,
  `(^|\\.)norm($|\\.)`, `_norm($|\\.)` and that are not inside an nn.LayerNorm; the rest get weight_decay 0.
  Only requires_grad params; tied embeddings appear once (named_parameters dedups).
- Scheduler: `get_scheduler(lr_scheduler_type, num_warmup_steps=args.get_warmup_steps(max_steps))`; "linear":
  lr(k) = base * (k / max(1, W) if k < W else max(0, (S - k) / max(1, S - W))) for the k-th update (k from 0),
  S = max_steps (or ceil(epochs * ceil(len(dataloader) / G))), W = warmup_steps (int if >= 1, else
  ceil(S * warmup_steps)).
- Per micro-batch: `on_step_begin` (first micro-batch of a window only) -> `training_step` (model.train(),
  compute_loss, loss / G unless scaled, `accelerator.backward`) -> add the detached loss to an fp32 running
  total `_tr_loss` -> `num_tokens`/flos bookkeeping -> `on_substep_end` (not last) ...
- Order in `_run_epoch` at the last micro-batch of a window: `accelerator.clip_grad_norm_(model.parameters(),
  max_grad_norm)` (torch `clip_grad_norm_`: total = L2 norm of all grads, every grad *= min(1, max_norm /
  (total + 1e-6))) -> `on_pre_optimizer_step` (grads are post-clip here) -> `optimizer.step()` ->
  `on_optimizer_step` -> `learning_rate = lr_scheduler.get_last_lr()[0]` (the lr this step USED, read BEFORE
  `lr_scheduler.step()`) -> `lr_scheduler.step()` -> `model.zero_grad()` -> `global_step += 1` ->
  `state.epoch = epoch + (micro_step_in_epoch + 1) / len(dataloader)` -> `on_step_end` -> log.
  With max_grad_norm <= 0 there is no clipping and grad_norm is the unclipped norm.
- The log dict: `loss`, `grad_norm` (pre-clip total norm, `.item()`), `learning_rate` (as above), then the
  trainer's averaged metrics, then `epoch` (float, formula above). Nothing is rounded (the progress printers
  format copies). A final summary log (`train_runtime`, `train_loss` = mean of all step losses, ...) follows
  the last step. The harness adds "step" (= global_step) to each recorded step log.
- With logging_steps = L > 1 (checked): `loss` = (fp32 sum of the L step losses) / L; `grad_norm` and
  `learning_rate` are the LAST step's (not averaged); `entropy`, `mean_token_accuracy`, DPO rewards/logps/
  logits = plain mean over all L*G micro-batch values; `num_tokens` = running total; `epoch` at log time.
- AdamW: replaying TRL's clipped grads and lrs through `torch.optim.AdamW(fused=True)` with the same groups
  reproduces TRL's parameters bit for bit on CPU; the for-loop/foreach AdamW differ by ~1 ulp (6e-8 abs).

LoRA (PEFT) and precomputed reference
- TRL calls `set_seed(args.seed)`, then loads the model (loading consumes no RNG), then `get_peft_model`: the
  adapter init equals `set_seed(seed); from_pretrained(...); get_peft_model(model, config)` exactly.
  Only adapter params require grad; names are PEFT's (`base_model.model....lora_A.default.weight`).
- `precompute_ref_log_probs=True`: the reference logps are computed before training (so before the
  sampler exists) with the same collator, in dataset order, in batches of `precompute_ref_batch_size or
  per_device_train_batch_size`; different padding than the training batches, so they can differ from an
  in-loop reference forward by fp32 rounding (~1e-7 rel). Stored as float32 columns; exact thereafter.

Not covered here: multi-process (DDP/FSDP), bf16 autocast, packing/padding_free SFT, liger, evaluation, and
dropout > 0 (its RNG stream: note each `iter(dataloader)` also draws one int64 from the global torch RNG for
the worker base seed, which would shift dropout masks; the sampler has its own generator and is unaffected).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_TOKENIZER_DIR = REPO_ROOT / "data" / "assets" / "tokenizer"

# Tiny sizes shared by every parity test: fast on 2 CPU cores, yet GQA (4 heads / 2 kv heads) and >1 layer.
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class TrlRun:
    """Everything recorded from one TRL training run (all tensors detached, cloned, on CPU).

    Attributes:
        logs: one `on_log` dict per optimizer step (logging_steps=1), full-precision floats, plus "step".
        grads: per optimizer step, parameter name -> gradient after clipping (as the optimizer saw it).
        batches: per optimizer step, the micro-batches (dicts of tensors) TRL passed to `compute_loss`.
        final_state_dict: the model's state_dict after training.
        grad_norms: per optimizer step, the total gradient norm before clipping.
        learning_rates: per optimizer step, the lr the optimizer used for that step.
        states_before: per optimizer step, the model's state_dict before the step's first micro-batch.
        num_items_in_batch: per optimizer step, what Trainer passed as `num_items_in_batch` (SFT: target tokens
            in the window; DPO: None).
        sample_indices: per epoch started, the dataset indices the sampler yielded, in order.
        train_dataset: the prepared dataset TRL trained on (after `_prepare_dataset`, precompute, etc.).
        summary: the final summary log (train_runtime, train_loss, ...).
        args: the TRL config object actually used.
        trainer: the TRL trainer itself (optimizer, lr_scheduler, model), for inspection after training.
    """

    logs: list[dict[str, Any]]
    grads: list[dict[str, Tensor]]
    batches: list[list[dict[str, Tensor]]]
    final_state_dict: dict[str, Tensor]
    grad_norms: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    states_before: list[dict[str, Tensor]] = field(default_factory=list)
    num_items_in_batch: list[int | None] = field(default_factory=list)
    sample_indices: list[list[int]] = field(default_factory=list)
    train_dataset: Any = None
    summary: dict[str, Any] = field(default_factory=dict)
    args: Any = None
    trainer: Any = None


def trl_sample_order(n: int, seed: int, epoch: int) -> list[int]:
    """The dataset indices, in order, that TRL's training dataloader visits in `epoch` (0-based).

    accelerate's `SeedableRandomSampler` reseeds a fresh CPU generator with `seed + epoch` and yields
    `torch.randperm(n)`. `seed` is `args.data_seed` when set, else `args.seed`.
    """
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(n, generator=generator).tolist()


def load_or_build_tokenizer(tmp_path: Path | None = None):
    """The shipped tokenizer (data/assets/tokenizer) if present, else a tiny byte-level BPE built here.

    The built one follows the project's tokenizer contract: eos `<|im_end|>`, pad `<|pad|>` (distinct), no BOS,
    a ChatML template with `{% generation %}` around assistant content.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (SHIPPED_TOKENIZER_DIR / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(SHIPPED_TOKENIZER_DIR))

    from tokenizers import ByteLevelBPETokenizer

    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "What is two plus two? Two plus two is four.",
        "Name a colour. Blue is a colour. Red is a colour.",
        "hello world, hello there, good morning and good night",
        "0123456789 + - * / = ? ! . , : ;",
    ]
    bpe = ByteLevelBPETokenizer()
    special = ["<|im_start|>", "<|im_end|>", "<|pad|>"]
    bpe.train_from_iterator(corpus, vocab_size=320, min_frequency=1, special_tokens=special, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>", pad_token="<|pad|>", padding_side="right"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    if tmp_path is not None:
        tokenizer.save_pretrained(str(Path(tmp_path) / "tokenizer"))
    return tokenizer


def make_tiny_model_dir(
    tmp_path: Path, arch: str = "smollm3", vocab_size: int = 320, seed: int = 0, **config_overrides
) -> Path:
    """Build a tiny randomly initialised causal LM from its config and `save_pretrained` it (fp32).

    TRL's DPOTrainer reloads the reference from `model.config._name_or_path` when no ref_model is given, so the
    model has to live on disk. `tie_word_embeddings` keeps the architecture's default (SmolLM3 True, Llama False).

    Args:
        tmp_path: parent folder; the model goes to `tmp_path / f"tiny-{arch}-{seed}"`.
        arch: "smollm3" or "llama".
        vocab_size: usually `len(tokenizer)`.
        seed: torch seed for the weight init (the global RNG state is restored afterwards).
        **config_overrides: extra config fields (e.g. pad_token_id, eos_token_id). The special token ids
            default to None (the configs' defaults are the real models' ids, outside a tiny vocabulary); TRL
            copies the tokenizer's pad id onto the loaded model's config anyway.

    Returns:
        The model folder.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, SmolLM3Config, SmolLM3ForCausalLM

    classes = {"smollm3": (SmolLM3Config, SmolLM3ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    if arch not in classes:
        raise ValueError(f"arch must be one of {sorted(classes)}, got {arch!r}")
    config_cls, model_cls = classes[arch]
    no_special_ids = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)
    config = config_cls(vocab_size=vocab_size, **{**TINY_CONFIG, **no_special_ids, **config_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).float()
    out = Path(tmp_path) / f"tiny-{arch}-{seed}"
    model.save_pretrained(str(out))
    return out


def _to_cpu_clone(batch: dict[str, Any]) -> dict[str, Tensor]:
    return {k: v.detach().clone().cpu() for k, v in batch.items() if isinstance(v, Tensor)}


def _state_clone(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}


def _make_recorder(run: TrlRun):
    from transformers import TrainerCallback

    class _Recorder(TrainerCallback):
        """Records the states, clipped grads and lr at the hooks that bracket one optimizer step."""

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            # Called before the first micro-batch of each accumulation window: the state the step starts from.
            run.states_before.append(_state_clone(model))
            run.batches.append([])

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            # Trainer calls this after clip_grad_norm_ and before optimizer.step(): the grads are post-clip.
            run.grads.append(
                {
                    name: param.grad.detach().clone().cpu()
                    for name, param in model.named_parameters()
                    if param.requires_grad and param.grad is not None
                }
            )
            run.learning_rates.append(float(optimizer.param_groups[0]["lr"]))

        def on_log(self, args, state, control, logs=None, **kwargs):
            entry = dict(logs)
            if "train_runtime" in entry:
                run.summary = entry
            else:
                entry["step"] = state.global_step
                run.logs.append(entry)

    return _Recorder()


def _instrument(trainer, run: TrlRun) -> None:
    """Wrap the trainer's own methods (on the instance) to record batches, grad norms and sampler indices."""
    from accelerate.data_loader import SeedableRandomSampler
    from transformers import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)

    original_compute_loss = trainer.compute_loss

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            # Copy before the call: TRL adds keys (use_cache) to `inputs` in place.
            run.batches[-1].append(_to_cpu_clone(inputs))
            if len(run.batches[-1]) == 1:
                n = num_items_in_batch
                run.num_items_in_batch.append(int(n) if n is not None else None)
        return original_compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    trainer.compute_loss = compute_loss

    original_get_grad_norm = trainer._get_grad_norm

    def get_grad_norm(model, grad_norm=None):
        # Called once per optimizer step with the norm `clip_grad_norm_` returned (before clipping).
        norm = original_get_grad_norm(model, grad_norm=grad_norm)
        run.grad_norms.append(float(norm))
        return norm

    trainer._get_grad_norm = get_grad_norm

    original_get_train_dataloader = trainer.get_train_dataloader

    def get_train_dataloader():
        dataloader = original_get_train_dataloader()
        sampler = dataloader.batch_sampler.sampler
        if not isinstance(sampler, SeedableRandomSampler):
            raise AssertionError(f"expected accelerate's SeedableRandomSampler, got {type(sampler).__name__}")

        class _RecordingSampler(type(sampler)):
            # Same generator and seeding; only observes the indices it yields.
            def __iter__(self):
                indices: list[int] = []
                run.sample_indices.append(indices)
                for index in super().__iter__():
                    indices.append(index)
                    yield index

        sampler.__class__ = _RecordingSampler
        return dataloader

    trainer.get_train_dataloader = get_train_dataloader


def _base_config_kwargs(output_dir: str | None) -> dict[str, Any]:
    return dict(
        output_dir=output_dir or tempfile.mkdtemp(prefix="trl_harness_"),
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )


def run_trl_sft(model_dir: Path, tokenizer, train_dataset, output_dir: str | None = None,
                **sft_config_overrides) -> TrlRun:
    """Train with TRL's SFTTrainer (CPU, fp32) and record every step.

    Args:
        model_dir: a folder from `make_tiny_model_dir` (loaded by TRL itself, fp32).
        tokenizer: the tokenizer (TRL may set its pad token).
        train_dataset: a `datasets.Dataset` in any format SFTTrainer accepts.
        output_dir: TRL's output_dir (nothing is saved there); a fresh temp dir by default.
        **sft_config_overrides: any `SFTConfig` field (e.g. max_steps, per_device_train_batch_size,
            gradient_accumulation_steps, learning_rate, max_grad_norm).

    Returns:
        The recorded `TrlRun`.
    """
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**{**_base_config_kwargs(output_dir), **sft_config_overrides})
    run = TrlRun(logs=[], grads=[], batches=[], final_state_dict={}, args=args)
    trainer = SFTTrainer(
        model=str(model_dir), args=args, train_dataset=train_dataset, processing_class=tokenizer,
        callbacks=[_make_recorder(run)],
    )
    return _train(trainer, run)


def run_trl_dpo(model_dir: Path, tokenizer, train_dataset, ref_model_dir: Path | None = None, peft_config=None,
                output_dir: str | None = None, **dpo_config_overrides) -> TrlRun:
    """Train with TRL's DPOTrainer (CPU, fp32) and record every step.

    Args:
        model_dir: the policy's folder; with no `ref_model_dir` and no PEFT, TRL reloads the reference from it.
        tokenizer: the tokenizer.
        train_dataset: a preference `datasets.Dataset` (prompt/chosen/rejected, text or conversational).
        ref_model_dir: an explicit reference model folder (loaded here in fp32), or None.
        peft_config: a `peft.LoraConfig` to train an adapter (reference = adapters disabled), or None.
        output_dir: TRL's output_dir (nothing is saved there); a fresh temp dir by default.
        **dpo_config_overrides: any `DPOConfig` field (beta, loss_type, precompute_ref_log_probs, ...).

    Returns:
        The recorded `TrlRun`.
    """
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**{**_base_config_kwargs(output_dir), **dpo_config_overrides})
    run = TrlRun(logs=[], grads=[], batches=[], final_state_dict={}, args=args)
    ref_model = None
    if ref_model_dir is not None:
        ref_model = AutoModelForCausalLM.from_pretrained(str(ref_model_dir), dtype=torch.float32)
    trainer = DPOTrainer(
        model=str(model_dir), ref_model=ref_model, args=args, train_dataset=train_dataset,
        processing_class=tokenizer, peft_config=peft_config, callbacks=[_make_recorder(run)],
    )
    return _train(trainer, run)


def _train(trainer, run: TrlRun) -> TrlRun:
    _instrument(trainer, run)
    run.trainer = trainer
    run.train_dataset = trainer.train_dataset
    trainer.train()
    run.final_state_dict = _state_clone(trainer.model)
    steps = len(run.grads)
    if not (len(run.batches) == len(run.states_before) == len(run.grad_norms) == len(run.learning_rates) == steps):
        raise AssertionError(
            f"recording out of step: {len(run.batches)} batches, {len(run.states_before)} states, "
            f"{len(run.grad_norms)} norms, {len(run.learning_rates)} lrs, {steps} grads"
        )
    return run
