"""Side-by-side benchmark: the same training job through this engine and through TRL 1.16, in one invocation.

    python scripts/bench.py --quick                                   # smoke shape, seconds
    python scripts/bench.py --shapes llama-7m llama-128k --jobs sft dpo --dtypes fp32 bf16
    python scripts/bench.py --shapes llama-7m --jobs dpo --profile --write-readme
    python scripts/bench.py --shapes llama-7m --jobs sft sft-padding-free dpo dpo-padding-free --dtypes fp32

Same random-init model (built from a config, saved once), same generated data, batch shape, precision and
machine for both; runs ALTERNATE (ours, TRL, ours, TRL, ...) and each runs in its own process
(scripts/bench/worker.py) so peak memory is per run. Settings are the issue's: batch 8, max_length 512, lr 1e-6,
seed 42, gradient checkpointing off. Per job it prints: median step time after the warm-up steps, training
tokens/s (non-padding tokens over the timed steps; start-up excluded), peak memory (RSS on CPU,
torch.cuda.max_memory_allocated on GPU), padding share of the model's input, and MFU: matmul FLOPs per trained
token (scripts/bench/workload.py: flops_per_token) x tokens/s over the fp32 / bf16 GEMM peak measured at start.
Jobs `sft-padding-free` / `dpo-padding-free` run the same job with --padding_free (each micro-batch one row,
no padding); next to the padded job they show the padding share before and after and what it costs or saves.

Results (results.json, table.md, and with --profile one torch.profiler op table per run) go to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
from workload import (  # noqa: E402
    DTYPES,
    JOBS,
    REPO,
    SHAPES,
    TOKENIZER_DIR,
    build_model_dir,
    flops_per_token,
    gemm_peaks,
    matmul_params,
    write_data,
)

WORKER = Path(__file__).resolve().parent / "bench" / "worker.py"
DEFAULT_OUT = Path(__file__).resolve().parent / "bench" / "results"
README = REPO / "README.md"
MARKERS = ("<!-- bench:start -->", "<!-- bench:end -->")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", nargs="+", choices=JOBS, default=None, help="default: sft dpo (--quick: sft)")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["llama-7m"])
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per run, warm-up included (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timings (default 2, at least 1)")
    p.add_argument("--repeats", type=int, default=1, help="ours/TRL pairs per job; medians over repeats")
    p.add_argument("--impls", nargs="+", choices=("ours", "trl"), default=["ours", "trl"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: torch's, one per core). Both engines get the same; 1 keeps "
                        "timings sane on a machine whose cores other processes also load")
    p.add_argument("--profile", action="store_true", help="profile one extra step per run (torch.profiler)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny shape, 3 steps, fp32")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default scripts/bench/results)")
    p.add_argument("--write-readme", action="store_true", help="rewrite README.md's results table from this run")
    p.add_argument("--readme-from", nargs="+", type=Path, metavar="RESULTS_JSON",
                   help="run nothing: rewrite README.md's results table from saved results.json files (rows joined)")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.dtypes, args.steps, args.warmup = ["tiny"], ["fp32"], 3, 1
    args.jobs = args.jobs or (["sft"] if args.quick else ["sft", "dpo"])
    if not 1 <= args.warmup < args.steps:
        p.error("need 1 <= --warmup < --steps")
    return args


# ---------------------------------------------------------------------- machine


def machine() -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    import transformers
    import trl

    info.update(transformers=transformers.__version__, trl=trl.__version__)
    return info


# ---------------------------------------------------------------------- runs


def run_one(spec: dict) -> dict:
    spec_file = Path(spec["work_dir"]) / "spec.json"
    Path(spec["work_dir"]).mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec))
    threads = {"OMP_NUM_THREADS": str(spec["threads"])} if spec["threads"] else {}
    env = {**os.environ, **threads, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(WORKER), str(spec_file)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {spec['impl']} {spec['job']} {spec['shape']} {spec['dtype']} failed:\n"
                         f"{done.stderr[-4000:]}")
    return json.loads(Path(spec["result"]).read_text())


def summarise(raw: dict, steps: int, warmup: int, flops_tok: int, peak: float) -> dict:
    stamps, tokens = raw["stamps"], raw["num_tokens"]
    step_times = [stamps[i] - stamps[i - 1] for i in range(warmup, steps)]
    tok_s = (tokens[steps - 1] - tokens[warmup - 1]) / (stamps[steps - 1] - stamps[warmup - 1])
    return {"s_per_step": statistics.median(step_times), "tokens_per_s": tok_s, "peak_mib": raw["peak_mib"],
            "padding": raw["pad_tokens"] / max(raw["input_tokens"], 1), "mfu": flops_tok * tok_s / peak,
            "step_times": step_times, "wall_s": raw["wall_s"]}


def benchmark(args: argparse.Namespace, peaks: dict[str, float], work: Path, gemm_size: int, save) -> list[dict]:
    """Run every (shape, job, dtype) ours/TRL alternately. `peaks` is raised in place to the best GEMM rate any
    run measures at its start, so MFU is against the best this machine showed during the whole benchmark (other
    processes share the cores). `save(rows)` is called after every job, so an interrupted run keeps its results."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    rows = []
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        # A fixed number of rows (more only for long runs), so that runs with different --steps train on the
        # same batches: the epoch order is a permutation of all rows.
        rows_needed = shape.batch_size * max(32, args.steps + 1)
        model_dir = build_model_dir(shape, tokenizer, work)
        data = write_data(shape, work, rows_needed)
        n, n_lora = matmul_params(shape, tokenizer)
        for job in args.jobs:
            for dtype in args.dtypes:
                flops_tok = flops_per_token(job, n, n_lora)
                runs: dict[str, list[dict]] = {impl: [] for impl in args.impls}
                for repeat in range(args.repeats):
                    for impl in args.impls:  # alternating: ours, TRL, ours, TRL, ...
                        tag = f"{job}-{shape_name}-{dtype}-{impl}"
                        profile = args.profile and repeat == 0
                        spec = {"impl": impl, "job": job, "shape": shape_name, "dtype": dtype, "steps": args.steps,
                                "warmup": args.warmup, "model_dir": str(model_dir),
                                "data_file": str(data["sft" if job.startswith("sft") else "dpo"]),
                                "batch_size": shape.batch_size, "max_length": shape.max_length,
                                "work_dir": str(work / f"{tag}-{repeat}"), "result": str(work / f"{tag}-{repeat}.json"),
                                "profile": str(args.out / "profiles" / f"{tag}.txt") if profile else None,
                                "gemm_size": gemm_size, "threads": args.threads,
                                "gemm_seconds": 0.1 if args.quick else 0.5}
                        raw = run_one(spec)
                        runs[impl].append(raw)
                        for key, rate in raw["gemm_peaks"].items():
                            peaks[key] = max(peaks[key], rate)
                        print(f"  {tag}: {summarise(raw, args.steps, args.warmup, 0, 1)['s_per_step']:.3f} s/step",
                              flush=True)
                rows.append({"job": job, "shape": shape_name, "dtype": dtype, "n_matmul": n,
                             "flops_per_token": flops_tok, "raw": runs})
                save(summarise_rows(rows, args, peaks))
    return summarise_rows(rows, args, peaks)


