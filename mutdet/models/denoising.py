"""Contrastive denoising queries (DINO's CDN, as in ARS-DETR's ``DnQueryGenerator``).

Layout of the ``D`` denoising queries, placed *before* the ``Q`` matching queries:
``num_groups`` groups of ``2 * max_targets`` queries (``max_targets`` = most targets of one image in
the batch); in group ``g``, slot ``j < max_targets`` is a *positive* copy of target ``j`` (small noise:
reconstruct it), slot ``max_targets + j`` a *negative* copy (larger noise: predict no object). Slots
beyond an image's own number of targets are padding (background). ``num_groups =
max(1, num_denoising_queries // max_targets)``, so ``D = 2 * max_targets * num_groups`` (up to about
twice ``num_denoising_queries``, as the reference counts groups of positives only).

Noise (normalised boxes, see :mod:`mutdet.models.box_ops`):

* label: with probability ``label_noise / 2`` replaced by a uniformly random class;
* box: each corner coordinate of ``(x1, y1, x2, y2)`` moves by ``s u (w/2 or h/2) box_noise``, ``s = +-1``,
  ``u ~ U[0, 1)`` for positives and ``U[1, 2)`` for negatives, clamped to ``[0, 1]``;
* angle: ``theta + s u pi angle_noise`` (same ``s``, ``u`` ranges), wrapped into le90's ``[-pi/2, pi/2)``.
  The reference multiplies the noise by ``theta`` itself (no noise at ``theta = 0``); here it is
  additive, a fraction of the angle period, so every box is perturbed.

Attention mask ``(D + Q, D + Q)`` (True = may not attend): matching queries never see denoising
queries, and denoising groups never see each other.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["DenoisingQueries", "make_denoising_queries", "denoising_indices"]


@dataclass
class DenoisingQueries:
    """Denoising inputs of one batch.

    Attributes:
        content: ``(B, D, C)`` label embeddings of the noised labels (zeros on padding slots).
        boxes: ``(B, D, 4)`` noised normalised cxcywh (``0.5`` on padding slots).
        angles: ``(B, D)`` noised le90 angles.
        attn_mask: ``(D + Q, D + Q)`` bool.
        meta: ``{"num_queries": D, "num_groups": G, "max_targets": N_max, "group_size": 2 N_max}``.
    """

    content: torch.Tensor
    boxes: torch.Tensor
    angles: torch.Tensor
    attn_mask: torch.Tensor
    meta: dict[str, int]


def make_denoising_queries(targets: Sequence[dict[str, torch.Tensor]], *, label_embed: nn.Embedding,
                           num_matching_queries: int, num_denoising_queries: int = 100, label_noise: float = 0.5,
                           box_noise: float = 0.4, angle_noise: float = 0.02) -> DenoisingQueries | None:
    """Noised copies of the targets as extra decoder queries; None when the batch has no target.

    Args:
        targets: normalised targets (:func:`mutdet.models.box_ops.normalize_targets`): ``labels``
            ``(N,)``, ``boxes`` ``(N, 4)``, ``angles`` ``(N,)``.
        label_embed: ``num_classes -> C`` embedding of (noised) labels.
        num_matching_queries: ``Q``.
        num_denoising_queries, label_noise, box_noise, angle_noise: see the module docstring.
    """
    counts = [len(t["labels"]) for t in targets]
    max_targets = max(counts, default=0)
    if max_targets == 0 or num_denoising_queries <= 0:
        return None
    weight = label_embed.weight
    device, batch, num_classes = weight.device, len(targets), label_embed.num_embeddings
    groups = max(1, num_denoising_queries // max_targets)
    group_size = 2 * max_targets
    total = groups * group_size

    labels = torch.cat([t["labels"] for t in targets]).to(device)  # (T,) all targets of the batch
    boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=weight.dtype)
    angles = torch.cat([t["angles"] for t in targets]).to(device=device, dtype=weight.dtype)
    image = torch.cat([torch.full((n,), i, device=device, dtype=torch.long) for i, n in enumerate(counts)])
    within = torch.cat([torch.arange(n, device=device) for n in counts])
    copies = 2 * groups  # copy c: group c // 2, negative iff c is odd
    labels, boxes, angles = labels.repeat(copies), boxes.repeat(copies, 1), angles.repeat(copies)
    copy_id = torch.arange(copies, device=device).repeat_interleave(len(image))
    negative = (copy_id % 2 == 1).to(weight.dtype)

    resample = torch.rand(labels.shape, device=device) < label_noise * 0.5
    labels = torch.where(resample, torch.randint_like(labels, num_classes), labels)

    xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
    half = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:] / 2], 1)
    sign = torch.randint_like(xyxy, 0, 2) * 2.0 - 1.0
    magnitude = torch.rand_like(xyxy) + negative[:, None]
    xyxy = (xyxy + sign * magnitude * half * box_noise).clamp(0.0, 1.0)
    boxes = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, (xyxy[:, 2:] - xyxy[:, :2]).clamp(min=1e-4)], 1)

    sign = torch.randint_like(angles, 0, 2) * 2.0 - 1.0
    magnitude = torch.rand_like(angles) + negative
    angles = angles + sign * magnitude * math.pi * angle_noise
    angles = torch.remainder(angles + math.pi / 2, math.pi) - math.pi / 2

    slot = copy_id * max_targets + within.repeat(copies)  # position within the D queries
    rows = image.repeat(copies)
    content = weight.new_zeros(batch, total, weight.shape[1])
    content[rows, slot] = label_embed(labels)
    out_boxes = weight.new_full((batch, total, 4), 0.5)
    out_boxes[rows, slot] = boxes
    out_angles = weight.new_zeros(batch, total)
    out_angles[rows, slot] = angles

    size = total + num_matching_queries
    attn_mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    attn_mask[total:, :total] = True
    group_of = torch.arange(total, device=device) // group_size
    attn_mask[:total, :total] = group_of[:, None] != group_of[None, :]
    meta = {"num_queries": total, "num_groups": groups, "max_targets": max_targets, "group_size": group_size}
    return DenoisingQueries(content, out_boxes, out_angles, attn_mask, meta)


def denoising_indices(counts: Sequence[int], meta: dict[str, int],
                      device: torch.device | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed "matching" of denoising queries: per image, (positive query indices, target indices).

    Query index ``g * group_size + j`` reconstructs target ``j`` for every group ``g``; both tensors are
    ``(G * N_i,)`` int64, groups in order.
    """
    out = []
    for n in counts:
        j = torch.arange(n, device=device)
        g = torch.arange(meta["num_groups"], device=device)
        out.append(((g[:, None] * meta["group_size"] + j[None]).flatten(), j.repeat(meta["num_groups"])))
    return out
