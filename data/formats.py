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

Any other schema is mapped with `--dataset_column_map` (`data.column_map`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from data.column_map import COLUMN_PRESETS, suggest_preset
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
