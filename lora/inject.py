"""Put `LoRALinear` layers into a model by module-name patterns (and `modules_to_save` copies), freeze the rest,
and count parameters.

    model = inject_lora(model, LoRAConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW(lora_parameters(model).values(), lr=1e-4)
    print(trainable_parameter_summary(model))

Names are matched as PEFT 0.21 matches them (`peft.tuners.tuners_utils.check_target_module_exists` and
`_maybe_include_all_linear_layers`), against `model.named_modules()` of the model passed in (for a
transformers causal LM: "model.layers.0.self_attn.q_proj"), so the same `target_modules` adapts the same
layers here and in PEFT.
"""

from __future__ import annotations

import re

from torch import nn

from lora.config import ALL_LINEAR, LoRAConfig
from lora.errors import LoRAError
from lora.layer import LoRALinear
from lora.modules_to_save import find_modules_to_save, wrap_modules_to_save

# The config used by `inject_lora`, kept on the model so `save_adapter` can write adapter_config.json.
CONFIG_ATTRIBUTE = "nanopost_lora_config"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every `LoRALinear` in `model`, by module name, in `named_modules()` order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters (every lora_A / lora_B weight, and DoRA's lora_magnitude_vector) by full name.

    Names are as in `model.named_parameters()`, e.g. "model.layers.0.self_attn.q_proj.lora_A.weight". The
    trainable copies of `modules_to_save` are not adapter parameters: see `lora.modules_to_save`.
    """
    params: dict[str, nn.Parameter] = {}
    for layer_name, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B") + (("lora_magnitude_vector",) if layer.use_dora else ()):
            for param_name, param in getattr(layer, part).named_parameters():
                params[f"{layer_name}.{part}.{param_name}"] = param
    return params


def trainable_parameter_summary(model: nn.Module) -> str:
    """PEFT's `print_trainable_parameters` line, e.g.
    "trainable params: 12,288 || all params: 1,234,567 || trainable%: 0.9957".

    Shared (tied) tensors are counted once, as `model.parameters()` yields them once.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    percent = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"


def inject_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap every targeted `nn.Linear` in a `LoRALinear` and freeze everything but the adapters.

    The model is changed in place and returned. After this, only lora_A / lora_B weights have
    `requires_grad=True` (and DoRA's magnitudes, and the copies of `modules_to_save`). Layers are created in
    `named_modules()` order, consuming the global RNG as PEFT does, so `torch.manual_seed(s)` before both gives
    the same initial adapters.

    Args:
        model: any module; for "all-linear" a transformers model (its `get_output_embeddings()` is the
            head that is left out).
        config: rank, alpha, dropout, targets, rsLoRA.

    Returns:
        The same `model`.

    Raises:
        LoRAError: the model already has LoRA layers; the patterns match no module; a matched module is not
            an `nn.Linear`; or a matched layer shares its weight with another module (tied embeddings).
    """
    if lora_layers(model):
        raise LoRAError(
            "the model already has LoRA layers: inject_lora / load_adapter once per model "
            "(use unload(model) first to get a plain model back)"
        )
    names = find_target_modules(model, config.target_modules)
    _check_not_tied(model, names)
    to_save = find_modules_to_save(model, config.modules_to_save, names) if config.modules_to_save else []

    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base_layer = getattr(parent, child_name)
        layer = LoRALinear(
            base_layer, r=config.r, alpha=config.alpha, dropout=config.dropout, use_rslora=config.use_rslora,
            use_dora=config.use_dora,
        )
        # A new module starts in training mode; inside a model in eval mode its dropout would then be active.
        # (PEFT leaves that to the next model.train() / model.eval().)
        layer.train(base_layer.training)
        setattr(parent, child_name, layer)
    wrap_modules_to_save(model, to_save)
    setattr(model, CONFIG_ATTRIBUTE, config)

    # With reentrant gradient checkpointing, a checkpointed block whose inputs do not require grad gives its
    # parameters no gradient: the embedding output must require grad once the embeddings are frozen. PEFT does
    # this when checkpointing is already on; transformers >= 5 also does it when checkpointing is turned on later.
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    if checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model


def find_target_modules(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Names of the modules that `target_modules` selects, in `named_modules()` order (PEFT's rules).

    Raises:
        LoRAError: nothing matches (the message names the patterns and the model's linear layers), or a
            match is not an `nn.Linear`.
    """
    if target_modules == ALL_LINEAR:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [
            name
            for name, module in model.named_modules()
            if name and isinstance(module, nn.Linear) and module is not head
        ]
    else:
        names = [name for name, _ in model.named_modules() if name and _matches(target_modules, name)]

    if not names:
        raise LoRAError(
            f"LoRA target_modules {target_modules!r} match no module of {type(model).__name__}; "
            f"its linear layers are named {_describe_linear_layers(model)} "
            "(pass some of these, a regular expression over full names, or all-linear)"
        )
    not_linear = [name for name in names if not isinstance(model.get_submodule(name), nn.Linear)]
    if not_linear:
        kind = type(model.get_submodule(not_linear[0])).__name__
        raise LoRAError(
            f"LoRA target_modules {target_modules!r} match {not_linear[0]!r}, a {kind}, but only nn.Linear "
            f"layers can be adapted ({len(not_linear)} such match(es)); target linear layers instead: "
            f"{_describe_linear_layers(model)}"
        )
    return names


def _matches(target_modules: list[str] | str, name: str) -> bool:
    """PEFT's rule: a string is a regex over the full name; a list entry is the full name or a dotted suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith(f".{target}") for target in target_modules)


def _describe_linear_layers(model: nn.Module) -> str:
    """e.g. "q_proj, k_proj, ..., lm_head (e.g. model.layers.0.self_attn.q_proj)"."""
    full_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not full_names:
        return "(none: the model has no nn.Linear layers)"
    short_names = list(dict.fromkeys(name.rpartition(".")[2] for name in full_names))
    return f"{', '.join(short_names)} (e.g. {full_names[0]})"


def _check_not_tied(model: nn.Module, names: list[str]) -> None:
    """Refuse to adapt a layer whose weight another module also uses (e.g. an lm_head tied to the embeddings):
    merging would silently change the other module too."""
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append(f"{module_name}.{param_name}")
    for name in names:
        weight = model.get_submodule(name).weight
        shared = [owner for owner in owners[id(weight)] if not owner.startswith(f"{name}.")]
        if shared:
            raise LoRAError(
                f"LoRA target {name!r} shares its weight with {shared[0]!r} (tied embeddings); adapting it would "
                "change both. Leave it out of target_modules (all-linear already does)"
            )
