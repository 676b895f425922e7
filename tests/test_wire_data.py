"""The data-layout flags wired in issue 10 phase 2, each through the CLI on a tiny model:
--max_prompt_length (TRL < 1.0), --pad_to_multiple_of, --group_by_length and --padding_free (SFT and DPO)."""

from __future__ import annotations

import json

import pytest

import train as cli
from engine.dpo import DPOMethod
from engine.sft import SFTMethod

PROMPT_WORDS = "the quick brown fox jumps over the lazy dog while the blue sea sings".split()


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dir):
    """A tiny model and a preference and a chat dataset whose rows differ in length (a few 3x the shortest)."""
    root = tmp_path_factory.mktemp("wire_data")
    (root / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    pairs = [{"prompt": "Question: " + " ".join(PROMPT_WORDS[: 2 + (i * 5) % 12]) + f" {i}?\nAnswer:",
              "chosen": f" yes {i} " + "good " * (1 + i % 4), "rejected": f" no {i} " + "bad " * (1 + (i * 3) % 5)}
             for i in range(12)]
    chats = [{"messages": [{"role": "user", "content": f"Count to {i}."},
                           {"role": "assistant", "content": " ".join(str(k) for k in range(1, 2 + (i * 7) % 13))}]}
             for i in range(12)]
    for name, rows in (("pairs", pairs), ("chats", chats)):
        (root / name).mkdir()
        (root / name / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run_args(assets, method: str, out: str, *extra: str) -> list[str]:
    data = "pairs" if method == "dpo" else "chats"
    return ["--method", method, "--model_name_or_path", str(assets / "model"), "--dataset_name", str(assets / data),
            "--output_dir", str(assets / out), "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--disable_tqdm", "--bf16", "false", "--save_strategy", "no", "--logging_steps", "1", "--gradient_checkpointing", "false",
            *extra]


def records(assets, out: str) -> list[dict]:
    return [json.loads(line) for line in (assets / out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def collated(monkeypatch):
    """Record every (examples, batch) pair the methods' collators build during a run."""
    seen: list[tuple[list[dict], dict]] = []
    for method in (SFTMethod, DPOMethod):
        original = method.collate

        def spy(self, examples, _original=original):
            batch = _original(self, examples)
            seen.append((examples, batch))
            return batch

        monkeypatch.setattr(method, "collate", spy)
    return seen


# ---------------------------------------------------------------------- 1. --max_prompt_length (TRL < 1.0)

def test_max_prompt_length_keeps_the_last_prompt_tokens(assets, collated, capsys):
    """TRL 0.x `tokenize_row`: `prompt_input_ids[-max_prompt_length:]`; chosen/rejected untouched. Rows whose
    prompt has more than 24 tokens are cut to their last 24 and the run log says how many."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    rows = [json.loads(line) for line in (assets / "pairs" / "train.jsonl").read_text().splitlines()]
    full_prompts = [tokenizer(row["prompt"])["input_ids"] for row in rows]
    long_rows = sum(len(ids) > 24 for ids in full_prompts)
    assert 0 < long_rows < len(rows)  # both kinds present, or the test shows nothing

    assert cli.main(run_args(assets, "dpo", "mpl", "--max_steps", "3", "--max_prompt_length", "24")) == 0
    log = capsys.readouterr().out
    assert f"{long_rows} rows with the prompt cut to its last max_prompt_length tokens" in log
    checked = 0
    for examples, _ in collated:
        for example in examples:
            row = rows[example["index"]]
            full = full_prompts[example["index"]]
            assert example["prompt_ids"] == full[-24:]  # the END of the prompt ("... Answer:")
            # The completion is what follows the whole prompt (no token merges across " yes" / " no" here).
            whole = tokenizer(row["prompt"] + row["chosen"] + tokenizer.eos_token)["input_ids"]
            assert whole[: len(full)] == full and example["chosen_ids"] == whole[len(full):]
            checked += 1
    assert checked == 12  # 3 steps x 4 pairs


def test_max_prompt_length_is_a_dpo_option(assets, capsys):
    assert cli.main(run_args(assets, "sft", "mpl_sft", "--max_prompt_length", "24")) == 2
    assert "--max_prompt_length" in capsys.readouterr().err


# ---------------------------------------------------------------------- 2. --pad_to_multiple_of

def real_length(method: str, examples: list[dict]) -> int:
    """The longest sequence of a micro-batch: the width without --pad_to_multiple_of."""
    if method == "sft":
        return max(len(e["input_ids"]) for e in examples)
    return max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples)


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_pad_to_multiple_of_rounds_the_width_and_changes_no_number(assets, collated, method):
    """Every batch is T = the longest row rounded up to a multiple of 16 (TRL's collators: `pad(...,
    pad_to_multiple_of)`), and the extra positions carry no loss: the logged losses and gradient norms equal the
    run without it to fp32 rounding (only the matmul shapes differ)."""
    steps = ["--max_steps", "2"]
    assert cli.main(run_args(assets, method, f"pad16_{method}", *steps, "--pad_to_multiple_of", "16")) == 0
    padded = list(collated)
    collated.clear()
    assert cli.main(run_args(assets, method, f"pad_none_{method}", *steps)) == 0
    widths = [(batch["input_ids"].shape[1], real_length(method, examples)) for examples, batch in padded]
    assert len(widths) >= 2 and any(real % 16 for _, real in widths)  # some batch really is rounded up
    assert all(width % 16 == 0 and real <= width < real + 16 for width, real in widths)
    assert [b["input_ids"].shape[1] for _, b in collated] == [real for _, real in widths]  # unpadded: the longest
    for with_pad, without in zip(records(assets, f"pad16_{method}"), records(assets, f"pad_none_{method}"),
                                 strict=True):
        for key in ("loss", "grad_norm"):
            if key in with_pad:
                assert with_pad[key] == pytest.approx(without[key], rel=1e-5), key
