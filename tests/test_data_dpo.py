"""DPO data preparation and collation match TRL 1.16 exactly; bad rows raise DataError naming row and field.

Parity tests build tokenizers in-test with `tokenizers` (ChatML; the same with pad == eos; a Llama-like one
whose post-processor adds BOS and that has no pad token) plus the shipped one, a tiny Llama saved to a tmp dir,
and construct `trl.DPOTrainer`: our `prepare_dpo_dataset` output must equal `trainer.train_dataset`'s id columns
and our `collate_dpo` batch must equal `trainer.data_collator`'s, tensor for tensor.

    pytest tests/test_data_dpo.py -q
"""

from __future__ import annotations

import copy
import warnings

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer
from trl.data_utils import extract_prompt as trl_extract_prompt
from trl.trainer.dpo_trainer import DataCollatorForPreference

from data.collate_dpo import collate_dpo
from data.column_map import normalize_dpo_columns
from data.common import resolve_pad_token_id
from data.defaults import DEFAULT_TOKENIZER_DIR
from data.dpo import extract_implicit_prompt, prepare_dpo_dataset
from data.errors import DataError

datasets.disable_progress_bars()
ID_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")

# ---------------------------------------------------------------------------------------------------------------
# Tokenizers and model
# ---------------------------------------------------------------------------------------------------------------

# Repeated so BPE learns whole-word tokens (" Sure", " Sorry"): a prompt cut mid-word ("...Assistant: S") then
# merges with its completion, which exercises TRL's common-prefix split.
CORPUS = [
    "\n\nHuman: Can you help me?\n\nAssistant: Sure, happy to help. Sorry, I can't.",
    "\n\nHuman: What color is the sky?\n\nAssistant: It is blue. It is green.",
    "Sure thing. Sorry about that. The sun is bright and the answer is yes.",
    "user assistant system Name a fruit. Apple. Also banana. How are you? I am fine.",
] * 30

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama-2 style: the template writes BOS itself; text encoding gets BOS from the post-processor instead.
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %} {{ message['content'] }}"
    "{{ eos_token }}{% else %}[INST] {{ message['content'] }} [/INST]{% endif %}{% endfor %}"
)


def _bpe(special_tokens: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def _build_tokenizers() -> dict[str, PreTrainedTokenizerFast]:
    chatml = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(["<|pad|>", "<|im_start|>", "<|im_end|>"]),
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
    )
    chatml.chat_template = CHATML_TEMPLATE
    pad_eos = copy.deepcopy(chatml)
    pad_eos.pad_token = pad_eos.eos_token
    llama_backend = _bpe(["<unk>", "<s>", "</s>"])
    llama_backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", llama_backend.token_to_id("<s>"))]
    )
    llama_bos = PreTrainedTokenizerFast(tokenizer_object=llama_backend, bos_token="<s>", eos_token="</s>")
    llama_bos.chat_template = LLAMA_TEMPLATE
    built = {"chatml": chatml, "chatml_pad_eos": pad_eos, "llama_bos": llama_bos}
    # The shipped tokenizer is produced by scripts/build_tokenizer.py; compare against it too when present.
    if DEFAULT_TOKENIZER_DIR.exists():
        built["shipped"] = AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER_DIR)
    return built


TOKENIZERS = _build_tokenizers()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Llama saved to disk (DPOTrainer reloads the reference from its path)."""
    torch.manual_seed(0)
    vocab = max(len(tokenizer) for tokenizer in TOKENIZERS.values())
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return LlamaForCausalLM.from_pretrained(path)


def trl_prepare_and_collate(
    rows, tokenizer, model, output_dir, max_length=1024, truncation_mode="keep_start"
):
    """Run TRL's DPOTrainer preparation on `rows`; return its prepared id rows and its collated batch of all rows."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # keep_end's deprecation FutureWarning
        args = DPOConfig(
            output_dir=str(output_dir),
            bf16=False,
            report_to=[],
            max_length=max_length,
            truncation_mode=truncation_mode,
        )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=copy.deepcopy(tokenizer),  # TRL sets pad_token = eos on tokenizers without one
    )
    prepared = [{key: row[key] for key in ID_KEYS} for row in trainer.train_dataset]
    batch = trainer.data_collator(prepared) if prepared else None
    return prepared, batch, trainer.data_collator.pad_token_id


