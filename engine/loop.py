"""The training loop: read it top to bottom.

    config -> accelerator, tokenizer, model (+ LoRA) -> method -> data -> optimizer, schedule -> (resume) ->
    for each optimizer step:
        take the next `gradient_accumulation_steps` micro-batches (the window)
        for each micro-batch: loss = method.loss(policy, batch, window); backward
        clip, optimizer step, schedule step
        log / evaluate / checkpoint
    -> final evaluation -> final model (atomically) -> model card (README.md) -> --push_to_hub upload

What is not the loop lives beside it: the data order (engine/data_order.py), the optimizer, schedule and clipping
(engine/update.py), evaluation (engine/evaluation.py), checkpoints and the resume state (engine/checkpoint.py),
stopping on a signal or a non-finite value (engine/faults.py), model loading and saving (engine/setup.py), and
the methods themselves (engine/method.py, engine/sft.py, engine/dpo.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from data.special_tokens import special_token_note
from engine import checkpoint as ckpt
from engine import hub, setup
from engine.checkpoint import TrainingState
from engine.config import TrainConfig, config_to_dict
from engine.data_order import DataOrder, grouping
from engine.data_order import epoch_order as epoch_order  # re-exported for the tests
from engine.data_order import micro_batches_of_epoch as micro_batches_of_epoch
from engine.errors import UserError
from engine.evaluation import evaluate
from engine.faults import StopRequest, check_finite, check_finite_weights, stop_at_once
from engine.forward import LeanCausalLM, plain_model
from engine.method import Method
from engine.model_card import write_model_card
from engine.resume_fingerprint import ResumeFingerprint, check_resume
from engine.run_lock import holding_output_dir
from engine.schedule import Schedule
from engine.storage import write_text_atomically
from engine.tracking import MetricsWriter
from engine.update import build_optimizer, build_scheduler, clip_gradients

# Optional test/debug hooks: called with (step, model) right after gradient clipping, before optimizer.step().
StepHook = Callable[[int, torch.nn.Module], None]


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    logs: list[dict[str, Any]] = field(default_factory=list)
    final_metrics: dict[str, Any] = field(default_factory=dict)
    model: torch.nn.Module | None = None  # the trained model (unwrapped), as saved in output_dir
    tokenizer: Any = None


def make_method(config: TrainConfig, tokenizer, accelerator) -> Method:
    """The method `config.method` names."""
    if config.method == "sft":
        from engine.sft import SFTMethod

        return SFTMethod(config, tokenizer, accelerator)
    from engine.dpo import DPOMethod

    return DPOMethod(config, tokenizer, accelerator)


@dataclass
class _Run:
    """The parts of one run that every step uses."""

    config: TrainConfig
    accelerator: Accelerator
    method: Method
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    tokenizer: Any
    writer: MetricsWriter
    step_hook: StepHook | None
    schedule: Schedule  # when to log, evaluate, save
    last_checkpoint: Path | None  # named in error messages: where to resume from


def train(config: TrainConfig, *, step_hook: StepHook | None = None) -> TrainResult:
    """One run as `config` says: train, evaluate, checkpoint, write the final model into config.output_dir."""
    output_dir = Path(config.output_dir)
    with stop_at_once(output_dir):  # SIGTERM / Ctrl-C at any moment: one line, nothing half-written
        setup.check_output_dir(output_dir)
        repo_id = hub.preflight(config)  # --push_to_hub: token, network, repo checked now, not after hours of work
        accelerator = setup.build_accelerator(config)
        with holding_output_dir(output_dir, accelerator):  # the run lock; storage faults as one line
            return _train(config, accelerator, step_hook, repo_id)


def _train(config: TrainConfig, accelerator: Accelerator, step_hook: StepHook | None,
           repo_id: str | None) -> TrainResult:
    started = time.time()
    output_dir = Path(config.output_dir)
    set_seed(config.seed)
    notes: list[str] = []
    resume_from = ckpt.resolve_resume_path(config.resume_from_checkpoint, config.output_dir, notes)  # verified
    if resume_from is not None:
        ckpt.check_resume_compatible(resume_from, config.method, config.model_name_or_path)

    model, tokenizer = setup.load_model_and_tokenizer(config, accelerator)
    method = make_method(config, tokenizer, accelerator)
    # Seed again after the model (and LoRA init) took its draws, as transformers' Trainer does: dropout masks then
    # follow the same random stream as TRL's, so runs with dropout match TRL too.
    set_seed(config.seed)

    train_examples, eval_examples = _prepare_data(config, method, accelerator, tokenizer)
    fingerprint = ResumeFingerprint.of_run(train_examples, config, accelerator.num_processes)
    if resume_from is not None:
        saved = ResumeFingerprint.from_dict(ckpt.read_state(resume_from).get("resume_fingerprint"))
        notes.append(check_resume(resume_from, saved, fingerprint, config.ignore_resume_mismatch))
    data_seed = config.seed if config.data_seed is None else config.data_seed  # the order's seed; init keeps --seed
    order = DataOrder(len(train_examples), config.per_device_train_batch_size, data_seed,
                      accelerator.num_processes, accelerator.process_index, config.dataloader_drop_last,
                      *grouping(config, train_examples))
    if order.micro_batches_per_epoch == 0:
        raise UserError(f"--dataloader_drop_last: the {len(train_examples)} training examples do not fill one batch "
                        f"of {config.per_device_train_batch_size * accelerator.num_processes}; lower "
                        "--per_device_train_batch_size or drop --dataloader_drop_last")
    steps_per_epoch = max(math.ceil(order.micro_batches_per_epoch / config.gradient_accumulation_steps), 1)
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)
    # What accelerate prepares: the decoder with the lean LM head as its forward (engine/forward.py); `model` stays
    # the plain transformers model (LoRA, checkpoints, save_pretrained).
    policy = method.setup(LeanCausalLM(model), train_examples, accelerator)  # e.g. DPO's reference, before step 1
    setup.compile_policy(config, policy)  # --torch_compile, after the reference copy
    ckpt.check_free_space_for_run(config, accelerator, model)

    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps)
    policy, optimizer = accelerator.prepare(policy, optimizer)

    state = TrainingState(method=config.method, model_name_or_path=config.model_name_or_path,
                          total_steps=total_steps, resume_fingerprint=fingerprint.to_dict())
    if resume_from is not None:
        state = _resume(resume_from, state, accelerator, policy, optimizer, scheduler, config.use_peft)
        method.load_checkpoint_tensors(ckpt.read_method_state(resume_from), state.global_step)  # TR-DPO's reference
    if accelerator.is_main_process:
        for note in filter(None, notes):
            print(f"[nanopost] {note}", flush=True)
    writer = MetricsWriter(output_dir, accelerator, resume_step=state.global_step)
    if accelerator.is_main_process:
        write_text_atomically(output_dir / "train_config.json", json.dumps(config_to_dict(config), indent=2) + "\n",
                              what="train_config.json")

    run = _Run(config, accelerator, method, policy, optimizer, scheduler, tokenizer, writer, step_hook,
               Schedule.of(config, total_steps), resume_from)
    logs = _run_steps(run, state, order, train_examples, eval_examples)

    final_metrics = _final_evaluation(run, state, eval_examples, logs)
    _load_best_model(run, state)
    check_finite_weights(accelerator, policy, state.global_step, run.last_checkpoint)
    setup.save_final_model(config, accelerator, policy, tokenizer, output_dir)
    if accelerator.is_main_process:
        ckpt.write_trainer_state_of(output_dir, state, config, output_dir)
        _publish(config, output_dir, repo_id, logs, final_metrics)
        print(f"[nanopost] done: {state.global_step} steps in {time.time() - started:.0f}s; model in {output_dir}",
              flush=True)
    accelerator.end_training()
    return TrainResult(output_dir, state.global_step, logs, final_metrics, model, tokenizer)


def _publish(config: TrainConfig, output_dir: Path, repo_id: str | None, logs: list[dict[str, Any]],
             final_metrics: dict[str, Any]) -> None:
    """The model card next to the final model, then (--push_to_hub) the upload of the folder. Main process."""
    last_train = next((r for r in reversed(logs) if "loss" in r), {})
    card_metrics = {**({"train_loss": last_train["loss"]} if last_train else {}), **final_metrics}
    write_model_card(output_dir, config, card_metrics, base_model=config.model_name_or_path,
                     dataset=setup.dataset_source(config), repo_id=repo_id, versions=_versions())
    if repo_id is not None:
        url = hub.push(config, output_dir, repo_id)
        print(f"[nanopost] pushed {output_dir} to {repo_id}: {url}", flush=True)


def _versions() -> dict[str, str]:
    """Framework versions for the model card (the ones a reader needs to load the model)."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def _resume(folder: Path, fresh: TrainingState, accelerator: Accelerator, model, optimizer, scheduler,
            use_peft: bool) -> TrainingState:
    """Continue from checkpoint `folder`: its weights, optimizer, schedule, RNG and progress; this run's identity."""
    saved = ckpt.load_checkpoint(folder, accelerator, model, optimizer, scheduler, use_peft)
    state = dataclasses.replace(saved, method=fresh.method, model_name_or_path=fresh.model_name_or_path,
                                total_steps=fresh.total_steps, resume_fingerprint=fresh.resume_fingerprint)
    if accelerator.is_main_process:
        print(f"[nanopost] resumed from {folder} at step {state.global_step}", flush=True)
    return state


