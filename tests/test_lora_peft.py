"""LoRA against the installed PEFT 0.21.2: same init, same logits and grads, and each loads the other's files.

Run: pytest tests/test_lora_peft.py -q
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_lora import random_ids, randomize_adapters, tiny_model
from torch import nn

from lora import (
    LoRAConfig,
    disable_adapters,
    inject_lora,
    load_adapter,
    lora_layers,
    lora_parameters,
    save_adapter,
    trainable_parameter_summary,
)
from lora.errors import LoRAError
from lora.peft_io import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

# (architecture, our LoRAConfig kwargs): q/v as in the LoRA paper, all-linear with rsLoRA, and a regex.
CASES = [
    ("smollm3", dict(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"])),
    ("llama", dict(r=4, alpha=16, target_modules="all-linear", use_rslora=True)),
    ("llama", dict(r=2, alpha=4, target_modules=r".*\.mlp\.(gate|down)_proj")),
]


def peft_config(ours: dict) -> LoraConfig:
    return LoraConfig(
        r=ours["r"], lora_alpha=ours["alpha"], lora_dropout=ours.get("dropout", 0.0),
        target_modules=ours["target_modules"], use_rslora=ours.get("use_rslora", False), task_type="CAUSAL_LM",
    )


def peft_name(ours_name: str) -> str:
    """Our parameter name -> PeftModel's: "base_model.model." prefix and the adapter name before "weight"."""
    return "base_model.model." + ours_name.removesuffix(".weight") + ".default.weight"


def both(arch: str, config: dict, seed: int = 1) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(base, ours, PEFT's) from one base model, adapters seeded identically."""
    base = tiny_model(arch)
    config = {"dropout": 0.0, **config}
    torch.manual_seed(seed)
    ours = inject_lora(copy.deepcopy(base), LoRAConfig(**config))
    torch.manual_seed(seed)
    theirs = get_peft_model(copy.deepcopy(base), peft_config(config))
    # PEFT's new layers start in train mode even in an eval model (ours follow the model), so their dropout
    # would fire; put both in eval mode explicitly.
    return base, ours.eval(), theirs.eval()


def copy_adapters(ours: nn.Module, theirs: nn.Module) -> None:
    """Give PEFT's model exactly our A and B."""
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, param in lora_parameters(ours).items():
            theirs_params[peft_name(name)].copy_(param)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["smollm3", "llama"])
def test_initial_adapters_equal_peft(arch, dtype):
    """Same seed before injection -> the very same A (bitwise): we consume the RNG as PEFT does (two
    nn.Linear inits, then kaiming_uniform(a=√5) on A) and, on a bf16 base, round A through bf16 and keep
    it in fp32 as PEFT does. B is zero in both. Same targeted modules for all-linear."""
    base = tiny_model(arch, dtype)
    torch.manual_seed(1)
    ours = inject_lora(copy.deepcopy(base), LoRAConfig(r=4, target_modules="all-linear"))
    torch.manual_seed(1)
    theirs = get_peft_model(copy.deepcopy(base), peft_config(dict(r=4, alpha=32, target_modules="all-linear")))
    assert sorted(lora_layers(ours)) == sorted(theirs.base_model.targeted_module_names)
    theirs_params = dict(theirs.named_parameters())
    for name, param in lora_parameters(ours).items():
        peft_param = theirs_params[peft_name(name)]
        assert param.dtype == peft_param.dtype == torch.float32, name
        assert torch.equal(param, peft_param), name
    assert trainable_parameter_summary(ours) == _peft_summary(theirs)


def _peft_summary(peft_model) -> str:
    trainable, total = peft_model.get_nb_trainable_parameters()
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


@pytest.mark.parametrize(("arch", "config"), CASES)
def test_logits_and_grads_equal_peft(arch, config):
    """Same base, same nonzero A and B: our logits equal PEFT's within 1e-6 in fp32 (the ops are the same,
    in the same order), and so do the adapter grads of a LM loss. The adapter moves the logits by > 0.05,
    so a wrong scaling or a missed layer would show. With adapters disabled both give the base logits.
    In train mode with dropout (first case), the same seed draws the same masks: grads still agree."""
    base, ours, theirs = both(arch, config)
    randomize_adapters(ours)
    copy_adapters(ours, theirs)
    assert sorted(lora_layers(ours)) == sorted(theirs.base_model.targeted_module_names)
    ids = random_ids()

    ours_logits, theirs_logits = ours(ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(ours_logits, theirs_logits, atol=1e-6, rtol=0)
    assert (ours_logits - base(ids).logits).abs().max() > 0.05

    with torch.no_grad(), disable_adapters(ours), theirs.disable_adapter():
        torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, atol=1e-6, rtol=0)

    ours.train(), theirs.train()
    torch.manual_seed(3)
    ours(ids, labels=ids).loss.backward()
    torch.manual_seed(3)
    theirs(input_ids=ids, labels=ids).loss.backward()
    theirs_params = dict(theirs.named_parameters())
    for name, param in lora_parameters(ours).items():
        torch.testing.assert_close(param.grad, theirs_params[peft_name(name)].grad, atol=1e-6, rtol=0)


