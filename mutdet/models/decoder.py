"""Deformable decoder with iterative refinement of rotated reference boxes.

Each query carries a reference box ``(cx, cy, w, h)`` (normalised to the valid image, sigmoid space)
and a reference angle (le90 radians). Per layer:

1. query position = MLP(sine embedding of the reference box), recomputed from the current reference;
2. self-attention among queries (with the denoising attention mask), then *rotated* multi-scale
   deformable cross-attention (sampling offsets turned by the reference angle), then FFN;
3. the layer's heads predict a box delta (added in inverse-sigmoid space to the reference) and angle
   bin logits; the next layer's reference box and angle are these predictions, *detached*.

The heads are owned by the detector (one set per layer) and passed in, so that a second decoder pass
on another memory (MutDet's siamese head) shares everything.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from mutdet.models.deformable_attention import MultiScaleDeformableAttention
from mutdet.models.layers import MLP, FeedForward, inverse_sigmoid
from mutdet.models.position_encoding import box_sine_embedding

__all__ = ["DeformableDecoderLayer", "DeformableDecoder"]


class DeformableDecoderLayer(nn.Module):
    """Post-norm: self-attention, rotated deformable cross-attention, FFN."""

    def __init__(self, *, embed_dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int,
                 dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.cross_attn = MultiScaleDeformableAttention(embed_dim=embed_dim, num_heads=num_heads,
                                                        num_levels=num_levels, num_points=num_points, rotated=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.ffn = FeedForward(embed_dim=embed_dim, ffn_dim=ffn_dim, dropout=dropout)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, reference: torch.Tensor, angles: torch.Tensor,
                memory: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                memory_padding_mask: torch.Tensor, self_attn_mask: torch.Tensor | None) -> torch.Tensor:
        """One layer.

        Args:
            tgt, query_pos: ``(B, Q, C)``.
            reference: ``(B, Q, L, 4)`` boxes in each padded level's normalised frame.
            angles: ``(B, Q)`` le90 radians.
            memory: ``(B, S, C)``; memory_padding_mask: ``(B, S)``.
            self_attn_mask: ``(Q, Q)`` bool, True where query ``i`` must not attend to ``j``; or None.
        Returns:
            ``(B, Q, C)``.
        """
        q = k = tgt + query_pos
        attn = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(attn))
        cross = self.cross_attn(tgt + query_pos, reference, memory, spatial_shapes, level_start_index,
                                memory_padding_mask, reference_angles=angles)
        tgt = self.norm2(tgt + self.dropout2(cross))
        return self.ffn(tgt)


class DeformableDecoder(nn.Module):
    """``num_layers`` decoder layers with box and angle refinement.

    Args:
        layer: the layer to copy (independent weights per copy).
        num_layers: depth.
        embed_dim: ``C``.
    """

    def __init__(self, *, layer: DeformableDecoderLayer, num_layers: int, embed_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.ref_point_head = MLP(input_dim=2 * embed_dim, hidden_dim=embed_dim, output_dim=embed_dim, num_layers=2)
        self.norm = nn.LayerNorm(embed_dim)
        self.embed_dim = embed_dim

    def forward(self, tgt: torch.Tensor, reference_boxes: torch.Tensor, reference_angles: torch.Tensor,
                memory: torch.Tensor, memory_padding_mask: torch.Tensor, spatial_shapes: torch.Tensor,
                level_start_index: torch.Tensor, valid_ratios: torch.Tensor, self_attn_mask: torch.Tensor | None,
                box_heads: Sequence[nn.Module], angle_heads: Sequence[nn.Module],
                decode_angle: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run all layers.

        Args:
            tgt: ``(B, Q, C)`` content queries.
            reference_boxes: ``(B, Q, 4)`` initial normalised ``(cx, cy, w, h)`` in ``(0, 1)``.
            reference_angles: ``(B, Q)`` initial le90 angles.
            memory: ``(B, S, C)``; memory_padding_mask ``(B, S)``; spatial_shapes ``(L, 2)``;
            level_start_index ``(L,)``; valid_ratios ``(B, L, 2)``.
            self_attn_mask: ``(Q, Q)`` bool or None.
            box_heads: per layer, ``(B, Q, C) -> (B, Q, 4)`` deltas in inverse-sigmoid space.
            angle_heads: per layer, ``(B, Q, C) -> (B, Q, num_bins)`` logits.
            decode_angle: ``(B, Q, num_bins) -> (B, Q)`` le90 angles (the angle coder's decode).
        Returns:
            ``{"hidden_states": (D, B, Q, C)`` (after the shared LayerNorm), ``"boxes": (D, B, Q, 4)``
            (sigmoid, normalised cxcywh), ``"angle_logits": (D, B, Q, num_bins)``,
            ``"reference_boxes": (D, B, Q, 4)``, ``"reference_angles": (D, B, Q)``} with ``D`` = layers;
            the references are the (detached) inputs of each layer.
        """
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # (B, L, 4) -> (B, 1, L, 4)
        out = {k: [] for k in ("hidden_states", "boxes", "angle_logits", "reference_boxes", "reference_angles")}
        for lid, layer in enumerate(self.layers):
            reference = reference_boxes[:, :, None] * ratios  # (B, Q, 4) -> (B, Q, L, 4)
            query_pos = self.ref_point_head(box_sine_embedding(reference[:, :, 0], self.embed_dim // 2))
            tgt = layer(tgt, query_pos, reference, reference_angles, memory, spatial_shapes, level_start_index,
                        memory_padding_mask, self_attn_mask)
            hidden = self.norm(tgt)
            boxes = (box_heads[lid](hidden) + inverse_sigmoid(reference_boxes)).sigmoid()
            angle_logits = angle_heads[lid](hidden)
            for key, value in (("hidden_states", hidden), ("boxes", boxes), ("angle_logits", angle_logits),
                               ("reference_boxes", reference_boxes), ("reference_angles", reference_angles)):
                out[key].append(value)
            reference_boxes = boxes.detach()
            reference_angles = decode_angle(angle_logits.detach())
        return {k: torch.stack(v) for k, v in out.items()}
