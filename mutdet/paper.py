"""The MutDet paper's reported numbers (ARS-DETR, ResNet-50), as plain data for the generated tables.

Copied by hand from ``METHOD.md`` ("Tables to regenerate"); nothing here is parsed at run time and
nothing is invented: the paper gives no per-class AP for these tables, so none is listed. All values
are AP in percent on the test split of the paper's dataset (``DIOR-R`` or ``DOTA-v1.0``).

* :data:`MAIN`: Tables 2/3, paper dataset -> method -> ``(AP50, AP75)``;
* :data:`LOW_DATA`: DIOR-R AP50 by data fraction of the fine-tuning set -> method -> AP50;
* :data:`ABLATION`: DIOR-R AP50 of the ablation rows (in the paper's order) at 12 / 24 / 36
  fine-tuning epochs; :data:`ABLATION_FLAGS`: the pre-training flags of each row (``mutdet.variants``),
  so that a table row is matched to the paper's by what it pre-trained, not by its name.

Method names are the paper's row labels (``"none"`` is training from scratch, i.e. no pre-training).
"""
from __future__ import annotations

from collections.abc import Mapping

from mutdet.variants import PRESETS

__all__ = [
    "ABLATION",
    "ABLATION_EPOCHS",
    "ABLATION_FLAGS",
    "DATASETS",
    "DETECTOR",
    "LOW_DATA",
    "MAIN",
    "MAIN_METHODS",
    "ablation_ap50",
    "low_data_ap50",
    "main_ap",
]

DETECTOR = "ARS-DETR R50"
DATASETS: tuple[str, ...] = ("DIOR-R", "DOTA-v1.0")
MAIN_METHODS: tuple[str, ...] = ("none", "UP-DETR", "AlignDet", "DETReg", "MutDet")
ABLATION_EPOCHS: tuple[int, ...] = (12, 24, 36)

MAIN: dict[str, dict[str, tuple[float, float]]] = {
    "DIOR-R": {
        "none": (65.7, 45.7),
        "UP-DETR": (67.1, 48.4),
        "AlignDet": (65.8, 45.8),
        "DETReg": (67.9, 49.1),
        "MutDet": (70.7, 51.2),
    },
    "DOTA-v1.0": {
        "none": (72.9, 49.6),
        "UP-DETR": (72.7, 50.0),
        "AlignDet": (72.6, 49.1),
        "DETReg": (72.6, 49.4),
        "MutDet": (74.5, 51.6),
    },
}

LOW_DATA: dict[str, dict[float, dict[str, float]]] = {
    "DIOR-R": {
        0.1: {"none": 37.9, "DETReg": 50.8, "MutDet": 56.9},
        0.25: {"none": 51.1, "DETReg": 58.4, "MutDet": 62.9},
        0.5: {"none": 58.8, "DETReg": 63.1, "MutDet": 66.7},
        1.0: {"none": 65.7, "DETReg": 67.9, "MutDet": 70.7},
    },
}

ABLATION: dict[str, list[tuple[str, dict[int, float]]]] = {
    "DIOR-R": [
        ("DETReg", {12: 62.1, 24: 65.1, 36: 67.9}),
        ("+ contrastive", {12: 62.6, 24: 65.8, 36: 68.5}),
        ("+ enhanced embeddings", {12: 62.8, 24: 65.9, 36: 68.7}),
        ("+ enhanced features", {12: 65.5, 24: 67.0, 36: 69.5}),
        ("+ encoder loss and siamese head (full MutDet)", {12: 66.9, 24: 69.8, 36: 70.7}),
    ],
}


# The flags of the paper's ablation rows, in order. The paper's last row adds the encoder loss and the
# siamese head "(full MutDet)": MutDet's preset, which also has pseudo-classes and the similarity-aware
# proposal selection, so our ladder reaches it in four one-flag rungs whose rows the paper does not have.
_CONTRASTIVE = {**PRESETS["detreg"], "alignment": "contrastive"}
_ENHANCED_TARGETS = {**_CONTRASTIVE, "target": "enhanced"}
ABLATION_FLAGS: tuple[dict, ...] = (
    dict(PRESETS["detreg"]),
    _CONTRASTIVE,
    _ENHANCED_TARGETS,
    {**_ENHANCED_TARGETS, "decoder_features": "enhanced"},
    dict(PRESETS["mutdet"]),
)


def ablation_row(flags: Mapping | None) -> int | None:
    """The paper's ablation row (0-based) that pre-trained with exactly ``flags``, or None."""
    if flags is None:
        return None
    return next((k for k, row in enumerate(ABLATION_FLAGS) if row == dict(flags)), None)


def main_ap(dataset: str | None, method: str) -> tuple[float, float] | None:
    """The paper's ``(AP50, AP75)`` of ``method`` on ``dataset``, or None where the paper has none."""
    return MAIN.get(dataset or "", {}).get(method)


def low_data_ap50(dataset: str | None, fraction: float, method: str) -> float | None:
    """The paper's AP50 of ``method`` fine-tuned on ``fraction`` (0..1) of ``dataset``, or None."""
    for frac, row in LOW_DATA.get(dataset or "", {}).items():
        if abs(frac - fraction) < 1e-9:
            return row.get(method)
    return None


def ablation_ap50(dataset: str | None, row: int, epochs: int) -> float | None:
    """The paper's AP50 of ablation row ``row`` (0-based, paper order) after ``epochs``, or None."""
    rows = ABLATION.get(dataset or "", [])
    return rows[row][1].get(epochs) if 0 <= row < len(rows) else None
