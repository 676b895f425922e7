"""LOSSES.md is generated from the registry and the loss docstrings; it must not drift from the code."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_losses_md_is_up_to_date():
    """Expected: `scripts/gen_losses_md.py --check` exits 0 (rerun the script after changing a loss)."""
    result = subprocess.run(
        [sys.executable, "scripts/gen_losses_md.py", "--check"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_losses_md_lists_every_loss_with_its_formula():
    """Every registered loss has a section with its formula code block and its TRL parity line."""
    from losses import LOSSES

    text = (REPO_ROOT / "LOSSES.md").read_text(encoding="utf-8")
    for name, spec in LOSSES.items():
        section = text.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0]
        assert "```\n" in section and "- Paper: " in section, name
        expected = f"`{spec.trl_reference}`" if spec.trl_reference else "not tested"
        assert f"- TRL parity tested against: {expected}" in section, name


def test_check_fails_on_a_stale_file(tmp_path, monkeypatch):
    """Expected exit code 1 when LOSSES.md differs from the generated text (here: a file with one extra line)."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "scripts"))
    import gen_losses_md

    stale = tmp_path / "LOSSES.md"
    stale.write_text(gen_losses_md.render() + "edited by hand\n", encoding="utf-8")
    monkeypatch.setattr(gen_losses_md, "OUTPUT", stale)
    monkeypatch.setattr(sys, "argv", ["gen_losses_md.py", "--check"])
    assert gen_losses_md.main() == 1
