"""Fused multi-scale deformable attention in Triton: forward and backward, one kernel each.

Same contract as the reference :func:`mutdet.models.deformable_attention.ms_deform_attn` (pure
PyTorch, ``grid_sample`` per level), which stays the always-available path and the parity reference:

* value ``(B, S, M, D)``, levels ``(L, 2)`` ``(H_l, W_l)`` starting at ``level_start_index`` in ``S``;
* sampling locations ``(B, Q, M, L, P, 2)`` normalised ``(x, y)``, ``(0, 0)`` the top-left corner of
  the top-left pixel (``grid_sample`` with ``align_corners=False``): pixel coordinates
  ``x * W_l - 0.5, y * H_l - 0.5``, bilinear, corners outside the map read zero (``padding_mode="zeros"``);
* attention weights ``(B, Q, M, L, P)``; output ``(B, Q, M * D)``.

Where it differs from the unfused version: no ``(B*M, D, Q, L*P)`` tensor of sampled values is ever
materialised (the forward accumulates in registers; the backward recomputes the corner reads), so the
memory it adds is the output and, in the backward, one float32 buffer per gradient (the size of the
value, the locations and the weights).

Arithmetic: loads are cast to float32 and everything accumulates in float32, whatever the input dtypes
(float32, bfloat16, float16); the output has the promoted dtype of ``value``, ``sampling_locations`` and
``attention_weights`` (under bf16 autocast: bf16 value, float32 weights -> float32, like the reference,
whose ``grid_sample`` autocasts to float32). The value gradient is scattered with ``tl.atomic_add`` into
a float32 buffer (many queries read the same pixel), so it is exact up to float32 summation order and
not bitwise reproducible run to run; the location and weight gradients are written once each, no atomics.

Status: **not yet confirmed on a GPU**. It is checked against the reference with Triton's interpreter
(``TRITON_INTERPRET=1``) on the CPU (``tests/test_ms_deform_attn_triton.py``), which runs the same kernel
source through NumPy, and both kernels are compiled to sm_90 machine code there (no GPU needed), but
nothing has run them on a GPU: not their speed, nor the GPU's concurrent atomics. So it is off by
default: ``train.attention_kernel: triton`` turns it on (CUDA only; CPU runs always use the reference),
and ``benchmarks/gpu.py`` (``make bench-gpu``) checks parity and measures it on a GPU first.

Importing this module imports Triton; :mod:`mutdet.models.deformable_attention` imports it only for
modules set to ``kernel="triton"``. Under ``torch.compile`` the kernel call is left out of the graph
(``torch.compiler.disable``): it is already one fused kernel each way.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

__all__ = ["ms_deform_attn_triton", "SUPPORTED_DTYPES", "interpreted"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NUM_WARPS = 4


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _row_sum(x):
    """``tl.sum(x, axis=1)``, spelled with a combine function of this module: ``tl.sum`` and ``tl.zeros``
    are ``@triton.jit`` functions of Triton's own standard library, made when Triton is imported, so they
    follow ``TRITON_INTERPRET`` as it was then; this module's functions follow it as it is when the module
    loads (the tests load an interpreted copy in a process that may have imported Triton already)."""
    return tl.reduce(x, 1, _add)


@triton.jit
def _corner(vbase, start, h, w, xi, yi, ok, d_offs, d_mask, M: tl.constexpr, D: tl.constexpr):
    """Values ``(BLOCK_Q, BLOCK_D)`` at integer pixel ``(xi, yi)`` of one level (zeros outside), the
    validity mask ``(BLOCK_Q,)`` and the token index ``(BLOCK_Q,)`` (meaningful where valid)."""
    valid = ok & (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    token = start + yi * w + xi  # row-major within the level
    token = tl.where(valid, token, 0)
    ptrs = vbase + token[:, None] * (M * D) + d_offs[None, :]
    v = tl.load(ptrs, mask=valid[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    return v, valid, token


@triton.jit
def _pixel(loc_ptr, lp, ok, size):
    """Pixel coordinate of one normalised location component (``align_corners=False``), clamped to
    ``[-2, size + 1]`` (every point beyond reads and differentiates as zero either way; the clamp keeps
    the integer conversion in range), its floor, and the fractional part."""
    u = tl.load(loc_ptr + lp, mask=ok, other=-4.0).to(tl.float32)
    sz = size.to(tl.float32)
    pix = u * sz - 0.5
    pix = tl.minimum(tl.maximum(pix, -2.0), sz + 1.0)
    lo = tl.floor(pix)
    return pix, lo.to(tl.int32), pix - lo


@triton.jit
def _ms_deform_attn_fwd(value_ptr, shapes_ptr, start_ptr, loc_ptr, attn_ptr, out_ptr, S, Q,
                        M: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                        BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_q = tl.program_id(0)
    pid_bm = tl.program_id(1)  # b * M + m
    b = pid_bm // M
    m = pid_bm % M
    q_offs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q_offs < Q
    d_offs = tl.arange(0, BLOCK_D)
    d_mask = d_offs < D
    vbase = value_ptr + b.to(tl.int64) * S * (M * D) + m * D  # value[b, :, m, :]
    row = (b.to(tl.int64) * Q + q_offs) * M + m  # (BLOCK_Q,) index of (b, q, m)
    acc = tl.full((BLOCK_Q, BLOCK_D), 0.0, tl.float32)
    # plain loops, not tl.static_range: unrolling all L x P points made 34k lines of PTX, minutes of
    # compilation and register spills
    for lvl in range(L):
        h = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
        w = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
        start = tl.load(start_ptr + lvl).to(tl.int32)
        for p in range(P):
            lp = row * (L * P) + lvl * P + p  # (BLOCK_Q,) index of (b, q, m, l, p)
            a = tl.load(attn_ptr + lp, mask=q_mask, other=0.0).to(tl.float32)
            _, x0, lx = _pixel(loc_ptr, 2 * lp, q_mask, w)
            _, y0, ly = _pixel(loc_ptr, 2 * lp + 1, q_mask, h)
            hx = 1.0 - lx
            hy = 1.0 - ly
            v00, _, _ = _corner(vbase, start, h, w, x0, y0, q_mask, d_offs, d_mask, M, D)
            v01, _, _ = _corner(vbase, start, h, w, x0 + 1, y0, q_mask, d_offs, d_mask, M, D)
            v10, _, _ = _corner(vbase, start, h, w, x0, y0 + 1, q_mask, d_offs, d_mask, M, D)
            v11, _, _ = _corner(vbase, start, h, w, x0 + 1, y0 + 1, q_mask, d_offs, d_mask, M, D)
            sample = ((hy * hx)[:, None] * v00 + (hy * lx)[:, None] * v01
                      + (ly * hx)[:, None] * v10 + (ly * lx)[:, None] * v11)
            acc += a[:, None] * sample
    out_ptrs = out_ptr + row[:, None] * D + d_offs[None, :]  # out[b, q, m * D + d]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


@triton.jit
def _scatter(gbase, token, valid, coeff, ga, d_offs, d_mask, M: tl.constexpr, D: tl.constexpr):
    ptrs = gbase + token[:, None] * (M * D) + d_offs[None, :]
    # relaxed: a sum that nothing reads before the kernel ends needs no ordering (acq_rel, the default,
    # makes every add a fenced atom instead of a fire-and-forget red)
    tl.atomic_add(ptrs, coeff[:, None] * ga, mask=valid[:, None] & d_mask[None, :], sem="relaxed")


@triton.jit
def _ms_deform_attn_bwd(value_ptr, shapes_ptr, start_ptr, loc_ptr, attn_ptr, grad_out_ptr,
                        grad_value_ptr, grad_loc_ptr, grad_attn_ptr, S, Q,
                        M: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                        BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_q = tl.program_id(0)
    pid_bm = tl.program_id(1)
    b = pid_bm // M
    m = pid_bm % M
    q_offs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q_offs < Q
    d_offs = tl.arange(0, BLOCK_D)
    d_mask = d_offs < D
    vbase = value_ptr + b.to(tl.int64) * S * (M * D) + m * D
    gbase = grad_value_ptr + b.to(tl.int64) * S * (M * D) + m * D  # float32 (B, S, M, D)
    row = (b.to(tl.int64) * Q + q_offs) * M + m
    g = tl.load(grad_out_ptr + row[:, None] * D + d_offs[None, :], mask=q_mask[:, None] & d_mask[None, :],
                other=0.0).to(tl.float32)  # (BLOCK_Q, BLOCK_D)
    for lvl in range(L):
        h = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
        w = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
        start = tl.load(start_ptr + lvl).to(tl.int32)
        for p in range(P):
            lp = row * (L * P) + lvl * P + p
            a = tl.load(attn_ptr + lp, mask=q_mask, other=0.0).to(tl.float32)
            _, x0, lx = _pixel(loc_ptr, 2 * lp, q_mask, w)
            _, y0, ly = _pixel(loc_ptr, 2 * lp + 1, q_mask, h)
            hx = 1.0 - lx
            hy = 1.0 - ly
            v00, ok00, t00 = _corner(vbase, start, h, w, x0, y0, q_mask, d_offs, d_mask, M, D)
            v01, ok01, t01 = _corner(vbase, start, h, w, x0 + 1, y0, q_mask, d_offs, d_mask, M, D)
            v10, ok10, t10 = _corner(vbase, start, h, w, x0, y0 + 1, q_mask, d_offs, d_mask, M, D)
            v11, ok11, t11 = _corner(vbase, start, h, w, x0 + 1, y0 + 1, q_mask, d_offs, d_mask, M, D)
            sample = ((hy * hx)[:, None] * v00 + (hy * lx)[:, None] * v01
                      + (ly * hx)[:, None] * v10 + (ly * lx)[:, None] * v11)
            tl.store(grad_attn_ptr + lp, _row_sum(g * sample), mask=q_mask)
            ga = g * a[:, None]
            # d sample / d pixel x and y; d pixel / d normalised location = W_l (resp. H_l)
            dx = _row_sum(ga * (hy[:, None] * (v01 - v00) + ly[:, None] * (v11 - v10)))
            dy = _row_sum(ga * (hx[:, None] * (v10 - v00) + lx[:, None] * (v11 - v01)))
            tl.store(grad_loc_ptr + 2 * lp, dx * w.to(tl.float32), mask=q_mask)
            tl.store(grad_loc_ptr + 2 * lp + 1, dy * h.to(tl.float32), mask=q_mask)
            _scatter(gbase, t00, ok00, hy * hx, ga, d_offs, d_mask, M, D)
            _scatter(gbase, t01, ok01, hy * lx, ga, d_offs, d_mask, M, D)
            _scatter(gbase, t10, ok10, ly * hx, ga, d_offs, d_mask, M, D)
            _scatter(gbase, t11, ok11, ly * lx, ga, d_offs, d_mask, M, D)


def interpreted() -> bool:
    """Whether the kernels were built for Triton's interpreter (``TRITON_INTERPRET=1`` at import):
    they then run on CPU tensors through NumPy."""
    return type(_ms_deform_attn_fwd).__name__ == "InterpretedFunction"


def _launch_shape(value: torch.Tensor, sampling_locations: torch.Tensor, block_q: int | None, backward: bool):
    """Grid ``(Q / BLOCK_Q, B * M)`` and the block sizes. Default ``BLOCK_Q``: 4 (forward) or 2 (backward)
    elements of the ``(BLOCK_Q, BLOCK_D)`` tile per thread of 4 warps, i.e. 16 / 8 queries for 32-channel
    heads. Chosen by register count, not by a timing (no GPU has run it yet): ptxas for sm_90 reports
    72 / 80 registers and no spills for these (64 queries per program spilled: 255 registers)."""
    batch, _, heads, channels = value.shape
    queries = sampling_locations.shape[1]
    block_d = triton.next_power_of_2(channels)
    if block_q is None:
        block_q = max(2, (256 if backward else 512) // block_d)
    return (triton.cdiv(queries, block_q), batch * heads), block_q, block_d


def _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    b, s, m, d = value.shape
    _, q, m2, lv, p, two = sampling_locations.shape
    if (m2, two) != (m, 2) or sampling_locations.shape[0] != b:
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} do not match "
                         f"value {tuple(value.shape)}")
    if tuple(attention_weights.shape) != (b, q, m, lv, p):
        raise ValueError(f"attention_weights {tuple(attention_weights.shape)} != {(b, q, m, lv, p)}")
    if tuple(spatial_shapes.shape) != (lv, 2) or tuple(level_start_index.shape) != (lv,):
        raise ValueError(f"spatial_shapes {tuple(spatial_shapes.shape)} / level_start_index "
                         f"{tuple(level_start_index.shape)} do not describe {lv} levels")
    for t in (value, sampling_locations, attention_weights):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"ms_deform_attn_triton: {t.dtype} is not supported (have {SUPPORTED_DTYPES})")
    if not (value.is_cuda or interpreted()):
        raise RuntimeError("ms_deform_attn_triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")


class _MSDeformAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, block_q):
        value, sampling_locations, attention_weights = (
            t.contiguous() for t in (value, sampling_locations, attention_weights))
        spatial_shapes = spatial_shapes.to(device=value.device, dtype=torch.int64).contiguous()
        level_start_index = level_start_index.to(device=value.device, dtype=torch.int64).contiguous()
        batch, tokens, heads, channels = value.shape
        _, queries, _, levels, points, _ = sampling_locations.shape
        out_dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype),
                                        attention_weights.dtype)
        out = torch.empty(batch, queries, heads * channels, device=value.device, dtype=out_dtype)
        grid, bq, bd = _launch_shape(value, sampling_locations, block_q, backward=False)
        _ms_deform_attn_fwd[grid](value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                  out, tokens, queries, M=heads, D=channels, L=levels, P=points,
                                  BLOCK_Q=bq, BLOCK_D=bd, num_warps=NUM_WARPS)
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        ctx.block_q = block_q
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        batch, tokens, heads, channels = value.shape
        _, queries, _, levels, points, _ = sampling_locations.shape
        grad_out = grad_out.contiguous()
        grad_value = torch.zeros(value.shape, device=value.device, dtype=torch.float32)
        grad_loc = torch.empty(sampling_locations.shape, device=value.device, dtype=torch.float32)
        grad_attn = torch.empty(attention_weights.shape, device=value.device, dtype=torch.float32)
        grid, bq, bd = _launch_shape(value, sampling_locations, ctx.block_q, backward=True)
        _ms_deform_attn_bwd[grid](value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                  grad_out, grad_value, grad_loc, grad_attn, tokens, queries,
                                  M=heads, D=channels, L=levels, P=points, BLOCK_Q=bq, BLOCK_D=bd,
                                  num_warps=NUM_WARPS)
        return (grad_value.to(value.dtype), None, None, grad_loc.to(sampling_locations.dtype),
                grad_attn.to(attention_weights.dtype), None)


@torch.compiler.disable
def ms_deform_attn_triton(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                          sampling_locations: torch.Tensor, attention_weights: torch.Tensor, *,
                          block_q: int | None = None) -> torch.Tensor:
    """Fused :func:`mutdet.models.deformable_attention.ms_deform_attn` (same arguments and result).

    Args:
        value: ``(B, S, M, D)`` per-head values, float32 / bfloat16 / float16, on CUDA.
        spatial_shapes: ``(L, 2)`` int ``(H_l, W_l)``.
        level_start_index: ``(L,)`` int, first token of each level in ``S``.
        sampling_locations: ``(B, Q, M, L, P, 2)`` normalised ``(x, y)`` (``align_corners=False`` frame).
        attention_weights: ``(B, Q, M, L, P)``.
        block_q: queries per program, forward and backward (default: see :func:`_launch_shape`).
    Returns:
        ``(B, Q, M * D)`` in the promoted dtype of the three float inputs; differentiable w.r.t. value,
        sampling locations and attention weights.
    """
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return _MSDeformAttn.apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                               block_q)
