"""Bad input, through the real CLI: each case exits non-zero with ONE line on stderr that names the problem and
the fix — no traceback — and leaves no output that looks like a finished model (no config.json /
model.safetensors / adapter_config.json in the output folder).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data.defaults import DEFAULT_TOKENIZER_DIR
from engine.model import build_tiny_smollm3
from engine.run_lock import RunLock

REPO = Path(__file__).resolve().parents[1]
FINISHED_MARKERS = ("config.json", "model.safetensors", "adapter_config.json")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model + tokenizer on disk, and small valid/invalid data files."""
    root = tmp_path_factory.mktemp("cli_errors")
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER_DIR)
    model = build_tiny_smollm3(tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    no_template_dir = root / "model_no_template"
    model.save_pretrained(no_template_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(no_template_dir)
    (no_template_dir / "chat_template.jinja").unlink(missing_ok=True)

    corrupt_dir = root / "model_corrupt"
    model.save_pretrained(corrupt_dir)
    weights = corrupt_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])

    def jsonl(name: str, rows: list) -> str:
        path = root / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    chat = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]}
            for i in range(8)]
    pairs = [{"prompt": f"What is {i} + 1?", "chosen": f" {i + 1}.", "rejected": f" {i + 2}."} for i in range(8)]
    files = {
        "chat": jsonl("chat.jsonl", chat),
        "pairs": jsonl("pairs.jsonl", pairs),
        "empty": str(root / "empty.jsonl"),
        "corrupt": str(root / "corrupt.jsonl"),
        "wrong_columns": jsonl("wrong.jsonl", [{"question": "a", "reply": "b"}] * 4),
        "no_rejected": jsonl("no_rejected.jsonl", [{"prompt": "a", "chosen": " b"}] * 4),
        "empty_content": jsonl("empty_content.jsonl", chat[:3] + [
            {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}]),
        "non_string": jsonl("non_string.jsonl", [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}] * 2),
        "identical": jsonl("identical.jsonl", pairs[:3] + [{"prompt": "Q?", "chosen": " A.", "rejected": " A."}]),
        "unknown_role": jsonl("unknown_role.jsonl", [
            {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}] * 2),
        "long_prompt": jsonl("long_prompt.jsonl", [
            {"prompt": "word " * 300, "chosen": " yes.", "rejected": " no."}] * 4),
    }
    good_chat = "".join(json.dumps(r) + "\n" for r in chat)
    files["not_utf8"] = str(root / "latin1.jsonl")
    Path(files["not_utf8"]).write_bytes(good_chat.encode() + '{"messages": [{"role": "user", "content": "caf\u00e9"}, '
                                        '{"role": "assistant", "content": "x"}]}\n'.encode("latin-1"))
    files["not_utf8_csv"] = str(root / "latin1.csv")
    Path(files["not_utf8_csv"]).write_bytes("prompt,chosen,rejected\nq,a,b\ncaf\u00e9,a,b\n".encode("latin-1"))
    for kind, value in (("list", ["hi"]), ("object", {"text": "hi"}), ("number", 3.5), ("bool", True)):
        files[f"content_{kind}"] = jsonl(f"content_{kind}.jsonl", chat[:3] + [
            {"messages": [{"role": "user", "content": value}, {"role": "assistant", "content": "x"}]}])
    for field, value in (("prompt", 7), ("chosen", ["a"]), ("rejected", {"a": 1})):
        files[f"pair_{field}"] = jsonl(f"pair_{field}.jsonl", pairs[:3] + [{**pairs[3], field: value}])
    files["chat_changed"] = jsonl("chat_changed.jsonl", chat[:7])
    # issue 12, more hostile data: each refused naming the row and field (or the file)
    files["content_null"] = jsonl("content_null.jsonl", chat[:3] + [
        {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]}])
    files["messages_text"] = jsonl("messages_text.jsonl", chat[:3] + [{"messages": "hello"}])
    files["no_role"] = jsonl("no_role.jsonl", chat[:3] + [
        {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}])
    files["chosen_empty"] = jsonl("chosen_empty.jsonl", pairs[:3] + [{**pairs[3], "chosen": ""}])
    files["prompt_null"] = jsonl("prompt_null.jsonl", pairs[:3] + [{**pairs[3], "prompt": None}])
    files["row_not_object"] = str(root / "row_not_object.jsonl")
    Path(files["row_not_object"]).write_text("".join(json.dumps(r) + "\n" for r in chat[:3]) + "[1, 2]\n")
    files["bom_only"] = str(root / "bom_only.jsonl")
    Path(files["bom_only"]).write_bytes(b"\xef\xbb\xbf\n")
    files["bom_broken"] = str(root / "bom_broken.jsonl")
    Path(files["bom_broken"]).write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in chat[:2]).encode()
                                          + b'{"messages": oops}\n')
    files["utf16"] = str(root / "utf16.jsonl")
    Path(files["utf16"]).write_bytes("".join(json.dumps(r) + "\n" for r in chat).encode("utf-16"))
    files["messages_null"] = jsonl("messages_null.jsonl", chat[:3] + [{"messages": None}])
    no_weights_dir = root / "model_no_weights"  # config and tokenizer, the weights never copied
    model.config.save_pretrained(no_weights_dir)
    tokenizer.save_pretrained(no_weights_dir)
    files["no_weights"] = str(no_weights_dir)
    bert_dir = root / "bert"
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=tokenizer.vocab_size)).save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    files["bert"] = str(bert_dir)
    Path(files["empty"]).write_text("")
    Path(files["corrupt"]).write_text('{"messages": [1, 2\n{"oops"\n')
    sft_ckpt = root / "sft_run" / "checkpoint-1"
    return {"root": root, "model": str(model_dir), "no_template": str(no_template_dir),
            "corrupt_model": str(corrupt_dir), "sft_ckpt": sft_ckpt, **files}


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def base(w, method="sft", data=None, out="out"):
    data = data or (w["chat"] if method == "sft" else w["pairs"])
    return ["--method", method, "--model_name_or_path", w["model"], "--dataset_name", data, "--output_dir",
            str(w["root"] / out), "--bf16", "False", "--max_steps", "1", "--disable_tqdm", "--save_steps", "0",
            "--eval_steps", "0", "--per_device_train_batch_size", "2"]