def assert_batches_equal(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key


# ---------------------------------------------------------------------------------------------------------------
# Datasets in the seeds' schemas ("<EOS>" is replaced by the tokenizer's eos token)
# ---------------------------------------------------------------------------------------------------------------


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


TEXT_EXPLICIT = [
    {
        "prompt": "Human: What color is the sky?\n\nAssistant:",
        "chosen": " It is blue.",
        "rejected": " It is green.",
    },
    {
        "prompt": "The sun is ",
        "chosen": "bright.",
        "rejected": "dark.<EOS>",
    },  # EOS already present: not doubled
    {
        "prompt": "Assistant: S",
        "chosen": "ure thing.",
        "rejected": "orry about that.",
    },  # merges across the boundary
    {"prompt": "Name a fruit.", "chosen": " Apple.<EOS>", "rejected": " Apple. Also banana."},
]
HH_RLHF = [  # Anthropic/hh-rlhf: the dialogue is inside chosen and rejected
    {
        "chosen": "\n\nHuman: What color is the sky?\n\nAssistant: It is blue.",
        "rejected": "\n\nHuman: What color is the sky?\n\nAssistant: It is green.",
    },
    {  # differs mid-word: prompt ends "Assistant: S", and " S" + "ure" merge into " Sure"
        "chosen": "\n\nHuman: Can you help me?\n\nAssistant: Sure, happy to help.",
        "rejected": "\n\nHuman: Can you help me?\n\nAssistant: Sorry, I can't.",
    },
    {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: How are you?\n\nAssistant: I am fine.",
        "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: How are you?\n\nAssistant: Go away.",
    },
    {  # chosen is a prefix of rejected: TRL splits one character before the end of chosen
        "chosen": "\n\nHuman: Name a fruit.\n\nAssistant: Apple.",
        "rejected": "\n\nHuman: Name a fruit.\n\nAssistant: Apple. Also banana.",
    },
]
CONV_EXPLICIT = [  # prompt as messages, chosen/rejected the assistant answer only
    {
        "prompt": [system("Be brief."), user("What color is the sky?")],
        "chosen": [assistant("It is blue.")],
        "rejected": [assistant("It is green.")],
    },
    {
        "prompt": [user("Can you help me?")],
        "chosen": [assistant("Sure.")],
        "rejected": [assistant("Sorry, no.")],
    },
    {
        "prompt": [user("hi"), assistant("hello"), user("How are you?")],
        "chosen": [assistant("I am fine.")],
        "rejected": [assistant("Go away.")],
    },
]
CONV_IMPLICIT = [  # trl-lib/ultrafeedback_binarized: whole conversations, the prompt is the shared messages
    {
        "chosen": [user("What color is the sky?"), assistant("It is blue.")],
        "rejected": [user("What color is the sky?"), assistant("It is green.")],
    },
    {
        "chosen": [
            system("Be brief."),
            user("hi"),
            assistant("hello"),
            user("How are you?"),
            assistant("Fine."),
        ],
        "rejected": [
            system("Be brief."),
            user("hi"),
            assistant("hello"),
            user("How are you?"),
            assistant("Bad."),
        ],
    },
    {  # chosen is a prefix of rejected: the prompt is all of chosen but its last message
        "chosen": [user("Name a fruit."), assistant("Apple.")],
        "rejected": [user("Name a fruit."), assistant("Apple."), user("Another?"), assistant("Banana.")],
    },
]
SCENARIOS = {
    "text_explicit": TEXT_EXPLICIT,
    "text_implicit_hh_rlhf": HH_RLHF,
    "conv_explicit": CONV_EXPLICIT,
    "conv_implicit": CONV_IMPLICIT,
}


def with_eos(rows, eos_token):
    return [
        {
            key: value.replace("<EOS>", eos_token) if isinstance(value, str) else value
            for key, value in row.items()
        }
        for row in rows
    ]


# ---------------------------------------------------------------------------------------------------------------
# Parity with TRL
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer_name", list(TOKENIZERS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_prepare_and_collate_match_trl(scenario, tokenizer_name, tiny_model, tmp_path):
    """Same prepared ids as `trainer.train_dataset` and the same batch as `trainer.data_collator`, every schema
    x tokenizer (ChatML, pad == eos, BOS post-processor, shipped). max_length is large: nothing dropped or cut."""
    tokenizer = TOKENIZERS[tokenizer_name]
    rows = with_eos(SCENARIOS[scenario], tokenizer.eos_token)
    theirs, their_batch, their_pad_id = trl_prepare_and_collate(rows, tokenizer, tiny_model, tmp_path)

    ours, report = prepare_dpo_dataset(rows, tokenizer, max_length=1024)
    assert ours == theirs
    assert report.kept_rows == list(range(len(rows))) and not report.dropped_prompt_too_long
    assert resolve_pad_token_id(tokenizer) == their_pad_id
    assert_batches_equal(collate_dpo(ours, their_pad_id, max_length=1024), their_batch)


def test_bos_tokenizer_puts_bos_in_prompt_ids():
    """Text prompts are tokenized with special tokens: the Llama-like post-processor's BOS starts prompt_ids, and
    only there (prompt+completion is one encoding, so BOS is not repeated before the completion)."""
    tokenizer = TOKENIZERS["llama_bos"]
    ours, _ = prepare_dpo_dataset(with_eos(TEXT_EXPLICIT, "</s>"), tokenizer)
    bos = tokenizer.bos_token_id
    for example in ours:
        assert example["prompt_ids"][0] == bos and bos not in example["prompt_ids"][1:]
        assert bos not in example["chosen_ids"] and example["chosen_ids"][-1] == tokenizer.eos_token_id


def test_text_eos_appended_once():
    """EOS is appended to text completions unless already there: TEXT_EXPLICIT row 1 rejected is "dark.<EOS>",
    so it ends in exactly one EOS id, like the chosen that got one appended."""
    tokenizer = TOKENIZERS["chatml"]
    ours, _ = prepare_dpo_dataset(with_eos(TEXT_EXPLICIT, tokenizer.eos_token), tokenizer)
    eos = tokenizer.eos_token_id
    for completion in (ours[1]["chosen_ids"], ours[1]["rejected_ids"]):
        assert completion[-1] == eos and completion.count(eos) == 1


def test_boundary_merge_moves_token_into_completion():
    """hh-rlhf row 1 differs mid-word, so the extracted prompt ends "Assistant: S". " S" alone is one token but
    " Sure" is one token too, so the tokenized prompt is not a prefix of prompt+chosen: TRL (and we) cut prompt_ids
    before " S" and the completion starts with " Sure". The report lists the row."""
    tokenizer = TOKENIZERS["chatml"]
    ours, report = prepare_dpo_dataset(HH_RLHF, tokenizer)
    assert report.prompt_boundary_rows == [1]
    assert tokenizer.decode(ours[1]["prompt_ids"]).endswith("Assistant:")
    assert tokenizer.convert_ids_to_tokens(ours[1]["chosen_ids"][:1]) == ["ĠSure"]
    assert tokenizer.convert_ids_to_tokens(ours[1]["rejected_ids"][:1]) == ["ĠSorry"]


def test_conversational_completion_is_rendered_assistant_turn():
    """With ChatML the prompt ends with the generation prompt "<|im_start|>assistant\\n" and the completion is
    the rest of the rendered conversation: "It is blue.<|im_end|>\\n" (no extra EOS appended)."""
    tokenizer = TOKENIZERS["chatml"]
    ours, report = prepare_dpo_dataset(CONV_EXPLICIT, tokenizer)
    assert report.conversational and report.prompt_source == "column"
    assert tokenizer.decode(ours[0]["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(ours[0]["chosen_ids"]) == "It is blue.<|im_end|>\n"


def test_ultrafeedback_h4_text_prompt_with_conversations(tiny_model, tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized has a text `prompt` next to whole conversations. TRL's
    `maybe_extract_prompt` ignores such a prompt and extracts from the messages; we do the same, so the result
    equals TRL on the same rows without the prompt column. (TRL 1.16 DPOTrainer itself crashes on these rows.)"""
    tokenizer = TOKENIZERS["chatml"]
    h4_rows = [{"prompt": row["chosen"][-2]["content"], **row} for row in CONV_IMPLICIT]
    theirs, their_batch, pad_id = trl_prepare_and_collate(CONV_IMPLICIT, tokenizer, tiny_model, tmp_path)

    ours, report = prepare_dpo_dataset(h4_rows, tokenizer)
    assert report.prompt_source == "extracted_ignoring_prompt_column"
    assert ours == theirs
    assert_batches_equal(collate_dpo(ours, pad_id, max_length=1024), their_batch)
    # TRL 1.16 fails on this schema (AttributeError or TypeError depending on set order): why we do not mirror it.
    with pytest.raises((AttributeError, TypeError)):
        trl_prepare_and_collate(h4_rows, tokenizer, tiny_model, tmp_path)


# --- truncation -------------------------------------------------------------------------------------------------

TRUNCATION_ROWS = [
    {
        "prompt": "Hi.",
        "chosen": " Sure, happy to help. " * 4,
        "rejected": " Sorry.",
    },  # short prompt, long chosen
    {
        "prompt": "The sun is bright and the answer is yes. " * 3,
        "chosen": " Yes.",
        "rejected": " No.",
    },  # long prompt
    {"prompt": "Name a fruit.", "chosen": " Apple.", "rejected": " Banana."},  # short everything
]


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
def test_truncation_matches_trl_and_reports_drops(truncation_mode, tiny_model, tmp_path):
    """max_length = the long prompt's token count (row 1). keep_start: TRL drops row 1 (prompt >= max_length)
    silently; we drop the same row and list it, and row 0 (long chosen) is listed as truncated. keep_end drops
    nothing. In both modes the collated, truncated batch equals TRL's."""
    tokenizer = TOKENIZERS["chatml"]
    untruncated, _ = prepare_dpo_dataset(TRUNCATION_ROWS, tokenizer, max_length=None)
    max_length = len(untruncated[1]["prompt_ids"])
    assert max_length > len(untruncated[0]["prompt_ids"]) + len(
        untruncated[0]["rejected_ids"]
    )  # row 0 rejected fits
    assert (
        len(untruncated[0]["prompt_ids"]) + len(untruncated[0]["chosen_ids"]) > max_length
    )  # row 0 chosen is cut

    theirs, their_batch, pad_id = trl_prepare_and_collate(
        TRUNCATION_ROWS,
        tokenizer,
        tiny_model,
        tmp_path,
        max_length=max_length,
        truncation_mode=truncation_mode,
    )
    ours, report = prepare_dpo_dataset(
        TRUNCATION_ROWS, tokenizer, max_length=max_length, truncation_mode=truncation_mode
    )
    assert ours == theirs
    ours_batch = collate_dpo(ours, pad_id, max_length=max_length, truncation_mode=truncation_mode)
    assert_batches_equal(ours_batch, their_batch)
    assert ours_batch["input_ids"].shape[1] == max_length
    if truncation_mode == "keep_start":
        assert report.dropped_prompt_too_long == [1] and report.kept_rows == [0, 2]
        assert report.truncated_rows == [0]
        assert "1 row dropped (1 prompt of max_length tokens or more; first: [1])" in report.summary()
    else:
        assert report.dropped_prompt_too_long == [] and report.kept_rows == [0, 1, 2]
        assert report.truncated_rows == [0, 1]


def test_all_rows_dropped_raises():
    """max_length=1 with keep_start: every prompt has >= 1 token, so all rows would be dropped (TRL: an empty
    dataset); we raise and tell the user to raise max_length."""
    with pytest.raises(DataError, match=r"All 3 preference rows .*raise --max_length"):
        prepare_dpo_dataset(TRUNCATION_ROWS, TOKENIZERS["chatml"], max_length=1)


# --- collator ---------------------------------------------------------------------------------------------------


def test_collate_golden_values():
    """TRL's DataCollatorForPreference docstring example, by hand: rows are [prompt+chosen] x2 then
    [prompt+rejected] x2, right-padded with 0; completion_mask marks only chosen/rejected tokens."""
    examples = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
        {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]},
    ]
    batch = collate_dpo(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 4, 5],
        [7, 8, 9, 0, 0],
        [1, 2, 3, 6, 0],
        [7, 8, 10, 11, 0],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
    ]
    assert batch["completion_mask"].tolist() == [
        [0, 0, 0, 1, 1],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 1, 1, 0],
    ]


