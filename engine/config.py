"""One typed config for every run, parsed from TRL-style flags and an optional YAML file.

Flag names are TRL's (`trl sft` / `trl dpo`), so a command line or YAML file written for TRL works here:

    python train.py --method dpo --beta 0.1 --loss_type sigmoid sft --loss_weights 1 0.5
    python train.py --config run.yaml --learning_rate 1e-5      # flags override the file

Booleans accept TRL's forms: `--bf16`, `--bf16 true`, `--bf16 False`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config_checks import installed_trackers, validate_config
from engine.errors import UserError
from engine.flag_values import convert_value, parse_bool_or_none, strip_optional
from engine.trl_flags import INERT, REFUSED, RENAMED, apply_trl_flags

# Defaults that differ by method, as in TRL 1.16's SFTConfig / DPOConfig.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"learning_rate": 2e-5, "loss_type": ["nll"]},
    "dpo": {"learning_rate": 1e-6, "loss_type": ["sigmoid"]},
}
# The built-in demo (no --model_name_or_path) starts from a randomly initialised tiny model (sft) or from the
# tiny SFT model (dpo). TRL's defaults are for fine-tuning large pretrained models and would barely move these,
# so `parse_config` uses these instead for every flag the user did not give (measured: README, "The DPO demo").
BUILTIN_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"learning_rate": 2e-3, "lr_scheduler_type": "cosine", "warmup_ratio": 0.03,
            "per_device_train_batch_size": 32, "num_train_epochs": 10.0, "assistant_only_loss": True},
    "dpo": {"learning_rate": 3e-5, "num_train_epochs": 1.0},
}


def _doc(help_text: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text doubles as the `--help` line."""
    return field(metadata={"help": help_text}, **kwargs)


