"""Preference rows -> token ids for DPO, with the same ids as TRL 1.16 `DPOTrainer._prepare_dataset`.

    from data.dpo import prepare_dpo_dataset
    examples, report = prepare_dpo_dataset(dataset, tokenizer, max_length=1024)
    # examples[i] = {"prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...]}
    if report.dropped_prompt_too_long:
        print(report.summary())

Accepted schemas (one per dataset, checked on every row):
- explicit text: `prompt`, `chosen`, `rejected` strings.
- implicit text (Anthropic/hh-rlhf): `chosen`, `rejected` strings that both contain the dialogue; the prompt
  is their common prefix.
- explicit conversational: `prompt`, `chosen`, `rejected` lists of `{"role", "content"}` messages, chosen and
  rejected holding the completion only (they start with an assistant message).
- implicit conversational (trl-lib/ultrafeedback_binarized): `chosen`, `rejected` whole conversations; the
  prompt is the common leading messages.
- ultrafeedback-binarized (HuggingFaceH4): a `prompt` string plus whole conversations in `chosen`/`rejected`;
  the string prompt column is ignored and the prompt is extracted from the messages (TRL's
  `maybe_extract_prompt` rule; TRL 1.16 `DPOTrainer` itself crashes on this schema).
Optional columns used as TRL uses them: `tools` (list or JSON string) and `chat_template_kwargs` (dict),
both passed to the chat template for conversational rows.

What TRL does, and we do the same (the ids are identical for every row TRL accepts):
- Implicit prompt (`trl.data_utils.extract_prompt`): split at the first differing character / message.
  Text only: if the character before the split is a space, the split moves back one so the space starts
  the completions ("...Assistant:" | " Sure"). If one side is a prefix of the other, the split is one element
  before the end of the shorter side (a quirk of TRL's loop, kept for parity).
- Text: `eos_token` is appended to chosen and rejected unless they already end with it. Conversations: the
  chat template decides, nothing is appended.
- Tokenization: the prompt alone (text: with the tokenizer's special tokens, e.g. BOS; conversations:
  `add_generation_prompt=True`), and prompt+chosen and prompt+rejected as whole strings / conversations.
  The completion starts where the tokenized prompt and the tokenized prompt+completion first differ (the
  minimum over chosen and rejected), so a token that merges across the boundary (prompt "...S" + "ure" ->
  "Sure") belongs to the completion and the prompt ids are shortened to the shared part. Rows where this
  happens are listed in `PrepReport.prompt_boundary_rows` (TRL only warns once).
- Truncation is NOT done here: `data.collate_dpo.collate_dpo` cuts each prompt+completion sequence to
  `max_length`. Here, with `truncation_mode="keep_start"`, rows whose prompt alone has >= `max_length` tokens
  are removed because they would keep no completion token. TRL drops them silently; we list them in
  `PrepReport.dropped_prompt_too_long` (the caller decides to warn or fail) and raise if every row goes.

Where we are stricter than TRL (each is a `DataError` naming the row, the field and the fix):
- missing `chosen`/`rejected` columns, rows that mix text and message formats, a `prompt` message list with
  text completions;
- empty or whitespace-only text, non-string message content (empty content is allowed only on messages
  that carry `tool_calls`), empty message lists, roles outside `KNOWN_ROLES`;
- a completion (chosen/rejected after the prompt) that does not start with an assistant message: a prompt
  repeated inside chosen, or conversations that already differ at a user turn;
- an implicit prompt that is empty (chosen and rejected share no leading text / message);
- chosen identical to rejected (raw, or after tokenization): no preference signal. With
  `skip_identical_pairs=True` such rows are skipped and listed in `PrepReport.skipped_identical` instead;
- a completion that renders to no tokens; a tokenizer with no chat template (conversations) or no EOS
  token (text); every row dropped by the prompt-length rule.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from data.common import common_prefix_length
from data.errors import DataError

KNOWN_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
"""Message roles accepted in conversational rows; anything else is most likely a mislabelled column."""

ACCEPTED_SCHEMAS = (
    "prompt/chosen/rejected as text; chosen/rejected as text with the prompt inside (hh-rlhf); "
    "prompt/chosen/rejected as lists of {'role','content'} messages; chosen/rejected as whole conversations"
)

TRUNCATION_MODES = ("keep_start", "keep_end")

_TEXT_TOKENIZE_CHUNK = 512  # rows per batched tokenizer call: the fast tokenizer encodes a batch in Rust

PromptSource = Literal["column", "extracted", "extracted_ignoring_prompt_column"]


@dataclass
class PrepReport:
    """What `prepare_dpo_dataset` did to the rows, so the caller can warn or fail instead of losing data silently.

    Row numbers are 0-based indices into the input dataset.
    """

    num_rows: int
    """Rows in the input dataset."""
    conversational: bool
    """True for message lists (chat template), False for plain text."""
    prompt_source: PromptSource
    """Where the prompt came from: the `prompt` column, extracted as the common prefix of chosen/rejected,
    or extracted while ignoring a text `prompt` column that sat next to whole conversations."""
    max_length: int | None
    truncation_mode: str
    kept_rows: list[int] = field(default_factory=list)
    """Input row of each prepared example, in output order."""
    dropped_prompt_too_long: list[int] = field(default_factory=list)
    """Rows removed because the prompt alone has >= max_length tokens (keep_start only). TRL drops these silently."""
    skipped_identical: list[int] = field(default_factory=list)
    """Rows skipped because chosen and rejected are identical (only with `skip_identical_pairs=True`)."""
    truncated_rows: list[int] = field(default_factory=list)
    """Kept rows whose prompt+chosen or prompt+rejected exceeds max_length: the collator will cut them."""
    prompt_boundary_rows: list[int] = field(default_factory=list)
    """Kept or dropped rows whose tokenized prompt is not a prefix of the tokenized prompt+completion (tokens
    merged across the boundary, or the template renders the prompt differently); the prompt ids were shortened
    to the shared part."""

    @property
    def num_kept(self) -> int:
        return len(self.kept_rows)

    def summary(self) -> str:
        """One line for the log: counts, and the first few row numbers of each problem."""

        def rows(indices: list[int]) -> str:
            shown = ", ".join(str(i) for i in indices[:5])
            return shown + (", ..." if len(indices) > 5 else "")

        parts = [f"{self.num_kept}/{self.num_rows} preference rows kept"]
        if self.dropped_prompt_too_long:
            parts.append(
                f"{len(self.dropped_prompt_too_long)} dropped: prompt >= max_length={self.max_length} tokens "
                f"(rows {rows(self.dropped_prompt_too_long)}; raise --max_length to keep them)"
            )
        if self.skipped_identical:
            parts.append(
                f"{len(self.skipped_identical)} skipped: chosen == rejected (rows {rows(self.skipped_identical)})"
            )
        if self.truncated_rows:
            parts.append(f"{len(self.truncated_rows)} will be truncated to {self.max_length} tokens")
        if self.prompt_boundary_rows:
            parts.append(
                f"{len(self.prompt_boundary_rows)} with the prompt end merged into the completion "
                f"(rows {rows(self.prompt_boundary_rows)})"
            )
        return "; ".join(parts)


def prepare_dpo_dataset(
    dataset: Iterable[Mapping[str, Any]],
    tokenizer: Any,
    *,
    max_length: int | None = 1024,
    truncation_mode: str = "keep_start",
    skip_identical_pairs: bool = False,
) -> tuple[list[dict[str, list[int]]], PrepReport]:
    """Tokenize preference rows into `{"prompt_ids", "chosen_ids", "rejected_ids"}` exactly as TRL 1.16 does.

    Args:
        dataset: a `datasets.Dataset` (or any iterable of row mappings) in one of the accepted schemas
            (see the module docstring).
        tokenizer: a Hugging Face tokenizer (`PreTrainedTokenizerBase`).
        max_length: the `--max_length` the collator will truncate to; used here only to drop rows whose prompt
            alone fills it (keep_start). `None` keeps every row.
        truncation_mode: "keep_start" (default) or "keep_end" (keeps the end of each sequence, drops nothing).
        skip_identical_pairs: skip rows where chosen == rejected (listed in the report) instead of raising.

    Returns:
        The prepared examples (untruncated, in input order minus removed rows) and a `PrepReport`.

    Raises:
        DataError: for any bad row or setting, naming the row index, the field and the fix.
    """
    if truncation_mode not in TRUNCATION_MODES:
        raise DataError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
    ):
        raise DataError(f"max_length must be a positive integer or None, got {max_length!r}")

    rows = list(dataset)
    if not rows:
        raise DataError("the preference dataset has no rows")
    conversational, prompt_source = _detect_schema(rows[0])
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the preference data is conversational (lists of messages) but the tokenizer has no chat template; "
            "use a tokenizer with one (e.g. an instruct model's) or set tokenizer.chat_template"
        )
    if not conversational and not getattr(tokenizer, "eos_token", None):
        raise DataError(
            "the tokenizer has no eos_token, which plain-text preference data needs to end chosen/rejected; "
            "set tokenizer.eos_token"
        )

    report = PrepReport(
        num_rows=len(rows),
        conversational=conversational,
        prompt_source=prompt_source,
        max_length=max_length,
        truncation_mode=truncation_mode,
    )

    # 1) Validate every row and split it into (prompt, chosen, rejected) before any tokenization: fail fast.
    triples: list[tuple[int, Any, Any, Any]] = []  # (row index, prompt, chosen, rejected)
    for index, row in enumerate(rows):
        triple = _split_row(index, row, conversational, prompt_source, tokenizer)
        if triple is None:  # chosen == rejected
            if not skip_identical_pairs:
                raise _identical_error(index)
            report.skipped_identical.append(index)
            continue
        triples.append((index, *triple))

    # 2) Tokenize prompt, prompt+chosen and prompt+rejected.
    if conversational:
        tokenized = [_tokenize_conversation(tokenizer, i, rows[i], p, c, r) for i, p, c, r in triples]
    else:
        tokenized = _tokenize_texts(tokenizer, [(p, c, r) for _, p, c, r in triples])

    # 3) Split at the common prefix and apply the prompt-length rule.
    examples: list[dict[str, list[int]]] = []
    for (index, *_), (prompt_ids, prompt_chosen_ids, prompt_rejected_ids) in zip(
        triples, tokenized, strict=True
    ):
        # The completion starts where the tokenized prompt and prompt+completion diverge, which is earlier than
        # len(prompt_ids) when a token merges across the boundary or the template renders the prompt differently.
        prompt_len = min(
            common_prefix_length(prompt_ids, prompt_chosen_ids),
            common_prefix_length(prompt_ids, prompt_rejected_ids),
        )
        if prompt_len < len(prompt_ids):
            report.prompt_boundary_rows.append(index)
        example = {
            "prompt_ids": list(prompt_ids[:prompt_len]),
            "chosen_ids": list(prompt_chosen_ids[prompt_len:]),
            "rejected_ids": list(prompt_rejected_ids[prompt_len:]),
        }
        for name in ("chosen", "rejected"):
            if not example[f"{name}_ids"]:
                raise DataError(
                    f"row {index}, field '{name}': the completion renders to no tokens after the prompt; check the "
                    "chat template renders assistant messages"
                )
        if example["chosen_ids"] == example["rejected_ids"]:
            if not skip_identical_pairs:
                raise _identical_error(index, after_tokenization=True)
            report.skipped_identical.append(index)
            continue
        # TRL's rule: with keep_start a prompt of >= max_length tokens leaves no completion token after truncation.
        if max_length is not None and truncation_mode == "keep_start" and prompt_len >= max_length:
            report.dropped_prompt_too_long.append(index)
            continue
        longest = prompt_len + max(len(example["chosen_ids"]), len(example["rejected_ids"]))
        if max_length is not None and longest > max_length:
            report.truncated_rows.append(index)
        report.kept_rows.append(index)
        examples.append(example)
    report.skipped_identical.sort()

    if not examples:
        if report.dropped_prompt_too_long:
            raise DataError(
                f"all {report.num_rows - len(report.skipped_identical)} preference rows have a prompt of >= "
                f"max_length={max_length} tokens, so none keeps a completion token; raise --max_length"
            )
        raise DataError(f"no preference row is left: all {report.num_rows} rows have chosen == rejected")
    return examples, report


def extract_implicit_prompt(chosen: Sequence, rejected: Sequence) -> tuple[Sequence, Sequence, Sequence]:
    """Split the shared start of `chosen` and `rejected` off as the prompt (TRL's `extract_prompt` rule).

    Both are strings (split by character) or message lists (split by whole message). The split is the first
    position where they differ; for text, a space just before it moves into the completions. If one is a prefix
    of the other, the split is one element before the end of the shorter one (TRL's loop leaves its index
    there), so the last shared element starts both completions.

    Args:
        chosen: non-empty text or message list, different from `rejected`.
        rejected: non-empty text or message list.

    Returns:
        `(prompt, chosen_completion, rejected_completion)`; `prompt` may be empty (the caller rejects that:
        where TRL's index would wrap to -1 we return an empty prompt instead of TRL's nonsensical split).
    """
    shorter = min(len(chosen), len(rejected))
    split = next((i for i in range(shorter) if chosen[i] != rejected[i]), None)
    if split is None:
        split = shorter - 1
    elif isinstance(chosen, str) and split > 0 and chosen[split - 1] == " ":
        split -= 1
    return chosen[:split], chosen[split:], rejected[split:]


def _detect_schema(first_row: Mapping[str, Any]) -> tuple[bool, PromptSource]:
    """Decide (conversational, prompt source) from the first row's columns and value types."""
    if not isinstance(first_row, Mapping):
        raise DataError(f"row 0 is a {type(first_row).__name__}, expected a mapping of column name to value")
    missing = [name for name in ("chosen", "rejected") if name not in first_row]
    if missing:
        raise DataError(
            f"the preference dataset has no {' / '.join(repr(m) for m in missing)} column (columns found: "
            f"{sorted(first_row)}); accepted schemas: {ACCEPTED_SCHEMAS}"
        )
    chosen_is_messages = _is_message_list(first_row["chosen"])
    if "prompt" not in first_row:
        return chosen_is_messages, "extracted"
    if chosen_is_messages and isinstance(first_row["prompt"], str):
        return True, "extracted_ignoring_prompt_column"
    return chosen_is_messages, "column"


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], Mapping) and "role" in value[0]


