"""Assistant-only loss with the chat templates real models ship (issue 14), read at test time from TRL 1.16's
installed copies (trl/chat_templates/) and from tests/chat_templates/smollm3_style.jinja, written here from
SmolLM3's documented format.

What an assistant turn owns (data/chat_template.py): the tokens after the role header (the generation prompt,
up to a `<think>` block it inserts), through the end-of-turn token and what the template writes up to the next
message. Checked four ways:

1. Markers vs prefixes: on every TRL training template (which has `{% generation %}`) the mask read from growing
   prefixes equals the markers' mask, except where TRL's markers also cover the role header (listed below) and on
   templates that are not prefix-preserving (refused).
2. Token by token on templates TRL does not support (SmolLM3-style, Llama 3.2): the trained tokens are exactly
   those of the strings the test states.
3. Step by step against TRL on the templates TRL does support (it swaps in its training copy): the same
   micro-batches and the same logged loss at every step.
4. Refusal: a template that rewrites earlier turns (Qwen3 drops past reasoning) is one line naming the turn and
   the fix, unless the rewritten turns carry no loss; DPO's prompt/completion split checks the same way.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import trl
from datasets import Dataset
from test_assets import trained_text
from test_data_dpo import trl_prepare_and_collate
from test_parity_sft import _assert_logs_match, _case, _run_ours
from transformers import AutoTokenizer

from data.chat_template import assistant_mask_by_prefixes, render_with_assistant_mask
from data.defaults import DEFAULT_TOKENIZER_DIR
from data.dpo import prepare_dpo_dataset
from data.errors import DataError
from data.sft import prepare_sft_dataset
from tests.trl_harness import make_tiny_model_dir, run_trl_sft

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
SMOLLM3_STYLE = Path(__file__).parent / "chat_templates" / "smollm3_style.jinja"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


CONVERSATIONS = {
    "single": [user("What is 2+2?"), assistant("It is 4.")],
    "multi": [user("Hi"), assistant("Hello!"), user("2+2?"), assistant("4")],
    "system": [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!"), user("2+2?"),
               assistant("4")],
    "think": [user("2+2?"), assistant("<think>\nadd\n</think>\n\n4")],
}


@pytest.fixture(scope="module")
def base():
    return AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER_DIR)


def with_template(tokenizer, template: str, bos_token: str | None = None):
    """A copy of `tokenizer` with another chat template (and a BOS token, for templates that write one)."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    if bos_token is not None:
        tokenizer.bos_token = bos_token
    return tokenizer


def trl_template(name: str) -> str:
    return (TRL_TEMPLATES / name).read_text(encoding="utf-8")


