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


# ---------------------------------------------------------------------- 4. --padding_free

def _tiny_causal_lm(arch: str, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM, SmolLM3Config, SmolLM3ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "smollm3": (SmolLM3Config, SmolLM3ForCausalLM)}[arch]
    torch.manual_seed(0)
    config = config_class(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = attn
    return model_class(config).eval()


@pytest.mark.parametrize("arch", ["llama", "smollm3"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_transformers_keeps_packed_sequences_apart(arch, attn, tmp_path):
    """transformers 5.24 (masking_utils.find_packed_sequence_indices): one row of several sequences with
    position_ids restarting at 0 and NO attention mask gets a block-diagonal causal mask, so each sequence's logits
    equal its own padded row's to fp32 rounding (observed <= 2.4e-7 on logits of ~1). Only without a KV cache: a
    forward with transformers' default use_cache=True skips the detection and attends across sequences, which is
    why LeanCausalLM always passes use_cache=False. Without position_ids the packed row is one long sequence (the
    comparison then fails by ~0.5: the check can tell). LeanCausalLM's per-token log-probs of the packed row (SDPA
    run per sequence by engine/packed_attention.py; eager through transformers' mask) equal the padded rows'."""
    from engine.forward import LeanCausalLM

    model = _tiny_causal_lm(arch, attn)
    lengths = [5, 9, 3, 1, 7]
    sequences = [torch.randint(3, 101, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)  # (B, T)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)], mask[row, : len(sequence)] = sequence, 1
    packed_ids = torch.cat(sequences)[None]  # (1, ΣT)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, ΣT)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
        packed = model(input_ids=packed_ids, position_ids=positions, use_cache=False).logits[0]  # (ΣT, V)
        one_sequence = model(input_ids=packed_ids, use_cache=False).logits[0]
        # Our forward: per-token log-probs of the packed row (first token of each sequence: no target).
        labels = packed_ids.clone()
        labels[positions == 0] = -100
        packed_stats = LeanCausalLM(model)(packed_ids, labels, position_ids=positions)  # (1, ΣT-1)
        padded_stats = LeanCausalLM(model)(ids, ids.masked_fill(mask == 0, -100), attention_mask=mask)  # (B, T-1)
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    for row, n in enumerate(lengths):
        torch.testing.assert_close(packed[starts[row] : starts[row] + n], padded[row, :n], rtol=0, atol=1e-6)
        assert (one_sequence[starts[row] : starts[row] + n] - padded[row, :n]).abs().max() > 1e-2 or row == 0
        torch.testing.assert_close(packed_stats.logps[0, starts[row] : starts[row] + n - 1],
                                   padded_stats.logps[row, : n - 1], rtol=0, atol=1e-5)
    assert packed_stats.mask.sum() == padded_stats.mask.sum() == sum(lengths) - len(lengths)
    # LeanCausalLM's packed forward switched an SDPA model to per-sequence SDPA (engine/packed_attention.py); its
    # other forwards stay SDPA bit for bit, and the switch is not saved with the model.
    assert model.config._attn_implementation == {"sdpa": "nanopost_sdpa", "eager": "eager"}[attn]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, padded)
    model.save_pretrained(tmp_path)
    assert "nanopost" not in (tmp_path / "config.json").read_text()


def test_sft_padding_free_matches_trl_padding_free(tmp_path, tokenizer, tokenizer_dir, collated):
    """TRL 1.16 SFTTrainer(padding_free=True) on CPU/sdpa: it accepts it (max_length must be None without
    packing) and feeds one (1, ΣT) row with position_ids and no attention mask. Ours, through the CLI, feeds the
    same micro-batches exactly and logs the same loss, grad_norm, entropy, mean_token_accuracy and num_tokens for 3
    steps (batch 3 x accumulation 2, lr 1e-3), within 1e-5 relative as tests/test_parity_sft.py argues (observed
    there <= 1.5e-7; AdamW eps 1e-6 for the reason given there)."""
    from datasets import Dataset

    from tests.trl_harness import make_tiny_model_dir, run_trl_sft

    rows = [{"messages": [{"role": "user", "content": f"Name {i} colours."},
                          {"role": "assistant", "content": " ".join(["red", "blue", "green"] * (1 + i % 4))}]}
            for i in range(12)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = make_tiny_model_dir(tmp_path, "smollm3", vocab_size=len(tokenizer), seed=0)
    settings = dict(per_device_train_batch_size=3, gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-3,
                    adam_epsilon=1e-6, seed=42)
    trl = run_trl_sft(model_dir, tokenizer, Dataset.from_list(rows), output_dir=str(tmp_path / "trl"),
                      padding_free=True, max_length=None, **settings)
    flags = ["--method", "sft", "--model_name_or_path", str(model_dir), "--tokenizer_name_or_path",
             str(tokenizer_dir), "--dataset_name", str(tmp_path / "data.jsonl"), "--output_dir", str(tmp_path / "ours"),
             "--bf16", "false", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "--padding_free",
             "--max_length", "none", *[f"--{k}={v}" for k, v in settings.items()]]
    assert cli.main(flags) == 0
    theirs = [batch for window in trl.batches for batch in window]
    assert len(collated) == len(theirs) == 6
    for (_, ours), trl_batch in zip(collated, theirs, strict=True):
        assert "attention_mask" not in ours and "attention_mask" not in trl_batch
        assert ours["input_ids"].shape[0] == 1 and ours["input_ids"].shape[1] > 40  # three sequences in one row
        for key in ("input_ids", "labels", "position_ids"):
            assert torch.equal(ours[key], trl_batch[key]), key
    ours_logs = [r for r in records_at(tmp_path / "ours") if "loss" in r]
    assert len(ours_logs) == 3
    for mine, their in zip(ours_logs, trl.logs, strict=True):
        for key in ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens"):
            assert mine[key] == pytest.approx(their[key], rel=1e-5), (mine["step"], key)


def records_at(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("method", "options"), [
    ("sft", ()), ("dpo", ()), ("dpo", ("--precompute_ref_log_probs",)),
    ("dpo", ("--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0")),  # reference: adapters off
])
def test_padding_free_equals_the_padded_run(assets, collated, method, options):
    """--padding_free changes the layout, not the numbers: each micro-batch is one row of ΣT real tokens (no
    padding; position_ids restart at 0 per sequence) and the clipped gradients of every step and the logged
    losses, gradient norms and metrics equal the padded run's to fp32 rounding (1e-5 relative over 3 steps at lr
    1e-3; the sums run in a different order; observed <= 1.3e-6 for the gradients). Also with precomputed
    reference log-probs and with LoRA (reference = adapters off). DPO: TRL 1.16 ignores padding_free (it warns and pads), so our own
    padded run is the reference; the policy and the reference model both score the packed row.
    With --max_length the sequences are cut as in the padded run (TRL refuses padding_free with max_length and
    no packing; we truncate each sequence at preparation / collation, as the padded run does)."""
    from engine.config import parse_config
    from engine.loop import train

    def run(out: str, *extra: str) -> list[dict]:
        grads = []

        def record(step: int, model) -> None:  # after clipping, before the optimizer step
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

        train(parse_config(run_args(assets, method, out, "--max_steps", "3", "--max_length", "64", *options,
                                    *extra)), step_hook=record)
        return grads

    tag = f"{method}{len(options)}"
    packed_grads = run(f"pf_{tag}", "--padding_free")
    packed = [(examples, batch) for examples, batch in collated if len(examples) == 4]  # precompute: batches of 8
    collated.clear()
    padded_grads = run(f"padded_{tag}")
    collated[:] = [(examples, batch) for examples, batch in collated if len(examples) == 4]
    assert len(packed_grads) == len(padded_grads) == 3
    for step_packed, step_padded in zip(packed_grads, padded_grads, strict=True):
        assert step_packed.keys() == step_padded.keys()
        for name, grad in step_padded.items():  # per parameter: max|diff| <= 1e-5 max|grad|
            assert (step_packed[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name
    for (_, packed_batch), (_, padded_batch) in zip(packed, collated, strict=True):
        real = int(padded_batch["attention_mask"].sum())
        assert packed_batch["input_ids"].shape == (1, real) and "attention_mask" not in packed_batch
    padded_positions = sum(batch["input_ids"].numel() for _, batch in collated)
    packed_positions = sum(batch["input_ids"].numel() for _, batch in packed)
    assert packed_positions < 0.9 * padded_positions  # the padded run does pad
    for with_pf, padded in zip(records(assets, f"pf_{tag}"), records(assets, f"padded_{tag}"), strict=True):
        for key, value in padded.items():
            if isinstance(value, float) and key not in ("learning_rate", "epoch"):
                # rewards/* = β (logp − ref logp): a difference of sums of |logp| ~ 50 that nearly cancel, so fp32
                # rounding of the sums (1e-7 relative) shows as ~β 1e-7 |logps| absolute (observed 3.8e-7 at β 0.1)
                cancel = 1e-6 * 0.1 * (abs(padded.get("logps/chosen", 0)) + abs(padded.get("logps/rejected", 0)))
                tolerance = cancel if key.startswith("rewards/") else 1e-7
                assert with_pf[key] == pytest.approx(value, rel=1e-5, abs=tolerance), (padded.get("step"), key)


def test_dpo_padding_free_batch_layout_with_pad_to_multiple_of():
    """collate_dpo(padding_free=True): the 2B truncated sequences end to end, positions restarting at 0, each
    token's sequence index, the completion tokens where the padded batch has them; with pad_to_multiple_of 8 the
    row ends in padding that belongs to no sequence (index -1) and carries no completion token."""
    from data.collate_dpo import collate_dpo, completion_lengths, num_real_tokens

    examples = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6, 7, 8, 9]},
                {"prompt_ids": [10], "chosen_ids": [11, 12, 13, 14, 15], "rejected_ids": [16]}]
    padded = collate_dpo(examples, 0, max_length=6)
    packed = collate_dpo(examples, 0, max_length=6, pad_to_multiple_of=8, padding_free=True)
    # [chosen; rejected]: [1 2 3 4 5] [10 11 12 13 14 15] [1 2 3 6 7 8] (cut to 6) [10 16]: 19 tokens, padded to 24
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 1, 2, 3, 6, 7, 8, 10, 16,
                                             0, 0, 0, 0, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1,
                                                0, 0, 0, 0, 0]]
    assert packed["sequence_index"].tolist() == [[0] * 5 + [1] * 6 + [2] * 6 + [3] * 2 + [-1] * 5]
    assert packed["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 1,
                                                   0, 0, 0, 0, 0]]
    assert "attention_mask" not in packed
    assert completion_lengths(packed).tolist() == completion_lengths(padded).tolist() == [2, 5, 3, 1]
    assert int(num_real_tokens(packed)) == int(num_real_tokens(padded)) == 19


