"""Losses of MutDet / DETReg pre-training: the detection losses of the main branch (and of the siamese
pass), plus the alignment losses between predicted and target embeddings.

Keys (unweighted; :attr:`PretrainCriterion.weight_dict` weights them):

* every key of :class:`mutdet.losses.criterion.SetCriterion` for the main branch, and the same keys
  with ``_siam`` appended for the siamese pass;
* ``loss_align``: the last decoder layer's embeddings of the Hungarian-matched queries against their
  proposals' targets: :func:`contrastive_alignment_loss` (MutDet) or :func:`l1_alignment_loss` (DETReg);
* contrastive alignment only: ``loss_align_dn`` (the positive queries of the *first* denoising group:
  query ``j`` of group 0 reconstructs target ``j``), ``loss_align_enc`` (``Z_enc`` of the encoder tokens
  matched by the ``_enc`` branch; when the encoder head is on), ``loss_align_siam`` (the siamese pass's
  last layer, matched by its own matcher) and ``loss_align_dn_siam`` (the siamese pass's first
  denoising group), the last two when the siamese pass is on: the reference computes the decoder and
  the denoising alignment losses on both branches;
* ``align_pos_cosine`` / ``align_neg_cosine``: mean cosine of the matched and of the unmatched pairs of
  the last decoder layer (logged, not optimised; the negative one only when there are two pairs or more).

All alignment losses have the weight ``align_weight`` (1 in the paper). Negatives of the contrastive
loss are all other matched pairs of the batch, across images and, under DDP, across ranks
(:func:`gather_pairs`); the targets are not detached. The ``l1`` alignment (DETReg) is
:func:`mutdet.losses.contrastive.l1_alignment_loss` on the last layer only, between un-normalised
vectors (:mod:`mutdet.models.pretrain`), as DETReg's ``loss_object_embedding``.

Against the reference (floatingstarZ/MutDet ``DETReg_dn_ars_detr_headv7.py``):

* denoising alignment: the reference takes "the first ``n`` positives" of the flattened batch (``n``
  = targets in the batch), which for two images or more are image 0's positives of several groups
  and none of image 1's (and pairs the same target twice); here it is group 0 of every image, the
  paper's "first denoising group";
* negatives: the reference's are the pairs of one GPU (2 images); here the pairs of the whole batch,
  all ranks together, so the loss does not depend on how the batch is split over GPUs.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mutdet.losses.contrastive import alignment_stats, contrastive_alignment_loss, gather_matched, l1_alignment_loss
from mutdet.losses.criterion import SetCriterion
from mutdet.models.denoising import denoising_indices
from mutdet.variants import PretrainVariant

__all__ = ["PretrainCriterion", "build_pretrain_criterion", "gather_pairs"]


class _GatherRows(torch.autograd.Function):
    """Rows of every rank, concatenated in rank order; backward: the summed gradient of this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: tuple[int, ...], rank: int) -> torch.Tensor:
        import torch.distributed as tdist
        import torch.nn.functional as F

        padded = F.pad(x, (0, 0, 0, max(counts) - x.shape[0])).contiguous()  # all_gather needs equal shapes
        parts = [torch.empty_like(padded) for _ in counts]
        tdist.all_gather(parts, padded)
        ctx.counts, ctx.rank = counts, rank
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as tdist

        grad = grad.contiguous().clone()
        tdist.all_reduce(grad)  # every rank's loss depends on this rank's rows
        start = sum(ctx.counts[:ctx.rank])
        return grad[start:start + ctx.counts[ctx.rank]], None, None


