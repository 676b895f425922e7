"""LoRA on its own: targets, freezing, gradients, scaling, dropout, merge, disable, unload.

Parity with PEFT (logits, initial weights, files on disk) is in tests/test_lora_peft.py.
Run: pytest tests/test_lora.py -q
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, SmolLM3Config, SmolLM3ForCausalLM

from lora import (
    LoRAConfig,
    LoRALinear,
    disable_adapters,
    find_target_modules,
    inject_lora,
    load_adapter,
    load_adapter_weights,
    lora_layers,
    lora_parameters,
    merge_lora,
    merged_model,
    save_adapter,
    trainable_parameter_summary,
    unload,
    unmerge_lora,
)
from lora.errors import LoRAError

TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, vocab_size=256,
)
# Every linear layer of one decoder block of both architectures.
BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A random 2-layer model, eval mode. SmolLM3 ties lm_head to the embeddings, this Llama does not."""
    torch.manual_seed(seed)
    if arch == "smollm3":
        model = SmolLM3ForCausalLM(SmolLM3Config(**TINY, pad_token_id=0, bos_token_id=None, eos_token_id=1))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False))
    else:
        raise ValueError(arch)
    return model.to(dtype).eval()


def randomize_adapters(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Nonzero A and B, so the adapter changes the output (a fresh adapter has B = 0 and changes nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lora_parameters(model).values():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def random_ids(seed: int = 2, batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def adapted(arch: str = "smollm3", **config) -> tuple[nn.Module, nn.Module]:
    """(base model, deep copy of it with LoRA injected and nonzero adapters)."""
    base = tiny_model(arch)
    config = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], **config}
    model = inject_lora(copy.deepcopy(base), LoRAConfig(**config))
    randomize_adapters(model)
    return base, model


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "bad",
    [dict(r=0), dict(r=2.0), dict(dropout=1.0), dict(dropout=-0.1), dict(alpha=float("nan")),
     dict(target_modules=[]), dict(target_modules=""), dict(target_modules="q_proj(")],
)
def test_config_rejects_bad_values(bad):
    """Each of these is a user mistake (rank 0, dropout 1, nothing to target, broken regex): LoRAError."""
    with pytest.raises(LoRAError):
        LoRAConfig(**bad)


def test_config_defaults_and_all_linear_spelling():
    """Defaults are TRL's --lora_* defaults (16, 32, 0.05, no rsLoRA); scaling = 32 / 16 = 2.
    `--lora_target_modules all-linear` arrives as a one-element list and means the shorthand."""
    config = LoRAConfig()
    assert (config.r, config.alpha, config.dropout, config.use_rslora) == (16, 32, 0.05, False)
    assert config.scaling == 2.0
    assert LoRAConfig(target_modules=["all-linear"]).target_modules == "all-linear"
    assert LoRAConfig(target_modules=("q_proj", "v_proj")).target_modules == ["q_proj", "v_proj"]


# --------------------------------------------------------------------------------------------- targets