def test_collate_pad_equal_eos_keeps_eos_in_masks():
    """pad == eos == 5: the chosen row [1, 2 | 3, 5] ends in a real EOS and the rejected row [1, 2 | 5] is padded
    with 5. Masks come from lengths, so the real EOS is in both masks and the pad is in neither."""
    batch = collate_dpo([{"prompt_ids": [1, 2], "chosen_ids": [3, 5], "rejected_ids": [5]}], pad_token_id=5)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 5], [1, 2, 5, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 1, 0]]


@pytest.mark.parametrize(
    ("max_length", "truncation_mode", "pad_to_multiple_of"),
    [
        (None, "keep_start", None),
        (4, "keep_start", None),
        (3, "keep_end", None),
        (2, "keep_end", 8),
        (5, "keep_start", 4),
    ],
)
def test_collate_matches_trl_collator_with_ref_logps(max_length, truncation_mode, pad_to_multiple_of):
    """Against TRL's collator directly, including keep_end cutting into the prompt, max_length shorter than a
    prompt, padding to a multiple, and the precomputed `ref_chosen_logps`/`ref_rejected_logps` passthrough
    (float32 (B,) tensors)."""
    examples = [
        {
            "prompt_ids": [1, 2, 3, 4],
            "chosen_ids": [5, 6],
            "rejected_ids": [7],
            "ref_chosen_logps": -1.25,
            "ref_rejected_logps": -3.5,
            "prompt": "ignored",
        },
        {
            "prompt_ids": [8],
            "chosen_ids": [9, 10, 11, 12, 13],
            "rejected_ids": [14, 15],
            "ref_chosen_logps": -2.0,
            "ref_rejected_logps": -0.5,
            "prompt": "ignored",
        },
    ]
    theirs = DataCollatorForPreference(
        pad_token_id=0,
        max_length=max_length,
        truncation_mode=truncation_mode,
        pad_to_multiple_of=pad_to_multiple_of,
    )(examples)
    ours = collate_dpo(examples, 0, max_length, truncation_mode, pad_to_multiple_of=pad_to_multiple_of)
    assert_batches_equal(ours, theirs)
    assert (
        ours["ref_chosen_logps"].tolist() == [-1.25, -2.0] and ours["ref_chosen_logps"].dtype == torch.float32
    )


