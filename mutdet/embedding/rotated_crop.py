"""Rotated RoI-align: le90 boxes -> fixed-size crops, batched over boxes, with ``affine_grid``/``grid_sample``.

Frames
------
* **Box frame**: the frame the le90 boxes live in (``(cx, cy, w, h, theta)``, pixels, radians, clockwise;
  :mod:`mutdet.boxes`), of size ``(frame_width, frame_height)``. Pixel centres are at integer
  coordinates (OpenCV's convention, the one :func:`mutdet.boxes.mask_to_le90` uses): pixel ``k`` covers
  ``[k - 1/2, k + 1/2]`` and the frame spans ``[-1/2, W - 1/2]``.
* **Normalised frame** (``grid_sample`` with ``align_corners=False``): ``-1`` and ``+1`` are the outer
  edges of the first and last pixel, so a box-frame point ``x`` sits at ``(2 x + 1) / W - 1``. This
  does not depend on the resolution of the image that is sampled: an image resized edge to edge (as
  ``cv2.resize`` does) covers the same normalised square, so boxes given in tile pixels crop the tile
  resized to any size without being rescaled.
* **Crop frame**: the output ``(out_h, out_w)`` grid. Its x axis runs along the box's ``w`` side
  (direction ``u = (cos theta, sin theta)``), its y axis along the ``h`` side (``v = (-sin theta,
  cos theta)``), as in the corner formula of :mod:`mutdet.boxes`; crop pixel ``(0, 0)`` is at the
  corner ``ctr - w/2 u - h/2 v``. With ``align_corners=False`` the crop's outer pixel *edges* lie on the
  (context-enlarged) box's edges and crop pixel ``(i, j)`` samples the box-local point
  ``(a, b) = (((2 j + 1) / out_w - 1) * context * w / 2, ((2 i + 1) / out_h - 1) * context * h / 2)``,
  i.e. ``ctr + a u + b v``: the crop tiles the box exactly, the semantics of RoIAlign with
  ``aligned=True``. The box is stretched to the crop's aspect ratio.

Sampling is bilinear; points outside the image read 0 (``padding_mode="zeros"``), which for an
ImageNet-normalised image is the ImageNet mean colour.

Feature maps: :func:`roi_align_rotated` is the rotated form of :func:`torchvision.ops.roi_align` with
``aligned=True`` (bins of ``sampling_ratio x sampling_ratio`` bilinear samples, averaged; torchvision's
border rule), for pooling proposals from one backbone pass over a tile (``embedding.mode: pooled``);
:func:`roi_mean_weights` is the mean over its bins as one sparse-in-effect ``(N, H_f W_f)`` weight
matrix, so that pooling every box of a map is one matrix product instead of sampling every channel.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["crop_affines", "rotated_roi_align", "roi_align_rotated", "roi_mean_weights"]


def crop_affines(boxes: torch.Tensor, frame_size: tuple[float, float], context: float = 1.0) -> torch.Tensor:
    """Affine matrices mapping crop-normalised coordinates to image-normalised ones.

    Args:
        boxes: ``(N, 5)`` le90 in the box frame (pixels, radians).
        frame_size: ``(frame_width, frame_height)`` of the box frame (the image before any resize).
        context: the box's ``w`` and ``h`` are multiplied by this (1.5: the crop shows the box plus a
            quarter of its size on each side).
    Returns:
        ``(N, 2, 3)`` float64 ``theta`` for :func:`torch.nn.functional.affine_grid` (``align_corners=False``):
        ``[x_img, y_img] = theta @ [x_crop, y_crop, 1]`` in normalised coordinates.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 5:
        raise ValueError(f"crop_affines: expected boxes (N, 5), got {tuple(boxes.shape)}")
    if context <= 0:
        raise ValueError(f"crop_affines: context must be positive, got {context}")
    frame_w, frame_h = float(frame_size[0]), float(frame_size[1])
    b = boxes.to(torch.float64)
    cx, cy, w, h, t = b.unbind(-1)
    cos, sin = torch.cos(t), torch.sin(t)
    half_w, half_h = context * w / 2, context * h / 2
    # Image point = ctr + (a * half_w) u + (b * half_h) v for crop-normalised (a, b); then
    # image-normalised = (2 * point + 1) / size - 1 per axis.
    theta = torch.stack([
        torch.stack([2 * half_w * cos / frame_w, -2 * half_h * sin / frame_w, (2 * cx + 1) / frame_w - 1], -1),
        torch.stack([2 * half_w * sin / frame_h, 2 * half_h * cos / frame_h, (2 * cy + 1) / frame_h - 1], -1),
    ], dim=-2)  # (N, 2, 3)
    return theta