def _prepare_data(config: TrainConfig, method: Method, accelerator: Accelerator,
                  tokenizer) -> tuple[list, list | None]:
    """The training split's examples and the held-out split's (None when the dataset has no such split)."""
    train_raw, eval_raw = setup.load_datasets(config)
    train_examples, train_report = method.prepare(train_raw, split_name=config.dataset_train_split)
    eval_examples = None
    if eval_raw is not None:  # also when --eval_steps 0: a caller may report on the held-out split
        eval_examples, _ = method.prepare(eval_raw, split_name=config.dataset_test_split)
    if accelerator.is_main_process and getattr(train_report, "summary", None):
        print(f"[nanopost] {train_report.summary()}", flush=True)
    note = special_token_note(train_raw, tokenizer)
    if accelerator.is_main_process and note:
        print(f"[nanopost] {note}", flush=True)
    if not train_examples:
        raise UserError("the training split has no usable rows after preparation (see the report above)")
    return train_examples, eval_examples


def _run_steps(run: _Run, state: TrainingState, order: DataOrder, train_examples: list,
               eval_examples: list | None) -> list[dict[str, Any]]:
    """Optimizer steps until `state.total_steps`, each followed by its log / evaluation / checkpoint."""
    config, accelerator = run.config, run.accelerator
    per_epoch = order.micro_batches_per_epoch
    stream = order.stream(state.micro_batches_seen)
    run.model.train()
    logs: list[dict[str, Any]] = []
    progress = tqdm(total=state.total_steps, initial=state.global_step, desc=f"{config.method}", unit="step",
                    disable=config.disable_tqdm or not accelerator.is_main_process, dynamic_ncols=True)
    with StopRequest(config.output_dir) as stop:
        if eval_examples and config.eval_on_start and state.global_step == 0:
            _evaluate_now(run, state, eval_examples, logs)
        while state.global_step < state.total_steps:
            # The window: the next `ga` micro-batches, but never across an epoch's end (as transformers does).
            epoch_of_window, in_epoch = divmod(state.micro_batches_seen, per_epoch)
            window_size = min(config.gradient_accumulation_steps, per_epoch - in_epoch)
            batches = [run.method.collate([train_examples[i] for i in next(stream)]) for _ in range(window_size)]
            state.micro_batches_seen += window_size
            step_loss = _accumulate_gradients(run, state, batches)
            grad_norm, learning_rate = _optimizer_step(run, state)
            progress.update(1)
            state.loss_since_log += float(accelerator.gather(torch.tensor(step_loss, device=accelerator.device)).mean())
            state.steps_since_log += 1
            state.epoch = epoch_of_window + (in_epoch + window_size) / per_epoch

            step, last, epoch_ended = state.global_step, state.global_step == state.total_steps, \
                in_epoch + window_size == per_epoch
            if run.schedule.log(step, epoch_ended):
                logs.append(_log(run, state, grad_norm, learning_rate))
                progress.set_postfix(loss=f"{logs[-1]['loss']:.4f}")
            improved = False
            if eval_examples and not last and run.schedule.evaluate(step, state.epoch, epoch_ended):
                improved = _evaluate_now(run, state, eval_examples, logs)  # the last step's: _final_evaluation

            stop_now = not last and stop.agreed(accelerator)
            save = run.schedule.save(step, epoch_ended, improved)
            if save and improved:  # recorded before the save, so the checkpoint's own state names it
                state.best_model_checkpoint = str(Path(config.output_dir) / f"checkpoint-{step}")
            if save or stop_now:
                check_finite_weights(accelerator, run.model, state.global_step, run.last_checkpoint)
                run.last_checkpoint = ckpt.save_checkpoint(Path(config.output_dir), state, accelerator, run.model,
                                                           run.optimizer, run.scheduler, config, run.tokenizer,
                                                           run.last_checkpoint, run.method.checkpoint_tensors())
            if stop_now:
                progress.close()
                raise UserError(
                    f"stopped at step {state.global_step} on request; checkpoint saved in {run.last_checkpoint}. "
                    f"Resume with: python train.py ... --resume_from_checkpoint {run.last_checkpoint}"
                )
    progress.close()
    return logs


