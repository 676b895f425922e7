"""Read and write adapters in PEFT's on-disk format (checked against peft 0.21.2).

    save_adapter(model, "out")                         # adapter_config.json + adapter_model.safetensors
    PeftModel.from_pretrained(base, "out")             # ...loads it as is
    load_adapter(base, "adapter_saved_by_peft")        # and the other way round

What PEFT writes (peft/peft_model.py `save_pretrained`, peft/utils/save_and_load.py
`get_peft_model_state_dict`, peft/config.py `PeftConfigMixin.save_pretrained`):
- adapter_model.safetensors: one tensor per adapter weight, keyed "base_model.model." + the parameter name in
  the plain transformers model with the adapter name removed, e.g.
  "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" (r, in) and "...lora_B.weight" (out, r);
  metadata {"format": "pt"}.
  DoRA's magnitude is "base_model.model.<module>.lora_magnitude_vector" (out,) (no ".weight"), and a module of
  `modules_to_save` is saved under the original module's names, e.g. "base_model.model.lm_head.weight".
- adapter_config.json: the `LoraConfig` fields; this module writes the ones that decide what is computed.
PEFT only warns about missing keys when loading; `load_adapter` raises instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora.config import LoRAConfig
from lora.errors import LoRAError
from lora.inject import CONFIG_ATTRIBUTE, inject_lora, lora_layers, lora_parameters
from lora.modules_to_save import modules_to_save_layers

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (the transformers model)

# adapter_config.json fields that change what the adapter computes, and the values we implement.
# Anything else here would be silently wrong (DoRA, per-layer ranks, extra trained modules, ...), so refuse.
_SUPPORTED_VALUES: dict[str, tuple] = {
    "bias": ("none",),
    "lora_bias": (False,),
    "fan_in_fan_out": (False,),
    "init_lora_weights": (True, False, "gaussian"),  # pissa / olora / loftq / corda also change the base weights
    "layers_to_transform": (None, []),
    "rank_pattern": (None, {}),
    "alpha_pattern": (None, {}),
    "exclude_modules": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, {}, []),
    "layer_replication": (None, []),
    "use_qalora": (False,),
    "use_bdlora": (None, False),
    "alora_invocation_tokens": (None, []),
    "arrow_config": (None,),
    "velora_config": (None,),
    "monteclora_config": (None,),
    "kasa_config": (None,),
    "megatron_config": (None,),
}
# Fields read elsewhere (r, alpha, ...) or that do not change the computation of a loaded adapter.
_HARMLESS_FIELDS = {
    "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora",
    "modules_to_save",
    "base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping",
    "layers_pattern",  # only used together with layers_to_transform
    "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config",  # init-time options
    "qalora_group_size",  # only with use_qalora
    "ensure_weight_tying",  # only with tied targets, which inject_lora refuses
    "runtime_config",
}


def adapter_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every tensor an adapter file holds, by its key without PEFT's "base_model.model." prefix: lora_A / lora_B
    weights, DoRA magnitudes ("<module>.lora_magnitude_vector") and the copies of `modules_to_save` (under the
    original module's names, "lm_head.weight")."""
    tensors = {name.removesuffix(".weight") if name.endswith(".lora_magnitude_vector.weight") else name: param
               for name, param in lora_parameters(model).items()}
    for module_name, wrapper in modules_to_save_layers(model).items():
        for param_name, param in wrapper.modules_to_save.named_parameters():
            tensors[f"{module_name}.{param_name}"] = param
    return tensors