def gather_pairs(z: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The matched pairs of every DDP rank, concatenated in rank order (identity without a process
    group): every rank then computes the loss of the global batch, whose negatives are all pairs of all
    ranks, as one process with the whole batch would. The backward sums every rank's gradient of this
    rank's pairs; DDP's gradient averaging then gives the single-process gradient."""
    from mutdet.engine import dist

    if not dist.is_distributed():
        return z, o
    import torch.distributed as tdist

    count = torch.tensor([z.shape[0]], device=z.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    tdist.all_gather(counts, count)
    counts = tuple(int(c) for c in counts)
    if max(counts) == 0:
        return z, o
    # one gather of [z | o]: a single backward node, so every rank issues its collectives in one order
    both = _GatherRows.apply(torch.cat([z, o.to(z.dtype)], 1), counts, dist.get_rank())
    return both[:, :z.shape[1]], both[:, z.shape[1]:].to(o.dtype)


class PretrainCriterion(nn.Module):
    """Detection losses + alignment losses of a :class:`mutdet.models.pretrain.PretrainModel` output.

    Args:
        detection: the detector's set criterion (classes = pseudo-classes or 1).
        variant: which losses exist (see :mod:`mutdet.models.pretrain`).
        temperature: ``tau`` of the contrastive loss (0.2).
        align_weight: weight of every alignment loss (1.0).
    """

    def __init__(self, *, detection: SetCriterion, variant: PretrainVariant, temperature: float = 0.2,
                 align_weight: float = 1.0):
        super().__init__()
        self.detection, self.variant, self.temperature = detection, variant, temperature
        weights = dict(detection.weight_dict)
        if variant.siamese:
            weights.update({f"{k}_siam": v for k, v in detection.weight_dict.items()})
        align_keys = ["loss_align"]
        if variant.alignment == "contrastive":
            align_keys.append("loss_align_dn")
            if variant.encoder_embedding_loss:
                align_keys.append("loss_align_enc")
            if variant.siamese:
                align_keys += ["loss_align_siam", "loss_align_dn_siam"]
        weights.update({k: align_weight for k in align_keys})
        self.weight_dict = weights

    def _align(self, z: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        z, o = gather_pairs(z, o)
        if self.variant.alignment == "contrastive":
            return contrastive_alignment_loss(z, o, self.temperature)
        return l1_alignment_loss(z, o)

    def forward(self, outputs: Mapping, targets: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        variant = self.variant
        align_targets = outputs["align_targets"]
        indices = self.detection.match(outputs, targets)
        losses = self.detection(outputs, targets, indices)

        z, o = gather_matched(outputs["pred_embed"], align_targets, indices[""])
        losses["loss_align"] = self._align(z, o)
        stats = alignment_stats(z, o)  # this rank's pairs
        for key, value in stats.items():
            if value == value:  # not NaN
                losses[f"align_{key}"] = torch.tensor(value, device=z.device)

        if variant.alignment == "contrastive":
            losses["loss_align_dn"] = self._align_denoising(outputs, targets)
            if variant.encoder_embedding_loss:
                z_enc = outputs["enc_outputs"]["pred_embed"]
                losses["loss_align_enc"] = self._align(*gather_matched(z_enc, align_targets, indices["_enc"]))

        siamese = outputs.get("siamese")
        if variant.siamese and siamese is not None:
            siam_indices = self.detection.match(siamese, targets)
            for key, value in self.detection(siamese, targets, siam_indices).items():
                losses[f"{key}_siam"] = value
            if variant.alignment == "contrastive":
                losses["loss_align_siam"] = self._align(
                    *gather_matched(siamese["pred_embed"], align_targets, siam_indices[""]))
                losses["loss_align_dn_siam"] = self._align_denoising(siamese, targets, align_targets)
        return losses

    def _align_denoising(self, outputs: Mapping, targets: Sequence[Mapping[str, torch.Tensor]],
                         align_targets: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Alignment loss of the positive queries of the first denoising group of one pass (query ``j`` of
        group 0 against target ``j`` of its image); a zero with a gradient path when no denoising ran."""
        align_targets = outputs["align_targets"] if align_targets is None else align_targets
        dn = outputs.get("dn_outputs")
        if dn is None:  # no target in the batch: keep the key (zero) so that logs stay aligned
            return 0.0 * outputs["pred_embed"].sum()
        counts = [len(t["embeddings"]) for t in targets]
        # the positives of group 0 only: the fixed denoising matching with one group
        group0 = denoising_indices(counts, {**outputs["dn_meta"], "num_groups": 1}, dn["pred_embed"].device)
        return self._align(*gather_matched(dn["pred_embed"], align_targets, group0))


def build_pretrain_criterion(*, variant: PretrainVariant, num_classes: int, num_decoder_layers: int,
                             **loss: float) -> PretrainCriterion:
    """The pre-training criterion from one flat mapping of loss settings (``pretrain.loss``): keywords
    of :class:`PretrainCriterion` (``temperature``, ``align_weight``, ...) go to it, the rest to
    :func:`mutdet.losses.build_criterion` (detection weights and matcher costs). A new alignment weight
    is a keyword of :class:`PretrainCriterion` plus its schema entry, nothing else."""
    from mutdet.losses.criterion import build_criterion

    own = set(inspect.signature(PretrainCriterion.__init__).parameters) - {"self", "detection", "variant"}
    detection = build_criterion(num_classes=num_classes, num_decoder_layers=num_decoder_layers,
                                **{k: v for k, v in loss.items() if k not in own})
    return PretrainCriterion(detection=detection, variant=variant, **{k: v for k, v in loss.items() if k in own})
