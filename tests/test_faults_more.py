"""Signals outside the training steps, through the real CLI (issue 12): SIGINT / SIGTERM while the data is being
prepared, while the DPO reference log-probs are pre-computed (--precompute_ref_log_probs), and while their cache
file is being written. Each must exit 128 + the signal's number with ONE `error:` line on stderr (no traceback)
and leave the output folder empty: no cache file, no temporary file or folder, no lock.

Real subprocesses get real signals. To send one at a known moment, `_WRAPPER` runs train.py's own `main()` with
one engine function wrapped: it touches a marker file, then runs the REAL work again and again (or, for the cache
write, waits after the real torch.save wrote the temporary file), so the signal lands inside that phase. The test
waits for the marker (no sleeps) and sends the signal. The engine itself carries no test hooks. The four runs start
together (their start-up, mostly importing torch, overlaps).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.disk_faults import DISK_KINDS, limited_disk

REPO = Path(__file__).resolve().parents[1]

_WRAPPER = r'''
"""train.py's main() with one phase held (the real work repeated) until a signal comes; see tests/test_faults_more."""
import os, sys, time
from pathlib import Path

sys.path.insert(0, os.environ["FAULT_REPO"])
import torch
import engine.dpo, engine.sft

marks, phase = Path(os.environ["FAULT_MARKS"]), os.environ["FAULT_PHASE"]
DEADLINE_S = 120  # a signal that never comes: the run goes on and the test fails on the exit code


def held(real):
    done = []

    def wrapper(*args, **kwargs):
        if done:
            return real(*args, **kwargs)
        (marks / phase).touch()
        deadline = time.time() + DEADLINE_S
        while True:  # the real work, again and again, until the signal lands inside it
            result = real(*args, **kwargs)
            if time.time() > deadline:
                done.append(True)
                return result
    return wrapper


if phase == "preparing":
    engine.sft.SFTMethod.prepare = held(engine.sft.SFTMethod.prepare)
    engine.dpo.DPOMethod.prepare = held(engine.dpo.DPOMethod.prepare)
elif phase == "precomputing":  # before step 1 the only scoring is the reference's pre-computation
    engine.dpo.DPOMethod.sequence_logps = held(engine.dpo.DPOMethod.sequence_logps)
elif phase == "writing-cache":
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if Path(f).name.startswith(".tmp-ref_logps"):  # the cache is written whole to its temporary name: wait
            (marks / phase).touch()
            deadline = time.time() + DEADLINE_S
            while time.time() < deadline:
                time.sleep(0.02)

    torch.save = save
import train