def test_resolve_pad_token_id_falls_back_to_eos():
    """The Llama-like tokenizer has no pad token: like TRL, pad with EOS ("</s>"). ChatML has "<|pad|>"."""
    assert resolve_pad_token_id(TOKENIZERS["llama_bos"]) == TOKENIZERS["llama_bos"].convert_tokens_to_ids(
        "</s>"
    )
    assert resolve_pad_token_id(TOKENIZERS["chatml"]) == TOKENIZERS["chatml"].convert_tokens_to_ids("<|pad|>")


# --- prompt extraction ------------------------------------------------------------------------------------------

EXTRACTION_CASES = [
    ("Q: sky?\nA: It is blue.", "Q: sky?\nA: It is green."),  # space before the split moves into completions
    ("Q: hi\nA: Sure.", "Q: hi\nA: Sorry."),  # mid-word split
    ("Q: fruit?\nA: Apple.", "Q: fruit?\nA: Apple. And pear."),  # prefix: split one before the end of chosen
    ("Q: fruit?\nA: Apple. And pear.", "Q: fruit?\nA: Apple."),  # prefix the other way round
    ([user("a"), assistant("b")], [user("a"), assistant("c")]),
    ([user("a"), assistant("b")], [user("a"), assistant("b"), user("d"), assistant("e")]),
]