def test_inspect_batch_shows_the_grouped_padding_free_batch(assets, capsys):
    """scripts/inspect_batch.py takes the same flags: with --group_by_length it shows the batch the loop trains on
    (the length-grouped order's first micro-batch), and with --padding_free the same tokens one row per sequence."""
    from engine.data_order import DataOrder
    from tests.script_modules import load_script

    inspect_batch = load_script("inspect_batch")
    argv = ["--method", "dpo", "--model_name_or_path", str(assets / "model"), "--dataset_name",
            str(assets / "pairs"), "--per_device_train_batch_size", "2", "--bf16", "False", "--max_sequences", "1"]
    assert inspect_batch.main([*argv, "--group_by_length", "--padding_free"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (assets / "pairs" / "train.jsonl").read_text().splitlines()]
    from transformers import AutoTokenizer

    from data.common import padded_length
    from data.dpo import prepare_dpo_dataset

    examples, _ = prepare_dpo_dataset(rows, AutoTokenizer.from_pretrained(assets / "model"), max_length=1024)
    lengths = tuple(padded_length(e) for e in examples)
    first = DataOrder(len(examples), 2, 42, lengths=lengths, group_batch_size=2).epoch_order(0)[:2]
    assert out.startswith(f"method dpo, micro-batch 0 of epoch 0, examples {first}")
    assert "--padding_free packs them into one row: same numbers" in out


def test_train_sampling_strategy_group_by_length_is_group_by_length():
    """transformers 5 (TRL 1.16's TrainingArguments) spells it --train_sampling_strategy group_by_length."""
    from engine.config import parse_config
    from engine.errors import UserError

    assert parse_config(["--train_sampling_strategy", "group_by_length"]).group_by_length is True
    assert parse_config(["--train_sampling_strategy", "random"]).group_by_length is False
    with pytest.raises(UserError, match="--train_sampling_strategy sequential: not supported"):
        parse_config(["--train_sampling_strategy", "sequential"])


def test_bench_padding_free_jobs_count_the_base_jobs_flops():
    """scripts/bench.py's `sft-padding-free` / `dpo-padding-free` train the same tokens as `sft` / `dpo` (packed),
    so MFU charges them the same FLOPs per token; `python scripts/bench.py --jobs sft sft-padding-free ...` prints
    both rows, padding share before and after."""
    from tests.script_modules import load_script

    bench = load_script("bench")
    workload = __import__("sys").modules["workload"]
    assert {"sft-padding-free", "dpo-padding-free"} <= set(workload.JOBS)
    assert workload.flops_per_token("sft-padding-free", 1000, 10) == workload.flops_per_token("sft", 1000, 10)
    assert workload.flops_per_token("dpo-padding-free", 1000, 10) == 8000
    assert bench.parse_args(["--jobs", "sft-padding-free", "dpo-padding-free"]).jobs == ["sft-padding-free",
                                                                                        "dpo-padding-free"]
