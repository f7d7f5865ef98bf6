"""Oriented boxes: the one place that knows angle conventions.

Internal convention, used everywhere else in mutdet: **le90**, an array ``(..., 5)`` of
``(cx, cy, w, h, theta)`` in pixels and radians, with ``theta`` in ``[-pi/2, pi/2)`` and ``w >= h``.
Image coordinates have y pointing down, so a positive ``theta`` turns the box *clockwise* on screen
(as in mmrotate). The four corners are::

    ctr - w/2 u - h/2 v,  ctr + w/2 u - h/2 v,  ctr + w/2 u + h/2 v,  ctr - w/2 u + h/2 v
    with u = (cos theta, sin theta), v = (-sin theta, cos theta)

which for ``theta = 0`` is top-left, top-right, bottom-right, bottom-left, the order torchvision uses
for ``XYXYXYXY``. Polygons are arrays ``(..., 8)`` of ``x1 y1 ... x4 y4`` (pixels).

Other conventions, converted only here:

* torchvision ``CXCYWHR``: angle in degrees, counter-clockwise positive: ``r_deg = -theta * 180/pi``.
* OpenCV ``minAreaRect``: its angle semantics changed between OpenCV releases, so we never read its
  angle: we rebuild le90 from the rectangle's corner points (``cv2.boxPoints``).

Squares (``w == h``) have a 90-degree symmetry that le90 does not remove: two le90 tuples can describe
the same square. Compare squares by polygon or IoU, not by parameters.
"""
from __future__ import annotations

import math

from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:  # torch is imported on first use: tiling and data stages never pay for it
    import torch

HALF_PI = math.pi / 2

__all__ = [
    "normalize_le90",
    "le90_to_polygon",
    "polygon_to_le90",
    "points_to_le90",
    "mask_to_le90",
    "le90_to_cxcywhr",
    "cxcywhr_to_le90",
    "le90_area",
    "rotated_iou",
    "rotated_nms",
    "batched_rotated_nms",
]


def _as_float_array(boxes, last: int, name: str) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.shape[-1:] != (last,):
        raise ValueError(f"{name}: expected shape (..., {last}), got {arr.shape}")
    return arr


def normalize_le90(boxes) -> np.ndarray:
    """Bring any ``(cx, cy, w, h, theta)`` (radians, clockwise) into le90.

    Args:
        boxes: ``(..., 5)`` array-like, any angle, any ``w``/``h`` order.
    Returns:
        ``(..., 5)`` float64 array with ``w >= h`` and ``theta`` in ``[-pi/2, pi/2)``; the same box.
    """
    b = _as_float_array(boxes, 5, "normalize_le90").copy()
    swap = b[..., 2] < b[..., 3]
    w = np.where(swap, b[..., 3], b[..., 2])
    h = np.where(swap, b[..., 2], b[..., 3])
    theta = b[..., 4] + np.where(swap, HALF_PI, 0.0)
    # A box is symmetric under rotation by pi: wrap into [-pi/2, pi/2).
    theta = np.mod(theta + HALF_PI, math.pi) - HALF_PI
    # Float noise can leave theta == pi/2 after the mod; fold it onto -pi/2.
    theta = np.where(theta >= HALF_PI, theta - math.pi, theta)
    b[..., 2], b[..., 3], b[..., 4] = w, h, theta
    return b


def le90_to_polygon(boxes) -> np.ndarray:
    """le90 ``(..., 5)`` -> polygon ``(..., 8)`` (TL, TR, BR, BL for theta = 0), same frame."""
    b = _as_float_array(boxes, 5, "le90_to_polygon")
    cx, cy, w, h, t = (b[..., i] for i in range(5))
    cos, sin = np.cos(t), np.sin(t)
    ux, uy = cos * w / 2, sin * w / 2  # half of the w-side vector
    vx, vy = -sin * h / 2, cos * h / 2  # half of the h-side vector
    return np.stack(
        [
            cx - ux - vx, cy - uy - vy,
            cx + ux - vx, cy + uy - vy,
            cx + ux + vx, cy + uy + vy,
            cx - ux + vx, cy - uy + vy,
        ],
        axis=-1,
    )


def _rect_corners_to_le90(corners: np.ndarray) -> np.ndarray:
    """Four consecutive rectangle corners ``(N, 4, 2)`` -> le90 ``(N, 5)``."""
    p0, p1, p2 = corners[:, 0], corners[:, 1], corners[:, 2]
    e1, e2 = p1 - p0, p2 - p1
    w = np.hypot(e1[:, 0], e1[:, 1])
    h = np.hypot(e2[:, 0], e2[:, 1])
    theta = np.arctan2(e1[:, 1], e1[:, 0])
    ctr = corners.mean(axis=1)
    return normalize_le90(np.stack([ctr[:, 0], ctr[:, 1], w, h, theta], axis=-1))


