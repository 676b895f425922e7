"""Bad SFT data and settings give one-line UserErrors that name the row, the field and the fix.

TRL 1.16 fails on most of these with a KeyError / TypeError / jinja error from inside `datasets.map`, or trains on
them silently (empty text becomes a lone EOS); each test states the message we expect instead.
"""

from __future__ import annotations

import copy

import pytest
from datasets import Dataset
from test_data_sft import CHATML_TEMPLATE, MESSAGES_ROWS, build_tokenizer

from data.column_map import COLUMN_PRESETS, normalize_sft_columns, parse_column_map
from data.errors import DataError
from data.formats import (
    CONVERSATIONS,
    MESSAGES,
    PROMPT_COMPLETION,
    PROMPT_COMPLETION_CONVERSATIONAL,
    TEXT,
    TOKENIZED,
    detect_sft_format,
)
from data.sft import prepare_sft_dataset

NO_GENERATION_TEMPLATE = CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("chatml")


def chat(*pairs: tuple[str, object]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in pairs]}


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        ([{"text": "Hello"}, {"text": ""}], {}, "Row 1: field 'text' is empty"),
        ([{"text": "Hello"}, {"text": "  \n"}], {}, "Row 1: field 'text' is empty"),
        ([{"text": "Hello"}, {"text": 7}], {}, "Row 1: field 'text' must be a string, got int"),
        ([{"text": "Hello"}, {"other": "x"}], {}, "Row 1: field 'text' is missing"),
        ([chat(("user", "Hi"), ("assistant", "Hello")), chat(("bot", "Hi"))], {},
         "Row 1: messages[0] has unknown role 'bot'"),
        ([chat(("human", "Hi"), ("assistant", "Hello"))], {},
         "human/gpt are accepted in a 'conversations' column"),
        ([chat(("user", "Hi"), ("assistant", ""))], {}, "Row 0: messages[1] (assistant) has empty content"),
        ([chat(("user", [{"type": "text", "text": "Hi"}]), ("assistant", "Hello"))], {},
         "Row 0: messages[0] (user): 'content' must be a string, got list"),
        ([{"messages": [{"content": "Hi"}]}], {}, "Row 0: messages[0] has no 'role'"),
        ([{"messages": [{"role": "user"}]}], {}, "Row 0: messages[0] (user) has no 'content'"),
        ([chat(("user", "Hi")), {"messages": []}], {}, "Row 1: field 'messages' must be a non-empty list"),
        ([{"prompt": "Hi", "completion": ""}], {}, "Row 0: field 'completion' is empty"),
        ([{"prompt": "Hi", "completion": None}], {}, "Row 0: field 'completion' is missing"),
        ([{"prompt": "Hi"}], {}, "has a 'prompt' column but no 'completion' column"),
        ([{"prompt": "Hi", "completion": [{"role": "assistant", "content": "Yo"}]}], {},
         "'prompt' is text but 'completion' is a list of messages"),
        ([{"question": "1+1?", "answer": "2"}], {}, "These columns match the preset 'gsm8k'"),
        ([{"body": "x"}], {}, "No known SFT format in the dataset columns ['body']"),
        ([{"text": "x", "labels": [1]}], {}, "labels only make sense for pre-tokenized data"),
        ([{"input_ids": [1, 2, 3], "labels": [1, 2]}], {}, "Row 0: field 'labels' must be a list as long as"),
        ([{"input_ids": "1 2 3"}], {}, "Row 0: field 'input_ids' must be a list of token ids"),
        ([{"text": "x"}], {"assistant_only_loss": True}, "--assistant_only_loss needs conversational data"),
        ([{"text": "x"}], {"completion_only_loss": True}, "--completion_only_loss needs prompt/completion data"),
        ([chat(("user", "Hi"), ("assistant", "Hello")), chat(("system", "Be nice"), ("user", "Hi"))],
         {"assistant_only_loss": True}, "Row 1: assistant_only_loss is on but the chat template marks no assistant"),
        ([{"text": "x"}], {"packing": True, "max_length": None}, "--packing needs --max_length"),
        ([{"text": "x"}], {"packing": True, "packing_strategy": "first_fit"}, "--packing_strategy first_fit"),
        ([{"text": "x"}], {"truncation_mode": "middle"}, "--truncation_mode middle"),
        ([{"text": "x"}], {"max_length": 0}, "--max_length must be a positive integer"),
        ([{"input_ids": [1, 2], "labels": [-100, -100]}], {}, "No example is left after preparation"),
    ],
)
def test_bad_rows_and_settings_raise_user_error(rows, kwargs, message, tokenizer):
    """Each bad input raises DataError whose message contains the stated text (row index, field, fix)."""
    with pytest.raises(DataError) as error:
        prepare_sft_dataset(copy.deepcopy(rows), tokenizer, **kwargs)
    assert message in str(error.value)
    assert "\n" not in str(error.value)  # one line: the CLI prints it as is