def _check_text(index: int, name: str, value: Any) -> str:
    if _is_message_list(value):
        raise DataError(
            f"row {index}, field '{name}': is a message list but row 0 is plain text; use one format for the "
            "whole dataset"
        )
    if not isinstance(value, str):
        raise DataError(f"row {index}, field '{name}': expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"row {index}, field '{name}': is empty; remove the row or fill it in")
    return value


def _check_messages(index: int, name: str, value: Any) -> list[Mapping[str, Any]]:
    if isinstance(value, str):
        raise DataError(
            f"row {index}, field '{name}': is plain text but the dataset is conversational (message lists); use one "
            "format for the whole dataset"
        )
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else type(value).__name__
        raise DataError(f"row {index}, field '{name}': expected a non-empty list of messages, got {got}")
    for position, message in enumerate(value):
        where = f"row {index}, field '{name}', message {position}"
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise DataError(
                f"{where}: expected a {{'role': ..., 'content': ...}} mapping, got {message!r:.80}"
            )
        role, content = message["role"], message["content"]
        if role not in KNOWN_ROLES:
            raise DataError(f"{where}: unknown role {role!r}; use one of {sorted(KNOWN_ROLES)}")
        if message.get("tool_calls") and (content is None or content == ""):
            continue  # an assistant turn that only calls tools has no text
        if not isinstance(content, str):
            raise DataError(
                f"{where}: content must be a string, got {type(content).__name__} (multimodal content is not supported)"
            )
        if not content.strip():
            raise DataError(f"{where}: content is empty; remove the message or fill it in")
    return value


def _split_row(
    index: int, row: Any, conversational: bool, prompt_source: PromptSource, tokenizer: Any
) -> tuple[Any, Any, Any] | None:
    """Validate one row; return (prompt, chosen, rejected) with EOS added to text completions, None if chosen == rejected."""
    if not isinstance(row, Mapping) or "chosen" not in row or "rejected" not in row:
        columns = sorted(row) if isinstance(row, Mapping) else type(row).__name__
        raise DataError(
            f"row {index}: needs 'chosen' and 'rejected' (found {columns}); accepted: {ACCEPTED_SCHEMAS}"
        )
    if (prompt_source == "extracted") != ("prompt" not in row):
        raise DataError(
            f"row {index}: {'has' if 'prompt' in row else 'lacks'} a 'prompt' field unlike row 0; every row needs "
            "the same columns"
        )
    check = _check_messages if conversational else _check_text
    chosen, rejected = check(index, "chosen", row["chosen"]), check(index, "rejected", row["rejected"])
    if prompt_source == "column":
        if conversational and isinstance(row["prompt"], str):
            raise DataError(
                f"row {index}, field 'prompt': is text but row 0's prompt is a message list; use one format"
            )
        if not conversational and _is_message_list(row["prompt"]):
            raise DataError(
                f"row {index}, field 'prompt': is a message list but chosen/rejected are plain text; give all three "
                "as messages or all three as text"
            )
        prompt = check(index, "prompt", row["prompt"])
    if chosen == rejected:
        return None
    if prompt_source != "column":
        prompt, chosen, rejected = extract_implicit_prompt(chosen, rejected)
        if not prompt:
            raise DataError(
                f"row {index}: chosen and rejected share no leading {'message' if conversational else 'text'}, so no "
                "prompt can be extracted; add a 'prompt' column"
            )
    if conversational:
        for name, completion in (("chosen", chosen), ("rejected", rejected)):
            if completion[0]["role"] != "assistant":
                raise DataError(
                    f"row {index}, field '{name}': the completion after the prompt starts with a "
                    f"{completion[0]['role']!r} message, expected 'assistant'; if chosen/rejected hold the whole "
                    "conversation, drop the 'prompt' column (the prompt is then extracted)"
                )
        return prompt, chosen, rejected
    eos = tokenizer.eos_token
    chosen = chosen if chosen.endswith(eos) else chosen + eos
    rejected = rejected if rejected.endswith(eos) else rejected + eos
    return prompt, chosen, rejected


def _identical_error(index: int, after_tokenization: bool = False) -> DataError:
    how = "tokenize to the same ids" if after_tokenization else "are identical"
    return DataError(
        f"row {index}: chosen and rejected {how}, so the pair carries no preference; remove the row "
        "(or pass skip_identical_pairs=True to skip such rows)"
    )


def _tokenize_texts(tokenizer: Any, triples: list[tuple[str, str, str]]) -> list[tuple[list[int], ...]]:
    """Tokenize (prompt, prompt+chosen, prompt+rejected) with the tokenizer's special tokens, in batches."""
    result: list[tuple[list[int], ...]] = []
    for start in range(0, len(triples), _TEXT_TOKENIZE_CHUNK):
        chunk = triples[start : start + _TEXT_TOKENIZE_CHUNK]
        texts = [text for p, c, r in chunk for text in (p, p + c, p + r)]
        ids = tokenizer(text=texts)["input_ids"]
        result.extend(tuple(ids[k : k + 3]) for k in range(0, len(ids), 3))
    return result


def _tokenize_conversation(
    tokenizer: Any, index: int, row: Mapping[str, Any], prompt: list, chosen: list, rejected: list
) -> tuple[list[int], list[int], list[int]]:
    """Render and tokenize the prompt (with the generation prompt) and the two whole conversations."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise DataError(
                f"row {index}, field 'tools': not valid JSON ({error}); give a list of tool schemas"
            ) from error
    template_kwargs = row.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, Mapping):
        raise DataError(
            f"row {index}, field 'chat_template_kwargs': expected a mapping, got {type(template_kwargs).__name__}"
        )
    kwargs = {"tools": tools, **template_kwargs}

    def encode(messages: list, **extra: Any) -> list[int]:
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs, **extra)[
            "input_ids"
        ]

    return encode(prompt, add_generation_prompt=True), encode(prompt + chosen), encode(prompt + rejected)

