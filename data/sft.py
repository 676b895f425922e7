"""Turn SFT rows into {"input_ids", "labels"} examples, exactly as TRL 1.16's `SFTTrainer._prepare_dataset`.

Steps, in TRL's order (`trl/trainer/sft_trainer.py`, `_prepare_dataset`):

1. ShareGPT `conversations` ({from, value}) become `messages` ({role, content}).
2. Plain text and text completions get the tokenizer's `eos_token` appended unless they already end with it.
   Conversations get no EOS: the chat template decides how a turn ends.
3. Tokenize. Text: `tokenizer(text)` (with the tokenizer's special tokens, e.g. a BOS). Messages:
   `apply_chat_template`. Prompt-completion: the prompt alone and prompt + completion are tokenized; the completion
   starts where the two token lists first differ (TRL's `common_prefix_length`), which is after the prompt unless
   tokens merge across the boundary or the template renders the prompt alone differently.
4. Labels = input ids, with -100 where a mask says "no loss": the completion mask when `completion_only_loss`
   (default: on exactly when the data has `prompt` and `completion`), the assistant mask of the chat template's
   `{% generation %}` blocks when `assistant_only_loss`. Labels come from masks, never from the pad id, so
   `pad == eos` cannot mask a real EOS.
5. Without packing: cut to `max_length` (`keep_start` keeps the first tokens) and drop rows left with no label
   (e.g. a prompt that fills `max_length`). With packing: no per-row cut; `data.packing` packs (`bfd` cuts each
   document to `max_length`).
6. Shuffle only when asked (TRL's `shuffle_dataset` defaults to False): once before packing and once after, with
   the same seed, using `datasets`' permutation (`numpy.random.default_rng(seed).permutation(n)`).

Where TRL drops rows silently or fails with an obscure error, this module counts and reports the rows
(`PrepReport`) or raises `DataError` naming the row and the field.

Deliberate differences (each where TRL fails or silently trains on something else):

- ShareGPT roles `human` / `gpt` are mapped to `user` / `assistant` (TRL passes them to the chat template
  unchanged, which renders a `human` turn, and `assistant_only_loss` then finds no assistant).
- `assistant_only_loss` works on a ShareGPT `conversations` column (TRL checks the row before converting it and
  raises "not conversational"); a `conversations` column with role/content keys is read too (TRL: KeyError).
- `assistant_only_loss` with a template lacking `{% generation %}` is a DataError (TRL swaps in its own training
  template for ~30 known model families and raises for any other).
- Empty text / content, non-string content, unknown roles, `completion_only_loss=True` on data without a
  prompt, and a `labels` column without `input_ids` are UserErrors (TRL trains on a lone EOS, lets the template
  decide, or ignores the flag).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data.common import common_prefix_length
from data.errors import DataError
from data.formats import (
    CONVERSATIONAL_FORMATS,
    CONVERSATIONS,
    PROMPT_COMPLETION,
    PROMPT_COMPLETION_CONVERSATIONAL,
    TEXT,
    TOKENIZED,
    detect_sft_format,
)
from data.packing import PACKING_STRATEGIES, pack_examples

IGNORE_INDEX = -100
TRUNCATION_MODES = ("keep_start", "keep_end")
KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
_TOKENIZE_BATCH_ROWS = 1000


@dataclass
class PrepReport:
    """What preparation did to the dataset, so that nothing is dropped or cut silently.

    Attributes:
        format: Detected format (a key of `data.formats.SFT_FORMATS`).
        num_rows: Rows read.
        num_examples: Examples produced (packed rows when packing).
        completion_only_loss: The resolved setting (None -> on for prompt/completion data).
        assistant_only_loss: As requested.
        packing: Whether rows were packed; `packing_strategy` which way.
        padding_free: Whether the collator must run padding-free (TRL: `bfd` / `bfd_split` packing).
        num_eos_appended: Text rows / completions that got the EOS token appended.
        num_truncated: Rows longer than `max_length` (cut; with `bfd_split` packing: split into pieces; not
            counted for `wrapped` packing, which cuts every row), and `num_truncated_tokens` the tokens removed.
        num_dropped: Rows removed, with the reason in `dropped_reasons` and the first indices in `dropped_rows`.
        num_no_target_kept: Rows without any target token that are kept (TRL drops them only when truncating
            without packing); they add no loss.
        num_prompt_not_prefix: Prompt-completion rows whose tokenized prompt is not a prefix of the tokenized
            prompt + completion (tokens merged across the boundary): the completion starts where they diverge.
        num_tokens / num_target_tokens: Tokens in the output and tokens that carry a label.
        warnings: Anything else a user should know (one line each).
    """

    format: str
    num_rows: int
    num_examples: int = 0
    completion_only_loss: bool = False
    assistant_only_loss: bool = False
    packing: bool = False
    packing_strategy: str | None = None
    padding_free: bool = False
    max_length: int | None = None
    num_eos_appended: int = 0
    num_truncated: int = 0
    num_truncated_tokens: int = 0
    num_dropped: int = 0
    dropped_reasons: dict[str, int] = field(default_factory=dict)
    dropped_rows: list[int] = field(default_factory=list)
    num_no_target_kept: int = 0
    num_prompt_not_prefix: int = 0
    num_tokens: int = 0
    num_target_tokens: int = 0
    warnings: list[str] = field(default_factory=list)

    def drop(self, row: int, reason: str) -> None:
        self.num_dropped += 1
        self.dropped_reasons[reason] = self.dropped_reasons.get(reason, 0) + 1
        if len(self.dropped_rows) < 20:
            self.dropped_rows.append(row)

    def summary(self) -> str:
        """One line for the run log."""

        def rows(count: int) -> str:
            return f"{count} row" + ("" if count == 1 else "s")

        parts = [f"{rows(self.num_rows)} ({self.format}) -> {self.num_examples} examples"]
        if self.packing:
            parts.append(f"packed ({self.packing_strategy}, {self.max_length} tokens per row)")
        parts.append(f"{self.num_target_tokens}/{self.num_tokens} tokens carry loss")
        if self.completion_only_loss:
            parts.append("completion-only loss")
        if self.assistant_only_loss:
            parts.append("assistant-only loss")
        if self.num_eos_appended:
            parts.append(f"EOS appended to {rows(self.num_eos_appended)}")
        if self.num_truncated:
            parts.append(f"{rows(self.num_truncated)} over max_length={self.max_length} "
                         f"({self.num_truncated_tokens} tokens cut)")
        if self.num_dropped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in self.dropped_reasons.items())
            parts.append(f"{rows(self.num_dropped)} dropped ({reasons}; first: {self.dropped_rows[:5]})")
        if self.num_no_target_kept:
            parts.append(f"{rows(self.num_no_target_kept)} without any target token (kept, as TRL does; no loss)")
        if self.num_prompt_not_prefix:
            parts.append(f"{rows(self.num_prompt_not_prefix)} where prompt tokens merge with the completion "
                         "(the completion starts where the tokens diverge)")
        return "; ".join(parts + [f"warning: {warning}" for warning in self.warnings])


# ---------------------------------------------------------------------------------------------------- checks


def _chat_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # templates shipped as named variants: the default one is used
        template = template.get("default")
    return template


def has_generation_markers(chat_template: str | None) -> bool:
    """Whether a chat template marks assistant text with `{% generation %}` (any whitespace-trim variant)."""
    return chat_template is not None and _GENERATION_MARKER.search(chat_template) is not None


def _end_of_turn_in_assistant_mask(tokenizer) -> bool:
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


def _check_text(row: dict[str, Any], index: int, field_name: str) -> str:
    if field_name not in row or row[field_name] is None:
        raise DataError(f"Row {index}: field '{field_name}' is missing; every row needs it (or remove the row).")
    value = row[field_name]
    if not isinstance(value, str):
        raise DataError(f"Row {index}: field '{field_name}' must be a string, got {type(value).__name__} {value!r}.")
    if not value.strip():
        raise DataError(f"Row {index}: field '{field_name}' is empty; remove the row or fill it in.")
    return value


def _clean_messages(value: Any, index: int, field_name: str, sharegpt: bool) -> list[dict[str, Any]]:
    """Validate one message list; return copies with {role, content} keys and no None values."""
    if not isinstance(value, list) or not value:
        raise DataError(
            f"Row {index}: field '{field_name}' must be a non-empty list of {{role, content}} messages, "
            f"got {value!r:.80}."
        )
    messages = []
    for position, message in enumerate(value):
        where = f"Row {index}: {field_name}[{position}]"
        if not isinstance(message, dict):
            raise DataError(f"{where} must be a {{role, content}} dict, got {type(message).__name__}.")
        message = {key: item for key, item in message.items() if item is not None}
        if "role" not in message and "from" in message:  # ShareGPT keys, as TRL's maybe_convert_to_chatml
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
                f"{where} ({role}): 'content' must be a string, got {type(content).__name__}; text-only SFT does "
                "not take content parts (images, lists)."
            )
        if not content.strip():
            raise DataError(f"{where} ({role}) has empty content; remove the message or the row.")
        messages.append(message)
    return messages


def _template_kwargs(row: dict[str, Any], index: int) -> dict[str, Any]:
    """`tools` and `chat_template_kwargs` columns, passed to the chat template as TRL does."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise DataError(f"Row {index}: field 'tools' is not valid JSON ({error}).") from None
    extra = row.get("chat_template_kwargs") or {}
    if not isinstance(extra, dict):
        raise DataError(f"Row {index}: field 'chat_template_kwargs' must be a dict, got {type(extra).__name__}.")
    return {"chat_template": None, "tools": tools, **extra}


