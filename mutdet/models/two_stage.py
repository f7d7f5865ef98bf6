"""Two-stage proposals: every encoder token predicts an oriented box; the best become decoder queries.

Token ``i`` of level ``l`` anchors the proposal ``(x_i, y_i, 0.05 * 2^l, 0.05 * 2^l)`` (normalised to
the valid image, Deformable DETR); the heads predict its objectness (one class-agnostic logit), a box
delta (inverse-sigmoid space) and angle bin logits. Tokens on padding, or whose anchor is not inside
``(0.01, 0.99)``, are *invalid*: their features are zeroed, they are never selected, and their box is
the constant ``(1, 1, 1, 1)`` (no gradient).

Invalid tokens, against the reference (Deformable DETR / ARS-DETR ``gen_encoder_output_proposals``):
the reference zeroes the memory *before* the Linear + LayerNorm (so an invalid token's features are
the constant ``LN(bias)``) and sets its anchor to ``10000`` in inverse-sigmoid space, so its box is
``sigmoid(delta + 10000) = (1, 1, 1, 1)`` with no gradient. Here the features are zeroed *after* the
projection (they are keys of MutDet's enhancement module, where they are masked anyway), and the box
is set to the same constant ``(1, 1, 1, 1)``: the matcher of the encoder-proposal loss then never
prefers an invalid border token (which could never become a query) to a valid one, as in the reference.
"""
from __future__ import annotations

import torch
from torch import nn

from mutdet.models.layers import MLP, inverse_sigmoid

__all__ = ["EncoderProposalHead", "token_anchors", "select_top_proposals"]


def token_anchors(memory_padding_mask: torch.Tensor, spatial_shapes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor box of every token.

    Args:
        memory_padding_mask: ``(B, S)`` bool, True on padding.
        spatial_shapes: ``(L, 2)``.
    Returns:
        ``anchors`` ``(B, S, 4)`` normalised ``(cx, cy, w, h)`` in the valid image (padding: anything),
        ``valid`` ``(B, S)`` bool.
    """
    batch = memory_padding_mask.shape[0]
    anchors, start = [], 0
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        mask = memory_padding_mask[:, start:start + h * w].view(batch, h, w)
        valid_h = (~mask[:, :, 0]).sum(1).clamp(min=1)
        valid_w = (~mask[:, 0, :]).sum(1).clamp(min=1)
        ys, xs = torch.meshgrid(torch.arange(h, device=mask.device), torch.arange(w, device=mask.device), indexing="ij")
        grid = torch.stack([xs, ys], -1).float()[None] + 0.5  # (1, H, W, 2)
        scale = torch.stack([valid_w, valid_h], -1).float().view(batch, 1, 1, 2)
        xy = grid / scale  # (B, H, W, 2)
        wh = torch.full_like(xy, 0.05 * 2.0 ** lvl)
        anchors.append(torch.cat([xy, wh], -1).view(batch, h * w, 4))
        start += h * w
    anchors = torch.cat(anchors, 1)
    valid = ((anchors > 0.01) & (anchors < 0.99)).all(-1) & ~memory_padding_mask
    return anchors, valid


class EncoderProposalHead(nn.Module):
    """Linear + LayerNorm on the memory, then objectness, box and angle heads on every token.

    Args:
        embed_dim: ``C``.
        num_angle_bins: angle classes (180).
    """

    def __init__(self, *, embed_dim: int, num_angle_bins: int):
        super().__init__()
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.output_norm = nn.LayerNorm(embed_dim)
        self.class_head = nn.Linear(embed_dim, 1)
        self.box_head = MLP(input_dim=embed_dim, hidden_dim=embed_dim, output_dim=4, num_layers=3)
        self.angle_head = nn.Linear(embed_dim, num_angle_bins)

    def project(self, memory: torch.Tensor, memory_padding_mask: torch.Tensor,
                spatial_shapes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The heads' input without the heads: ``features`` ``(B, S, C)`` (Linear + LayerNorm of the
        memory, invalid tokens zeroed; MutDet's ``F``), ``anchors`` ``(B, S, 4)``, ``valid`` ``(B, S)``."""
        anchors, valid = token_anchors(memory_padding_mask, spatial_shapes)
        features = self.output_norm(self.output_proj(memory)).masked_fill(~valid[..., None], 0.0)
        return features, anchors, valid

    def forward(self, memory: torch.Tensor, memory_padding_mask: torch.Tensor, spatial_shapes: torch.Tensor,
                features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Proposals of all tokens.

        Args:
            memory: ``(B, S, C)``; memory_padding_mask: ``(B, S)``; spatial_shapes: ``(L, 2)``.
            features: ``(B, S, C)`` features to run the heads on *directly* instead of this head's Linear +
                LayerNorm of ``memory`` (e.g. MutDet's enhanced ``F_enh``, projected by the pre-training
                model's own projection); invalid tokens are zeroed here too. None: project ``memory``.
        Returns:
            ``{"pred_logits": (B, S, 1)`` objectness logits, ``"pred_boxes": (B, S, 4)`` normalised cxcywh
            (``(1, 1, 1, 1)`` on invalid tokens), ``"pred_angle_logits": (B, S, num_bins)``, ``"features":
            (B, S, C)`` (the heads' input, invalid tokens zeroed), ``"valid": (B, S)`` bool}.
        """
        if features is None:
            features, anchors, valid = self.project(memory, memory_padding_mask, spatial_shapes)
        else:
            anchors, valid = token_anchors(memory_padding_mask, spatial_shapes)
            features = features.masked_fill(~valid[..., None], 0.0)
        boxes = (self.box_head(features) + inverse_sigmoid(anchors)).sigmoid()
        boxes = boxes.masked_fill(~valid[..., None], 1.0)  # the reference's sentinel: never a match
        return {"pred_logits": self.class_head(features), "pred_boxes": boxes,
                "pred_angle_logits": self.angle_head(features), "features": features, "valid": valid}


def select_top_proposals(scores: torch.Tensor, valid: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Indices ``(B, num_queries)`` of the best-scoring valid tokens (``scores`` ``(B, S)``, any scale)."""
    num_valid = int(valid.sum(1).min())
    if num_valid < num_queries:
        raise ValueError(f"only {num_valid} valid encoder tokens for {num_queries} queries: "
                         f"use a larger input or fewer queries")
    return scores.masked_fill(~valid, float("-inf")).topk(num_queries, dim=1).indices
