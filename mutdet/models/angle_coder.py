"""AR-CSL: aspect-ratio-aware circular smooth labels for the le90 angle (ARS-DETR).

This is ARS-DETR's ``CSLCoder(window='aspect_ratio', normalize=True)``, the angle coder of its and
MutDet's configs. The angle ``theta`` (le90, radians, ``[-pi/2, pi/2)``, see :mod:`mutdet.boxes`) is
classified over ``num_bins`` one-degree bins: bin ``k`` covers degrees ``[k - 90, k - 89)``. A box's
target over the bins is the IoU between the box and itself rotated onto each bin (bin-centre offset
``d`` degrees from its own bin, taken circularly in ``[-90, 90)``), which depends only on the aspect
ratio ``AR = long / short side`` and ``|d|``:

* ``|d| = 0``: 1.
* small ``|d|`` (below the critical angle ``pi - 2 atan(AR)``): the two rectangles overlap in an
  octagon; with half sides ``1`` and ``AR``, ``t = tan(phi)``, ``x = (1 - AR tan(phi/2)) t`` and
  ``y = (AR sin(phi) - 2 sin^2(phi/2)) / cos(phi)``: ``IoU = (4 AR t - x^2 - y^2) / (4 AR t + x^2 + y^2)``.
* larger ``|d|``: they overlap in a rhombus of area ``4 / sin(phi)``: ``IoU = 4 / (8 AR sin(phi) - 4)``.

(Both closed forms agree with :func:`mutdet.boxes.rotated_iou` to float32 precision, and with a
float64 polygon clipping to float64 rounding; see the tests.)
The IoU row is min-max normalised over all bins: ``(iou - min) / (1 - min)``, so the target is 1 on
the box's own bin and 0 on the bin(s) of least overlap (90 degrees away for ``AR >= 1.3``, 45 to 48
degrees for squarer boxes).

**The window spans the whole angle range**, as in the reference: its aspect-ratio window keeps the
offsets within ``refine_range`` of the box's bin, and ``refine_range`` defaults to ``coding_len // 2``
= 90 bins, i.e. every offset in ``[-90, 90)``; no config sets it. The ``radius=6`` in the reference
configs belongs to the Gaussian CSL window and the aspect-ratio window never reads it. Cutting at 6
bins would matter: measured on this coder, the bins within 6 of the box's own hold only this share of
the label mass (sum of the targets): AR 1: 20 %, 1.5: 20 %, 2: 20 %, 4: 29 %, 10: 47 %, 20: 61 %; and
the target 7 bins away is still 0.65 (AR 1), 0.81 (AR 2), 0.51 (AR 10). ``radius`` is kept as an
optional cut for ablations (None: no cut, the reference).

A square (``AR = 1``) has a second target of 1 at 90 degrees (the square turned by 90 degrees is the
same square); argmax decoding may pick either, which is the same box.

Decoding takes the argmax bin: ``theta = (argmax + 0.5) * omega - 90`` degrees, in radians, i.e. the
bin centre, which lies in ``[-pi/2, pi/2)`` (the reference's decode, whose ``% 180`` is a no-op).

Departures from the reference, all numerical:

* the own bin is exactly 1 (the reference evaluates offset 0 at ``phi = 1e-6`` rad: ``1 - O(AR 1e-6)``);
* the IoU row is computed in float64 with the exact critical angle (the reference: float32, octagon
  for ``|d| <= floor(critical angle in degrees)``); the two closed forms are equal at the critical
  angle, so only rounding differs;
* :meth:`ARCSLCoder.angle_to_bin` floors and wraps, so an angle a hair below ``-pi/2`` lands in the
  last bin; the reference truncates towards 0 (bin 0). le90 angles are in ``[-pi/2, pi/2)``, so only
  out-of-range inputs differ;
* ``num_bins`` may be any divisor of 180 (the reference asserts one-degree bins);
* :func:`aspect_ratio` clamps the short side at ``1e-6`` (the reference divides by it unguarded, so a
  degenerate box would give an infinite ratio and NaN targets).
"""
from __future__ import annotations

import math

import torch

__all__ = ["ARCSLCoder", "aspect_ratio", "aspect_ratio_weight"]