def summarise_rows(rows: list[dict], args: argparse.Namespace, peaks: dict[str, float]) -> list[dict]:
    """Per job and engine: medians over the repeats of each run's summary (MFU against the best peak so far)."""
    out = []
    for row in rows:
        row = {k: v for k, v in row.items() if k != "raw"}
        for impl, raws in rows[len(out)]["raw"].items():
            results = [summarise(raw, args.steps, args.warmup, row["flops_per_token"], peaks[row["dtype"]])
                       for raw in raws]
            row[impl] = {key: statistics.median(r[key] for r in results)
                         for key in ("s_per_step", "tokens_per_s", "peak_mib", "padding", "mfu")}
            row[impl]["runs"] = results
        out.append(row)
    return out


# ---------------------------------------------------------------------- report


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def table(rows: list[dict]) -> str:
    plain = {(r["shape"], r["dtype"]): r for r in rows if r["job"] == "dpo"}
    lines = ["| job | model | dtype | TRL s/step | ours s/step | speed-up | tokens/s ours (TRL) | "
             "peak MiB ours / TRL | padding | MFU ours (TRL) | vs plain DPO, ours (TRL) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours, trl = r.get("ours", {}), r.get("trl", {})
        get = lambda d, k, fmt: format(d[k], fmt) if k in d else "–"  # noqa: E731
        vs_dpo = "–"
        base = plain.get((r["shape"], r["dtype"]))
        if r["job"] in ("dpo-precompute", "lora-dpo") and base:
            vs_dpo = (f"{_ratio(base.get('ours', {}).get('s_per_step'), ours.get('s_per_step'))} "
                      f"({_ratio(base.get('trl', {}).get('s_per_step'), trl.get('s_per_step'))})")
        lines.append(
            f"| {r['job']} | {r['shape']} | {r['dtype']} | {get(trl, 's_per_step', '.3f')} | "
            f"{get(ours, 's_per_step', '.3f')} | {_ratio(trl.get('s_per_step'), ours.get('s_per_step'))} | "
            f"{get(ours, 'tokens_per_s', '.0f')} ({get(trl, 'tokens_per_s', '.0f')}) | "
            f"{get(ours, 'peak_mib', '.0f')} / {get(trl, 'peak_mib', '.0f')} "
            f"({_ratio(ours.get('peak_mib'), trl.get('peak_mib'))}) | "
            f"{get(ours, 'padding', '.0%')} ({get(trl, 'padding', '.0%')}) | "
            f"{get(ours, 'mfu', '.1%')} ({get(trl, 'mfu', '.1%')}) | {vs_dpo} |")
    return "\n".join(lines)


def machine_line(info: dict, peaks: dict[str, float]) -> str:
    where = info.get("gpu") or f"{info['cpu']}, {info['cores']} cores, {info['threads']} torch threads"
    return (f"Machine: {where}; torch {info['torch']}, transformers {info['transformers']}, trl {info['trl']}; "
            f"measured matmul peak fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s.")


def rewrite_readme(text: str, block: str) -> str:
    start, end = MARKERS
    if start not in text or end not in text:
        raise SystemExit(f"error: {README} has no {start} ... {end} markers to rewrite")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{block}\n{end}{tail}"


def report_text(results: list[dict]) -> str:
    """The README block: machine, settings and command of each results file, then one table of all rows."""
    best = {dtype: max(r["peaks"][dtype] for r in results) for dtype in DTYPES}
    rows = []
    for r in results:  # MFU against the best peak any of the joined runs measured, not each run's own
        for row in r["rows"]:
            row = dict(row)
            for impl in ("ours", "trl"):
                if impl in row:
                    row[impl] = {**row[impl], "mfu": row[impl]["mfu"] * r["peaks"][row["dtype"]] / best[row["dtype"]]}
            rows.append(row)
    head = []
    for r in results:
        head.append(f"{machine_line(r['machine'], r['peaks'])}\n{r['settings']}.\n\n`{r['command'].strip()}`\n")
    peak_line = (f"MFU against the best matmul peak measured: fp32 {best['fp32'] / 1e9:.1f} GFLOP/s, "
                 f"bf16 {best['bf16'] / 1e9:.1f} GFLOP/s.\n\n" if len(results) > 1 else "")
    return "\n".join(head) + "\n" + peak_line + table(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # the driver's GEMM peak with the runs' thread count
    if args.readme_from:
        results = [json.loads(path.read_text()) for path in args.readme_from]
        README.write_text(rewrite_readme(README.read_text(), report_text(results)))
        print(f"rewrote the results table in {README} from {len(results)} results file(s)")
        return
    command = "python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    info = machine()
    size = 256 if args.quick else 1024
    peaks = gemm_peaks(size, 0.3 if args.quick else 2.0)
    print(machine_line(info, peaks), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        (args.out / "profiles").mkdir(exist_ok=True)
    settings = (f"{args.steps} steps per run, median of the {args.steps - args.warmup} after {args.warmup} warm-up, "
                f"{args.repeats} alternating ours/TRL pair(s) per job; peak memory: "
                f"{'cuda max_memory_allocated' if torch.cuda.is_available() else 'peak RSS of the run'}")

    def save(rows: list[dict]) -> str:
        results = {"machine": info, "peaks": peaks, "command": command, "settings": settings, "rows": rows}
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        report = report_text([results])
        (args.out / "table.md").write_text(report)
        return report

    with tempfile.TemporaryDirectory(prefix="nanopost-bench-") as tmp:
        rows = benchmark(args, peaks, Path(tmp), size, save)
    report = save(rows)
    print("\n" + report, flush=True)
    if args.write_readme:
        README.write_text(rewrite_readme(README.read_text(), report))
        print(f"rewrote the results table in {README}")


if __name__ == "__main__":
    main()
