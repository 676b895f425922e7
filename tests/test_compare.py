"""scripts/compare.py and engine/compare: policy vs reference on held-out pairs, answers, report files, plots.

Runs are tiny and real: a 2-layer SmolLM3 (the `tiny_model_dir` fixture) is the reference; a 4-step DPO run and a
4-step LoRA DPO run from it on 16 bundled preference pairs are the policies (in-process, ~1 s each). The numbers
are checked against a direct computation (a plain HF forward, log_softmax, gather) and against what DPO training
itself logged on the same held-out pairs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.defaults import DEFAULT_DPO_DATASET
from data.dpo import prepare_dpo_dataset
from engine.compare import CompareOptions, Sampling, Side, compare, generate
from engine.compare.generate import _cut_after_eos
from engine.compare.load import load_heldout_split
from engine.compare.scores import pair_logps, token_kl
from engine.config import parse_config
from engine.loop import train
from tests.script_modules import load_script

REPO = Path(__file__).resolve().parents[1]
TEST_PAIRS = 12
FAST = ["--max_new_tokens", "8", "--disable_tqdm"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """sft (the tiny model), dpo and lora (4-step DPO runs from it), and the data they used."""
    root = tmp_path_factory.mktemp("compare")
    (root / "pref").mkdir()
    for split, count in (("train", 16), ("test", TEST_PAIRS)):
        lines = (DEFAULT_DPO_DATASET / f"{split}.jsonl").read_text().splitlines()[:count]
        (root / "pref" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    common = ["--method", "dpo", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(root / "pref"),
              "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--max_steps", "4",
              "--logging_steps", "1", "--eval_steps", "2", "--disable_tqdm", "--save_steps", "0", "--bf16", "False"]
    train(parse_config([*common, "--output_dir", str(root / "dpo"), "--learning_rate", "1e-2"]))
    train(parse_config([*common, "--output_dir", str(root / "lora"), "--learning_rate", "5e-2", "--use_peft",
                        "--lora_r", "4", "--lora_alpha", "8"]))
    return {"root": root, "sft": Path(tiny_model_dir), "dpo": root / "dpo", "lora": root / "lora",
            "data": root / "pref"}


def heldout_examples(runs) -> tuple[list[dict], object]:
    tokenizer = AutoTokenizer.from_pretrained(runs["sft"])
    rows = load_heldout_split(str(runs["data"]), None, "test")
    return prepare_dpo_dataset(rows, tokenizer)[0], tokenizer


def direct_logps(model, example: dict, completion: str) -> float:
    """log p(completion | prompt) from one unpadded sequence: HF forward, log_softmax, gather, sum."""
    prompt, answer = example["prompt_ids"], example[f"{completion}_ids"]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)  # (T-1, V)
    targets = ids[0, 1:]
    token_logps = logps.gather(-1, targets[:, None])[:, 0]
    return float(token_logps[len(prompt) - 1:].sum())


def run_cli(*argv: str) -> int:
    return load_script("compare").main(list(argv))


def test_pair_logps_match_a_direct_forward_and_what_dpo_logged(runs):
    """Batched (4 pairs, right padding) summed completion log-probs equal a plain per-sequence HF forward to
    1e-4 nats (fp32 sums of ~10 tokens of ~7 nats: a few ulp each; a shifted, unmasked or mis-split sum is off by
    whole nats). Their means equal DPO's own final eval_logps/chosen|rejected (same 12 pairs, eval batch 4 so the
    mean of batch means is the plain mean) to 1e-5 relative: compare scores what training scores."""
    examples, tokenizer = heldout_examples(runs)
    policy = AutoModelForCausalLM.from_pretrained(runs["dpo"]).eval()
    logps = pair_logps(Side("policy", policy), examples, pad_token_id=tokenizer.pad_token_id, batch_size=4,
                       disable_tqdm=True)
    assert logps.shape == (TEST_PAIRS, 2)
    for row, example in enumerate(examples):
        assert logps[row, 0].item() == pytest.approx(direct_logps(policy, example, "chosen"), abs=1e-4)
        assert logps[row, 1].item() == pytest.approx(direct_logps(policy, example, "rejected"), abs=1e-4)
    final_eval = [r for r in map(json.loads, (runs["dpo"] / "metrics.jsonl").read_text().splitlines())
                  if "eval_loss" in r][-1]
    assert logps[:, 0].mean().item() == pytest.approx(final_eval["eval_logps/chosen"], rel=1e-5)
    assert logps[:, 1].mean().item() == pytest.approx(final_eval["eval_logps/rejected"], rel=1e-5)


def test_kl_matches_a_direct_per_answer_computation(runs):
    """token_kl over padded batches equals Σ_t Σ_v p (log p − log q) computed one answer at a time, unpadded, in
    fp64, to 1e-6 (padding, the shift by one and the prompt mask would each change it by far more); a model
    against itself gives exactly 0."""
    examples, tokenizer = heldout_examples(runs)
    policy = AutoModelForCausalLM.from_pretrained(runs["dpo"]).eval()
    reference = AutoModelForCausalLM.from_pretrained(runs["sft"]).eval()
    prompts = [e["prompt_ids"] for e in examples[:6]]
    answers = generate(policy, tokenizer, prompts, max_new_tokens=6, sampling=Sampling(seed=3), disable_tqdm=True)
    kl = token_kl(Side("policy", policy), Side("reference", reference), prompts, answers,
                  pad_token_id=tokenizer.pad_token_id, batch_size=4, disable_tqdm=True)
    total, count = 0.0, 0
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            p = torch.log_softmax(policy(input_ids=ids).logits[0].double(), -1)[len(prompt) - 1: -1]
            q = torch.log_softmax(reference(input_ids=ids).logits[0].double(), -1)[len(prompt) - 1: -1]
        total += float((p.exp() * (p - q)).sum())
        count += len(answer)
    assert kl > 0
    assert kl == pytest.approx(total / count, abs=1e-6)
    same = token_kl(Side("policy", policy), Side("reference", policy), prompts, answers,
                    pad_token_id=tokenizer.pad_token_id, disable_tqdm=True)
    assert same == 0.0


def test_generation_batched_equals_one_at_a_time_and_sampling_is_seeded(runs):
    """Greedy answers in left-padded batches equal those generated one prompt at a time; each ends at its first
    EOS or at max_new_tokens. The same seed gives the same samples; another seed other samples."""
    examples, tokenizer = heldout_examples(runs)
    policy = AutoModelForCausalLM.from_pretrained(runs["dpo"]).eval()
    prompts = [e["prompt_ids"] for e in examples]
    batched = generate(policy, tokenizer, prompts, max_new_tokens=10, batch_size=5, disable_tqdm=True)
    single = [generate(policy, tokenizer, [p], max_new_tokens=10, disable_tqdm=True)[0] for p in prompts]
    assert batched == single
    for answer in batched:
        assert len(answer) == 10 or (answer[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in answer[:-1])
    # After its first EOS, generate() pads the row; the answer keeps that EOS (it counts in the length), nothing after.
    assert _cut_after_eos([5, 7, 2, 2, 2], eos_id=2) == [5, 7, 2] and _cut_after_eos([5, 7], eos_id=2) == [5, 7]
    sampled = [generate(policy, tokenizer, prompts, max_new_tokens=10, sampling=Sampling(seed=seed),
                        disable_tqdm=True) for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_cli_report_numbers_files_and_progress(runs, tmp_path, capsys):
    """The command of the issue on the DPO run vs its start: report.json holds each model's preference accuracy,
    mean margin and mean greedy length, the implicit-reward accuracy, the KL and the samples, consistent with the
    pair log-probs recomputed directly; report.md tables them; the PNGs decode at their stated sizes; progress
    bars show on stderr."""
    out = tmp_path / "report"
    assert run_cli("--model_name_or_path", str(runs["dpo"]), "--ref_model_name_or_path", str(runs["sft"]),
                   "--dataset_name", str(runs["data"]), "--output_dir", str(out), "--max_new_tokens", "8",
                   "--beta", "0.5") == 0
    progress = capsys.readouterr().err
    for bar in ("policy: scoring pairs", "reference: greedy answers", "policy: sampled answers", "KL on policy"):
        assert re.search(re.escape(bar) + r".*100%", progress), bar
    report = json.loads((out / "report.json").read_text())

    examples, tokenizer = heldout_examples(runs)
    models = {side: AutoModelForCausalLM.from_pretrained(runs[run]).eval()
              for side, run in (("policy", "dpo"), ("reference", "sft"))}
    direct = {side: [(direct_logps(m, e, "chosen"), direct_logps(m, e, "rejected")) for e in examples]
              for side, m in models.items()}
    for side, pairs in direct.items():
        margins = [c - r for c, r in pairs]
        assert report[side]["preference_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / TEST_PAIRS)
        assert report[side]["mean_margin"] == pytest.approx(sum(margins) / TEST_PAIRS, abs=1e-4)
        # Greedy answers, one plain HF generate per prompt: tokens up to and including the first EOS.
        lengths = []
        for example in examples:
            new_ids = models[side].generate(torch.tensor([example["prompt_ids"]]), do_sample=False, max_new_tokens=8,
                                            pad_token_id=tokenizer.pad_token_id)[0, len(example["prompt_ids"]):]
            eos = (new_ids == tokenizer.eos_token_id).nonzero()
            lengths.append(int(eos[0]) + 1 if len(eos) else len(new_ids))
        assert report[side]["mean_length"] == pytest.approx(sum(lengths) / TEST_PAIRS)
    rewards = [0.5 * ((pc - rc) - (pr - rr)) for (pc, pr), (rc, rr) in zip(direct["policy"], direct["reference"],
                                                                           strict=True)]
    assert report["beta"] == 0.5
    assert report["implicit_reward_accuracy"] == pytest.approx(sum(r > 0 for r in rewards) / TEST_PAIRS)
    assert report["implicit_reward_margin"] == pytest.approx(sum(rewards) / TEST_PAIRS, abs=1e-4)
    assert report["kl_policy_reference"] > 0 and "win_rate" not in report
    assert report["heldout_pairs"] == report["prompts"] == TEST_PAIRS
    assert [s["decoding"] for s in report["samples"]] == ["greedy"] * TEST_PAIRS + ["sampled"] * TEST_PAIRS
    assert "What is 97 + 4?" in report["samples"][0]["prompt"]
    assert report["generation"] == {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "seed": 42}

    markdown = (out / "report.md").read_text()
    assert "| preference accuracy: log p(chosen) > log p(rejected) | " \
           f"{report['reference']['preference_accuracy']:.3f} | {report['policy']['preference_accuracy']:.3f} |" \
           in markdown
    assert markdown.count("| greedy |") == markdown.count("| sampled |") == TEST_PAIRS
    import matplotlib.image

    assert matplotlib.image.imread(out / "margins.png").shape[:2] == (500, 800)
    # The DPO run logged loss, rewards/*, logps/*, token accuracy, entropy, lr, grad norm: 9 panels, 3 x 3.
    assert matplotlib.image.imread(out / "training_curves.png").shape[:2] == (3 * 320, 3 * 480)


def test_lora_adapter_folder_as_policy(runs, tmp_path):
    """A LoRA adapter folder loads as its base model + the adapter: the implicit-reward margin against the base
    model equals the eval_rewards/margins the LoRA DPO run logged at its end on the same 12 pairs (its reference
    is the base model with adapters off; eval batch 4, so the mean of batch means is the plain mean), to 1e-4
    relative. The run's metrics.jsonl sits in the adapter folder, so the curves are drawn."""
    out = tmp_path / "report"
    assert (runs["lora"] / "adapter_config.json").is_file()
    assert run_cli("--model_name_or_path", str(runs["lora"]), "--ref_model_name_or_path", str(runs["sft"]),
                   "--dataset_name", str(runs["data"]), "--output_dir", str(out), "--max_prompts", "3", *FAST) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["heldout_pairs"] == TEST_PAIRS and report["prompts"] == 3  # --max_prompts: answers only
    final_eval = [r for r in map(json.loads, (runs["lora"] / "metrics.jsonl").read_text().splitlines())
                  if "eval_loss" in r][-1]
    assert final_eval["eval_rewards/margins"] != 0  # the adapter moved the model
    # eval_rewards/margins = β · mean((c − c_ref) − (r − r_ref)) with β = 0.1, the reference being the base model.
    assert report["implicit_reward_margin"] == pytest.approx(final_eval["eval_rewards/margins"], rel=1e-4)
    assert (out / "training_curves.png").is_file()


