"""MutDet's contrastive alignment loss between matched predictions and proposal embeddings, and the
L1 alignment loss of the DETReg baseline (between un-normalised vectors).

Over the ``M`` matched (prediction ``z_i``, proposal ``o_i``) pairs of the *whole batch*, both sides
L2-normalised, temperature ``tau`` (0.2):

    L_ca(Z, O) = (2 tau / M) * sum_i [ -log softmax_k(z_i . o_k / tau)[i]  -  log softmax_k(o_i . z_k / tau)[i] ]

Positives are the matched pairs, negatives every other pair of the batch, across images. Nothing is
detached: when ``O`` is the enhanced ``O_enh`` the gradient also trains the mutual enhancement module.
Pairs are collected in a fixed order by :func:`gather_matched`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["contrastive_alignment_loss", "l1_alignment_loss", "alignment_stats", "gather_matched"]

NORM_EPS = 1e-6


def contrastive_alignment_loss(z: torch.Tensor, o: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Symmetric InfoNCE of matched pairs, scaled by ``2 tau`` (formula in the module docstring).

    Args:
        z: ``(M, C)`` predicted embeddings (any norm; normalised here).
        o: ``(M, C)`` target embeddings, row ``i`` matched to ``z[i]`` (normalised here, not detached).
        temperature: ``tau > 0``.
    Returns:
        Scalar. ``M = 0``: a zero with a gradient path into ``z`` and ``o``; ``M = 1``: exactly zero (a
        softmax over one pair), also with a gradient path.
    """
    if temperature <= 0:
        raise ValueError(f"contrastive_alignment_loss: temperature must be > 0, got {temperature}")
    if z.shape != o.shape or z.dim() != 2:
        raise ValueError(f"contrastive_alignment_loss: z {tuple(z.shape)} and o {tuple(o.shape)} must both be (M, C)")
    num_pairs = z.shape[0]
    if num_pairs == 0:
        return 0.0 * (z.sum() + o.sum())
    z = F.normalize(z, dim=-1, eps=NORM_EPS)
    o = F.normalize(o, dim=-1, eps=NORM_EPS)
    logits = z @ o.t() / temperature  # (M, M): [i, k] = z_i . o_k / tau
    positives = torch.arange(num_pairs, device=z.device)
    loss_z_to_o = F.cross_entropy(logits, positives, reduction="sum")  # rows: z_i against all o_k
    loss_o_to_z = F.cross_entropy(logits.t(), positives, reduction="sum")  # rows: o_i against all z_k
    return (2.0 * temperature / num_pairs) * (loss_z_to_o + loss_o_to_z)


def l1_alignment_loss(z: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """DETReg's embedding loss: mean absolute difference over all ``M * C`` entries.

    As in DETReg (``loss_object_embedding``: ``F.l1_loss(..., reduction="mean")``, weight 1), neither
    side is normalised here: the caller passes the decoder head's raw MLP output and the un-normalised
    target (:mod:`mutdet.models.pretrain`: the PCA projection ``O * norm``). Between two unit vectors
    this loss would barely train anything. Nothing is detached.

    Args:
        z: ``(M, C)`` predicted embeddings; o: ``(M, C)`` targets.
    Returns:
        Scalar; ``M = 0`` gives a zero with a gradient path.
    """
    if z.shape != o.shape or z.dim() != 2:
        raise ValueError(f"l1_alignment_loss: z {tuple(z.shape)} and o {tuple(o.shape)} must both be (M, C)")
    if z.shape[0] == 0:
        return 0.0 * (z.sum() + o.sum())
    return F.l1_loss(z, o, reduction="mean")


@torch.no_grad()
def alignment_stats(z: torch.Tensor, o: torch.Tensor) -> dict[str, float]:
    """Mean cosine similarity of the matched pairs and of all other pairs, for logging.

    Args:
        z, o: ``(M, C)`` matched embeddings (any norm).
    Returns:
        ``{"pos_cosine": mean_i cos(z_i, o_i), "neg_cosine": mean_{i != k} cos(z_i, o_k)}`` as Python
        floats; ``nan`` where undefined (``M = 0``; ``neg_cosine`` for ``M < 2``).
    """
    num_pairs = z.shape[0]
    if num_pairs == 0:
        return {"pos_cosine": float("nan"), "neg_cosine": float("nan")}
    cosine = F.normalize(z.float(), dim=-1, eps=NORM_EPS) @ F.normalize(o.float(), dim=-1, eps=NORM_EPS).t()  # (M, M)
    positive = cosine.diagonal()
    pos = positive.mean().item()
    neg = ((cosine.sum() - positive.sum()) / (num_pairs * (num_pairs - 1))).item() if num_pairs > 1 else float("nan")
    return {"pos_cosine": pos, "neg_cosine": neg}


def gather_matched(pred_embed: torch.Tensor, targets_embed: Sequence[torch.Tensor],
                   indices: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Matched (prediction, target) embedding pairs of a batch, concatenated in a fixed order.

    Order: image 0's pairs in the order of its index tensors, then image 1's, and so on (the same order
    as the criterion's matched boxes).

    Args:
        pred_embed: ``(B, Q, C)`` per-query (or per-token) embeddings.
        targets_embed: ``B`` tensors ``(M_b, C)``, the target embeddings of each image.
        indices: ``B`` pairs ``(pred_idx (N_b,), tgt_idx (N_b,))`` from the matcher.
    Returns:
        ``z`` ``(M, C)`` and ``o`` ``(M, C)``, ``M = sum_b N_b``; row ``i`` of ``z`` is matched to row ``i``
        of ``o``. ``o`` is on ``pred_embed``'s device and keeps its own dtype and gradient.
    """
    if len(targets_embed) != pred_embed.shape[0] or len(indices) != pred_embed.shape[0]:
        raise ValueError(f"gather_matched: batch of {pred_embed.shape[0]} predictions, {len(targets_embed)} "
                         f"target sets and {len(indices)} index pairs")
    device, dim = pred_embed.device, pred_embed.shape[-1]
    z_parts, o_parts = [], []
    for b, ((pred_idx, tgt_idx), target) in enumerate(zip(indices, targets_embed)):
        pred_idx = torch.as_tensor(pred_idx, dtype=torch.long, device=device)
        tgt_idx = torch.as_tensor(tgt_idx, dtype=torch.long, device=target.device)
        if pred_idx.shape != tgt_idx.shape:
            raise ValueError(f"gather_matched: image {b} has {pred_idx.numel()} prediction and "
                             f"{tgt_idx.numel()} target indices")
        z_parts.append(pred_embed[b, pred_idx])  # (N_b, C)
        o_parts.append(target[tgt_idx].to(device))  # (N_b, C)
    if not z_parts:
        empty = pred_embed.new_zeros(0, dim)
        return empty, empty.clone()
    return torch.cat(z_parts), torch.cat(o_parts)