def _apply_template(tokenizer, messages: list[dict[str, Any]], index: int, **kwargs: Any) -> dict[str, list[int]]:
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    except Exception as error:  # jinja raises its own errors (e.g. "roles must alternate")
        raise DataError(f"Row {index}: the chat template failed on this conversation: {error}") from None
    return {key: list(out[key]) for key in ("input_ids", "assistant_masks") if key in out}


def _labels(input_ids: list[int], masks: list[list[int]]) -> list[int]:
    """Token id where every mask is 1, else -100."""
    return [token if all(bits) else IGNORE_INDEX for token, *bits in zip(input_ids, *masks, strict=True)]



# ---------------------------------------------------------------------------------------------------- tokenize


def _tokenize_rows(
    rows: list[dict[str, Any]],
    fmt: str,
    tokenizer,
    report: PrepReport,
    *,
    completion_only_loss: bool,
    assistant_only_loss: bool,
    dataset_text_field: str,
) -> list[dict[str, list[int]]]:
    """Rows -> {"input_ids", "labels"} (before truncation), in row order."""
    eos = tokenizer.eos_token
    examples: list[dict[str, list[int]]] = []

    if fmt == TOKENIZED:
        has_labels = "labels" in rows[0]
        for index, row in enumerate(rows):
            input_ids = row.get("input_ids")
            if not isinstance(input_ids, list) or not all(isinstance(t, int) for t in input_ids):
                raise DataError(f"Row {index}: field 'input_ids' must be a list of token ids, got {input_ids!r:.80}.")
            if has_labels:  # given labels are used as they are (TRL)
                labels = row.get("labels")
                if not isinstance(labels, list) or len(labels) != len(input_ids):
                    raise DataError(
                        f"Row {index}: field 'labels' must be a list as long as 'input_ids' ({len(input_ids)}), "
                        f"got {labels!r:.80}."
                    )
                examples.append({"input_ids": list(input_ids), "labels": list(labels)})
                continue
            masks = []
            if completion_only_loss and "completion_mask" in rows[0]:
                masks.append(row["completion_mask"])
            if "assistant_masks" in rows[0]:
                masks.append(row["assistant_masks"])
            for mask in masks:
                if not isinstance(mask, list) or len(mask) != len(input_ids):
                    raise DataError(f"Row {index}: mask columns must be lists as long as 'input_ids'.")
            examples.append({"input_ids": list(input_ids), "labels": _labels(input_ids, masks)})
        return examples

    if fmt == TEXT or fmt == PROMPT_COMPLETION:
        for start in range(0, len(rows), _TOKENIZE_BATCH_ROWS):
            block = rows[start : start + _TOKENIZE_BATCH_ROWS]
            if fmt == TEXT:
                texts = []
                for offset, row in enumerate(block):
                    text = _check_text(row, start + offset, dataset_text_field)
                    if not text.endswith(eos):
                        text += eos
                        report.num_eos_appended += 1
                    texts.append(text)
                for input_ids in tokenizer(texts)["input_ids"]:
                    examples.append({"input_ids": input_ids, "labels": list(input_ids)})
                continue
            prompts, completions = [], []
            for offset, row in enumerate(block):
                prompt = _check_text(row, start + offset, "prompt")
                completion = _check_text(row, start + offset, "completion")
                if not completion.endswith(eos):
                    completion += eos
                    report.num_eos_appended += 1
                prompts.append(prompt)
                completions.append(completion)
            prompt_ids_list = tokenizer(prompts)["input_ids"]
            # Tokenized as one string, as TRL does, so the ids are those the model sees at inference.
            full_ids_list = tokenizer([p + c for p, c in zip(prompts, completions, strict=True)])["input_ids"]
            for prompt_ids, input_ids in zip(prompt_ids_list, full_ids_list, strict=True):
                examples.append(_prompt_completion_example(prompt_ids, input_ids, [], completion_only_loss, report))
        return examples

    # Conversational formats.
    for index, row in enumerate(rows):
        kwargs = _template_kwargs(row, index)
        if fmt == PROMPT_COMPLETION_CONVERSATIONAL:
            prompt = _clean_messages(row.get("prompt"), index, "prompt", sharegpt=False)
            completion = _clean_messages(row.get("completion"), index, "completion", sharegpt=False)
            prompt_ids = _apply_template(tokenizer, prompt, index, add_generation_prompt=True, **kwargs)["input_ids"]
            full = _apply_template(
                tokenizer, prompt + completion, index, return_assistant_tokens_mask=assistant_only_loss, **kwargs
            )
            masks = [full["assistant_masks"]] if "assistant_masks" in full else []
            _require_assistant_tokens(masks, index)
            examples.append(
                _prompt_completion_example(prompt_ids, full["input_ids"], masks, completion_only_loss, report)
            )
        else:
            column = "conversations" if fmt == CONVERSATIONS else "messages"
            messages = _clean_messages(row.get(column), index, column, sharegpt=fmt == CONVERSATIONS)
            full = _apply_template(
                tokenizer, messages, index, return_assistant_tokens_mask=assistant_only_loss, **kwargs
            )
            masks = [full["assistant_masks"]] if "assistant_masks" in full else []
            _require_assistant_tokens(masks, index)
            examples.append({"input_ids": full["input_ids"], "labels": _labels(full["input_ids"], masks)})
    return examples


