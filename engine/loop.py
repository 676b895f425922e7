"""The training loop: read it top to bottom.

    config -> accelerator, tokenizer, model (+ LoRA) -> data -> optimizer, schedule -> (resume) ->
    for each optimizer step:
        take the next `gradient_accumulation_steps` micro-batches (the window)
        for each micro-batch: loss = method.loss(policy, batch, window); backward
        clip, optimizer step, schedule step
        log / evaluate / checkpoint
    -> final model (atomically) -> method.finish (e.g. the DPO demo report)

Data order is a pure function of (seed, epoch, position), so a resumed run sees exactly the micro-batches an
uninterrupted one would, and matches the order of TRL's seeded sampler.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from engine import checkpoint as ckpt
from engine.config import TrainConfig, config_to_dict
from engine.errors import UserError
from engine.forward import LeanCausalLM, plain_model
from engine.tracking import MetricsWriter, MetricWindow

# Optional test/debug hooks: called with (step, model) right after gradient clipping, before optimizer.step().
StepHook = Callable[[int, torch.nn.Module], None]


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    logs: list[dict[str, Any]] = field(default_factory=list)
    final_metrics: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- data order


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch.

    Same as accelerate's seedable sampler under transformers' Trainer: `randperm(n)` from a generator seeded with
    `seed + epoch`. Deterministic, so resuming needs only the position, not a saved sampler.
    """
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def micro_batches_of_epoch(order: list[int], batch_size: int, num_processes: int, process_index: int) -> list[list[int]]:
    """Split an epoch's order into this process's micro-batches.

    Global micro-batch k holds order[k*B*P : (k+1)*B*P]; process p takes its p-th slice of B. A short last global
    batch is topped up from the start of the epoch so every process gets B examples (accelerate's even_batches);
    with one process the short last batch is kept as it is (as transformers' Trainer does).
    """
    global_size = batch_size * num_processes
    batches = []
    for start in range(0, len(order), global_size):
        chunk = order[start : start + global_size]
        if len(chunk) < global_size and num_processes > 1:
            chunk = chunk + order[: global_size - len(chunk)]
        batches.append(chunk[process_index * batch_size : (process_index + 1) * batch_size])
    return [b for b in batches if b]


# ---------------------------------------------------------------------- optimizer


