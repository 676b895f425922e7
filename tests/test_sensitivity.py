"""Sensitivity: proof that the suite can fail. Every registered loss is perturbed slightly, in process, and the
checks that cover it must notice.

Perturbations (one loss at a time; its registry entry is swapped for a wrapped function, nothing else changes):
- `beta`: the loss computes with β · 1.001 (losses that read β). A wrong constant of this kind leaves sigmoid's
  step-1 loss at ln 2 (the margin is 0) and moves only the gradients, by 0.1%.
- `scale`: the per-pair losses times 1.001 (every loss; the only one for `sft`, which reads no β).

Checks:
- Golden curves (tests/test_golden.py): each run of scripts/golden.py that trains with the loss is rerun with the
  perturbed loss and compared with its stored curve. Expected: values move, and the largest move is at least
  10x its tolerance (caught by the perturbation, not by rounding noise). SFT's `sft_loss` (not a registered
  preference loss) is perturbed the same way for the `sft` run.
- Per-function checks (tests/test_losses_golden.py golden values, tests/test_losses_vs_trl.py TRL parity):
  `FUNCTION_CHECKS` lists them per loss. Expected: at least one of them fails for every perturbation of every
  registered loss. A loss with no entry fails `test_every_loss_has_function_checks`: add a golden-value test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import engine.sft
import tests.test_losses_golden as values
import tests.test_losses_vs_trl as vs_trl
from losses import LOSSES, LossOptions
from tests.script_modules import load_script
from tests.test_losses_vs_trl import dpo_inputs, models  # noqa: F401  (fixtures for the TRL parity checks)

REPO_ROOT = Path(__file__).resolve().parents[1]
FACTOR = 1.001
PERTURBATIONS = ("beta", "scale")



golden = load_script("golden")


def perturb(monkeypatch, name: str, kind: str) -> None:
    """Swap loss `name`'s registry entry for the perturbed function (undone by monkeypatch after the test)."""
    spec = LOSSES[name]
    if kind == "beta":
        def fn(batch, opts):
            return spec.fn(batch, dataclasses.replace(opts, beta=opts.beta * FACTOR))
    else:
        def fn(batch, opts):
            return spec.fn(batch, opts) * FACTOR
    monkeypatch.setitem(LOSSES, name, dataclasses.replace(spec, fn=fn))


def cases(names) -> list[tuple[str, str]]:
    """(loss, perturbation) pairs; `beta` only for losses that read β."""
    return [(name, kind) for name in sorted(names) for kind in PERTURBATIONS
            if kind == "scale" or "beta" in LOSSES[name].options]


# ---------------------------------------------------------------------- golden curves

GOLDEN_LOSSES = {loss for run in golden.RUNS.values() for loss in run.losses}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return golden.build_assets(tmp_path_factory.mktemp("sensitivity"))


def assert_golden_catches(run_name: str, assets) -> None:
    stored = golden.load_golden(run_name)
    steps = golden.run_reference(run_name, assets)
    moved = golden.compare(stored["steps"], steps, golden.RUNS[run_name])
    assert moved, f"{run_name}: the perturbed run still matches its golden curve"
    worst = max(abs(item.new - item.golden) / item.allowed for item in moved if item.allowed > 0)
    assert worst >= 10, f"{run_name}: largest move only {worst:.1f}x the tolerance"


@pytest.mark.parametrize("name, kind", cases(GOLDEN_LOSSES))
def test_golden_curves_catch_a_perturbed_loss(monkeypatch, assets, name, kind):
    """Expected: every golden run that trains with the perturbed loss moves by >= 10x its tolerance."""
    perturb(monkeypatch, name, kind)
    runs = [run_name for run_name, run in golden.RUNS.items() if name in run.losses]
    assert runs
    for run_name in runs:
        assert_golden_catches(run_name, assets)


def test_golden_curve_catches_a_perturbed_sft_nll(monkeypatch, assets):
    """SFT's loss (engine.sft uses losses.sft.sft_loss) times 1.001: the `sft` golden run moves (its loss by 1e-3)."""
    original = engine.sft.sft_loss
    monkeypatch.setattr(engine.sft, "sft_loss", lambda *args, **kwargs: original(*args, **kwargs) * FACTOR)
    assert_golden_catches("sft", assets)


# ---------------------------------------------------------------------- per-function checks


def trl_dpo_parity(name: str) -> Callable:
    """tests/test_losses_vs_trl.py's check for a TRL DPOTrainer loss type (needs the module's fixtures)."""
    def check(models, dpo_inputs):  # noqa: F811
        vs_trl.test_dpo_loss_matches_trl(models, dpo_inputs, name)
    check.__name__ = f"test_dpo_loss_matches_trl[{name}]"
    return check


def plain(check: Callable) -> Callable:
    def run(models, dpo_inputs):  # noqa: F811
        check()
    run.__name__ = check.__name__
    return run


