"""Pre-training loss curves (the paper's Figure 4): classification, regression, contrastive alignment
and angle losses against the step, one line per run (e.g. MutDet with and without the enhancement
module).

Curves are the main branch's last decoder layer, unweighted, read from each run's ``metrics.jsonl``
(one line per logged step). "Regression" is ``loss_l1 + loss_giou``. Thin lines are the logged
values, thick lines a moving average over ``smooth`` logged points. A run without a term (DETReg has
an L1 alignment loss, not a contrastive one) shows it all the same, with the term named in the legend.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mutdet.io.atomic import atomic_path

__all__ = ["PANELS", "read_metrics", "plot_loss_curves"]

PANELS = (("classification", ("loss_cls",)), ("regression (L1 + GIoU)", ("loss_l1", "loss_giou")),
          ("alignment", ("loss_align",)), ("angle", ("loss_angle",)))


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; a bad line raises naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training log not found: {path}")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON record ({exc.msg})") from None
    return records


def _series(records: list[dict], keys: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    rows = [(r["step"], sum(r[k] for k in keys)) for r in records if all(k in r for k in keys)]
    if not rows:
        return np.zeros(0), np.zeros(0)
    steps, values = np.asarray(rows, dtype=np.float64).T
    return steps, values


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < 2 or window <= 1:
        return values
    window = min(window, len(values))
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def plot_loss_curves(runs: Mapping[str, str | Path], path: str | Path, *, title: str | None = None,
                     smooth: int = 5) -> Path:
    """Write a 2 x 2 PNG of the four losses, one line per run.

    Args:
        runs: label -> ``metrics.jsonl`` of a pre-training run (in legend order).
        path: the PNG, written atomically.
        title: figure title.
        smooth: moving-average window in logged points.
    Returns:
        ``path``.
    """
    if not runs:
        raise ValueError("plot_loss_curves: no run given")
    data = {label: read_metrics(p) for label, p in runs.items()}
    fig = Figure(figsize=(10, 7), dpi=100)
    FigureCanvasAgg(fig)
    colours = colormaps["tab10"].colors
    for k, (name, keys) in enumerate(PANELS):
        ax = fig.add_subplot(2, 2, k + 1)
        for c, (label, records) in enumerate(data.items()):
            steps, values = _series(records, keys)
            if not len(steps):
                ax.plot([], [], color=colours[c % 10], label=f"{label} (not logged)")
                continue
            ax.plot(steps, values, color=colours[c % 10], alpha=0.3, linewidth=0.8)
            ax.plot(steps, _moving_average(values, smooth), color=colours[c % 10], linewidth=1.8, label=label)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(" + ".join(keys))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
