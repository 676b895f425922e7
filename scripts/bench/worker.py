"""One benchmark run in its own process (so peak memory is this run's): `python worker.py SPEC.json`.

SPEC (written by scripts/bench.py): {"impl": "ours"|"trl", "job", "shape", "dtype", "steps", "warmup",
"model_dir", "data_file", "work_dir", "result", "profile"}. Writes the result JSON: per-step timestamps, the
cumulative `num_tokens` both engines log, padding counts, peak memory.

Timing is symmetric: a timestamp at the same point of every optimizer step in both engines, after gradient
clipping and before `optimizer.step()` (ours: `engine.loop.train`'s step_hook; TRL: the `on_pre_optimizer_step`
callback). The interval between two stamps is one full step (optimizer update, next batch, forward, backward).
With a profile requested, one extra step after the timed ones runs under torch.profiler (not in the timings).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # this worktree's engine/, not an installed copy

import torch  # noqa: E402
from workload import LORA, PADDING_FREE, TOKENIZER_DIR, gemm_peaks  # noqa: E402

COMMON = dict(learning_rate=1e-6, seed=42, gradient_checkpointing=False)


class Probe:
    """Stamps every step, counts padding in the embedding's input over the timed steps, profiles the last one."""

    def __init__(self, spec: dict, pad_id: int):
        self.spec, self.pad_id = spec, pad_id
        self.stamps: list[float] = []
        self.tokens = self.pads = 0
        self.hooked = False
        self.profiler = None
        self.timed_steps = spec["steps"]  # stamps 0..steps; a profiled step follows when requested

    def attach(self, model) -> None:
        if not self.hooked:
            model.get_input_embeddings().register_forward_pre_hook(self._count)
            self.hooked = True

    def _count(self, module, args) -> None:
        if self.spec["warmup"] <= len(self.stamps) < self.timed_steps:  # a forward of steps warmup+1 .. steps
            ids = args[0]
            self.tokens += ids.numel()
            self.pads += int((ids == self.pad_id).sum())

    def stamp(self, model) -> None:
        self.attach(model)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        step = len(self.stamps)
        if self.profiler is not None:
            self.profiler.stop()
            Path(self.spec["profile"]).write_text(self._profile_text())
            self.profiler = None
        elif self.spec.get("profile") and step == self.timed_steps:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()

    def _profile_text(self) -> str:
        s = self.spec
        head = (f"# one {s['job']} step, {s['impl']}, shape {s['shape']}, {s['dtype']}; "
                f"torch {torch.__version__}, {torch.get_num_threads()} threads; sorted by self CPU time\n")
        table = self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60)
        return head + table + "\n"


def run_ours(spec: dict, probe: Probe) -> list[dict]:
    from engine.config import parse_config
    from engine.loop import train

    method = "sft" if spec["job"].startswith("sft") else "dpo"
    argv = ["--method", method, "--model_name_or_path", spec["model_dir"],
            "--tokenizer_name_or_path", str(TOKENIZER_DIR), "--dataset_name", spec["data_file"],
            "--output_dir", str(Path(spec["work_dir"]) / "ours"),
            "--per_device_train_batch_size", str(spec["batch_size"]), "--max_length", str(spec["max_length"]),
            "--learning_rate", str(COMMON["learning_rate"]), "--seed", str(COMMON["seed"]),
            "--gradient_checkpointing", str(COMMON["gradient_checkpointing"]),
            "--bf16", str(spec["dtype"] == "bf16"), "--max_steps", str(total_steps(spec)),
            "--logging_steps", "1", "--save_steps", "0", "--eval_steps", "0", "--disable_tqdm", "--report_to", "none"]
    if spec["job"] == "dpo-precompute":
        argv += ["--precompute_ref_log_probs"]
    if spec["job"].endswith(PADDING_FREE):
        argv += ["--padding_free"]
    if spec["job"] == "lora-dpo":
        argv += ["--use_peft", "--lora_r", str(LORA["r"]), "--lora_alpha", str(LORA["alpha"]),
                 "--lora_dropout", str(LORA["dropout"])]
    result = train(parse_config(argv), step_hook=lambda step, model: probe.stamp(model))
    return [r for r in result.logs if "num_tokens" in r]


def run_trl(spec: dict, probe: Probe) -> list[dict]:
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback

    records: list[dict] = []

    class Stamp(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            probe.stamp(model)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                records.append(dict(logs))

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    dataset = load_dataset("json", data_files=spec["data_file"], split="train")
    kwargs = dict(output_dir=str(Path(spec["work_dir"]) / "trl"), use_cpu=not torch.cuda.is_available(),
                  bf16=spec["dtype"] == "bf16", per_device_train_batch_size=spec["batch_size"],
                  max_length=spec["max_length"], max_steps=total_steps(spec), logging_steps=1, save_strategy="no",
                  report_to=[], disable_tqdm=True, dataloader_num_workers=0, **COMMON)
    if spec["job"].endswith(PADDING_FREE):
        # TRL 1.16: SFT padding_free needs max_length=None without packing (the generated rows fit max_length up
        # to their EOS); DPO ignores padding_free (it warns and pads), so TRL's DPO row is its padded run.
        kwargs.update(padding_free=True, max_length=None if spec["job"].startswith("sft") else kwargs["max_length"])
    if spec["job"].startswith("sft"):
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=spec["model_dir"], args=SFTConfig(**kwargs), train_dataset=dataset,
                             processing_class=tokenizer, callbacks=[Stamp()])
    else:
        from trl import DPOConfig, DPOTrainer

        peft_config = None
        if spec["job"] == "lora-dpo":
            from peft import LoraConfig

            peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                     target_modules="all-linear", task_type="CAUSAL_LM")
        args = DPOConfig(**kwargs, precompute_ref_log_probs=spec["job"] == "dpo-precompute")
        trainer = DPOTrainer(model=spec["model_dir"], args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[Stamp()])
    trainer.train()
    return records


def total_steps(spec: dict) -> int:
    return spec["steps"] + (1 if spec.get("profile") else 0)


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from transformers import AutoTokenizer

    pad_id = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)).pad_token_id
    peaks = gemm_peaks(spec["gemm_size"], spec["gemm_seconds"])  # this run's view of the machine, before training
    probe = Probe(spec, pad_id)
    started = time.perf_counter()
    logs = (run_ours if spec["impl"] == "ours" else run_trl)(spec, probe)
    result = {
        "stamps": probe.stamps, "num_tokens": [float(r["num_tokens"]) for r in logs],
        "input_tokens": probe.tokens, "pad_tokens": probe.pads, "peak_mib": peak_memory_mib(),
        "wall_s": time.perf_counter() - started, "gemm_peaks": peaks, "threads": torch.get_num_threads(),
        "memory_kind": "cuda max_memory_allocated" if torch.cuda.is_available() else "peak RSS",
    }
    Path(spec["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