def test_list_targets_match_full_name_or_dotted_suffix():
    """PEFT's rule for a list: name == entry or name ends with "." + entry. So "q_proj" hits both layers
    (2 modules), a full name hits exactly that module, and "proj" hits nothing (no name ends in ".proj")."""
    model = tiny_model("llama")
    assert find_target_modules(model, ["q_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert find_target_modules(model, ["model.layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]
    with pytest.raises(LoRAError):
        find_target_modules(model, ["proj"])


def test_string_target_is_a_regex_over_the_whole_name():
    """PEFT's rule for a string: re.fullmatch over the full name. The regex below selects gate_proj and
    up_proj of layer 0 only (2 modules); the bare "q_proj" does not fullmatch any full name."""
    model = tiny_model("llama")
    assert find_target_modules(model, r"model\.layers\.0\.mlp\.(gate|up)_proj") == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    with pytest.raises(LoRAError):
        find_target_modules(model, "q_proj")


@pytest.mark.parametrize("arch", ["smollm3", "llama"])
def test_all_linear_is_every_linear_but_lm_head(arch):
    """all-linear = 7 linears x 2 layers = 14 adapted layers; lm_head (the output head, tied to the
    embeddings in SmolLM3, untied in this Llama) stays a plain nn.Linear, as PEFT does."""
    model = inject_lora(tiny_model(arch), LoRAConfig(r=2, target_modules="all-linear"))
    expected = [f"model.layers.{i}.{'self_attn' if n.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{n}"
                for i in range(2) for n in BLOCK_LINEARS]
    assert sorted(lora_layers(model)) == sorted(expected)
    assert type(model.lm_head) is nn.Linear


def test_target_matching_nothing_names_patterns_and_modules():
    """A pattern that matches nothing must say which patterns failed and what the layers are called,
    so the user can fix the flag without reading the model code."""
    with pytest.raises(LoRAError) as info:
        inject_lora(tiny_model("smollm3"), LoRAConfig(target_modules=["qproj", "vproj"]))
    message = str(info.value)
    assert "'qproj'" in message and "'vproj'" in message
    assert "q_proj" in message and "down_proj" in message
    assert "model.layers.0.self_attn.q_proj" in message


def test_target_that_is_not_linear_is_refused():
    """"mlp" matches the SmolLM3MLP block itself; only nn.Linear can be wrapped, so LoRAError naming it."""
    with pytest.raises(LoRAError, match="SmolLM3MLP"):
        inject_lora(tiny_model("smollm3"), LoRAConfig(target_modules=["mlp"]))


def test_tied_lm_head_is_refused():
    """SmolLM3's lm_head shares its weight with embed_tokens: merging into it would change the embeddings
    too, so targeting it explicitly is a LoRAError."""
    with pytest.raises(LoRAError, match="tied"):
        inject_lora(tiny_model("smollm3"), LoRAConfig(target_modules=["lm_head"]))


def test_inject_twice_is_refused():
    """A second injection would wrap LoRALinear.base_layer again; refuse rather than nest adapters."""
    _, model = adapted()
    with pytest.raises(LoRAError, match="already has LoRA"):
        inject_lora(model, LoRAConfig(target_modules=["q_proj"]))


# -------------------------------------------------------------------------------------- init and counts


def test_fresh_adapter_is_kaiming_a_zero_b_and_changes_nothing():
    """B = 0 at init, so W·x + s·B·A·x == W·x bit for bit: logits equal the base model's exactly.
    A is kaiming_uniform(a=√5) (nn.Linear's init): uniform in ±1/√in_features = ±1/8 here, not all zero."""
    base = tiny_model("smollm3")
    model = inject_lora(copy.deepcopy(base), LoRAConfig(r=4, target_modules="all-linear"))
    for layer in lora_layers(model).values():
        assert torch.count_nonzero(layer.lora_B.weight) == 0
        bound = 1 / math.sqrt(layer.in_features)
        assert 0 < layer.lora_A.weight.abs().max() <= bound
    ids = random_ids()
    assert torch.equal(model(ids).logits, base(ids).logits)


def test_trainable_parameter_summary_counts_by_hand():
    """q_proj and v_proj at r=4 on the tiny SmolLM3: per layer q: A 4x64 + B 64x4 = 512, v: A 4x64 + B 32x4
    = 384, so 2 x 896 = 1,792 trainable. Base: embeddings 256x64 = 16,384 (lm_head is tied: counted once),
    per layer 4,096 + 2,048 + 2,048 + 4,096 (attention) + 3 x 8,192 (MLP) + 2 x 64 (norms) = 36,992,
    final norm 64: 16,384 + 73,984 + 64 = 90,432; all = 92,224; 100 x 1,792 / 92,224 = 1.9431%."""
    model = inject_lora(tiny_model("smollm3"), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    assert trainable_parameter_summary(model) == (
        "trainable params: 1,792 || all params: 92,224 || trainable%: 1.9431")


# ------------------------------------------------------------------------------------------- gradients


def _backward(model: nn.Module) -> None:
    model.train()
    ids = random_ids()
    model(ids, labels=ids).loss.backward()


def test_only_adapter_parameters_receive_gradients():
    """After injection every base parameter is frozen: requires_grad False and grad None after a backward.
    At init B = 0, so dL/dA = s·Bᵀ·(dL/dh)·xᵀ is exactly zero while dL/dB = s·(dL/dh)·(A·x)ᵀ is not:
    every lora_A grad is an all-zero tensor (not None), every lora_B grad has nonzero entries.
    With B nonzero, every lora_A and lora_B grad is nonzero."""
    model = inject_lora(tiny_model("llama"), LoRAConfig(r=4, dropout=0.0, target_modules="all-linear"))
    lora = lora_parameters(model)
    assert len(lora) == 28  # 14 layers x (A, B)
    _backward(model)
    for name, param in model.named_parameters():
        if name in lora:
            assert param.requires_grad and param.grad is not None, name
            if ".lora_A." in name:
                assert torch.count_nonzero(param.grad) == 0, name
            else:
                assert torch.count_nonzero(param.grad) > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name

    model.zero_grad(set_to_none=True)
    randomize_adapters(model)
    _backward(model)
    for name, param in lora.items():
        assert torch.count_nonzero(param.grad) > 0, name


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    """Checkpointing recomputes the same forward, so adapter grads equal those without it (fp32, no
    dropout; 1e-6 covers a different summation order in the recompute). Reentrant checkpointing is the
    delicate case: with frozen embeddings it yields no grads at all unless the inputs require grad."""
    _, reference = adapted("llama", target_modules="all-linear")
    _backward(reference)
    expected = {name: param.grad for name, param in lora_parameters(reference).items()}

    for enable_before_inject in (True, False):
        base = tiny_model("llama")
        if enable_before_inject:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model = inject_lora(base, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
        randomize_adapters(model)
        if not enable_before_inject:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model.config.use_cache = False
        _backward(model)
        for name, param in lora_parameters(model).items():
            assert param.grad is not None, name
            torch.testing.assert_close(param.grad, expected[name], atol=1e-6, rtol=0)


def test_bf16_base_keeps_fp32_adapters_and_autocast_backward_works():
    """As PEFT (autocast_adapter_dtype=True, TRL's default): on a bf16 base, A and B are fp32 so small
    updates are not rounded away; the layer still returns bf16. Under torch.autocast(bf16) on an fp32
    model the logits are bf16 and every lora_B gets a finite, nonzero fp32 grad."""
    model = inject_lora(tiny_model("smollm3", torch.bfloat16), LoRAConfig(r=4, target_modules="all-linear"))
    assert all(p.dtype == torch.float32 for p in lora_parameters(model).values())
    assert model(random_ids()).logits.dtype == torch.bfloat16

    _, model = adapted("smollm3", target_modules="all-linear")
    model.train()
    ids = random_ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(ids, labels=ids)
    assert output.logits.dtype == torch.bfloat16
    output.loss.backward()
    for name, param in lora_parameters(model).items():
        assert param.grad.dtype == torch.float32 and torch.isfinite(param.grad).all(), name
        if ".lora_B." in name:
            assert torch.count_nonzero(param.grad) > 0, name


# -------------------------------------------------------------------------------- one layer: the formula


def _single_layer(dropout: float, use_rslora: bool = False, r: int = 16, alpha: float = 32) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 6), r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


def _formula(layer: LoRALinear, x: torch.Tensor, scaling: float) -> torch.Tensor:
    """h = W·x + b + s·B·(A·x), written out with the raw weights."""
    base = x @ layer.base_layer.weight.T + layer.base_layer.bias
    return base + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * scaling


def test_scaling_plain_and_rslora():
    """r=16, alpha=32: plain scaling 32/16 = 2; rsLoRA 32/√16 = 8 (Kalajdzievski 2023). The output is
    W·x + b + s·B·A·x with that s (1e-6: same math, different matmul grouping)."""
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    for use_rslora, scaling in ((False, 2.0), (True, 8.0)):
        layer = _single_layer(dropout=0.0, use_rslora=use_rslora)
        assert layer.scaling == scaling
        torch.testing.assert_close(layer(x), _formula(layer, x, scaling), atol=1e-6, rtol=0)
    assert LoRAConfig(r=16, alpha=32, use_rslora=True).scaling == 8.0


def test_dropout_only_on_the_adapter_path_and_only_in_train_mode():
    """Dropout p=0.5: in eval mode the output is the plain formula and repeatable; in train mode it is
    W·x + b + s·B·A·dropout(x) (same RNG state reproduces the mask) and two calls differ."""
    layer = _single_layer(dropout=0.5)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))

    layer.eval()
    torch.testing.assert_close(layer(x), _formula(layer, x, 2.0), atol=1e-6, rtol=0)
    assert torch.equal(layer(x), layer(x))

    layer.train()
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, p=0.5, training=True)
    expected = x @ layer.base_layer.weight.T + layer.base_layer.bias + (
        dropped @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * 2.0
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert not torch.equal(layer(x), layer(x))


# ------------------------------------------------------------------------------------------ merge


def test_merge_and_unmerge():
    """merge: W <- W + s·B·A, after which the forward skips the adapter path, so merged logits equal the
    unmerged ones up to fp32 rounding of a different summation (1e-5 on logits of size ~1).
    Merging twice is the same as once (bitwise, the second call does nothing); unmerge restores W within
    1e-6 (one fp32 add and subtract); unmerging twice is the same as once."""
    _, model = adapted("llama", target_modules="all-linear")
    layers = lora_layers(model)
    original = {name: layer.base_layer.weight.clone() for name, layer in layers.items()}
    ids = random_ids()
    logits = model(ids).logits

    merge_lora(model)
    merged_once = {name: layer.base_layer.weight.clone() for name, layer in layers.items()}
    for name, layer in layers.items():
        assert layer.merged
        torch.testing.assert_close(merged_once[name], original[name] + layer.delta_weight(), atol=1e-6, rtol=0)
    torch.testing.assert_close(model(ids).logits, logits, atol=1e-5, rtol=0)
    merge_lora(model)
    for name, layer in layers.items():
        assert torch.equal(layer.base_layer.weight, merged_once[name]), name

    unmerge_lora(model)
    unmerged_once = {name: layer.base_layer.weight.clone() for name, layer in layers.items()}
    for name, layer in layers.items():
        assert not layer.merged
        torch.testing.assert_close(layer.base_layer.weight, original[name], atol=1e-6, rtol=0)
    unmerge_lora(model)
    for name, layer in layers.items():
        assert torch.equal(layer.base_layer.weight, unmerged_once[name]), name
    torch.testing.assert_close(model(ids).logits, logits, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- disable, unload


def test_disable_adapters_gives_exactly_the_base_model():
    """Inside disable_adapters the adapter path is skipped, so the ops are the base model's: logits are
    bit-identical to the model before injection. On exit the adapted logits come back bit-identical.
    On a merged model the context unmerges (base within 1e-5: one fp32 unmerge) and merges again on exit."""
    base, model = adapted("smollm3", target_modules="all-linear")
    ids = random_ids()
    base_logits, adapted_logits = base(ids).logits, model(ids).logits
    assert (adapted_logits - base_logits).abs().max() > 0.1  # the adapter matters, so the test can fail

    with torch.no_grad(), disable_adapters(model):
        assert torch.equal(model(ids).logits, base_logits)
        with disable_adapters(model):  # nesting keeps them off
            assert torch.equal(model(ids).logits, base_logits)
        assert torch.equal(model(ids).logits, base_logits)
    assert torch.equal(model(ids).logits, adapted_logits)

    merge_lora(model)
    with disable_adapters(model):
        assert not any(layer.merged for layer in lora_layers(model).values())
        torch.testing.assert_close(model(ids).logits, base_logits, atol=1e-5, rtol=0)
    assert all(layer.merged for layer in lora_layers(model).values())


def test_merged_model_and_unload_give_a_plain_model():
    """merged_model returns a new plain model: no LoRALinear, the base model's state_dict keys
    (`...q_proj.weight`, no `base_layer`), logits equal to the adapted ones up to merge rounding (1e-5);
    the live model is untouched (still adapted, bit-identical logits). unload does the same in place."""
    base, model = adapted("llama", target_modules="all-linear")
    ids = random_ids()
    adapted_logits = model(ids).logits

    plain = merged_model(model)
    assert not lora_layers(plain)
    assert list(plain.state_dict()) == list(base.state_dict())
    torch.testing.assert_close(plain(ids).logits, adapted_logits, atol=1e-5, rtol=0)
    assert len(lora_layers(model)) == 14 and torch.equal(model(ids).logits, adapted_logits)

    unloaded = unload(model)
    assert unloaded is model and not lora_layers(model)
    assert list(model.state_dict()) == list(base.state_dict())
    torch.testing.assert_close(model(ids).logits, adapted_logits, atol=1e-5, rtol=0)
    with pytest.raises(LoRAError, match="no LoRA layers"):
        merge_lora(model)


# ------------------------------------------------------------------------------------- save and resume


def test_save_then_load_and_resume_our_own_adapter(tmp_path):
    """save_adapter -> load_adapter on a fresh base reproduces the adapted logits bitwise (same weights,
    same ops). load_adapter_weights (resume: layers already injected) does too, and refuses an adapter of
    another r (4 vs 8), a model that already has LoRA layers, and a wrapper module (its names differ)."""
    base, model = adapted("llama", target_modules="all-linear")
    ids = random_ids()
    save_adapter(model, tmp_path)

    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded(ids).logits, model(ids).logits)

    # dropout 0.05: the injected layers take the eval mode of the model, so it must not fire here
    resumed = inject_lora(copy.deepcopy(base), LoRAConfig(r=4, alpha=8, dropout=0.05, target_modules="all-linear"))
    assert not any(module.training for module in resumed.modules())
    load_adapter_weights(resumed, tmp_path)
    assert torch.equal(resumed(ids).logits, model(ids).logits)

    other_rank = inject_lora(copy.deepcopy(base), LoRAConfig(r=8, alpha=8, target_modules="all-linear"))
    with pytest.raises(LoRAError, match="r=4"):
        load_adapter_weights(other_rank, tmp_path)
    with pytest.raises(LoRAError, match="already has LoRA"):
        load_adapter(resumed, tmp_path)
    with pytest.raises(LoRAError, match="unwrap_model"):
        save_adapter(nn.Sequential(model), tmp_path / "wrapped")
