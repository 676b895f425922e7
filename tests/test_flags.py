"""Every flag of TRL 1.16's `trl sft` / `trl dpo` is known to train.py: a TrainConfig field, or listed in
engine/trl_flags.py as having no effect (warns) or refused (errors away from TRL's default). Read from the
installed trl's dataclasses, so a TRL upgrade that adds a flag fails here until it is classified."""

import dataclasses
import enum
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from trl import DPOConfig, ModelConfig, ScriptArguments, SFTConfig

from engine.config import TrainConfig, parse_config
from engine.errors import UserError
from engine.trl_flags import AWAITING_LOOP, INERT, REFUSED

REPO = Path(__file__).resolve().parents[1]
TRL_CLASSES = {"sft": (ScriptArguments, ModelConfig, SFTConfig), "dpo": (ScriptArguments, ModelConfig, DPOConfig)}
FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def trl_defaults(method: str) -> dict:
    """TRL's default of each flag of `trl <method>`, as a YAML value (enums as their string value)."""
    defaults = {}
    for cls in TRL_CLASSES[method]:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                continue
            defaults[f.name] = value.value if isinstance(value, enum.Enum) else value
    return defaults


def test_every_trl_flag_is_implemented_or_classified():
    """Expected: the 174 names of the four TRL dataclasses are each a TrainConfig field, INERT or REFUSED, and no
    name is in two places (one place per flag)."""
    names = {f.name for classes in TRL_CLASSES.values() for cls in classes for f in dataclasses.fields(cls)}
    assert len(names) == 174  # TRL 1.16.0; a new TRL version changes this on purpose
    unknown = sorted(n for n in names if n not in FIELDS and n not in INERT and n not in REFUSED)
    assert not unknown, f"TRL flags neither implemented nor classified in engine/trl_flags.py: {unknown}"
    assert not (FIELDS & set(INERT)) and not (FIELDS & set(REFUSED)) and not (set(INERT) & set(REFUSED))
    assert set(AWAITING_LOOP) <= FIELDS


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_trl_defaults_in_yaml_are_accepted(method, tmp_path, capsys):
    """A YAML file with every TRL flag at TRL's default parses, and prints no warning (nothing is non-default)."""
    path = tmp_path / "trl_defaults.yaml"
    path.write_text(yaml.safe_dump({**trl_defaults(method), "method": method, "model_name_or_path": "some/model",
                                    "output_dir": "out"}))
    config = parse_config(["--config", str(path)])
    assert config.method == method and config.report_to == [] and config.hub_strategy == "every_save"
    assert "warning" not in capsys.readouterr().err


def _as_flag(value) -> list[str]:
    if isinstance(value, bool):
        return [str(value)]
    if value is None:
        return ["none"]
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, dict):
        return [__import__("json").dumps(value)]
    return [str(value)]


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_trl_defaults_as_flags_are_accepted(method):
    """Each TRL flag given alone on the command line at TRL's default is never an error."""
    failures = []
    for name, value in trl_defaults(method).items():
        if name in ("output_dir",) or value == []:
            continue
        try:
            parse_config(["--method", method, "--model_name_or_path", "m", f"--{name}", *_as_flag(value)])
        except UserError as error:
            failures.append(f"--{name} {value!r}: {error}")
    assert not failures, "\n".join(failures)


def test_inert_flag_warns_refused_flag_errors_renamed_flag_maps(capsys):
    """--dataloader_num_workers 4 does nothing here: a warning says why. --load_in_4bit true is refused with the
    reason (bitsandbytes). --torch_dtype bfloat16 becomes --dtype bfloat16 with a hint."""
    parse_config(["--dataloader_num_workers", "4"])
    assert "--dataloader_num_workers 4 has no effect" in capsys.readouterr().err
    with pytest.raises(UserError, match="--load_in_4bit True: not supported by nanopost: .*bitsandbytes"):
        parse_config(["--load_in_4bit", "true"])
    config = parse_config(["--torch_dtype", "bfloat16", "--evaluation_strategy", "steps", "--eval_steps", "5"])
    assert (config.dtype, config.eval_strategy) == ("bfloat16", "steps")
    assert "--torch_dtype is TRL's old name for --dtype" in capsys.readouterr().err


def test_flag_awaiting_the_loop_warns(capsys, monkeypatch):
    """Accepted and validated but not applied yet: the warning says so (no flag silently ignored). Shown with
    --neftune_noise_alpha put back on the list (the loop applies it now, so without the entry it does not warn)."""
    monkeypatch.setitem(AWAITING_LOOP, "neftune_noise_alpha", "a test entry")
    parse_config(["--neftune_noise_alpha", "5"])
    assert "--neftune_noise_alpha 5.0 is validated but the training loop does not apply it yet" in capsys.readouterr().err
    monkeypatch.undo()
    parse_config(["--neftune_noise_alpha", "5"])
    assert "validated but" not in capsys.readouterr().err


