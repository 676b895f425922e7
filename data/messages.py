"""Chat messages in rows: which roles exist, how a message list and a text field are checked, and the per-row
arguments (`tools`, `chat_template_kwargs`) passed to the chat template. Used by SFT and DPO alike.

Roles are TRL 1.16's (`trl.data_utils`: system, user, assistant, tool) plus `developer` (OpenAI-style system);
ShareGPT `{from, value}` keys are read as `{role, content}` (TRL's `maybe_convert_to_chatml`), and in a
`conversations` column the ShareGPT roles `human` / `gpt` are `user` / `assistant`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from data.errors import DataError

KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool")
"""Message roles accepted in conversational rows; anything else is most likely a mislabelled column."""

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}


def is_message_list(value: Any) -> bool:
    """A non-empty list whose first item is a message: a mapping with `role` (TRL's `is_conversational`) or a
    ShareGPT `from` (TRL's `is_conversational_from_value`)."""
    return (isinstance(value, list) and len(value) > 0 and isinstance(value[0], Mapping)
            and ("role" in value[0] or "from" in value[0]))


def check_text(value: Any, index: int, field_name: str) -> str:
    """`value` if it is a non-empty string, else a DataError naming the row and the field."""
    if value is None:
        raise DataError(f"Row {index}: field '{field_name}' is missing; every row needs it (or remove the row).")
    if not isinstance(value, str):
        raise DataError(f"Row {index}: field '{field_name}' must be a string, got {type(value).__name__} {value!r:.80}.")
    if not value.strip():
        raise DataError(f"Row {index}: field '{field_name}' is empty; remove the row or fill it in.")
    return value


def clean_messages(value: Any, index: int, field_name: str, sharegpt: bool = False) -> list[dict[str, Any]]:
    """Check one message list; return copies with {role, content} keys and no None values.

    Args:
        value: The field's value.
        index: Row number, for the error message.
        field_name: Column name, for the error message.
        sharegpt: Map the ShareGPT roles human/gpt to user/assistant (a `conversations` column).

    Raises:
        DataError: Not a non-empty list of messages, a message without a role or content, an unknown role, or
            content that is not a non-empty string (a pure tool call may have no content).
    """
    if not isinstance(value, list) or not value:
        raise DataError(
            f"Row {index}: field '{field_name}' must be a non-empty list of {{role, content}} messages, "
            f"got {value!r:.80}."
        )
    messages = []
    for position, message in enumerate(value):
        where = f"Row {index}: {field_name}[{position}]"
        if not isinstance(message, Mapping):
            raise DataError(f"{where} must be a {{role, content}} dict, got {type(message).__name__}.")
        # Arrow fills keys that other rows have with None: they are absent, not values.
        message = {key: item for key, item in message.items() if item is not None}
        if "role" not in message and "from" in message:
            message["role"] = message.pop("from")
        if "content" not in message and "value" in message:
            message["content"] = message.pop("value")
        message.pop("from", None)
        message.pop("value", None)
        role = message.get("role")
        if role is None:
            raise DataError(f"{where} has no 'role' (keys: {sorted(message)}); each message needs role and content.")
        if sharegpt and role in SHAREGPT_ROLES:
            role = message["role"] = SHAREGPT_ROLES[role]
        if role not in KNOWN_ROLES:
            extra = " (human/gpt are accepted in a 'conversations' column)" if role in SHAREGPT_ROLES else ""
            raise DataError(f"{where} has unknown role {role!r}; use one of {list(KNOWN_ROLES)}{extra}.")
        content = message.get("content")
        if role == "assistant" and message.get("tool_calls") and not content:
            messages.append(message)  # a pure tool call has no text
            continue
        if content is None:
            raise DataError(f"{where} ({role}) has no 'content'; each message needs role and content.")
        if not isinstance(content, str):
            raise DataError(
                f"{where} ({role}): 'content' must be a string, got {type(content).__name__}; text-only training "
                "does not take content parts (images, lists)."
            )
        if not content.strip():
            raise DataError(f"{where} ({role}) has empty content; remove the message or the row.")
        messages.append(message)
    return messages


def template_kwargs(row: Mapping[str, Any], index: int) -> dict[str, Any]:
    """The row's `tools` (a list, or JSON text) and `chat_template_kwargs` columns, passed to the chat template
    as TRL does."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise DataError(f"Row {index}: field 'tools' is not valid JSON ({error}); give a list of tool schemas.") \
                from None
    extra = row.get("chat_template_kwargs") or {}
    if not isinstance(extra, Mapping):
        raise DataError(f"Row {index}: field 'chat_template_kwargs' must be a dict, got {type(extra).__name__}.")
    return {"tools": tools, **extra}
