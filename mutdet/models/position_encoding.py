"""Sine positional encodings: of feature-map pixels (encoder) and of reference boxes (decoder queries)."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine", "box_sine_embedding"]


def _sine(values: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """``(...)`` already scaled positions -> ``(..., num_feats)`` interleaved sin/cos."""
    dim_t = torch.arange(num_feats, dtype=values.dtype, device=values.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = values[..., None] / dim_t
    return torch.stack([pos[..., 0::2].sin(), pos[..., 1::2].cos()], dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """DETR's normalised 2-D sine encoding of the valid (unpadded) part of a feature map.

    Args:
        num_feats: channels per axis (the output has ``2 * num_feats`` = the model width).
        temperature: frequency base.
        scale: range the normalised coordinates are scaled to (``2 pi``).
    Input ``mask`` ``(B, H, W)`` bool (True on padding); output ``(B, 2 * num_feats, H, W)``, y first.
    Coordinates are pixel centres ``(i - 0.5) / valid_extent`` (Deformable DETR's offset).
    """

    def __init__(self, *, num_feats: int, temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        self.num_feats, self.temperature, self.scale = num_feats, temperature, scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        not_mask = (~mask).float()
        y = not_mask.cumsum(1)
        x = not_mask.cumsum(2)
        eps = 1e-6
        y = (y - 0.5) / (y[:, -1:, :] + eps) * self.scale
        x = (x - 0.5) / (x[:, :, -1:] + eps) * self.scale
        pos = torch.cat([_sine(y, self.num_feats, self.temperature), _sine(x, self.num_feats, self.temperature)],
                        dim=-1)
        return pos.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def box_sine_embedding(boxes: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of normalised ``(cx, cy, w, h)`` boxes ``(..., 4) -> (..., 4 * num_feats)``.

    Order ``(y, x, w, h)`` as in DINO/DAB-DETR; each coordinate is scaled by ``2 pi``.
    """
    scaled = boxes * (2 * math.pi)
    parts = [_sine(scaled[..., i], num_feats, temperature) for i in (1, 0, 2, 3)]
    return torch.cat(parts, dim=-1)
