"""scripts/inspect_batch.py: one training batch, token by token, with the roles and loss mask the engine uses.

Runs on the bundled data with a tiny SmolLM3 (built from a config and a seed, saved with the shipped tokenizer),
fp32. Expected roles are derived independently from the raw jsonl rows and the chat template: the completion
tokens of a DPO row decode to exactly the answer plus the template's end of turn, `<|im_end|>\\n`; the prompt
tokens decode to the templated prompt; padding is `<|pad|>` at the end of a row.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest

from data.defaults import DEFAULT_DPO_DATASET, DEFAULT_SFT_DATASET, DEFAULT_TOKENIZER_DIR
from engine.config import parse_config
from engine.loop import epoch_order
from tests.script_modules import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]
END_OF_TURN = "<|im_end|>\n"
LN_VOCAB = math.log(1024)  # the shipped tokenizer has 1024 tokens



inspect_batch = load_script("inspect_batch")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from engine.model import build_tiny_smollm3, load_tokenizer

    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = load_tokenizer(str(DEFAULT_TOKENIZER_DIR))
    build_tiny_smollm3(tokenizer, seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    from engine.model import load_tokenizer

    return load_tokenizer(str(DEFAULT_TOKENIZER_DIR))


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train.jsonl").read_text(encoding="utf-8").splitlines()]


def text_of(sequence, role: str) -> str:
    return "".join(token.text for token in sequence.tokens if token.role == role)


def view_of(model_dir: Path, *flags: str, batch_index: int = 0):
    config = parse_config([*flags, "--model_name_or_path", str(model_dir), "--bf16", "False"])
    return inspect_batch.inspect_batch(config, batch_index)


@pytest.fixture(scope="module")
def dpo_view(model_dir):
    """Micro-batch 5 of 4 pairs: its rejected answers differ in length, so the batch has padding."""
    return view_of(model_dir, "--method", "dpo", "--per_device_train_batch_size", "4", "--loss_type", "sigmoid",
                   "sft", "--loss_weights", "1", "0.5", batch_index=5)


def test_dpo_batch_is_the_training_batch(dpo_view):
    """Expected: the examples of micro-batch 5 of the seeded epoch order (seed 42), 4 pairs = 8 sequences,
    printed pair by pair (chosen, rejected)."""
    assert dpo_view.example_indices == epoch_order(1400, 42, 0)[20:24]
    assert len(dpo_view.sequences) == 8
    assert [s.title.split(" (")[0] for s in dpo_view.sequences[:2]] == ["pair 0 chosen", "pair 0 rejected"]


def test_dpo_token_roles(dpo_view, tokenizer):
    """Per pair: completion tokens decode to the raw answer + `<|im_end|>\\n` (chosen and rejected), prompt tokens
    to the chat template's rendering of the raw prompt with the generation prompt, padding is `<|pad|>` after
    the last real token; the loss trains exactly the completion tokens."""
    data = rows(DEFAULT_DPO_DATASET)
    padding = 0
    for pair, example in enumerate(dpo_view.example_indices):
        row = data[example]
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        for side, sequence in (("chosen", dpo_view.sequences[2 * pair]), ("rejected", dpo_view.sequences[2 * pair + 1])):
            assert text_of(sequence, "prompt") == prompt
            assert text_of(sequence, "completion") == row[side][0]["content"] + END_OF_TURN
            roles = [token.role for token in sequence.tokens]
            pads = [token for token in sequence.tokens if token.role == "padding"]
            assert all(token.token_id == tokenizer.pad_token_id for token in pads)
            assert roles == sorted(roles, key=["prompt", "completion", "padding"].index)  # prompt, completion, pad
            assert all(token.trained == (token.role == "completion") for token in sequence.tokens)
            padding += len(pads)
    assert padding > 0


def test_dpo_numbers(dpo_view):
    """At the starting weights the policy is its own reference: every reward and margin is exactly 0, the sigmoid
    loss of every pair is −log σ(0) = ln 2, and the sft loss (token mean over the batch's chosen tokens) is the
    same for every pair. Each sequence's logp is the sum of its trained tokens' log-probs, and a random tiny model
    is near uniform: mean log-prob per token within 0.5 of −ln 1024 = −6.93."""
    sft_losses = set()
    for pair in dpo_view.pairs:
        assert pair["reward_chosen"] == pair["reward_rejected"] == pair["margin"] == 0.0
        assert pair["loss/sigmoid"] == pytest.approx(math.log(2), abs=1e-6)
        sft_losses.add(round(pair["loss/sft"], 6))
    assert len(sft_losses) == 1
    for sequence in dpo_view.sequences:
        logps = [token.logp for token in sequence.tokens if token.trained]
        assert sequence.summary["logp"] == pytest.approx(sum(logps), rel=1e-5)
        assert sequence.summary["ref_logp"] == sequence.summary["logp"]
        assert sum(logps) / len(logps) == pytest.approx(-LN_VOCAB, abs=0.5)


def test_reference_free_rewards(model_dir):
    """SimPO runs no reference: rewards are β · logp / |completion| (TRL's CPO convention), β = 2 here."""
    view = view_of(model_dir, "--method", "dpo", "--per_device_train_batch_size", "2", "--loss_type", "simpo",
                   "--beta", "2.0")
    chosen = view.sequences[0]
    completion_tokens = sum(token.role == "completion" for token in chosen.tokens)
    assert "ref_logp" not in chosen.summary
    assert chosen.summary["reward"] == pytest.approx(2.0 * chosen.summary["logp"] / completion_tokens, rel=1e-6)
    assert view.pairs[0]["reward_chosen"] == pytest.approx(chosen.summary["reward"], rel=1e-9)


@pytest.mark.parametrize("assistant_only", [False, True])
def test_sft_roles_and_loss_mask(model_dir, assistant_only):
    """Chat rows: the assistant tokens decode to the raw assistant message + `<|im_end|>\\n`, preceded in /no_think
    rows by the empty think block the template inserts (the template's `{% generation %}` block), every other real
    token is `prompt`. By default (TRL's, for `messages` data) the
    loss trains every token but the first; with --assistant_only_loss it trains exactly the assistant tokens.
    The NLL is the sum of the trained tokens' −logp, about ln 1024 = 6.93 per token for a near-uniform model."""
    flags = ["--method", "sft", "--per_device_train_batch_size", "4"]
    view = view_of(model_dir, *flags, *(["--assistant_only_loss"] if assistant_only else []))
    data = rows(DEFAULT_SFT_DATASET)
    assert view.example_indices == epoch_order(3000, 42, 0)[:4]
    for sequence, example in zip(view.sequences, view.example_indices, strict=True):
        messages = data[example]["messages"]
        assistant = [m["content"] for m in messages if m["role"] == "assistant"]
        no_think = any(m["role"] == "system" and "/no_think" in m["content"] for m in messages)
        think_block = "<think>\n\n</think>\n" if no_think else ""
        assert text_of(sequence, "assistant") == "".join(think_block + content + END_OF_TURN for content in assistant)
        first = sequence.tokens[0]
        assert (first.text, first.role, first.trained) == ("<|im_start|>", "prompt", False)
        for token in sequence.tokens[1:]:
            expected = token.role == "assistant" if assistant_only else token.role != "padding"
            assert token.trained == expected, (sequence.title, token)
        logps = [token.logp for token in sequence.tokens if token.trained]
        assert sequence.summary["nll"] == pytest.approx(-sum(logps), rel=1e-5)
        assert sequence.summary["trained_tokens"] == len(logps)
        assert sequence.summary["mean_nll"] == pytest.approx(LN_VOCAB, abs=0.1)


def test_command_prints_roles(model_dir, capsys):
    """The printed table: the header names the batch; position 0 is `<|im_start|>` (prompt, not trained); the
    answer's `<|im_end|>` is a trained completion token with its log-prob; `--max_sequences 1` of 4 sequences
    says 3 more are not shown."""
    argv = ["--method", "dpo", "--model_name_or_path", str(model_dir), "--per_device_train_batch_size", "2",
            "--bf16", "False", "--max_sequences", "1"]
    assert inspect_batch.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("method dpo, micro-batch 0 of epoch 0, examples [1142, 276], loss sigmoid")
    assert re.search(r"^\s+0\s+1\s+'<\|im_start\|>'\s+prompt\s+·$", out, flags=re.MULTILINE)
    assert re.search(r"^\s+\d+\s+2\s+'<\|im_end\|>'\s+completion\s+yes\s+-\d+\.\d{4}$", out, flags=re.MULTILINE)
    assert "(3 more sequences not shown; --max_sequences)" in out
    assert "pair 0: reward_chosen 0  reward_rejected 0  margin 0  loss/sigmoid 0.693147" in out


def test_bad_batch_index_is_a_one_line_error(model_dir, capsys):
    """1400 pairs in micro-batches of 2 = 700 micro-batches: index 700 is refused with exit 2 and one line."""
    argv = ["--method", "dpo", "--model_name_or_path", str(model_dir), "--per_device_train_batch_size", "2",
            "--bf16", "False", "--batch_index", "700"]
    assert inspect_batch.main(argv) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        "error: --batch_index 700: the first epoch has 700 micro-batches (0 to 699)"]
    assert "Traceback" not in err


def test_readme_inspect_commands_run(model_dir, capsys):
    """Every `python scripts/inspect_batch.py` command in README.md runs (exit 0) with the tiny model appended
    (and fp32: this process already holds an fp32 accelerate state)."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    commands = [line.strip() for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.DOTALL)
                for line in block.splitlines() if line.strip().startswith("python scripts/inspect_batch.py")]
    assert commands, "README.md shows no `python scripts/inspect_batch.py` command (the loss-lab section)"
    for command in commands:
        args = shlex.split(command)[2:]
        tiny = ["--model_name_or_path", str(model_dir), "--bf16", "False", "--max_sequences", "1"]
        assert inspect_batch.main([*args, *tiny]) == 0
        assert "trained" in capsys.readouterr().out
