"""Hungarian matching of predictions to targets (one image at a time, scipy's assignment solver).

Cost of predicting target ``j`` with query ``i`` (all boxes normalised cxcywh, see
:mod:`mutdet.models.box_ops`):

    cost_class * focal(i, label_j)                                  (focal_cost: lower is better)
  + cost_bbox  * || box_i - box_j ||_1                              (both sides cxcywh)
  - cost_giou  * GIoU(xyxy(box_i), xyxy(box_j))                     (axis-aligned (cx, cy, w, h) box)
  + cost_angle * w_j * mean_bins BCE(angle_logits_i, angle_target_j) (w_j = 2 AR_j / (AR_j + 1))

The reference implementation compares the L1 cost across two box formats; here both sides are the
same normalised ``(cx, cy, w, h)``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import generalized_box_iou

from mutdet.losses.focal import focal_cost
from mutdet.models.box_ops import box_cxcywh_to_xyxy

__all__ = ["HungarianMatcher", "angle_cost", "build_matcher"]


def angle_cost(angle_logits: torch.Tensor, angle_targets: torch.Tensor, angle_weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean-over-bins BCE between every prediction and every target.

    Args:
        angle_logits: ``(N, A)``; angle_targets: ``(M, A)``; angle_weights: ``(M,)``.
    Returns:
        ``(N, M)``; uses ``BCE(x, t) = softplus(x) - x t``.
    """
    bins = angle_logits.shape[-1]
    cost = F.softplus(angle_logits).mean(-1, keepdim=True) - angle_logits @ angle_targets.T / bins
    return cost * angle_weights[None]


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising the weighted cost above.

    Args:
        cost_class, cost_bbox, cost_giou, cost_angle: weights (2, 2, 5, 2 in the paper).
        focal_alpha, focal_gamma: of the class cost.
    """

    def __init__(self, *, cost_class: float = 2.0, cost_bbox: float = 2.0, cost_giou: float = 5.0,
                 cost_angle: float = 2.0, focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou, self.cost_angle = cost_class, cost_bbox, cost_giou, cost_angle
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, angle_logits: torch.Tensor,
                    target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(N, M)`` cost for one image (``logits`` ``(N, K)``, ``boxes`` ``(N, 4)``, ``angle_logits`` ``(N, A)``)."""
        tgt_boxes = target["boxes"].to(boxes.dtype)
        cost = self.cost_class * focal_cost(logits, target["labels"], self.focal_alpha, self.focal_gamma)
        cost = cost + self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
        cost = cost - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        return cost + self.cost_angle * angle_cost(angle_logits, target["angle_targets"].to(angle_logits.dtype),
                                                   target["angle_weights"].to(angle_logits.dtype))

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, torch.Tensor],
                targets: Sequence[Mapping[str, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match each image's predictions to its targets.

        Args:
            outputs: ``pred_logits`` ``(B, N, K)``, ``pred_boxes`` ``(B, N, 4)``, ``pred_angle_logits``
                ``(B, N, A)``.
            targets: prepared targets (:func:`mutdet.losses.targets.prepare_targets`), one per image.
        Returns:
            per image ``(query_indices, target_indices)``, int64 ``(min(N, M_b),)`` each, sorted by query.
        """
        indices = []
        for b, target in enumerate(targets):
            device = outputs["pred_logits"].device
            if len(target["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64, device=device)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(outputs["pred_logits"][b].float(), outputs["pred_boxes"][b].float(),
                                    outputs["pred_angle_logits"][b].float(), target)
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64, device=device),
                            torch.as_tensor(cols, dtype=torch.int64, device=device)))
        return indices


def build_matcher(*, cost_class: float = 2.0, cost_bbox: float = 2.0, cost_giou: float = 5.0, cost_angle: float = 2.0,
                  focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> HungarianMatcher:
    """The matcher from plain keyword arguments (defaults: the paper's costs)."""
    return HungarianMatcher(cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou, cost_angle=cost_angle,
                            focal_alpha=focal_alpha, focal_gamma=focal_gamma)
