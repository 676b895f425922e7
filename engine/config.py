"""One typed config for every run, parsed from TRL-style flags and an optional YAML file.

Flag names are TRL's (`trl sft` / `trl dpo`), so a command line or YAML file written for TRL works here:

    python train.py --method dpo --beta 0.1 --loss_type sigmoid sft --loss_weights 1 0.5
    python train.py --config run.yaml --learning_rate 1e-5      # flags override the file

Booleans accept TRL's forms: `--bf16`, `--bf16 true`, `--bf16 False`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import UserError

METHODS = ("sft", "dpo")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
REPORT_TO = ("none", "tensorboard", "trackio", "wandb")

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

    # --- optimisation
    output_dir: str | None = _doc("Where the model, checkpoints and metrics go (default: output/<method>).", default=None)
    learning_rate: float | None = _doc(
        "Peak AdamW learning rate (TRL's: sft 2e-5, dpo 1e-6; built-in tiny models: sft 2e-3, dpo 3e-5).",
        default=None)
    lr_scheduler_type: str = _doc("linear, cosine, constant or constant_with_warmup.", default="linear")
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

    # --- logging, evaluation, checkpoints
    logging_steps: int = _doc("Log metrics every N optimizer steps.", default=10)
    eval_steps: int | None = _doc(
        "Evaluate on the test split every N steps and at the end (default: only at the end; 0: never).",
        default=None)
    save_steps: int = _doc("Save a checkpoint every N steps (0 disables).", default=500)
    save_total_limit: int | None = _doc("Keep at most this many checkpoints (oldest deleted).", default=None)
    resume_from_checkpoint: str | None = _doc("Checkpoint folder to continue from.", default=None)
    report_to: str = _doc("Experiment tracker: none, tensorboard, trackio or wandb.", default="none")
    run_name: str | None = _doc("Tracker run name.", default=None)
    disable_tqdm: bool = _doc("Hide the progress bar.", default=False)

    # --- SFT loss
    loss_type: list[str] | None = _doc(
        "sft: nll. dpo: one or more of the registered preference losses (default sigmoid).", default=None
    )

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

    # --- DPO demo report
    demo_eval_samples: int = _doc("Held-out pairs for the DPO demo's report (0 disables).", default=200)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ resolution and validation
    def resolved(self) -> TrainConfig:
        """A copy with the method's defaults filled in (what the run actually uses, and what is saved)."""
        values = dataclasses.asdict(self)
        for key, default in METHOD_DEFAULTS[self.method].items():
            if values[key] is None:
                values[key] = default
        if values["output_dir"] is None:
            values["output_dir"] = f"output/{self.method}"
        return TrainConfig(**values)

    def validate(self) -> None:
        def bad(name: str, why: str) -> UserError:
            return UserError(f"--{name} {getattr(self, name)!r}: {why}")

        if self.method not in METHODS:
            raise bad("method", f"must be one of {', '.join(METHODS)}")
        if self.learning_rate is not None and not (self.learning_rate >= 0 and math.isfinite(self.learning_rate)):
            raise bad("learning_rate", "must be a finite number >= 0 (e.g. 2e-5)")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise bad("lr_scheduler_type", f"must be one of {', '.join(SCHEDULERS)}")
        if self.report_to not in REPORT_TO:
            raise bad("report_to", f"must be one of {', '.join(REPORT_TO)}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        for name in ("logging_steps",):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        for name in ("save_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if self.eval_steps is not None and self.eval_steps < 0:
            raise bad("eval_steps", "must be >= 0 (0 disables evaluation)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise bad("warmup_ratio", "must be in [0, 1)")
        if self.max_steps == 0 or self.max_steps < -1:
            raise bad("max_steps", "must be a positive number of steps, or -1 to use num_train_epochs")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise bad("num_train_epochs", "must be > 0 (or set --max_steps)")
        if self.max_grad_norm < 0:
            raise bad("max_grad_norm", "must be >= 0 (0 disables clipping)")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if self.max_length is not None and self.max_length < 2:
            raise bad("max_length", "must be at least 2 tokens")
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise bad("truncation_mode", "must be keep_start or keep_end")
        if self.packing_strategy not in ("bfd", "wrapped"):
            raise bad("packing_strategy", "must be bfd or wrapped")
        if self.packing and self.max_length is None:
            raise bad("max_length", "packing needs a max_length")
        if not self.beta > 0:
            raise bad("beta", "must be > 0 (it scales the log-ratio; try 0.1)")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise bad("label_smoothing", "must be in [0, 0.5) (0.5 makes the preference label pure noise)")
        if self.loss_weights is not None and self.loss_type is not None and len(self.loss_weights) != len(self.loss_type):
            raise UserError(
                f"--loss_weights has {len(self.loss_weights)} values but --loss_type has {len(self.loss_type)}: "
                "give one weight per loss type"
            )
        if self.f_divergence_type not in ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"):
            raise bad("f_divergence_type", "must be reverse_kl, forward_kl, js_divergence or alpha_divergence")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise bad("ld_alpha", "must be in [0, 1]")
        if self.lora_r < 1:
            raise bad("lora_r", "must be >= 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", "must be in [0, 1)")
        if self.method == "sft" and self.loss_type not in (None, ["nll"]):
            raise bad("loss_type", "sft supports nll only (preference losses need --method dpo)")
        if self.demo_eval_samples < 0:
            raise bad("demo_eval_samples", "must be >= 0")


# ---------------------------------------------------------------------- parsing


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    """`int | None` -> (int, True)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_types() -> dict[str, tuple[Any, bool]]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: _strip_optional(hints[f.name]) for f in dataclasses.fields(TrainConfig)}


def _convert(name: str, value: Any) -> Any:
    """Convert a YAML value (or a flag string) to the field's type, with a clear error."""
    base, optional = _field_types()[name]
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        return None
    try:
        if typing.get_origin(base) is list:
            (item_type,) = typing.get_args(base)
            items = value if isinstance(value, list) else [value]
            return [item_type(v) for v in items]
        if base is bool:
            return parse_bool(value)
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return base(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
        type_name = getattr(base, "__name__", str(base))
        raise UserError(f"--{name} {value!r}: expected {type_name}") from error


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # argparse would print usage and exit 2
        raise UserError(f"{message} (see python train.py --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="train.py",
        description="SFT and DPO post-training in plain PyTorch. Flag names follow TRL's `trl sft` / `trl dpo`.",
        argument_default=argparse.SUPPRESS,  # only flags actually given override the YAML file
    )
    for f in dataclasses.fields(TrainConfig):
        base, _ = _field_types()[f.name]
        help_text = f.metadata.get("help", "")
        if base is bool:
            parser.add_argument(f"--{f.name}", type=parse_bool, nargs="?", const=True, help=help_text)
        elif typing.get_origin(base) is list:
            parser.add_argument(f"--{f.name}", nargs="+", help=help_text)
        else:
            parser.add_argument(f"--{f.name}", help=help_text)
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
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"--config {path}: unknown keys {', '.join(unknown)} (keys are the flag names of --help)")
    return values


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags over YAML over defaults; returns the validated config with method defaults resolved."""
    flags = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    if flags.get("config"):
        values.update({k: _convert(k, v) for k, v in load_yaml(flags["config"]).items()})
    values.update({k: _convert(k, v) for k, v in flags.items()})
    if values.get("model_name_or_path") is None:
        method = values.get("method", "sft")
        values = {**BUILTIN_MODEL_DEFAULTS.get(method, {}), **values}
    return TrainConfig(**values).resolved()


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
