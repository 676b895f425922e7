"""Absolute paths to the assets shipped inside the package (used when the user names no tokenizer or dataset)."""

from pathlib import Path

_DATA_DIR = Path(__file__).resolve().parent

DEFAULT_TOKENIZER_DIR: Path = _DATA_DIR / "assets" / "tokenizer"
"""Byte-level BPE tokenizer (1024 tokens, eos `<|im_end|>`, pad `<|pad|>`, no BOS) with a ChatML chat template;
load with `transformers.AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER_DIR)`. Built by scripts/build_tokenizer.py."""

DEFAULT_SFT_DATASET: Path = _DATA_DIR / "bundled" / "chat"
"""SFT chat data: train.jsonl / test.jsonl with a `messages` column. Built by scripts/make_data.py."""

DEFAULT_DPO_DATASET: Path = _DATA_DIR / "bundled" / "preference"
"""DPO preference data: train.jsonl / test.jsonl with conversational `prompt`, `chosen`, `rejected` columns."""