# (case id, args builder, words the one-line error must contain)
CASES = [
    ("missing-file", lambda w: base(w, data="/no/such/file.jsonl"), ["/no/such/file.jsonl"]),
    ("empty-file", lambda w: base(w, data=w["empty"]), ["empty"]),
    ("corrupt-json", lambda w: base(w, data=w["corrupt"]), ["corrupt.jsonl"]),
    ("wrong-columns-sft", lambda w: base(w, data=w["wrong_columns"]), ["question"]),
    ("missing-column-dpo", lambda w: base(w, "dpo", data=w["no_rejected"]), ["rejected"]),
    ("empty-content", lambda w: base(w, data=w["empty_content"]), ["row 3"]),
    ("non-string-content", lambda w: base(w, data=w["non_string"]), ["content"]),
    ("chosen-equals-rejected", lambda w: base(w, "dpo", data=w["identical"]), ["identical"]),
    ("prompt-longer-than-max-length", lambda w: base(w, "dpo", data=w["long_prompt"]) + ["--max_length", "64"],
     ["max_length"]),
    ("unknown-role", lambda w: base(w, data=w["unknown_role"]), ["wizard"]),
    ("no-chat-template", lambda w: base(w) + ["--model_name_or_path", w["no_template"]], ["chat template"]),
    ("nonexistent-model", lambda w: base(w) + ["--model_name_or_path", "/no/such/model"], ["/no/such/model"]),
    ("corrupt-safetensors", lambda w: base(w) + ["--model_name_or_path", w["corrupt_model"]], ["corrupt"]),
    ("unknown-flag", lambda w: base(w) + ["--learnig_rate", "1e-5"], ["learnig_rate"]),
    ("negative-learning-rate", lambda w: base(w) + ["--learning_rate", "-1e-5"], ["--learning_rate"]),
    ("beta-zero", lambda w: base(w, "dpo") + ["--beta", "0"], ["--beta"]),
    ("robust-label-smoothing", lambda w: base(w, "dpo") + ["--loss_type", "robust", "--label_smoothing", "0.5"],
     ["--label_smoothing"]),
    ("grad-accumulation-zero", lambda w: base(w) + ["--gradient_accumulation_steps", "0"],
     ["--gradient_accumulation_steps"]),
    ("max-length-below-prompt", lambda w: base(w, "dpo") + ["--max_length", "4"], ["max_length"]),
    ("output-dir-is-file", lambda w: base(w) + ["--output_dir", w["chat"]], ["is a file"]),
    ("output-dir-unwritable", lambda w: base(w) + ["--output_dir", "/proc/nanopost-out"], ["cannot write"]),
    ("resume-other-method", lambda w: base(w, "dpo", out="sft_run") + [
        "--resume_from_checkpoint", str(w["sft_ckpt"])], ["sft checkpoint"]),
    ("resume-other-model", lambda w: base(w, out="sft_run") + [
        "--model_name_or_path", w["no_template"], "--resume_from_checkpoint", str(w["sft_ckpt"])],
     ["trained from"]),
    ("resume-missing", lambda w: base(w) + ["--resume_from_checkpoint", "/no/such/checkpoint-3"],
     ["not a complete checkpoint"]),
    ("yaml-unknown-key", lambda w: base(w) + ["--config", _yaml(w, "lerning_rate: 1.0\n")], ["lerning_rate"]),
    ("yaml-missing", lambda w: base(w) + ["--config", "/no/such.yaml"], ["no such file"]),
    ("unknown-loss-type", lambda w: base(w, "dpo") + ["--loss_type", "sigmoidd"], ["sigmoidd"]),
    ("bad-boolean", lambda w: base(w) + ["--bf16", "maybe"], ["maybe"]),
    ("missing-split", lambda w: base(w) + ["--dataset_train_split", "nope"], ["nope"]),
    ("lora-target-matches-nothing", lambda w: base(w) + ["--use_peft", "--lora_target_modules", "no_such_proj"],
     ["no_such_proj"]),
    ("bad-eval-strategy", lambda w: base(w) + ["--eval_strategy", "sometimes"], ["--eval_strategy", "steps"]),
    ("unknown-best-metric", lambda w: base(w, "dpo") + ["--eval_strategy", "steps", "--eval_steps", "1",
                                                        "--metric_for_best_model", "bleu"],
     ["--metric_for_best_model", "rewards/accuracies"]),
    ("hub-id-without-push", lambda w: base(w) + ["--hub_model_id", "you/model"], ["--push_to_hub"]),
    ("refused-trl-flag", lambda w: base(w) + ["--load_in_4bit"], ["--load_in_4bit", "bitsandbytes"]),
    ("unknown-tracker", lambda w: base(w) + ["--report_to", "mlflow"], ["mlflow"]),
    ("bad-optim-args", lambda w: base(w) + ["--optim", "sgd", "--optim_args", "betas=0.9"], ["--optim_args"]),
    # issue 12: hostile data (each refused naming the file, or the row and field)
    ("not-utf8-jsonl", lambda w: base(w, data=w["not_utf8"]), ["latin1.jsonl", "not utf-8", "byte offset"]),
    ("not-utf8-csv", lambda w: base(w, "dpo", data=w["not_utf8_csv"]), ["latin1.csv", "not utf-8", "byte offset"]),
    ("content-is-a-list", lambda w: base(w, data=w["content_list"]), ["row 3", "messages[].content", "a list"]),
    ("content-is-an-object", lambda w: base(w, data=w["content_object"]), ["row 3", "messages[].content", "object"]),
    ("content-is-a-number", lambda w: base(w, data=w["content_number"]), ["row 3", "messages[].content", "number"]),
    ("content-is-a-boolean", lambda w: base(w, data=w["content_bool"]), ["row 3", "messages[].content", "boolean"]),
    ("prompt-is-a-number", lambda w: base(w, "dpo", data=w["pair_prompt"]), ["row 3", "'prompt'", "number"]),
    ("chosen-is-a-list", lambda w: base(w, "dpo", data=w["pair_chosen"]), ["row 3", "'chosen'", "a list"]),
    ("rejected-is-an-object", lambda w: base(w, "dpo", data=w["pair_rejected"]), ["row 3", "'rejected'", "object"]),
    ("messages-is-null", lambda w: base(w, data=w["messages_null"]), ["row 3", "messages"]),
    ("not-a-causal-lm", lambda w: base(w) + ["--model_name_or_path", w["bert"]], ["bert", "not a causal"]),
    ("content-is-null", lambda w: base(w, data=w["content_null"]), ["row 3", "content"]),
    ("messages-is-text", lambda w: base(w, data=w["messages_text"]), ["row 3", "messages"]),
    ("message-without-role", lambda w: base(w, data=w["no_role"]), ["row 3", "role"]),
    ("chosen-is-empty", lambda w: base(w, "dpo", data=w["chosen_empty"]), ["row 3", "chosen"]),
    ("prompt-is-null", lambda w: base(w, "dpo", data=w["prompt_null"]), ["row 3", "prompt"]),
    ("row-is-not-an-object", lambda w: base(w, data=w["row_not_object"]), ["row_not_object.jsonl:4", "json object"]),
    ("only-a-byte-order-mark", lambda w: base(w, data=w["bom_only"]), ["bom_only.jsonl", "empty"]),
    ("byte-order-mark-then-a-broken-line", lambda w: base(w, data=w["bom_broken"]),
     ["bom_broken.jsonl:3", "not valid json"]),
    ("utf-16-file", lambda w: base(w, data=w["utf16"]), ["utf16.jsonl", "not utf-8"]),
    ("ref-model-not-a-causal-lm", lambda w: base(w, "dpo") + ["--ref_model_name_or_path", w["bert"]],
     ["bert", "not a causal"]),
    ("model-folder-without-weights", lambda w: base(w) + ["--model_name_or_path", str(w["no_weights"])],
     ["model_no_weights"]),
    # issue 12: two runs, damaged checkpoints, a resume that cannot be exact
    ("output-dir-locked", lambda w: base(w, out="locked_run"), ["another run is writing", "locked_run", "pid"]),
    ("resume-damaged-checkpoint", lambda w: base(w, out="damaged_run") + [
        "--resume_from_checkpoint", str(w["root"] / "damaged_run" / "checkpoint-1")],
     ["checkpoint-1 is damaged", "optimizer.pt is truncated"]),
    ("resume-latest-all-damaged", lambda w: base(w, out="damaged_run") + ["--resume_from_checkpoint", "latest"],
     ["every checkpoint", "damaged"]),
    ("resume-damaged-optimizer-unverified", lambda w: base(w, out="old_damaged_run") + [
        "--resume_from_checkpoint", str(w["root"] / "old_damaged_run" / "checkpoint-1")],
     ["cannot read the optimizer state", "optimizer.pt"]),
    ("resume-damaged-weights-unverified", lambda w: base(w, out="old_damaged_weights") + [
        "--resume_from_checkpoint", str(w["root"] / "old_damaged_weights" / "checkpoint-1")],
     ["cannot read the model weights", "checkpoint-1"]),
    ("resume-damaged-state-unverified", lambda w: base(w, out="damaged_state") + [
        "--resume_from_checkpoint", str(w["root"] / "damaged_state" / "checkpoint-1")],
     ["nanopost_state.json", "checkpoint-1"]),
    ("resume-damaged-manifest", lambda w: base(w, out="damaged_manifest") + [
        "--resume_from_checkpoint", str(w["root"] / "damaged_manifest" / "checkpoint-1")],
     ["manifest.json", "checkpoint-1"]),
    ("resume-file-missing", lambda w: base(w, out="missing_file") + [
        "--resume_from_checkpoint", str(w["root"] / "missing_file" / "checkpoint-1")],
     ["rng_state.pth", "missing"]),
    ("damaged-reference-cache", lambda w: base(w, "dpo", out="damaged_cache") + ["--precompute_ref_log_probs"],
     ["reference log-prob cache", "ref_logps-"]),
    ("resume-changed-batch-size", lambda w: base(w, out="sft_run") + [
        "--resume_from_checkpoint", str(w["sft_ckpt"]), "--per_device_train_batch_size", "1"],
     ["--per_device_train_batch_size was 2, now 1", "--ignore_resume_mismatch"]),
    ("resume-changed-accumulation", lambda w: base(w, out="sft_run") + [
        "--resume_from_checkpoint", str(w["sft_ckpt"]), "--gradient_accumulation_steps", "2"],
     ["--gradient_accumulation_steps was 1, now 2"]),
    ("resume-changed-max-length", lambda w: base(w, out="sft_run") + [
        "--resume_from_checkpoint", str(w["sft_ckpt"]), "--max_length", "64"], ["--max_length was", "now 64"]),
    ("resume-changed-data", lambda w: base(w, out="sft_run", data=w["chat_changed"]) + [
        "--resume_from_checkpoint", str(w["sft_ckpt"])], ["prepared training data changed"]),
    ("nan-loss", lambda w: base(w, out="nan_run") + ["--learning_rate", "1e30", "--max_steps", "3",
                                                    "--max_grad_norm", "0"], ["non-finite", "step"]),
]