FUNCTION_CHECKS: dict[str, list[Callable]] = {
    "aot": [plain(values.test_aot), trl_dpo_parity("aot")],
    "aot_unpaired": [plain(values.test_aot_unpaired), trl_dpo_parity("aot_unpaired")],
    "apo_down": [plain(values.test_apo_down), trl_dpo_parity("apo_down")],
    "apo_zero": [plain(values.test_apo_zero), trl_dpo_parity("apo_zero")],
    "bco_pair": [plain(values.test_bco_pair_has_no_running_mean), trl_dpo_parity("bco_pair")],
    "cdpo": [plain(values.test_cdpo), plain(vs_trl.test_cdpo_matches_trl_cpo_sigmoid_on_log_ratios)],
    "discopop": [plain(values.test_discopop), trl_dpo_parity("discopop")],
    "exo_pair": [plain(values.test_exo_pair), trl_dpo_parity("exo_pair")],
    "hinge": [plain(values.test_hinge), trl_dpo_parity("hinge")],
    "ipo": [plain(values.test_ipo_is_length_normalised), trl_dpo_parity("ipo")],
    "ipo_unnormalized": [plain(values.test_ipo_unnormalized),
                         plain(vs_trl.test_ipo_unnormalized_matches_trl_cpo_ipo_on_log_ratios)],
    "nca_pair": [plain(values.test_nca_pair), trl_dpo_parity("nca_pair")],
    "orpo": [plain(values.test_orpo), plain(vs_trl.test_orpo_odds_term_matches_trl)],
    "robust": [plain(values.test_robust), trl_dpo_parity("robust")],
    "sft": [plain(values.test_sft_is_token_mean_over_the_batch), trl_dpo_parity("sft")],
    "sigmoid": [plain(values.test_sigmoid_at_zero_margin_is_ln2), trl_dpo_parity("sigmoid")],
    "sigmoid_norm": [plain(values.test_sigmoid_norm), trl_dpo_parity("sigmoid_norm")],
    "simpo": [plain(values.test_simpo), plain(vs_trl.test_simpo_matches_trl_cpo)],
    "sppo_hard": [plain(values.test_sppo_hard), trl_dpo_parity("sppo_hard")],
}


def test_every_loss_has_function_checks():
    """Expected: FUNCTION_CHECKS covers exactly the registered losses (19), each with a golden-value check and a
    TRL parity check, so a new loss cannot go without a test that would notice a change to it."""
    assert set(FUNCTION_CHECKS) == set(LOSSES)
    assert all(len(checks) == 2 for checks in FUNCTION_CHECKS.values())


def test_function_checks_pass_unperturbed(models, dpo_inputs):  # noqa: F811
    """Control: with the real losses every listed check passes, so a failure below is the perturbation's doing."""
    for checks in FUNCTION_CHECKS.values():
        for check in checks:
            check(models, dpo_inputs)


@pytest.mark.parametrize("name, kind", cases(LOSSES))
def test_function_checks_catch_a_perturbed_loss(monkeypatch, models, dpo_inputs, name, kind):  # noqa: F811
    """Expected: at least one of the loss's per-function checks raises AssertionError."""
    perturb(monkeypatch, name, kind)
    caught = []
    for check in FUNCTION_CHECKS[name]:
        try:
            check(models, dpo_inputs)
        except AssertionError:
            caught.append(check.__name__)
    assert caught, f"no per-function check notices {name} with {kind} x {FACTOR}"


def test_perturbation_changes_the_loss_values():
    """Sanity of the harness itself: the perturbed sigmoid at margin β·d = 1 (pair 0 of the golden-value inputs)
    is −log σ(1.001) = 0.312993, not −log σ(1) = 0.313262; scaled, 1.001 · 0.313262 = 0.313575."""
    spec = LOSSES["sigmoid"]
    opts = LossOptions(beta=0.5)
    original = spec.fn(values.PAIRS, opts)[0].item()
    with pytest.MonkeyPatch.context() as patch:
        perturb(patch, "sigmoid", "beta")
        assert LOSSES["sigmoid"].fn(values.PAIRS, opts)[0].item() == pytest.approx(
            torch.nn.functional.softplus(torch.tensor(-1.001, dtype=torch.float64)).item(), abs=1e-12)
        assert LOSSES["sigmoid"].fn(values.PAIRS, opts)[0].item() == pytest.approx(0.312993, abs=1e-6)
    with pytest.MonkeyPatch.context() as patch:
        perturb(patch, "sigmoid", "scale")
        assert LOSSES["sigmoid"].fn(values.PAIRS, opts)[0].item() == pytest.approx(FACTOR * original, abs=1e-12)
    assert LOSSES["sigmoid"] is spec  # restored


def test_hinge_beta_slips_past_its_golden_values_but_not_trl_parity(monkeypatch, models, dpo_inputs):  # noqa: F811
    """Why several checks per loss: with β × 1.001 hinge's golden-value test still passes (pair 0 has β·d = 1, and
    max(0, 1 − 1.001) = 0 = max(0, 1 − 1); pair 1 has d = 0, so 1 either way), while TRL parity, on random
    inputs whose margins sit inside the hinge, fails."""
    perturb(monkeypatch, "hinge", "beta")
    values.test_hinge()  # passes: the perturbation is invisible at these inputs
    with pytest.raises(AssertionError):
        trl_dpo_parity("hinge")(models, dpo_inputs)