def _require_assistant_tokens(masks: list[list[int]], index: int) -> None:
    if masks and 1 not in masks[0]:
        raise DataError(
            f"Row {index}: assistant_only_loss is on but the chat template marks no assistant token in this row "
            "(no assistant message, or no {% generation %} block around it); fix the row or the template."
        )


def _prompt_completion_example(
    prompt_ids: list[int], input_ids: list[int], masks: list[list[int]], completion_only_loss: bool,
    report: PrepReport,
) -> dict[str, list[int]]:
    prompt_length = common_prefix_length(prompt_ids, input_ids)
    if prompt_length < len(prompt_ids):
        report.num_prompt_not_prefix += 1
    if completion_only_loss:
        masks = [[0] * prompt_length + [1] * (len(input_ids) - prompt_length), *masks]
    return {"input_ids": list(input_ids), "labels": _labels(input_ids, masks)}


# ---------------------------------------------------------------------------------------------------- main


def _check_setup(
    fmt: str, first_row: dict[str, Any], tokenizer, completion_only_loss: bool | None, assistant_only_loss: bool,
    report: PrepReport,
) -> bool:
    """Check the settings against the data and tokenizer; return the resolved `completion_only_loss`."""
    # TRL: None means "on exactly when the first row has prompt and completion".
    if completion_only_loss is None:
        completion_only_loss = "prompt" in first_row and "completion" in first_row
    elif completion_only_loss and fmt not in (PROMPT_COMPLETION, PROMPT_COMPLETION_CONVERSATIONAL) and not (
        fmt == TOKENIZED and "completion_mask" in first_row
    ):
        raise DataError(
            f"--completion_only_loss needs prompt/completion data, but the dataset is in the '{fmt}' format; map "
            "your columns to prompt and completion (--dataset_column_map) or drop the flag."
        )
    report.completion_only_loss = bool(completion_only_loss)

    if fmt != TOKENIZED and "labels" in first_row:
        raise DataError(
            "The dataset has a 'labels' column but no 'input_ids'; labels only make sense for pre-tokenized data. "
            "Remove the column or provide input_ids too."
        )
    if fmt in (TEXT, PROMPT_COMPLETION) and not tokenizer.eos_token:
        raise DataError(
            "The tokenizer has no eos_token, which SFT appends to every text row and completion; set one in the "
            "tokenizer (eos_token in tokenizer_config.json)."
        )
    if assistant_only_loss and fmt not in CONVERSATIONAL_FORMATS:
        raise DataError(
            f"--assistant_only_loss needs conversational data (messages / conversations / message prompt-completion), "
            f"but the dataset is in the '{fmt}' format."
        )
    if fmt in CONVERSATIONAL_FORMATS:
        template = _chat_template(tokenizer)
        if not template:
            raise DataError(
                f"The dataset is conversational ('{fmt}') but the tokenizer has no chat template; use a tokenizer "
                "with one or set one with --chat_template_path."
            )
        if assistant_only_loss:
            if not has_generation_markers(template):
                raise DataError(
                    "--assistant_only_loss needs a chat template that wraps assistant text in "
                    "{% generation %}...{% endgeneration %}; this tokenizer's template has no such block. Add it "
                    "(--chat_template_path) or drop --assistant_only_loss."
                )
            if not _end_of_turn_in_assistant_mask(tokenizer):
                report.warnings.append(
                    "the chat template's {% generation %} block does not include the end-of-turn token, so the "
                    "model is not trained to stop"
                )

    return bool(completion_only_loss)