@pytest.mark.parametrize(("chosen", "rejected"), EXTRACTION_CASES)
def test_extract_implicit_prompt_matches_trl(chosen, rejected):
    """Same (prompt, chosen, rejected) as `trl.data_utils.extract_prompt`, including its prefix quirk."""
    expected = trl_extract_prompt({"chosen": chosen, "rejected": rejected})
    assert extract_implicit_prompt(chosen, rejected) == (
        expected["prompt"],
        expected["chosen"],
        expected["rejected"],
    )


def test_extract_implicit_prompt_space_rule_value():
    """By hand: differ at "b"/"g" after "It is "; the space before moves, prompt "A: It is", chosen " blue"."""
    assert extract_implicit_prompt("A: It is blue", "A: It is green") == ("A: It is", " blue", " green")


# ---------------------------------------------------------------------------------------------------------------
# Errors: each names the row and field
# ---------------------------------------------------------------------------------------------------------------

GOOD_TEXT = {"prompt": "Q?", "chosen": " yes", "rejected": " no"}
GOOD_CONV = {"prompt": [user("Q?")], "chosen": [assistant("yes")], "rejected": [assistant("no")]}


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        (
            {"prompt": "Q?", "answer": "yes"},
            r"no 'chosen' / 'rejected' column \(columns found: \['answer', 'prompt'\]\)",
        ),
        ({**GOOD_TEXT, "chosen": ""}, r"Row 1: field 'chosen' is empty"),
        ({**GOOD_TEXT, "rejected": "   "}, r"Row 1: field 'rejected' is empty"),
        ({**GOOD_TEXT, "prompt": None}, r"Row 1: field 'prompt' is missing"),
        ({**GOOD_TEXT, "chosen": 3}, r"Row 1: field 'chosen' must be a string, got int"),
        ({**GOOD_TEXT, "rejected": " yes"}, r"Row 1: chosen and rejected are identical"),
        ({**GOOD_TEXT, "chosen": " no<|im_end|>"}, r"Row 1: chosen and rejected tokenize to the same ids"),
        (
            {**GOOD_TEXT, "chosen": [assistant("yes")]},
            r"Row 1: field 'chosen' is a message list but row 0 is plain",
        ),
        ({"chosen": "yes", "rejected": "no"}, r"Row 1: lacks a 'prompt' field unlike row 0"),
    ],
)
def test_text_row_errors(bad_row, message):
    """A bad row after a good one: the error names row 1 (0-based) and the field."""
    tokenizer = TOKENIZERS["chatml"]
    rows = [GOOD_TEXT, bad_row] if "chosen" in bad_row else [bad_row]
    with pytest.raises(DataError, match=message):
        prepare_dpo_dataset(rows, tokenizer)


