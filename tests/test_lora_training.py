"""LoRA through the engine: what `--use_peft` writes, reads, trains and resumes.

- `--use_peft` output: adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained(base,
  output_dir)` loads as is, giving the logits of our trained model; `--merge_adapter` also writes a plain model
  in <output_dir>/merged whose logits equal the adapter model's.
- An adapter saved by PEFT is a valid `--model_name_or_path` (with `--use_peft`): its base model is loaded, then
  the adapter, which keeps training (and is saved again against the real base model).
- Only adapter parameters train; PEFT's trainable-parameter line is printed before training starts.
- Resume with adapters continues from the checkpoint's step with the same losses and adapter as a straight run.

Tiny SmolLM3 (the engine's default architecture: tied embeddings) in fp32 on CPU.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import engine.setup
from engine.config import parse_config
from engine.errors import UserError
from engine.forward import plain_model
from engine.loop import train
from engine.sft import SFTMethod
from lora import lora_parameters
from tests.trl_harness import make_tiny_model_dir

SEED = 42
WORDS = ["hello", "world", "good", "morning", "night", "blue", "red", "colour", "two", "four", "fox", "dog"]
# r 8 on q_proj (64 -> 64) and v_proj (64 -> 2 kv heads x 16 = 32) of 2 layers:
# 2 x [8 x (64 + 64) + 8 x (64 + 32)] = 2 x (1024 + 768) = 3,584 adapter parameters.
EXPECTED_TRAINABLE = 3584
LORA_FLAGS = ["--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.0",
              "--lora_target_modules", "q_proj", "v_proj"]


def sft_rows(n: int) -> list[dict]:
    return [{"text": " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(2 + i % 5)) + f" {i}"}
            for i in range(n)]


def dpo_rows(n: int) -> list[dict]:
    return [{"prompt": f"What is {WORDS[i % len(WORDS)]} {i}?",
             "chosen": " " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 4)),
             "rejected": " " + " ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(2 + i % 3))}
            for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def base_flags(method: str, model: Path | str, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--method", method, "--model_name_or_path", str(model), "--dataset_name", str(data),
            "--output_dir", str(output_dir), "--bf16", "False", "--logging_steps", "1", "--save_steps", "0",
            "--eval_steps", "0", "--disable_tqdm", "--seed", str(SEED), "--learning_rate", "1e-2",
            "--demo_eval_samples", "0", *extra]


def load_base(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@torch.no_grad()
def logits_of(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    was_training = model.training
    model.eval()
    logits = model(**inputs, use_cache=False).logits  # (B, T, V)
    model.train(was_training)
    return logits


def max_rel(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max|ours - reference| / max|reference|: the project's tensor tolerance rule."""
    return ((ours - reference).abs().max() / reference.abs().max()).item()


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora_training")


@pytest.fixture(scope="module")
def model_dir(workdir, tokenizer) -> Path:
    """A tiny SmolLM3 saved WITH its tokenizer, so --model_name_or_path alone is a complete model folder."""
    folder = make_tiny_model_dir(workdir, "smollm3", vocab_size=len(tokenizer), seed=3)
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def probe(tokenizer) -> dict[str, torch.Tensor]:
    """A fixed 2-row input for logits comparisons (second row right-padded)."""
    batch = tokenizer(["good morning blue fox 7", "two four"], return_tensors="pt", padding=True)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@pytest.fixture(scope="module")
def sft_data(workdir) -> Path:
    return write_jsonl(workdir / "sft.jsonl", sft_rows(8))


