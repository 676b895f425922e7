"""TRL 1.16 flags that do not change a nanopost run: accepted at TRL's default, explained otherwise.

`trl sft` / `trl dpo` take 174 flags (ScriptArguments + ModelConfig + SFTConfig / DPOConfig). The ones that
change a run are fields of `engine.config.TrainConfig`. The rest are listed here, so that a TRL command line or
YAML file never fails on a flag merely for being there:

- `INERT`: the flag has no effect in nanopost (for the reason given). A non-default value prints a warning.
- `REFUSED`: nanopost does not have the feature. TRL's default value passes; any other value is an error that
  says why and what to use instead.
- `RENAMED`: flags of older TRL versions that the Hugging Face course uses, mapped onto today's name.

FLAGS.md (scripts/gen_flags_md.py) is generated from these tables and TrainConfig; tests/test_flags.py fails when
a TRL flag is in neither.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from engine.errors import UserError


@dataclass(frozen=True)
class TrlFlag:
    """A TRL flag nanopost accepts without a TrainConfig field: its TRL default and why it does nothing here."""

    default: Any
    why: str


_WORKERS = "batches are cut in-process from pre-tokenized rows; there are no DataLoader workers"
_METRICS = "evaluation reports the loss and the method's metrics; there is no compute_metrics hook"
_LOGGING = "nanopost prints its own progress on the main process only"
_LAUNCH = "set it in the accelerate config: accelerate launch --config_file configs/accelerate/<file>.yaml"
_BNB = "4/8-bit loading needs bitsandbytes and a GPU, which nanopost does not use; train with --use_peft instead"
_TRACKIO_HUB = "trackio logs stay local in TRACKIO_DIR; publish them later with `trackio sync`"

INERT: dict[str, TrlFlag] = {
    "do_train": TrlFlag(False, "train.py always trains (transformers' Trainer does not read it either)"),
    "do_eval": TrlFlag(False, "evaluation follows --eval_strategy / --eval_steps and the test split"),
    "do_predict": TrlFlag(False, "train.py has no prediction pass"),
    "local_rank": TrlFlag(-1, "the launcher (accelerate, torchrun) sets the process rank"),
    "log_level": TrlFlag("passive", _LOGGING),
    "log_level_replica": TrlFlag("warning", _LOGGING),
    "log_on_each_node": TrlFlag(True, _LOGGING),
    "logging_nan_inf_filter": TrlFlag(True, "a non-finite loss stops the run with an error, so none is logged"),
    "skip_memory_metrics": TrlFlag(True, "no memory metrics are collected"),
    "dataloader_num_workers": TrlFlag(0, _WORKERS),
    "dataloader_pin_memory": TrlFlag(True, _WORKERS),
    "dataloader_persistent_workers": TrlFlag(False, _WORKERS),
    "dataloader_prefetch_factor": TrlFlag(None, _WORKERS),
    "dataloader_multiprocessing_context": TrlFlag(None, _WORKERS),
    "dataloader_in_order": TrlFlag(True, _WORKERS),
    "dataset_num_proc": TrlFlag(None, "tokenization runs in the training process"),
    "eval_do_concat_batches": TrlFlag(True, _METRICS),
    "eval_accumulation_steps": TrlFlag(None, _METRICS),
    "eval_use_gather_object": TrlFlag(False, _METRICS),
    "batch_eval_metrics": TrlFlag(False, _METRICS),
    "prediction_loss_only": TrlFlag(False, _METRICS),
    "include_for_metrics": TrlFlag([], _METRICS),
    "label_names": TrlFlag(None, "the method knows its own label columns"),
    "remove_unused_columns": TrlFlag(True, "only the columns the method needs are ever tokenized"),
    "length_column_name": TrlFlag("length", "--group_by_length measures the tokenized rows itself"),
    "restore_callback_states_from_checkpoint": TrlFlag(False, "there are no Trainer callbacks"),
    "use_cache": TrlFlag(False, "training never uses the KV cache"),
    "hub_always_push": TrlFlag(False, "the one push, at the end, always runs"),
    "ignore_bias_buffers": TrlFlag(False, "nanopost's models have no boolean buffers for DDP to skip"),
}

REFUSED: dict[str, TrlFlag] = {
    "fp16": TrlFlag(False, "fp16 needs a loss scaler nanopost does not have; use --bf16"),
    "fp16_full_eval": TrlFlag(False, "fp16 is not supported; evaluation runs in the training precision (--bf16)"),
    "bf16_full_eval": TrlFlag(False, "evaluation runs in the training precision (--bf16)"),
    "tf32": TrlFlag(None, "not supported; enable TF32 with torch.backends.cuda.matmul.allow_tf32 in your launcher"),
    "load_in_4bit": TrlFlag(False, _BNB),
    "load_in_8bit": TrlFlag(False, _BNB),
    "bnb_4bit_quant_type": TrlFlag("nf4", _BNB),
    "bnb_4bit_quant_storage": TrlFlag(None, _BNB),
    "use_bnb_nested_quant": TrlFlag(False, _BNB),
    "lora_target_parameters": TrlFlag(None, "LoRA on raw parameters (MoE experts) is not supported; "
                                            "use --lora_target_modules"),
    "use_liger_kernel": TrlFlag(False, "Liger kernels are not used: the losses are plain PyTorch"),
    "liger_kernel_config": TrlFlag(None, "Liger kernels are not used: the losses are plain PyTorch"),
    "router_aux_loss_coef": TrlFlag(None, "mixture-of-experts router losses are not supported"),
    "label_smoothing_factor": TrlFlag(0.0, "SFT has no label smoothing here; for DPO use --label_smoothing"),
    "accelerator_config": TrlFlag(None, _LAUNCH),
    "deepspeed": TrlFlag(None, _LAUNCH),
    "fsdp": TrlFlag(None, _LAUNCH),
    "fsdp_config": TrlFlag(None, _LAUNCH),
    "parallelism_config": TrlFlag(None, _LAUNCH),
    "ddp_backend": TrlFlag(None, _LAUNCH),
    "ddp_broadcast_buffers": TrlFlag(None, _LAUNCH),
    "ddp_bucket_cap_mb": TrlFlag(None, _LAUNCH),
    "ddp_find_unused_parameters": TrlFlag(None, _LAUNCH),
    "ddp_static_graph": TrlFlag(None, _LAUNCH),
    "ddp_timeout": TrlFlag(1800, _LAUNCH),
    "save_on_each_node": TrlFlag(False, "the main process writes every checkpoint; use a shared --output_dir"),
    "activation_checkpointing": TrlFlag(None, "FSDP activation checkpointing is not supported; "
                                              "use --gradient_checkpointing"),
    "activation_checkpointing_kwargs": TrlFlag(None, "use --gradient_checkpointing_kwargs"),
    "activation_offloading": TrlFlag(False, "activation offloading is not supported; use --gradient_checkpointing"),
    "enable_jit_checkpoint": TrlFlag(False, "checkpoints are written every --save_steps; stop a run with Ctrl-C "
                                            "(it saves before exiting)"),
    "optim_target_modules": TrlFlag(None, "GaLore / APOLLO optimizers are not supported; see --optim"),
    "auto_find_batch_size": TrlFlag(False, "give --per_device_train_batch_size (and --gradient_accumulation_steps)"),
    "torch_empty_cache_steps": TrlFlag(None, "not supported; PyTorch's caching allocator frees memory itself"),
    "full_determinism": TrlFlag(False, "not supported; --seed fixes init, data order and dropout"),
    "debug": TrlFlag("", "transformers' debug modes are not supported"),
    "ignore_data_skip": TrlFlag(False, "a resumed run always replays the data order up to its checkpoint"),
    "average_tokens_across_devices": TrlFlag(True, "the SFT loss is always normalised by the tokens of all "
                                                    "processes, as TRL's default"),
    "include_num_input_tokens_seen": TrlFlag("no", "the number of input tokens seen is not logged"),
    "eos_token": TrlFlag(None, "set eos_token in the tokenizer folder's tokenizer_config.json"),
    "pad_token": TrlFlag(None, "set pad_token in the tokenizer folder's tokenizer_config.json"),
    "dataset_kwargs": TrlFlag(None, "the dataset is always prepared by nanopost (no skip_prepare_dataset)"),
    "dataset_streaming": TrlFlag(False, "streaming is not supported; use a local file or a Hub dataset on disk"),
    "eval_packing": TrlFlag(None, "evaluation packs exactly when training does (--packing)"),
    "shuffle_dataset": TrlFlag(False, "not supported; the sampler already shuffles every epoch (--seed)"),
    "model_init_kwargs": TrlFlag(None, "use --dtype, --attn_implementation and --trust_remote_code"),
    "train_sampling_strategy": TrlFlag("random", "random and group_by_length (= --group_by_length) only; "
                                                 "sequential and batch_rebalance are not supported"),
    "trackio_space_id": TrlFlag(None, _TRACKIO_HUB),
    "trackio_bucket_id": TrlFlag(None, _TRACKIO_HUB),
    "trackio_static_space_id": TrlFlag(None, _TRACKIO_HUB),
}

# old name -> today's name (both TRL's). The value is passed on unchanged.
RENAMED: dict[str, str] = {"torch_dtype": "dtype", "evaluation_strategy": "eval_strategy"}

def is_default(flag: TrlFlag, value: Any) -> bool:
    """Whether a given value (a flag string, or a YAML value) equals TRL's default for the flag."""
    if isinstance(value, str):
        text = value.strip().lower()
        if flag.default is None:
            return text in ("none", "null")
        if isinstance(flag.default, bool):
            return text in (("true", "1", "yes") if flag.default else ("false", "0", "no"))
        if isinstance(flag.default, (int, float)):
            try:
                return float(text) == flag.default
            except ValueError:
                return False
        if flag.default == []:
            return text in ("", "[]")
        return text == str(flag.default).lower()
    return value == flag.default or (value is None and flag.default in ("", []))


def apply_trl_flags(values: dict[str, Any], warn=None) -> dict[str, Any]:
    """Given raw flag/YAML values, map renamed flags, drop inert ones (warning when not at the default) and raise
    for refused ones away from their default. Returns the values meant for TrainConfig."""
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr, flush=True))
    kept: dict[str, Any] = {}
    for name, value in values.items():
        if name in RENAMED:
            new = RENAMED[name]
            warn(f"--{name} is TRL's old name for --{new}; using --{new} {value}")
            if new in values:
                raise UserError(f"--{name} and --{new} both given: give only --{new}")
            kept[new] = value
        elif name in INERT:
            if not is_default(INERT[name], value):
                warn(f"--{name} {value} has no effect in nanopost: {INERT[name].why}")
        elif name == "train_sampling_strategy" and str(value).strip().lower() == "group_by_length":
            kept["group_by_length"] = True  # transformers 5's spelling of the old --group_by_length
        elif name in REFUSED:
            if not is_default(REFUSED[name], value):
                raise UserError(f"--{name} {value}: not supported by nanopost: {REFUSED[name].why}")
        else:
            kept[name] = value
    return kept