def test_missing_columns_lists_accepted_schemas():
    """The message lists the columns found and the accepted schemas, so the user can rename columns."""
    with pytest.raises(
        DataError, match=r"no 'rejected' column .*accepted schemas: prompt/chosen/rejected as text"
    ):
        prepare_dpo_dataset([{"prompt": "Q?", "chosen": "yes"}], TOKENIZERS["chatml"])


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        (
            {**GOOD_CONV, "chosen": [{"role": "bot", "content": "yes"}]},
            r"Row 1: chosen\[0\] has unknown role 'bot'",
        ),
        ({**GOOD_CONV, "rejected": [assistant("")]}, r"Row 1: rejected\[0\] \(assistant\) has empty content"),
        (
            {**GOOD_CONV, "chosen": [assistant(None)]},
            r"Row 1: chosen\[0\] \(assistant\) has no 'content'",
        ),
        ({**GOOD_CONV, "prompt": []}, r"Row 1: field 'prompt' must be a non-empty list of \{role, content\} messages"),
        (
            {**GOOD_CONV, "chosen": "yes"},
            r"Row 1: field 'chosen' is plain text but the dataset is conversational",
        ),
        ({**GOOD_CONV, "rejected": [assistant("yes")]}, r"Row 1: chosen and rejected are identical"),
        (  # the prompt repeated inside chosen (whole conversation given next to a messages prompt)
            {**GOOD_CONV, "chosen": [user("Q?"), assistant("yes")]},
            r"Row 1: field 'chosen' \(the completion after the prompt\) starts with a 'user' message, expected 'assistant'",
        ),
    ],
)
def test_conversation_row_errors(bad_row, message):
    with pytest.raises(DataError, match=message):
        prepare_dpo_dataset([GOOD_CONV, bad_row], TOKENIZERS["chatml"])


def test_implicit_prompt_needs_common_prefix():
    """Conversations that differ at their first message, or texts at their first character, have no prompt."""
    conv = {"chosen": [user("a"), assistant("b")], "rejected": [user("x"), assistant("b")]}
    with pytest.raises(DataError, match=r"Row 0: chosen and rejected share no leading message"):
        prepare_dpo_dataset([conv], TOKENIZERS["chatml"])
    with pytest.raises(DataError, match=r"Row 0: chosen and rejected share no leading text"):
        prepare_dpo_dataset([{"chosen": "yes", "rejected": "no"}], TOKENIZERS["chatml"])