def rotated_roi_align(images: Sequence[torch.Tensor], boxes: torch.Tensor, image_index: torch.Tensor,
                      frame_sizes: Sequence[tuple[float, float]], output_size: tuple[int, int],
                      context: float = 1.0) -> torch.Tensor:
    """Bilinear rotated crops of many boxes from a few images in one ``grid_sample`` call per image.

    Args:
        images: ``B`` float tensors ``(C, H_b, W_b)`` on one device (sizes may differ), already resized
            from their box frame (or not).
        boxes: ``(N, 5)`` le90, each in the box frame of its image (not rescaled to ``(H_b, W_b)``).
        image_index: ``(N,)`` int64, the image of each box.
        frame_sizes: ``B`` pairs ``(frame_width, frame_height)``: the size of each image's box frame.
        output_size: ``(out_h, out_w)`` of every crop.
        context: box enlargement factor (see :func:`crop_affines`).
    Returns:
        ``(N, C, out_h, out_w)`` crops in the dtype of the images, in box order; crop x along ``w``.
    """
    if len(images) != len(frame_sizes):
        raise ValueError(f"rotated_roi_align: {len(images)} images but {len(frame_sizes)} frame sizes")
    if len(boxes) != len(image_index):
        raise ValueError(f"rotated_roi_align: {len(boxes)} boxes but {len(image_index)} image indices")
    out_h, out_w = output_size
    channels = images[0].shape[0] if images else 0
    dtype = images[0].dtype if images else torch.float32
    device = images[0].device if images else boxes.device
    crops = torch.empty((len(boxes), channels, out_h, out_w), dtype=dtype, device=device)
    image_index = image_index.to(device)
    for b, image in enumerate(images):
        rows = torch.nonzero(image_index == b).flatten()
        if len(rows) == 0:
            continue
        theta = crop_affines(boxes[rows.to(boxes.device)], frame_sizes[b], context).to(device=device, dtype=dtype)
        grid = F.affine_grid(theta, [len(rows), channels, out_h, out_w], align_corners=False)  # (n, out_h, out_w, 2)
        # expand() shares the image's storage: no copy per box.
        crops[rows] = F.grid_sample(image.expand(len(rows), -1, -1, -1), grid, mode="bilinear",
                                    padding_mode="zeros", align_corners=False)
    return crops


def _check_roi_args(name: str, spatial_scale, sampling_ratio: int, context: float) -> tuple[float, float]:
    """The checked arguments shared by :func:`roi_mean_weights` and :func:`roi_align_rotated`; returns the
    per-axis ``(sx, sy)`` scale."""
    if sampling_ratio < 1:
        raise ValueError(f"{name}: sampling_ratio must be >= 1, got {sampling_ratio}")
    if context <= 0:
        raise ValueError(f"{name}: context must be positive, got {context}")
    return (spatial_scale, spatial_scale) if isinstance(spatial_scale, (int, float)) else tuple(spatial_scale)


