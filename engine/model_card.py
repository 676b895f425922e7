"""The README.md model card written next to the final model (and uploaded with it by --push_to_hub).

It says what a reader of a TRL-trained repo expects to find: the base model, the data, the method and its loss,
the hyperparameters, the final metrics, how to load the model, and the command that trained it. The YAML header
uses the Hub's model-card keys (base_model, datasets, library_name, tags), so the Hub links the base model and
the dataset.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from engine.storage import write_text_atomically

METHOD_TITLES = {"sft": "supervised fine-tuning (SFT)", "dpo": "Direct Preference Optimization (DPO)"}
# Hyperparameters shown in the card; the full config is in train_config.json next to it.
CARD_HYPERPARAMETERS = ("learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps",
                        "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                        "max_steps", "max_length", "weight_decay", "max_grad_norm", "seed", "optim", "bf16")
DPO_HYPERPARAMETERS = ("beta", "loss_type", "loss_weights", "label_smoothing")
LORA_HYPERPARAMETERS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_rslora")


def command_line(config) -> str:
    """The `python train.py` command that reproduces the run: every flag that differs from its default."""
    defaults = type(config)(method=config.method).resolved()
    parts = ["python train.py", f"--method {config.method}"]
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in ("hub_token", "config", "method") or value == getattr(defaults, f.name) or value is None:
            continue
        if isinstance(value, bool):
            parts.append(f"--{f.name} {str(value).lower()}")
        elif isinstance(value, list):
            parts.append(f"--{f.name} {' '.join(str(v) for v in value)}" if value else "")
        else:
            parts.append(f"--{f.name} {value}")
    return " \\\n    ".join(p for p in parts if p)


def render_model_card(config, final_metrics: dict[str, float], *, base_model: str, dataset: str,
                      repo_id: str | None = None, versions: dict[str, str] | None = None) -> str:
    """The card's Markdown. `base_model` / `dataset`: what the run started from (Hub ids or local paths)."""
    name = repo_id or Path(config.output_dir).name
    method = METHOD_TITLES[config.method]
    losses = ", ".join(config.loss_type or [])
    shown = CARD_HYPERPARAMETERS + (DPO_HYPERPARAMETERS if config.method == "dpo" else ()) + (
        LORA_HYPERPARAMETERS if config.use_peft else ())
    hyper_rows = "\n".join(f"| `{key}` | {_fmt(getattr(config, key))} |" for key in shown)
    metric_rows = "\n".join(f"| `{key}` | {_fmt(value)} |" for key, value in sorted(final_metrics.items()))
    load = (f'from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained("{name}")'
            if config.use_peft else
            f'from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained("{name}")')
    header = ["---", f"base_model: {base_model}", "library_name: transformers" if not config.use_peft
              else "library_name: peft", "tags:", "- nanopost", f"- {config.method}", "- trl"]
    if dataset and not os.path.exists(dataset):  # only Hub ids make sense as a `datasets:` link
        header += ["datasets:", f"- {dataset}"]
    header.append("---")
    version_line = ", ".join(f"{k} {v}" for k, v in (versions or {}).items())
    return "\n".join(header) + f"""

# {name}

This model is `{base_model}` trained with {method} on `{dataset}` by nanopost (plain PyTorch;
flags, metrics and losses match TRL 1.16).

## How to load it

```python
{load}
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{name}")
```

## Training

- Method: {method}; loss: {losses}{f" (β = {config.beta})" if config.method == "dpo" else ""}
- Data: `{dataset}` (train split `{config.dataset_train_split}`)
{"- LoRA adapter (r = " + str(config.lora_r) + ")" if config.use_peft else "- Full fine-tuning"}
{"- Framework versions: " + version_line if version_line else ""}

| hyperparameter | value |
|---|---|
{hyper_rows}

The full configuration is in `train_config.json`, the per-step metrics in `metrics.jsonl`.

## Final metrics

| metric | value |
|---|---|
{metric_rows or "| (none logged) | |"}

## How it was trained

```bash
{command_line(config)}
```
"""


def write_model_card(output_dir: str | os.PathLike, config, final_metrics: dict[str, float], **kwargs: Any) -> Path:
    """Write README.md into the output folder (main process only, after the final model); return its path."""
    path = Path(output_dir) / "README.md"
    write_text_atomically(path, render_model_card(config, final_metrics, **kwargs), what="the model card")
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)