@pytest.fixture(scope="module")
def peft_run(workdir, model_dir, sft_data, probe):
    """3 LoRA SFT steps with --merge_adapter. Records: stdout, per-step gradient / requires_grad names, and the
    logits of the trained in-memory model on `probe` (taken when the loop hands it to save_final_model)."""
    output_dir = workdir / "out_peft"
    grad_names: list[set[str]] = []
    trainable_names: list[set[str]] = []
    final: dict = {}

    def hook(step: int, model: torch.nn.Module) -> None:
        grad_names.append({n for n, p in model.named_parameters() if p.grad is not None})
        trainable_names.append({n for n, p in model.named_parameters() if p.requires_grad})
        final["lora_names"] = set(lora_parameters(model))

    original_save = engine.setup.save_final_model

    def save_final_model(config, accelerator, model, tokenizer, out):
        unwrapped = plain_model(accelerator, model)  # the transformers model inside the prepared one
        final["logits"] = logits_of(unwrapped, probe)
        final["base_state"] = {n: p.detach().clone() for n, p in unwrapped.named_parameters() if "lora_" not in n}
        return original_save(config, accelerator, model, tokenizer, out)

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setattr(engine.setup, "save_final_model", save_final_model)
        result = train(parse_config(base_flags("sft", model_dir, sft_data, output_dir, *LORA_FLAGS,
                                                "--per_device_train_batch_size", "4", "--max_steps", "3",
                                                "--merge_adapter", "true")), step_hook=hook)
    return dict(result=result, output_dir=output_dir, stdout=stdout.getvalue(), grad_names=grad_names,
                trainable_names=trainable_names, **final)


# ---------------------------------------------------------------------- what --use_peft writes


def test_output_dir_holds_a_peft_adapter_not_a_full_model(peft_run, model_dir):
    """adapter_config.json (PEFT's LoraConfig fields: r 8, alpha 16, q/v targets, base = the model folder) and
    adapter_model.safetensors with one (A, B) pair per adapted layer under PEFT's key names; no full model."""
    output_dir = peft_run["output_dir"]
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 8, 16)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(model_dir)
    weights = load_file(str(output_dir / "adapter_model.safetensors"))
    assert len(weights) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(k.startswith("base_model.model.model.layers.") and ".lora_" in k for k in weights)
    assert sum(v.numel() for v in weights.values()) == EXPECTED_TRAINABLE
    assert not (output_dir / "model.safetensors").exists()
    assert (output_dir / "tokenizer_config.json").is_file()


def test_peft_loads_the_adapter_as_is_and_gives_our_logits(peft_run, model_dir, probe):
    """`PeftModel.from_pretrained(base, output_dir)` loads every adapter tensor (each equals the file's) and its
    logits equal those of our trained in-memory model (1e-5 of max|logit|; same fp32 ops, seen ~1e-7 or 0).
    The adapter matters: those logits differ from the base model's by far more than the tolerance."""
    from peft import PeftModel

    output_dir = peft_run["output_dir"]
    peft_model = PeftModel.from_pretrained(load_base(model_dir), str(output_dir)).eval()
    saved = load_file(str(output_dir / "adapter_model.safetensors"))
    loaded = {k.replace(".default.", "."): v for k, v in peft_model.state_dict().items() if ".lora_" in k}
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    peft_logits = logits_of(peft_model, probe)
    error = max_rel(peft_logits, peft_run["logits"])
    print(f"PEFT-loaded adapter vs our trained model: logits max rel error {error:.2e}")
    assert error <= 1e-5
    assert max_rel(logits_of(load_base(model_dir), probe), peft_run["logits"]) > 1e-3


def test_merged_model_loads_with_transformers_and_matches_the_adapter_model(peft_run, model_dir, probe):
    """<output_dir>/merged is a plain model (the base's parameter names, no lora_ keys) whose logits equal the
    PEFT adapter model's within 1e-5 of max|logit| (W + s*B*A folded once in fp32)."""
    from peft import PeftModel

    merged_dir = peft_run["output_dir"] / "merged"
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    assert set(merged.state_dict()) == set(load_base(model_dir).state_dict())
    peft_model = PeftModel.from_pretrained(load_base(model_dir), str(peft_run["output_dir"])).eval()
    error = max_rel(logits_of(merged, probe), logits_of(peft_model, probe))
    print(f"merged model vs PEFT adapter model: logits max rel error {error:.2e}")
    assert error <= 1e-5
    assert (merged_dir / "tokenizer_config.json").is_file()


