"""Tensor box helpers for the detector and its losses: targets in, predictions out.

Two box formats meet here, both defined in :mod:`mutdet.boxes`'s le90 convention:

* **le90 pixels** ``(cx, cy, w, h, theta)`` of the model input (the padded batch tensor; the valid
  image occupies its top-left ``size = (h, w)`` corner, so both frames share the origin);
* **normalised** ``(cx, cy, w, h)``: ``cx, w`` divided by the valid image width, ``cy, h`` by its
  height (the model's box regression space), with the angle ``theta`` kept separately in radians.

The normalised form is exact for square images; for other shapes the angle is still the pixel-space
le90 angle (as ARS-DETR does).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from mutdet.boxes import normalize_le90

__all__ = ["TARGET_KEYS", "normalize_targets", "le90_from_normalized", "box_cxcywh_to_xyxy"]

TARGET_KEYS = ("labels", "boxes", "size")


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` ``(cx, cy, w, h)`` -> ``(x1, y1, x2, y2)``, same frame."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def normalize_targets(targets: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Check per-image targets and bring them into the regression space.

    Args:
        targets: one dict per image with ``labels`` ``(N,)`` int64 class indices, ``boxes`` ``(N, 5)``
            le90 pixels of the input, ``size`` ``(2,)`` ``(h, w)`` of the valid image in pixels.
    Returns:
        one dict per image: ``labels`` ``(N,)`` int64, ``boxes`` ``(N, 4)`` normalised cxcywh, ``angles``
        ``(N,)`` le90 radians, ``sides`` ``(N, 2)`` ``(w, h)`` in pixels (for aspect ratios).
    """
    out = []
    for i, t in enumerate(targets):
        missing = [k for k in TARGET_KEYS if k not in t]
        if missing:
            raise KeyError(f"target {i}: missing key(s) {missing}; expected {list(TARGET_KEYS)}")
        labels, boxes, size = t["labels"], t["boxes"], torch.as_tensor(t["size"])
        if boxes.ndim != 2 or boxes.shape[1] != 5:
            raise ValueError(f"target {i}: boxes must be (N, 5) le90, got shape {tuple(boxes.shape)}")
        if labels.shape != boxes.shape[:1] or labels.dtype != torch.int64:
            raise ValueError(f"target {i}: labels must be int64 of shape ({len(boxes)},), "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        if size.shape != (2,):
            raise ValueError(f"target {i}: size must be (h, w), got shape {tuple(size.shape)}")
        h, w = (float(v) for v in size)
        scale = boxes.new_tensor([w, h, w, h])
        out.append({"labels": labels, "boxes": boxes[:, :4] / scale, "angles": boxes[:, 4],
                    "sides": boxes[:, 2:4]})
    return out


def le90_from_normalized(boxes: torch.Tensor, angles: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Predictions -> le90 pixels of the input.

    Args:
        boxes: ``(N, 4)`` normalised cxcywh; angles: ``(N,)`` radians; size: ``(2,)`` ``(h, w)``.
    Returns:
        ``(N, 5)`` le90 (``w >= h``, ``theta`` in ``[-pi/2, pi/2)``, via :func:`mutdet.boxes.normalize_le90`),
        on the device and dtype of ``boxes``.
    """
    h, w = (float(v) for v in size)
    pixels = torch.cat([boxes * boxes.new_tensor([w, h, w, h]), angles[:, None]], dim=1)
    le90 = normalize_le90(pixels.detach().cpu().double().numpy())
    return torch.from_numpy(np.ascontiguousarray(le90)).to(device=boxes.device, dtype=boxes.dtype)