def test_conversations_diverging_at_user_turn_rejected():
    """Implicit extraction that leaves a user message at the start of a completion would train on user text."""
    row = {
        "chosen": [user("a"), assistant("b"), user("c"), assistant("d")],
        "rejected": [user("a"), assistant("b"), user("X"), assistant("d")],
    }
    with pytest.raises(
        DataError, match=r"Row 0: field 'chosen' \(the completion after the prompt\) starts with a 'user'"
    ):
        prepare_dpo_dataset([row], TOKENIZERS["chatml"])


def test_prompt_messages_with_text_completions_rejected():
    row = {"prompt": [user("Q?")], "chosen": "yes", "rejected": "no"}
    with pytest.raises(
        DataError, match=r"Row 0: field 'prompt' is a message list but chosen/rejected are plain text"
    ):
        prepare_dpo_dataset([row], TOKENIZERS["chatml"])


def test_identical_pairs_can_be_skipped_and_counted():
    """skip_identical_pairs=True: rows 1 (raw equal) and 2 (equal once EOS is appended) are skipped and listed;
    the other rows are prepared as usual."""
    tokenizer = TOKENIZERS["chatml"]
    rows = [GOOD_TEXT, {**GOOD_TEXT, "rejected": " yes"}, {**GOOD_TEXT, "chosen": " no<|im_end|>"}, GOOD_TEXT]
    ours, report = prepare_dpo_dataset(rows, tokenizer, skip_identical_pairs=True)
    assert report.skipped_identical == [1, 2] and report.kept_rows == [0, 3] and len(ours) == 2
    assert ours[0] == prepare_dpo_dataset([GOOD_TEXT], tokenizer)[0][0]
    with pytest.raises(DataError, match="No preference row is left: all 1 rows have chosen == rejected"):
        prepare_dpo_dataset([rows[1]], tokenizer, skip_identical_pairs=True)


def test_tokenizer_without_chat_template_rejected_for_conversations():
    tokenizer = copy.deepcopy(TOKENIZERS["chatml"])
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="conversational .* the tokenizer has no chat template"):
        prepare_dpo_dataset([GOOD_CONV], tokenizer)


