"""Rendering conversations with the tokenizer's chat template, and which tokens are the assistant's.

    ids = render_ids(tokenizer, messages, row_index, add_generation_prompt=True)["input_ids"]
    out = render_with_assistant_mask(tokenizer, messages, row_index)   # input_ids, assistant_masks

Which tokens an assistant turn owns (what `--assistant_only_loss` trains):

- A template that marks assistant text with `{% generation %}` says it itself (transformers'
  `return_assistant_tokens_mask`), as TRL 1.16 uses it.
- Any other template is read by rendering growing prefixes of the conversation, as strings, and tokenizing the
  whole conversation once. For assistant message i: the context is the rendering of messages[:i] with the
  generation prompt, which must be a prefix of the whole rendering (a template that rewrites earlier turns once
  later ones follow, e.g. by dropping past reasoning, is refused with a one-line error naming the turn, unless
  those turns carry no loss). The generation prompt it adds after messages[:i] is the role header
  (`<|im_start|>assistant\\n`, `<start_of_turn>model\\n`, ...), not trained, up to a reasoning block the template
  inserts there (`<think>`): SmolLM3's no-think mode writes `<think>\\n\\n</think>\\n` into the generation prompt,
  and that block is part of the turn. The turn then runs to the end of the rendering of messages[:i + 1],
  end-of-turn token included, less what the template writes only after a conversation's last message (Phi-3's
  closing EOS), which belongs to the turn when the turn is the last message. Think content the data holds
  (`<think>...</think>` in the assistant text) is trained; `/think` and `/no_think` switch the mode as the
  template says. A token is the assistant's when any of its characters is (transformers' rule for markers), so
  both ways give the same mask wherever the markers mark exactly that span (tests/test_chat_templates.py checks
  this on TRL's training templates).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from data.common import common_prefix_length
from data.errors import DataError

_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
REASONING_OPEN = "<think>"
"""Where a reasoning block begins; a generation prompt that inserts one ends its role header there."""


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


def render_text(tokenizer: Any, messages: list[dict[str, Any]], index: int, add_generation_prompt: bool = False,
                **kwargs: Any) -> str:
    """`apply_chat_template` as a string, errors named by row."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **kwargs)
    except Exception as error:
        raise DataError(f"Row {index}: the chat template failed on this conversation: {error}") from None


def render_with_assistant_mask(tokenizer: Any, messages: list[dict[str, Any]], index: int, first_message: int = 0,
                               **kwargs: Any) -> dict[str, list[int]]:
    """`input_ids` of the whole conversation and `assistant_masks` (1 on the tokens assistant turns own).

    Args:
        first_message: Assistant turns before this message carry no loss (a conversational prompt, with
            completion-only loss): a template may render them differently, and their mask is 0 without markers.
    """
    if has_generation_markers(chat_template_of(tokenizer)):
        return render_ids(tokenizer, messages, index, return_assistant_tokens_mask=True, **kwargs)
    return assistant_mask_by_prefixes(tokenizer, messages, index, first_message, **kwargs)


def assistant_mask_by_prefixes(tokenizer: Any, messages: list[dict[str, Any]], index: int, first_message: int = 0,
                               **kwargs: Any) -> dict[str, list[int]]:
    """`render_with_assistant_mask` read from growing prefixes of the conversation (markers, if any, ignored)."""
    text, spans = assistant_turn_spans(tokenizer, messages, index, first_message, **kwargs)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return {"input_ids": list(encoding["input_ids"]),
            "assistant_masks": _overlap_mask(encoding["offset_mapping"], spans)}