def test_bad_row_in_a_datasets_dataset_is_named(tokenizer):
    """Same checks on a datasets.Dataset, where Arrow fills absent message keys with None: row 2 is named."""
    rows = copy.deepcopy(MESSAGES_ROWS)
    rows[2]["messages"][1]["content"] = "   "
    with pytest.raises(DataError, match=r"Row 2: messages\[1\] \(assistant\) has empty content"):
        prepare_sft_dataset(Dataset.from_list(rows), tokenizer)


def test_chat_template_missing(tokenizer):
    """Conversational data with a tokenizer that has no chat template."""
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(DataError, match="the tokenizer has no chat template"):
        prepare_sft_dataset(copy.deepcopy(MESSAGES_ROWS), bare)


def test_assistant_only_loss_without_generation_markers_reads_the_turns(tokenizer):
    """Issue 14: a template without {% generation %} is no longer refused; the assistant turns are read from
    growing prefixes of the conversation (data/chat_template.py). On the same ChatML text the labels equal those
    of the marked template, except the "\n" after each <|im_end|>: the marked template leaves it outside its block,
    while a turn read from the rendering runs to the end of what the turn renders, "<|im_end|>\n"."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = NO_GENERATION_TEMPLATE
    ours, _ = prepare_sft_dataset(copy.deepcopy(MESSAGES_ROWS), plain, assistant_only_loss=True)
    marked, _ = prepare_sft_dataset(copy.deepcopy(MESSAGES_ROWS), tokenizer, assistant_only_loss=True)
    im_end, newline = tokenizer.convert_tokens_to_ids(["<|im_end|>", "Ċ"])
    for our_row, marked_row in zip(ours, marked, strict=True):
        ids = our_row["input_ids"]
        assert ids == marked_row["input_ids"]
        differs = [t for t, (a, b) in enumerate(zip(our_row["labels"], marked_row["labels"], strict=True)) if a != b]
        assistant_ends = [t for t in range(1, len(ids)) if marked_row["labels"][t - 1] == im_end]
        assert differs == assistant_ends and all(ids[t] == newline == our_row["labels"][t] for t in differs)


def test_end_of_turn_outside_generation_block_is_reported(tokenizer):
    """A template whose {% generation %} block stops before <|im_end|> trains fine but never learns to stop:
    the report says so (TRL logs the same warning)."""
    late_eos = copy.deepcopy(tokenizer)
    late_eos.chat_template = CHATML_TEMPLATE.replace(
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}",
        "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>' }}",
    )
    _, report = prepare_sft_dataset(copy.deepcopy(MESSAGES_ROWS), late_eos, assistant_only_loss=True)
    assert len(report.warnings) == 1 and "not trained to stop" in report.warnings[0]
    _, good = prepare_sft_dataset(copy.deepcopy(MESSAGES_ROWS), tokenizer, assistant_only_loss=True)
    assert good.warnings == []


def test_chat_template_exception_names_the_row(tokenizer):
    """A template that raises (here: on a system turn) is reported with the row index and the template's text."""
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(DataError, match="Row 1: the chat template failed on this conversation: no system turns"):
        prepare_sft_dataset(copy.deepcopy(MESSAGES_ROWS), strict)