def test_autocast_bf16_logits_equal_peft():
    """Under torch.autocast(bf16) both run the same bf16 matmuls on fp32 adapters: bf16 logits that agree
    exactly (0 difference) with PEFT's."""
    _, ours, theirs = both("smollm3", dict(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(ours)
    copy_adapters(ours, theirs)
    ids = random_ids()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours_logits, theirs_logits = ours(ids).logits, theirs(input_ids=ids).logits
    assert ours_logits.dtype == theirs_logits.dtype == torch.bfloat16
    assert torch.equal(ours_logits, theirs_logits)


# ------------------------------------------------------------------------------------------ files


@pytest.mark.parametrize(("arch", "config"), CASES[:2])
def test_save_adapter_loads_in_peft(arch, config, tmp_path):
    """ours -> save_adapter -> PeftModel.from_pretrained(base, dir): PEFT finds every weight (it would only
    warn on a missing key, so we also assert the logits: equal to ours within 1e-6, in fact bitwise), and
    reads back r, alpha, dropout, rsLoRA, targets. Our file holds exactly the keys PEFT's own save writes."""
    base, ours, theirs = both(arch, config)
    randomize_adapters(ours)
    save_adapter(ours, tmp_path / "ours", base_model_name_or_path="some/base")
    theirs.save_pretrained(tmp_path / "peft")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert not [w for w in caught if "key" in str(w.message).lower()], [str(w.message) for w in caught]
    ids = random_ids()
    torch.testing.assert_close(loaded(input_ids=ids).logits, ours(ids).logits, atol=1e-6, rtol=0)

    loaded_config = loaded.peft_config["default"]
    assert (loaded_config.r, loaded_config.lora_alpha, loaded_config.lora_dropout, loaded_config.use_rslora) == (
        config["r"], config["alpha"], config.get("dropout", 0.0), config.get("use_rslora", False))
    assert loaded_config.base_model_name_or_path == "some/base"
    assert loaded_config.peft_type == "LORA" and loaded_config.task_type == "CAUSAL_LM"
    ours_keys = set(load_file(tmp_path / "ours" / ADAPTER_WEIGHTS_NAME))
    assert ours_keys == set(load_file(tmp_path / "peft" / ADAPTER_WEIGHTS_NAME))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in ours_keys


@pytest.mark.parametrize(("arch", "config"), CASES)
def test_peft_adapter_loads_in_ours(arch, config, tmp_path):
    """PEFT save_pretrained -> our load_adapter(base, dir): same layers adapted, same r / alpha / rsLoRA,
    logits equal PEFT's within 1e-6 (bitwise in practice). The adapter parameters are trainable after."""
    base, _, theirs = both(arch, config)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    theirs.save_pretrained(tmp_path)

    ours = load_adapter(copy.deepcopy(base), tmp_path)
    assert sorted(lora_layers(ours)) == sorted(theirs.base_model.targeted_module_names)
    ids = random_ids()
    torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, atol=1e-6, rtol=0)
    assert all(param.requires_grad for param in lora_parameters(ours).values())


def _peft_save(tmp_path):
    base, _, theirs = both("smollm3", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    theirs.save_pretrained(tmp_path)
    return base


def test_load_adapter_refuses_missing_unexpected_and_misshapen_keys(tmp_path):
    """PEFT only warns on such files and runs with zero/random adapters; we raise a LoRAError naming the key."""
    base = _peft_save(tmp_path)
    weights = tmp_path / ADAPTER_WEIGHTS_NAME
    state = load_file(weights)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    save_file({k: v for k, v in state.items() if k != key}, weights)
    with pytest.raises(LoRAError, match="1 missing") as info:
        load_adapter(copy.deepcopy(base), tmp_path)
    assert key in str(info.value)

    save_file({**state, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)}, weights)
    with pytest.raises(LoRAError, match="1 unexpected"):
        load_adapter(copy.deepcopy(base), tmp_path)

    save_file({**state, key: torch.zeros(32, 5)}, weights)
    with pytest.raises(LoRAError, match="shape"):
        load_adapter(copy.deepcopy(base), tmp_path)


@pytest.mark.parametrize(("field", "value"), [("rank_pattern", {"q_proj": 8}), ("layers_to_transform", [0]),
                                              ("task_type", "SEQ_CLS"), ("peft_type", "IA3")])
def test_load_adapter_refuses_peft_features_it_does_not_implement(tmp_path, field, value):
    """Per-module ranks, adapting only some layers, another task's head, other PEFT methods would load without
    error and compute something else; refuse with a LoRAError naming the field.

    DoRA (`use_dora`) and `modules_to_save` were refused here until they were implemented (issue 10); their cases
    were dropped: tests/test_wire_ref_lora.py loads PEFT's DoRA + modules_to_save adapters and checks the logits."""
    base = _peft_save(tmp_path)
    config_path = tmp_path / ADAPTER_CONFIG_NAME
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, field: value}))
    with pytest.raises(LoRAError, match=field):
        load_adapter(copy.deepcopy(base), tmp_path)