# transformers' convention (what TRL uses): no weight decay on biases and normalisation weights.
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; fused where torch supports it (TRL's default `adamw_torch_fused`)."""
    no_decay_modules = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = _NO_DECAY.search(name.lower()) or id(param) in no_decay_modules
        (no_decay if skip else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    device = next(model.parameters()).device
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        fused=device.type in ("cpu", "cuda"),
    )


def build_scheduler(optimizer, config: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    return get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


# ---------------------------------------------------------------------- stop on signal


class StopRequest:
    """SIGTERM / Ctrl-C: finish the current step, checkpoint, exit with instructions (installed by the loop)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under a test runner thread): no handler
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n[nanopost] received signal {signum}: finishing this step, then saving a checkpoint.", flush=True)

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether to stop now, the same answer on every process: a signal can reach the processes at different
        moments (or only one of them), and a process that saved and exited while another ran on would hang both."""
        if accelerator.num_processes == 1:
            return self.requested
        flags = accelerator.gather(torch.tensor([int(self.requested)], device=accelerator.device))
        return bool(flags.max())

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------- the loop


def make_method(config: TrainConfig, tokenizer, accelerator, model=None):
    if config.method == "sft":
        from engine.sft import SFTMethod

        return SFTMethod(config, tokenizer, accelerator)
    from engine.dpo import DPOMethod

    return DPOMethod(config, tokenizer, accelerator)


def train(config: TrainConfig, *, step_hook: StepHook | None = None) -> TrainResult:
    from engine.setup import build_accelerator, load_datasets, load_model_and_tokenizer, save_final_model

    started = time.time()
    output_dir = Path(config.output_dir)
    _check_output_dir(output_dir)
    accelerator = build_accelerator(config)
    set_seed(config.seed)
    resume_from = ckpt.resolve_resume_path(config.resume_from_checkpoint, config.output_dir)
    if resume_from is not None:
        _check_resume_compatible(resume_from, config)

    model, tokenizer = load_model_and_tokenizer(config, accelerator)
    method = make_method(config, tokenizer, accelerator)
    # Seed again after the model (and LoRA init) took its draws, as transformers' Trainer does: dropout masks then
    # follow the same random stream as TRL's, so runs with dropout match TRL too.
    set_seed(config.seed)

    # -------------------------------------------------------------- data
    train_raw, eval_raw = load_datasets(config)
    train_examples, train_report = method.prepare(train_raw, split_name=config.dataset_train_split)
    eval_examples = None
    if eval_raw is not None:  # also when --eval_steps 0: the DPO demo reports on the held-out split
        eval_examples, _ = method.prepare(eval_raw, split_name=config.dataset_test_split)
    if accelerator.is_main_process and getattr(train_report, "summary", None):
        print(f"[nanopost] {train_report.summary()}", flush=True)
    if not train_examples:
        raise UserError("the training split has no usable rows after preparation (see the report above)")

    world, rank = accelerator.num_processes, accelerator.process_index
    micro_per_epoch = len(micro_batches_of_epoch(list(range(len(train_examples))),
                                                 config.per_device_train_batch_size, world, rank))
    ga = config.gradient_accumulation_steps
    steps_per_epoch = max(math.ceil(micro_per_epoch / ga), 1)
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)

    # What accelerate prepares: the model with the lean LM head as its forward (engine/forward.py); `model` stays
    # the plain transformers model (LoRA, checkpoints, save_pretrained).
    policy = LeanCausalLM(model)
    # Method-specific set-up that needs the model and data (e.g. DPO's reference log-probs).
    policy = method.setup(policy, train_examples, accelerator) if hasattr(method, "setup") else policy

    # -------------------------------------------------------------- optimizer
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps)
    policy, optimizer = accelerator.prepare(policy, optimizer)

    # -------------------------------------------------------------- resume
    global_step, micro_position, metric_window = 0, 0, MetricWindow()
    tokens_seen, loss_since_log, steps_since_log = 0.0, 0.0, 0
    if resume_from is not None:
        state = ckpt.read_state(resume_from)
        _load_training_state(resume_from, accelerator, policy, optimizer, scheduler, config)
        global_step, micro_position = state["global_step"], state["micro_batches_seen"]
        tokens_seen = state.get("num_tokens", 0.0)
        loss_since_log, steps_since_log = state.get("loss_since_log", 0.0), state.get("steps_since_log", 0)
        metric_window.load_state_dict(state.get("metric_window", {}))
        ckpt.set_rng_state(torch.load(resume_from / "rng_state.pth", weights_only=False))
        if accelerator.is_main_process:
            print(f"[nanopost] resumed from {resume_from} at step {global_step}", flush=True)

    writer = MetricsWriter(output_dir, accelerator, resume_step=global_step)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(config_to_dict(config), indent=2) + "\n")

    def micro_batch_stream(position: int):
        """Yield (epoch, batch) from micro-batch `position` on, epoch after epoch."""
        epoch = position // micro_per_epoch
        offset = position % micro_per_epoch
        while True:
            if offset == 0:  # a new epoch: a torch DataLoader draws its worker base seed here; keep TRL's stream
                torch.empty((), dtype=torch.int64).random_()
            order = epoch_order(len(train_examples), config.seed, epoch)
            for indices in micro_batches_of_epoch(order, config.per_device_train_batch_size, world, rank)[offset:]:
                yield epoch, method.collate([train_examples[i] for i in indices])
            epoch, offset = epoch + 1, 0

    stream = micro_batch_stream(micro_position)
    policy.train()
    logs: list[dict[str, Any]] = []
    last_checkpoint = resume_from
    progress = tqdm(total=total_steps, initial=global_step, desc=f"{config.method}", unit="step",
                    disable=config.disable_tqdm or not accelerator.is_main_process, dynamic_ncols=True)

    with StopRequest() as stop:
        while global_step < total_steps:
            # The window: the next `ga` micro-batches, but never across an epoch's end (as transformers does).
            epoch_of_window = micro_position // micro_per_epoch
            in_epoch = micro_position % micro_per_epoch
            window_size = min(ga, micro_per_epoch - in_epoch)
            batches = [next(stream)[1] for _ in range(window_size)]
            micro_position += window_size
            window = method.window(batches)  # what each micro-batch's loss is normalised by

            step_loss = 0.0
            for index, batch in enumerate(batches):
                batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                sync = index == len(batches) - 1
                with (nullcontext() if sync else accelerator.no_sync(policy)), accelerator.autocast():
                    loss, metrics = method.loss(policy, batch, window)
                _check_finite(loss, global_step + 1, "loss", last_checkpoint)
                accelerator.backward(loss)
                step_loss += float(loss.detach())  # SFT: world x this process's share; averaged over processes below
                tokens_seen += metrics.pop("num_tokens")  # already summed over processes by the method
                metric_window.add(metrics)

            grad_norm = _clip(accelerator, policy, config.max_grad_norm)
            _check_finite(grad_norm, global_step + 1, "gradient norm", last_checkpoint)
            if step_hook is not None:
                step_hook(global_step + 1, model)
            learning_rate = scheduler.get_last_lr()[0]  # the rate this step uses (what TRL logs)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            progress.update(1)

            step_loss = float(accelerator.gather(torch.tensor(step_loss, device=accelerator.device)).mean())
            loss_since_log += step_loss
            steps_since_log += 1
            epoch = epoch_of_window + (in_epoch + window_size) / micro_per_epoch

            if global_step % config.logging_steps == 0 or global_step == total_steps:
                record = {
                    "step": global_step,
                    "epoch": epoch,
                    "loss": loss_since_log / steps_since_log,
                    "grad_norm": float(grad_norm),
                    "learning_rate": learning_rate,
                    **metric_window.mean_and_reset(),  # per-micro-batch values, already global
                    "num_tokens": tokens_seen,
                }
                writer.write(record)
                logs.append(record)
                loss_since_log, steps_since_log = 0.0, 0
                progress.set_postfix(loss=f"{record['loss']:.4f}")

            if eval_examples and config.eval_steps and global_step % config.eval_steps == 0:
                record = {"step": global_step, "epoch": epoch, **evaluate(method, policy, eval_examples, config,
                                                                          accelerator)}
                writer.write(record)
                logs.append(record)
                policy.train()

            state = {
                "global_step": global_step, "epoch": epoch, "micro_batches_seen": micro_position,
                "num_tokens": tokens_seen, "metric_window": metric_window.state_dict(), "method": config.method,
                "model_name_or_path": config.model_name_or_path, "total_steps": total_steps,
                "loss_since_log": loss_since_log, "steps_since_log": steps_since_log,
            }
            stop_now = global_step < total_steps and stop.agreed(accelerator)
            if (config.save_steps and global_step % config.save_steps == 0) or stop_now:
                _check_finite_weights(accelerator, policy, global_step, last_checkpoint)
                last_checkpoint = save_checkpoint(output_dir, global_step, state, accelerator, policy, optimizer,
                                                  scheduler, config, tokenizer)
            if stop_now:
                progress.close()
                raise UserError(
                    f"stopped at step {global_step} on request; checkpoint saved in {last_checkpoint}. "
                    f"Resume with: python train.py ... --resume_from_checkpoint {last_checkpoint}"
                )
    progress.close()

    final_metrics: dict[str, Any] = {}
    if eval_examples and config.eval_steps != 0 and (not config.eval_steps or global_step % config.eval_steps):
        final_metrics = evaluate(method, policy, eval_examples, config, accelerator)
        record = {"step": global_step, "epoch": micro_position / micro_per_epoch, **final_metrics}
        writer.write(record)
        logs.append(record)
    _check_finite_weights(accelerator, policy, global_step, last_checkpoint)
    save_final_model(config, accelerator, policy, tokenizer, output_dir)
    if hasattr(method, "finish"):
        final_metrics.update(method.finish(model, output_dir) or {})
    if accelerator.is_main_process:
        print(f"[nanopost] done: {global_step} steps in {time.time() - started:.0f}s; model in {output_dir}",
              flush=True)
    accelerator.end_training()
    return TrainResult(output_dir, global_step, logs, final_metrics)


