"""The data-layout flags wired in issue 10 phase 2, each through the CLI on a tiny model:
--max_prompt_length (TRL < 1.0), --pad_to_multiple_of, --group_by_length and --padding_free (SFT and DPO)."""

from __future__ import annotations

import json

import pytest
import torch

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


# ---------------------------------------------------------------------- 3. --group_by_length

def widths_and_lengths(collated) -> list[tuple[int, list[int]]]:
    return [(batch["input_ids"].shape[1], [len(e["input_ids"]) for e in examples]) for examples, batch in collated]


def test_group_by_length_order_is_transformers_length_grouped_sampler():
    """The order equals transformers' `get_length_grouped_indices` (LengthGroupedSampler) given the same
    permutation: 48 examples, batch 2 x accumulation 2 -> megabatches of min(48 // 16, 50) = 3 x 4 = 12, each sorted
    longest first, the longest of all moved to the front. The permutation is randperm(48) from a generator seeded
    with seed + epoch (transformers draws it from the global RNG; see engine/data_order.py)."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from engine.data_order import DataOrder

    lengths = tuple((i * 37) % 23 + 1 for i in range(48))
    order = DataOrder(48, 2, seed=7, lengths=lengths, group_batch_size=4)
    for epoch in (0, 1):
        got = order.epoch_order(epoch)
        generator = torch.Generator().manual_seed(7 + epoch)
        assert got == get_length_grouped_indices(list(lengths), 4, generator=generator)
        permutation = torch.randperm(48, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        for start in range(0, 48, 12):
            megabatch = got[start : start + 12]
            rest = [lengths[i] for i in megabatch[1:]]
            assert rest == sorted(rest, reverse=True)  # sorted within the megabatch (slot 0: the swap)
            if start:
                assert set(megabatch[1:]) <= set(permutation[start : start + 12])
        assert lengths[got[0]] == max(lengths)
    assert order.epoch_order(0) != order.epoch_order(1)  # a new draw each epoch


@pytest.fixture(scope="module")
def many_chats(assets):
    """48 chat rows of 3 to ~40 tokens' answers: 4 megabatches of 12 at batch 2 x accumulation 2... grouping shows."""
    rows = [{"messages": [{"role": "user", "content": f"Count to {i}."},
                          {"role": "assistant", "content": " ".join(str(k) for k in range(1, 2 + (i * 11) % 17))}]}
            for i in range(48)]
    (assets / "many").mkdir()
    (assets / "many" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return assets / "many"


def grouped_args(assets, many_chats, out: str, *extra: str) -> list[str]:
    return run_args(assets, "sft", out, "--dataset_name", str(many_chats), "--per_device_train_batch_size", "2",
                    "--gradient_accumulation_steps", "2", *extra)


def test_group_by_length_batches_are_grouped_deterministic_and_resume_bit_exact(assets, many_chats, collated):
    """Through the CLI: with --group_by_length the micro-batches of a megabatch come longest first and hold less
    padding than the random order; a second run sees the same batches; a run resumed from step 3's checkpoint
    sees the same later batches and logs bit-identical losses and gradient norms."""
    assert cli.main(grouped_args(assets, many_chats, "grouped", "--max_steps", "6", "--group_by_length",
                                 "--save_strategy", "steps", "--save_steps", "3")) == 0
    grouped = widths_and_lengths(collated)
    collated.clear()
    assert cli.main(grouped_args(assets, many_chats, "random", "--max_steps", "6")) == 0
    random_order = widths_and_lengths(collated)
    collated.clear()

    def padding(batches) -> int:
        return sum(width * len(lengths) - sum(lengths) for width, lengths in batches)

    assert padding(grouped) < padding(random_order) / 2
    first_megabatch = [length for _, lengths in grouped[:6] for length in lengths]  # 12 examples = 6 micro-batches
    assert first_megabatch[1:] == sorted(first_megabatch[1:], reverse=True)

    assert cli.main(grouped_args(assets, many_chats, "grouped_again", "--max_steps", "6", "--group_by_length")) == 0
    assert widths_and_lengths(collated) == grouped
    collated.clear()

    checkpoint = assets / "grouped" / "checkpoint-3"
    assert cli.main(grouped_args(assets, many_chats, "grouped_resumed", "--max_steps", "6", "--group_by_length",
                                 "--resume_from_checkpoint", str(checkpoint))) == 0
    assert widths_and_lengths(collated) == grouped[6:]  # steps 4-6: micro-batches 7-12
    full, resumed = records(assets, "grouped"), records(assets, "grouped_resumed")
    steps_4_to_6 = [(r["loss"], r["grad_norm"]) for r in full if "loss" in r and r.get("step", 0) > 3]
    assert len(steps_4_to_6) == 3 and [(r["loss"], r["grad_norm"]) for r in resumed if "loss" in r] == steps_4_to_6