def save_adapter(model: nn.Module, output_dir: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors that `PeftModel.from_pretrained` loads as is.

    Args:
        model: a model after `inject_lora` / `load_adapter` (merged or not: A and B are the same).
        output_dir: created if missing.
        base_model_name_or_path: recorded in the config for `AutoPeftModelForCausalLM`; defaults to the
            model's `name_or_path`, as PEFT does.
    """
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    params = lora_parameters(model)
    if not params:
        raise LoRAError("save_adapter: the model has no LoRA adapter (inject_lora or load_adapter first)")
    if config is None:
        # e.g. a DDP wrapper: its parameter names start with "module.", which PEFT would not find.
        raise LoRAError(
            f"save_adapter: pass the model given to inject_lora, not a wrapper ({type(model).__name__}); "
            "with accelerate: accelerator.unwrap_model(model)"
        )
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    tensors = {PEFT_KEY_PREFIX + name: param.detach().to("cpu").contiguous()
               for name, param in adapter_tensors(model).items()}
    save_file(tensors, str(output_dir / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "revision": None,
        "inference_mode": True,  # what PeftModel.save_pretrained writes
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": config.target_modules if isinstance(config.target_modules, str)
        else sorted(config.target_modules),
        "bias": "none",
        "lora_bias": False,
        "use_dora": config.use_dora,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": config.modules_to_save,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "exclude_modules": None,
    }
    (output_dir / ADAPTER_CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Inject LoRA as an adapter_config.json (PEFT's or ours) says, then load its weights. In place.

    The adapter parameters are trainable afterwards (PEFT's `is_trainable=True`).

    Raises:
        LoRAError: missing files, a config using a PEFT feature not implemented here, the model already
            has LoRA layers, or weights whose names or shapes do not match the injected layers.
    """
    config = read_adapter_config(adapter_dir)
    inject_lora(model, config)
    load_adapter_weights(model, adapter_dir)
    return model


def read_adapter_config(adapter_dir: str | os.PathLike) -> LoRAConfig:
    """The `LoRAConfig` of an adapter folder, refusing PEFT options that would change the computation."""
    path = Path(adapter_dir) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise LoRAError(f"no {ADAPTER_CONFIG_NAME} in {adapter_dir}: pass a folder written by save_adapter or PEFT")
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LoRAError(f"{path} is not valid JSON ({err})") from None
    if fields.get("peft_type") != "LORA":
        raise LoRAError(f"{path}: peft_type is {fields.get('peft_type')!r}; only LORA adapters are supported")
    if fields.get("task_type") not in (None, "CAUSAL_LM"):
        raise LoRAError(f"{path}: task_type is {fields['task_type']!r}; only CAUSAL_LM adapters are supported")
    for key, value in fields.items():
        if key in _SUPPORTED_VALUES:
            if value not in _SUPPORTED_VALUES[key]:
                raise LoRAError(
                    f"{path}: {key}={value!r} is not supported here (supported: "
                    f"{' or '.join(repr(v) for v in _SUPPORTED_VALUES[key])}); load this adapter with PEFT instead"
                )
        elif key not in _HARMLESS_FIELDS and value not in (None, False, {}, [], ""):
            raise LoRAError(
                f"{path}: unknown field {key}={value!r} (from a newer PEFT?); it may change the adapter, "
                "so it is not loaded"
            )
    if fields.get("target_modules") is None:
        raise LoRAError(f"{path}: target_modules is missing; name the adapted modules in the config")
    return LoRAConfig(
        r=fields.get("r", 8),  # PEFT's LoraConfig defaults, for fields a hand-written config leaves out
        alpha=fields.get("lora_alpha", 8),
        dropout=fields.get("lora_dropout", 0.0),
        target_modules=fields["target_modules"],
        use_rslora=fields.get("use_rslora", False),
        use_dora=bool(fields.get("use_dora") or False),
        modules_to_save=fields.get("modules_to_save") or None,
    )


@torch.no_grad()
def load_adapter_weights(model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Copy adapter_model.safetensors into a model that already has the matching LoRA layers (e.g. resume).

    Raises:
        LoRAError: the file is missing; its r / alpha / rsLoRA differ from the model's; or any adapter weight
            is missing, unexpected or of the wrong shape (PEFT would only warn).
    """
    adapter_dir = Path(adapter_dir)
    weights_path = adapter_dir / ADAPTER_WEIGHTS_NAME
    if not weights_path.is_file():
        hint = " (adapter_model.bin is not read: re-save it with safetensors)" if (
            adapter_dir / "adapter_model.bin").is_file() else ""
        raise LoRAError(f"no {ADAPTER_WEIGHTS_NAME} in {adapter_dir}{hint}")
    if not lora_parameters(model):
        raise LoRAError("load_adapter_weights: the model has no LoRA layers (use load_adapter to inject them)")
    params = adapter_tensors(model)
    if (adapter_dir / ADAPTER_CONFIG_NAME).is_file():
        _check_config_matches(model, read_adapter_config(adapter_dir), adapter_dir)

    state = load_file(str(weights_path))
    # parameter name in the model -> key in the file
    loaded = {key.removeprefix(PEFT_KEY_PREFIX): key for key in state if key.startswith(PEFT_KEY_PREFIX)}
    missing = [name for name in params if name not in loaded]
    unexpected = [key for key in state if key.removeprefix(PEFT_KEY_PREFIX) not in params
                  or not key.startswith(PEFT_KEY_PREFIX)]
    if missing or unexpected:
        raise LoRAError(
            f"{weights_path} does not match the model's LoRA layers: "
            f"{len(missing)} missing (e.g. {[PEFT_KEY_PREFIX + n for n in missing[:3]]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); was it trained for another model or "
            "other target_modules?"
        )
    for name, param in params.items():
        tensor = state[loaded[name]]
        if tensor.shape != param.shape:
            raise LoRAError(
                f"{weights_path}: {loaded[name]} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(param.shape)} (another r or another model?)"
            )
    for name, param in params.items():
        param.copy_(state[loaded[name]])


def _check_config_matches(model: nn.Module, config: LoRAConfig, adapter_dir: Path) -> None:
    """Weights of another r / alpha / rsLoRA would load fine and compute something else: refuse."""
    saved_copies = sorted(config.modules_to_save or [])
    ours = getattr(model, CONFIG_ATTRIBUTE, None)
    if ours is not None and (ours.use_dora, sorted(ours.modules_to_save or [])) != (config.use_dora, saved_copies):
        raise LoRAError(f"{adapter_dir}: adapter has use_dora={config.use_dora}, modules_to_save={saved_copies} but "
                        f"the model has use_dora={ours.use_dora}, modules_to_save={sorted(ours.modules_to_save or [])}")
    for name, layer in lora_layers(model).items():
        if (layer.r, layer.scaling) != (config.r, config.scaling):
            raise LoRAError(
                f"{adapter_dir}: adapter has r={config.r}, alpha={config.alpha}, use_rslora={config.use_rslora} "
                f"but the model's {name} has r={layer.r}, alpha={layer.alpha}, use_rslora={layer.use_rslora}"
            )