# ---------------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"input_ids": [1, 2], "text": "x"}, TOKENIZED),
        ({"conversations": [{"from": "human", "value": "Hi"}]}, CONVERSATIONS),
        ({"prompt": "a", "completion": "b"}, PROMPT_COMPLETION),
        ({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]},
         PROMPT_COMPLETION_CONVERSATIONAL),
        ({"messages": [{"role": "user", "content": "a"}], "text": "x"}, MESSAGES),  # messages wins, as in TRL
        ({"text": "x"}, TEXT),
    ],
)
def test_detect_sft_format(row, expected):
    """Formats are recognised in TRL's order of precedence."""
    assert detect_sft_format(list(row), row) == expected


def test_column_map_renames_lists_and_datasets():
    """question=prompt answer=completion renames; the other columns stay."""
    rows = [{"question": "1+1?", "answer": "2", "id": 0}]
    mapped = normalize_sft_columns(rows, ["question=prompt", "answer=completion"])
    assert mapped == [{"prompt": "1+1?", "completion": "2", "id": 0}]
    mapped_ds = normalize_sft_columns(Dataset.from_list(rows), "question=prompt,answer=completion")
    assert sorted(mapped_ds.column_names) == ["completion", "id", "prompt"]
    assert normalize_sft_columns(rows, None) is rows


def test_presets_build_prompt_completion():
    """gsm8k: prompt = question + newline (no token spans the boundary), completion = answer; alpaca joins
    instruction and a non-empty input with a blank line; *_chat gives one user and one assistant message."""
    gsm = normalize_sft_columns([{"question": "1+1?", "answer": "2"}], ["gsm8k"])
    assert gsm == [{"prompt": "1+1?\n", "completion": "2"}]
    alpaca = normalize_sft_columns(
        Dataset.from_list([{"instruction": "Add", "input": "1 and 1", "output": "2"},
                           {"instruction": "Say hi", "input": "", "output": "hi"}]), "alpaca")
    assert alpaca.to_list() == [{"prompt": "Add\n\n1 and 1\n", "completion": "2"},
                                {"prompt": "Say hi\n", "completion": "hi"}]
    dolly = normalize_sft_columns([{"instruction": "Q", "context": "C", "response": "R", "category": "qa"}],
                                  "dolly_chat")
    assert dolly == [{"category": "qa", "prompt": [{"role": "user", "content": "Q\n\nC"}],
                      "completion": [{"role": "assistant", "content": "R"}]}]
    assert set(COLUMN_PRESETS) == {"gsm8k", "alpaca", "dolly", "gsm8k_chat", "alpaca_chat", "dolly_chat"}


def test_preset_output_prepares(tokenizer):
    """A mapped GSM8K row trains on the completion only (completion_only_loss defaults on for prompt/completion)."""
    rows = normalize_sft_columns([{"question": "What is 1+1?", "answer": "2"}], "gsm8k")
    examples, report = prepare_sft_dataset(rows, tokenizer)
    prompt_length = len(tokenizer("What is 1+1?\n")["input_ids"])
    assert report.format == PROMPT_COMPLETION and report.completion_only_loss
    assert examples[0]["labels"][:prompt_length] == [-100] * prompt_length
    assert examples[0]["labels"][prompt_length:] == examples[0]["input_ids"][prompt_length:]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gsm9k", "unknown preset"),
        (["question"], "unknown preset"),
        (["question=prompt", "gsm8k"], "is not a source=target pair"),
        (["=prompt"], "is not a source=target pair"),
    ],
)
def test_parse_column_map_errors(spec, message):
    with pytest.raises(DataError, match=message):
        parse_column_map(spec)


@pytest.mark.parametrize(
    ("rows", "spec", "message"),
    [
        ([{"q": "a"}], ["question=prompt"], r"no column 'question' \(columns: \['q'\]\)"),
        ([{"q": "a"}], ["q=query"], "'query' is not an SFT column"),
        ([{"q": "a", "prompt": "b"}], ["q=prompt"], "already has a 'prompt' column"),
        ([{"question": "a"}], "gsm8k", r"needs the columns \['question', 'answer'\]"),
        ([{"question": "a", "answer": None}], "gsm8k", "Row 0: field 'answer' must be a non-empty string"),
    ],
)
def test_normalize_errors(rows, spec, message):
    with pytest.raises(DataError, match=message):
        normalize_sft_columns(rows, spec)