@dataclass
class TrainConfig:
    """Everything a run needs. Field names are TRL's flag names; `None` means "the method's default"."""

    # --- what to run
    method: str = _doc("Training method: sft or dpo.", default="sft")
    config: str | None = _doc("YAML file whose keys are these flag names; flags override it.", default=None)

    # --- model
    model_name_or_path: str | None = _doc(
        "Hub id or local folder of the model. Default: the built-in tiny SmolLM3 "
        "(for dpo: the built-in SFT model, trained on first use and cached).",
        default=None,
    )
    tokenizer_name_or_path: str | None = _doc("Tokenizer to use (default: the model's own).", default=None)
    ref_model_name_or_path: str | None = _doc("DPO reference model (default: the starting model).", default=None)
    model_revision: str = _doc("Hub revision of the model.", default="main")
    trust_remote_code: bool = _doc("Allow custom model code from the Hub.", default=False)
    attn_implementation: str | None = _doc("eager, sdpa, flash_attention_2 ... (default: transformers').", default=None)
    chat_template_path: str | None = _doc("A Jinja file to use as the tokenizer's chat template.", default=None)

    # --- data
    dataset_name: str | None = _doc(
        "Hub id, or local file/folder (JSON, JSONL, Parquet). Default: the bundled data for the method.",
        default=None,
    )
    dataset_config: str | None = _doc("Hub dataset configuration name.", default=None)
    dataset_train_split: str = _doc("Split to train on.", default="train")
    dataset_test_split: str = _doc("Split to evaluate on (skipped if the dataset has none).", default="test")
    dataset_text_field: str = _doc("Column holding plain text for SFT.", default="text")
    dataset_column_map: list[str] | None = _doc(
        "Map other schemas onto ours: a preset (gsm8k, alpaca) or pairs like question=prompt answer=completion.",
        default=None,
    )
    max_length: int | None = _doc("Truncate sequences to this many tokens.", default=1024)
    truncation_mode: str = _doc("keep_start or keep_end.", default="keep_start")
    packing: bool = _doc("SFT: pack several sequences into each row of max_length tokens.", default=False)
    packing_strategy: str = _doc("bfd (best-fit decreasing, no cross-document attention) or wrapped.", default="bfd")
    completion_only_loss: bool | None = _doc(
        "SFT: train only on completions (default: on when the data has prompt+completion).", default=None
    )
    assistant_only_loss: bool = _doc("SFT: train only on assistant turns ({% generation %} template).", default=False)
    max_prompt_length: int | None = _doc(
        "DPO, TRL < 1.0: keep only the last N prompt tokens (older TRL's max_prompt_length).", default=None)
    padding_free: bool = _doc("Each batch as one row of its sequences, no padding (SFT and DPO).", default=False)
    pad_to_multiple_of: str | None = _doc("Pad batches to a multiple of N tokens (auto: no padding off Neuron).",
                                          default="auto")
    dataloader_drop_last: bool = _doc("Drop the last incomplete batch of each epoch.", default=False)
    data_seed: int | None = _doc("Seed of the data order (default: --seed).", default=None)
    group_by_length: bool = _doc("Batch rows of similar length together (transformers' length-grouped order).",
                                 default=False)

    # --- training
    output_dir: str | None = _doc("Where the model, checkpoints and metrics go (default: output/<method>).", default=None)
    learning_rate: float | None = _doc(
        "Peak AdamW learning rate (TRL's: sft 2e-5, dpo 1e-6; built-in tiny models: sft 2e-3, dpo 3e-5).",
        default=None)
    lr_scheduler_type: str = _doc("transformers' schedule: linear, cosine, cosine_with_restarts, cosine_with_min_lr, "
                                  "constant, constant_with_warmup, polynomial, ...", default="linear")
    lr_scheduler_kwargs: dict[str, Any] | None = _doc("Extra scheduler arguments as JSON, e.g. '{\"num_cycles\": 1}'.",
                                                       default=None)
    optim: str = _doc("adamw_torch_fused (TRL's default), adamw_torch, sgd, adagrad or rmsprop.",
                      default="adamw_torch_fused")
    optim_args: str | None = _doc("Extra optimizer arguments, e.g. 'momentum=0.9,nesterov=True'.", default=None)
    warmup_steps: int = _doc("Linear warmup steps (takes precedence over warmup_ratio).", default=0)
    warmup_ratio: float = _doc("Warmup as a fraction of the total steps.", default=0.0)
    weight_decay: float = _doc("AdamW weight decay (not applied to biases and norms).", default=0.0)
    adam_beta1: float = _doc("AdamW beta1.", default=0.9)
    adam_beta2: float = _doc("AdamW beta2.", default=0.999)
    adam_epsilon: float = _doc("AdamW epsilon.", default=1e-8)
    max_grad_norm: float = _doc("Clip the global gradient norm to this (0 disables).", default=1.0)
    per_device_train_batch_size: int = _doc("Micro-batch size per process.", default=8)
    per_device_eval_batch_size: int = _doc("Evaluation batch size per process.", default=8)
    gradient_accumulation_steps: int = _doc("Micro-batches per optimizer step.", default=1)
    num_train_epochs: float = _doc("Epochs to train (ignored when max_steps > 0).", default=3.0)
    max_steps: int = _doc("Total optimizer steps; overrides num_train_epochs when > 0.", default=-1)
    seed: int = _doc("Random seed (model init, data order, dropout).", default=42)
    bf16: bool | None = _doc("bf16 mixed precision (default: on where supported, i.e. CUDA with bf16).", default=None)
    gradient_checkpointing: bool = _doc("Recompute activations in backward to save memory.", default=True)
    gradient_checkpointing_kwargs: dict[str, Any] | None = _doc(
        "JSON passed to gradient_checkpointing_enable, e.g. '{\"use_reentrant\": false}'.", default=None)
    dtype: str | None = _doc("Load the weights in auto, float32, bfloat16 or float16 (TRL: float32).",
                             default="float32")
    use_cpu: bool = _doc("Train on the CPU even when a GPU is present.", default=False)
    torch_compile: bool = _doc("Compile the model with torch.compile.", default=False)
    torch_compile_backend: str | None = _doc("torch.compile backend (implies --torch_compile).", default=None)
    torch_compile_mode: str | None = _doc("torch.compile mode (implies --torch_compile).", default=None)
    neftune_noise_alpha: float | None = _doc("NEFTune: uniform noise on the input embeddings, scaled by "
                                             "alpha / sqrt(L * d); TRL suggests 5 to 15.", default=None)
    loss_type: list[str] | None = _doc(
        "sft: nll. dpo: one or more of the registered preference losses (default sigmoid).", default=None
    )

    # --- evaluation and saving
    eval_strategy: str | None = _doc(
        "When to evaluate: no, steps (--eval_steps) or epoch. Not given: at the end when the data has a test "
        "split, and every --eval_steps when given (TRL's default 'no' never evaluates; give it to get that).",
        default=None)
    eval_steps: float | None = _doc(
        "Evaluate on the test split every N steps and at the end (default: only at the end; 0: never; "
        "below 1: a share of the total steps).",
        default=None)
    eval_on_start: bool = _doc("Evaluate once before the first step.", default=False)
    eval_delay: float = _doc("Epochs or steps to wait before the first evaluation.", default=0.0)
    save_strategy: str = _doc("When to save a checkpoint: no, steps, epoch or best.", default="steps")
    save_steps: float = _doc("Save a checkpoint every N steps (0 disables; below 1: a share of the total steps).",
                             default=500)
    save_only_model: bool = _doc("Checkpoints hold the weights only (no optimizer/scheduler; cannot resume).",
                                 default=False)
    load_best_model_at_end: bool = _doc("End with the checkpoint of the best --metric_for_best_model.",
                                        default=False)
    metric_for_best_model: str | None = _doc("Eval metric that picks the best model (default: loss).",
                                             default=None)
    greater_is_better: bool | None = _doc("Whether a larger metric is better (default: false for loss).",
                                          default=None)
    save_total_limit: int | None = _doc("Keep at most this many checkpoints (oldest deleted).", default=None)
    resume_from_checkpoint: str | None = _doc("Checkpoint folder to continue from.", default=None)
    ignore_resume_mismatch: bool = _doc("Resume even when data, batch size, accumulation, processes or max length "
                                        "changed (the run is then no longer an exact continuation).", default=False)

    # --- logging
    logging_strategy: str = _doc("When to log: no, steps (--logging_steps) or epoch.", default="steps")
    logging_steps: float = _doc("Log metrics every N optimizer steps (below 1: a share of the total steps).",
                                default=10)
    logging_first_step: bool = _doc("Also log after the first step.", default=False)
    report_to: list[str] | None = _doc("Trackers: one or more of tensorboard, trackio, wandb; all; or none.",
                                       default=None)
    project: str = _doc("trackio project name.", default="huggingface")
    run_name: str | None = _doc("Tracker run name.", default=None)
    disable_tqdm: bool = _doc("Hide the progress bar.", default=False)

    # --- Hub
    # None: not given (false); an explicit false with --hub_model_id is accepted (the course's YAML), a hub id alone
    # is refused: it would look like a push that never happens.
    push_to_hub: bool | None = _doc("Upload the final model, tokenizer and model card to the Hub.", default=None)
    hub_model_id: str | None = _doc("Repo to push to, e.g. you/my-model (default: the output folder's name).",
                                    default=None)
    hub_private_repo: bool | None = _doc("Create the repo private.", default=None)
    hub_token: str | None = _doc("Hub token (default: HF_TOKEN or `hf auth login`).", default=None)
    hub_strategy: str = _doc("end: push once, at the end (every_save, TRL's default, also pushes at the end).",
                             default="every_save")
    hub_revision: str | None = _doc("Branch to push to.", default=None)

    # --- DPO
    beta: float = _doc("DPO temperature: strength of the KL anchor to the reference (ORPO: its lambda).",
                       default=0.1)
    loss_weights: list[float] | None = _doc("Weights of the losses in --loss_type (default: all 1).", default=None)
    label_smoothing: float = _doc("Label noise for robust / exo_pair / aot / cdpo.", default=0.0)
    precompute_ref_log_probs: bool = _doc("Compute reference log-probs once, cache them on disk.", default=False)
    precompute_ref_batch_size: int | None = _doc(
        "Batch size of that pass (default: per_device_train_batch_size).", default=None)
    ld_alpha: float | None = _doc("LD-DPO: weight of the log-probs past the shared length.", default=None)
    use_weighting: bool = _doc("WPO: weight pairs by their probability under the policy.", default=False)
    f_divergence_type: str = _doc("reverse_kl, forward_kl, js_divergence or alpha_divergence.", default="reverse_kl")
    f_alpha_divergence_coef: float = _doc("Alpha of the alpha-divergence.", default=0.5)
    discopop_tau: float = _doc("Temperature of the DiscoPOP loss.", default=0.05)
    simpo_gamma: float = _doc("SimPO target reward margin gamma.", default=0.5)
    disable_dropout: bool = _doc("DPO: turn dropout off in policy and reference (as TRL).", default=True)
    sync_ref_model: bool = _doc("TR-DPO: every ref_model_sync_steps, ref = alpha * policy + (1 - alpha) * ref.",
                                default=False)
    ref_model_mixup_alpha: float = _doc("TR-DPO: alpha of that mix.", default=0.6)
    ref_model_sync_steps: int = _doc("TR-DPO: steps between syncs.", default=512)
    demo_eval_samples: int = _doc("Held-out pairs for the DPO demo's report (0 disables).", default=200)

    # --- LoRA
    use_peft: bool = _doc("Train a LoRA adapter instead of the full model.", default=False)
    lora_r: int = _doc("LoRA rank.", default=16)
    lora_alpha: int = _doc("LoRA alpha (scaling = alpha / r).", default=32)
    lora_dropout: float = _doc("Dropout on the LoRA path.", default=0.05)
    lora_target_modules: list[str] | None = _doc(
        "Module names to adapt (e.g. q_proj v_proj) or all-linear (default).", default=None
    )
    use_rslora: bool = _doc("rsLoRA scaling alpha / sqrt(r).", default=False)
    merge_adapter: bool = _doc("Also write the merged full model to <output_dir>/merged.", default=False)
    lora_task_type: str = _doc("PEFT task type (CAUSAL_LM).", default="CAUSAL_LM")
    lora_modules_to_save: list[str] | None = _doc("Modules trained in full next to the adapter (e.g. lm_head).",
                                                  default=None)
    use_dora: bool = _doc("DoRA: LoRA plus a learned magnitude per output feature.", default=False)

    def __post_init__(self) -> None:
        for key in ("eval_steps", "save_steps", "logging_steps"):  # 10.0 -> 10; 0.25 stays a ratio of the steps
            value = getattr(self, key)
            if isinstance(value, float) and value.is_integer():
                setattr(self, key, int(value))
        self.validate()

    # ------------------------------------------------------------------ resolution and validation
    def resolved(self) -> TrainConfig:
        """A copy with the method's defaults filled in (what the run actually uses, and what is saved)."""
        values = dataclasses.asdict(self)
        for key, default in METHOD_DEFAULTS[self.method].items():
            if values[key] is None:
                values[key] = default
        if values["push_to_hub"] is None:
            values["push_to_hub"] = False
        if values["output_dir"] is None:
            values["output_dir"] = f"output/{self.method}"
        if values["metric_for_best_model"] is None and (self.load_best_model_at_end or self.save_strategy == "best"):
            values["metric_for_best_model"] = "loss"  # TRL's default
        if values["metric_for_best_model"] is not None and values["greater_is_better"] is None:
            values["greater_is_better"] = not values["metric_for_best_model"].endswith("loss")  # as transformers
        report_to = values["report_to"] or ["none"]
        values["report_to"] = installed_trackers() if report_to == ["all"] else [n for n in report_to if n != "none"]
        return TrainConfig(**values)

    def validate(self) -> None:
        validate_config(self)

    def loss_options(self):
        """The preference losses' hyper-parameters (`losses.LossOptions`) from the flags."""
        from losses import LossOptions

        return LossOptions(beta=self.beta, label_smoothing=self.label_smoothing,
                           f_divergence_type=self.f_divergence_type,
                           f_alpha_divergence_coef=self.f_alpha_divergence_coef,
                           discopop_tau=self.discopop_tau, simpo_gamma=self.simpo_gamma)


