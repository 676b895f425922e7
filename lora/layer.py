r"""`LoRALinear`: a frozen `nn.Linear` plus a trainable low-rank update (Hu et al. 2021, arXiv:2106.09685).

              ┌───────────────────┐
              ┆         h         ┆
              └───────────────────┘
                        ▲
                        |
                        +
                     /     \
    ┌─────────────────┐    ╭───────────────╮     Matrix initialization:
    ┆                 ┆     \      B      /      B = 0
    ┆   pretrained    ┆      \    r*d    /       A = kaiming-uniform(a=√5), as nn.Linear
    ┆    weights W    ┆       ╰─────────╯
    ┆                 ┆       |    r    |        r - rank
    ┆   W e R^(d*d)   ┆       | ◀─────▶ |
    ┆                 ┆     ╭─────────╮
    └─────────────────┘    /     A     \
              ▲           /     d*r     \
               \         ╰───────────────╯
                \                ▲
                 \               |  dropout (training only)
                  \             /
                   \           /
              ┌───────────────────┐
              ┆         x         ┆
              └───────────────────┘

    h = W·x + s·B·A·dropout(x),   s = alpha / r   (rsLoRA: s = alpha / √r)

W (and its bias) stay frozen; only A and B train. Because B starts at zero the adapted model starts out
exactly equal to the base model. Merging folds s·B·A into W so inference costs nothing extra.

DoRA (Liu et al. 2024, arXiv:2402.09353; `use_dora=True`) splits the adapted weight into a direction and a learned
magnitude m (out,) per output feature, initialised to the row norms of W:

    h = m / ‖W + s·B·A‖_row · (W + s·B·A)·x + bias,     ‖·‖_row detached (the paper's section 4.3)

computed exactly as PEFT 0.21.2's `DoraLinearLayer` does (see `LoRALinear.dora_delta`), so logits and gradients
agree with PEFT's bit for bit. m is saved under PEFT's key `<module>.lora_magnitude_vector`.

The module layout is PEFT's (`base_layer`, `lora_A`, `lora_B`, `lora_dropout`), so an adapter parameter
`<module>.lora_A.weight` is saved as `base_model.model.<module>.lora_A.weight`, the key PEFT reads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Adapter weights of a half-precision base are kept in fp32, as PEFT does by default
# (`get_peft_model(..., autocast_adapter_dtype=True)`, which TRL uses): small updates to A and B
# would otherwise round away in bf16.
_UPCAST_DTYPES = (torch.float16, torch.bfloat16)


class LoRALinear(nn.Module):
    """Wraps an existing `nn.Linear` W: forward is W·x + scaling·B·A·dropout(x).

    Args:
        base_layer: the linear layer to adapt. It is kept as is (same tensors); `inject_lora` freezes it.
        r: rank of the update.
        alpha: numerator of the scaling.
        dropout: dropout probability on the adapter input (0 = no dropout module).
        use_rslora: scaling alpha / sqrt(r) instead of alpha / r.
        use_dora: DoRA: a trainable magnitude per output feature (`lora_magnitude_vector.weight`, (out,)).

    Shape:
        - input: (..., in_features)
        - output: (..., out_features)
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float, use_rslora: bool,
                 use_dora: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        # Built as nn.Linear then re-initialised, exactly as PEFT does: two default nn.Linear inits
        # followed by one more kaiming draw for A. This consumes the global RNG in the same order, so the
        # same seed gives the same A as PEFT (checked in tests/test_lora_peft.py).
        self.lora_A = nn.Linear(self.in_features, r, bias=False)  # weight (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False)  # weight (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        # Follow the base layer's device and dtype, then upcast half precision to fp32. The round trip
        # through the base dtype is PEFT's too (it moves the adapter to the base dtype, then upcasts), so A
        # holds bf16-representable values on a bf16 base; kept so that seeds give identical adapters.
        weight = base_layer.weight
        adapter_dtype = torch.float32 if weight.dtype in _UPCAST_DTYPES else weight.dtype
        for adapter in (self.lora_A, self.lora_B):
            adapter.to(device=weight.device, dtype=weight.dtype if weight.dtype.is_floating_point else None)
        self.use_dora = use_dora
        if use_dora:
            # PEFT computes m = ‖W + s·B·A‖_row from A and B in the base dtype, then upcasts it with them.
            self.lora_magnitude_vector = _Magnitude(
                self._weight_norm(weight, self.lora_B.weight @ self.lora_A.weight).detach())
        for adapter in (self.lora_A, self.lora_B) + ((self.lora_magnitude_vector,) if use_dora else ()):
            adapter.to(dtype=adapter_dtype)
        self.merged = False  # True while s·B·A (DoRA: the whole adapted weight) is folded into base_layer.weight
        self._merged_weight_norm: torch.Tensor | None = None  # DoRA: the row norms used by merge, for unmerge
        self.adapter_enabled = True  # switched by `disable_adapters(model)` only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., out)
        if self.merged or not self.adapter_enabled:
            return result  # merged: W already holds s·B·A, adding the path again would count it twice
        # Same operation order as PEFT (delta = B(A(dropout(x))) * s, then result + delta), so logits agree
        # to the last bit in fp32. Under autocast both matmuls run in the autocast dtype anyway.
        x = x.to(self.lora_A.weight.dtype)
        if self.use_dora:
            return (result + self.dora_delta(x, result)).to(result.dtype)
        delta = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling  # (..., r) -> (..., out)
        return (result + delta).to(result.dtype)

    def _weight_norm(self, weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float | None = None
                     ) -> torch.Tensor:
        """‖W + s·ΔW‖ over each output row: (out, in) -> (out,), in W's dtype (PEFT's `get_weight_norm`)."""
        scaling = self.scaling if scaling is None else scaling
        return torch.linalg.norm(weight + scaling * lora_weight, dim=1).to(weight.dtype)

    def dora_delta(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """DoRA's output minus W·x + bias, added to `result` = base_layer(x); PEFT 0.21.2's operations in its order.

        With m the magnitude and n = ‖W + s·B·A‖_row (detached: no gradient flows through the norm),
        delta = (m/n − 1)·W·x + (m/n)·s·B·A·x. Without active dropout W·x is `result` minus the bias; with dropout
        W·dropout(x) is recomputed, since the base path saw x without dropout.

        Shape:
            x: (..., in_features); result and the returned delta: (..., out_features)
        """
        base_result: torch.Tensor | None = result
        if not isinstance(self.lora_dropout, nn.Identity) and self.training:
            x = self.lora_dropout(x)
            base_result = None
        # B·A through the layers (PEFT: "errors with FSDP" otherwise), (out, in).
        eye = torch.eye(self.in_features, device=self.lora_A.weight.device, dtype=self.lora_A.weight.dtype)
        lora_weight = self.lora_B(self.lora_A(eye)).T.to(x.dtype)  # (out, in)
        weight = self.base_layer.weight.to(x.dtype)
        weight_norm = self._weight_norm(weight, lora_weight.detach()).detach()  # (out,)
        mag_norm_scale = (self.lora_magnitude_vector.weight / weight_norm).view(1, -1)  # (1, out)
        lora_result = self.lora_B(self.lora_A(x))  # (..., out)
        if base_result is None:
            base_result = F.linear(x, weight)
        elif self.base_layer.bias is not None:
            base_result = base_result - self.base_layer.bias
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """s·B·A, shape (out_features, in_features), in the adapter dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, r) @ (r, in) -> (out, in)

    def _merged_dora_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """DoRA's adapted weight m/‖W + s·B·A‖_row · (W + s·B·A) (PEFT's `merge_safe`); keeps the norm for unmerge."""
        delta = self.delta_weight().to(weight.device)
        self._merged_weight_norm = self._weight_norm(weight, delta, scaling=1).detach()
        factor = (self.lora_magnitude_vector.weight / self._merged_weight_norm).view(-1, 1)  # (out, 1)
        return (factor * (weight + delta)).to(weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s·B·A. Does nothing if already merged, so calling it twice is safe."""
        if self.merged:
            return
        if not self.adapter_enabled:
            raise RuntimeError("merge() inside disable_adapters(): leave the context first")
        weight = self.base_layer.weight
        if self.use_dora:
            weight.copy_(self._merged_dora_weight(weight))
        else:
            # In-place add with type promotion: the sum is computed in fp32 and rounded once to W's dtype.
            weight.add_(self.delta_weight().to(weight.device))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - s·B·A. Does nothing if not merged, so calling it twice is safe.

        Exact up to floating-point rounding: in fp32, W comes back within ~1e-7 relative.
        """
        if not self.merged:
            return
        weight = self.base_layer.weight
        if self.use_dora:
            factor = (self.lora_magnitude_vector.weight / self._merged_weight_norm).view(-1, 1)
            weight.copy_(weight / factor - self.delta_weight().to(weight.device))
        else:
            weight.sub_(self.delta_weight().to(weight.device))
        self.merged = False

    def extra_repr(self) -> str:
        dora = ", dora" if self.use_dora else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{dora}, merged={self.merged}"


class _Magnitude(nn.Module):
    """DoRA's magnitude m (out_features,), as a module with a `weight` so the parameter is named as PEFT names it
    (`<module>.lora_magnitude_vector.weight`, PEFT: `...lora_magnitude_vector.default.weight`)."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)