def points_to_le90(points) -> np.ndarray:
    """Minimum-area rectangle (OpenCV ``minAreaRect``) around one point set ``(K, 2)`` -> le90 ``(5,)``."""
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    if len(pts) == 0:
        raise ValueError("points_to_le90: empty point set")
    rect = cv2.minAreaRect(pts)
    corners = cv2.boxPoints(rect).astype(np.float64)[None]  # (1, 4, 2)
    return _rect_corners_to_le90(corners)[0]


def polygon_to_le90(polygons) -> np.ndarray:
    """Polygons ``(..., 2K)`` (any quadrilateral or longer ring) -> le90 ``(..., 5)``.

    Each polygon is replaced by its minimum-area enclosing rectangle (OpenCV ``minAreaRect``), the
    DOTA-devkit / mmrotate ``qbox -> rbox`` conversion. Rectangles come back exactly.
    """
    arr = np.asarray(polygons, dtype=np.float64)
    if arr.shape[-1] % 2 or arr.shape[-1] < 6:
        raise ValueError(f"polygon_to_le90: expected (..., 2K) with K >= 3, got {arr.shape}")
    flat = arr.reshape(-1, arr.shape[-1] // 2, 2)
    # Exact rectangles (a parallelogram, p0 + p2 == p1 + p3, with a right angle) are converted
    # directly in float64; everything else goes through minAreaRect (float32) one polygon at a time.
    is_rect = np.zeros(len(flat), dtype=bool)
    if flat.shape[1] == 4:
        e1, e2 = flat[:, 1] - flat[:, 0], flat[:, 2] - flat[:, 1]
        scale = 1.0 + np.abs(flat).max(axis=(1, 2), initial=0.0)
        parallelogram = np.abs(flat[:, 0] + flat[:, 2] - flat[:, 1] - flat[:, 3]).max(axis=1, initial=0.0) <= 1e-9 * scale
        right_angle = np.abs((e1 * e2).sum(axis=1)) <= 1e-9 * scale * scale
        is_rect = parallelogram & right_angle
    corners = flat[:, :4].copy() if flat.shape[1] == 4 else np.empty((len(flat), 4, 2), dtype=np.float64)
    for i in np.flatnonzero(~is_rect):
        corners[i] = cv2.boxPoints(cv2.minAreaRect(flat[i].astype(np.float32)))
    out = _rect_corners_to_le90(corners)
    return out.reshape(*arr.shape[:-1], 5)


def mask_to_le90(mask) -> np.ndarray | None:
    """Binary mask ``(H, W)`` -> le90 ``(5,)`` of its largest external contour, in mask pixels.

    The path used for SAM and graph-based proposals: largest external contour -> minimum-area
    rectangle -> le90. Returns ``None`` for an empty mask.
    """
    m = np.ascontiguousarray(np.asarray(mask).astype(np.uint8))
    if m.ndim != 2:
        raise ValueError(f"mask_to_le90: expected a 2-D mask, got shape {m.shape}")
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    largest = max(contours, key=lambda c: (cv2.contourArea(c), len(c)))
    # Pixel centres are integer coordinates; a one-pixel-wide region has zero extent, so the
    # rectangle is grown by half a pixel on each side to cover the pixels themselves.
    box = points_to_le90(largest.reshape(-1, 2))
    box[2:4] += 1.0
    return box


def le90_to_cxcywhr(boxes) -> np.ndarray:
    """le90 -> torchvision ``CXCYWHR`` (degrees, counter-clockwise positive)."""
    b = _as_float_array(boxes, 5, "le90_to_cxcywhr").copy()
    b[..., 4] = -np.degrees(b[..., 4])
    return b


def cxcywhr_to_le90(boxes) -> np.ndarray:
    """torchvision ``CXCYWHR`` (degrees, counter-clockwise) -> le90."""
    b = _as_float_array(boxes, 5, "cxcywhr_to_le90").copy()
    b[..., 4] = -np.radians(b[..., 4])
    return normalize_le90(b)


def le90_area(boxes) -> np.ndarray:
    b = _as_float_array(boxes, 5, "le90_area")
    return b[..., 2] * b[..., 3]


def _tv_box_iou(boxes1: "torch.Tensor", boxes2: "torch.Tensor") -> "torch.Tensor":
    from torchvision.ops import box_iou

    return box_iou(boxes1, boxes2, fmt="cxcywhr")


def _to_cxcywhr_tensor(boxes) -> "torch.Tensor":
    import torch

    if isinstance(boxes, torch.Tensor):
        t = boxes.detach().to(torch.float32).clone()
        t[..., 4] = -torch.rad2deg(t[..., 4])
        return t
    return torch.from_numpy(le90_to_cxcywhr(boxes).astype(np.float32))


def rotated_iou(boxes1, boxes2) -> "np.ndarray | torch.Tensor":
    """Exact rotated IoU between two sets of le90 boxes, through ``torchvision.ops.box_iou``.

    Args:
        boxes1: ``(N, 5)`` le90 (numpy or tensor).
        boxes2: ``(M, 5)`` le90.
    Returns:
        ``(N, M)`` IoU, a tensor (on the inputs' device) if ``boxes1`` is a tensor, else float64
        numpy. torchvision computes in float32.
    """
    import torch

    as_tensor = isinstance(boxes1, torch.Tensor)
    a, b = _to_cxcywhr_tensor(boxes1), _to_cxcywhr_tensor(boxes2)
    if a.ndim != 2 or b.ndim != 2 or a.shape[-1] != 5 or b.shape[-1] != 5:
        raise ValueError(f"rotated_iou: expected (N, 5) and (M, 5), got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) == 0 or len(b) == 0:
        iou = torch.zeros((len(a), len(b)), dtype=torch.float32, device=a.device)
    else:
        iou = _tv_box_iou(a, b.to(a.device))
    return iou if as_tensor else iou.double().numpy()


def rotated_nms(boxes, scores, iou_threshold: float, block_size: int = 2048) -> np.ndarray:
    """Greedy rotated NMS (class-agnostic).

    Args:
        boxes: ``(N, 5)`` le90.
        scores: ``(N,)``.
        iou_threshold: a box is suppressed by a higher-scoring kept box with IoU ``>`` this.
        block_size: rows of the IoU matrix computed at once; memory is ``block_size x N``.
    Returns:
        int64 indices of kept boxes, by decreasing score (ties: lower index first).
    """
    import torch

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"rotated_nms: {len(boxes)} boxes but {len(scores)} scores")
    order = np.argsort(-scores, kind="stable")
    n = len(order)
    if n == 0:
        return order.astype(np.int64)
    sorted_boxes = _to_cxcywhr_tensor(boxes[order])
    keep = torch.ones(n, dtype=torch.bool)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        rows = sorted_boxes[start:stop]
        # IoU of this block against itself and every later box: (b, n - start).
        iou = _tv_box_iou(rows, sorted_boxes[start:])
        block_keep = keep[start:stop].clone()
        inside = iou[:, : stop - start] > iou_threshold
        inside.fill_diagonal_(False)
        for i in range(stop - start):
            if block_keep[i]:
                block_keep[i + 1:] &= ~inside[i, i + 1:]
        keep[start:stop] = block_keep
        if stop < n:
            suppressed_later = (iou[block_keep, stop - start:] > iou_threshold).any(dim=0)
            keep[stop:] &= ~suppressed_later
    return order[keep.numpy()].astype(np.int64)


def batched_rotated_nms(boxes, scores, idxs, iou_threshold: float) -> np.ndarray:
    """Rotated NMS done independently per category ``idxs`` (as ``torchvision.ops.batched_nms``).

    Each category gets its own (blocked) IoU matrix, so memory follows the largest category, and
    no coordinate offsets are added (torchvision computes rotated IoU in float32).

    Args:
        boxes: ``(N, 5)`` le90; scores: ``(N,)``; idxs: ``(N,)`` integer category per box.
    Returns:
        int64 indices of kept boxes, by decreasing score (ties: lower index first).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    idxs = np.asarray(idxs).reshape(-1)
    if not (len(boxes) == len(scores) == len(idxs)):
        raise ValueError(f"batched_rotated_nms: {len(boxes)} boxes, {len(scores)} scores, {len(idxs)} idxs")
    kept = [np.zeros(0, dtype=np.int64)]
    for c in np.unique(idxs):
        members = np.flatnonzero(idxs == c)
        kept.append(members[rotated_nms(boxes[members], scores[members], iou_threshold)])
    keep = np.sort(np.concatenate(kept))
    return keep[np.argsort(-scores[keep], kind="stable")].astype(np.int64)