def aspect_ratio(wh: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(..., 2)`` side lengths (any order, any unit) -> ``(...)`` long / short side, ``>= 1``."""
    long_side = wh.max(dim=-1).values
    short_side = wh.min(dim=-1).values.clamp(min=eps)
    return long_side / short_side


def aspect_ratio_weight(wh: torch.Tensor) -> torch.Tensor:
    """Per-box angle weight ``2 AR / (AR + 1)`` (1 for a square, towards 2 for thin boxes); ``(..., 2) -> (...)``."""
    ar = aspect_ratio(wh)
    return 2.0 * ar / (ar + 1.0)


class ARCSLCoder:
    """Encode le90 angles into AR-CSL targets and decode bin logits back to angles.

    Args:
        num_bins: number of angle bins over 180 degrees (180: one-degree bins).
        radius: None (default, the reference): targets over the whole angle range; an integer cuts them
            to 0 for bins farther than ``radius`` from the box's bin (an ablation, not the reference's
            AR-CSL; see the module docstring for what a cut loses). Decoding never depends on it.
    """

    def __init__(self, *, num_bins: int = 180, radius: int | None = None):
        if num_bins < 2 or 180 % num_bins:
            raise ValueError(f"ARCSLCoder: num_bins must divide 180 and be >= 2, got {num_bins}")
        if radius is not None and not 0 <= radius <= num_bins // 2:
            raise ValueError(f"ARCSLCoder: radius must be None or in [0, {num_bins // 2}], got {radius}")
        self.num_bins = num_bins
        self.radius = radius
        self.omega = 180.0 / num_bins  # degrees per bin

    def angle_to_bin(self, theta: torch.Tensor) -> torch.Tensor:
        """le90 angles ``(...)`` (radians) -> bin indices ``(...)`` int64 in ``[0, num_bins)``."""
        degrees = torch.rad2deg(theta.to(torch.float64)) + 90.0
        return torch.floor(degrees / self.omega).long() % self.num_bins

    def rotation_iou(self, ar: torch.Tensor) -> torch.Tensor:
        """IoU of a box with aspect ratio ``ar`` ``(N,)`` and itself rotated by each bin offset.

        Returns ``(N, num_bins)`` float64; column ``j`` is the rotation by ``(j - num_bins // 2) * omega``
        degrees (column ``num_bins // 2`` is the unrotated box, IoU 1).
        """
        k = ar.to(torch.float64).clamp(min=1.0)[:, None]  # (N, 1)
        offsets = torch.arange(self.num_bins, dtype=torch.float64, device=ar.device) - self.num_bins // 2
        phi = torch.deg2rad(offsets.abs() * self.omega)[None]  # (1, num_bins), in [0, pi/2]
        phi = torch.where(phi > 0, phi, torch.ones_like(phi))  # placeholder at 0, replaced below
        rhombus = 4.0 / (8.0 * k * torch.sin(phi) - 4.0)
        t = torch.tan(phi.clamp(max=math.pi / 2 - 1e-9))
        x = (1.0 - k * torch.tan(phi / 2)) * t
        y = (k * torch.sin(phi) - 2.0 * torch.sin(phi / 2) ** 2) / torch.cos(phi).clamp(min=1e-12)
        octagon = (4.0 * k * t - x * x - y * y) / (4.0 * k * t + x * x + y * y)
        critical = math.pi - 2.0 * torch.atan(k)  # (N, 1)
        iou = torch.where(phi < critical, octagon, rhombus)
        return torch.where(offsets[None] == 0, torch.ones_like(iou), iou)

    def encode(self, theta: torch.Tensor, wh: torch.Tensor) -> torch.Tensor:
        """AR-CSL targets.

        Args:
            theta: ``(N,)`` le90 angles (radians).
            wh: ``(N, 2)`` box sides (pixels, or any unit common to both sides).
        Returns:
            ``(N, num_bins)`` targets in ``[0, 1]`` (dtype of ``theta``), 1 at the box's own bin, 0 at the
            bin(s) of least overlap; bin ``b`` holds the normalised IoU for the circular offset of ``b``
            from the box's bin, so the row wraps around the ends of the angle range.
        """
        n = theta.shape[0]
        if n == 0:
            return theta.new_zeros((0, self.num_bins))
        iou = self.rotation_iou(aspect_ratio(wh))  # (N, num_bins), centred on column num_bins // 2
        low = iou.min(dim=1, keepdim=True).values
        smooth = (iou - low) / (1.0 - low).clamp(min=1e-12)
        if self.radius is not None:
            offsets = torch.arange(self.num_bins, device=smooth.device) - self.num_bins // 2
            smooth = torch.where(offsets.abs()[None] <= self.radius, smooth, torch.zeros_like(smooth))
        # Roll each centred row onto the box's bin: target[b] = smooth[(b - bin + centre) mod num_bins].
        bins = self.angle_to_bin(theta)  # (N,)
        columns = torch.arange(self.num_bins, device=theta.device)[None]  # (1, num_bins)
        source = (columns - bins[:, None] + self.num_bins // 2) % self.num_bins  # (N, num_bins)
        return smooth.gather(1, source).to(theta.dtype)

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """Bin scores ``(..., num_bins)`` (logits or probabilities) -> le90 angles ``(...)`` (radians)."""
        bins = logits.argmax(dim=-1).to(logits.dtype)
        return torch.deg2rad((bins + 0.5) * self.omega - 90.0)
