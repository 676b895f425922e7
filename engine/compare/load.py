"""The inputs of a comparison: the two models (full models, LoRA adapter folders or Hub ids), the tokenizer, the
held-out preference pairs (a split, or a slice of one), the prompts to answer, and the judge.

Every bad input is an `engine.errors.UserError` (or the DataError / LoRAError of the package that found it): one
line that names the flag and the fix.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from engine.errors import UserError

_SPLIT_SLICE = re.compile(r"^(?P<split>[\w.-]+)(?:\[(?P<start>-?\d*%?):(?P<stop>-?\d*%?)\])?$")

Judge = Callable[[str, str, str], float]


def load_side(name: str, what: str, device: torch.device):
    """A model for one side, in eval mode on `device`, and where its tokenizer is.

    `name` is a model folder, a Hub id, or a LoRA adapter folder (adapter_config.json, saved by us or by PEFT):
    then its base model (the adapter's `base_model_name_or_path`) is loaded and the adapter applied.

    Returns:
        (model, tokenizer source): the adapter folder when it holds a tokenizer, else the (base) model.
    """
    from engine.model import load_model
    from engine.setup import adapter_base_model, lora_adapter_dir

    adapter_dir = lora_adapter_dir(name)
    if adapter_dir is None:
        return load_model(name, what=what).to(device).eval(), name
    from lora import load_adapter

    base = adapter_base_model(adapter_dir)
    model = load_adapter(load_model(base, what=f"{what} {name}: its base model"), adapter_dir)
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    return model.to(device).eval(), str(adapter_dir) if has_tokenizer else base


def load_shared_tokenizer(policy_source: str, reference_source: str, *models: torch.nn.Module):
    """The policy's tokenizer, after checking the reference's has the same vocabulary (the log-probs of both models
    are compared token by token, so the ids must mean the same) and that it fits every model's embedding."""
    from engine.model import load_tokenizer

    tokenizer = load_tokenizer(policy_source)
    if reference_source != policy_source:
        reference_vocab = load_tokenizer(reference_source).get_vocab()
        if reference_vocab != tokenizer.get_vocab():
            raise UserError(
                f"the policy's tokenizer ({policy_source}) and the reference's ({reference_source}) have different "
                "vocabularies; compare models that share a tokenizer"
            )
    for model in models:
        rows = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > rows:
            raise UserError(f"the tokenizer ({policy_source}) has {len(tokenizer)} tokens but a model's embedding has "
                            f"{rows} rows: the two models do not share the tokenizer")
    return tokenizer


def load_heldout_split(dataset_name: str, dataset_config: str | None, split: str):
    """The held-out rows: a split (`test`) or a slice of one, in `datasets`' notation (`train[-200:]`,
    `train[90%:]`, `test[:50]`)."""
    from data.errors import DataError
    from data.loading import load_dataset_splits

    match = _SPLIT_SLICE.match(split)
    if match is None:
        raise UserError(f"--dataset_test_split {split}: expected a split name, optionally sliced as name[start:stop] "
                        "(e.g. test, train[-200:], train[90%:])")
    name = match["split"]
    try:  # the loader's first split must exist; ask for ours in that role, with no second split
        rows, _ = load_dataset_splits(dataset_name, dataset_config, train_split=name, test_split=None)
    except DataError as error:
        hint = "--dataset_test_split (a split, or a slice of one such as train[-200:])"
        raise DataError(str(error).replace("--dataset_train_split", hint)) from None
    if match["start"] is None:
        return rows
    start, stop = (_slice_bound(match[key], len(rows)) for key in ("start", "stop"))
    indices = range(len(rows))[slice(start, stop)]
    if not indices:
        raise UserError(f"--dataset_test_split {split}: selects no rows (the '{name}' split has {len(rows)})")
    return rows.select(indices)


def _slice_bound(text: str, length: int) -> int | None:
    if not text:
        return None
    if text.endswith("%"):
        return round(int(text[:-1]) * length / 100)
    return int(text)


def load_prompts(path: str, tokenizer) -> list[list[int]]:
    """One prompt per non-empty line of a text file, as token ids: a user message rendered with the chat template
    (with the generation prompt) when the tokenizer has one, else the plain text."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--prompts {path}: no such file (give a text file with one prompt per line)")
    lines = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not lines:
        raise UserError(f"--prompts {path}: the file has no prompt (one prompt per line)")
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": line}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"] for line in lines]
    return [tokenizer(line)["input_ids"] for line in lines]


def load_judge(spec: str) -> Judge:
    """`module:function` -> the function, imported as `import module` would (the current folder first).

    The judge is called as `judge(prompt, a, b)` with the prompt as the model saw it and two answers, and returns
    how much `a` beats `b`: 1.0 win, 0.5 tie, 0.0 loss (anything in between for a graded judge).
    """
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise UserError(f"--judge {spec}: expected module:function (e.g. my_judges:length_judge)")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(f"--judge {spec}: cannot import module '{module_name}' ({error})") from None
    judge = getattr(module, function_name, None)
    if not callable(judge):
        raise UserError(f"--judge {spec}: module '{module_name}' has no function '{function_name}'")
    return judge
