"""Precision-recall plot of an evaluation, one curve per class (matplotlib, Agg canvas, no pyplot state)."""
from __future__ import annotations

from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mutdet.io.atomic import atomic_path


def plot_pr_curves(result: dict, path: str | Path, key: str = "AP50", title: str | None = None) -> Path:
    """Write a PNG of the precision-recall curves at one IoU threshold.

    Args:
        result: the dict returned by :func:`mutdet.evaluation.evaluate_detections`.
        path: PNG file, written atomically.
        key: which threshold's curves (``"AP50"``, ``"AP75"``, ...); the legend gives each class's AP.
        title: figure title; default ``"<key>: mean <value>"``.
    Returns:
        ``path``. Classes without ground truth have no curve and are listed as ``n/a`` in the legend.
    """
    if key not in result["mean"]:
        raise KeyError(f"plot_pr_curves: no {key!r} in the evaluation (have "
                       f"{[k for k in result['mean'] if k.startswith('AP')]})")
    fig = Figure(figsize=(8, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    palette = colormaps["tab20"].colors  # 20 distinct colours; DOTA has 15 classes, DIOR-R 20
    for k, (name, entry) in enumerate(result["classes"].items()):
        curve = result["pr_curves"].get(name, {}).get(key)
        if curve is None:
            ax.plot([], [], linestyle="none", label=f"{name} (n/a)")
            continue
        ax.step(curve["recall"], curve["precision"], where="post", linewidth=1.2, color=palette[k % len(palette)],
                linestyle="-" if k < len(palette) else "--", label=f"{name} ({100 * entry[key]:.1f})")
    mean = result["mean"][key]
    ax.set_title(title or f"{key}: mean {'n/a' if mean is None else f'{100 * mean:.1f}'}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title=f"class ({key})")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
