"""--optim and --optim_args: the optimizer over prepared parameter groups, named as transformers names them.

    adamw_torch_fused   torch AdamW, fused kernel (TRL's default)      adamw_torch   torch AdamW, for-each kernel
    sgd / adagrad / rmsprop                                             torch's, with --optim_args for their extras

`--optim_args "momentum=0.9,nesterov=True"` takes the keys transformers reads for each optimizer (AdamW reads
--adam_beta1/2 and --adam_epsilon instead). The parameter groups (which parameters get weight decay) are the
caller's; this module only picks and configures the class. Importing it does not import torch, so config
validation can parse --optim_args before a run starts.
"""

from __future__ import annotations

from typing import Any

from engine.errors import UserError

# optimizer -> the --optim_args keys it takes -> their type (as transformers' trainer_optimizer reads them)
OPTIM_ARGS: dict[str, dict[str, type]] = {
    "adamw_torch": {},
    "adamw_torch_fused": {},
    "sgd": {"momentum": float, "dampening": float, "weight_decay": float, "nesterov": bool},
    "adagrad": {"lr_decay": float, "weight_decay": float, "eps": float},
    "rmsprop": {"momentum": float, "alpha": float, "eps": float, "weight_decay": float, "centered": bool},
}


def parse_optim_args(optim: str, text: str | None) -> dict[str, Any]:
    """'momentum=0.9,nesterov=True' -> {'momentum': 0.9, 'nesterov': True}, checked against what `optim` takes."""
    if not text:
        return {}
    allowed = OPTIM_ARGS[optim]
    parsed: dict[str, Any] = {}
    for item in text.replace(" ", "").split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            takes = ", ".join(allowed) or "none (use --adam_beta1, --adam_beta2, --adam_epsilon)"
            raise UserError(f"--optim_args {text!r}: {item!r} is not key=value for {optim} (it takes: {takes})")
        if allowed[key] is bool:
            parsed[key] = value.lower() in ("true", "1", "yes")
        else:
            try:
                parsed[key] = float(value)
            except ValueError as error:
                raise UserError(f"--optim_args {text!r}: {key} must be a number") from error
    return parsed


def build_optimizer(param_groups: list[dict[str, Any]], config):
    """The `--optim` optimizer over `param_groups` (each with its own weight_decay), at `--learning_rate`."""
    import torch

    extra = parse_optim_args(config.optim, config.optim_args)
    if config.optim.startswith("adamw"):
        # fused=True as transformers sets it for adamw_torch_fused; torch has fused AdamW on CPU and CUDA
        return torch.optim.AdamW(param_groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                 eps=config.adam_epsilon, fused=True if config.optim == "adamw_torch_fused" else None)
    optimizer_class = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop}
    return optimizer_class[config.optim](param_groups, lr=config.learning_rate, **extra)
