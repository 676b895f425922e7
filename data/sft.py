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
   (default: on exactly when the data has `prompt` and `completion`), the assistant mask when
   `assistant_only_loss` (`data.chat_template`: the template's `{% generation %}` blocks, or the assistant turns
   read from growing prefixes of the conversation). Labels come from masks, never from the pad id, so
   `pad == eos` cannot mask a real EOS.
5. Without packing: cut to `max_length` (`keep_start` keeps the first tokens) and drop rows left with no label
   (e.g. a prompt that fills `max_length`). With packing: no per-row cut; `data.packing` packs (`bfd` cuts each
   document to `max_length`).
6. Shuffle only when asked (TRL's `shuffle_dataset` defaults to False): once before packing and once after, with
   the same seed, using `datasets`' permutation (`numpy.random.default_rng(seed).permutation(n)`).

Where TRL drops rows silently or fails with an obscure error, this module counts and reports the rows
(`data.report.PrepReport`) or raises `DataError` naming the row and the field.

Deliberate differences (each where TRL fails or silently trains on something else):

- ShareGPT roles `human` / `gpt` are mapped to `user` / `assistant` (TRL passes them to the chat template
  unchanged, which renders a `human` turn, and `assistant_only_loss` then finds no assistant).
- `assistant_only_loss` works on a ShareGPT `conversations` column (TRL checks the row before converting it and
  raises "not conversational"); a `conversations` column with role/content keys is read too (TRL: KeyError).
- `assistant_only_loss` with a template lacking `{% generation %}` trains the assistant turns read from growing
  prefixes of the conversation, for any prefix-preserving template (TRL swaps in its own training template for
  ~30 known model families and raises for any other; on the templates it swaps, the tokens and labels are the
  same: tests/test_chat_templates.py).
- Empty text / content, non-string content, unknown roles (`data.messages`, the same checks as DPO's),
  `completion_only_loss=True` on data without a prompt, and a `labels` column without `input_ids` are
  DataErrors (TRL trains on a lone EOS, lets the template decide, or ignores the flag).
"""

from __future__ import annotations

from typing import Any

from data.chat_template import (
    chat_template_of,
    end_of_turn_in_assistant_mask,
    has_generation_markers,
    render_ids,
    render_with_assistant_mask,
)
from data.common import IGNORE_INDEX, check_length_options, common_prefix_length, shuffled, to_rows
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
from data.messages import check_text, clean_messages, template_kwargs
from data.packing import PACKING_STRATEGIES, pack_examples
from data.report import NO_TARGET, NO_TARGET_AFTER_TRUNCATION, PrepReport

_TOKENIZE_BATCH_ROWS = 1000


def _labels(input_ids: list[int], masks: list[list[int]]) -> list[int]:
    """Token id where every mask is 1, else IGNORE_INDEX."""
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
                    text = check_text(row.get(dataset_text_field), start + offset, dataset_text_field)
                    if not text.endswith(eos):
                        text += eos
                        report.num_eos_appended += 1
                    texts.append(text)
                for input_ids in tokenizer(texts)["input_ids"]:
                    examples.append({"input_ids": input_ids, "labels": list(input_ids)})
                continue
            prompts, completions = [], []
            for offset, row in enumerate(block):
                prompt = check_text(row.get("prompt"), start + offset, "prompt")
                completion = check_text(row.get("completion"), start + offset, "completion")
                if not completion.endswith(eos):
                    completion += eos
                    report.num_eos_appended += 1
                prompts.append(prompt)
                completions.append(completion)
            prompt_ids_list = tokenizer(prompts)["input_ids"]
            # Tokenized as one string, as TRL does, so the ids are those the model sees at inference.
            full_ids_list = tokenizer([p + c for p, c in zip(prompts, completions, strict=True)])["input_ids"]
            for prompt_ids, input_ids in zip(prompt_ids_list, full_ids_list, strict=True):
                examples.append(
                    _prompt_completion_example(prompt_ids, input_ids, [], completion_only_loss, report, len(examples))
                )
        return examples

    # Conversational formats.
    for index, row in enumerate(rows):
        kwargs = template_kwargs(row, index)
        if fmt == PROMPT_COMPLETION_CONVERSATIONAL:
            prompt = clean_messages(row.get("prompt"), index, "prompt")
            completion = clean_messages(row.get("completion"), index, "completion")
            prompt_ids = render_ids(tokenizer, prompt, index, add_generation_prompt=True, **kwargs)["input_ids"]
            # With completion-only loss the prompt's assistant turns carry no loss, whatever the template does.
            full = _render(tokenizer, prompt + completion, index, assistant_only_loss,
                           len(prompt) if completion_only_loss else 0, kwargs)
            masks = [full["assistant_masks"]] if "assistant_masks" in full else []
            _require_assistant_tokens(masks, index)
            examples.append(
                _prompt_completion_example(prompt_ids, full["input_ids"], masks, completion_only_loss, report,
                                           index)
            )
        else:
            column = "conversations" if fmt == CONVERSATIONS else "messages"
            messages = clean_messages(row.get(column), index, column, sharegpt=fmt == CONVERSATIONS)
            full = _render(tokenizer, messages, index, assistant_only_loss, 0, kwargs)
            masks = [full["assistant_masks"]] if "assistant_masks" in full else []
            _require_assistant_tokens(masks, index)
            examples.append({"input_ids": full["input_ids"], "labels": _labels(full["input_ids"], masks)})
    return examples


def _render(tokenizer, messages: list[dict[str, Any]], index: int, assistant_only_loss: bool, first_message: int,
            kwargs: dict[str, Any]) -> dict[str, list[int]]:
    """The conversation's ids, with the assistant mask (`data.chat_template`) when the loss is assistant-only."""
    if assistant_only_loss:
        return render_with_assistant_mask(tokenizer, messages, index, first_message, **kwargs)
    return render_ids(tokenizer, messages, index, **kwargs)


def _require_assistant_tokens(masks: list[list[int]], index: int) -> None:
    if masks and 1 not in masks[0]:
        raise DataError(
            f"Row {index}: assistant_only_loss is on but the chat template marks no assistant token in this row "
            "(no assistant message, or a {% generation %} block that marks none); fix the row or the template."
        )


def _prompt_completion_example(
    prompt_ids: list[int], input_ids: list[int], masks: list[list[int]], completion_only_loss: bool,
    report: PrepReport, index: int,
) -> dict[str, list[int]]:
    """Label prompt-completion row `index`: loss on the tokens after the common prefix when completion-only."""
    prompt_length = common_prefix_length(prompt_ids, input_ids)
    if prompt_length < len(prompt_ids):
        report.prompt_boundary_rows.append(index)
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
        template = chat_template_of(tokenizer)
        if not template:
            raise DataError(
                f"The dataset is conversational ('{fmt}') but the tokenizer has no chat template; use a tokenizer "
                "with one or set one with --chat_template_path."
            )
        if assistant_only_loss and not end_of_turn_in_assistant_mask(tokenizer):
            where = "{% generation %} block" if has_generation_markers(template) else "assistant turn"
            report.warnings.append(
                f"the chat template's {where} does not include the end-of-turn token, so the model is not trained "
                "to stop"
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
            report.truncated_rows.append(index)
            report.num_truncated_tokens += length - max_length
            cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
            example = {"input_ids": example["input_ids"][cut], "labels": example["labels"][cut]}
        if not _has_target(example):
            report.drop(index, NO_TARGET_AFTER_TRUNCATION if had_target else NO_TARGET)
            continue
        kept.append(example)
    return kept


def _pack(
    examples: list[dict[str, list[int]]], max_length: int, strategy: str, shuffle_seed: int | None,
    report: PrepReport,
) -> list[dict[str, list[int]]]:
    """Pack as TRL does: no per-row truncation or dropping; shuffle before and after when a seed is given."""
    for index, example in enumerate(examples):
        length = len(example["input_ids"])
        # wrapped cuts every row anyway; bfd keeps a document's first max_length tokens; bfd_split splits it.
        if length > max_length and strategy != "wrapped":
            report.truncated_rows.append(index)
            if strategy == "bfd":
                report.num_truncated_tokens += length - max_length
        report.num_no_target_kept += not _has_target(example)
    if shuffle_seed is not None:
        examples = shuffled(examples, shuffle_seed)
    examples = pack_examples(examples, max_length, strategy)
    if shuffle_seed is not None:
        examples = shuffled(examples, shuffle_seed)
    return examples


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
        assistant_only_loss: Loss on assistant tokens only (see `data.chat_template`).
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
    check_length_options(max_length, truncation_mode)
    if packing and packing_strategy not in PACKING_STRATEGIES:
        raise DataError(f"--packing_strategy {packing_strategy}: use one of {list(PACKING_STRATEGIES)}.")
    if packing and max_length is None:
        raise DataError("--packing needs --max_length (the length of each packed row).")

    rows = to_rows(dataset)
    if not rows:
        raise DataError("The dataset has no rows.")
    first_row = rows[0]
    if "image" in first_row or "images" in first_row:
        raise DataError("The dataset has image columns; only text SFT is supported (drop 'image'/'images').")
    fmt = detect_sft_format(list(first_row.keys()), first_row, dataset_text_field)
    report = PrepReport(method="sft", format=fmt, num_rows=len(rows), max_length=max_length,
                        truncation_mode=truncation_mode, packing=packing,
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
            examples = shuffled(examples, shuffle_seed)

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