def assistant_turn_spans(tokenizer: Any, messages: list[dict[str, Any]], index: int, first_message: int = 0,
                         **kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered as text, and the [start, end) characters of each assistant turn from
    `first_message` on (the module docstring says which).

    Raises:
        DataError: The template renders an earlier part of the conversation differently once a turn follows
            (not prefix-preserving): one line naming the message, and what to do.
    """

    def render(prefix: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return render_text(tokenizer, prefix, index, add_generation_prompt, **kwargs)

    def token_start_at_or_before(text: str, limit: int) -> int:
        starts = [start for start, _ in tokenizer(text, add_special_tokens=False,
                                                  return_offsets_mapping=True)["offset_mapping"]]
        return max((start for start in starts if start <= limit), default=0)

    return _assistant_spans(render, messages, index, first_message, token_start_at_or_before)


def _assistant_spans(render: Callable[[list, bool], str], messages: list[dict[str, Any]], index: int,
                    first_message: int = 0, token_start: Callable[[str, int], int] | None = None,
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The whole rendering and, per assistant message from `first_message` on, the characters it owns.

    Args:
        render: (messages, add_generation_prompt) -> the template's text.
        messages: The conversation.
        index: Row number, for the error message.
        first_message: See `render_with_assistant_mask`.
        token_start: (text, i) -> the start of the token of `text` that holds character i. It places the end
            of a conversation's closing text (Phi-3: `<|end|>\n` + EOS) when the next header starts with the same
            characters (`<|assistant|>`): the split is a token boundary.

    Returns:
        (text, spans): `render(messages, False)` and [start, end) character spans, in order.

    Raises:
        DataError: The template renders an earlier part of the conversation differently once a turn follows.
    """
    text = render(messages, False)
    spans = []
    for position in range(first_message, len(messages)):
        if messages[position]["role"] != "assistant":
            continue
        context = _render_or_empty(render, messages[:position], False)
        prompt = _render_or_empty(render, messages[:position], True)
        upto = render(messages[: position + 1], False)
        header_start = common_prefix_length(context, prompt)
        if header_start < len(context) and token_start is not None:
            header_start = token_start(context, header_start)
        closing = context[header_start:]  # written only after a conversation's last message
        header = prompt[header_start:]
        if REASONING_OPEN in header:
            header = header[: header.index(REASONING_OPEN)]
        body_start = header_start + len(header)
        last = position == len(messages) - 1
        end = len(upto) if last or not closing or not upto.endswith(closing) else len(upto) - len(closing)
        kept_context, kept_turn = common_prefix_length(text, prompt[:body_start]), common_prefix_length(text, upto[:end])
        if kept_context < body_start or kept_turn < end:
            raise _not_prefix_preserving(messages, text, min(kept_context, kept_turn), index, position)
        spans.append((body_start, end))
    return text, spans


def _render_or_empty(render: Callable[[list, bool], str], messages: list, add_generation_prompt: bool) -> str:
    """Rendering of a conversation that may be empty (many templates index messages[0])."""
    try:
        return render(messages, add_generation_prompt)
    except DataError:
        if messages:
            raise
        return ""


def _not_prefix_preserving(messages: list, text: str, diverged_at: int, index: int, position: int) -> DataError:
    """The error for a template whose rendering of a shorter conversation is not the start of the whole one. It
    names the first message whose content ends after the first differing character of the whole rendering."""
    diverged, cursor = position, 0
    for number, message in enumerate(messages[: position + 1]):
        content = message.get("content")
        found = text.find(content, cursor) if isinstance(content, str) and content else -1
        if found >= 0:
            cursor = found + len(content)
            if cursor > diverged_at:
                diverged = number
                break
    role = messages[diverged].get("role")
    return DataError(
        f"Row {index}: the chat template renders messages[{diverged}] ({role}) differently once later turns follow "
        "(it is not prefix-preserving, e.g. it drops past reasoning), so the tokens of assistant turn "
        f"messages[{position}] cannot be found; pass --chat_template_path with a training template that renders "
        "every turn the same way (e.g. trl/chat_templates/*_training.jinja)."
    )


def _overlap_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token overlapping a character span (spans and tokens in order), as transformers masks markers."""
    mask = [0] * len(offsets)
    span = 0
    for token, (token_start, token_end) in enumerate(offsets):
        while span < len(spans) and token_start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        if token_end > spans[span][0]:
            mask[token] = 1
    return mask


def end_of_turn_in_assistant_mask(tokenizer: Any) -> bool:
    """Whether the assistant mask ends on a special (added) token, i.e. the model learns to stop.

    Renders user / assistant / user with the assistant mask: the last masked non-whitespace token must be an
    added token such as `<|im_end|>`, not content.
    """
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "bye"}]
    try:
        out = render_with_assistant_mask(tokenizer, probe, 0)
    except DataError:  # a template that cannot render the probe is reported by the real rows instead
        return True
    added = set(tokenizer.get_added_vocab().values())
    masked = [token for token, bit in zip(out["input_ids"], out["assistant_masks"], strict=True) if bit]
    for token in reversed(masked):
        if tokenizer.decode([token]).strip():
            return token in added
    return False
