"""Set criterion of the oriented DETR: four losses on every decoder layer, the encoder proposals and
the denoising queries, as a dict of named scalars with one ``weight_dict``.

Losses of one branch, given matched pairs ``(i, j)`` and ``n`` = number of target boxes in the batch
(under DDP: the global count over the world size, as DETR; at least 1; for denoising: positives over
all groups):

* ``loss_cls``: sigmoid focal loss (alpha 0.25, gamma 2) summed over all queries and classes, / ``n``;
  unmatched queries (and denoising negatives / padding slots) have all-zero targets;
* ``loss_l1``: ``sum |box_i - box_j|`` over normalised ``(cx, cy, w, h)``, / ``n``;
* ``loss_giou``: ``sum 1 - GIoU`` of the axis-aligned ``(cx, cy, w, h)`` boxes, / ``n``;
* ``loss_angle``: ``sum_i w_j sum_bins BCE(angle_logits_i, AR-CSL target_j)``, / ``(n * A)``, with
  ``w_j = 2 AR_j / (AR_j + 1)`` (ARS-DETR: ``CrossEntropyLoss(use_sigmoid=True)`` with per-bin weight
  ``w_j`` and ``avg_factor = num_pos * coding_len``; the AR-CSL targets cover all ``A`` bins).

Keys: ``loss_<name>`` for the last decoder layer, ``loss_<name>_<k>`` for layer ``k`` (0-based,
``k < D - 1``), ``loss_<name>_enc`` for the encoder proposals (class-agnostic: every target is class
0 of the single objectness logit), ``loss_<name>_dn`` and ``loss_<name>_dn_<k>`` for the denoising
queries (matched by construction, see :func:`mutdet.models.denoising.denoising_indices`).
The total loss is ``sum(losses[k] * weight_dict[k])``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from mutdet.losses.focal import sigmoid_focal_loss
from mutdet.losses.matcher import HungarianMatcher, build_matcher
from mutdet.losses.targets import prepare_targets
from mutdet.models.angle_coder import ARCSLCoder
from mutdet.models.box_ops import box_cxcywh_to_xyxy
from mutdet.models.denoising import denoising_indices

__all__ = ["SetCriterion", "build_criterion", "LOSS_NAMES", "loss_suffixes"]

LOSS_NAMES = ("cls", "l1", "giou", "angle")


def loss_suffixes(num_decoder_layers: int) -> list[str]:
    """Key suffixes of every branch: ``""``, ``"_0"``.., ``"_enc"``, ``"_dn"``, ``"_dn_0"``.."""
    aux = [f"_{k}" for k in range(num_decoder_layers - 1)]
    return ["", *aux, "_enc", "_dn", *(f"_dn{s}" for s in aux)]


class SetCriterion(nn.Module):
    """Compute all losses of a detector output.

    Args:
        num_classes: ``K`` of the detector's class heads; labels must be below it.
        matcher: Hungarian matcher.
        angle_coder: the detector's AR-CSL coder.
        weight_dict: loss key -> weight (keys absent from it are still returned, with no weight).
        focal_alpha, focal_gamma: of ``loss_cls``.
    """

    def __init__(self, *, num_classes: int, matcher: HungarianMatcher, angle_coder: ARCSLCoder,
                 weight_dict: dict[str, float], focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        self.num_classes = num_classes
        self.matcher, self.angle_coder, self.weight_dict = matcher, angle_coder, dict(weight_dict)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def branch_losses(self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]],
                      indices: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      num_boxes: float) -> dict[str, torch.Tensor]:
        """The four losses of one set of predictions (``pred_logits`` ``(B, N, K)``, ``pred_boxes``
        ``(B, N, 4)``, ``pred_angle_logits`` ``(B, N, A)``), given prepared targets and matched indices."""
        logits, boxes, angle_logits = outputs["pred_logits"], outputs["pred_boxes"], outputs["pred_angle_logits"]
        batch = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)])
        query = torch.cat([q for q, _ in indices])
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        onehot = torch.zeros_like(logits)
        onehot[batch, query, labels] = 1.0
        loss_cls = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma).sum() / num_boxes

        src_boxes = boxes[batch, query]  # (M, 4)
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src_boxes.dtype)
        loss_l1 = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
        loss_giou = generalized_box_iou_loss(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes),
                                             reduction="sum") / num_boxes

        src_angles = angle_logits[batch, query]  # (M, A)
        tgt_angles = torch.cat([t["angle_targets"][j] for t, (_, j) in zip(targets, indices)]).to(src_angles.dtype)
        weights = torch.cat([t["angle_weights"][j] for t, (_, j) in zip(targets, indices)]).to(src_angles.dtype)
        bce = F.binary_cross_entropy_with_logits(src_angles, tgt_angles, reduction="none").sum(-1)
        loss_angle = (bce * weights).sum() / (num_boxes * angle_logits.shape[-1])
        return {"loss_cls": loss_cls, "loss_l1": loss_l1, "loss_giou": loss_giou, "loss_angle": loss_angle}

    def _prepare(self, outputs: Mapping,
                 targets: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        if outputs["pred_logits"].shape[-1] != self.num_classes:
            raise ValueError(f"criterion built for {self.num_classes} classes, outputs have "
                             f"{outputs['pred_logits'].shape[-1]}")
        prepared = prepare_targets(targets, self.angle_coder)
        for i, t in enumerate(prepared):
            if len(t["labels"]) and not 0 <= int(t["labels"].min()) <= int(t["labels"].max()) < self.num_classes:
                raise ValueError(f"target {i}: labels must be in [0, {self.num_classes}), got {t['labels'].tolist()}")
        return prepared

    @staticmethod
    def _branches(outputs: Mapping, prepared: list[dict[str, torch.Tensor]]) -> dict[str, tuple[Mapping, list]]:
        """Loss suffix -> (predictions, targets) of every branch present in ``outputs``."""
        branches = {"": (outputs, prepared)}
        for k, aux in enumerate(outputs.get("aux_outputs", [])):
            branches[f"_{k}"] = (aux, prepared)
        if outputs.get("enc_outputs") is not None:
            binary = [dict(t, labels=torch.zeros_like(t["labels"])) for t in prepared]
            branches["_enc"] = (outputs["enc_outputs"], binary)
        dn = outputs.get("dn_outputs")
        if dn is not None:
            branches["_dn"] = (dn, prepared)
            for k, aux in enumerate(dn.get("aux_outputs", [])):
                branches[f"_dn_{k}"] = (aux, prepared)
        return branches

    def _match(self, outputs: Mapping, prepared: list[dict[str, torch.Tensor]]) -> dict[str, list]:
        indices = {}
        for suffix, (branch, branch_targets) in self._branches(outputs, prepared).items():
            if suffix.startswith("_dn"):
                indices[suffix] = denoising_indices([len(t["labels"]) for t in prepared], outputs["dn_meta"],
                                                    branch["pred_logits"].device)
            else:
                indices[suffix] = self.matcher(branch, branch_targets)
        return indices

    @staticmethod
    def _num_boxes(prepared: list[dict[str, torch.Tensor]], device: torch.device) -> float:
        """Target boxes per rank, averaged over the ranks of a DDP run (DETR's normalisation): each rank
        divides by ``sum_r n_r / world_size``, so the averaged gradient is that of ``sum_r S_r / sum_r n_r``,
        the single-process loss of the global batch, even when ranks hold different numbers of boxes."""
        from mutdet.engine import dist

        count = float(sum(len(t["labels"]) for t in prepared))
        if dist.is_distributed():
            total = torch.tensor([count], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(total)
            count = float(total.item()) / dist.get_world_size()
        return max(count, 1.0)

    def match(self, outputs: Mapping, targets: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, list]:
        """Matched pairs of every branch, keyed by loss suffix (``""``, ``"_0"``, .., ``"_enc"``, ``"_dn"``, ..).

        Each value is a list over images of ``(query_indices, target_indices)`` int64 tensors, as
        :class:`mutdet.losses.matcher.HungarianMatcher` returns (denoising: fixed by construction).
        Pass it back to :meth:`forward` to reuse it (e.g. for an extra loss on matched pairs).
        """
        return self._match(outputs, self._prepare(outputs, targets))

    def forward(self, outputs: Mapping, targets: Sequence[Mapping[str, torch.Tensor]],
                indices: Mapping[str, list] | None = None) -> dict[str, torch.Tensor]:
        """All losses.

        Args:
            outputs: the detector's output dict (``aux_outputs``, ``enc_outputs``, ``dn_outputs`` +
                ``dn_meta`` are used when present and not None).
            targets: per image ``labels`` ``(N,)`` int64, ``boxes`` ``(N, 5)`` le90 pixels, ``size``
                ``(2,)`` valid ``(h, w)``.
            indices: the result of :meth:`match` on the same outputs, or None to match here.
        Returns:
            scalar losses keyed as in the module docstring (unweighted).
        """
        prepared = self._prepare(outputs, targets)
        indices = self._match(outputs, prepared) if indices is None else indices
        num_boxes = self._num_boxes(prepared, outputs["pred_logits"].device)
        num_dn = num_boxes * outputs["dn_meta"]["num_groups"] if outputs.get("dn_outputs") is not None else 0.0
        losses: dict[str, torch.Tensor] = {}
        for suffix, (branch, branch_targets) in self._branches(outputs, prepared).items():
            n = num_dn if suffix.startswith("_dn") else num_boxes
            for key, value in self.branch_losses(branch, branch_targets, indices[suffix], n).items():
                losses[key + suffix] = value
        return losses


def build_criterion(*, num_classes: int, num_decoder_layers: int, num_angle_bins: int = 180,
                    angle_radius: int | None = None,
                    loss_cls: float = 2.0, loss_l1: float = 2.0, loss_giou: float = 5.0, loss_angle: float = 2.0,
                    cost_class: float = 2.0, cost_bbox: float = 2.0, cost_giou: float = 5.0, cost_angle: float = 2.0,
                    focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> SetCriterion:
    """The criterion from plain keyword arguments (defaults: the paper's weights and costs).

    ``num_classes`` and ``num_angle_bins`` must match the detector's. ``angle_radius``: None (the
    reference's AR-CSL, targets over the whole angle range) or a cut in bins, an ablation (see
    :mod:`mutdet.models.angle_coder`). ``weight_dict`` gives a loss the same weight on every branch (all
    suffixes of :func:`loss_suffixes`).
    """
    if num_classes < 1 or num_decoder_layers < 1:
        raise ValueError(f"num_classes and num_decoder_layers must be >= 1, got {num_classes}, {num_decoder_layers}")
    weights = {"cls": loss_cls, "l1": loss_l1, "giou": loss_giou, "angle": loss_angle}
    weight_dict = {f"loss_{name}{suffix}": weights[name] for suffix in loss_suffixes(num_decoder_layers)
                   for name in LOSS_NAMES}
    matcher = build_matcher(cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou, cost_angle=cost_angle,
                            focal_alpha=focal_alpha, focal_gamma=focal_gamma)
    coder = ARCSLCoder(num_bins=num_angle_bins, radius=angle_radius)
    return SetCriterion(num_classes=num_classes, matcher=matcher, angle_coder=coder, weight_dict=weight_dict,
                        focal_alpha=focal_alpha, focal_gamma=focal_gamma)
