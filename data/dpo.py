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
- `max_prompt_length` (TRL < 1.0's option, which the Hugging Face course uses; TRL 1.16 has none): the prompt
  keeps its LAST `max_prompt_length` tokens (`truncate_prompt`, TRL 0.x `tokenize_row`:
  `prompt_input_ids[-max_prompt_length:]`); chosen and rejected are untouched. Applied after the prompt/completion
  split and before the `max_length` rules below; rows cut are listed in `PrepReport.truncated_prompt_rows`.
- Truncation is NOT done here: `data.collate_dpo.collate_dpo` cuts each prompt+completion sequence to
  `max_length`. Here, with `truncation_mode="keep_start"`, rows whose prompt alone has >= `max_length` tokens
  are removed because they would keep no completion token. TRL drops them silently; we list them in
  `PrepReport.dropped_prompt_too_long` (the caller decides to warn or fail) and raise if every row goes.

Where we are stricter than TRL (each is a `DataError` naming the row, the field and the fix):
- missing `chosen`/`rejected` columns, rows that mix text and message formats, a `prompt` message list with
  text completions;
- empty or whitespace-only text, non-string message content (empty content is allowed only on messages
  that carry `tool_calls`), empty message lists, roles outside `data.messages.KNOWN_ROLES` (the checks SFT
  makes too);
- a completion (chosen/rejected after the prompt) that does not start with an assistant message: a prompt
  repeated inside chosen, or conversations that already differ at a user turn;
- an implicit prompt that is empty (chosen and rejected share no leading text / message);
- chosen identical to rejected (raw, or after tokenization): no preference signal. With
  `skip_identical_pairs=True` such rows are skipped and listed in `PrepReport.skipped_identical` instead;
- a completion that renders to no tokens; a tokenizer with no chat template (conversations) or no EOS
  token (text); every row dropped by the prompt-length rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from data.chat_template import assistant_turn_spans, chat_template_of, render_text
from data.common import check_length_options, common_prefix_length, to_rows
from data.errors import DataError
from data.messages import check_text, clean_messages, is_message_list, template_kwargs
from data.report import IDENTICAL_PAIR, PROMPT_TOO_LONG, PrepReport

ACCEPTED_SCHEMAS = (
    "prompt/chosen/rejected as text; chosen/rejected as text with the prompt inside (hh-rlhf); "
    "prompt/chosen/rejected as lists of {'role','content'} messages; chosen/rejected as whole conversations"
)

_TEXT_TOKENIZE_CHUNK = 512  # rows per batched tokenizer call: the fast tokenizer encodes a batch in Rust

PromptSource = Literal["column", "extracted", "extracted_ignoring_prompt_column"]


def prepare_dpo_dataset(
    dataset: Iterable[Mapping[str, Any]],
    tokenizer: Any,
    *,
    max_length: int | None = 1024,
    truncation_mode: str = "keep_start",
    skip_identical_pairs: bool = False,
    max_prompt_length: int | None = None,
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
        max_prompt_length: keep only the last N prompt tokens (TRL < 1.0); None keeps the whole prompt.

    Returns:
        The prepared examples (untruncated, in input order minus removed rows) and a `PrepReport`.

    Raises:
        DataError: for any bad row or setting, naming the row index, the field and the fix.
    """
    check_length_options(max_length, truncation_mode)
    rows = to_rows(dataset)
    if not rows:
        raise DataError("The preference dataset has no rows.")
    conversational, prompt_source = _detect_schema(rows[0])
    if conversational and not chat_template_of(tokenizer):
        raise DataError(
            "The preference data is conversational (lists of messages) but the tokenizer has no chat template; "
            "use a tokenizer with one (e.g. an instruct model's) or set one with --chat_template_path."
        )
    if not conversational and not getattr(tokenizer, "eos_token", None):
        raise DataError(
            "The tokenizer has no eos_token, which plain-text preference data needs to end chosen/rejected; "
            "set eos_token in the tokenizer (tokenizer_config.json)."
        )
    report = PrepReport(method="dpo", format="conversational" if conversational else "text", num_rows=len(rows),
                        max_length=max_length, truncation_mode=truncation_mode, prompt_source=prompt_source)

    # 1) Validate every row and split it into (prompt, chosen, rejected) before any tokenization: fail fast.
    triples: list[tuple[int, Any, Any, Any]] = []  # (row index, prompt, chosen, rejected)
    for index, row in enumerate(rows):
        triple = _split_row(index, row, conversational, prompt_source, tokenizer)
        if triple is None:  # chosen == rejected
            if not skip_identical_pairs:
                raise _identical_error(index)
            report.drop(index, IDENTICAL_PAIR)
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
        kept_prompt = truncate_prompt(prompt_ids[:prompt_len], max_prompt_length)
        if len(kept_prompt) < prompt_len:
            report.truncated_prompt_rows.append(index)
            report.num_prompt_tokens_cut += prompt_len - len(kept_prompt)
        example = {
            "prompt_ids": kept_prompt,
            "chosen_ids": list(prompt_chosen_ids[prompt_len:]),
            "rejected_ids": list(prompt_rejected_ids[prompt_len:]),
        }
        for name in ("chosen", "rejected"):
            if not example[f"{name}_ids"]:
                raise DataError(
                    f"Row {index}: field '{name}' (the completion) renders to no tokens after the prompt; check that "
                    "the chat template renders assistant messages."
                )
        if example["chosen_ids"] == example["rejected_ids"]:
            if not skip_identical_pairs:
                raise _identical_error(index, after_tokenization=True)
            report.drop(index, IDENTICAL_PAIR)
            continue
        # TRL's rule: with keep_start a prompt of >= max_length tokens leaves no completion token after truncation.
        if max_length is not None and truncation_mode == "keep_start" and len(kept_prompt) >= max_length:
            report.drop(index, PROMPT_TOO_LONG)
            continue
        _count(report, index, example, max_length)
        examples.append(example)

    if not examples:
        if report.dropped_prompt_too_long:
            raise DataError(
                f"All {report.num_rows - len(report.skipped_identical)} preference rows have a prompt of >= "
                f"max_length={max_length} tokens, so none keeps a completion token; raise --max_length."
            )
        raise DataError(f"No preference row is left: all {report.num_rows} rows have chosen == rejected.")
    report.num_examples = len(examples)
    return examples, report


def truncate_prompt(prompt_ids: list[int], max_prompt_length: int | None) -> list[int]:
    """The last `max_prompt_length` tokens of the prompt (all of them when None or already short enough).

    TRL < 1.0's `DPOTrainer.tokenize_row`: `prompt_input_ids[-max_prompt_length:]` (the end of a prompt, where
    the question is, matters most).

    Shape:
        prompt_ids: (P,) -> (min(P, max_prompt_length),)
    """
    if max_prompt_length is None or len(prompt_ids) <= max_prompt_length:
        return list(prompt_ids)
    return list(prompt_ids[-max_prompt_length:])


def _count(report: PrepReport, index: int, example: dict[str, list[int]], max_length: int | None) -> None:
    """Add a kept example to the report: its row, its tokens and targets, and what the collator will cut."""
    report.kept_rows.append(index)
    lengths = [len(example["prompt_ids"]) + len(example[key]) for key in ("chosen_ids", "rejected_ids")]
    report.num_tokens += sum(lengths)
    report.num_target_tokens += len(example["chosen_ids"]) + len(example["rejected_ids"])
    if max_length is not None and max(lengths) > max_length:
        report.truncated_rows.append(index)
        report.num_truncated_tokens += sum(max(0, length - max_length) for length in lengths)


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
        raise DataError(f"Row 0 is a {type(first_row).__name__}, expected a mapping of column name to value.")
    missing = [name for name in ("chosen", "rejected") if name not in first_row]
    if missing:
        raise DataError(
            f"The preference dataset has no {' / '.join(repr(m) for m in missing)} column (columns found: "
            f"{sorted(first_row)}); accepted schemas: {ACCEPTED_SCHEMAS}. Map other columns with "
            "--dataset_column_map."
        )
    chosen_is_messages = is_message_list(first_row["chosen"])
    if "prompt" not in first_row:
        return chosen_is_messages, "extracted"
    if chosen_is_messages and isinstance(first_row["prompt"], str):
        return True, "extracted_ignoring_prompt_column"
    return chosen_is_messages, "column"


def _check_field(index: int, name: str, value: Any, conversational: bool) -> Any:
    """One prompt / chosen / rejected value, checked as messages or as text, in the format of row 0."""
    if conversational:
        if isinstance(value, str):
            raise DataError(
                f"Row {index}: field '{name}' is plain text but the dataset is conversational (message lists); use "
                "one format for the whole dataset."
            )
        return clean_messages(value, index, name)
    if is_message_list(value):
        raise DataError(
            f"Row {index}: field '{name}' is a message list but row 0 is plain text; use one format for the whole "
            "dataset."
        )
    return check_text(value, index, name)


def _split_row(
    index: int, row: Any, conversational: bool, prompt_source: PromptSource, tokenizer: Any
) -> tuple[Any, Any, Any] | None:
    """Validate one row; return (prompt, chosen, rejected) with EOS added to text completions, None if chosen == rejected."""
    if not isinstance(row, Mapping) or "chosen" not in row or "rejected" not in row:
        columns = sorted(row) if isinstance(row, Mapping) else type(row).__name__
        raise DataError(f"Row {index}: needs 'chosen' and 'rejected' (found {columns}); accepted: {ACCEPTED_SCHEMAS}.")
    if (prompt_source == "extracted") != ("prompt" not in row):
        raise DataError(
            f"Row {index}: {'has' if 'prompt' in row else 'lacks'} a 'prompt' field unlike row 0; every row needs "
            "the same columns."
        )
    chosen = _check_field(index, "chosen", row["chosen"], conversational)
    rejected = _check_field(index, "rejected", row["rejected"], conversational)
    if prompt_source == "column":
        if conversational and isinstance(row["prompt"], str):
            raise DataError(
                f"Row {index}: field 'prompt' is text but row 0's prompt is a message list; use one format."
            )
        if not conversational and is_message_list(row["prompt"]):
            raise DataError(
                f"Row {index}: field 'prompt' is a message list but chosen/rejected are plain text; give all three "
                "as messages or all three as text."
            )
        prompt = _check_field(index, "prompt", row["prompt"], conversational)
    if chosen == rejected:
        return None
    if prompt_source != "column":
        prompt, chosen, rejected = extract_implicit_prompt(chosen, rejected)
        if not prompt:
            raise DataError(
                f"Row {index}: chosen and rejected share no leading {'message' if conversational else 'text'}, so no "
                "prompt can be extracted; add a 'prompt' column."
            )
    if conversational:
        for name, completion in (("chosen", chosen), ("rejected", rejected)):
            if completion[0]["role"] != "assistant":
                raise DataError(
                    f"Row {index}: field '{name}' (the completion after the prompt) starts with a "
                    f"{completion[0]['role']!r} message, expected 'assistant'; if chosen/rejected hold the whole "
                    "conversation, drop the 'prompt' column (the prompt is then extracted)."
                )
        return prompt, chosen, rejected
    eos = tokenizer.eos_token
    chosen = chosen if chosen.endswith(eos) else chosen + eos
    rejected = rejected if rejected.endswith(eos) else rejected + eos
    return prompt, chosen, rejected


def _identical_error(index: int, after_tokenization: bool = False) -> DataError:
    how = "tokenize to the same ids" if after_tokenization else "are identical"
    return DataError(
        f"Row {index}: chosen and rejected {how}, so the pair carries no preference; remove the row "
        "(or pass skip_identical_pairs=True to skip such rows)."
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
    """Render the prompt (with the generation prompt) and the two whole conversations, and tokenize them as
    `apply_chat_template` does (the text, without added special tokens).

    A template that renders the prompt's turns differently once the completion follows would put part of the
    re-rendered prompt into the completion: `data.chat_template` finds the turn and it is a DataError (TRL trains
    on it). A generation prompt that differs from the turn's start (e.g. an empty think block before a completion
    that thinks) splits where the tokens diverge, as in TRL, and the row is reported.
    """
    kwargs = template_kwargs(row, index)
    prompt_text = render_text(tokenizer, prompt, index, add_generation_prompt=True, **kwargs)
    texts = [prompt_text]
    for completion in (chosen, rejected):
        text = render_text(tokenizer, prompt + completion, index, **kwargs)
        if not text.startswith(prompt_text):
            assistant_turn_spans(tokenizer, prompt + completion, index, first_message=len(prompt), **kwargs)
        texts.append(text)
    prompt_ids, chosen_ids, rejected_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return prompt_ids, chosen_ids, rejected_ids