def _yaml(w, text: str) -> str:
    path = w["root"] / "bad.yaml"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def sft_checkpoint(workspace):
    """A real 1-step SFT checkpoint, for the resume-from-the-wrong-thing cases."""
    result = run_cli(base(workspace, out="sft_run") + ["--save_steps", "1"], workspace["root"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert (workspace["sft_ckpt"] / "trainer_state.json").is_file()
    return workspace["sft_ckpt"]


@pytest.fixture(scope="module")
def faulty_runs(workspace, sft_checkpoint):
    """Copies of the 1-step run with damage: optimizer.pt cut short (with its manifest, and without one, as from an
    older nanopost); model.safetensors cut short (no manifest); and an output folder another run holds."""
    root = workspace["root"]

    def damaged(name: str, file: str, keep_manifest: bool) -> None:
        shutil.copytree(root / "sft_run", root / name)
        path = root / name / "checkpoint-1" / file
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        if not keep_manifest:
            (root / name / "checkpoint-1" / "manifest.json").unlink()

    damaged("damaged_run", "optimizer.pt", keep_manifest=True)
    damaged("damaged_state", "nanopost_state.json", keep_manifest=False)
    shutil.copytree(root / "sft_run", root / "damaged_manifest")
    (root / "damaged_manifest" / "checkpoint-1" / "manifest.json").write_text('{"format": 1, "files": {"model')
    shutil.copytree(root / "sft_run", root / "missing_file")
    (root / "missing_file" / "checkpoint-1" / "rng_state.pth").unlink()
    cache_run = run_cli(base(workspace, "dpo", out="damaged_cache") + ["--precompute_ref_log_probs"], root)
    assert cache_run.returncode == 0, cache_run.stderr[-2000:]
    for cache in (root / "damaged_cache").glob("ref_logps-*.pt"):
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    damaged("old_damaged_run", "optimizer.pt", keep_manifest=False)
    damaged("old_damaged_weights", "model.safetensors", keep_manifest=False)
    lock = RunLock(root / "locked_run", command="python train.py (the first run)")
    lock.acquire()
    yield
    lock.release()


def test_catalogue_has_at_least_50_cases():
    assert len(CASES) >= 50


@pytest.mark.parametrize("case_id, build, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_error(workspace, sft_checkpoint, faulty_runs, case_id, build, words):
    args = build(workspace)
    output_dir = Path(args[args.index("--output_dir") + 1]) if "--output_dir" in args else None
    before = {p.name for p in output_dir.iterdir()} if output_dir and output_dir.is_dir() else set()
    result = run_cli(args, workspace["root"])
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, f"exit {result.returncode}; stderr tail:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(error_lines) == 1, result.stderr[-3000:]
    for word in words:
        assert word.lower() in error_lines[0].lower(), error_lines[0]
    if output_dir is not None and output_dir.is_dir() and case_id != "output-dir-is-file":
        new_files = {p.name for p in output_dir.iterdir()} - before
        assert not new_files & set(FINISHED_MARKERS), f"{case_id} left {sorted(new_files)}"

