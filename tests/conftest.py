"""Shared test setup: offline, deterministic, and light on the 2-core CI machine."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

# One thread: these tiny models gain nothing from two, and one is immune to a busy second core.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer, hidden-32 SmolLM3 with the shipped tokenizer, saved as a from_pretrained folder."""
    from transformers import AutoTokenizer

    from data.defaults import DEFAULT_TOKENIZER_DIR
    from engine.model import build_tiny_smollm3

    folder = tmp_path_factory.mktemp("tiny_model") / "model"
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER_DIR)
    build_tiny_smollm3(tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """The tokenizer the TRL-parity tests use on both sides (the shipped one; see tests/trl_harness.py).
    Files that need another tokenizer define their own `tokenizer` fixture, which takes precedence."""
    from tests.trl_harness import load_or_build_tokenizer

    return load_or_build_tokenizer(tmp_path_factory.mktemp("tokenizer_build"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, tokenizer):
    """`tokenizer` saved with save_pretrained, for --tokenizer_name_or_path."""
    folder = tmp_path_factory.mktemp("tokenizer") / "saved"
    tokenizer.save_pretrained(str(folder))
    return folder


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject.toml): one worker per core, at most 4. Each worker is a full Python with torch and
    runs its own tiny trainings, some of them in subprocesses; more workers than cores only queue."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 4))
