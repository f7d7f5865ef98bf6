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
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["crop_affines", "rotated_roi_align"]


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
