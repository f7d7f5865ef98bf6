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


def _axis_aligned_extents(boxes: np.ndarray) -> np.ndarray:
    """``(N, 4)`` ``x0, y0, x1, y1`` of le90 boxes, widened by a relative margin that covers the float32
    rounding of torchvision's IoU (a pair left out must have IoU exactly 0)."""
    c, s = np.abs(np.cos(boxes[:, 4])), np.abs(np.sin(boxes[:, 4]))
    half_x = 0.5 * (boxes[:, 2] * c + boxes[:, 3] * s)
    half_y = 0.5 * (boxes[:, 2] * s + boxes[:, 3] * c)
    margin = 1e-4 * (1.0 + np.abs(boxes[:, :2]).max(axis=1) + half_x + half_y)
    return np.stack([boxes[:, 0] - half_x - margin, boxes[:, 1] - half_y - margin,
                     boxes[:, 0] + half_x + margin, boxes[:, 1] + half_y + margin], axis=1)


def _suppressing_pairs(boxes: np.ndarray, kernel, groups: np.ndarray, rows: np.ndarray, iou_threshold: float,
                       block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)``, ``i < j``, of ``rows`` (indices into ``boxes``, one or more whole groups) in the same
    group whose rotated IoU (the kernel's, box ``i`` first) exceeds ``iou_threshold``.

    Candidates are the pairs whose widened axis-aligned extents meet (any other pair has IoU 0), found by
    a sweep (:func:`mutdet.evaluation.polygons.candidate_pairs`) over at most ``block_size`` rows at a
    time against all of ``rows``; their IoU is the kernel's, replayed in numpy
    (:class:`mutdet.rotated_iou_kernel.KernelBoxes`).
    """
    from mutdet.evaluation.polygons import candidate_pairs

    ext = _axis_aligned_extents(boxes[rows])
    lo, hi, grp = ext[:, :2], ext[:, 2:], groups[rows]
    first, second = [], []
    for start in range(0, len(rows), block_size):
        stop = min(start + block_size, len(rows))
        a, b = candidate_pairs(lo[start:stop], hi[start:stop], grp[start:stop], lo, hi, grp)
        a += start
        mine = a < b
        i, j = rows[a[mine]], rows[b[mine]]
        above = kernel.pair_iou(i, j).astype(np.float64) > iou_threshold
        first.append(i[above])
        second.append(j[above])
    return np.concatenate(first), np.concatenate(second)


def _greedy_keep(order: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Greedy NMS over the suppression graph: ``order`` ranks the boxes (best first); ``(i, j)`` are the
    pairs that suppress each other. Returns a keep mask indexed by box."""
    n = len(order)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    # edges from the higher-ranked box to the lower-ranked one, as CSR over ranks
    high, low = np.minimum(rank[i], rank[j]), np.maximum(rank[i], rank[j])
    by_high = np.argsort(high, kind="stable")
    high, low = high[by_high], low[by_high]
    bounds = np.searchsorted(high, np.arange(n + 1))
    keep = np.ones(n, dtype=bool)  # by rank
    for r in np.unique(high).tolist():
        if keep[r]:
            keep[low[bounds[r]:bounds[r + 1]]] = False
    out = np.zeros(n, dtype=bool)
    out[order[keep]] = True
    return out


def _check_nms_input(name: str, boxes, scores, idxs=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    idxs = np.zeros(len(boxes), dtype=np.int64) if idxs is None else np.asarray(idxs).reshape(-1)
    if not (len(boxes) == len(scores) == len(idxs)):
        raise ValueError(f"{name}: {len(boxes)} boxes, {len(scores)} scores, {len(idxs)} idxs")
    bad = ~np.isfinite(boxes).all(axis=1) | (boxes[:, 2] < 0) | (boxes[:, 3] < 0)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}: {int(bad.sum())} box(es) not finite or with a negative side, e.g. row {k}: "
                         f"{boxes[k].tolist()}")
    return boxes, scores, idxs


