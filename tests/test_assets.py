"""Shipped assets: the tokenizer in data/assets/tokenizer/, the bundled data, the demo rule, and the scripts
that generate them (which must reproduce the shipped files byte for byte)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

from data.defaults import DEFAULT_DPO_DATASET, DEFAULT_SFT_DATASET, DEFAULT_TOKENIZER_DIR
from data.errors import DataError
from examples.demo_rule import PROBLEM_RE, expected_answer, score, win_rate

REPO_ROOT = Path(__file__).resolve().parents[1]
NO_THINK_HEADER = "<|im_start|>assistant\n<think>\n\n</think>\n"
THINK_HEADER = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER_DIR)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def render(tok, messages, **kwargs) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


def trained_text(tok, ids: list[int], mask: list[int]) -> list[str]:
    """The masked tokens, decoded, one string per contiguous run."""
    runs, current = [], []
    for token, bit in zip(ids, mask, strict=True):
        if bit:
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs + ([tok.decode(current)] if current else [])


def token_ids(tok, messages, **kwargs) -> list[int]:
    return tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]


# --------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------


def test_defaults_are_absolute_paths_to_shipped_assets():
    """All three defaults are absolute and exist, so they work from any working directory."""
    for path in (DEFAULT_TOKENIZER_DIR, DEFAULT_SFT_DATASET, DEFAULT_DPO_DATASET):
        assert path.is_absolute() and path.is_dir(), path
    assert DEFAULT_TOKENIZER_DIR == REPO_ROOT / "data" / "assets" / "tokenizer"


def test_special_tokens(tok):
    """Fixed ids 0-5 (build_tokenizer.py); eos is <|im_end|>, pad <|pad|> is a different token, no BOS."""
    assert len(tok) == 1024
    expected_ids = {
        "<|endoftext|>": 0,
        "<|im_start|>": 1,
        "<|im_end|>": 2,
        "<|pad|>": 3,
        "<think>": 4,
        "</think>": 5,
    }
    assert {t: tok.convert_tokens_to_ids(t) for t in expected_ids} == expected_ids
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|pad|>", 3)
    assert tok.bos_token is None and tok.bos_token_id is None
    assert set(tok.all_special_tokens) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"}
    # No BOS/EOS is added by plain encoding: "Hi" is two byte-level tokens and nothing else.
    assert tok.convert_ids_to_tokens(tok("Hi")["input_ids"]) == ["H", "i"]
    # <think> tags are ordinary added tokens (as in SmolLM3): single ids, kept when special tokens are skipped.
    ids = tok("<think>\nok\n</think>\nyes<|im_end|>")["input_ids"]
    assert ids[0] == 4 and 5 in ids
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nok\n</think>\nyes"


@pytest.mark.parametrize(
    "text",
    [
        "What is 17 + 25?",
        "The capital of Norway is Oslo.",
        "  leading spaces,\ttabs\nand\n\nnewlines  ",
        "Unicode: café, 東京, emoji 🙂",
        "<|im_start|>user\nhi<|im_end|>\n",
    ],
)
def test_round_trip(tok, text):
    """Byte-level BPE is lossless: decode(encode(text)) == text, special tokens included."""
    assert tok.decode(tok(text)["input_ids"]) == text


def test_digits_are_single_tokens(tok):
    """Digits are split one per token (Digits pre-tokenizer), so "12345" is 5 tokens, "1".."5"."""
    assert tok.convert_ids_to_tokens(tok("12345")["input_ids"]) == ["1", "2", "3", "4", "5"]


# --------------------------------------------------------------------------------------------------------
# Chat template
# --------------------------------------------------------------------------------------------------------

USER = {"role": "user", "content": "What is 17 + 25?"}
ANSWER = {"role": "assistant", "content": "17 + 25 = 42."}


def test_no_think_mode_from_system_prompt(tok):
    """`/no_think` is removed from the system text; assistant turns and the generation prompt open with an
    empty think block."""
    messages = [{"role": "system", "content": "You are a helpful assistant. /no_think"}, USER]
    prompt = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n"
    assert render(tok, messages, add_generation_prompt=True) == prompt + NO_THINK_HEADER
    assert render(tok, messages + [ANSWER]) == prompt + NO_THINK_HEADER + "17 + 25 = 42.<|im_end|>\n"
    # Without add_generation_prompt nothing follows the last turn.
    assert render(tok, messages) == prompt


def test_think_mode_is_default_and_flag_only_system_is_dropped(tok):
    """No system prompt means /think; a system prompt that is only a flag renders no system turn."""
    expected = "<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n" + THINK_HEADER
    assert render(tok, [USER], add_generation_prompt=True) == expected
    assert (
        render(tok, [{"role": "system", "content": "/think"}, USER], add_generation_prompt=True) == expected
    )
    only_no_think = render(
        tok, [{"role": "system", "content": "/no_think"}, USER], add_generation_prompt=True
    )
    assert only_no_think == "<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n" + NO_THINK_HEADER


def test_enable_thinking_false_and_system_flag_wins(tok):
    """`enable_thinking=False` selects /no_think (as SmolLM3); an explicit `/think` system flag overrides it."""
    user_turn = "<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n"
    assert (
        render(tok, [USER], add_generation_prompt=True, enable_thinking=False) == user_turn + NO_THINK_HEADER
    )
    messages = [{"role": "system", "content": "Be brief. /think"}, USER]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n" + user_turn + THINK_HEADER
    assert render(tok, messages, add_generation_prompt=True, enable_thinking=False) == expected


def test_think_content_is_kept_intact(tok):
    """Reasoning inside the assistant content is rendered verbatim (not stripped, unlike Qwen3 history)."""
    content = "<think>\n7 + 5 = 12, write 2, carry 1. 1 + 2 + 1 = 4.\n</think>\n17 + 25 = 42."
    text = render(tok, [USER, {"role": "assistant", "content": content}, USER])
    assert text == (
        "<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n"
        f"<|im_start|>assistant\n{content}<|im_end|>\n"
        "<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n"
    )


def test_assistant_mask_is_content_plus_im_end_newline(tok):
    """The `{% generation %}` span of each assistant turn is `<think>\\n\\n</think>\\ncontent<|im_end|>\\n` in
    /no_think mode: the role header is prompt; the empty think block the template inserts belongs to the turn (issue
    14's rule for SmolLM3's no-think mode, the same span the prefix-rendering mask gives); the end-of-turn token is
    trained so the model learns to stop."""
    messages = [
        {"role": "system", "content": "/no_think"},
        USER,
        ANSWER,
        {"role": "user", "content": 'Reverse the word "dog".'},
        {"role": "assistant", "content": "god"},
    ]
    out = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    think = "<think>\n\n</think>\n"
    assert trained_text(tok, ids, mask) == [think + "17 + 25 = 42.<|im_end|>\n", think + "god<|im_end|>\n"]
    # The tokens before each span are the role header's "assistant" and its "\n"; the span opens with <think>.
    first = mask.index(1)
    assert tok.convert_ids_to_tokens(ids[first - 2 : first + 1]) == ["assistant", "Ċ", "<think>"]
    # TRL 1.16 accepts the template for assistant_only_loss without patching or warnings.
    assert has_generation_markers(tok.chat_template)
    assert is_chat_template_stop_token_trained(tok)


def test_generation_prompt_is_token_prefix_for_bundled_preference_rows(tok):
    """TRL's DPO takes the completion as the tokens after apply_chat_template(prompt, add_generation_prompt=True);
    for every bundled pair that prefix must match the full conversation token for token, and the completion
    must be exactly `content<|im_end|>\\n`."""
    for split in ("train", "test"):
        for i, row in enumerate(read_jsonl(DEFAULT_DPO_DATASET / f"{split}.jsonl")):
            prompt_ids = token_ids(tok, row["prompt"], add_generation_prompt=True)
            for key in ("chosen", "rejected"):
                full_ids = token_ids(tok, row["prompt"] + row[key])
                assert full_ids[: len(prompt_ids)] == prompt_ids, (split, i, key)
                completion = tok.decode(full_ids[len(prompt_ids) :])
                assert completion == row[key][0]["content"] + "<|im_end|>\n", (split, i, key)


def test_generation_prompt_is_token_prefix_for_bundled_chat_rows(tok):
    """Same prefix property for SFT rows (both reasoning modes, with and without a system turn)."""
    for i, row in enumerate(read_jsonl(DEFAULT_SFT_DATASET / "test.jsonl")):
        prompt_ids = token_ids(tok, row["messages"][:-1], add_generation_prompt=True)
        full_ids = token_ids(tok, row["messages"])
        assert full_ids[: len(prompt_ids)] == prompt_ids, i


# --------------------------------------------------------------------------------------------------------
# Bundled data
# --------------------------------------------------------------------------------------------------------


def test_chat_data_rows():
    """3000 train / 200 test rows of `messages`: optional system first, then user, then assistant; /no_think
    rows answer plainly, /think (or no system) rows answer `<think>\\n...\\n</think>\\n` + answer."""
    counts = {"train": 3000, "test": 200}
    for split, n in counts.items():
        rows = read_jsonl(DEFAULT_SFT_DATASET / f"{split}.jsonl")
        assert len(rows) == n
        modes = {"think": 0, "no_think": 0}
        for row in rows:
            assert list(row) == ["messages"]
            roles = [m["role"] for m in row["messages"]]
            assert roles in (["user", "assistant"], ["system", "user", "assistant"])
            system = row["messages"][0]["content"] if roles[0] == "system" else ""
            answer = row["messages"][-1]["content"]
            if "/no_think" in system:
                modes["no_think"] += 1
                assert "<think>" not in answer
            else:
                modes["think"] += 1
                assert answer.startswith("<think>\n") and "\n</think>\n" in answer
        # P_NO_THINK = 0.65 in make_data.py: both modes are well represented.
        assert 0.5 < modes["no_think"] / n < 0.8


def test_preference_data_rows():
    """1400 train pairs (700 prompts x one rejected per style) / 200 test pairs; chosen scores 1 and rejected 0.5
    (a wrong equation: format only) or 0 (a wrong terse answer) under the demo rule; no held-out operand pair (in either order) is in any training file."""
    counts = {"train": 1400, "test": 200}
    operands = {}
    for split, n in counts.items():
        rows = read_jsonl(DEFAULT_DPO_DATASET / f"{split}.jsonl")
        assert len(rows) == n
        for row in rows:
            assert list(row) == ["prompt", "chosen", "rejected"]
            assert row["prompt"][0] == {"role": "system", "content": "/no_think"}
            assert [m["role"] for m in row["prompt"]] == ["system", "user"]
            assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
            assert score(row["prompt"], row["chosen"][0]["content"]) == 1.0
            rejected = row["rejected"][0]["content"]
            assert score(row["prompt"], rejected) == (0.0 if rejected.startswith("The answer is") else 0.5)
        operands[split] = {unordered_operands(row["prompt"][1]["content"]) for row in rows}
        terse = sum(row["rejected"][0]["content"].startswith("The answer is") for row in rows)
        # Train: exactly one terse rejected per prompt; test: style drawn at random (about half).
        assert terse == 700 if split == "train" else 70 < terse < 130
    sft_operands = {
        unordered_operands(row["messages"][-2]["content"])
        for split in ("train", "test")
        for row in read_jsonl(DEFAULT_SFT_DATASET / f"{split}.jsonl")
        if " + " in row["messages"][-2]["content"]
    }
    assert len(operands["test"]) == 100  # 100 operand pairs, both orders
    assert operands["test"].isdisjoint(operands["train"])
    assert operands["test"].isdisjoint(sft_operands)


def unordered_operands(text: str) -> frozenset[int]:
    """{17, 5} for "What is 17 + 5?" and for "Compute 5 + 17."."""
    a, b = PROBLEM_RE.search(text).group(1, 3)
    return frozenset((int(a), int(b)))


def test_make_data_is_deterministic(tmp_path):
    """Regenerating gives the shipped files byte for byte (fixed seed, pure Python)."""
    subprocess.run(
        [sys.executable, "scripts/make_data.py", "--out", str(tmp_path)], cwd=REPO_ROOT, check=True
    )
    shipped = DEFAULT_SFT_DATASET.parent
    names = sorted(p.relative_to(shipped).as_posix() for p in shipped.rglob("*.jsonl"))
    assert names == ["chat/test.jsonl", "chat/train.jsonl", "preference/test.jsonl", "preference/train.jsonl"]
    for name in names:
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes(), name


def test_build_tokenizer_is_deterministic(tmp_path):
    """Rebuilding from the bundled data gives the shipped tokenizer files byte for byte."""
    subprocess.run(
        [sys.executable, "scripts/build_tokenizer.py", "--out", str(tmp_path)], cwd=REPO_ROOT, check=True
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (DEFAULT_TOKENIZER_DIR / name).read_bytes(), name


# --------------------------------------------------------------------------------------------------------
# Demo rule
# --------------------------------------------------------------------------------------------------------

PROMPT = [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "What is 17 + 25?"}]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("17 + 25 = 42.", 1.0),  # correct, preferred style
        ("17 + 25 = 42.<|im_end|>\n", 1.0),  # decoded with special tokens: cut at the end of turn
        ("<think>\n\n</think>\n17 + 25 = 42.", 1.0),  # a leading think block is ignored
        ("<think>\n7 + 5 = 12.\n</think>\n17 + 25 = 42.", 1.0),
        ("17 + 25 = 43.", 0.5),  # off by one: format only
        ("The answer is 42.", 0.5),  # right number, dispreferred style: correct only
        ("The answer is 43.", 0.0),  # neither
        ("25 + 17 = 42.", 0.5),  # correct, but does not restate the question
        ("17 + 25 = 42. 17 + 25 = 42.", 0.5),  # correct, but did not stop
        ("17 + 25 = 42", 0.5),  # correct, missing the final period
        ("", 0.0),
    ],
)
def test_score(completion, expected):
    assert score(PROMPT, completion) == expected


def test_score_accepts_rendered_text_and_subtraction():
    """The last `a op b` in a text prompt is the problem; subtraction is judged the same way."""
    rendered = "<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>user\nWhat is 50 - 8?<|im_end|>\n"
    assert expected_answer(rendered) == "50 - 8 = 42."
    assert score(rendered, "50 - 8 = 42.") == 1.0
    with pytest.raises(DataError, match="no 'a \\+ b'"):
        score("Tell me a joke.", "no")


def test_win_rate():
    """4 prompts: policy wins 1 (right vs wrong), loses 1, ties 2 (both right, both wrong):
    (1 + 0.5 * 2) / 4 = 0.5. Fixing the loss gives 1 win and 3 ties: (1 + 0.5 * 3) / 4 = 0.625; a policy right
    everywhere against a reference wrong everywhere scores 1.0."""
    prompts = [f"What is {a} + 1?" for a in (1, 2, 3, 4)]
    right = [f"{a} + 1 = {a + 1}." for a in (1, 2, 3, 4)]
    wrong = [f"The answer is {a}." for a in (1, 2, 3, 4)]
    policy = [right[0], wrong[1], right[2], wrong[3]]
    reference = [wrong[0], right[1], right[2], wrong[3]]
    assert win_rate(policy, reference, prompts) == 0.5
    assert win_rate([right[0], right[1], right[2], wrong[3]], reference, prompts) == 0.625
    assert win_rate(right, wrong, prompts) == 1.0
    with pytest.raises(DataError, match="same non-zero number"):
        win_rate(policy, reference[:3], prompts)
