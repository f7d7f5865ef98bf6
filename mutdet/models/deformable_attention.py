"""Multi-scale deformable attention (Deformable DETR), plain and rotated, in pure PyTorch.

Frames and formats used here:

* value tokens are the flattened feature maps of ``L`` levels, level ``l`` of ``H_l x W_l`` tokens in
  row-major order, concatenated: ``S = sum_l H_l W_l``;
* sampling locations are normalised ``(x, y)`` in ``[0, 1]`` of each (padded) feature map, ``(0, 0)``
  the top-left corner of the top-left pixel, ``(1, 1)`` the bottom-right corner (``grid_sample`` with
  ``align_corners=False``); locations outside read zeros;
* reference boxes are normalised ``(cx, cy, w, h)`` in the same frame; reference angles are le90
  radians (clockwise in image coordinates, see :mod:`mutdet.boxes`).

:func:`ms_deform_attn` is the one place that samples; a compiled kernel with the same signature can
replace it (it must pass the same parity tests). One does: :func:`mutdet.models.ms_deform_attn_triton.
ms_deform_attn_triton`, fused forward and backward in Triton, chosen per module by ``kernel="triton"``
(:func:`set_attention_kernel`; the config's ``train.attention_kernel``). It is **off by default**: it is
tested only with Triton's CPU interpreter so far, not yet on a GPU. It runs only on CUDA tensors of
float32 / bfloat16 / float16; everywhere else (CPU, float64) the pure-PyTorch version here is used.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ms_deform_attn", "deformable_sampling_locations", "MultiScaleDeformableAttention", "ATTENTION_KERNELS",
           "set_attention_kernel"]

ATTENTION_KERNELS = ("torch", "triton")


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling of every level at every location, weighted and summed.

    Args:
        value: ``(B, S, M, D)`` per-head values (``M`` heads of ``D`` channels).
        spatial_shapes: ``(L, 2)`` int64 ``(H_l, W_l)``.
        level_start_index: ``(L,)`` int64, first token of each level in ``S`` (kept for kernel parity;
            the levels are consecutive, so this implementation derives the split from the shapes).
        sampling_locations: ``(B, Q, M, L, P, 2)`` normalised ``(x, y)``.
        attention_weights: ``(B, Q, M, L, P)`` (softmax over ``L * P`` done by the caller).
    Returns:
        ``(B, Q, M * D)``.
    """
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2.0 * sampling_locations - 1.0  # grid_sample wants [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = value_per_level[lvl].flatten(2).transpose(1, 2)  # (B, HW, M, D) -> (B, M*D, HW)
        v = v.reshape(batch * heads, channels, h, w)  # -> (B*M, D, H, W)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B, Q, M, P, 2) -> (B*M, Q, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # (B*M, D, Q, P)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B*M, D, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (stacked * weights).sum(-1).view(batch, heads * channels, queries)  # (B*M, D, Q) -> (B, M*D, Q)
    return out.transpose(1, 2).contiguous()


