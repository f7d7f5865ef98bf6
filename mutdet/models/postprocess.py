"""Detector outputs -> per-image detections in le90 pixels (top-k over queries x classes, no NMS)."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mutdet.models.angle_coder import ARCSLCoder
from mutdet.models.box_ops import le90_from_normalized

__all__ = ["PostProcess"]


class PostProcess(nn.Module):
    """Keep the ``num_select`` best (query, class) pairs of each image.

    Args:
        angle_coder: decodes the angle bin logits.
        num_select: detections per image (300); fewer if ``Q * K`` is smaller.
    """

    def __init__(self, *, angle_coder: ARCSLCoder, num_select: int = 300):
        super().__init__()
        self.angle_coder = angle_coder
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, torch.Tensor], sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections per image.

        Args:
            outputs: detector outputs (``pred_logits`` ``(B, Q, K)``, ``pred_boxes`` ``(B, Q, 4)``,
                ``pred_angle_logits`` ``(B, Q, A)``).
            sizes: ``(B, 2)`` valid ``(h, w)`` of each image in pixels (the targets' ``size``).
        Returns:
            per image ``{"scores": (k,)`` sigmoid probabilities, descending, ``"labels": (k,)`` int64,
            ``"boxes": (k, 5)`` le90 pixels of the input``}``.
        """
        logits = outputs["pred_logits"]
        batch, queries, classes = logits.shape
        k = min(self.num_select, queries * classes)
        scores, flat = logits.sigmoid().flatten(1).topk(k, dim=1)  # (B, Q*K) -> (B, k)
        query = torch.div(flat, classes, rounding_mode="floor")
        labels = flat % classes
        results = []
        for b in range(batch):
            boxes = outputs["pred_boxes"][b, query[b]]
            angles = self.angle_coder.decode(outputs["pred_angle_logits"][b, query[b]])
            results.append({"scores": scores[b], "labels": labels[b],
                            "boxes": le90_from_normalized(boxes, angles, sizes[b])})
        return results
