"""The rules a TrainConfig must satisfy; each broken rule is one `UserError` line naming the flag and the fix.

Checked when the config is built (`TrainConfig.__post_init__`), so bad input stops the run before torch is
imported and before anything is written.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

from engine.errors import UserError
from engine.optim import OPTIM_ARGS, parse_optim_args

# `config` below is an engine.config.TrainConfig, typed `Any` because engine/config.py imports this module (no cycle).

METHODS = ("sft", "dpo")
# --lr_scheduler_type -> the --lr_scheduler_kwargs keys its transformers function takes (get_scheduler passes them
# on as scheduler_specific_kwargs). reduce_lr_on_plateau and greedy need a metric each step: not supported.
SCHEDULERS: dict[str, tuple[str, ...]] = {
    "linear": (), "constant": (), "constant_with_warmup": (), "cosine": ("num_cycles",),
    "cosine_with_restarts": ("num_cycles",), "polynomial": ("lr_end", "power"), "inverse_sqrt": ("timescale",),
    "cosine_with_min_lr": ("num_cycles", "min_lr", "min_lr_rate"),
    "cosine_warmup_with_min_lr": ("num_cycles", "min_lr", "min_lr_rate", "warmup_lr_rate"),
    "warmup_stable_decay": ("num_decay_steps", "num_stable_steps", "warmup_type", "decay_type", "min_lr_ratio",
                            "num_cycles"),
}
# --report_to name -> (module to import, what to install). "all" means every one of these that is installed.
TRACKERS = {"tensorboard": ("tensorboard", "pip install tensorboard"), "trackio": ("trackio", "pip install trackio"),
            "wandb": ("wandb", "pip install wandb")}
INTERVALS = ("no", "steps", "epoch")
HUB_STRATEGIES = ("end", "every_save")  # TRL's default is every_save: here the one push is at the end
DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPILE_MODES = ("default", "lite", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile
# --gradient_checkpointing_kwargs: torch.utils.checkpoint's JSON-able arguments, transformers' every_n_layers and
# offload, TRL's selective (only false).
CHECKPOINTING_KWARGS = ("use_reentrant", "preserve_rng_state", "determinism_check", "debug", "every_n_layers",
                        "offload", "selective")
LORA_TASK_TYPES = ("CAUSAL_LM",)
# What evaluation reports (engine/sft.py, engine/dpo.py), each also logged with TRL's eval_ prefix.
EVAL_METRICS = {
    "sft": ("loss", "entropy", "mean_token_accuracy"),
    "dpo": ("loss", "entropy", "mean_token_accuracy", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
            "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"),
}


def installed_trackers() -> list[str]:
    return [name for name, (module, _) in TRACKERS.items() if importlib.util.find_spec(module) is not None]


def validate_config(config: Any) -> None:
    def bad(name: str, why: str) -> UserError:
        shown = "<hidden>" if name == "hub_token" else repr(getattr(config, name))  # a secret stays off the screen
        return UserError(f"--{name} {shown}: {why}")

    if config.method not in METHODS:
        raise bad("method", f"must be one of {', '.join(METHODS)}")
    if config.learning_rate is not None and not (config.learning_rate >= 0 and math.isfinite(config.learning_rate)):
        raise bad("learning_rate", "must be a finite number >= 0 (e.g. 2e-5)")
    if config.lr_scheduler_type not in SCHEDULERS:
        raise bad("lr_scheduler_type", f"must be one of {', '.join(SCHEDULERS)}")
    _validate_scheduler_kwargs(config, bad)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(config, name) < 1:
            raise bad(name, "must be >= 1")
    if not config.logging_steps > 0:
        raise bad("logging_steps", "must be > 0 (below 1: a share of the total steps)")
    for name in ("save_steps", "warmup_steps"):
        if getattr(config, name) < 0:
            raise bad(name, "must be >= 0")
    if config.eval_steps is not None and config.eval_steps < 0:
        raise bad("eval_steps", "must be >= 0 (0 disables evaluation)")
    if not 0.0 <= config.warmup_ratio < 1.0:
        raise bad("warmup_ratio", "must be in [0, 1)")
    if config.max_steps == 0 or config.max_steps < -1:
        raise bad("max_steps", "must be a positive number of steps, or -1 to use num_train_epochs")
    if config.max_steps == -1 and not config.num_train_epochs > 0:
        raise bad("num_train_epochs", "must be > 0 (or set --max_steps)")
    if config.max_grad_norm < 0:
        raise bad("max_grad_norm", "must be >= 0 (0 disables clipping)")
    if config.weight_decay < 0:
        raise bad("weight_decay", "must be >= 0")
    if config.max_length is not None and config.max_length < 2:
        raise bad("max_length", "must be at least 2 tokens")
    if config.truncation_mode not in ("keep_start", "keep_end"):
        raise bad("truncation_mode", "must be keep_start or keep_end")
    if config.packing_strategy not in ("bfd", "wrapped"):
        raise bad("packing_strategy", "must be bfd or wrapped")
    if config.packing and config.max_length is None:
        raise bad("max_length", "packing needs a max_length")
    if not config.beta > 0:
        raise bad("beta", "must be > 0 (it scales the log-ratio; try 0.1)")
    if not 0.0 <= config.label_smoothing < 0.5:
        raise bad("label_smoothing", "must be in [0, 0.5) (0.5 makes the preference label pure noise)")
    if config.loss_weights is not None and config.loss_type is not None and len(config.loss_weights) != len(config.loss_type):
        raise UserError(
            f"--loss_weights has {len(config.loss_weights)} values but --loss_type has {len(config.loss_type)}: "
            "give one weight per loss type"
        )
    if config.f_divergence_type not in ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"):
        raise bad("f_divergence_type", "must be reverse_kl, forward_kl, js_divergence or alpha_divergence")
    if config.ld_alpha is not None and not 0.0 <= config.ld_alpha <= 1.0:
        raise bad("ld_alpha", "must be in [0, 1]")
    if config.lora_r < 1:
        raise bad("lora_r", "must be >= 1")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise bad("lora_dropout", "must be in [0, 1)")
    if config.method == "sft" and config.loss_type not in (None, ["nll"]):
        raise bad("loss_type", "sft supports nll only (preference losses need --method dpo)")
    if config.demo_eval_samples < 0:
        raise bad("demo_eval_samples", "must be >= 0")
    _validate_loop_flags(config, bad)
    _validate_hub_and_tracking(config, bad)
    if config.method == "dpo" and config.loss_type is not None:
        # The resolved config: the loss registry's own rules, checked once here (imports torch: losses are torch code).
        from losses import validate_loss_config

        validate_loss_config(config.loss_type, config.loss_weights, config.loss_options(),
                             use_weighting=config.use_weighting, ld_alpha=config.ld_alpha)
        from losses import needs_reference

        # `sft` alone still runs a reference (TRL logs rewards/* against it), so only a truly reference-free
        # loss (simpo, orpo, ...) has no reference to sync.
        if config.sync_ref_model and not needs_reference(config.loss_type) and set(config.loss_type) != {"sft"}:
            raise bad("sync_ref_model", f"--loss_type {' '.join(config.loss_type)} uses no reference model, so "
                      "there is none to sync; drop --sync_ref_model or use a loss with a reference (e.g. sigmoid)")


def _validate_scheduler_kwargs(config: Any, bad) -> None:
    """--lr_scheduler_kwargs: only keys the schedule's function takes (transformers would ignore them for constant
    schedules, and raise a TypeError mid-setup for the others)."""
    kwargs, kind = config.lr_scheduler_kwargs or {}, config.lr_scheduler_type
    takes = SCHEDULERS[kind]
    unknown = [key for key in kwargs if key not in takes]
    if unknown:
        raise bad("lr_scheduler_kwargs", f"{unknown[0]!r} is not an argument of the {kind} schedule "
                  f"(it takes: {', '.join(takes) or 'none'})")
    if kind in ("cosine_with_min_lr", "cosine_warmup_with_min_lr") and ("min_lr" in kwargs) == ("min_lr_rate" in kwargs):
        raise bad("lr_scheduler_type", "needs exactly one of min_lr and min_lr_rate in --lr_scheduler_kwargs, "
                  "e.g. '{\"min_lr_rate\": 0.1}'")
    if kind == "warmup_stable_decay" and "num_decay_steps" not in kwargs:
        raise bad("lr_scheduler_type", "needs num_decay_steps in --lr_scheduler_kwargs, e.g. '{\"num_decay_steps\": 10}'")


def _validate_checkpointing_kwargs(config: Any, bad) -> None:
    """--gradient_checkpointing_kwargs: torch.utils.checkpoint's JSON-able arguments and transformers' own."""
    kwargs = config.gradient_checkpointing_kwargs or {}
    if kwargs and not config.gradient_checkpointing:
        raise bad("gradient_checkpointing_kwargs", "needs --gradient_checkpointing true")
    unknown = [key for key in kwargs if key not in CHECKPOINTING_KWARGS]
    if unknown:
        raise bad("gradient_checkpointing_kwargs", f"{unknown[0]!r} is not a checkpointing argument "
                  f"(it takes: {', '.join(CHECKPOINTING_KWARGS)})")
    if kwargs.get("selective"):
        raise bad("gradient_checkpointing_kwargs", "selective activation checkpointing (TRL's SAC) is not supported; "
                  "use every_n_layers to checkpoint fewer layers")
    every = kwargs.get("every_n_layers", 1)
    if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
        raise bad("gradient_checkpointing_kwargs", "every_n_layers must be a whole number >= 1")


def _validate_loop_flags(config: Any, bad) -> None:
    """Schedules, optimizer, precision, TR-DPO, NEFTune, padding (the flags added for TRL parity, issue 10)."""
    for name in ("eval_strategy", "logging_strategy"):
        if getattr(config, name) not in INTERVALS and (name, getattr(config, name)) != ("eval_strategy", None):
            raise bad(name, f"must be one of {', '.join(INTERVALS)}")
    if config.save_strategy not in INTERVALS + ("best",):
        raise bad("save_strategy", "must be one of no, steps, epoch, best")
    if config.eval_strategy == "steps" and config.eval_steps == 0:
        raise bad("eval_steps", "must be > 0 with --eval_strategy steps")
    if config.eval_delay < 0:
        raise bad("eval_delay", "must be >= 0")
    best_needs_metric = config.load_best_model_at_end or config.save_strategy == "best"
    metric = config.metric_for_best_model
    if metric is not None and metric.removeprefix("eval_") not in EVAL_METRICS[config.method]:
        raise bad("metric_for_best_model", f"{config.method} evaluation reports "
                  f"{', '.join(EVAL_METRICS[config.method])} (with or without the eval_ prefix)")
    if config.load_best_model_at_end:
        if config.eval_strategy in ("no", None):
            raise bad("load_best_model_at_end", "needs evaluation: set --eval_strategy steps or epoch")
        if config.save_strategy not in (config.eval_strategy, "best"):
            raise bad("load_best_model_at_end", f"needs --save_strategy equal to --eval_strategy "
                      f"({config.eval_strategy}) so that every evaluated model is saved")
        eval_steps = config.eval_steps or config.logging_steps  # --eval_steps defaults to --logging_steps
        if config.eval_strategy == "steps" and config.save_steps % eval_steps != 0:
            raise bad("save_steps", f"must be a multiple of --eval_steps {eval_steps} "
                      "with --load_best_model_at_end")
    if config.greater_is_better is not None and not best_needs_metric and config.metric_for_best_model is None:
        raise bad("greater_is_better", "needs --metric_for_best_model (or --load_best_model_at_end)")
    if config.optim not in OPTIM_ARGS:
        raise bad("optim", f"must be one of {', '.join(OPTIM_ARGS)} (other transformers optimizers: not supported)")
    parse_optim_args(config.optim, config.optim_args)
    _validate_checkpointing_kwargs(config, bad)
    if config.torch_compile_mode is not None and config.torch_compile_mode not in COMPILE_MODES:
        raise bad("torch_compile_mode", f"must be one of {', '.join(COMPILE_MODES)}")
    if config.torch_compile_mode is not None and config.torch_compile_backend not in (None, "inductor"):
        raise bad("torch_compile_mode", f"is an inductor option; the {config.torch_compile_backend} backend "
                  "takes none (drop --torch_compile_mode or use --torch_compile_backend inductor)")
    if config.dtype is not None and config.dtype not in DTYPES:
        raise bad("dtype", f"must be one of {', '.join(DTYPES)}")
    if config.data_seed is not None and config.data_seed < 0:
        raise bad("data_seed", "must be >= 0")
    if config.pad_to_multiple_of not in (None, "auto") and not (
            str(config.pad_to_multiple_of).isdigit() and int(config.pad_to_multiple_of) >= 1):
        raise bad("pad_to_multiple_of", "must be a whole number >= 1, auto or none")
    if config.neftune_noise_alpha is not None and not config.neftune_noise_alpha > 0:
        raise bad("neftune_noise_alpha", "must be > 0 (TRL suggests 5 to 15), or none")
    if not 0.0 <= config.ref_model_mixup_alpha <= 1.0:
        raise bad("ref_model_mixup_alpha", "must be in [0, 1]")
    if config.ref_model_sync_steps < 1:
        raise bad("ref_model_sync_steps", "must be >= 1")
    if config.sync_ref_model and config.method != "dpo":
        raise bad("sync_ref_model", "is a DPO option (TR-DPO); use --method dpo")
    if config.sync_ref_model and (config.precompute_ref_log_probs or config.use_peft):
        raise bad("sync_ref_model", "needs a separate reference model: it cannot be combined with "
                  "--precompute_ref_log_probs or --use_peft (as in TRL)")
    if config.max_prompt_length is not None and config.max_prompt_length < 1:
        raise bad("max_prompt_length", "must be >= 1 token, or none")
    if config.max_prompt_length is not None and config.method != "dpo":
        raise bad("max_prompt_length", "is a DPO option (it cuts the prompt of preference pairs); for SFT use "
                  "--max_length")
    if config.lora_task_type not in LORA_TASK_TYPES:
        raise bad("lora_task_type", "must be CAUSAL_LM (nanopost trains causal language models)")
    if (config.use_dora or config.lora_modules_to_save) and not config.use_peft:
        raise bad("use_dora" if config.use_dora else "lora_modules_to_save", "is a LoRA option; add --use_peft")


def _validate_hub_and_tracking(config: Any, bad) -> None:
    """--push_to_hub and its companions, --report_to; the network itself is checked by engine.hub.preflight."""
    if config.hub_strategy not in HUB_STRATEGIES + ("checkpoint", "all_checkpoints"):
        raise bad("hub_strategy", "must be end or every_save (checkpoint, all_checkpoints: not supported)")
    if config.hub_strategy in ("checkpoint", "all_checkpoints"):
        raise bad("hub_strategy", "pushing checkpoints is not supported; nanopost pushes the final model "
                  "(--hub_strategy end)")
    hub_flags = [name for name in ("hub_model_id", "hub_token", "hub_private_repo", "hub_revision")
                 if getattr(config, name) is not None]
    if hub_flags and config.push_to_hub is None:  # an explicit false is kept: the YAML may say push_to_hub: false
        raise bad(hub_flags[0], "is only used when pushing; add --push_to_hub")
    if config.hub_model_id is not None and not _is_repo_id(config.hub_model_id):
        raise bad("hub_model_id", "must be a Hub repo id like you/my-model")
    for name in config.report_to or []:
        if name not in TRACKERS and name not in ("all", "none"):
            raise bad("report_to", f"unknown tracker {name!r}: use {', '.join(TRACKERS)}, all or none")
        if name in TRACKERS and importlib.util.find_spec(TRACKERS[name][0]) is None:
            raise bad("report_to", f"{name} is not installed: {TRACKERS[name][1]}")
    if len(config.report_to or []) > 1 and ({"all", "none"} & set(config.report_to)):
        raise bad("report_to", "all and none stand alone; do not combine them with tracker names")


def _is_repo_id(text: str) -> bool:
    parts = text.split("/")
    return 1 <= len(parts) <= 2 and all(p and p.replace("-", "").replace("_", "").replace(".", "").isalnum()
                                        for p in parts)
