"""Sigmoid focal loss (Lin et al.), elementwise; the criterion chooses the normalisation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sigmoid_focal_loss", "focal_cost"]


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Elementwise ``-a_t (1 - p_t)^gamma log(p_t)``.

    Args:
        logits: any shape; targets: same shape, in ``[0, 1]`` (one-hot classes).
        alpha: weight of positives (``1 - alpha`` for negatives); negative disables it.
    Returns:
        the loss, same shape (no reduction).
    """
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def focal_cost(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Matching cost of predicting class ``labels[j]`` with ``logits[i]`` (Deformable DETR).

    ``cost = focal(p, 1) - focal(p, 0)`` at the target's class: lower is better.

    Args:
        logits: ``(N, K)``; labels: ``(M,)`` int64.
    Returns:
        ``(N, M)``.
    """
    p = logits.sigmoid()
    neg = (1 - alpha) * p ** gamma * -(1 - p + 1e-8).log()
    pos = alpha * (1 - p) ** gamma * -(p + 1e-8).log()
    return pos[:, labels] - neg[:, labels]