def _final_evaluation(run: _Run, state: TrainingState, eval_examples: list | None,
                      logs: list[dict[str, Any]]) -> dict[str, Any]:
    """The last step's evaluation, when the schedule has one (engine/schedule.py); logged, and returned."""
    if not eval_examples or not run.schedule.evaluate(state.global_step, state.epoch, epoch_ended=True):
        return {}
    if _evaluate_now(run, state, eval_examples, logs):
        state.best_model_checkpoint = None  # the final weights are the best: nothing to load
    return {k: v for k, v in logs[-1].items() if k.startswith("eval_")}


def _evaluate_now(run: _Run, state: TrainingState, eval_examples: list, logs: list[dict[str, Any]]) -> bool:
    """Evaluate on the held-out split, write the record, return to training mode. Returns whether the metric for
    the best model (--metric_for_best_model, when set) improved; state.best_metric follows it."""
    config = run.config
    metrics = evaluate(run.method, run.model, eval_examples, config.per_device_eval_batch_size, run.accelerator)
    logs.append({"step": state.global_step, "epoch": state.epoch, **metrics})
    run.writer.write(logs[-1])
    run.model.train()
    if config.metric_for_best_model is None:
        return False
    value = metrics["eval_" + config.metric_for_best_model.removeprefix("eval_")]
    better = state.best_metric is None or (value > state.best_metric if config.greater_is_better
                                           else value < state.best_metric)
    if better:
        state.best_metric = value
    return better


