"""Load models and tokenizers (Hub ids or local folders), or build the tiny built-in SmolLM3."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from engine.errors import UserError

# The built-in default: SmolLM3's architecture (GQA, NoPE every 4th layer, tied embeddings) at a size that
# trains in minutes on two CPU cores.
TINY_SMOLLM3 = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def torch_dtype(name: str | None) -> torch.dtype | str:
    """--dtype -> what from_pretrained takes: a torch dtype, or "auto" (the checkpoint's own dtype; None means
    auto too, as in from_pretrained)."""
    return "auto" if name in (None, "auto") else getattr(torch, name)


def build_tiny_smollm3(tokenizer: PreTrainedTokenizerBase, seed: int = 42, dtype: torch.dtype | str = "auto",
                       **overrides) -> PreTrainedModel:
    """A randomly initialised SmolLM3 sized for CPU, with token ids taken from `tokenizer`; initialised in fp32,
    then cast to `dtype` ("auto": stays fp32, the dtype its config names)."""
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    config = SmolLM3Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{**TINY_SMOLLM3, **overrides},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmolLM3ForCausalLM(config)
    return model if dtype == "auto" else model.to(dtype)


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") != 1


def check_model_source(name: str, what: str = "--model_name_or_path", marker: str = "config.json") -> None:
    """Fail early and clearly on a path that is neither a model folder nor a plausible Hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / marker).is_file():
            raise UserError(f"{what} {name}: folder has no {marker} (was it saved with save_pretrained?)")
    elif path.exists():
        raise UserError(f"{what} {name}: is a file; give the model's folder or a Hub id")
    elif _looks_local(name):
        raise UserError(f"{what} {name}: no such folder (and not a Hub id of the form owner/name)")


def load_tokenizer(name: str, *, revision: str = "main", trust_remote_code: bool = False,
                   chat_template_path: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer; give it a pad token (eos, as TRL does) if it has none."""
    check_model_source(name, "tokenizer", marker="tokenizer_config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise _load_failure("tokenizer", name, error) from error
    if chat_template_path is not None:
        template = Path(chat_template_path)
        if not template.is_file():
            raise UserError(f"--chat_template_path {chat_template_path}: no such file")
        tokenizer.chat_template = template.read_text()
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"tokenizer {name}: has neither a pad nor an eos token; set one in tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, *, revision: str = "main", trust_remote_code: bool = False,
               attn_implementation: str | None = None, dtype: torch.dtype | str = torch.float32,
               what: str = "--model_name_or_path") -> PreTrainedModel:
    """Load a causal LM in `dtype` (fp32 master weights by default, TRL's --dtype default; bf16 autocast happens in
    the loop; "auto": the checkpoint's own dtype)."""
    check_model_source(name, what)
    check_causal_lm(name, what, revision=revision, trust_remote_code=trust_remote_code)
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code, dtype=dtype)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        raise _load_failure(what, name, error) from error


def check_causal_lm(name: str, what: str, *, revision: str = "main", trust_remote_code: bool = False) -> None:
    """Refuse a model that is not a causal (decoder-only) LM, e.g. a BERT encoder: transformers would load it
    into a causal-LM class anyway (with a fresh, untrained head) and train something that cannot generate."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return  # from_pretrained says why, in its own words
    architectures = getattr(config, "architectures", None) or []
    remote_causal = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    causal = (config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or remote_causal) and not getattr(
        config, "is_encoder_decoder", False)
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        causal = False
    if not causal:
        kind = ", ".join(architectures) or config.model_type
        raise UserError(f"{what} {name}: a {kind} model ({config.model_type}) is not a causal language model; "
                        "nanopost trains decoder-only LMs (a *ForCausalLM architecture)")


def _load_failure(what: str, name: str, error: BaseException) -> UserError:
    message = _first_line(error)
    lowered = message.lower()
    if "connect" in lowered or "offline" in lowered or "resolve" in lowered:
        return UserError(f"{what} {name}: cannot reach the Hugging Face Hub (offline?) and it is not in the local "
                         "cache; connect, or pass a local folder saved with save_pretrained")
    if "safetensors" in lowered or "header" in lowered or "deserializ" in lowered:
        return UserError(f"{what} {name}: the weights file is corrupt or truncated ({message})")
    return UserError(f"{what} {name}: could not be loaded ({message})")


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