def _check_output_dir(output_dir: Path) -> None:
    """Fail before any long work if the output folder cannot be written."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir}: is a file; give a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"  # one per process: launched processes run this at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"--output_dir {output_dir}: cannot write there ({error.strerror or error}); "
                        "choose a writable folder") from error


def _clip(accelerator: Accelerator, model, max_grad_norm: float) -> torch.Tensor:
    """Global gradient norm before clipping (what TRL logs as grad_norm); clips in place when max_grad_norm > 0."""
    if max_grad_norm > 0:
        return accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else torch.tensor(0.0)


def _check_finite(value: torch.Tensor, step: int, what: str, last_checkpoint: Path | None) -> None:
    if not torch.isfinite(torch.as_tensor(value)).all():
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
        raise UserError(
            f"non-finite {what} at step {step}: stopping before it corrupts the model ({where}); "
            "try a lower --learning_rate, --max_grad_norm 1.0, or check the data"
        )


def _check_finite_weights(accelerator: Accelerator, model, step: int, last_checkpoint: Path | None) -> None:
    """Refuse to write a checkpoint or final model holding non-finite weights.

    Finite gradients can still give non-finite weights (e.g. --learning_rate 1e39 is finite in Python but inf in
    fp32), and after the last step no further loss would reveal it; checked only when saving, so it costs nothing
    per step. Every process gets the same answer (a sharded model holds different weights on each), so all stop.
    """
    bad = [name for name, param in model.named_parameters()
           if param.requires_grad and not bool(torch.isfinite(param.detach()).all())]
    any_bad = bool(bad)
    if accelerator.num_processes > 1:
        any_bad = bool(accelerator.gather(torch.tensor([int(any_bad)], device=accelerator.device)).max())
    if any_bad:
        where = bad[0] if bad else "on another process"
        _check_finite(torch.tensor(float("nan")), step, f"weights ({where}) after the optimizer step", last_checkpoint)


def _gathered_means(accelerator: Accelerator, means: dict[str, float]) -> dict[str, float]:
    if accelerator.num_processes == 1 or not means:
        return means
    keys = sorted(means)
    values = accelerator.gather(torch.tensor([means[k] for k in keys], device=accelerator.device).unsqueeze(0))
    return dict(zip(keys, values.mean(0).tolist(), strict=True))


@torch.no_grad()
def evaluate(method, model, examples, config: TrainConfig, accelerator: Accelerator) -> dict[str, float]:
    """Mean of per-batch metrics over the eval split, batches weighted by their size; keys prefixed eval_."""
    model.eval()
    totals: dict[str, float] = {}
    count = 0
    order = list(range(len(examples)))
    for indices in micro_batches_of_epoch(order, config.per_device_eval_batch_size, accelerator.num_processes,
                                          accelerator.process_index):
        batch = method.collate([examples[i] for i in indices])
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with accelerator.autocast():
            metrics = method.evaluate_batch(model, batch)
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value * len(indices)
        count += len(indices)
    means = {f"eval_{k}": v / max(count, 1) for k, v in totals.items()}
    return _gathered_means(accelerator, means)


def save_checkpoint(output_dir: Path, step: int, state: dict[str, Any], accelerator: Accelerator, model, optimizer,
                    scheduler, config: TrainConfig, tokenizer) -> Path:
    from engine.setup import full_state_dict, save_model_files

    final = output_dir / f"checkpoint-{step}"
    state_dict = full_state_dict(accelerator, model)  # every process takes part when the model is sharded
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        def write(folder: Path) -> None:
            save_model_files(config, plain_model(accelerator, model), tokenizer, folder, state_dict=state_dict)
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(scheduler.state_dict(), folder / "scheduler.pt")
            torch.save(ckpt.rng_state(), folder / "rng_state.pth")
            (folder / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
            (folder / ckpt.STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")  # written last: marks complete

        ckpt.atomic_directory(final, write)
        ckpt.prune_checkpoints(output_dir, config.save_total_limit)
    accelerator.wait_for_everyone()
    return final


def _load_training_state(folder: Path, accelerator, model, optimizer, scheduler, config: TrainConfig) -> None:
    from engine.setup import load_model_files

    load_model_files(config, plain_model(accelerator, model), folder)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False, map_location="cpu"))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))


def _check_resume_compatible(folder: Path, config: TrainConfig) -> None:
    state = ckpt.read_state(folder)
    if state.get("method") != config.method:
        raise UserError(
            f"--resume_from_checkpoint {folder}: it is a {state.get('method')} checkpoint but this run is "
            f"--method {config.method}; resume with the same method or start fresh"
        )
    if state.get("model_name_or_path") != config.model_name_or_path:
        raise UserError(
            f"--resume_from_checkpoint {folder}: it was trained from {state.get('model_name_or_path')} but this "
            f"run names {config.model_name_or_path}; resume with the same --model_name_or_path"
        )
