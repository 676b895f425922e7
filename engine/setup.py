"""Everything the loop needs before step 1, and how models are written: accelerator, model, tokenizer, data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from engine.config import TrainConfig
from engine.errors import UserError
from engine.model import build_tiny_smollm3, load_model, load_tokenizer

LORA_CONFIG_FILE = "adapter_config.json"


def default_cache_dir() -> Path:
    return Path(os.environ.get("NANOPOST_CACHE", Path.home() / ".cache" / "nanopost"))


def build_accelerator(config: TrainConfig) -> Accelerator:
    bf16 = config.bf16
    if bf16 is None:  # TRL's default is bf16 on; keep it where the hardware has bf16 (any CPU autocasts)
        bf16 = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
    log_with = None if config.report_to == "none" else config.report_to
    accelerator = Accelerator(
        mixed_precision="bf16" if bf16 else "no",
        log_with=log_with,
        project_dir=config.output_dir,
    )
    if log_with is not None:
        try:
            accelerator.init_trackers(config.run_name or "nanopost", config={
                k: v for k, v in vars(config).items() if isinstance(v, (int, float, str, bool))
            })
        except Exception as error:  # a tracker that is not installed or not logged in
            raise UserError(f"--report_to {config.report_to}: could not start the tracker ({error})") from error
    return accelerator


def load_model_and_tokenizer(config: TrainConfig, accelerator: Accelerator):
    """The policy (fp32 master weights) and its tokenizer; LoRA injected when --use_peft."""
    from data.defaults import DEFAULT_TOKENIZER_DIR

    name = config.model_name_or_path
    if name is None and config.method == "dpo":
        name = str(ensure_default_sft_model(accelerator))
    adapter_dir = lora_adapter_dir(name)
    if adapter_dir is not None:  # a LoRA adapter folder (ours or PEFT's): its base model, then the adapter
        if not config.use_peft:
            raise UserError(
                f"--model_name_or_path {name}: is a LoRA adapter (it has {LORA_CONFIG_FILE}); add --use_peft to "
                "continue training it, or pass a full model (e.g. the <output_dir>/merged of a --merge_adapter run)"
            )
        if config.method == "dpo":
            # TRL's reference for a pre-trained adapter is a frozen copy of that adapter; disabling adapters (our
            # LoRA reference) would give the base model instead, a different objective. Refuse, not train wrongly.
            raise UserError(
                f"--model_name_or_path {name}: continuing a LoRA adapter with --method dpo is not supported (the "
                "reference would be the base model, not your adapter); merge it into a full model (--merge_adapter, "
                "or PEFT's merge_and_unload) and pass that folder with --use_peft to train a new adapter on top"
            )
        name = adapter_base_model(adapter_dir)
    tokenizer_name = config.tokenizer_name_or_path or name or str(DEFAULT_TOKENIZER_DIR)
    if config.tokenizer_name_or_path is None and adapter_dir is not None and (
            adapter_dir / "tokenizer_config.json").is_file():
        tokenizer_name = str(adapter_dir)  # a tokenizer saved with the adapter (as our runs and TRL's do)
    tokenizer = load_tokenizer(tokenizer_name, revision=config.model_revision,
                               trust_remote_code=config.trust_remote_code,
                               chat_template_path=config.chat_template_path)
    if name is None:
        model = build_tiny_smollm3(tokenizer, seed=config.seed)
    else:
        model = load_model(name, revision=config.model_revision, trust_remote_code=config.trust_remote_code,
                           attn_implementation=config.attn_implementation)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
            f"{model.get_input_embeddings().weight.shape[0]} rows: use the model's own tokenizer"
        )
    model.config.use_cache = False
    if config.use_peft:
        model = _inject_lora(model, config, accelerator, adapter_dir)
    if config.method == "dpo" and config.disable_dropout:
        disable_dropout(model)  # after LoRA injection, so the adapter's dropout is off too (as TRL)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, key) and isinstance(getattr(model.config, key), float):
            setattr(model.config, key, 0.0)


def _inject_lora(model, config: TrainConfig, accelerator: Accelerator, adapter_dir: Path | None = None):
    """New adapters from the --lora_* flags, or (`adapter_dir`) an existing adapter, trainable, as saved."""
    from lora import LoRAConfig, inject_lora, load_adapter, read_adapter_config, trainable_parameter_summary

    if adapter_dir is not None:
        # The adapter's own r / alpha / dropout / targets (what PeftModel.from_pretrained uses), not the flags.
        saved = read_adapter_config(adapter_dir)
        model = load_adapter(model, adapter_dir)
        if accelerator.is_main_process:
            print(f"[nanopost] continuing the LoRA adapter in {adapter_dir} (r={saved.r}, alpha={saved.alpha}, "
                  f"dropout={saved.dropout}, target_modules={saved.target_modules}; --lora_* flags not used)",
                  flush=True)
    else:
        lora_config = LoRAConfig(
            r=config.lora_r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=config.lora_target_modules or "all-linear",
            use_rslora=config.use_rslora,
        )
        model = inject_lora(model, lora_config)
    if accelerator.is_main_process:
        print(f"[nanopost] {trainable_parameter_summary(model)}", flush=True)
    return model


def lora_adapter_dir(name: str | None) -> Path | None:
    """`name` as a folder if it holds a LoRA adapter (adapter_config.json, as PEFT or we save it), else None."""
    if name is None:
        return None
    folder = Path(name).expanduser()
    return folder if (folder / LORA_CONFIG_FILE).is_file() else None


def adapter_base_model(adapter_dir: Path) -> str:
    """The base model an adapter folder was trained on (`base_model_name_or_path` of its adapter_config.json)."""
    try:
        base = json.loads((adapter_dir / LORA_CONFIG_FILE).read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as error:
        raise UserError(f"{adapter_dir / LORA_CONFIG_FILE}: not valid JSON ({error})") from error
    if not base:
        raise UserError(
            f"{adapter_dir / LORA_CONFIG_FILE}: no base_model_name_or_path, so the base model is unknown; "
            "set it in that file to the base model's folder or Hub id"
        )
    return str(base)


def ensure_default_sft_model(accelerator: Accelerator) -> Path:
    """The built-in DPO demo starts from an SFT model trained on the bundled chat data; train it once, cache it.

    Equivalent to: python train.py --method sft --output_dir ~/.cache/nanopost/default-sft (plus the demo's
    settings in `DEFAULT_SFT_FLAGS`).
    """
    folder = default_cache_dir() / "default-sft"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    if accelerator.is_main_process:
        print(f"[nanopost] no cached SFT model yet: training the built-in one into {folder} (one time)", flush=True)
        from engine.config import parse_config
        from engine.loop import train

        train(parse_config(["--method", "sft", "--output_dir", str(folder), *DEFAULT_SFT_FLAGS]))
    accelerator.wait_for_everyone()
    return folder


# The settings of the cached demo SFT model (also what the README's SFT command uses).
DEFAULT_SFT_FLAGS: list[str] = []


def load_datasets(config: TrainConfig):
    from data.defaults import DEFAULT_DPO_DATASET, DEFAULT_SFT_DATASET
    from data.loading import load_dataset_splits

    name = config.dataset_name or str(DEFAULT_SFT_DATASET if config.method == "sft" else DEFAULT_DPO_DATASET)
    return load_dataset_splits(name, config.dataset_config, config.dataset_train_split, config.dataset_test_split)


# ---------------------------------------------------------------------- writing models


def save_model_files(config: TrainConfig, model, tokenizer, folder: Path) -> None:
    """Model (or adapter) + tokenizer into `folder` — loadable with from_pretrained / PeftModel.from_pretrained."""
    if config.use_peft:
        from lora import save_adapter

        # The base the adapter applies to: the model's own name_or_path (set by from_pretrained), which is the
        # base model also when --model_name_or_path named an adapter folder; None for the built-in model.
        save_adapter(model, folder, base_model_name_or_path=getattr(model, "name_or_path", None) or None)
    else:
        model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def load_model_files(config: TrainConfig, model, folder: Path) -> None:
    """Weights from a checkpoint folder into the live model (full model or adapter)."""
    if config.use_peft:
        from lora import load_adapter_weights

        load_adapter_weights(model, folder)
        return
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"--resume_from_checkpoint {folder}: no model.safetensors in it")
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(model.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise UserError(f"--resume_from_checkpoint {folder}: weights do not match this model "
                        f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if tied:
        model.tie_weights()


def save_final_model(config: TrainConfig, accelerator: Accelerator, model, tokenizer, output_dir: Path) -> None:
    """Write the final model so that a crash mid-write never leaves a complete-looking model.

    Files are written to a temporary folder, then moved into `output_dir`, with config.json / adapter_config.json
    (what from_pretrained looks for first) removed before and moved in last.
    """
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    tmp = output_dir / ".tmp-final-model"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model_files(config, unwrapped, tokenizer, tmp)
    if config.use_peft and config.merge_adapter:
        from lora import merged_model

        merged_dir = tmp / "merged"
        merged_model(unwrapped).save_pretrained(merged_dir, safe_serialization=True)
        tokenizer.save_pretrained(merged_dir)
    markers = [n for n in ("config.json", LORA_CONFIG_FILE) if (tmp / n).exists()]
    for name in markers:
        (output_dir / name).unlink(missing_ok=True)
    for item in sorted(tmp.iterdir(), key=lambda p: p.name in markers):
        target = output_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    tmp.rmdir()
