"""PNG plots: the margin distribution of two models, and the training curves of a run's metrics.jsonl.

    save_margin_histogram({"reference": ref_margins, "policy": policy_margins}, "report/margins.png")
    save_training_curves(read_metrics("output/dpo"), "output/dpo/training_curves.png", title="output/dpo")

Images have exactly the stated pixel size (figure inches × dpi, no tight bounding box that would crop them).
matplotlib's Agg backend draws without a display.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

DPI = 100
MARGINS_SIZE = (800, 500)  # pixels (width, height)
PANEL_SIZE = (480, 320)  # pixels per training-curve panel

# Panels of a training-curve figure, in order: (title, metric names). A panel is drawn when the run logged any of
# its metrics; evaluation records (`eval_*`) share the panel of their training metric.
CURVE_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss", "eval_loss")),
    ("rewards/margins", ("rewards/margins", "eval_rewards/margins")),
    ("rewards/accuracies", ("rewards/accuracies", "eval_rewards/accuracies")),
    ("rewards/chosen and rejected", ("rewards/chosen", "rewards/rejected", "eval_rewards/chosen",
                                     "eval_rewards/rejected")),
    ("logps/chosen and rejected", ("logps/chosen", "logps/rejected", "eval_logps/chosen", "eval_logps/rejected")),
    ("mean_token_accuracy", ("mean_token_accuracy", "eval_mean_token_accuracy")),
    ("entropy", ("entropy", "eval_entropy")),
    ("learning_rate", ("learning_rate",)),
    ("grad_norm", ("grad_norm",)),
)
PANELS_PER_ROW = 3


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_margin_histogram(margins: dict[str, Sequence[float]], path: str | os.PathLike,
                          size: tuple[int, int] = MARGINS_SIZE) -> None:
    """Overlaid histograms of log p(chosen) − log p(rejected), one per model, on shared bins; a line at 0 (right
    of it: the model prefers the chosen answer)."""
    plt = _pyplot()
    values = {name: [float(m) for m in side] for name, side in margins.items()}
    everything = [m for side in values.values() for m in side]
    low, high = min(everything + [0.0]), max(everything + [0.0])
    bins = [low + (high - low) * k / 40 for k in range(41)] if high > low else 40
    figure, axes = plt.subplots(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    for name, side in values.items():
        mean = sum(side) / max(len(side), 1)
        axes.hist(side, bins=bins, alpha=0.5, label=f"{name} (mean {mean:.2f})")
    axes.axvline(0.0, color="black", linewidth=1)
    axes.set_xlabel("log p(chosen) − log p(rejected)  (nats)")
    axes.set_ylabel("held-out pairs")
    axes.set_title(f"Margin distribution on {len(everything) // max(len(values), 1)} held-out pairs")
    axes.legend()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def curve_panels(records: list[dict]) -> list[tuple[str, list[str]]]:
    """The panels a run's records fill: `CURVE_PANELS` restricted to the metrics that were logged."""
    logged = {key for record in records if "step" in record for key in record}
    panels = [(title, [name for name in names if name in logged]) for title, names in CURVE_PANELS]
    return [(title, names) for title, names in panels if names]


def save_training_curves(records: list[dict], path: str | os.PathLike, title: str = "") -> tuple[int, int]:
    """One panel per logged metric group (see `CURVE_PANELS`) against the optimizer step; returns the image size
    in pixels (width, height): `PANEL_SIZE` per panel, `PANELS_PER_ROW` panels a row.

    Raises:
        ValueError: no record holds a plotted metric (the caller says which file).
    """
    panels = curve_panels(records)
    if not panels:
        raise ValueError(f"no plottable metric (expected some of {[t for t, _ in CURVE_PANELS]})")
    plt = _pyplot()
    columns = min(len(panels), PANELS_PER_ROW)
    rows = -(-len(panels) // columns)
    size = (PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows)
    figure, axes = plt.subplots(rows, columns, figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI,
                                layout="constrained", squeeze=False)
    for axis, (panel_title, names) in zip(axes.flat, panels, strict=False):
        for name in names:
            points = [(record["step"], record[name]) for record in records if name in record and "step" in record]
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            style = dict(marker="o", linestyle="--") if name.startswith("eval_") else dict(linewidth=1.2)
            axis.plot(steps, values, label=name, **style)
        axis.set_title(panel_title)
        axis.set_xlabel("step")
        axis.legend(fontsize="small")
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return size
