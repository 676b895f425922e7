"""The built-in DPO demo: `python train.py --method dpo`, no model and no data named.

    1. the starting model: the built-in SFT model, trained once on the bundled chat data and cached
       (exactly `python train.py --method sft --output_dir ~/.cache/nanopost/default-sft`);
    2. DPO on the bundled preference pairs: `engine.loop.train`, as for any run;
    3. the report on the held-out pairs (examples/demo_report.py) -> <output_dir>/demo_report.json.

train.py hands a DPO run here when it names no model (step 1) or no dataset (step 3: the bundled pairs are the
ones the rule judge understands); everything else is an ordinary run. The demo's own hyper-parameters are
`BUILTIN_MODEL_DEFAULTS` in engine/config.py, applied by `parse_config` when no model is named.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from engine.config import TrainConfig, parse_config
from engine.errors import UserError
from engine.loop import TrainResult, train


def default_cache_dir() -> Path:
    return Path(os.environ.get("NANOPOST_CACHE", Path.home() / ".cache" / "nanopost"))


def is_demo(config: TrainConfig) -> bool:
    """A DPO run that needs the demo's starting model or ends with its report."""
    return config.method == "dpo" and (config.model_name_or_path is None or config.dataset_name is None)


def with_starting_model(config: TrainConfig) -> TrainConfig:
    """`config` starting from the built-in SFT model (trained on first use) when it names no model."""
    if config.method != "dpo" or config.model_name_or_path is not None:
        return config
    return dataclasses.replace(config, model_name_or_path=str(ensure_default_sft_model()))


def run(config: TrainConfig) -> TrainResult:
    """Train as `config` says (from the built-in SFT model if it names none), then write the demo report."""
    config = with_starting_model(config)
    result = train(config)
    if config.dataset_name is None and config.demo_eval_samples:
        result.final_metrics.update(report(config, result))
    return result


def ensure_default_sft_model() -> Path:
    """The demo's starting model: an SFT model trained on the bundled chat data; trained once, then cached.

    Equivalent to: python train.py --method sft --output_dir ~/.cache/nanopost/default-sft (the built-in model's
    settings come from engine.config.BUILTIN_MODEL_DEFAULTS).
    """
    folder = default_cache_dir() / "default-sft"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched processes (torchrun, accelerate launch)
        # Trained here, it would be a multi-process run whose end_training() tears down the process group that
        # the DPO run, started next in the same processes, still needs.
        raise UserError(
            f"the built-in DPO demo starts from a cached SFT model ({folder}), which does not exist yet and is "
            "trained on first use in ONE process: run `python train.py --method dpo` once without a launcher, or "
            "pass --model_name_or_path <your SFT model>"
        )
    print(f"[nanopost] no cached SFT model yet: training the built-in one into {folder} (one time)", flush=True)
    train(parse_config(["--method", "sft", "--output_dir", str(folder)]))
    return folder


def report(config: TrainConfig, result: TrainResult) -> dict[str, Any]:
    """The held-out report on the trained policy and the reference it started from (examples/demo_report.py)."""
    from accelerate import PartialState

    from engine.loop import make_method
    from engine.model import load_model
    from engine.setup import load_datasets
    from examples.demo_report import demo_report
    from lora import disable_adapters

    _, eval_raw = load_datasets(config)
    if eval_raw is None:
        return {}
    method = make_method(config, result.tokenizer, accelerator=None)
    examples, _ = method.prepare(eval_raw, split_name=config.dataset_test_split)
    if not examples:
        return {}
    policy = result.model
    # The reference the run trained against: the policy with its adapters off (LoRA, unless a separate reference
    # model was held during training), else the starting weights, re-read (the same as the frozen copy).
    holds_reference_model = not method.reference_free and not config.precompute_ref_log_probs
    if config.use_peft and not (holds_reference_model and config.ref_model_name_or_path):
        return demo_report(method, policy, policy, examples, result.output_dir, PartialState().is_main_process,
                           reference_scope=lambda: disable_adapters(policy))
    reference = load_model(config.ref_model_name_or_path or config.model_name_or_path,
                           revision=config.model_revision, trust_remote_code=config.trust_remote_code,
                           attn_implementation=config.attn_implementation)
    reference = reference.to(next(policy.parameters()).device).eval()
    return demo_report(method, policy, reference, examples, result.output_dir, PartialState().is_main_process)