def test_template_that_drops_assistant_text_rejected():
    """A template that renders no assistant turns leaves chosen with zero tokens: no signal, so an error."""
    tokenizer = copy.deepcopy(TOKENIZERS["chatml"])
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(DataError, match=r"Row 0: field 'chosen' \(the completion\) renders to no tokens"):
        prepare_dpo_dataset([GOOD_CONV], tokenizer)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"truncation_mode": "keep_middle"}, "--truncation_mode keep_middle: must be one of"),
        ({"max_length": 0}, "max_length must be a positive integer or None"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(DataError, match=message):
        prepare_dpo_dataset([GOOD_TEXT], TOKENIZERS["chatml"], **kwargs)


def test_empty_dataset_and_tokenizer_without_eos():
    with pytest.raises(DataError, match="The preference dataset has no rows"):
        prepare_dpo_dataset([], TOKENIZERS["chatml"])
    tokenizer = copy.deepcopy(TOKENIZERS["chatml"])
    tokenizer.eos_token = None
    with pytest.raises(DataError, match="The tokenizer has no eos_token"):
        prepare_dpo_dataset([GOOD_TEXT], tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# --dataset_column_map for preference data
# ---------------------------------------------------------------------------------------------------------------

ULTRAFEEDBACK = [  # argilla/ultrafeedback-binarized-preferences columns (ratings kept, unused)
    {"instruction": "What color is the sky?", "chosen_response": "It is blue.", "rejected_response": "It is green.",
     "chosen_rating": 5.0, "rejected_rating": 2.0},
    {"instruction": "Name a fruit.", "chosen_response": "Apple.", "rejected_response": "A carrot.",
     "chosen_rating": 4.0, "rejected_rating": 1.0},
]


@pytest.mark.parametrize("as_dataset", [False, True])
def test_column_map_renames_ultrafeedback_columns(as_dataset):
    """`instruction=prompt chosen_response=chosen rejected_response=rejected` (issue 10's command): the same ids as
    the same rows written with prompt/chosen/rejected text columns."""
    tokenizer = TOKENIZERS["chatml"]
    rows = datasets.Dataset.from_list(ULTRAFEEDBACK) if as_dataset else copy.deepcopy(ULTRAFEEDBACK)
    mapped = normalize_dpo_columns(rows, ["instruction=prompt", "chosen_response=chosen", "rejected_response=rejected"])
    explicit = [{"prompt": row["instruction"], "chosen": row["chosen_response"], "rejected": row["rejected_response"]}
                for row in ULTRAFEEDBACK]
    assert prepare_dpo_dataset(mapped, tokenizer)[0] == prepare_dpo_dataset(explicit, tokenizer)[0]


@pytest.mark.parametrize("as_dataset", [False, True])
def test_ultrafeedback_preset_builds_conversations(as_dataset):
    """The preset makes the instruction a user message and the answers assistant messages (trl-lib's form):
    prompt_ids end with the generation prompt and chosen_ids are the rendered answer "It is blue.<|im_end|>\\n"."""
    tokenizer = TOKENIZERS["chatml"]
    rows = datasets.Dataset.from_list(ULTRAFEEDBACK) if as_dataset else copy.deepcopy(ULTRAFEEDBACK)
    mapped = normalize_dpo_columns(rows, "ultrafeedback-binarized-preferences")
    ours, report = prepare_dpo_dataset(mapped, tokenizer)
    explicit = [{"prompt": [user(row["instruction"])], "chosen": [assistant(row["chosen_response"])],
                 "rejected": [assistant(row["rejected_response"])]} for row in ULTRAFEEDBACK]
    assert ours == prepare_dpo_dataset(explicit, tokenizer)[0]
    assert report.conversational and report.prompt_source == "column"
    assert tokenizer.decode(ours[0]["chosen_ids"]) == "It is blue.<|im_end|>\n"


@pytest.mark.parametrize("as_dataset", [False, True])
def test_hh_rlhf_preset_builds_dialogues(as_dataset):
    """hh-rlhf's "\\n\\nHuman: ... \\n\\nAssistant: ..." texts become messages; the prompt is the shared leading
    turns (row 2: two user and one assistant turn), the completion the last assistant turn."""
    tokenizer = TOKENIZERS["chatml"]
    rows = datasets.Dataset.from_list(HH_RLHF) if as_dataset else copy.deepcopy(HH_RLHF)
    mapped = normalize_dpo_columns(rows, ["hh-rlhf"])
    assert mapped[2]["chosen"] == [user("hi"), assistant("hello"), user("How are you?"), assistant("I am fine.")]
    ours, report = prepare_dpo_dataset(mapped, tokenizer)
    assert report.prompt_source == "extracted" and report.kept_rows == [0, 1, 2, 3]
    assert tokenizer.decode(ours[2]["prompt_ids"]).endswith("How are you?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(ours[2]["chosen_ids"]) == "I am fine.<|im_end|>\n"


@pytest.mark.parametrize(
    ("rows", "spec", "message"),
    [
        (ULTRAFEEDBACK, ["question=prompt", "chosen_response=chosen", "rejected_response=rejected"],
         r"no column 'question' \(columns: \['instruction', 'chosen_response'"),
        (ULTRAFEEDBACK, ["instruction=completion"], "'completion' is not a DPO column"),
        (ULTRAFEEDBACK, "gsm8k", r"unknown preset \(it is a --method sft preset\)"),
        ([{"prompt": "x", "chosen": "a"}], "ultrafeedback-binarized-preferences",
         r"needs the columns \['instruction', 'chosen_response', 'rejected_response'\]"),
        ([{"chosen": "Human: hi", "rejected": "\n\nHuman: hi\n\nAssistant: no"}], "hh-rlhf",
         "Row 0: field 'chosen' is not an hh-rlhf dialogue"),
    ],
)
def test_column_map_errors(rows, spec, message):
    with pytest.raises(DataError, match=message):
        normalize_dpo_columns(copy.deepcopy(rows), spec)


def test_engine_applies_the_column_map_for_dpo():
    """The map given to train.py reaches DPO preparation (it used to be accepted and ignored)."""
    from engine.config import parse_config
    from engine.dpo import DPOMethod

    config = parse_config(["--method", "dpo", "--dataset_column_map", "ultrafeedback-binarized-preferences"])
    method = DPOMethod(config, TOKENIZERS["chatml"], accelerator=None)
    examples, report = method.prepare(datasets.Dataset.from_list(ULTRAFEEDBACK), split_name="train")
    assert report.num_kept == 2 and report.conversational
    assert TOKENIZERS["chatml"].decode(examples[1]["chosen_ids"]) == "Apple.<|im_end|>\n"
