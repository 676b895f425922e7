"""`LoRAConfig`: the few numbers that define a LoRA adapter, validated when built."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lora.errors import LoRAError

ALL_LINEAR = "all-linear"


@dataclass
class LoRAConfig:
    """What to adapt and how strongly; field names follow TRL's `--lora_*` flags without the prefix.

    Saved to disk as PEFT's `LoraConfig` (`alpha` -> `lora_alpha`, `dropout` -> `lora_dropout`).
    """

    r: int = 16
    """Rank of the update B·A: A is (r, in_features), B is (out_features, r)."""

    alpha: float = 32
    """Numerator of the scaling: alpha / r (or alpha / sqrt(r) with `use_rslora`)."""

    dropout: float = 0.05
    """Dropout probability on the adapter's input, in training mode only. The frozen path W·x never sees it."""

    target_modules: list[str] | str = ALL_LINEAR
    """Which modules get an adapter, matched against `model.named_modules()` names exactly as PEFT does.

    - a list: a name matches if it equals an entry or ends with "." + entry (`["q_proj", "v_proj"]`);
    - a string: a regular expression that must match the whole name (`re.fullmatch`);
    - "all-linear": every `nn.Linear` except the output head (`model.get_output_embeddings()`, `lm_head`).
    """

    use_rslora: bool = False
    """rsLoRA (Kalajdzievski 2023, arXiv:2312.03732): scaling alpha / sqrt(r), so the update does not vanish
    as r grows."""

    use_dora: bool = False
    """DoRA (Liu et al. 2024, arXiv:2402.09353): a learned magnitude per output feature on top of the low-rank
    update (lora/layer.py)."""

    modules_to_save: list[str] | None = None
    """Modules trained in full next to the adapter (e.g. ["lm_head"]): a trainable copy each, saved with the adapter
    (lora/modules_to_save.py). Matched as PEFT matches them: a module whose name ends with an entry."""

    task_type: str = "CAUSAL_LM"
    """PEFT's task type, written to adapter_config.json. Only CAUSAL_LM: the models here are causal LMs."""

    def __post_init__(self) -> None:
        if self.task_type != "CAUSAL_LM":
            raise LoRAError(f"LoRA task_type={self.task_type!r}: only CAUSAL_LM (a causal language model's head) is "
                            "supported; the other PEFT task types add heads these models do not have")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(n, str) and n for n in self.modules_to_save):
                raise LoRAError(f"LoRA modules_to_save={self.modules_to_save!r}: need a list of module names "
                                "(e.g. lm_head embed_tokens)")
            self.modules_to_save = list(self.modules_to_save) or None
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise LoRAError(f"LoRA r={self.r!r}: the rank must be an integer >= 1 (e.g. 16)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise LoRAError(f"LoRA alpha={self.alpha!r}: must be a finite number (e.g. 32)")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"LoRA dropout={self.dropout!r}: must be in [0, 1)")
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise LoRAError("LoRA target_modules is empty: name modules (e.g. q_proj v_proj) or use all-linear")
            if self.target_modules.lower() == ALL_LINEAR:
                self.target_modules = ALL_LINEAR
            else:
                try:
                    re.compile(self.target_modules)
                except re.error as err:
                    raise LoRAError(
                        f"LoRA target_modules={self.target_modules!r} is not a valid regular expression ({err}); "
                        "pass a list of module names (e.g. q_proj v_proj) or all-linear"
                    ) from None
        else:
            names = list(self.target_modules)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise LoRAError(
                    f"LoRA target_modules={self.target_modules!r}: need one or more non-empty module names "
                    "(e.g. q_proj v_proj) or all-linear"
                )
            if len(names) == 1 and names[0].lower() == ALL_LINEAR:
                # `--lora_target_modules all-linear` arrives from the CLI as a one-element list.
                self.target_modules = ALL_LINEAR
            else:
                self.target_modules = names

    @property
    def scaling(self) -> float:
        """The factor on B·A·x: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r
