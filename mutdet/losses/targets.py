"""Loss targets: the detector's per-image targets in the regression space, plus angle targets."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mutdet.models.angle_coder import ARCSLCoder, aspect_ratio_weight
from mutdet.models.box_ops import normalize_targets

__all__ = ["prepare_targets"]


def prepare_targets(targets: Sequence[Mapping[str, torch.Tensor]],
                    angle_coder: ARCSLCoder) -> list[dict[str, torch.Tensor]]:
    """Per-image targets -> what the matcher and the losses compare with.

    Args:
        targets: per image ``labels`` ``(N,)`` int64, ``boxes`` ``(N, 5)`` le90 pixels of the input,
            ``size`` ``(2,)`` valid ``(h, w)`` (see :func:`mutdet.models.box_ops.normalize_targets`).
        angle_coder: the detector's AR-CSL coder.
    Returns:
        per image ``labels`` ``(N,)``, ``boxes`` ``(N, 4)`` normalised cxcywh, ``angle_targets``
        ``(N, A)`` AR-CSL targets, ``angle_weights`` ``(N,)`` = ``2 AR / (AR + 1)`` (AR in pixels).
    """
    out = []
    for t in normalize_targets(targets):
        out.append({"labels": t["labels"], "boxes": t["boxes"],
                    "angle_targets": angle_coder.encode(t["angles"], t["sides"]),
                    "angle_weights": aspect_ratio_weight(t["sides"])})
    return out
