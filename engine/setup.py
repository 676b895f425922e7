"""Everything the loop needs before step 1, and how models are written: accelerator, model, tokenizer, data."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from engine import storage
from engine.config import TrainConfig
from engine.errors import UserError
from engine.forward import plain_model, plain_state_dict
from engine.model import build_tiny_smollm3, load_model, load_tokenizer, torch_dtype
from engine.neftune import add_neftune_hook
from engine.torch_compile import check_compile, compile_policy  # noqa: F401 (compile_policy: the loop's)
from engine.tracking import start_trackers

LORA_CONFIG_FILE = "adapter_config.json"


def check_output_dir(output_dir: Path) -> None:
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


def build_accelerator(config: TrainConfig) -> Accelerator:
    bf16 = config.bf16
    if bf16 is None:  # TRL's default is bf16 on; keep it where the hardware has bf16 (any CPU autocasts)
        bf16 = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
    log_with = config.report_to or None  # resolved: a list of installed tracker names
    # Several processes (torchrun, `accelerate launch --multi_gpu`) on a machine without GPUs: accelerate sets
    # up gloo data parallel only when told to use the CPU; otherwise each process silently trains alone.
    multi_process_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()
    accelerator = Accelerator(
        mixed_precision="bf16" if bf16 else "no",
        log_with=log_with,
        project_dir=config.output_dir,
        cpu=config.use_cpu or multi_process_cpu,
    )
    _check_sharding(config, accelerator)
    check_compile(config, accelerator.device)
    start_trackers(accelerator, config)
    return accelerator


def is_sharded(accelerator: Accelerator) -> bool:
    """FSDP or DeepSpeed: the prepared model's weights (or their optimizer state) are split over processes."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _check_sharding(config: TrainConfig, accelerator: Accelerator) -> None:
    """Refuse, on every process, sharded set-ups that would silently not shard or that the engine cannot save."""
    asked = [name for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
             if os.environ.get(variable, "false").lower() == "true"]
    if asked and not is_sharded(accelerator):
        # accelerate 1.15 turns FSDP / DeepSpeed on only for GPU process groups and otherwise runs plain data
        # parallel (or one process): every process would hold the whole model, not what was asked for.
        raise UserError(
            f"{asked[0]} was asked for (accelerate config) but accelerate enables it only on GPUs, and this run has "
            f"{accelerator.num_processes} process(es) of type {accelerator.distributed_type.value} on "
            f"{accelerator.device.type}; on CPU launch with --config_file configs/accelerate/ddp_cpu.yaml"
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed clips and steps inside its own backward (untested here: DeepSpeed is not a dependency).
        plugin = accelerator.state.deepspeed_plugin
        clipping = plugin.deepspeed_config.get("gradient_clipping")
        if plugin.zero_stage == 3:
            raise UserError("DeepSpeed ZeRO stage 3 is not supported (it partitions the weights, and the engine's "
                            "LM head reads its weight directly); use configs/accelerate/fsdp.yaml")
        if config.gradient_accumulation_steps > 1:
            raise UserError("--gradient_accumulation_steps > 1 is not supported with DeepSpeed (it steps inside "
                            "every backward); raise --per_device_train_batch_size or the number of processes")
        if isinstance(clipping, (int, float)) and clipping != config.max_grad_norm:
            raise UserError(f"the DeepSpeed config clips gradients at {clipping} but --max_grad_norm is "
                            f"{config.max_grad_norm}; make them equal (DeepSpeed does the clipping)")
    if is_sharded(accelerator) and config.use_peft:
        raise UserError(
            f"--use_peft with {accelerator.distributed_type.value} is not supported (the adapter would be saved "
            "from one process's shard); LoRA leaves the base model frozen, so use plain data parallel: "
            "--config_file configs/accelerate/ddp_gpu.yaml"
        )
    if is_sharded(accelerator) and config.resume_from_checkpoint:
        raise UserError(
            f"--resume_from_checkpoint with {accelerator.distributed_type.value} is not supported (checkpoints hold "
            "the full model but only the main process's optimizer shard); resume with plain data parallel "
            "(configs/accelerate/ddp_gpu.yaml), or start a new run from the checkpoint's model with "
            "--model_name_or_path <checkpoint folder>"
        )


def full_state_dict(accelerator: Accelerator, model) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on the main process when they are sharded (FSDP, DeepSpeed), else None.

    A collective: every process must call it, before the main process writes files.
    """
    if not is_sharded(accelerator):
        return None
    state_dict = accelerator.get_state_dict(model)
    # Tied weights (lm_head = embed_tokens) come back as two copies, which save_pretrained cannot tell are tied:
    # keep the first name of each shared parameter, as save_pretrained does for a live model.
    first_name: dict[int, str] = {}
    for name, param in accelerator.unwrap_model(model).named_parameters(remove_duplicate=False):
        if first_name.setdefault(id(param), name) != name:
            state_dict.pop(name, None)
    return plain_state_dict(state_dict)  # the plain model's key names, as save_pretrained writes them


def load_model_and_tokenizer(config: TrainConfig, accelerator: Accelerator):
    """The policy (in --dtype: fp32 by default) and its tokenizer; LoRA injected when --use_peft."""
    from data.defaults import DEFAULT_TOKENIZER_DIR

    name = config.model_name_or_path
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
    dtype = torch_dtype(config.dtype)  # TRL trains the weights in this dtype (bfloat16: no fp32 master copy)
    if name is None:
        model = build_tiny_smollm3(tokenizer, seed=config.seed, dtype=dtype)
    else:
        model = load_model(name, revision=config.model_revision, trust_remote_code=config.trust_remote_code,
                           attn_implementation=config.attn_implementation, dtype=dtype)
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
        enable_gradient_checkpointing(model, config.gradient_checkpointing_kwargs)
    if config.neftune_noise_alpha is not None:
        # Noise only while the model is in training mode: evaluation, generation and a frozen reference copy
        # (eval mode) see the clean embeddings.
        add_neftune_hook(model, config.neftune_noise_alpha)
    return model, tokenizer


def enable_gradient_checkpointing(model, kwargs: dict | None) -> None:
    """--gradient_checkpointing_kwargs as transformers 5.24's Trainer applies them: every_n_layers and offload are
    transformers' own, the rest go to torch.utils.checkpoint (None: {"use_reentrant": False}). TRL's `selective`
    key is refused when true (engine/config_checks.py) and dropped when false, as TRL drops it."""
    kwargs = {key: value for key, value in (kwargs or {}).items() if key != "selective"}
    every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None,
                                          every_n_layers=every_n_layers, offload=offload)


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
            use_dora=config.use_dora,
            modules_to_save=config.lora_modules_to_save,
            task_type=config.lora_task_type,
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


def dataset_source(config: TrainConfig) -> str:
    """--dataset_name, or the bundled data of the method when none is given."""
    from data.defaults import DEFAULT_DPO_DATASET, DEFAULT_SFT_DATASET

    return config.dataset_name or str(DEFAULT_SFT_DATASET if config.method == "sft" else DEFAULT_DPO_DATASET)


def load_datasets(config: TrainConfig):
    from data.loading import load_dataset_splits

    return load_dataset_splits(dataset_source(config), config.dataset_config, config.dataset_train_split,
                               config.dataset_test_split)


# ---------------------------------------------------------------------- writing models


def save_model_files(use_peft: bool, model, tokenizer, folder: Path,
                     state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Model (or adapter) + tokenizer into `folder` — loadable with from_pretrained / PeftModel.from_pretrained.

    `state_dict`: the gathered weights of a sharded model (`full_state_dict`); None saves `model`'s own.
    """
    if use_peft:
        from lora import save_adapter

        # The base the adapter applies to: the model's own name_or_path (set by from_pretrained), which is the
        # base model also when --model_name_or_path named an adapter folder; None for the built-in model.
        save_adapter(model, folder, base_model_name_or_path=getattr(model, "name_or_path", None) or None)
    else:
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def load_model_files(use_peft: bool, model, folder: Path) -> None:
    """Weights from a checkpoint folder into the live model (full model or adapter)."""
    if use_peft:
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


# Weight files save_pretrained / PEFT write: single files, shards and their index, safetensors or bin.
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model|adapter_model)([-.][\w.-]*)?\.(safetensors|bin)(\.index\.json)?$")