def _load_best_model(run: _Run, state: TrainingState) -> None:
    """--load_best_model_at_end: the final model takes the weights of the best evaluated checkpoint."""
    if not run.config.load_best_model_at_end or state.best_model_checkpoint is None:
        return
    best = Path(state.best_model_checkpoint)
    if not best.is_dir():
        raise UserError(f"--load_best_model_at_end: the best checkpoint {best} is gone (deleted by "
                        "--save_total_limit?); the last checkpoint is " + str(run.last_checkpoint))
    setup.load_model_files(run.config.use_peft, plain_model(run.accelerator, run.model), best)
    if run.accelerator.is_main_process:
        print(f"[nanopost] loaded the best model ({run.config.metric_for_best_model} = {state.best_metric:.6g}) "
              f"from {best}", flush=True)


def _accumulate_gradients(run: _Run, state: TrainingState, batches: list[dict[str, Any]]) -> float:
    """Forward and backward over the window's micro-batches; returns this process's summed step loss."""
    accelerator, method, model = run.accelerator, run.method, run.model
    window = method.window(batches)  # what each micro-batch's loss is normalised by

    step_loss = 0.0
    for index, batch in enumerate(batches):
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        sync = index == len(batches) - 1
        with (nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
            loss, metrics = method.loss(model, batch, window)
        check_finite(loss, state.global_step + 1, "loss", run.last_checkpoint)
        accelerator.backward(loss)
        step_loss += float(loss.detach())  # SFT: world x this process's share; averaged over processes by the caller
        state.num_tokens += metrics.pop("num_tokens")  # already summed over processes by the method
        state.metric_window.add(metrics)
    return step_loss


def _optimizer_step(run: _Run, state: TrainingState) -> tuple[torch.Tensor, float]:
    """Clip, step the optimizer and the schedule; returns (gradient norm before clipping, learning rate used)."""
    grad_norm = clip_gradients(run.accelerator, run.model, run.config.max_grad_norm)
    check_finite(grad_norm, state.global_step + 1, "gradient norm", run.last_checkpoint)
    if run.step_hook is not None:
        run.step_hook(state.global_step + 1, plain_model(run.accelerator, run.model))
    learning_rate = run.scheduler.get_last_lr()[0]  # the rate this step uses (what TRL logs)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.global_step += 1
    run.method.after_optimizer_step(plain_model(run.accelerator, run.model), state.global_step)  # TR-DPO's sync
    return grad_norm, learning_rate


def _log(run: _Run, state: TrainingState, grad_norm: torch.Tensor, learning_rate: float) -> dict[str, Any]:
    """The training record of this step (TRL's names), written to metrics.jsonl; resets the logging window."""
    record = {
        "step": state.global_step,
        "epoch": state.epoch,
        "loss": state.loss_since_log / state.steps_since_log,
        "grad_norm": float(grad_norm),
        "learning_rate": learning_rate,
        **state.metric_window.mean_and_reset(),  # per-micro-batch values, already global
        "num_tokens": state.num_tokens,
    }
    run.writer.write(record)
    state.loss_since_log, state.steps_since_log = 0.0, 0
    return record