def _sample_points(boxes: torch.Tensor, samples: tuple[int, int], scale: tuple[float, float],
                   context: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature coordinates ``(fx, fy)``, each ``(n, S_h, S_w)`` float64, of a regular ``S_h x S_w`` grid of
    sub-cell centres over each box ``(n, 5)`` ``[cx, cy, w, h, theta]`` (continuous image coordinates)."""
    s_h, s_w = samples
    # Sub-cell centres in box-normalised units, in [-1/2, 1/2]: sample j * r + s of a side sits at
    # (j + (s + 1/2) / r) / out - 1/2, torchvision's roi_start + (bin + (s + 1/2) / r) * bin_size.
    a = (torch.arange(s_w, dtype=torch.float64, device=boxes.device) + 0.5) / s_w - 0.5
    b = (torch.arange(s_h, dtype=torch.float64, device=boxes.device) + 0.5) / s_h - 0.5
    cx, cy, w, h, t = boxes.to(torch.float64).unbind(-1)  # (n,) each
    cos, sin = torch.cos(t)[:, None, None], torch.sin(t)[:, None, None]
    aw = a[None, None, :] * (context * w)[:, None, None]  # (n, 1, S_w): along u
    bh = b[None, :, None] * (context * h)[:, None, None]  # (n, S_h, 1): along v
    x = cx[:, None, None] + aw * cos - bh * sin  # (n, S_h, S_w)
    y = cy[:, None, None] + aw * sin + bh * cos
    return x * scale[0] - 0.5, y * scale[1] - 0.5  # feature coordinates, cell i's centre at i


def roi_mean_weights(boxes: torch.Tensor, map_size: tuple[int, int], output_size: tuple[int, int], *,
                     spatial_scale: float | tuple[float, float] = 1.0, sampling_ratio: int = 2,
                     context: float = 1.0) -> torch.Tensor:
    """The mean over the bins of :func:`roi_align_rotated` as weights on the map's cells.

    ``roi_mean_weights(boxes, (H, W), ...) @ features.flatten(1).T`` equals
    ``roi_align_rotated(features[None], rois, ...).mean((2, 3))`` (same samples, same border rule, same
    bilinear weights; only the summation order differs), at the cost of one ``(N, H W) x (H W, C)``
    product instead of ``N * S`` samples of every channel.

    Args:
        boxes: ``(N, 5)`` ``[cx, cy, w, h, theta]``, as the rois of :func:`roi_align_rotated` without the
            batch index.
        map_size: ``(H_f, W_f)`` of the feature map.
        output_size, spatial_scale, sampling_ratio, context: as :func:`roi_align_rotated`.
    Returns:
        ``(N, H_f * W_f)`` float64 weights, each row summing to the share of its samples that read the map.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 5:
        raise ValueError(f"roi_mean_weights: expected boxes (N, 5) [cx, cy, w, h, theta], got {tuple(boxes.shape)}")
    sx, sy = _check_roi_args("roi_mean_weights", spatial_scale, sampling_ratio, context)
    height, width = map_size
    out_h, out_w = output_size
    fx, fy = _sample_points(boxes, (out_h * sampling_ratio, out_w * sampling_ratio), (sx, sy), context)
    fx, fy = fx.flatten(1), fy.flatten(1)  # (N, S)
    # torchvision's rule: beyond -1 or the size reads 0; otherwise clamp into [0, size - 1], then bilinear.
    inside = ((fx >= -1) & (fx <= width) & (fy >= -1) & (fy <= height)).to(torch.float64) / fx.shape[1]
    x, y = fx.clamp(0, width - 1), fy.clamp(0, height - 1)
    x0, y0 = x.floor().clamp(max=width - 1), y.floor().clamp(max=height - 1)
    lx, ly = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=width - 1), (y0 + 1).clamp(max=height - 1)
    weights = torch.zeros((len(boxes), height * width), dtype=torch.float64, device=boxes.device)
    for yy, xx, wgt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x1, (1 - ly) * lx), (y1, x0, ly * (1 - lx)),
                        (y1, x1, ly * lx)):
        weights.scatter_add_(1, yy * width + xx, wgt * inside)  # corners that coincide (clamped) add up
    return weights


