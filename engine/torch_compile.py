"""--torch_compile, --torch_compile_backend, --torch_compile_mode: torch.compile on the module accelerate prepares.

As transformers' TrainingArguments: a backend or a mode implies --torch_compile, and inductor is the default backend.
The compile is in place (`nn.Module.compile`), so the prepared module keeps its type and state-dict keys:
checkpoints, saving and `accelerator.unwrap_model` are those of an eager run. What cannot work here (inductor on
a CPU without a C++ compiler, on CUDA without triton, an unknown backend) stops the run before the model is loaded.

Numbers: inductor fuses kernels and may round differently from eager (measured on the tiny CPU model: equal to the
last bit for 2 steps); its random numbers (dropout, NEFTune) come from its own generator, not eager's stream. The
TRL parity tests run eager (the default) for an exact comparison.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import torch

from engine.config import TrainConfig
from engine.errors import UserError


def compile_backend(config: TrainConfig) -> str | None:
    """The torch.compile backend the run uses: None without --torch_compile; a backend or mode implies it, and
    inductor is the default (as transformers' TrainingArguments)."""
    if not (config.torch_compile or config.torch_compile_backend or config.torch_compile_mode):
        return None
    return config.torch_compile_backend or "inductor"


def check_compile(config: TrainConfig, device: torch.device) -> None:
    """Fail before loading anything when --torch_compile cannot work here (the compile itself runs at step 1)."""
    backend = compile_backend(config)
    if backend is None:
        return
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise UserError(f"--torch_compile_backend {backend}: not a torch.compile backend here "
                        f"(this torch has: {', '.join(torch._dynamo.list_backends())}, aot_eager, eager)")
    if backend != "inductor":
        return
    if device.type == "cpu":
        from torch._inductor import config as inductor_config

        compilers = [c for c in (os.environ.get("CXX"), *inductor_config.cpp.cxx) if c]
        if not any(shutil.which(c) for c in compilers):
            raise UserError(f"--torch_compile: inductor on the CPU needs a C++ compiler ({' or '.join(compilers)}) "
                            "and none is on PATH; install one (apt install g++) or use --torch_compile_backend "
                            "aot_eager")
    elif device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise UserError("--torch_compile: inductor on CUDA needs triton (pip install triton), which is not installed")


def compile_policy(config: TrainConfig, policy: torch.nn.Module) -> None:
    """Compile `policy` (the module accelerate will prepare) in place when --torch_compile asks for it."""
    backend = compile_backend(config)
    if backend is not None:
        policy.compile(backend=backend, mode=config.torch_compile_mode)
