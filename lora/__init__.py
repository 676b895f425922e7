"""Minimal LoRA for transformers causal LMs, saved and loaded in PEFT's format.

    from lora import LoRAConfig, inject_lora, disable_adapters, save_adapter
    model = inject_lora(model, LoRAConfig(r=16, alpha=32, target_modules="all-linear"))
    with torch.no_grad(), disable_adapters(model):   # the base model, e.g. as DPO reference
        ...
    save_adapter(model, "out")                        # PeftModel.from_pretrained(base, "out") loads it

Files: config.py (LoRAConfig), layer.py (LoRALinear, W + s·B·A, and DoRA), inject.py (targets, freezing, counts),
modules_to_save.py (whole modules trained next to the adapter), merge.py (merge / unmerge / disable / unload),
peft_io.py (adapter_config.json + adapter_model.safetensors).
"""

from lora.config import ALL_LINEAR, LoRAConfig
from lora.inject import (
    find_target_modules,
    inject_lora,
    lora_layers,
    lora_parameters,
    trainable_parameter_summary,
)
from lora.layer import LoRALinear
from lora.merge import disable_adapters, merge_lora, merged_model, unload, unmerge_lora
from lora.modules_to_save import ModulesToSave
from lora.peft_io import (
    adapter_tensors,
    load_adapter,
    load_adapter_weights,
    read_adapter_config,
    save_adapter,
)

__all__ = [
    "ALL_LINEAR",
    "LoRAConfig",
    "LoRALinear",
    "ModulesToSave",
    "adapter_tensors",
    "disable_adapters",
    "find_target_modules",
    "inject_lora",
    "load_adapter",
    "load_adapter_weights",
    "lora_layers",
    "lora_parameters",
    "merge_lora",
    "merged_model",
    "read_adapter_config",
    "save_adapter",
    "trainable_parameter_summary",
    "unload",
    "unmerge_lora",
]
