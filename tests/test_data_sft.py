"""SFT data preparation and collation must equal TRL 1.16's, token for token.

Each parity case runs TRL's own `SFTTrainer.__init__` (which calls `_prepare_dataset`) on the same rows and
settings, reads `trainer.train_dataset` and `trainer.data_collator`, and asserts that our `input_ids`, `labels`,
packed `position_ids` and collated batch are identical. Tokenizers are built here (a ChatML one with
`{% generation %}`, one whose pad token is its EOS, a Llama-like one whose post-processor adds a BOS) and the
shipped one from `data/assets/tokenizer` is used too.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from data.collate import collate_sft
from data.common import resolve_pad_token_id
from data.defaults import DEFAULT_SFT_DATASET, DEFAULT_TOKENIZER_DIR
from data.packing import best_fit_decreasing, pack_examples
from data.sft import prepare_sft_dataset

logging.getLogger("datasets").setLevel(logging.ERROR)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What color is the sky? The sky is blue on a clear day.",
    "Hello world! How are you today? I am fine, thank you.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "user assistant system think answer question compute what is",
] * 10

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama-like: the template writes the BOS itself (apply_chat_template adds no special tokens), while plain
# `tokenizer(text)` gets it from the post-processor.
BOS_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '[' + message['role'] + '] ' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
)


def build_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (300 tokens) trained on CORPUS: "chatml", "pad_eos" or "bos"."""
    specials = ["<s>", "</s>"] if kind == "bos" else ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    ))
    if kind == "bos":
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
        )
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
        fast.chat_template = BOS_TEMPLATE
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        pad = "<|im_end|>" if kind == "pad_eos" else "<|pad|>"
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token=pad)
        fast.chat_template = CHATML_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, PreTrainedTokenizerFast]:
    return {
        "chatml": build_tokenizer("chatml"),
        "pad_eos": build_tokenizer("pad_eos"),
        "bos": build_tokenizer("bos"),
        "shipped": AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER_DIR),
    }


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> LlamaForCausalLM:
    """A tiny Llama saved to disk and reloaded; TRL only needs it to build the trainer."""
    config = LlamaConfig(vocab_size=2048, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return LlamaForCausalLM.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------- data

TEXT_ROWS = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"text": "Hello world!"},
    {"text": "What color is the sky? The sky is blue on a clear day. " * 3},
    {"text": "Natalia sold clips.<|im_end|>"},  # already ends with the ChatML EOS: not doubled
    {"text": "I am fine</s>"},  # already ends with the BOS tokenizer's EOS
]