def expected_mask(tokenizer, text: str, trained: list[str]) -> list[int]:
    """1 on the tokens of each string of `trained`, found in order in `text`, else 0: a mask stated by hand."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    spans, cursor = [], 0
    for piece in trained:
        start = text.index(piece, cursor)
        spans.append((start, start + len(piece)))
        cursor = start + len(piece)
    return [int(any(start < end_ and end > start_ for start_, end_ in spans)) for start, end in offsets]


# ------------------------------------------------------------------------ 1. markers vs prefixes

# TRL's markers on these also cover the role header (or the "\n" that ends it): the prefix mask is the markers'
# mask less those header tokens, by design (the role header is not trained).
MARKERS_INCLUDE_HEADER = {"deepseek_r1_distill_training.jinja", "deepseekv3_training.jinja",
                          "gptoss_training.jinja", "muse_glimmer_training.jinja", "qwen2_5_training.jinja",
                          "glm4moe_training.jinja"}
# GPT-OSS renders the last assistant turn with <|return|> and earlier ones with <|end|>: not prefix-preserving.
NOT_PREFIX_PRESERVING = {("gptoss_training.jinja", "multi"), ("gptoss_training.jinja", "system")}
# Llava-Next reads every content as a list of parts ({type, text}); text-only SFT takes string content.
CONTENT_PARTS_ONLY = {"llava_next_training.jinja"}
TRAINING_TEMPLATES = sorted(path.name for path in TRL_TEMPLATES.glob("*_training.jinja")
                            if path.name not in CONTENT_PARTS_ONLY)


@pytest.mark.parametrize("name", TRAINING_TEMPLATES)
def test_prefix_mask_equals_generation_markers(base, name):
    """On TRL's training templates (the ones with {% generation %}), both ways give the same token mask, for plain,
    multi-turn, system and thinking conversations, with thinking on and off."""
    tokenizer = with_template(base, trl_template(name))
    compared = 0
    for conversation_name, messages in CONVERSATIONS.items():
        for kwargs in ({}, {"enable_thinking": False}):
            try:
                markers = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                        return_assistant_tokens_mask=True, **kwargs)
            except Exception:  # e.g. Gemma refuses a system turn: nothing to compare
                continue
            if (name, conversation_name) in NOT_PREFIX_PRESERVING:
                with pytest.raises(DataError, match="not prefix-preserving"):
                    assistant_mask_by_prefixes(tokenizer, messages, 0, **kwargs)
                continue
            prefixes = assistant_mask_by_prefixes(tokenizer, messages, 0, **kwargs)
            assert prefixes["input_ids"] == markers["input_ids"]
            ours, theirs = prefixes["assistant_masks"], markers["assistant_masks"]
            if name in MARKERS_INCLUDE_HEADER:
                extra = [t for t, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
                assert all(theirs[t] == 1 and ours[t] == 0 for t in extra)
                # Each extra run sits right before a trained run: it is the head of the turn, not content.
                assert all(ours[t + 1] == 1 or t + 1 in extra for t in extra)
            else:
                assert ours == theirs, (conversation_name, kwargs)
            compared += 1
    assert compared >= 4


def test_shipped_template_markers_and_prefixes(base):
    """Ours, in think and /no_think mode, gives the same mask both ways (markers and growing prefixes). Think mode:
    `content<|im_end|>\\n`. /no_think mode: the inserted empty think block is part of the turn (SmolLM3's rule),
    which the shipped template's `{% generation %}` span includes."""
    think = [user("Hi"), assistant("Hello!"), user("2+2?"), assistant("<think>\nadd\n</think>\n4")]
    for messages in (think, [{"role": "system", "content": "/think"}, *think]):
        markers = render_with_assistant_mask(base, messages, 0)
        prefixes = assistant_mask_by_prefixes(base, messages, 0)
        assert markers == prefixes
        assert trained_text(base, **_ids_mask(markers)) == ["Hello!<|im_end|>\n", "<think>\nadd\n</think>\n4<|im_end|>\n"]
    no_think = [{"role": "system", "content": "/no_think"}, *think]
    markers = render_with_assistant_mask(base, no_think, 0)
    assert markers == assistant_mask_by_prefixes(base, no_think, 0)
    assert trained_text(base, **_ids_mask(markers)) == [
        "<think>\n\n</think>\nHello!<|im_end|>\n", "<think>\n\n</think>\n<think>\nadd\n</think>\n4<|im_end|>\n"]


def _ids_mask(out: dict) -> dict:
    return {"ids": out["input_ids"], "mask": out["assistant_masks"]}


# ------------------------------------------------------------------------ 2. token by token, where TRL refuses


@pytest.fixture(scope="module")
def smollm3(base):
    return with_template(base, SMOLLM3_STYLE.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("system", "template_kwargs", "trained"),
    [
        # Think mode (default): no block inserted; the data's own think content is trained.
        (None, None, ["Hello!<|im_end|>\n", "<think>\nadd 2 and 2\n</think>\n4<|im_end|>\n"]),
        ("Be brief. /think", None, ["Hello!<|im_end|>\n", "<think>\nadd 2 and 2\n</think>\n4<|im_end|>\n"]),
        # No-think mode: the template inserts an empty think block after the role header; it is part of the turn.
        ("Be brief. /no_think", None, ["<think>\n\n</think>\nHello!<|im_end|>\n",
                                       "<think>\n\n</think>\n<think>\nadd 2 and 2\n</think>\n4<|im_end|>\n"]),
        (None, {"enable_thinking": False}, ["<think>\n\n</think>\nHello!<|im_end|>\n",
                                            "<think>\n\n</think>\n<think>\nadd 2 and 2\n</think>\n4<|im_end|>\n"]),
        # The system flag wins over enable_thinking, as in SmolLM3.
        ("/think", {"enable_thinking": False}, ["Hello!<|im_end|>\n",
                                                "<think>\nadd 2 and 2\n</think>\n4<|im_end|>\n"]),
    ],
)
def test_smollm3_style_mask_token_by_token(smollm3, system, template_kwargs, trained):
    """SmolLM3-style template (no markers; TRL refuses it): the role header `<|im_start|>assistant\\n` is not
    trained, everything from there to `<|im_end|>\\n` is, and the system turn (metadata, instructions) and the user
    turns are not. The labels of the prepared row are the input ids exactly on the stated strings."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        user("Hi"), assistant("Hello!"), user("What is 2+2?"), assistant("<think>\nadd 2 and 2\n</think>\n4")]
    row = {"messages": messages, **({"chat_template_kwargs": template_kwargs} if template_kwargs else {})}
    (example,), _ = prepare_sft_dataset([row], smollm3, assistant_only_loss=True)
    text = smollm3.apply_chat_template(messages, tokenize=False, **(template_kwargs or {}))
    mask = expected_mask(smollm3, text, trained)
    assert example["labels"] == [t if bit else -100 for t, bit in zip(example["input_ids"], mask, strict=True)]
    assert trained_text(smollm3, example["input_ids"], mask) == trained
    header = smollm3.convert_tokens_to_ids(["<|im_start|>", "Ċ"])
    first = mask.index(1)
    assert [example["input_ids"][first - 3], example["input_ids"][first - 1]] == header  # <|im_start|>assistant\n


def test_llama32_mask_token_by_token(base):
    """Llama 3.2's template (TRL 1.16 refuses it: no training copy): `<|start_header_id|>assistant<|end_header_id|>
    \\n\\n` is the header; the trimmed content and `<|eot_id|>` are trained; the system block with its dates is not."""
    tokenizer = with_template(base, trl_template("llama3_2.jinja"), bos_token="<|endoftext|>")
    messages = CONVERSATIONS["system"]
    out = render_with_assistant_mask(tokenizer, messages, 0)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    trained = ["Hello!<|eot_id|>", "4<|eot_id|>"]
    assert out["assistant_masks"] == expected_mask(tokenizer, text, trained)
    assert trained_text(tokenizer, **_ids_mask(out)) == trained


# ------------------------------------------------------------------------ 4. refusal and what carries no loss


@pytest.fixture(scope="module")
def qwen3(base):
    return with_template(base, trl_template("qwen3.jinja"))


def test_qwen3_multi_turn_refused_in_one_line(qwen3):
    """Qwen3's released template renders an assistant turn with an empty think block while it is the last turn,
    and without it once a user turn follows: not prefix-preserving. One line names the turn and the fix."""
    with pytest.raises(DataError) as error:
        prepare_sft_dataset([{"messages": CONVERSATIONS["multi"]}], qwen3, assistant_only_loss=True)
    assert str(error.value) == (
        "Row 0: the chat template renders messages[1] (assistant) differently once later turns follow (it is not "
        "prefix-preserving, e.g. it drops past reasoning), so the tokens of assistant turn messages[1] cannot be "
        "found; pass --chat_template_path with a training template that renders every turn the same way (e.g. "
        "trl/chat_templates/*_training.jinja).")


def test_qwen3_divergence_in_a_turn_without_loss_is_handled(qwen3):
    """Prompt [user, assistant, user] + completion [assistant] with completion-only loss (the default): the
    prompt's assistant turn carries no loss, so its re-rendering does not matter; the completion's turn, with the
    empty think block Qwen3 writes into the last turn, is trained. Without completion-only loss the prompt's
    assistant turn carries loss too, and the row is refused."""
    row = {"prompt": CONVERSATIONS["multi"][:3], "completion": CONVERSATIONS["multi"][3:]}
    (example,), _ = prepare_sft_dataset([copy.deepcopy(row)], qwen3, assistant_only_loss=True)
    mask = [int(label != -100) for label in example["labels"]]
    assert trained_text(qwen3, example["input_ids"], mask) == [
        "<think>\n\n</think>\n\n4<|im_end|>\n"]
    with pytest.raises(DataError, match=r"renders messages\[1\] \(assistant\) differently"):
        prepare_sft_dataset([row], qwen3, assistant_only_loss=True, completion_only_loss=False)


def test_qwen3_training_template_is_the_fix(base):
    """The fix the error names: --chat_template_path trl/chat_templates/qwen3_training.jinja trains every turn."""
    tokenizer = with_template(base, trl_template("qwen3_training.jinja"))
    (example,), _ = prepare_sft_dataset([{"messages": CONVERSATIONS["multi"]}], tokenizer, assistant_only_loss=True)
    mask = [int(label != -100) for label in example["labels"]]
    assert trained_text(tokenizer, example["input_ids"], mask) == [
        "<think>\n\n</think>\n\nHello!<|im_end|>\n", "<think>\n\n</think>\n\n4<|im_end|>\n"]


PREFERENCE_ROWS = [
    {"prompt": [user("What is 2+2?")], "chosen": [assistant("It is 4.")], "rejected": [assistant("It is 5.")]},
    {"prompt": [user("Hi"), assistant("Hello!"), user("Colour of the sky?")], "chosen": [assistant("Blue.")],
     "rejected": [assistant("Green.")]},
]


@pytest.mark.parametrize(("template", "completion", "boundary_rows"), [
    ("qwen3.jinja", "<think>\n\n</think>\n\nIt is 4.<|im_end|>\n", []),
    ("phi3.jinja", "It is 4.<|end|>\n<|im_end|>", []),
    # Our 1024-token BPE encodes the header's "\n\n" as one token at the end of the prompt but as two before
    # "It": the completion starts at the first differing token, as in TRL, and both rows are reported.
    ("llama3_2.jinja", "\n\nIt is 4.<|eot_id|>", [0, 1]),
])
def test_dpo_split_on_real_templates_matches_trl(base, tiny_model_dir, tmp_path, template, completion, boundary_rows):
    """DPO's prompt ends with the generation prompt and the completion is the rest of the rendered turn (Qwen3:
    its empty think block; Phi-3: the closing EOS), on single- and multi-turn prompts; the ids equal TRL's."""
    tokenizer = with_template(base, trl_template(template), bos_token="<|endoftext|>")
    ours, report = prepare_dpo_dataset(copy.deepcopy(PREFERENCE_ROWS), tokenizer)
    assert tokenizer.decode(ours[0]["chosen_ids"]) == completion
    assert report.prompt_boundary_rows == boundary_rows
    theirs, _, _ = trl_prepare_and_collate(copy.deepcopy(PREFERENCE_ROWS), tokenizer, str(tiny_model_dir),
                                        tmp_path)
    assert ours == theirs


def test_template_that_rewrites_the_prompt_is_refused(base):
    """A template that writes the number of messages first renders the prompt differently once the completion
    follows: DPO's split would cut inside a re-rendered prompt (TRL trains on that) and SFT could not find the
    turns, so both are one line naming messages[0], where the rendering first differs."""
    counts = ("{{ messages | length }} messages\n{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    tokenizer = with_template(base, counts)
    message = r"^Row 0: the chat template renders messages\[0\] \(user\) differently once later turns follow"
    with pytest.raises(DataError, match=message):
        prepare_dpo_dataset(copy.deepcopy(PREFERENCE_ROWS[:1]), tokenizer)
    with pytest.raises(DataError, match=message):
        prepare_sft_dataset([{"messages": CONVERSATIONS["multi"]}], tokenizer, assistant_only_loss=True)


# ------------------------------------------------------------------------ 3. step by step against TRL


def _rows(kind: str) -> list[dict]:
    """Eight short conversations: single-turn for Qwen3 (its released template is prefix-preserving only there),
    multi-turn with a system turn for Llama 3 and Phi-3, multi-turn without one for Gemma (which refuses it)."""
    rows = []
    for i in range(8):
        turns = [user(f"What is {i} + {i + 1}?"), assistant(f"It is {2 * i + 1}.")]
        if kind != "single" and i % 2:
            turns += [user("And twice that?"), assistant(f"{4 * i + 2}.")]
        if kind == "system" and i % 3 == 0:
            turns = [{"role": "system", "content": "Answer in one line."}, *turns]
        rows.append({"messages": turns})
    return rows


TRL_SUPPORTED = {  # original template -> rows; TRL 1.16 swaps in <name>_training.jinja, we read the prefixes
    "qwen3.jinja": "single",
    "llama3.jinja": "system",
    "gemma.jinja": "multi",
    "phi3.jinja": "system",
}


@pytest.mark.parametrize("template", list(TRL_SUPPORTED))
def test_training_matches_trl_with_its_training_template(tokenizer, tmp_path, template):
    """TRL recognises these released templates and trains with its generation-tagged copy; we train with the
    released template itself, reading the turns from prefixes. Same micro-batches (ids, labels, attention mask)
    and the same logged loss, entropy, accuracy, grad norm, ... at every step (test_parity_sft's tolerance)."""
    templated = with_template(tokenizer, trl_template(template), bos_token="<|endoftext|>")
    tokenizer_dir = tmp_path / "tokenizer"
    templated.save_pretrained(str(tokenizer_dir))
    rows = _rows(TRL_SUPPORTED[template])
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    model_dir = make_tiny_model_dir(tmp_path, "smollm3", vocab_size=len(templated), seed=0)
    case = _case(lambda: rows, {"assistant_only_loss": True}, ["--assistant_only_loss", "true"])
    trl_run = run_trl_sft(
        model_dir, copy.deepcopy(templated), Dataset.from_list(copy.deepcopy(rows)), output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=case["batch_size"], gradient_accumulation_steps=case["grad_accum"],
        max_steps=case["steps"], learning_rate=1e-3, max_grad_norm=case["max_grad_norm"], seed=42, **case["trl"])
    ours = _run_ours(case, model_dir, tokenizer_dir, data_file, tmp_path / "ours")
    theirs = [batch for window in trl_run.batches for batch in window]
    assert len(ours["batches"]) == len(theirs)
    for our_batch, trl_batch in zip(ours["batches"], theirs, strict=True):
        for key in ("input_ids", "labels", "attention_mask"):
            assert our_batch[key].tolist() == trl_batch[key].tolist(), key
    assert any((batch["labels"] == -100).any() and (batch["labels"] != -100).any() for batch in theirs)
    _assert_logs_match(ours["logs"], trl_run.logs, case["steps"])