def save_final_model(config: TrainConfig, accelerator: Accelerator, model, tokenizer, output_dir: Path) -> None:
    """Write the final model so that a crash mid-write never leaves a complete-looking model.

    Files are written to a temporary folder, then moved into `output_dir`, with config.json / adapter_config.json
    (what from_pretrained looks for first) removed before and moved in last. The rule: `output_dir` either holds
    one complete save (the previous one if the crash came while writing the temporary folder, else the new one)
    with its config, or holds no config.json / adapter_config.json at all. Weight files of a previous save that
    the new one does not overwrite (another shard layout, a full model before an adapter, an old merged/) are
    removed too: from_pretrained would otherwise load e.g. a stale model.safetensors in place of new shards.
    """
    state_dict = full_state_dict(accelerator, model)  # every process takes part when the model is sharded
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    unwrapped = plain_model(accelerator, model)
    with storage.scratch_folder(output_dir / ".tmp-final-model", what="the final model") as tmp:
        save_model_files(config.use_peft, unwrapped, tokenizer, tmp, state_dict=state_dict)
        if config.use_peft and config.merge_adapter:
            from lora import merged_model

            merged_dir = tmp / "merged"
            merged_model(unwrapped).save_pretrained(merged_dir, safe_serialization=True)
            tokenizer.save_pretrained(merged_dir)
        with storage.writing("the final model", output_dir):
            _move_final_model(tmp, output_dir)


def _move_final_model(tmp: Path, output_dir: Path) -> None:
    """Move the written files from `tmp` into `output_dir`, config files last (see `save_final_model`)."""
    markers = [n for n in ("config.json", LORA_CONFIG_FILE) if (tmp / n).exists()]
    for name in ("config.json", LORA_CONFIG_FILE):  # both: a previous save of the other kind is replaced too
        (output_dir / name).unlink(missing_ok=True)
    for stale in output_dir.iterdir():
        if (tmp / stale.name).exists():
            continue  # replaced below
        if stale.name == "merged" and stale.is_dir():
            shutil.rmtree(stale)
        elif _WEIGHT_FILE.match(stale.name) and stale.is_file():
            stale.unlink()
    for item in sorted(tmp.iterdir(), key=lambda p: p.name in markers):
        target = output_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