def test_course_notebook_dpo_config_as_yaml(tmp_path):
    """The course notebook's DPOConfig keys, written as YAML, parse (issue 10: refused before)."""
    path = tmp_path / "dpo.yaml"
    path.write_text("method: dpo\nmodel_name_or_path: some/model\ndataloader_drop_last: true\neval_strategy: steps\n"
                    "eval_steps: 50\nhub_model_id: you/smollm3-dpo\nmax_prompt_length: 512\npush_to_hub: true\n"
                    "save_strategy: steps\n")
    config = parse_config(["--config", str(path)])
    assert (config.max_prompt_length, config.hub_model_id, config.dataloader_drop_last) == (512, "you/smollm3-dpo",
                                                                                            True)


@pytest.mark.parametrize("argv, message", [
    (["--eval_strategy", "sometimes"], "--eval_strategy 'sometimes': must be one of no, steps, epoch"),
    (["--save_strategy", "often"], "--save_strategy"),
    (["--logging_strategy", "x"], "--logging_strategy"),
    (["--load_best_model_at_end"], "needs evaluation"),
    (["--eval_strategy", "steps", "--eval_steps", "10", "--load_best_model_at_end", "--save_strategy", "epoch"],
     "needs --save_strategy equal to --eval_strategy"),
    (["--eval_strategy", "steps", "--eval_steps", "10", "--metric_for_best_model", "bleu"],
     "--metric_for_best_model 'bleu': sft evaluation reports loss"),
    (["--greater_is_better", "true"], "needs --metric_for_best_model"),
    (["--hub_model_id", "you/model"], "--hub_model_id 'you/model': is only used when pushing; add --push_to_hub"),
    (["--hub_token", "hf_secret"], "--hub_token <hidden>: is only used when pushing"),
    (["--push_to_hub", "--hub_model_id", "not a repo"], "must be a Hub repo id"),
    (["--push_to_hub", "--hub_strategy", "checkpoint"], "pushing checkpoints is not supported"),
    (["--report_to", "mlflow"], "unknown tracker 'mlflow'"),
    (["--report_to", "all", "trackio"], "stand alone"),
    (["--optim", "adafactor"], "--optim 'adafactor': must be one of"),
    (["--dtype", "int8"], "--dtype"),
    (["--lr_scheduler_kwargs", "num_cycles=1"], "expected a JSON object"),
    (["--neftune_noise_alpha", "0"], "--neftune_noise_alpha"),
    (["--method", "dpo", "--ref_model_mixup_alpha", "1.5"], "--ref_model_mixup_alpha"),
    (["--sync_ref_model"], "is a DPO option"),
    (["--method", "dpo", "--sync_ref_model", "--use_peft"], "needs a separate reference model"),
    (["--max_prompt_length", "0"], "--max_prompt_length"),
    (["--lora_task_type", "SEQ_CLS"], "CAUSAL_LM"),
    (["--use_dora"], "add --use_peft"),
    (["--pad_to_multiple_of", "-8"], "--pad_to_multiple_of"),
    (["--torch_dtype", "float32", "--dtype", "float32"], "give only --dtype"),
])
def test_bad_values_of_new_flags(argv, message):
    """Each bad value is one UserError line naming the flag (train.py prints it and exits 2, before any file)."""
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(argv)


def test_tracker_not_installed_stops_before_training(monkeypatch):
    """A named tracker that is not installed: one line saying what to install."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match="--report_to .*wandb is not installed: pip install wandb"):
        parse_config(["--report_to", "wandb"])


def test_best_model_defaults_follow_transformers():
    """load_best_model_at_end without a metric picks loss, lower is better; an accuracy is greater-is-better."""
    base = ["--eval_strategy", "steps", "--eval_steps", "5", "--save_steps", "10", "--load_best_model_at_end"]
    config = parse_config(base)
    assert (config.metric_for_best_model, config.greater_is_better) == ("loss", False)
    config = parse_config([*base, "--method", "dpo", "--metric_for_best_model", "eval_rewards/accuracies"])
    assert config.greater_is_better is True


def test_help_runs_and_lists_every_flag_in_groups():
    """`python train.py --help` exits 0 (it crashed on a % in a help string) and shows the groups and each flag."""
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    for group in ("model:", "data:", "training:", "evaluation and saving:", "logging:", "Hub:", "DPO:", "LoRA:"):
        assert f"\n{group}\n" in result.stdout, group
    for name in FIELDS | set(INERT) | set(REFUSED):
        assert f"--{name}" in result.stdout, name
    assert "{% generation %}" in result.stdout


def test_flags_md_is_up_to_date():
    """Expected: `scripts/gen_flags_md.py --check` exits 0 (rerun the script after changing a flag)."""
    result = subprocess.run([sys.executable, "scripts/gen_flags_md.py", "--check"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
