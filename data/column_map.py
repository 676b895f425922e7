"""`--dataset_column_map`: map another schema onto the columns SFT or DPO reads, by renaming or by a preset.

    --dataset_column_map question=prompt answer=completion     # rename columns (source=target)
    --dataset_column_map gsm8k                                  # a preset from PRESETS

    normalize_sft_columns(dataset, ["question=prompt", "answer=completion"])
    normalize_dpo_columns(dataset, ["ultrafeedback-binarized-preferences"])

SFT presets build `prompt`/`completion` from well-known schemas (GSM8K, Alpaca, Dolly). The plain names give text
prompt/completion (the prompt ends with a newline, so no token spans the boundary); the `_chat` variants give
conversational prompt/completion (one user message, one assistant message) rendered by the chat template.

DPO presets, for the preference schemas the course names:
- `ultrafeedback-binarized-preferences` (argilla/ultrafeedback-binarized-preferences: `instruction`,
  `chosen_response`, `rejected_response`): a user message and the two assistant answers, rendered by the chat
  template (as trl-lib/ultrafeedback_binarized holds them).
- `hh-rlhf` (Anthropic/hh-rlhf: `chosen` and `rejected` texts of "\\n\\nHuman: ..." / "\\n\\nAssistant: ..." turns):
  both dialogues as messages; the prompt is their common leading turns (DPO's implicit prompt).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from data.errors import DataError

TARGET_COLUMNS = {
    "sft": ("text", "messages", "conversations", "prompt", "completion", "input_ids", "labels", "tools",
            "chat_template_kwargs"),
    "dpo": ("prompt", "chosen", "rejected", "tools", "chat_template_kwargs"),
}
"""Columns a rename may create, per method. `tools` / `chat_template_kwargs` are passed to the chat template."""

_METHOD_NAMES = {"sft": "an SFT", "dpo": "a DPO"}


@dataclass(frozen=True)
class ColumnPreset:
    """A named mapping from a well-known schema to the columns a method reads.

    Attributes:
        method: "sft" or "dpo".
        description: One line for docs and `--help`.
        required: Columns the dataset must have (non-empty strings in every row).
        optional: Columns the preset also reads when present (dropped with the required ones).
        produces: Columns it writes (a stale column of the same name is replaced).
        build: Row -> the produced columns.
        chat: Whether it builds message lists (rendered by the chat template) rather than text.
    """

    method: str
    description: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    produces: tuple[str, ...]
    build: Callable[[dict[str, Any], int], dict[str, Any]]
    chat: bool = False


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _with_context(instruction: str, context: str | None) -> str:
    return f"{instruction}\n\n{context}" if context else instruction


_SFT_PAIRS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], Callable[[dict[str, Any]], tuple[str, str]]]] = {
    "gsm8k": ("GSM8K: question -> prompt, answer -> completion", ("question", "answer"), (),
              lambda row: (row["question"], row["answer"])),
    "alpaca": ("Alpaca: instruction (+ input) -> prompt, output -> completion", ("instruction", "output"), ("input",),
               lambda row: (_with_context(row["instruction"], row.get("input")), row["output"])),
    "dolly": ("Dolly: instruction (+ context) -> prompt, response -> completion", ("instruction", "response"),
              ("context",), lambda row: (_with_context(row["instruction"], row.get("context")), row["response"])),
}


def _text_pair(pair: Callable[[dict[str, Any]], tuple[str, str]]) -> Callable[[dict[str, Any], int], dict[str, Any]]:
    def build(row: dict[str, Any], index: int) -> dict[str, Any]:
        prompt, completion = pair(row)
        # The prompt ends with a newline so that BPE never merges its last token with the completion's first.
        return {"prompt": prompt + "\n", "completion": completion}
    return build


def _chat_pair(pair: Callable[[dict[str, Any]], tuple[str, str]]) -> Callable[[dict[str, Any], int], dict[str, Any]]:
    def build(row: dict[str, Any], index: int) -> dict[str, Any]:
        prompt, completion = pair(row)
        return {"prompt": _user(prompt), "completion": _assistant(completion)}
    return build


def _ultrafeedback(row: dict[str, Any], index: int) -> dict[str, Any]:
    return {"prompt": _user(row["instruction"]), "chosen": _assistant(row["chosen_response"]),
            "rejected": _assistant(row["rejected_response"])}


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_rlhf_messages(dialogue: str, index: int, field_name: str) -> list[dict[str, str]]:
    """An hh-rlhf dialogue ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages, each content stripped."""
    parts = _HH_TURN.split(dialogue)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(
            f"Row {index}: field '{field_name}' is not an hh-rlhf dialogue (turns starting with \"\\n\\nHuman: \" "
            f"and \"\\n\\nAssistant: \"), got {dialogue!r:.80}."
        )
    return [{"role": _HH_ROLES[speaker], "content": content.strip()}
            for speaker, content in zip(parts[1::2], parts[2::2], strict=True)]


def _hh_rlhf(row: dict[str, Any], index: int) -> dict[str, Any]:
    return {name: hh_rlhf_messages(row[name], index, name) for name in ("chosen", "rejected")}


PRESETS: dict[str, ColumnPreset] = {
    **{name: ColumnPreset("sft", description, required, optional, ("prompt", "completion"), _text_pair(pair))
       for name, (description, required, optional, pair) in _SFT_PAIRS.items()},
    **{f"{name}_chat": ColumnPreset("sft", description + " (as user/assistant messages)", required, optional,
                                    ("prompt", "completion"), _chat_pair(pair), chat=True)
       for name, (description, required, optional, pair) in _SFT_PAIRS.items()},
    "ultrafeedback-binarized-preferences": ColumnPreset(
        "dpo", "UltraFeedback binarized preferences: instruction -> a user prompt, chosen_response / "
        "rejected_response -> the assistant answers", ("instruction", "chosen_response", "rejected_response"), (),
        ("prompt", "chosen", "rejected"), _ultrafeedback, chat=True),
    "hh-rlhf": ColumnPreset(
        "dpo", "Anthropic hh-rlhf: chosen / rejected Human/Assistant dialogues -> messages (implicit prompt)",
        ("chosen", "rejected"), (), ("chosen", "rejected"), _hh_rlhf, chat=True),
}
"""Named schema mappings for --dataset_column_map, each for one method."""

COLUMN_PRESETS = {name: preset for name, preset in PRESETS.items() if preset.method == "sft"}
"""The SFT presets: `<name>` gives text prompt/completion, `<name>_chat` messages."""


def suggest_preset(column_names: Sequence[str]) -> str | None:
    """The SFT text preset whose required columns the dataset has, if exactly one matches."""
    matches = [
        name for name, preset in COLUMN_PRESETS.items()
        if not preset.chat and all(column in column_names for column in preset.required)
    ]
    return matches[0] if len(matches) == 1 else None


# ---------------------------------------------------------------------------------------------------- mapping


def parse_column_map(spec: dict[str, str] | Sequence[str] | str | None,
                     method: str = "sft") -> dict[str, str] | str | None:
    """Turn a `--dataset_column_map` value into a rename dict or a preset name.

    Accepted: `None`; a dict {source: target}; a preset name (`"gsm8k"` or `["gsm8k"]`); pairs
    (`["question=prompt", "answer=completion"]` or `"question=prompt,answer=completion"`).

    Raises:
        DataError: Unknown preset (or one for the other method), a malformed pair, or a preset mixed with pairs.
    """
    if spec is None or isinstance(spec, dict):
        return spec
    items = [spec] if isinstance(spec, str) else list(spec)
    parts = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    if not parts:
        return None
    if len(parts) == 1 and "=" not in parts[0]:
        preset = PRESETS.get(parts[0])
        if preset is None or preset.method != method:
            other = f" (it is a --method {preset.method} preset)" if preset is not None else ""
            names = sorted(name for name, known in PRESETS.items() if known.method == method)
            raise DataError(
                f"--dataset_column_map {parts[0]}: unknown preset{other}; use one of {names} or pairs like "
                "question=prompt answer=completion."
            )
        return parts[0]
    mapping: dict[str, str] = {}
    for part in parts:
        source, sep, target = part.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise DataError(
                f"--dataset_column_map: '{part}' is not a source=target pair (e.g. question=prompt); a preset name "
                "cannot be combined with pairs."
            )
        mapping[source.strip()] = target.strip()
    return mapping


def normalize_sft_columns(dataset: Any, column_map: dict[str, str] | Sequence[str] | str | None):
    """Map the dataset's columns onto an SFT format (`data.formats`); see `normalize_columns`."""
    return normalize_columns(dataset, column_map, "sft")


