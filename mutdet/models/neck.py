"""Channel mapper (mmdet ``ChannelMapper``): backbone levels -> ``num_levels`` maps of one width."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelMapper"]


class ChannelMapper(nn.Module):
    """1x1 conv + GroupNorm on each input level, then stride-2 3x3 conv + GroupNorm extra levels.

    The first extra level reads the *last backbone map* (C5), later ones the previous extra level;
    no activation (as ARS-DETR / Deformable DETR's input projection).

    Args:
        in_channels: channels of the inputs (C3, C4, C5: strides 8, 16, 32).
        out_channels: model width ``C``.
        num_levels: outputs (``>= len(in_channels)``); 4 gives strides 8, 16, 32, 64.
        num_groups: GroupNorm groups (must divide ``out_channels``).
    """

    def __init__(self, *, in_channels: list[int], out_channels: int, num_levels: int = 4, num_groups: int = 32):
        super().__init__()
        if num_levels < len(in_channels):
            raise ValueError(f"num_levels {num_levels} < number of backbone levels {len(in_channels)}")
        if out_channels % num_groups:
            raise ValueError(f"GroupNorm: out_channels {out_channels} not divisible by num_groups {num_groups}")
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, out_channels, 1, bias=False), nn.GroupNorm(num_groups, out_channels))
            for c in in_channels)
        extra_in = [in_channels[-1]] + [out_channels] * (num_levels - len(in_channels) - 1)
        self.extra = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, out_channels, 3, 2, 1, bias=False), nn.GroupNorm(num_groups, out_channels))
            for c in extra_in[: num_levels - len(in_channels)])
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """``[(B, c_i, H_i, W_i)]`` -> ``num_levels`` maps ``(B, C, H_l, W_l)``, each extra level half the size."""
        outs = [proj(f) for proj, f in zip(self.lateral, features)]
        x = features[-1]
        for conv in self.extra:
            x = conv(x)
            outs.append(x)
        return outs