def _has_target(example: dict[str, list[int]]) -> bool:
    return any(label != IGNORE_INDEX for label in example["labels"])


def _truncate_and_drop(
    examples: list[dict[str, list[int]]], max_length: int, truncation_mode: str, report: PrepReport
) -> list[dict[str, list[int]]]:
    """Cut to `max_length` and drop rows left without a target token, as TRL does (but counted)."""
    kept = []
    for index, example in enumerate(examples):
        had_target = _has_target(example)
        length = len(example["input_ids"])
        if length > max_length:
            report.num_truncated += 1
            report.num_truncated_tokens += length - max_length
            cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
            example = {"input_ids": example["input_ids"][cut], "labels": example["labels"][cut]}
        if not _has_target(example):
            report.drop(index, "no target token left after truncation to max_length" if had_target
                        else "no target token")
            continue
        kept.append(example)
    return kept


def _pack(
    examples: list[dict[str, list[int]]], max_length: int, strategy: str, shuffle_seed: int | None,
    report: PrepReport,
) -> list[dict[str, list[int]]]:
    """Pack as TRL does: no per-row truncation or dropping; shuffle before and after when a seed is given."""
    for example in examples:
        length = len(example["input_ids"])
        # wrapped cuts every row anyway; bfd keeps a document's first max_length tokens; bfd_split splits it.
        if length > max_length and strategy != "wrapped":
            report.num_truncated += 1
            if strategy == "bfd":
                report.num_truncated_tokens += length - max_length
        report.num_no_target_kept += not _has_target(example)
    if shuffle_seed is not None:
        examples = _shuffle(examples, shuffle_seed)
    examples = pack_examples(examples, max_length, strategy)
    if shuffle_seed is not None:
        examples = _shuffle(examples, shuffle_seed)
    return examples