def test_only_adapter_parameters_get_gradients_and_the_base_is_unchanged(peft_run, model_dir):
    """In every real training step the parameters with a gradient, and those with requires_grad, are exactly the
    lora_A / lora_B weights; after training every base weight is bit-identical to the model on disk."""
    lora_names = peft_run["lora_names"]
    assert len(lora_names) == 8
    assert all(names == lora_names for names in peft_run["grad_names"])
    assert all(names == lora_names for names in peft_run["trainable_names"])
    on_disk = dict(load_base(model_dir).named_parameters())
    renamed = {n.replace(".base_layer.", "."): p for n, p in peft_run["base_state"].items()}
    assert renamed.keys() == on_disk.keys()
    assert all(torch.equal(renamed[n], on_disk[n].detach()) for n in on_disk)


def test_trainable_parameter_line_is_printed_before_training(peft_run, model_dir):
    """PEFT's `print_trainable_parameters` line, with PEFT's own counts for the same LoraConfig on the same base
    (trainable 3,584 = the count worked out at EXPECTED_TRAINABLE), printed before the run's last line."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(load_base(model_dir), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                                 task_type="CAUSAL_LM"))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert trainable == EXPECTED_TRAINABLE
    line = (f"[nanopost] trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}")
    lines = peft_run["stdout"].splitlines()
    assert line in lines, peft_run["stdout"]
    done = next(i for i, text in enumerate(lines) if text.startswith("[nanopost] done"))
    assert lines.index(line) < done


# ---------------------------------------------------------------------- an adapter saved by PEFT, continued


@pytest.fixture(scope="module")
def peft_adapter_dir(workdir, model_dir, tokenizer) -> Path:
    """An adapter made and saved by PEFT itself: r 4, alpha 8, four attention projections, random non-zero B
    (`init_lora_weights=False`) so it changes the model; the tokenizer saved next to it, as TRL does."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32), config)
    folder = workdir / "peft_adapter"
    peft_model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def test_adapter_saved_by_peft_continues_training(workdir, model_dir, peft_adapter_dir, sft_data):
    """--model_name_or_path <PEFT adapter folder> --use_peft: the base named in its adapter_config.json is loaded,
    then the adapter (its own r 4 / alpha 8 / targets; --lora_r 16 is not used), trainable.

    Expected: before step 1 our adapter weights equal PEFT's file bit for bit; step 1's loss (one batch = all 8
    rows, so it is the dataset's token-mean NLL) equals that NLL under PEFT's adapter model within 1e-5, and not
    the base model's; only the adapter trains; the saved result names the real base model and PEFT loads it."""
    from peft import PeftModel

    saved = {k.removeprefix("base_model.model."): v
             for k, v in load_file(str(peft_adapter_dir / "adapter_model.safetensors")).items()}
    batches: list[dict] = []
    start: dict = {}
    original_loss = SFTMethod.loss

    def loss(self, model, batch, window, train=True):
        batches.append({k: v.clone() for k, v in batch.items()})
        return original_loss(self, model, batch, window, train)

    def hook(step: int, model: torch.nn.Module) -> None:
        if step == 1:
            start["adapter"] = {k: v.detach().clone() for k, v in lora_parameters(model).items()}
            start["grads"] = {n for n, p in model.named_parameters() if p.grad is not None}

    output_dir = workdir / "out_continued"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SFTMethod, "loss", loss)
        result = train(parse_config(base_flags("sft", peft_adapter_dir, sft_data, output_dir, "--use_peft",
                                                "--lora_r", "16", "--per_device_train_batch_size", "8",
                                                "--max_steps", "2")), step_hook=hook)

    assert start["adapter"].keys() == saved.keys() and len(saved) == 2 * 4 * 2  # 2 layers x 4 targets x (A, B)
    assert all(torch.equal(start["adapter"][k], saved[k]) for k in saved)
    assert start["grads"] == set(saved)

    def mean_nll(model) -> float:
        batch = batches[0]
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
        labels = batch["labels"][:, 1:]  # (B, T-1)
        mask = labels != -100
        return float(-(logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum() / mask.sum())

    expected = mean_nll(PeftModel.from_pretrained(load_base(model_dir), str(peft_adapter_dir)).eval())
    assert result.logs[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert abs(mean_nll(load_base(model_dir)) - expected) > 1e-3  # the adapter changed the starting loss

    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir)
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    continued = PeftModel.from_pretrained(load_base(model_dir), str(output_dir))
    trained = {k.replace(".default.", "."): v for k, v in continued.state_dict().items() if ".lora_B." in k}
    assert any(not torch.equal(v, saved[k.removeprefix("base_model.model.")]) for k, v in trained.items())


def test_adapter_folder_without_use_peft_is_a_clear_error(workdir, peft_adapter_dir, sft_data):
    """Full fine-tuning cannot start from an adapter folder: say so and name --use_peft (exit 2 via UserError)."""
    with pytest.raises(UserError, match="is a LoRA adapter.*--use_peft"):
        train(parse_config(base_flags("sft", peft_adapter_dir, sft_data, workdir / "out_error")))


def test_adapter_folder_with_dpo_is_refused_not_trained_against_the_base(workdir, peft_adapter_dir):
    """TRL's DPO reference for a pre-trained adapter is a frozen copy of it; ours would be the base (adapters off),
    another objective, so the engine refuses and points to merging the adapter first."""
    data = write_jsonl(workdir / "dpo_error.jsonl", dpo_rows(4))
    with pytest.raises(UserError, match="--method dpo is not supported.*merge"):
        train(parse_config(base_flags("dpo", peft_adapter_dir, data, workdir / "out_dpo_error", "--use_peft")))


def test_adapter_config_without_base_model_is_a_clear_error(workdir, peft_adapter_dir, sft_data):
    """An adapter_config.json with no base_model_name_or_path: the base is unknown; say which file and field."""
    folder = workdir / "adapter_without_base"
    folder.mkdir()
    config = json.loads((peft_adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="no base_model_name_or_path"):
        train(parse_config(base_flags("sft", folder, sft_data, workdir / "out_error2", "--use_peft")))


# ---------------------------------------------------------------------- resume with adapters


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_resume_with_adapters_continues_from_the_checkpoint_step(workdir, model_dir, method):
    """4 steps straight (checkpoint at 2), then a second run resumed from that checkpoint-2 to step 4.

    6 rows, batch 2: 3 steps per epoch, so the resumed part crosses into epoch 1 (a new permutation). SFT uses
    lora_dropout 0.1, so the restored RNG state matters too (DPO turns dropout off). Expected: the resumed run
    starts at step 3 (the step hook sees only steps 3 and 4), logs steps 3 and 4 with exactly the straight run's
    values, and ends with exactly the straight run's adapter; checkpoint-2 holds an adapter, not a full model."""
    rows = sft_rows(6) if method == "sft" else dpo_rows(6)
    data = write_jsonl(workdir / f"resume_{method}.jsonl", rows)
    flags = [*LORA_FLAGS, "--per_device_train_batch_size", "2", "--max_steps", "4", "--save_steps", "2"]
    if method == "sft":
        flags[flags.index("--lora_dropout") + 1] = "0.1"

    straight_dir = workdir / f"resume_{method}_straight"
    straight = train(parse_config(base_flags(method, model_dir, data, straight_dir, *flags)))
    checkpoint = straight_dir / "checkpoint-2"
    assert (checkpoint / "adapter_config.json").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()

    steps_run: list[int] = []
    resumed_dir = workdir / f"resume_{method}_resumed"
    resumed = train(parse_config(base_flags(method, model_dir, data, resumed_dir, *flags,
                                            "--resume_from_checkpoint", str(checkpoint))),
                    step_hook=lambda step, model: steps_run.append(step))

    assert steps_run == [3, 4]
    assert resumed.global_step == 4
    straight_logs = {log["step"]: log for log in straight.logs if "loss" in log}
    resumed_logs = [log for log in resumed.logs if "loss" in log]
    assert [log["step"] for log in resumed_logs] == [3, 4]
    for log in resumed_logs:
        assert log == straight_logs[log["step"]]
    assert straight_logs[4]["loss"] != straight_logs[2]["loss"]
    final_straight = load_file(str(straight_dir / "adapter_model.safetensors"))
    final_resumed = load_file(str(resumed_dir / "adapter_model.safetensors"))
    assert final_resumed.keys() == final_straight.keys()
    assert all(torch.equal(final_resumed[k], final_straight[k]) for k in final_straight)