# ---------------------------------------------------------------------- parsing

# --help groups: each starts at the named field and runs to the next group's first field (declaration order).
HELP_GROUPS = {"method": "run", "model_name_or_path": "model", "dataset_name": "data", "output_dir": "training",
               "eval_strategy": "evaluation and saving", "logging_strategy": "logging", "push_to_hub": "Hub",
               "beta": "DPO", "use_peft": "LoRA"}


@functools.cache
def _field_types() -> dict[str, tuple[Any, bool]]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: strip_optional(hints[f.name]) for f in dataclasses.fields(TrainConfig)}


def _convert(name: str, value: Any) -> Any:
    """Convert a YAML value (or a flag string) to the field's type, with a clear error."""
    base, optional = _field_types()[name]
    return convert_value(name, value, base, optional)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # argparse would print usage and exit 2
        raise UserError(f"{message} (see python train.py --help)")


def _add_flag(group, name: str, base: Any, help_text: str) -> None:
    help_text = help_text.replace("%", "%%")  # argparse %-formats help strings ({% generation %} would crash it)
    if base is bool:
        group.add_argument(f"--{name}", type=parse_bool_or_none, nargs="?", const=True, help=help_text)
    elif typing.get_origin(base) is list:
        group.add_argument(f"--{name}", nargs="*" if typing.get_args(base) == (Any,) else "+", help=help_text)
    else:
        group.add_argument(f"--{name}", help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="train.py",
        usage="python train.py [--config run.yaml] [--FLAG VALUE ...]",
        description="SFT and DPO post-training in plain PyTorch. Flag names follow TRL's `trl sft` / `trl dpo`; "
                    "FLAGS.md lists every TRL flag and what nanopost does with it.",
        argument_default=argparse.SUPPRESS,  # only flags actually given override the YAML file
    )
    group = parser
    for f in dataclasses.fields(TrainConfig):
        if f.name in HELP_GROUPS:
            group = parser.add_argument_group(HELP_GROUPS[f.name])
        _add_flag(group, f.name, _field_types()[f.name][0], f.metadata.get("help", ""))
    compat = parser.add_argument_group("TRL flags without effect here (accepted at TRL's default)")
    for name, flag in {**INERT, **REFUSED}.items():
        kind = "no effect" if name in INERT else "not supported"
        base = bool if isinstance(flag.default, bool) else list[Any] if isinstance(flag.default, list) else str
        _add_flag(compat, name, base, f"{kind}: {flag.why} (TRL default: {flag.default!r}).")
    for old, new in RENAMED.items():
        _add_flag(compat, old, str, f"older TRL's name for --{new}.")
    return parser


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"--config {path}: not valid YAML ({str(error).splitlines()[0]})") from error
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of flag names to values")
    known = {f.name for f in dataclasses.fields(TrainConfig)} | set(INERT) | set(REFUSED) | set(RENAMED)
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"--config {path}: unknown keys {', '.join(unknown)} (keys are the flag names of --help)")
    return values


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags over YAML over defaults; returns the validated config with method defaults resolved."""
    flags = apply_trl_flags(vars(build_parser().parse_args(argv)))
    values: dict[str, Any] = {}
    if flags.get("config"):
        values.update({k: _convert(k, v) for k, v in apply_trl_flags(load_yaml(flags["config"])).items()})
    values.update({k: _convert(k, v) for k, v in flags.items()})
    types_ = _field_types()
    values = {k: v for k, v in values.items() if v is not None or types_[k][1]}  # `none` on a plain field: default
    if values.get("model_name_or_path") is None:
        method = values.get("method", "sft")
        values = {**BUILTIN_MODEL_DEFAULTS.get(method, {}), **values}
    return TrainConfig(**values).resolved()


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as saved next to the model (train_config.json, which --push_to_hub uploads): never the token."""
    return {**dataclasses.asdict(config), "hub_token": None}
