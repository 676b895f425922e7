"""Which SFT format a dataset is in, and how to map other schemas onto one.

Accepted formats (the ones TRL 1.16's `SFTTrainer` reads), detected from the columns and the first row in the
order TRL's `_prepare_dataset` checks them:

| format                              | columns                                   | loss on (default)        |
|-------------------------------------|-------------------------------------------|--------------------------|
| `tokenized`                         | `input_ids` (+ optional `labels`)         | every token / `labels`   |
| `conversations` (ShareGPT)          | `conversations`: [{from, value}, ...]     | every token              |
| `prompt_completion`                 | `prompt`, `completion` (strings)          | completion               |
| `prompt_completion_conversational`  | `prompt`, `completion` (message lists)    | completion               |
| `messages`                          | `messages`: [{role, content}, ...]        | every token              |
| `text`                              | `text` (or `--dataset_text_field`)        | every token              |

Any other schema is mapped with `--dataset_column_map`, which `normalize_sft_columns` applies:

    --dataset_column_map question=prompt answer=completion     # rename columns (source=target)
    --dataset_column_map gsm8k                                  # a preset from COLUMN_PRESETS

Presets build `prompt`/`completion` from well-known schemas (GSM8K, Alpaca, Dolly). The plain preset names give
text prompt/completion (prompt ends with a newline, so no token spans the boundary); the `_chat` variants give
conversational prompt/completion (one user message, one assistant message) rendered by the chat template.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from data.errors import DataError
from data.messages import is_message_list

TOKENIZED = "tokenized"
CONVERSATIONS = "conversations"
PROMPT_COMPLETION = "prompt_completion"
PROMPT_COMPLETION_CONVERSATIONAL = "prompt_completion_conversational"
MESSAGES = "messages"
TEXT = "text"

SFT_FORMATS: dict[str, str] = {
    TOKENIZED: "'input_ids' (pre-tokenized, optional 'labels' with -100 for no loss)",
    CONVERSATIONS: "'conversations' (list of {from, value} or {role, content})",
    PROMPT_COMPLETION: "'prompt' + 'completion' (strings)",
    PROMPT_COMPLETION_CONVERSATIONAL: "'prompt' + 'completion' (lists of {role, content})",
    MESSAGES: "'messages' (list of {role, content})",
    TEXT: "'text' (or the column named by --dataset_text_field)",
}
"""Every accepted SFT format and the columns that make it, for error messages and docs."""

CONVERSATIONAL_FORMATS = frozenset({CONVERSATIONS, MESSAGES, PROMPT_COMPLETION_CONVERSATIONAL})

# Columns a --dataset_column_map may create. `tools` / `chat_template_kwargs` are passed to the chat template.
TARGET_COLUMNS = ("text", "messages", "conversations", "prompt", "completion", "input_ids", "labels", "tools",
                  "chat_template_kwargs")

_ACCEPTED = "; ".join(SFT_FORMATS.values())


def detect_sft_format(column_names: Sequence[str], first_row: dict[str, Any], dataset_text_field: str = "text") -> str:
    """Name the SFT format of a dataset from its columns and first row.

    The checks follow the order of TRL 1.16's `SFTTrainer._prepare_dataset`: pre-tokenized `input_ids` first, then
    ShareGPT `conversations`, then `prompt` (prompt-completion), then `messages`, then the text field.

    Args:
        column_names: The dataset's columns.
        first_row: Its first row (decides text vs conversational prompt/completion).
        dataset_text_field: Column holding plain text.

    Returns:
        One of the keys of `SFT_FORMATS`.

    Raises:
        DataError: No known format (the message lists the columns found, the accepted formats and how to map), or
            a `prompt` without a `completion`, or a prompt and completion of different kinds.
    """
    columns = list(column_names)
    if "input_ids" in columns:
        return TOKENIZED
    if "conversations" in columns and is_message_list(first_row.get("conversations")):
        return CONVERSATIONS
    if "prompt" in columns:
        if "completion" not in columns:
            raise DataError(
                f"The dataset has a 'prompt' column but no 'completion' column (columns: {columns}). SFT needs both; "
                "rename the answer column with --dataset_column_map <answer_column>=completion."
            )
        prompt_is_chat = is_message_list(first_row.get("prompt"))
        completion_is_chat = is_message_list(first_row.get("completion"))
        if prompt_is_chat != completion_is_chat:
            kinds = {True: "a list of messages", False: "text"}
            raise DataError(
                f"Row 0: 'prompt' is {kinds[prompt_is_chat]} but 'completion' is {kinds[completion_is_chat]}; both "
                "must be strings or both lists of {role, content} messages."
            )
        return PROMPT_COMPLETION_CONVERSATIONAL if prompt_is_chat else PROMPT_COMPLETION
    if "messages" in columns:
        return MESSAGES
    if dataset_text_field in columns:
        return TEXT

    hint = ""
    preset = suggest_preset(columns)
    if preset is not None:
        hint = f" These columns match the preset '{preset}': pass --dataset_column_map {preset}."
    raise DataError(
        f"No known SFT format in the dataset columns {columns}. Accepted: {_ACCEPTED}. Map other columns with "
        "--dataset_column_map <column>=<prompt|completion|text|messages> ... or a preset "
        f"({', '.join(sorted(COLUMN_PRESETS))}).{hint}"
    )


# ---------------------------------------------------------------------------------------------------- presets


def _text_pair(prompt: str, completion: str) -> dict[str, Any]:
    # The prompt ends with a newline so that BPE never merges the last prompt token with the first completion token.
    return {"prompt": prompt + "\n", "completion": completion}


def _chat_pair(prompt: str, completion: str) -> dict[str, Any]:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "completion": [{"role": "assistant", "content": completion}],
    }


def _with_context(instruction: str, context: str | None) -> str:
    return f"{instruction}\n\n{context}" if context else instruction


@dataclass(frozen=True)
class ColumnPreset:
    """A named mapping from a well-known schema to prompt/completion.

    Attributes:
        description: One line for docs and `--help`.
        required: Columns the dataset must have.
        optional: Columns the preset also reads when present (dropped with the required ones).
        build: Row -> (prompt text, completion text).
        chat: Build message lists (rendered by the chat template) rather than strings.
    """

    description: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    build: Callable[[dict[str, Any]], tuple[str, str]]
    chat: bool = False

    def apply(self, row: dict[str, Any]) -> dict[str, Any]:
        prompt, completion = self.build(row)
        return _chat_pair(prompt, completion) if self.chat else _text_pair(prompt, completion)


def _gsm8k(row: dict[str, Any]) -> tuple[str, str]:
    return row["question"], row["answer"]


def _alpaca(row: dict[str, Any]) -> tuple[str, str]:
    return _with_context(row["instruction"], row.get("input")), row["output"]


def _dolly(row: dict[str, Any]) -> tuple[str, str]:
    return _with_context(row["instruction"], row.get("context")), row["response"]


COLUMN_PRESETS: dict[str, ColumnPreset] = {
    "gsm8k": ColumnPreset("GSM8K: question -> prompt, answer -> completion", ("question", "answer"), (), _gsm8k),
    "alpaca": ColumnPreset(
        "Alpaca: instruction (+ input) -> prompt, output -> completion", ("instruction", "output"), ("input",), _alpaca
    ),
    "dolly": ColumnPreset(
        "Dolly: instruction (+ context) -> prompt, response -> completion", ("instruction", "response"), ("context",), _dolly
    ),
}
for _name, _preset in list(COLUMN_PRESETS.items()):
    COLUMN_PRESETS[f"{_name}_chat"] = ColumnPreset(
        _preset.description + " (as user/assistant messages)", _preset.required, _preset.optional, _preset.build,
        chat=True,
    )
"""Named schema mappings for --dataset_column_map. `<name>` gives text prompt/completion, `<name>_chat` messages."""


def suggest_preset(column_names: Sequence[str]) -> str | None:
    """The text preset whose required columns the dataset has, if exactly one matches."""
    matches = [
        name for name, preset in COLUMN_PRESETS.items()
        if not preset.chat and all(column in column_names for column in preset.required)
    ]
    return matches[0] if len(matches) == 1 else None


# ---------------------------------------------------------------------------------------------------- mapping


def parse_column_map(spec: dict[str, str] | Sequence[str] | str | None) -> dict[str, str] | str | None:
    """Turn a `--dataset_column_map` value into a rename dict or a preset name.

    Accepted: `None`; a dict {source: target}; a preset name (`"gsm8k"` or `["gsm8k"]`); pairs
    (`["question=prompt", "answer=completion"]` or `"question=prompt,answer=completion"`).

    Raises:
        DataError: Unknown preset, a malformed pair, an unknown target column, or a preset mixed with pairs.
    """
    if spec is None or isinstance(spec, dict):
        return spec
    items = [spec] if isinstance(spec, str) else list(spec)
    parts = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    if not parts:
        return None
    if len(parts) == 1 and "=" not in parts[0]:
        if parts[0] not in COLUMN_PRESETS:
            raise DataError(
                f"--dataset_column_map {parts[0]}: unknown preset; use one of {sorted(COLUMN_PRESETS)} or "
                "pairs like question=prompt answer=completion."
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


def _column_names(dataset: Any) -> list[str]:
    if isinstance(dataset, list):
        return list(dataset[0].keys()) if dataset else []
    return list(dataset.column_names)


def normalize_sft_columns(dataset: Any, column_map: dict[str, str] | Sequence[str] | str | None):
    """Rename columns or apply a preset so that the dataset is in one of the accepted SFT formats.

    Args:
        dataset: A `datasets.Dataset` or a list of row dicts.
        column_map: See `parse_column_map`. `None` returns the dataset unchanged (its format is checked later by
            `detect_sft_format`).

    Returns:
        The same kind of object with the mapped columns (a preset drops the columns it consumed).

    Raises:
        DataError: A source column that does not exist (lists the columns), a target that is not an SFT column,
            a rename onto an existing column, or a row missing a preset's column.
    """
    column_map = parse_column_map(column_map)
    if column_map is None:
        return dataset
    columns = _column_names(dataset)

    if isinstance(column_map, str):
        preset = COLUMN_PRESETS[column_map]
        missing = [column for column in preset.required if column not in columns]
        if missing:
            raise DataError(
                f"--dataset_column_map {column_map} needs the columns {list(preset.required)}, but {missing} are "
                f"missing (columns: {columns})."
            )

        def apply(row: dict[str, Any], index: int) -> dict[str, Any]:
            for column in preset.required:
                if not isinstance(row[column], str) or not row[column].strip():
                    raise DataError(
                        f"Row {index}: field '{column}' must be a non-empty string for preset '{column_map}' "
                        f"(got {row[column]!r}); fix or remove the row."
                    )
            return preset.apply(row)

        # The preset's own columns go; so do a stale prompt/completion, which the preset's output replaces.
        consumed = [column for column in columns
                    if column in (*preset.required, *preset.optional, "prompt", "completion")]
        if isinstance(dataset, list):
            return [
                {**{k: v for k, v in row.items() if k not in consumed}, **apply(row, index)}
                for index, row in enumerate(dataset)
            ]
        return dataset.map(apply, with_indices=True, remove_columns=consumed, desc=f"Applying preset {column_map}")

    for source, target in column_map.items():
        if source not in columns:
            raise DataError(f"--dataset_column_map {source}={target}: no column '{source}' (columns: {columns}).")
        if target not in TARGET_COLUMNS:
            raise DataError(
                f"--dataset_column_map {source}={target}: '{target}' is not an SFT column; use one of "
                f"{list(TARGET_COLUMNS)}."
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