def test_judge_win_rate_and_prompts_file_and_slice(runs, tmp_path, monkeypatch):
    """--judge module:function gives win_rate = mean judge(prompt, policy answer, reference answer) over the
    greedy answers; --prompts answers those lines; --dataset_test_split takes a slice of a split."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shorter_judge.py").write_text(
        "def judge(prompt, a, b):\n    return 1.0 if len(a) < len(b) else 0.5 if len(a) == len(b) else 0.0\n")
    (tmp_path / "prompts.txt").write_text("What is 2 + 2?\n\nWhat is 10 - 3?\n")
    assert run_cli("--model_name_or_path", str(runs["dpo"]), "--ref_model_name_or_path", str(runs["sft"]),
                   "--dataset_name", str(runs["data"]), "--dataset_test_split", "train[-5:]", "--prompts",
                   "prompts.txt", "--judge", "shorter_judge:judge", "--output_dir", "out", *FAST) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["heldout_pairs"] == 5 and report["prompts"] == 2
    greedy = [s for s in report["samples"] if s["decoding"] == "greedy"]
    assert "What is 2 + 2?" in greedy[0]["prompt"] and "What is 10 - 3?" in greedy[1]["prompt"]
    expected = sum(1.0 if len(s["policy"]) < len(s["reference"]) else 0.5 if len(s["policy"]) == len(s["reference"])
                   else 0.0 for s in greedy) / 2
    assert report["win_rate"] == expected
    assert "| judge's win rate, policy vs reference (0.5 = tie) |  |" in (tmp_path / "out" / "report.md").read_text()


def test_demo_rule_is_a_judge(runs, tmp_path):
    """The DPO demo's rule judge plugs in as --judge examples.demo_rule:judge; its win rate is the demo's own
    examples.demo_rule.win_rate on the same greedy answers."""
    from examples import demo_rule

    assert demo_rule.judge("What is 17 + 25?", "17 + 25 = 42.", "The answer is 42.") == 1.0
    assert demo_rule.judge("What is 17 + 25?", "The answer is 42.", "17 + 25 = 43.") == 0.5
    out = tmp_path / "out"
    assert run_cli("--model_name_or_path", str(runs["dpo"]), "--ref_model_name_or_path", str(runs["sft"]),
                   "--dataset_name", str(runs["data"]), "--judge", "examples.demo_rule:judge", "--output_dir", str(out),
                   *FAST) == 0
    report = json.loads((out / "report.json").read_text())
    greedy = [s for s in report["samples"] if s["decoding"] == "greedy"]
    assert report["win_rate"] == demo_rule.win_rate([s["policy"] for s in greedy], [s["reference"] for s in greedy],
                                                    [s["prompt"] for s in greedy])


def test_dataset_column_map(runs, tmp_path):
    """--dataset_column_map renames other columns onto prompt/chosen/rejected as train.py does: the renamed copy of
    the held-out pairs scores exactly as the original."""
    (tmp_path / "renamed").mkdir()
    rows = [json.loads(line) for line in (runs["data"] / "test.jsonl").read_text().splitlines()]
    (tmp_path / "renamed" / "test.jsonl").write_text("".join(
        json.dumps({"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}) + "\n" for r in rows))
    (tmp_path / "renamed" / "train.jsonl").write_text((tmp_path / "renamed" / "test.jsonl").read_text())
    reports = []
    for data, extra in ((runs["data"], []), (tmp_path / "renamed", ["--dataset_column_map", "question=prompt",
                                                                     "good=chosen", "bad=rejected"])):
        out = tmp_path / f"out{len(reports)}"
        assert run_cli("--model_name_or_path", str(runs["dpo"]), "--ref_model_name_or_path", str(runs["sft"]),
                       "--dataset_name", str(data), "--output_dir", str(out), "--max_prompts", "1", *extra,
                       *FAST) == 0
        reports.append(json.loads((out / "report.json").read_text()))
    assert reports[1]["heldout_pairs"] == TEST_PAIRS
    assert reports[1]["policy"] == reports[0]["policy"] and reports[1]["reference"] == reports[0]["reference"]


@pytest.mark.parametrize("case", ["missing_folder", "hub_offline", "no_columns", "judge_spec", "judge_module",
                                  "judge_function", "judge_value", "bad_slice", "no_split", "temperature"])
def test_bad_input_is_one_line_and_exit_2(case, runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "loud_judge.py").write_text("def judge(prompt, a, b):\n    return 2.0\n")
    (tmp_path / "sft_data").mkdir()
    (tmp_path / "sft_data" / "test.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "sft_data" / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    args = {"--model_name_or_path": str(runs["dpo"]), "--ref_model_name_or_path": str(runs["sft"]),
            "--dataset_name": str(runs["data"]), "--output_dir": "out"}
    expected = {
        "missing_folder": ("--model_name_or_path", str(tmp_path / "no_such_run"), "no such folder"),
        "hub_offline": ("--ref_model_name_or_path", "someone/some-model", "cannot reach the Hugging Face Hub"),
        "no_columns": ("--dataset_name", str(tmp_path / "sft_data"), "has no 'chosen' / 'rejected' column"),
        "judge_spec": ("--judge", "no_colon", "expected module:function"),
        "judge_module": ("--judge", "no_such_module:judge", "cannot import module 'no_such_module'"),
        "judge_function": ("--judge", "loud_judge:missing", "has no function 'missing'"),
        "judge_value": ("--judge", "loud_judge:judge", "the judge returned 2.0 for prompt 0"),
        "bad_slice": ("--dataset_test_split", "test[1:2:3]", "expected a split name"),
        "no_split": ("--dataset_test_split", "validation", "no 'validation' split"),
        "temperature": ("--temperature", "0", "--temperature 0.0: must be above 0"),
    }[case]
    args[expected[0]] = expected[1]
    code = run_cli(*[x for pair in args.items() for x in pair], *FAST)
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]  # besides progress bars
    assert code == 2 and "Traceback" not in stderr
    assert len(errors) == 1 and errors[0] == stderr.strip().splitlines()[-1], stderr
    assert expected[2] in errors[0]
    if case == "no_split":
        assert "--dataset_test_split" in errors[0] and "--dataset_train_split" not in errors[0]


def test_reference_as_the_policy_with_adapters_off(runs):
    """A reference given as the LoRA policy with its adapters switched off (how the demo's --use_peft run has its
    reference, no second model in memory) scores and answers exactly as the base model loaded on its own: same
    pair log-probs, answers and KL, to fp32 rounding (1e-5)."""
    from engine.compare.load import load_side
    from lora import disable_adapters

    examples, tokenizer = heldout_examples(runs)
    policy, _ = load_side(str(runs["lora"]), "--model_name_or_path", torch.device("cpu"))
    base = AutoModelForCausalLM.from_pretrained(runs["sft"]).eval()
    prompts = [e["prompt_ids"] for e in examples]
    options = CompareOptions(max_new_tokens=6, disable_tqdm=True)
    separate = compare(Side("policy", policy), Side("reference", base), tokenizer, examples, prompts, options)
    adapters_off = compare(Side("policy", policy), Side("reference", policy, lambda: disable_adapters(policy)),
                           tokenizer, examples, prompts, options)
    torch.testing.assert_close(adapters_off.logps["reference"], separate.logps["reference"], rtol=0, atol=1e-5)
    assert not torch.allclose(adapters_off.logps["policy"], adapters_off.logps["reference"], atol=1e-3)
    assert adapters_off.answers == separate.answers
    assert adapters_off.summary["kl_policy_reference"] == pytest.approx(separate.summary["kl_policy_reference"],
                                                                        abs=1e-6)
    assert adapters_off.summary["kl_policy_reference"] > 0


def test_readme_commands_run(runs, tmp_path):
    """The README's compare and plot_metrics commands run as written (as scripts, in a folder where output/sft and
    output/dpo are the tiny runs), shortened to 16 pairs and 8 new tokens, and write what the README lists."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## See what alignment did"):readme.index("## More than one process")]
    commands = [line for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
                for line in block.splitlines() if line.strip()]
    assert [c.split()[1] for c in commands] == ["scripts/compare.py", "scripts/plot_metrics.py"]
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "sft").symlink_to(runs["sft"], target_is_directory=True)
    (tmp_path / "output" / "dpo").symlink_to(runs["dpo"], target_is_directory=True)
    (tmp_path / "data").symlink_to(REPO / "data", target_is_directory=True)
    shorten = {"scripts/compare.py": ["--max_eval_samples", "16", "--max_new_tokens", "8", "--disable_tqdm"],
               "scripts/plot_metrics.py": ["--output", "curves.png"]}  # not into the shared run folder
    for command in commands:
        args = shlex.split(command)
        result = subprocess.run([sys.executable, str(REPO / args[1]), *args[2:], *shorten[args[1]]], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "report" / "report.json").read_text())["heldout_pairs"] == 16
    for name in ("report.md", "margins.png", "training_curves.png"):
        assert (tmp_path / "report" / name).is_file()
    assert (tmp_path / "curves.png").is_file()
