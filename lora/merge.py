"""Whole-model switches on the adapter path: merge / unmerge, `disable_adapters`, and back to a plain model.

    with torch.no_grad(), disable_adapters(model):   # DPO reference: the base model, no second copy
        ref_logits = model(input_ids).logits
    merged_model(model).save_pretrained("out/merged")  # --merge_adapter: a plain transformers model
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lora.errors import LoRAError
from lora.inject import CONFIG_ATTRIBUTE, lora_layers
from lora.layer import LoRALinear
from lora.modules_to_save import modules_to_save_layers


def _require_lora_layers(model: nn.Module, action: str) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise LoRAError(f"{action}: the model has no LoRA layers (inject_lora or load_adapter first)")
    return layers


def merge_lora(model: nn.Module) -> None:
    """Fold s·B·A into every adapted weight; the forward then skips the adapter path. Safe to call twice.

    For inference and export: while merged, A and B get no gradient.
    """
    for layer in _require_lora_layers(model, "merge_lora").values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take s·B·A back out of every merged weight (exact up to fp rounding). Safe to call twice."""
    for layer in _require_lora_layers(model, "unmerge_lora").values():
        layer.unmerge()


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes the base model W·x only; on exit the adapters are back.

    This is the DPO reference model without a second copy of the weights (torchtune's `disable_adapter`,
    TRL's `use_adapter(model, None)`). Merged layers are unmerged on entry and merged again on exit, so the
    base is then exact only up to the fp rounding of one unmerge. Nesting is allowed.
    """
    layers = _require_lora_layers(model, "disable_adapters").values()
    previous = [(layer, layer.adapter_enabled, layer.merged) for layer in layers]
    copies = [(wrapper, wrapper.adapter_enabled) for wrapper in modules_to_save_layers(model).values()]
    for layer in layers:
        layer.unmerge()
        layer.adapter_enabled = False
    for wrapper, _ in copies:  # modules_to_save: the original module computes, as in PEFT's disable_adapter
        wrapper.adapter_enabled = False
    try:
        yield model
    finally:
        for layer, enabled, merged in previous:
            layer.adapter_enabled = enabled
            if merged:
                layer.merge()
        for wrapper, enabled in copies:
            wrapper.adapter_enabled = enabled


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every `LoRALinear` by its base `nn.Linear`, merged first unless `merge=False`, and every
    `modules_to_save` wrapper by its trained copy (by the original with `merge=False`); in place.

    The result has the original module structure and state_dict keys (`...q_proj.weight`, no `base_layer`),
    so `save_pretrained` writes an ordinary checkpoint. Base parameters stay frozen (requires_grad False),
    as after PEFT's `merge_and_unload`.
    """
    for name, layer in _require_lora_layers(model, "unload").items():
        if merge:
            layer.merge()
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.base_layer)
    for name, wrapper in modules_to_save_layers(model).items():  # merged: the trained copy; else the original
        parent_name, _, child_name = name.rpartition(".")
        kept = wrapper.modules_to_save if merge else wrapper.original_module
        setattr(model.get_submodule(parent_name), child_name, kept.requires_grad_(False))
    if hasattr(model, CONFIG_ATTRIBUTE):
        delattr(model, CONFIG_ATTRIBUTE)
    return model


def merged_model(model: nn.Module) -> nn.Module:
    """A new plain model with s·B·A merged into its weights; `model` itself is left as it is.

    For `--merge_adapter`. Costs one more copy of the model in memory while it exists.
    """
    _require_lora_layers(model, "merged_model")
    return unload(copy.deepcopy(model), merge=True)
