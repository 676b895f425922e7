"""The README's "Add your own loss" recipe works exactly as written.

The recipe is read from README.md between `<!-- add-your-own-loss:start -->` and `<!-- add-your-own-loss:end -->`:
its ```python block (first line `# losses/<file>.py`) is written to that path and its ```sh / ```bash commands
are run, in that order, in a scratch copy of the repository (the real losses/ and LOSSES.md stay untouched).
Only flags that shorten a run are appended to `python train.py` commands: a tiny SmolLM3 (built from a config
and a seed, saved with the shipped tokenizer) instead of the cached demo SFT model, 2 steps of 2 pairs, fp32,
no evaluation, demo report or checkpoint. The data is the bundled preference set, as the command says.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from losses.errors import LossError

REPO_ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- add-your-own-loss:start -->", "<!-- add-your-own-loss:end -->"
# A user's checkout (gen_losses_md.py reads tests/test_parity_dpo.py and scripts/golden.py).
COPIED = ("train.py", "engine", "losses", "data", "lora", "examples", "scripts", "tests", "configs", "LOSSES.md", "README.md",
          "pyproject.toml")
SHORTEN = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--bf16", "False", "--eval_steps", "0",
           "--save_steps", "0", "--demo_eval_samples", "0", "--disable_tqdm", "--logging_steps", "1"]


def recipe() -> tuple[str, str, list[str]]:
    """(file path, file text, commands) of the README section between the markers."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert START in readme and END in readme, (
        f"README.md has no 'Add your own loss' section between {START} and {END} (the lead pastes it from "
        "the loss-lab hand-over)")
    section = readme.split(START, 1)[1].split(END, 1)[0]
    code_blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(code_blocks) == 1, f"expected one ```python block in the recipe, found {len(code_blocks)}"
    first_line, _, _ = code_blocks[0].partition("\n")
    path = first_line.removeprefix("#").strip()
    assert re.fullmatch(r"losses/\w+\.py", path), f"the code block must start with '# losses/<name>.py', got {first_line!r}"
    commands = [line.strip() for block in re.findall(r"```(?:sh|bash)\n(.*?)```", section, flags=re.DOTALL)
                for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    return path, code_blocks[0], commands


def test_recipe_is_one_file_and_the_documented_commands():
    """Expected: one new file under losses/ that does not exist yet, with one `@register_loss(...)` line, and the
    commands `python train.py --method dpo --loss_type <that name>` then `python scripts/gen_losses_md.py`."""
    path, text, commands = recipe()
    assert not (REPO_ROOT / path).exists(), f"{path} already exists in the repo; the recipe must add a new file"
    names = re.findall(r'@register_loss\("(\w+)"', text)
    assert len(names) == 1
    assert commands == [f"python train.py --method dpo --loss_type {names[0]}", "python scripts/gen_losses_md.py"]


@pytest.fixture(scope="module")
def followed(tmp_path_factory) -> dict:
    """The recipe followed in a copy of the repo: {"root", "name", "results": [(command, CompletedProcess)]}."""
    from data.defaults import DEFAULT_TOKENIZER_DIR
    from engine.model import build_tiny_smollm3, load_tokenizer

    path, text, commands = recipe()
    root = tmp_path_factory.mktemp("user_checkout")
    for name in COPIED:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, root / name)
    (root / path).write_text(text, encoding="utf-8")

    model_dir = tmp_path_factory.mktemp("tiny_model")
    tokenizer = load_tokenizer(str(DEFAULT_TOKENIZER_DIR))
    build_tiny_smollm3(tokenizer, seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               NANOPOST_CACHE=str(root / "cache"))  # never touch the user's cached demo model
    results = []
    for command in commands:
        args = shlex.split(command)
        assert args[0] == "python", command
        if args[1] == "train.py":
            args += ["--model_name_or_path", str(model_dir), *SHORTEN]
        result = subprocess.run([sys.executable, *args[1:]], cwd=root, env=env, capture_output=True, text=True,
                                timeout=600)
        results.append((command, result))
        if result.returncode != 0:
            break
    return {"root": root, "name": re.findall(r'@register_loss\("(\w+)"', text)[0], "results": results,
            "env": env}


def test_every_recipe_command_succeeds(followed):
    """Expected: exit code 0 for each command, in order (train, then the LOSSES.md generator)."""
    assert len(followed["results"]) == 2
    for command, result in followed["results"]:
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"


def test_training_used_the_new_loss(followed):
    """The run trained with the new loss and nothing else: train_config.json says loss_type [<name>], and step 1
    logs the README's number, loss 1.0 = exp(−β·0) (the policy is its own reference at step 1, so every
    log-ratio margin is 0; the default sigmoid loss would log ln 2 = 0.693147). Two steps were logged."""
    output = followed["root"] / "output" / "dpo"
    assert json.loads((output / "train_config.json").read_text())["loss_type"] == [followed["name"]]
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in records if "loss" in record]
    assert [record["step"] for record in steps] == [1, 2]
    assert steps[0]["loss"] == pytest.approx(1.0, abs=1e-7)
    assert steps[0]["rewards/margins"] == 0.0


def test_generated_catalogue_lists_the_new_loss(followed):
    """After `python scripts/gen_losses_md.py` the copy's LOSSES.md has a section for the new loss with the
    docstring's formula and paper and "not tested" for TRL parity; and `--check` now passes there."""
    name = followed["name"]
    text = (followed["root"] / "LOSSES.md").read_text(encoding="utf-8")
    section = text.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0]
    assert "L = exp(−β·d),  d = (c − c_ref) − (r − r_ref)" in section
    assert "- Paper: Tang et al. 2024" in section
    assert "- TRL parity tested against: not tested" in section
    assert f"| [`{name}`](#{name}) |" in text
    check = subprocess.run([sys.executable, "scripts/gen_losses_md.py", "--check"], cwd=followed["root"],
                           env=followed["env"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_a_broken_loss_module_raises_its_own_error(followed):
    """A loss file that fails to import surfaces its own exception (with the file in the traceback) the first time
    a loss is looked up, instead of a misleading "unknown loss_type"."""
    broken = followed["root"] / "losses" / "broken_loss.py"
    broken.write_text('raise RuntimeError("boom from broken_loss")\n', encoding="utf-8")
    try:
        result = subprocess.run([sys.executable, "-c", "from losses import get_loss; get_loss('sigmoid')"],
                                cwd=followed["root"], env=followed["env"], capture_output=True, text=True)
    finally:
        broken.unlink()
    assert result.returncode == 1
    assert "RuntimeError: boom from broken_loss" in result.stderr and "broken_loss.py" in result.stderr


def test_the_real_repo_is_untouched():
    """The recipe ran in a copy: here the README's loss name is unknown, a LossError listing the real losses."""
    from losses import get_loss

    _, text, _ = recipe()
    name = re.findall(r'@register_loss\("(\w+)"', text)[0]
    with pytest.raises(LossError, match=f"unknown loss_type '{name}'.*sigmoid"):
        get_loss(name)