sys.exit(train.main(sys.argv[1:]))
'''

# case -> (method, phase held, signal)
CASES = {
    "sft-preparing-sigint": ("sft", "preparing", signal.SIGINT),
    "dpo-preparing-sigterm": ("dpo", "preparing", signal.SIGTERM),
    "dpo-precomputing-sigint": ("dpo", "precomputing", signal.SIGINT),
    "dpo-writing-cache-sigterm": ("dpo", "writing-cache", signal.SIGTERM),
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("signals")
    (root / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    chats = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]}
             for i in range(16)]
    pairs = [{"prompt": f"What is {i} + 1?", "chosen": f" {i + 1}.", "rejected": f" {i + 2}."} for i in range(16)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (root / "wrapper.py").write_text(_WRAPPER)
    return root


class _Run:
    def __init__(self, root: Path, case: str) -> None:
        method, self.phase, self.signum = CASES[case]
        self.marks, self.out = root / case / "marks", root / case / "out"
        self.marks.mkdir(parents=True)
        data = root / ("chat.jsonl" if method == "sft" else "pairs.jsonl")
        args = ["--method", method, "--model_name_or_path", str(root / "model"), "--dataset_name", str(data),
                "--output_dir", str(self.out), "--bf16", "False", "--disable_tqdm", "--max_steps", "2",
                "--save_steps", "0", "--eval_steps", "0", "--per_device_train_batch_size", "2"]
        if method == "dpo":
            args.append("--precompute_ref_log_probs")
        env = {**os.environ, "FAULT_REPO": str(REPO), "FAULT_MARKS": str(self.marks), "FAULT_PHASE": self.phase,
               "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        self.stdout, self.stderr = (root / case / "stdout").open("w+"), (root / case / "stderr").open("w+")
        self.process = subprocess.Popen([sys.executable, str(root / "wrapper.py"), *args], cwd=root, env=env,
                                        stdout=self.stdout, stderr=self.stderr, text=True)

    def signal_when_held(self, timeout_s: float = 240) -> tuple[int, str]:
        """Wait for the phase's marker, send the signal, return (exit code, stderr)."""
        deadline = time.time() + timeout_s
        while not (self.marks / self.phase).exists():
            assert self.process.poll() is None, self.output()
            assert time.time() < deadline, f"{self.phase} never began\n{self.output()}"
            time.sleep(0.05)
        self.process.send_signal(self.signum)
        code = self.process.wait(timeout=120)
        return code, self.output()

    def output(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()


@pytest.fixture(scope="module")
def runs(workspace):
    started = {case: _Run(workspace, case) for case in CASES}
    yield started
    for run in started.values():
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()


@pytest.mark.parametrize("case", list(CASES))
def test_a_signal_outside_the_steps_stops_with_one_line_and_leaves_nothing(runs, case):
    """Exit 130 (SIGINT) / 143 (SIGTERM), as a shell reports a signal; one line naming the signal and saying that
    nothing was left half-written and how to go on (no checkpoint existed: start over); the output folder is empty
    (the cache's temporary file was removed, the lock released)."""
    run = runs[case]
    code, stderr = run.signal_when_held()
    name = signal.Signals(run.signum).name
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code == 128 + run.signum, stderr[-3000:]
    assert "Traceback" not in stderr and errors == [
        f"error: stopped by {name} before the run finished; nothing was left half-written (files being written "
        "were removed); run the same command again to start over"], stderr[-3000:]
    assert sorted(p.name for p in run.out.iterdir()) == [], "left behind in the output folder"


# ---------------------------------------------------------------------- storage faults outside checkpoints


def _comparison():
    """A small, hand-made comparison: 2 held-out pairs, 1 prompt."""
    import torch

    from engine.compare.report import Comparison

    side = {"preference_accuracy": 0.5, "mean_margin": 0.25, "mean_length": 3.0}
    return Comparison(
        logps={"policy": torch.tensor([[-1.0, -2.0], [-3.0, -2.5]]), "reference": torch.tensor([[-1.5, -1.0],
                                                                                               [-2.0, -2.5]])},
        prompts=["What is 1 + 1?"], answers={d: {"policy": [[1, 2]], "reference": [[3]]} for d in ("greedy", "sampled")},
        texts={d: {"policy": ["2."], "reference": ["3."]} for d in ("greedy", "sampled")},
        summary={"heldout_pairs": 2, "prompts": 1, "policy": side, "reference": side, "beta": 0.1,
                 "implicit_reward_accuracy": 0.5, "implicit_reward_margin": 0.1, "kl_policy_reference": 0.01,
                 "generation": {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "seed": 42}})


@pytest.mark.parametrize("kind", DISK_KINDS)
def test_compare_report_on_a_full_disk_names_the_file_and_what_was_written(kind, tmp_path):
    """Room for report.json and report.md but not the PNG: one line naming margins.png, the cause, and the files
    written whole before it; those two are complete (the JSON parses to the report), no PNG and no temporary file
    is left; through scripts/compare.py's error path the line is printed once, exit 2."""
    from engine.compare import write_report
    from engine.compare.cli import run_main
    from engine.errors import UserError

    comparison = _comparison()
    whole = write_report(comparison, tmp_path / "whole")
    sizes = {path.name: path.stat().st_size for path in whole}
    assert sizes["margins.png"] > 8192  # so the room below cannot hold it
    page = 4096 if kind == "tmpfs" else 1
    capacity = sum(-(-sizes[n] // page) * page for n in ("report.json", "report.md")) + 2 * page
    with limited_disk(tmp_path, capacity, kind) as disk:
        with pytest.raises(UserError) as raised:
            write_report(comparison, disk / "report")
        listing = sorted(p.name for p in (disk / "report").iterdir())
        report = json.loads((disk / "report" / "report.json").read_text())
        import argparse

        code = run_main(argparse.ArgumentParser(), lambda args: write_report(comparison, disk / "again"), [])
    line = str(raised.value)
    assert re.fullmatch(r"could not write the comparison report's margins\.png \(\S+\): no space left on the device "
                        r"\[ENOSPC\]; written whole before it: report\.json, report\.md; fix the cause and run "
                        r"scripts/compare\.py again", line), line
    assert listing == ["report.json", "report.md"] and report == comparison.report()
    assert code == 2


@pytest.mark.parametrize("kind", DISK_KINDS)
def test_trainer_state_and_model_card_on_a_full_disk_are_one_line_and_never_half_written(kind, tmp_path):
    """trainer_state.json (TRL's file, engine/trl_checkpoint.py) and the model card on a disk with no room: one
    StorageError line naming the file and the cause; no file and no temporary file is left."""
    from engine.config import parse_config
    from engine.model_card import write_model_card
    from engine.storage import StorageError
    from engine.trl_checkpoint import write_trainer_state

    with limited_disk(tmp_path, 64, kind) as disk:
        config = parse_config(["--method", "sft", "--output_dir", str(disk)])
        try:  # fill the disk to the last byte
            with open(disk / "filler", "wb", buffering=0) as filler:
                for _ in range(10_000):
                    filler.write(b"x" * 4096)
        except OSError:
            pass
        with pytest.raises(StorageError) as state_fault:
            write_trainer_state(disk, global_step=1, epoch=1.0, max_steps=1, num_train_epochs=1.0,
                                log_history=[{"step": 1, "loss": 1.0}] * 200, config=config)
        with pytest.raises(StorageError) as card_fault:
            write_model_card(disk, config, {"train_loss": 1.0}, base_model="m", dataset="d", repo_id=None,
                             versions={"torch": "x"})
        listing = sorted(p.name for p in disk.iterdir())
    assert str(state_fault.value).startswith(f"could not write trainer_state.json ({disk / 'trainer_state.json'}): "
                                             "no space left on the device [ENOSPC]"), state_fault.value
    assert str(card_fault.value).startswith("could not write the model card ("), card_fault.value
    assert listing == ["filler"]


def test_resume_drops_a_metrics_line_cut_short_by_a_crash(tmp_path):
    """A crash while a metrics line was appended leaves half a JSON line; the resumed run's writer drops it (and
    the lines after the checkpoint's step) instead of failing on it."""
    from types import SimpleNamespace

    from engine.tracking import MetricsWriter, read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    MetricsWriter(tmp_path, SimpleNamespace(is_main_process=True), resume_step=2)
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


def test_reference_cache_on_a_full_disk_is_one_line_and_leaves_no_partial_file(workspace, tmp_path):
    """--precompute_ref_log_probs on a disk with no room for the cache (the patched disk: a few hundred bytes; a
    tmpfs cannot be made smaller than a page, which holds this cache): one line naming the cache, the cause and
    that no checkpoint exists yet; neither the cache nor its temporary file is left."""
    from tests.test_faults import _ON_SMALL_DISK

    script = tmp_path / "small_disk.py"
    script.write_text(_ON_SMALL_DISK)
    args = ["--method", "dpo", "--model_name_or_path", str(workspace / "model"), "--dataset_name",
            str(workspace / "pairs.jsonl"), "--output_dir", "{disk}/out", "--bf16", "False", "--disable_tqdm",
            "--max_steps", "1", "--save_steps", "0", "--eval_steps", "0", "--per_device_train_batch_size", "2",
            "--precompute_ref_log_probs"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(script), "patched", str(tmp_path), "300", *args], cwd=workspace,
                            env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1 and re.fullmatch(
        r"error: could not write the reference log-prob cache \(\S+/out/ref_logps-\w+\.pt\): no space left on the "
        r"device \[ENOSPC\]; no checkpoint was saved before this; free space \(or choose another --output_dir\), "
        r"then start the run again", errors[0]), errors
    left = json.loads(result.stdout.split("LEFT ", 1)[1])
    assert left["listing"] == [], left


def test_compare_stopped_by_sigterm_while_writing_a_plot_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    """scripts/compare.py's main: SIGTERM arrives while margins.png is being written (the process signals itself
    from inside the plot writer, after part of the file is out): exit 143, one line, report.json and report.md
    whole, no margins.png and no temporary file."""
    import argparse

    import engine.compare.report as report_module
    from engine.compare.cli import run_main

    def half_written_then_signal(margins, path):
        Path(path).write_bytes(b"\x89PNG partial")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    monkeypatch.setattr(report_module, "save_margin_histogram", half_written_then_signal)
    code = run_main(argparse.ArgumentParser(), lambda args: report_module.write_report(_comparison(), tmp_path), [])
    stderr = capsys.readouterr().err
    assert code == 143 and stderr == "error: stopped by SIGTERM; no report file was left half-written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]
