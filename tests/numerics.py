"""Tolerances for comparing two computations of the same quantity that differ only in rounding.

Two set-ups that are mathematically equal (one batch of 2 vs 2 ranks of 1, a vectorised op vs a loop)
still round differently: BLAS/oneDNN pick kernels, blockings and summation orders by CPU (AVX2 vs
AVX-512), thread count and batch size. A sum of ``n`` terms computed in two orders differs by at most
about ``n * eps * sum|terms|`` (Higham's gamma_n bound), and chained layers add their bounds. So a
tolerance is ``depth * n * eps`` relative to the **scale** of the compared tensor (its largest
magnitude: cancellation makes element-wise relative errors unbounded), never a constant tuned on one
machine.
"""
from __future__ import annotations

import torch


def rounding_tolerance(dtype: torch.dtype, reduction: int, depth: int = 1) -> float:
    """Relative bound (to a tensor's scale) for ``depth`` chained reductions of ``reduction`` terms each."""
    return depth * reduction * torch.finfo(dtype).eps


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> None:
    """``|actual - expected| <= rel * max|expected|`` element-wise (both scales zero: exactly equal)."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    diff = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert diff <= rel * scale, f"{what}: max |diff| {diff:.3g} > {rel:.3g} x scale {scale:.3g}"
