"""What the benchmark runs: model shapes, generated data, and the matmul-FLOP count per trained token.

Shared by scripts/bench.py (the driver) and scripts/bench/worker.py (one run in its own process), so both
engines see byte-identical models and data.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = REPO / "data" / "assets" / "tokenizer"

# Jobs as (method, extra engine flags). The same options are given to TRL by worker.py.
JOBS = ("sft", "dpo", "dpo-precompute", "lora-dpo", "sft-padding-free", "dpo-padding-free")
PADDING_FREE = "-padding-free"  # a job with this suffix: the base job with --padding_free (one row per batch)


def base_job(job: str) -> str:
    """The job without its padding-free suffix: what it computes (its FLOPs, its data)."""
    return job.removesuffix(PADDING_FREE)
DTYPES = ("fp32", "bf16")
LORA = dict(r=16, alpha=32, dropout=0.05)  # both engines' defaults (--lora_r/--lora_alpha/--lora_dropout)


@dataclass(frozen=True)
class Shape:
    """A random-init model built from its config (no Hub), and the batch it trains on."""

    name: str
    arch: str  # "llama" or "smollm3"
    config: dict
    max_length: int = 512
    batch_size: int = 8
    prompt_tokens: tuple[int, int] = (16, 128)  # uniform range of generated prompt lengths (tokens)
    completion_tokens: tuple[int, int] = (16, 384)  # ... and of each completion (SFT; DPO chosen and rejected)
    about: str = ""


_LLAMA_256 = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=1024)
SHAPES = {
    "llama-7m": Shape("llama-7m", "llama", {**_LLAMA_256, "vocab_size": 8192},
                      about="Llama, hidden 256, 4 layers, vocab 8,192 (~7M parameters, untied head)"),
    "smollm3-57m": Shape("smollm3-57m", "smollm3",
                         dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                              num_key_value_heads=4, max_position_embeddings=1024, vocab_size=8192),
                         about="SmolLM3, hidden 768, 8 layers, vocab 8,192 (~57M parameters, tied head)"),
    "llama-128k": Shape("llama-128k", "llama", {**_LLAMA_256, "vocab_size": 128256},
                        about="Llama hidden 256, 4 layers, SmolLM3's 128,256-token vocabulary (~69M parameters)"),
    # --quick: a smoke shape that runs in seconds (not a measurement).
    "tiny": Shape("tiny", "llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        vocab_size=1024),
                  max_length=64, batch_size=2, prompt_tokens=(4, 16), completion_tokens=(4, 40),
                  about="smoke test: Llama hidden 64, 2 layers, vocab 1,024"),
}


def _model_classes(arch: str):
    from transformers import LlamaConfig, LlamaForCausalLM, SmolLM3Config, SmolLM3ForCausalLM

    return {"llama": (LlamaConfig, LlamaForCausalLM), "smollm3": (SmolLM3Config, SmolLM3ForCausalLM)}[arch]


def _hf_config(shape: Shape, tokenizer):
    config_cls, _ = _model_classes(shape.arch)
    return config_cls(**shape.config, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=None)


def build_model_dir(shape: Shape, tokenizer, folder: Path, seed: int = 42) -> Path:
    """Random-init the shape's model (fp32, seeded) and save it, so both engines load the same weights."""
    _, model_cls = _model_classes(shape.arch)
    out = folder / f"model-{shape.name}"
    if not (out / "config.json").exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model_cls(_hf_config(shape, tokenizer)).float().save_pretrained(str(out))
    return out


def matmul_params(shape: Shape, tokenizer) -> tuple[int, int]:
    """(N, N_lora): weights of every nn.Linear incl. the LM head (N), and of the rank-r LoRA adapters that
    all-linear puts on every Linear except the LM head (N_lora). Counted on the meta device: nothing allocated."""
    _, model_cls = _model_classes(shape.arch)
    with torch.device("meta"):
        model = model_cls(_hf_config(shape, tokenizer))
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    n = sum(m.weight.numel() for _, m in linears)
    n_lora = sum(LORA["r"] * (m.in_features + m.out_features) for name, m in linears if name != "lm_head")
    return n, n_lora


def flops_per_token(job: str, n: int, n_lora: int) -> int:
    """Model matmul FLOPs per trained (non-padding) token, the numerator of MFU.

    A matmul with a weight of N entries costs 2N FLOPs per token forward; backward costs 2N for the input
    gradient plus 2N for the weight gradient. Hence (attention's score/value matmuls and elementwise work are
    left out, so MFU is a slight underestimate at 512 tokens):
        sft              6N                    policy forward + backward
        dpo              6N + 2N = 8N          + the reference's forward over the same tokens
        dpo-precompute   6N                    reference log-probs computed before training (start-up)
        lora-dpo         4N + 6N_lora + 2N     frozen base: forward + input grads only (no weight grads);
                                               adapters: full 6 N_lora; reference = adapters off, forward 2N
        *-padding-free   as the base job       the same tokens, packed into one row per micro-batch
    Tokens are the non-padding tokens of the batch (a DPO pair's chosen and rejected rows both count), and every
    one is charged the full model, LM head included: the work the model defines, not the work an implementation
    chooses to do. An engine that skips the head on prompt positions (which carry no target) therefore shows a
    higher MFU for the same matmul speed; 1 / MFU is the step time over its matmul-FLOP bound.
    """
    return {"sft": 6 * n, "dpo": 8 * n, "dpo-precompute": 6 * n, "lora-dpo": 6 * n + 6 * n_lora}[base_job(job)]


def _digits(rng: random.Random, count: int) -> str:
    # The shipped tokenizer splits digits one per token, so `count` digits are `count` tokens: lengths are exact.
    return "".join(rng.choice("0123456789") for _ in range(count))


def write_data(shape: Shape, folder: Path, rows: int, seed: int = 42) -> dict[str, Path]:
    """Generated SFT (prompt/completion) and DPO (prompt/chosen/rejected) rows as JSONL, lengths drawn from the
    shape's ranges (so batches carry realistic padding); the same files feed both engines."""
    rng = random.Random(seed)
    lo_p, hi_p = shape.prompt_tokens
    lo_c, hi_c = shape.completion_tokens
    sft, dpo = [], []
    for _ in range(rows):
        prompt = _digits(rng, rng.randint(lo_p, hi_p))
        sft.append({"prompt": prompt, "completion": _digits(rng, rng.randint(lo_c, hi_c))})
        dpo.append({"prompt": prompt, "chosen": _digits(rng, rng.randint(lo_c, hi_c)),
                    "rejected": _digits(rng, rng.randint(lo_c, hi_c))})
    files = {}
    for name, data in (("sft", sft), ("dpo", dpo)):
        path = folder / f"data-{shape.name}-{name}" / "train.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in data))
        files[name] = path
    return files


def gemm_peak(dtype: torch.dtype, size: int, seconds: float = 1.0) -> float:
    """Best FLOP/s of a square matmul (2 size^3 FLOPs), over repeated timed bursts: the machine's matmul peak."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    torch.matmul(a, b)
    while time.perf_counter() < deadline:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def gemm_peaks(size: int, seconds: float) -> dict[str, float]:
    """The fp32 and bf16 matmul peaks (FLOP/s), the denominators of MFU."""
    return {"fp32": gemm_peak(torch.float32, size, seconds), "bf16": gemm_peak(torch.bfloat16, size, seconds)}
