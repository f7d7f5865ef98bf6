"""Deformable transformer encoder: multi-scale deformable self-attention over all feature tokens.

Tokens are the ``L`` feature maps flattened row-major and concatenated, ``S = sum_l H_l W_l``.
``valid_ratios`` ``(B, L, 2)`` give, per image and level, the fraction ``(w, h)`` of the padded map
covered by real pixels; reference points live in the valid image (normalised) and are mapped into each
padded level by these ratios.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from mutdet.models.deformable_attention import MultiScaleDeformableAttention
from mutdet.models.layers import FeedForward

__all__ = ["DeformableEncoderLayer", "DeformableEncoder", "encoder_reference_points"]


def encoder_reference_points(spatial_shapes: torch.Tensor, valid_ratios: torch.Tensor) -> torch.Tensor:
    """Pixel centres of every token as reference points for every level.

    Args:
        spatial_shapes: ``(L, 2)`` ``(H_l, W_l)``.
        valid_ratios: ``(B, L, 2)`` ``(w, h)`` valid fractions.
    Returns:
        ``(B, S, L, 2)`` normalised ``(x, y)`` in each padded level's frame.
    """
    points = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        ys, xs = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=valid_ratios.dtype, device=valid_ratios.device),
            torch.linspace(0.5, w - 0.5, w, dtype=valid_ratios.dtype, device=valid_ratios.device), indexing="ij")
        ys = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)  # (B, HW), normalised to the valid image
        xs = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        points.append(torch.stack([xs, ys], -1))
    reference = torch.cat(points, 1)  # (B, S, 2)
    return reference[:, :, None] * valid_ratios[:, None]  # (B, S, 1, 2) * (B, 1, L, 2) -> (B, S, L, 2)


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: ``x = LN(x + Drop(MSDeformAttn(x + pos)))``, then FFN."""

    def __init__(self, *, embed_dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int,
                 dropout: float):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(embed_dim=embed_dim, num_heads=num_heads,
                                                       num_levels=num_levels, num_points=num_points)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(embed_dim)
        self.ffn = FeedForward(embed_dim=embed_dim, ffn_dim=ffn_dim, dropout=dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference: torch.Tensor, spatial_shapes: torch.Tensor,
                level_start_index: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """``src``, ``pos``: ``(B, S, C)``; reference ``(B, S, L, 2)``; padding_mask ``(B, S)`` -> ``(B, S, C)``."""
        attn = self.self_attn(src + pos, reference, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm(src + self.dropout(attn))
        return self.ffn(src)


class DeformableEncoder(nn.Module):
    """``num_layers`` copies of one :class:`DeformableEncoderLayer` (independent weights)."""

    def __init__(self, *, layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src: torch.Tensor, pos: torch.Tensor, spatial_shapes: torch.Tensor,
                level_start_index: torch.Tensor, valid_ratios: torch.Tensor,
                padding_mask: torch.Tensor) -> torch.Tensor:
        """Encode flattened tokens.

        Args:
            src: ``(B, S, C)`` features; pos: ``(B, S, C)`` positional + level embedding.
            spatial_shapes: ``(L, 2)``; level_start_index: ``(L,)``; valid_ratios: ``(B, L, 2)``.
            padding_mask: ``(B, S)`` bool, True on padding.
        Returns:
            memory ``(B, S, C)``.
        """
        reference = encoder_reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference, spatial_shapes, level_start_index, padding_mask)
        return src