def _to_rows(dataset: Any) -> list[dict[str, Any]]:
    if isinstance(dataset, list):
        return dataset
    if hasattr(dataset, "to_list"):  # datasets.Dataset
        return dataset.to_list()
    raise TypeError(f"Expected a datasets.Dataset or a list of dicts, got {type(dataset).__name__}.")


def _shuffle(items: list, seed: int) -> list:
    """Reorder like `datasets.Dataset.shuffle(seed=seed)` (NumPy's default PCG64 generator)."""
    permutation = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in permutation]


def prepare_sft_dataset(
    dataset: Any,
    tokenizer,
    *,
    max_length: int | None = 1024,
    completion_only_loss: bool | None = None,
    assistant_only_loss: bool = False,
    dataset_text_field: str = "text",
    packing: bool = False,
    packing_strategy: str = "bfd",
    truncation_mode: str = "keep_start",
    shuffle_seed: int | None = None,
) -> tuple[list[dict[str, list[int]]], PrepReport]:
    """Tokenize and label an SFT dataset the way TRL 1.16's SFTTrainer does (see the module docstring).

    Args:
        dataset: A `datasets.Dataset` or a list of row dicts, in one of the formats of `data.formats`.
        tokenizer: A Hugging Face tokenizer (`eos_token` needed for text; a chat template for conversations).
        max_length: Cut rows to this many tokens (or the packed row length); None = no limit (not with packing).
        completion_only_loss: Loss on the completion only; None = on when the data has prompt and completion.
        assistant_only_loss: Loss on assistant tokens only (chat template with `{% generation %}`).
        dataset_text_field: Column of plain text.
        packing: Pack examples into rows of `max_length` tokens.
        packing_strategy: "bfd" (default), "bfd_split" or "wrapped" (see `data.packing`).
        truncation_mode: "keep_start" (default) or "keep_end".
        shuffle_seed: Shuffle with this seed like TRL's `shuffle_dataset=True, seed=shuffle_seed`; None keeps the
            order (TRL's default, `shuffle_dataset=False`).

    Returns:
        (examples, report): examples {"input_ids", "labels"} (+ "position_ids" when packed), and what was done.

    Raises:
        DataError: Bad settings or a bad row (the message names the row and the field).
    """
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise DataError(f"--max_length must be a positive integer or None, got {max_length!r}.")
    if truncation_mode not in TRUNCATION_MODES:
        raise DataError(f"--truncation_mode {truncation_mode}: use one of {list(TRUNCATION_MODES)}.")
    if packing and packing_strategy not in PACKING_STRATEGIES:
        raise DataError(f"--packing_strategy {packing_strategy}: use one of {list(PACKING_STRATEGIES)}.")
    if packing and max_length is None:
        raise DataError("--packing needs --max_length (the length of each packed row).")

    rows = _to_rows(dataset)
    if not rows:
        raise DataError("The dataset has no rows.")
    first_row = rows[0]
    if "image" in first_row or "images" in first_row:
        raise DataError("The dataset has image columns; only text SFT is supported (drop 'image'/'images').")
    fmt = detect_sft_format(list(first_row.keys()), first_row, dataset_text_field)
    report = PrepReport(format=fmt, num_rows=len(rows), max_length=max_length, packing=packing,
                        packing_strategy=packing_strategy if packing else None,
                        padding_free=packing and packing_strategy in ("bfd", "bfd_split"),
                        assistant_only_loss=assistant_only_loss)

    completion_only_loss = _check_setup(fmt, first_row, tokenizer, completion_only_loss, assistant_only_loss, report)
    examples = _tokenize_rows(
        rows, fmt, tokenizer, report,
        completion_only_loss=bool(completion_only_loss), assistant_only_loss=assistant_only_loss,
        dataset_text_field=dataset_text_field,
    )

    bos = getattr(tokenizer, "bos_token_id", None)
    double_bos = sum(bos is not None and example["input_ids"][:2] == [bos, bos] for example in examples)
    if double_bos:
        report.warnings.append(
            f"{double_bos} rows start with two BOS tokens (the text already starts with the BOS token and the "
            "tokenizer adds one); remove it from the data"
        )

    if packing:
        examples = _pack(examples, max_length, packing_strategy, shuffle_seed, report)
    else:
        if max_length is not None:
            examples = _truncate_and_drop(examples, max_length, truncation_mode, report)
        report.num_no_target_kept = sum(not _has_target(example) for example in examples)
        if shuffle_seed is not None:
            examples = _shuffle(examples, shuffle_seed)

    if not examples:
        raise DataError(
            f"No example is left after preparation ({report.summary()}); check max_length and the loss masks."
        )
    report.num_examples = len(examples)
    report.num_tokens = sum(len(example["input_ids"]) for example in examples)
    report.num_target_tokens = sum(
        sum(label != IGNORE_INDEX for label in example["labels"]) for example in examples
    )
    return examples, report