MESSAGES_ROWS = [
    {"messages": [{"role": "user", "content": "What color is the sky?"},
                  {"role": "assistant", "content": "The sky is blue."}]},
    {"messages": [{"role": "system", "content": "You are a fox."},
                  {"role": "user", "content": "Hello world!"},
                  {"role": "assistant", "content": "Hello! How are you today?"},
                  {"role": "user", "content": "I am fine, thank you."},
                  {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."}]},
    {"messages": [{"role": "user", "content": "Natalia sold clips to 48 of her friends in April. " * 4},
                  {"role": "assistant", "content": "48"}]},
]

CONVERSATIONS_ROWS = [
    {"conversations": [{"from": message["role"], "value": message["content"]} for message in row["messages"]]}
    for row in MESSAGES_ROWS
]

PROMPT_COMPLETION_ROWS = [
    {"prompt": "What color is the sky?", "completion": " The sky is blue."},
    {"prompt": "The sky is ", "completion": "blue."},  # " blue" merges across the boundary
    {"prompt": "Hello world! " * 6, "completion": "How are you today?<|im_end|>"},
    {"prompt": "Natalia sold clips to", "completion": " 48 of her friends."},
]

PROMPT_COMPLETION_CHAT_ROWS = [
    {"prompt": [{"role": "user", "content": "What color is the sky?"}],
     "completion": [{"role": "assistant", "content": "The sky is blue."}]},
    {"prompt": [{"role": "system", "content": "You are a fox."}, {"role": "user", "content": "Hello world! " * 5}],
     "completion": [{"role": "assistant", "content": "How are you today?"}]},
    {"prompt": [{"role": "user", "content": "Natalia sold clips."},
                {"role": "assistant", "content": "How many?"},
                {"role": "user", "content": "48 of her friends."}],
     "completion": [{"role": "assistant", "content": "The quick brown fox."}]},
]

TOKENIZED_ROWS = [
    {"input_ids": [5, 6, 7, 8, 9, 10]},
    {"input_ids": [11, 12]},
    {"input_ids": [13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]},
]
TOKENIZED_LABELED_ROWS = [
    {"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, -100, 7, 8, 9, 10]},
    {"input_ids": [11, 12, 13], "labels": [-100, -100, -100]},  # no target token: TRL drops it
    {"input_ids": [13, 14, 15, 16], "labels": [-100, 14, 15, 16]},
]

SHIPPED_ROWS = [
    {"messages": [{"role": "system", "content": "You are a helpful assistant. /no_think"},
                  {"role": "user", "content": "What is 95 - 31?"},
                  {"role": "assistant", "content": "95 - 31 = 64."}]},
    {"messages": [{"role": "user", "content": "What is the opposite of big?"},
                  {"role": "assistant", "content": "<think>\nbig and small.\n</think>\nThe opposite is small."}]},
]

ROWS = {
    "text": TEXT_ROWS, "messages": MESSAGES_ROWS, "conversations": CONVERSATIONS_ROWS,
    "pc_text": PROMPT_COMPLETION_ROWS, "pc_chat": PROMPT_COMPLETION_CHAT_ROWS, "tokenized": TOKENIZED_ROWS,
    "tokenized_labeled": TOKENIZED_LABELED_ROWS, "shipped": SHIPPED_ROWS,
}

# (id, tokenizer, rows, our keyword arguments). Each is compared with TRL run on the same rows and settings.
CASES = [
    ("text", "chatml", "text", {}),
    ("text_bos", "bos", "text", {}),
    ("text_pad_eos", "pad_eos", "text", {}),
    ("text_truncate", "chatml", "text", {"max_length": 12}),
    ("text_truncate_keep_end", "chatml", "text", {"max_length": 12, "truncation_mode": "keep_end"}),
    ("text_no_max_length", "bos", "text", {"max_length": None}),
    ("text_field", "chatml", "text", {"dataset_text_field": "body"}),
    ("text_shuffle", "chatml", "text", {"shuffle_seed": 3}),
    ("messages", "chatml", "messages", {}),
    ("messages_pad_eos", "pad_eos", "messages", {}),
    ("messages_bos", "bos", "messages", {}),
    ("messages_assistant_only", "chatml", "messages", {"assistant_only_loss": True}),
    ("messages_assistant_only_pad_eos", "pad_eos", "messages", {"assistant_only_loss": True}),
    ("messages_assistant_only_bos", "bos", "messages", {"assistant_only_loss": True}),
    ("messages_assistant_only_truncate", "chatml", "messages", {"assistant_only_loss": True, "max_length": 40}),
    ("conversations", "chatml", "conversations", {}),
    ("conversations_assistant_only", "chatml", "conversations", {"assistant_only_loss": True}),
    ("pc_text", "chatml", "pc_text", {}),
    ("pc_text_completion_only_off", "chatml", "pc_text", {"completion_only_loss": False}),
    ("pc_text_completion_only_on", "chatml", "pc_text", {"completion_only_loss": True}),
    ("pc_text_bos", "bos", "pc_text", {}),
    ("pc_text_truncate", "chatml", "pc_text", {"max_length": 10}),
    ("pc_chat", "chatml", "pc_chat", {}),
    ("pc_chat_completion_only_off", "chatml", "pc_chat", {"completion_only_loss": False}),
    ("pc_chat_assistant_only", "chatml", "pc_chat", {"assistant_only_loss": True}),
    ("pc_chat_assistant_only_no_completion_only", "chatml", "pc_chat",
     {"assistant_only_loss": True, "completion_only_loss": False}),
    ("pc_chat_bos", "bos", "pc_chat", {}),
    ("pc_chat_truncate", "chatml", "pc_chat", {"max_length": 70}),  # drops row 1 (85-token prompt)
    ("tokenized", "chatml", "tokenized", {"max_length": 8}),
    ("tokenized_labeled", "chatml", "tokenized_labeled", {}),
    ("pack_bfd_text", "chatml", "text", {"packing": True, "max_length": 48}),
    ("pack_bfd_text_bos", "bos", "text", {"packing": True, "max_length": 48}),
    ("pack_bfd_messages_assistant_only", "chatml", "messages",
     {"packing": True, "max_length": 160, "assistant_only_loss": True}),
    ("pack_bfd_pc_text", "pad_eos", "pc_text", {"packing": True, "max_length": 48}),
    ("pack_bfd_split", "chatml", "text", {"packing": True, "packing_strategy": "bfd_split", "max_length": 40}),
    ("pack_wrapped_text", "chatml", "text", {"packing": True, "packing_strategy": "wrapped", "max_length": 16}),
    ("pack_wrapped_pc_chat", "chatml", "pc_chat",
     {"packing": True, "packing_strategy": "wrapped", "max_length": 20}),
    ("pack_bfd_shuffle", "chatml", "text", {"packing": True, "max_length": 48, "shuffle_seed": 7}),
    ("pack_bfd_tokenized", "chatml", "tokenized", {"packing": True, "max_length": 8}),
    ("shipped_messages", "shipped", "shipped", {}),
    ("shipped_assistant_only", "shipped", "shipped", {"assistant_only_loss": True}),
    ("shipped_pack", "shipped", "shipped", {"packing": True, "max_length": 80, "assistant_only_loss": True}),
]


def run_trl(rows, tokenizer, model, output_dir, **kwargs):
    """TRL's prepared rows (signature columns only, as its dataloader passes them) and its data collator."""
    shuffle_seed = kwargs.pop("shuffle_seed", None)
    config = SFTConfig(
        output_dir=str(output_dir), bf16=False, report_to=[], shuffle_dataset=shuffle_seed is not None,
        seed=42 if shuffle_seed is None else shuffle_seed, **kwargs,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(copy.deepcopy(rows)),
                         processing_class=tokenizer)
    columns = [c for c in ("input_ids", "labels", "seq_lengths") if c in trainer.train_dataset.column_names]
    return trainer.train_dataset.select_columns(columns).to_list(), trainer.data_collator


def positions_from_seq_lengths(seq_lengths: list[int]) -> list[int]:
    return [position for length in seq_lengths for position in range(length)]


def assert_batches_equal(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert ours[key].dtype == value.dtype, key
            assert torch.equal(ours[key], value), key
        else:
            assert ours[key] == value, key


@pytest.mark.parametrize(("tokenizer_name", "rows_name", "kwargs"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_matches_trl(tokenizer_name, rows_name, kwargs, tokenizers, tiny_model, tmp_path):
    """Our examples and collated batch equal TRL's for the same rows, tokenizer and settings."""
    tokenizer = tokenizers[tokenizer_name]
    rows = ROWS[rows_name]
    if kwargs.get("dataset_text_field") == "body":
        rows = [{"body": row["text"]} for row in rows]
    ours, report = prepare_sft_dataset(copy.deepcopy(rows), tokenizer, **kwargs)
    trl_rows = rows
    if rows_name == "conversations" and kwargs.get("assistant_only_loss"):
        # TRL checks `assistant_only_loss` on the row before converting from/value and raises "not
        # conversational"; we support it, and it must equal TRL on the same conversations as messages.
        trl_rows = MESSAGES_ROWS
    theirs, trl_collator = run_trl(trl_rows, tokenizer, tiny_model, tmp_path, **kwargs)

    assert len(ours) == len(theirs) == report.num_examples
    for our_row, their_row in zip(ours, theirs, strict=True):
        assert our_row["input_ids"] == their_row["input_ids"]
        assert our_row["labels"] == their_row["labels"]
        if "seq_lengths" in their_row:  # bfd: TRL's collator derives positions from the document lengths
            assert our_row["position_ids"] == positions_from_seq_lengths(their_row["seq_lengths"])
    assert report.padding_free == trl_collator.padding_free
    if report.padding_free:  # the case must pack several documents into a row, or it tests no boundary
        assert any(0 in row["position_ids"][1:] for row in ours)

    # TRL batches with the pad token it settles on (pad, else EOS): ours must agree and give the same tensors.
    pad_token_id = resolve_pad_token_id(tokenizer)
    assert pad_token_id == trl_collator.pad_token_id
    for pad_to_multiple_of in (None, 8):
        trl_collator.pad_to_multiple_of = pad_to_multiple_of
        expected = trl_collator(copy.deepcopy(theirs))
        got = collate_sft(ours, pad_token_id, padding_free=report.padding_free,
                          pad_to_multiple_of=pad_to_multiple_of)
        assert_batches_equal(got, expected)


def test_eos_appended_once_and_kept_in_labels_when_pad_is_eos(tokenizers):
    """pad == eos: text rows end with exactly one EOS, and that EOS keeps its label and attention.

    Row 0 gets an EOS appended; row 3 already ends with "<|im_end|>" so it gets none (4 of 5 rows appended:
    row 4 ends with "</s>", which is not this tokenizer's EOS).
    """
    tokenizer = tokenizers["pad_eos"]
    examples, report = prepare_sft_dataset(copy.deepcopy(TEXT_ROWS), tokenizer)
    eos = tokenizer.eos_token_id
    assert report.num_eos_appended == 4
    for example in examples:
        assert example["input_ids"][-1] == eos and example["input_ids"][-2] != eos
        assert example["labels"][-1] == eos
    batch = collate_sft(examples, resolve_pad_token_id(tokenizer))
    short = min(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    length = len(examples[short]["input_ids"])
    assert batch["labels"][short, length - 1] == eos  # the real EOS is a target ...
    assert batch["attention_mask"][short, length - 1] == 1
    assert (batch["labels"][short, length:] == -100).all()  # ... the padding (same id) is not
    assert (batch["attention_mask"][short, length:] == 0).all()


def test_bos_tokenizer_single_bos(tokenizers):
    """The BOS post-processor adds one BOS to text; the chat template writes one itself: never two."""
    tokenizer = tokenizers["bos"]
    bos = tokenizer.bos_token_id
    for rows in (TEXT_ROWS, MESSAGES_ROWS, PROMPT_COMPLETION_ROWS):
        examples, _ = prepare_sft_dataset(copy.deepcopy(rows), tokenizer)
        for example in examples:
            assert example["input_ids"][0] == bos and example["input_ids"][1] != bos


def test_report_counts_truncation_drops_and_boundary_merges(tokenizers):
    """Prompt-completion with max_length 12 (ChatML tokenizer; prompts are 10, 4, 60 and 10 tokens):

    - row 2's prompt ("Hello world! " * 6) alone is longer than 12 tokens: truncated and then dropped because no
      completion token is left (TRL drops it silently; we count it);
    - row 1 ("The sky is " + "blue.") merges " blue" across the boundary: the prompt is not a token prefix.
    """
    tokenizer = tokenizers["chatml"]
    lengths = [len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) for r in PROMPT_COMPLETION_ROWS]
    examples, report = prepare_sft_dataset(copy.deepcopy(PROMPT_COMPLETION_ROWS), tokenizer, max_length=12)
    assert [len(tokenizer(row["prompt"])["input_ids"]) for row in PROMPT_COMPLETION_ROWS] == [10, 4, 60, 10]
    # + 1: the appended EOS (row 2 already ends with it)
    assert report.num_truncated == sum(length + (i != 2) > 12 for i, length in enumerate(lengths))
    assert report.num_dropped == 1 and report.dropped_rows == [2]
    assert report.dropped_reasons == {"no target token left after truncation to max_length": 1}
    assert report.num_prompt_not_prefix == 1
    assert report.completion_only_loss is True
    assert len(examples) == 3 and report.num_examples == 3
    assert "1 row dropped (1 no target token left after truncation to max_length; first: [2])" in report.summary()


def test_sharegpt_roles_map_to_user_and_assistant(tokenizers):
    """Deliberate difference from TRL: `human`/`gpt` in a conversations column are `user`/`assistant`,
    so the result equals the messages version exactly (TRL would render a `human` turn)."""
    tokenizer = tokenizers["chatml"]
    sharegpt = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                    "value": m["content"]} for m in row["messages"]]} for row in MESSAGES_ROWS]
    ours, _ = prepare_sft_dataset(sharegpt, tokenizer, assistant_only_loss=True)
    reference, _ = prepare_sft_dataset(copy.deepcopy(MESSAGES_ROWS), tokenizer, assistant_only_loss=True)
    assert ours == reference
    # A conversations column with role/content keys (TRL: KeyError 'text') reads like messages too.
    role_content = [{"conversations": row["messages"]} for row in copy.deepcopy(MESSAGES_ROWS)]
    assert prepare_sft_dataset(role_content, tokenizer, assistant_only_loss=True)[0] == reference


def test_chat_template_kwargs_and_tools_columns_match_trl(tokenizers, tiny_model, tmp_path):
    """`chat_template_kwargs` reaches the template as in TRL: enable_thinking=False inserts the empty think block."""
    tokenizer = tokenizers["shipped"]
    rows = [{**row, "chat_template_kwargs": {"enable_thinking": False}} for row in SHIPPED_ROWS[1:]]
    ours, _ = prepare_sft_dataset(copy.deepcopy(rows), tokenizer)
    theirs, _ = run_trl(rows, tokenizer, tiny_model, tmp_path)
    assert [row["input_ids"] for row in ours] == [row["input_ids"] for row in theirs]
    assert "<think>\n\n</think>" in tokenizer.decode(ours[0]["input_ids"])


def test_bfd_bins_and_boundary_labels():
    """Best-fit decreasing on lengths [5, 2, 3, 1] with capacity 5: 5 opens bin 0 (full), 3 opens bin 1 (2 free),
    2 fits bin 1 exactly, 1 opens bin 2. Rows: [a]*5, [c c c b b], [d]; the padding-free collator then masks the
    label of each document's first token (positions 0)."""
    assert best_fit_decreasing([5, 2, 3, 1], 5) == [[0], [2, 1], [3]]
    docs = [{"input_ids": [1] * 5, "labels": [1] * 5}, {"input_ids": [2] * 2, "labels": [2] * 2},
            {"input_ids": [3] * 3, "labels": [3] * 3}, {"input_ids": [4], "labels": [4]}]
    packed = pack_examples(docs, 5, "bfd")
    assert [row["input_ids"] for row in packed] == [[1] * 5, [3, 3, 3, 2, 2], [4]]
    assert [row["position_ids"] for row in packed] == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1], [0]]
    batch = collate_sft(packed, pad_token_id=0, padding_free=True)
    assert batch["labels"].tolist() == [[-100, 1, 1, 1, 1, -100, 3, 3, -100, 2, -100]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 8, 10, 11]
    assert batch["max_length_q"] == 5
    with pytest.raises(ValueError, match="padding_free=True"):
        collate_sft(packed, pad_token_id=0, padding_free=False)


def test_bfd_packs_within_blocks_of_1000_rows_like_trl():
    """TRL packs through datasets.map(batched=True) (1000 rows per batch), so 1001 one-token documents with
    capacity 4 give 250 full rows from the first block, and the 1001st document alone in row 251."""
    docs = [{"input_ids": [i], "labels": [i]} for i in range(1001)]
    packed = pack_examples(docs, 4, "bfd")
    assert len(packed) == 251
    assert packed[-1]["input_ids"] == [1000]
    wrapped = pack_examples(docs, 3, "wrapped")
    assert len(wrapped) == 335 and wrapped[333]["input_ids"] == [999] and wrapped[334]["input_ids"] == [1000]


def test_many_rows_pack_like_trl_across_1000_row_blocks(tokenizers, tiny_model, tmp_path):
    """1500 pre-tokenized rows of 1..40 tokens: TRL packs them in blocks of 1000 rows; bfd, bfd_split and wrapped
    rows (and shuffled bfd rows) equal TRL's, so the block boundary is reproduced."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 41, (1500,), generator=generator).tolist()
    rows = [{"input_ids": list(range(1, length + 1))} for length in lengths]
    for kwargs in ({"packing_strategy": "bfd"}, {"packing_strategy": "bfd_split"},
                   {"packing_strategy": "wrapped"}, {"packing_strategy": "bfd", "shuffle_seed": 5}):
        ours, _ = prepare_sft_dataset(rows, tokenizers["chatml"], packing=True, max_length=32, **kwargs)
        theirs, _ = run_trl(rows, tokenizers["chatml"], tiny_model, tmp_path, packing=True, max_length=32, **kwargs)
        assert [row["input_ids"] for row in ours] == [row["input_ids"] for row in theirs], kwargs
        if kwargs["packing_strategy"] != "wrapped":
            assert [row["position_ids"] for row in ours] == [
                positions_from_seq_lengths(row["seq_lengths"]) for row in theirs
            ]


def test_bundled_chat_data_matches_trl(tokenizers, tiny_model, tmp_path):
    """The shipped tokenizer on 300 rows of the bundled chat data (loaded with our loader), assistant-only loss,
    packed with bfd into 256-token rows: identical to TRL, batch included."""
    from data.loading import load_dataset_splits

    train, _ = load_dataset_splits(str(DEFAULT_SFT_DATASET), None)
    train = train.select(range(300))
    kwargs = {"assistant_only_loss": True, "packing": True, "max_length": 256}
    ours, report = prepare_sft_dataset(train, tokenizers["shipped"], **kwargs)
    theirs, collator = run_trl(train.to_list(), tokenizers["shipped"], tiny_model, tmp_path, **kwargs)
    assert [row["input_ids"] for row in ours] == [row["input_ids"] for row in theirs]
    assert [row["labels"] for row in ours] == [row["labels"] for row in theirs]
    assert report.warnings == []  # the shipped template puts <|im_end|> inside {% generation %}
    assert_batches_equal(collate_sft(ours[:8], resolve_pad_token_id(tokenizers["shipped"]), padding_free=True),
                         collator(theirs[:8]))


def test_uneven_message_keys_in_a_dataset_match_trl(tokenizers, tiny_model, tmp_path):
    """In a datasets.Dataset, Arrow gives every message every key (absent ones None); both TRL (through
    transformers) and we drop the None keys, so an extra `name` on one message changes nothing else."""
    rows = copy.deepcopy(MESSAGES_ROWS)
    rows[1]["messages"][2]["name"] = "fox"
    ours, _ = prepare_sft_dataset(Dataset.from_list(rows), tokenizers["chatml"], assistant_only_loss=True)
    theirs, _ = run_trl(rows, tokenizers["chatml"], tiny_model, tmp_path, assistant_only_loss=True)
    assert [(r["input_ids"], r["labels"]) for r in ours] == [(r["input_ids"], r["labels"]) for r in theirs]


@pytest.mark.parametrize("padding_free", [False, True])
@pytest.mark.parametrize("pad_to_multiple_of", [None, 4])
def test_collate_matches_trl_collator_without_labels_or_positions(padding_free, pad_to_multiple_of):
    """Examples without labels (labels default to input_ids) and, padding-free, without position_ids (each
    example is one document): our batch equals TRL's DataCollatorForLanguageModeling's, key for key."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}, {"input_ids": [10, 11, 12, 13, 14]}]
    expected = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free,
                                               pad_to_multiple_of=pad_to_multiple_of)(copy.deepcopy(examples))
    got = collate_sft(examples, 0, padding_free=padding_free, pad_to_multiple_of=pad_to_multiple_of)
    assert_batches_equal(got, expected)


def test_double_bos_is_reported(tokenizers):
    """Text that already starts with "<s>" gets a second BOS from the Llama-like post-processor (as in TRL,
    whose ids we keep); the report warns about the one such row."""
    rows = [{"text": "<s>Hello world!"}, {"text": "Hello world!"}]
    examples, report = prepare_sft_dataset(rows, tokenizers["bos"])
    bos = tokenizers["bos"].bos_token_id
    assert examples[0]["input_ids"][:2] == [bos, bos] and examples[1]["input_ids"][1] != bos
    assert report.warnings == [
        "1 rows start with two BOS tokens (the text already starts with the BOS token and the tokenizer adds "
        "one); remove it from the data"
    ]