def normalize_dpo_columns(dataset: Any, column_map: dict[str, str] | Sequence[str] | str | None):
    """Map the dataset's columns onto a preference schema (`data.dpo`); see `normalize_columns`."""
    return normalize_columns(dataset, column_map, "dpo")


def normalize_columns(dataset: Any, column_map: dict[str, str] | Sequence[str] | str | None, method: str):
    """Rename columns or apply a preset so that the dataset is in a schema `method` reads.

    Args:
        dataset: A `datasets.Dataset` or a list of row dicts.
        column_map: See `parse_column_map`. `None` returns the dataset unchanged (its format is checked later).
        method: "sft" or "dpo".

    Returns:
        The same kind of object with the mapped columns (a preset drops the columns it consumed).

    Raises:
        DataError: A source column that does not exist (lists the columns), a target the method does not read,
            a rename onto an existing column, or a row missing a preset's column.
    """
    column_map = parse_column_map(column_map, method)
    if column_map is None:
        return dataset
    columns = list(dataset[0].keys()) if isinstance(dataset, list) and dataset else list(
        getattr(dataset, "column_names", []))

    if isinstance(column_map, str):
        return _apply_preset(dataset, columns, column_map)

    targets = TARGET_COLUMNS[method]
    for source, target in column_map.items():
        if source not in columns:
            raise DataError(f"--dataset_column_map {source}={target}: no column '{source}' (columns: {columns}).")
        if target not in targets:
            raise DataError(
                f"--dataset_column_map {source}={target}: '{target}' is not {_METHOD_NAMES[method]} column; use one "
                f"of {list(targets)}."
            )
        if target in columns and target not in column_map:
            raise DataError(
                f"--dataset_column_map {source}={target}: the dataset already has a '{target}' column; map it "
                f"elsewhere too or drop it."
            )
    renames = {source: target for source, target in column_map.items() if source != target}
    if isinstance(dataset, list):
        return [{renames.get(key, key): value for key, value in row.items()} for row in dataset]
    return dataset.rename_columns(renames)


def _apply_preset(dataset: Any, columns: list[str], name: str):
    preset = PRESETS[name]
    missing = [column for column in preset.required if column not in columns]
    if missing:
        raise DataError(
            f"--dataset_column_map {name} needs the columns {list(preset.required)}, but {missing} are "
            f"missing (columns: {columns})."
        )

    def apply(row: dict[str, Any], index: int) -> dict[str, Any]:
        for column in preset.required:
            if not isinstance(row[column], str) or not row[column].strip():
                raise DataError(
                    f"Row {index}: field '{column}' must be a non-empty string for preset '{name}' "
                    f"(got {row[column]!r}); fix or remove the row."
                )
        return preset.build(row, index)

    # The preset's own columns go; so do stale columns of the names it writes, which its output replaces.
    consumed = [column for column in columns if column in (*preset.required, *preset.optional, *preset.produces)]
    if isinstance(dataset, list):
        return [
            {**{k: v for k, v in row.items() if k not in consumed}, **apply(row, index)}
            for index, row in enumerate(dataset)
        ]
    return dataset.map(apply, with_indices=True, remove_columns=consumed, desc=f"Applying preset {name}")
