"""`modules_to_save`: whole modules trained next to a LoRA adapter (e.g. the LM head), as PEFT 0.21.2 does it.

    model = inject_lora(model, LoRAConfig(..., modules_to_save=["lm_head"]))
    model.lm_head                      # ModulesToSave: original_module (frozen) + modules_to_save (trainable copy)
    with disable_adapters(model): ...  # the original module computes, as the adapters are off

PEFT's `ModulesToSaveWrapper` (peft/utils/other.py) keeps the frozen original and a deep copy that trains; the
adapter file holds the copy's tensors under the original module's names
("base_model.model.lm_head.weight"), which `PeftModel.from_pretrained` loads back into the copy. Names are
matched as PEFT's `_set_trainable` matches them: every module whose full name ends with an entry.
"""

from __future__ import annotations

import copy

from torch import nn

from lora.errors import LoRAError


class ModulesToSave(nn.Module):
    """A frozen `original_module` and its trainable copy `modules_to_save`; the copy computes unless the adapters
    are off (`adapter_enabled`, switched by `lora.disable_adapters`). Attributes the wrapper lacks (`weight`,
    `bias`, `num_embeddings`, ...) are the computing module's, so code that reads `lm_head.weight` reads the copy.

    Parameter names: `<name>.modules_to_save.<param>` (PEFT: `<name>.modules_to_save.default.<param>`).
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original.requires_grad_(False)
        self.modules_to_save = copy.deepcopy(original).requires_grad_(True)
        self.adapter_enabled = True

    def active(self) -> nn.Module:
        return self.modules_to_save if self.adapter_enabled else self.original_module

    def forward(self, *args, **kwargs):
        return self.active()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules of the wrapper itself
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "modules_to_save" not in modules:
                raise
            enabled = self.__dict__.get("adapter_enabled", True)
            return getattr(modules["modules_to_save" if enabled else "original_module"], name)


def find_modules_to_save(model: nn.Module, names: list[str], lora_targets: list[str]) -> list[str]:
    """Full names of the modules `names` selects (PEFT: the name ends with an entry), in `named_modules()` order.

    Raises:
        LoRAError: an entry matches nothing, a match is also a LoRA target, or its weights are shared with another
            module (tied embeddings: PEFT would silently untie them).
    """
    found = [full for full, _ in model.named_modules() if full and any(full.endswith(n) for n in names)]
    # Outermost matches only: a module inside another match is trained as part of it.
    found = [f for f in found if not any(f != other and f.startswith(other + ".") for other in found)]
    matched = {n for n in names if any(f.endswith(n) for f in found)}
    if set(names) - matched:
        raise LoRAError(f"LoRA modules_to_save {sorted(set(names) - matched)} match no module of "
                        f"{type(model).__name__} (e.g. lm_head, embed_tokens)")
    both = [f for f in found if f in lora_targets]
    if both:
        raise LoRAError(f"{both[0]!r} is both a LoRA target and in modules_to_save; choose one of the two")
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append(f"{module_name}.{param_name}")
    for name in found:
        for param in model.get_submodule(name).parameters():
            shared = [o for o in owners[id(param)] if not o.startswith(f"{name}.")]
            if shared:
                raise LoRAError(f"modules_to_save {name!r} shares its weight with {shared[0]!r} (tied embeddings); "
                                "training a copy of it would untie them. Use a model with untied embeddings, or "
                                "leave it out")
    return found


def wrap_modules_to_save(model: nn.Module, names: list[str]) -> dict[str, ModulesToSave]:
    """Replace each named module by a `ModulesToSave` (in place); returns them by name."""
    wrapped: dict[str, ModulesToSave] = {}
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapped[name] = ModulesToSave(getattr(parent, child_name))
        setattr(parent, child_name, wrapped[name])
    return wrapped


def modules_to_save_layers(model: nn.Module) -> dict[str, ModulesToSave]:
    return {name: module for name, module in model.named_modules() if isinstance(module, ModulesToSave)}
