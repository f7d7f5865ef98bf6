"""AR-CSL: aspect-ratio-aware circular smooth labels for the le90 angle (ARS-DETR).

The angle ``theta`` (le90, radians, ``[-pi/2, pi/2)``, see :mod:`mutdet.boxes`) is classified over
``num_bins`` one-degree bins: bin ``k`` covers degrees ``[k - 90, k - 89)``. A box's target over the bins
is the IoU between the box and itself rotated onto each bin (bin-centre distance ``d`` degrees from its
own bin), which depends only on the aspect ratio ``AR = long / short side`` and ``|d|``:

* ``|d| = 0``: 1.
* small ``|d|`` (below the critical angle ``pi - 2 atan(AR)``): the two rectangles overlap in an
  octagon; with half sides ``1`` and ``AR``, ``t = tan(phi)``, ``x = (1 - AR tan(phi/2)) t`` and
  ``y = (AR sin(phi) - 2 sin^2(phi/2)) / cos(phi)``: ``IoU = (4 AR t - x^2 - y^2) / (4 AR t + x^2 + y^2)``.
* larger ``|d|``: they overlap in a rhombus of area ``4 / sin(phi)``: ``IoU = 4 / (8 AR sin(phi) - 4)``.

(Both closed forms agree with :func:`mutdet.boxes.rotated_iou` to float32 precision; see the tests.)
The IoU row is min-max normalised over all bins (``(iou - min) / (1 - min)``) and set to 0 outside
``|d| <= radius`` bins. A square (``AR = 1``) is handled exactly: its row is symmetric under 90 degrees
but the window keeps only the neighbourhood of its own bin.

Decoding takes the argmax bin: ``theta = (argmax + 0.5) * omega - 90`` degrees, in radians, i.e. the
bin centre, which lies in ``[-pi/2, pi/2)``.

Difference from the reference ``ARCSLCoder``: there the ``radius`` is ignored for the aspect-ratio
window (its ``refine_range`` defaults to the whole circle); here the window radius is applied, as the
method description (radius 6 bins) says.
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
        radius: window radius in bins; targets are 0 for bins farther than this from the box's bin.
    """

    def __init__(self, *, num_bins: int = 180, radius: int = 6):
        if num_bins < 2 or 180 % num_bins:
            raise ValueError(f"ARCSLCoder: num_bins must divide 180 and be >= 2, got {num_bins}")
        if not 0 <= radius < num_bins // 2:
            raise ValueError(f"ARCSLCoder: radius must be in [0, {num_bins // 2}), got {radius}")
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
            ``(N, num_bins)`` targets in ``[0, 1]`` (dtype of ``theta``), 1 at the box's own bin.
        """
        n = theta.shape[0]
        if n == 0:
            return theta.new_zeros((0, self.num_bins))
        iou = self.rotation_iou(aspect_ratio(wh))  # (N, num_bins), centred on column num_bins // 2
        low = iou.min(dim=1, keepdim=True).values
        smooth = (iou - low) / (1.0 - low).clamp(min=1e-12)
        offsets = torch.arange(self.num_bins, device=theta.device) - self.num_bins // 2
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