def deformable_sampling_locations(reference: torch.Tensor, offsets: torch.Tensor, spatial_shapes: torch.Tensor,
                                  reference_angles: torch.Tensor | None = None) -> torch.Tensor:
    """Turn predicted offsets into normalised sampling locations.

    Args:
        reference: ``(B, Q, L, 2)`` points ``(x, y)`` or ``(B, Q, L, 4)`` boxes ``(cx, cy, w, h)``, normalised.
        offsets: ``(B, Q, M, L, P, 2)`` raw offsets.
        spatial_shapes: ``(L, 2)`` ``(H_l, W_l)``.
        reference_angles: ``None``, or ``(B, Q)`` le90 radians (box references only): each offset
            ``(a, b)``, scaled to the box (``a`` along ``w``, ``b`` along ``h``), is rotated by the angle,
            ``(a cos t - b sin t, a sin t + b cos t)``, so the sampling pattern turns with the box.
            The rotation is done in normalised coordinates: exact for square inputs (tiles).
    Returns:
        ``(B, Q, M, L, P, 2)`` normalised ``(x, y)``.

    Point references: ``loc = ref + offset / (W_l, H_l)`` (offsets in pixels of level ``l``).
    Box references: ``loc = ctr + R(t) (offset / P * (w, h) / 2)``, ``R = I`` without angles.
    """
    if reference.shape[-1] == 2:
        if reference_angles is not None:
            raise ValueError("reference_angles need box references (B, Q, L, 4)")
        normaliser = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).to(offsets.dtype)  # (L, 2) as (W, H)
        return reference[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
    if reference.shape[-1] != 4:
        raise ValueError(f"reference must end in 2 or 4 values, got shape {tuple(reference.shape)}")
    points = offsets.shape[-2]
    local = offsets / points * reference[:, :, None, :, None, 2:] * 0.5  # (B, Q, M, L, P, 2)
    if reference_angles is not None:
        cos = torch.cos(reference_angles)[:, :, None, None, None]  # (B, Q) -> (B, Q, 1, 1, 1)
        sin = torch.sin(reference_angles)[:, :, None, None, None]
        a, b = local[..., 0], local[..., 1]
        local = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return reference[:, :, None, :, None, :2] + local


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention; with ``rotated=True`` the offsets turn with the query's angle.

    Args:
        embed_dim: channels ``C`` (divisible by ``num_heads``).
        num_heads: ``M``.
        num_levels: ``L``.
        num_points: ``P`` sampling points per head and level.
        rotated: expect box references and per-query angles (the decoder's cross-attention).
        kernel: ``"torch"`` (:func:`ms_deform_attn`, everywhere) or ``"triton"`` (the fused Triton kernel
            on CUDA float32/bf16/fp16 inputs, the torch version otherwise; not yet confirmed on a GPU).
    """

    def __init__(self, *, embed_dim: int, num_heads: int, num_levels: int, num_points: int, rotated: bool = False,
                 kernel: str = "torch"):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"kernel {kernel!r} is not one of {ATTENTION_KERNELS}")
        self.kernel = kernel
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.num_levels, self.num_points = num_levels, num_points
        self.rotated = rotated
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: head ``m`` starts sampling along direction ``2 pi m / M``, points at 1..P."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # (M, 2)
        grid = (grid / grid.abs().max(-1, keepdim=True).values).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)  # (M, L, P, 2)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, reference: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
                level_start_index: torch.Tensor, value_padding_mask: torch.Tensor | None = None,
                reference_angles: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from ``Q`` queries to the multi-scale value tokens.

        Args:
            query: ``(B, Q, C)`` (positional embedding already added).
            reference: ``(B, Q, L, 2)`` points or ``(B, Q, L, 4)`` boxes, normalised per level.
            value: ``(B, S, C)`` flattened multi-scale features.
            spatial_shapes: ``(L, 2)``; level_start_index: ``(L,)``.
            value_padding_mask: ``(B, S)`` bool, True on padded tokens (they read as zeros).
            reference_angles: ``(B, Q)`` le90 radians; required iff the module is ``rotated``.
        Returns:
            ``(B, Q, C)``.
        """
        if self.rotated != (reference_angles is not None):
            raise ValueError(f"rotated={self.rotated} attention got reference_angles={reference_angles is not None}")
        batch, queries, _ = query.shape
        m, lv, p = self.num_heads, self.num_levels, self.num_points
        v = self.value_proj(value)
        if value_padding_mask is not None:
            v = v.masked_fill(value_padding_mask[..., None], 0.0)
        v = v.view(batch, value.shape[1], m, self.embed_dim // m)  # (B, S, C) -> (B, S, M, D)
        offsets = self.sampling_offsets(query).view(batch, queries, m, lv, p, 2)
        weights = self.attention_weights(query).view(batch, queries, m, lv * p).softmax(-1)
        weights = weights.view(batch, queries, m, lv, p)
        locations = deformable_sampling_locations(reference, offsets, spatial_shapes, reference_angles)
        out = _sample(self.kernel, v, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)


def _sample(kernel: str, value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
            sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """:func:`ms_deform_attn` or, for ``kernel="triton"`` on inputs it supports, the fused kernel."""
    if kernel == "triton":
        from mutdet.models import ms_deform_attn_triton as fused  # imports Triton: only when asked for

        inputs = (value, sampling_locations, attention_weights)
        if (value.is_cuda or fused.interpreted()) and all(t.dtype in fused.SUPPORTED_DTYPES for t in inputs):
            return fused.ms_deform_attn_triton(value, spatial_shapes, level_start_index, sampling_locations,
                                               attention_weights)
    return ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def set_attention_kernel(model: nn.Module, kernel: str) -> int:
    """Set ``kernel`` (``"torch"`` or ``"triton"``) on every :class:`MultiScaleDeformableAttention` in
    ``model``; returns how many modules were set. ``"triton"`` checks that Triton imports."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {kernel!r} is not one of {ATTENTION_KERNELS}")
    if kernel == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise ValueError(f"attention kernel 'triton' needs the triton package ({exc})") from None
    modules = [m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)]
    for m in modules:
        m.kernel = kernel
    return len(modules)
