"""Rendering conversations with the tokenizer's chat template, and which tokens are the assistant's.

    ids = render_ids(tokenizer, messages, row_index, add_generation_prompt=True)["input_ids"]
"""

from __future__ import annotations

import re
from typing import Any

from data.errors import DataError

_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def chat_template_of(tokenizer: Any) -> str | None:
    """The template `apply_chat_template` uses by default (for named variants, the `default` one)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def has_generation_markers(chat_template: str | None) -> bool:
    """Whether a chat template marks assistant text with `{% generation %}` (any whitespace-trim variant)."""
    return chat_template is not None and _GENERATION_MARKER.search(chat_template) is not None


def render_ids(tokenizer: Any, messages: list[dict[str, Any]], index: int, **kwargs: Any) -> dict[str, list[int]]:
    """`apply_chat_template` tokenized: `input_ids` (and `assistant_masks` when asked), errors named by row."""
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    except Exception as error:  # jinja raises its own errors (e.g. "roles must alternate")
        raise DataError(f"Row {index}: the chat template failed on this conversation: {error}") from None
    return {key: list(out[key]) for key in ("input_ids", "assistant_masks") if key in out}


def end_of_turn_in_assistant_mask(tokenizer: Any) -> bool:
    """Whether the assistant mask ends on a special (added) token, i.e. the model learns to stop.

    Renders user / assistant / user with the assistant mask: the last masked non-whitespace token must be an
    added token such as `<|im_end|>`, not content.
    """
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "bye"}]
    try:
        out = tokenizer.apply_chat_template(probe, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    except Exception:  # a template that cannot render the probe is reported by the real rows instead
        return True
    added = set(tokenizer.get_added_vocab().values())
    masked = [token for token, bit in zip(out["input_ids"], out["assistant_masks"], strict=True) if bit]
    for token in reversed(masked):
        if tokenizer.decode([token]).strip():
            return token in added
    return False