def roi_align_rotated(features: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int], *,
                      spatial_scale: float | tuple[float, float] = 1.0, sampling_ratio: int = 2,
                      context: float = 1.0, chunk: int = 256) -> torch.Tensor:
    """Rotated RoI-align on a batch of feature maps; torchvision's ``roi_align(aligned=True)`` when ``theta = 0``.

    Each (context-enlarged) box is divided into ``out_h x out_w`` bins along its own axes (x along ``w``,
    direction ``u = (cos theta, sin theta)``; y along ``h``, ``v = (-sin theta, cos theta)``, as in
    :mod:`mutdet.boxes`); each bin averages ``sampling_ratio x sampling_ratio`` bilinear samples at the
    centres of its sub-cells. As in torchvision, a sample with a feature coordinate below -1 or above the
    map's size reads 0; others are clamped into the map (``padding_mode="border"``) before interpolation,
    and the zeros count in the average. Samples are taken with one ``grid_sample`` per image and chunk
    of ``chunk`` boxes (the sample tensor is ``(C, chunk * out_h * r, out_w * r)``).

    Args:
        features: ``(B, C, H_f, W_f)`` float.
        rois: ``(N, 6)`` ``[batch_index, cx, cy, w, h, theta]``: the box in the coordinates of the image the
            map was computed from, torchvision's continuous convention (pixel ``k`` spans ``[k, k + 1)``,
            so a box-frame centre ``x`` of :mod:`mutdet.boxes` is ``x + 0.5``), theta in radians,
            clockwise in image coordinates (le90; any angle works).
        output_size: ``(out_h, out_w)`` bins.
        spatial_scale: feature cells per image pixel (``1 / stride``), one value or ``(sx, sy)``: a
            sample at image point ``(x, y)`` reads the map at ``(x sx - 1/2, y sy - 1/2)`` (cell ``i``'s
            centre at ``i``), after the rotated grid is laid out in image coordinates, so a per-axis scale
            (an image resized by slightly different factors in x and y) keeps the box a rectangle in
            the image, as the crops of :func:`rotated_roi_align` do.
        sampling_ratio: samples per bin side (``>= 1``; torchvision's adaptive ``<= 0`` is not offered:
            one grid for all boxes).
        context: ``w`` and ``h`` are multiplied by this before the bins are laid out.
        chunk: boxes per ``grid_sample`` call (memory bound only).
    Returns:
        ``(N, C, out_h, out_w)`` in the dtype of ``features``, in roi order.
    """
    if features.ndim != 4:
        raise ValueError(f"roi_align_rotated: expected features (B, C, H, W), got {tuple(features.shape)}")
    if rois.ndim != 2 or rois.shape[-1] != 6:
        raise ValueError(f"roi_align_rotated: expected rois (N, 6) [batch_index, cx, cy, w, h, theta], "
                         f"got {tuple(rois.shape)}")
    sx, sy = _check_roi_args("roi_align_rotated", spatial_scale, sampling_ratio, context)
    batch, channels, height, width = features.shape
    out_h, out_w = output_size
    r = sampling_ratio
    out = features.new_zeros((len(rois), channels, out_h, out_w))
    if len(rois) == 0:
        return out
    rois = rois.to(device=features.device, dtype=torch.float64)
    index = rois[:, 0].round().long()
    if bool(((index < 0) | (index >= batch)).any()):
        raise ValueError(f"roi_align_rotated: batch indices must be in [0, {batch}), got "
                         f"{sorted(set(index.tolist()) - set(range(batch)))[:5]}")
    for image in range(batch):
        rows = torch.nonzero(index == image).flatten()
        for start in range(0, len(rows), chunk):
            take = rows[start:start + chunk]
            fx, fy = _sample_points(rois[take, 1:], (out_h * r, out_w * r), (sx, sy), context)
            inside = ((fx >= -1) & (fx <= width) & (fy >= -1) & (fy <= height)).to(features.dtype)
            # align_corners=False: normalised g = (2 f + 1) / size - 1 (no division by size - 1).
            grid = torch.stack([(2 * fx + 1) / width - 1, (2 * fy + 1) / height - 1], -1)  # (n, out_h r, out_w r, 2)
            grid = grid.to(features.dtype).reshape(1, -1, out_w * r, 2)  # (1, n out_h r, out_w r, 2)
            sampled = F.grid_sample(features[image:image + 1], grid, mode="bilinear", padding_mode="border",
                                    align_corners=False)[0]  # (C, n out_h r, out_w r)
            sampled = sampled.view(channels, len(take), out_h * r, out_w * r) * inside  # zeros beyond -1 / size
            sampled = sampled.view(channels, len(take), out_h, r, out_w, r).mean(dim=(3, 5))  # (C, n, out_h, out_w)
            out[take] = sampled.permute(1, 0, 2, 3)
    return out