def _grouped_nms(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, iou_threshold: float,
                 block_size: int) -> np.ndarray:
    """Keep mask of greedy rotated NMS done independently in each group (``groups``: int64 ``(N,)``).

    Groups are processed together, whole, up to ``block_size`` boxes at a time (a larger group alone),
    so memory follows a batch of groups, not the input.
    """
    from mutdet.rotated_iou_kernel import KernelBoxes

    n = len(boxes)
    keep = np.ones(n, dtype=bool)
    if n == 0:
        return keep
    kernel = KernelBoxes(le90_to_cxcywhr(boxes).astype(np.float32))  # what torchvision's kernel receives
    by_group = np.argsort(groups, kind="stable")
    starts = np.flatnonzero(np.r_[True, groups[by_group][1:] != groups[by_group][:-1]])
    stops = np.r_[starts[1:], n]
    batch_start = 0
    for k in range(len(starts)):
        last = k + 1 == len(starts)
        if not last and stops[k + 1] - starts[batch_start] <= block_size:
            continue  # the next group still fits in this batch
        rows = np.sort(by_group[starts[batch_start]:stops[k]])
        i, j = _suppressing_pairs(boxes, kernel, groups, rows, iou_threshold, block_size)
        if len(i):
            local = np.searchsorted(rows, np.stack([i, j]))
            order = np.argsort(-scores[rows], kind="stable")  # ties: lower index first
            keep[rows] = _greedy_keep(order, local[0], local[1])
        batch_start = k + 1
    return keep


def rotated_nms(boxes, scores, iou_threshold: float, block_size: int = 65536) -> np.ndarray:
    """Greedy rotated NMS (class-agnostic), with torchvision's float32 rotated IoU.

    A box is suppressed by a higher-scoring kept box whose rotated IoU with it exceeds ``iou_threshold``.
    The IoU of a pair is torchvision's ``box_iou_rotated`` kernel's value (what :func:`rotated_iou` returns,
    with the lower-index box first), bit for bit, replayed in numpy (:mod:`mutdet.rotated_iou_kernel`: no
    torch import, and the kernel's own rounding and rare failures, so that every decision is the one
    the kernel-based NMS takes). Only pairs whose axis-aligned extents (widened by ``1e-4`` of the
    coordinates' size) meet are compared: the kernel gives any other pair 0 (1.5M pairs placed just
    outside, sides from 0.01 to 300 px, all 0). The greedy pass walks the boxes by
    decreasing score over that sparse graph: time and memory grow with the number of overlapping pairs,
    not with ``N**2``.

    Args:
        boxes: ``(N, 5)`` le90, finite, sides >= 0 (a ``ValueError`` names the first bad row).
        scores: ``(N,)``.
        iou_threshold: a box is suppressed by a higher-scoring kept box with IoU ``>`` this (>= 0).
        block_size: most boxes swept for candidate pairs at once (bounds the temporary arrays).
    Returns:
        int64 indices of kept boxes, by decreasing score (ties: lower index first).
    """
    return batched_rotated_nms(boxes, scores, None, iou_threshold, block_size=block_size, _name="rotated_nms")


def batched_rotated_nms(boxes, scores, idxs, iou_threshold: float, block_size: int = 65536,
                        _name: str = "batched_rotated_nms") -> np.ndarray:
    """Rotated NMS done independently per category ``idxs`` (as ``torchvision.ops.batched_nms``).

    Same rules as :func:`rotated_nms` inside each category; boxes of different categories never suppress
    each other (no coordinate offsets are added: categories are kept apart by the candidate sweep).

    Args:
        boxes: ``(N, 5)`` le90; scores: ``(N,)``; idxs: ``(N,)`` integer category per box (``None``: one).
        block_size: most boxes swept at once (whole categories are batched up to this many).
    Returns:
        int64 indices of kept boxes, by decreasing score (ties: lower index first).
    """
    boxes, scores, idxs = _check_nms_input(_name, boxes, scores, idxs)
    if not iou_threshold >= 0:
        raise ValueError(f"{_name}: iou_threshold must be >= 0, got {iou_threshold}")
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    _, groups = np.unique(idxs, return_inverse=True)
    keep = np.flatnonzero(_grouped_nms(boxes, scores, groups.astype(np.int64).reshape(-1), iou_threshold,
                                       int(block_size)))
    return keep[np.argsort(-scores[keep], kind="stable")].astype(np.int64)
