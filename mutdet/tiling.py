"""DOTA-style tiling of large images and merging tile detections back to full images.

Semantics follow the DOTA devkit / mmrotate ``img_split.py`` that users know:

* Windows of ``size`` with stride ``size - gap`` starting at 0; when the last window would run past the
  border it is shifted back to ``width - size`` (so the last ones overlap more). Images smaller than
  ``size`` give one window that is padded.
* Windows whose real-image fraction is ``<= img_rate_threshold`` are dropped (all but the best when
  none passes).
* Multi-scale: the image (and its polygons) are rescaled by each ``rate`` before cutting.
* An object goes to a window when IoF = area(object ∩ window) / area(object) ``>= iof_threshold``; kept
  objects that are cut (IoF < 1) become difficult 2. Polygons are kept whole (not clipped), in tile
  pixels. IoF uses the convex hull of the polygon, which is robust to self-intersecting quadrilaterals.
* Tile names are ``<image>__<rate>__<x>___<y>`` (``x``, ``y`` the window origin in the rescaled
  image), which merging tools parse to shift boxes back.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import shapely

from mutdet.boxes import batched_rotated_nms, polygon_to_le90

# Objects whose IoF is within this of 1 count as whole (float noise on the window border).
_WHOLE_IOF = 1.0 - 1e-6


@dataclass(frozen=True)
class TilingParams:
    size: int = 1024
    gap: int = 200
    rates: tuple[float, ...] = (1.0,)
    iof_threshold: float = 0.7
    img_rate_threshold: float = 0.6
    pad_value: tuple[int, int, int] = (104, 116, 124)  # RGB
    enabled: bool = True
    # The tile stage's choice for a tile that is its whole image unchanged (rate 1, one window, no padding):
    # point at the source image file instead of writing a PNG copy (iter_tiles ignores it).
    reference_whole_images: bool = True


@dataclass
class Tile:
    """One window of one image.

    Attributes:
        tile_id: ``<image>__<rate>__<x>___<y>``.
        rate, x, y: rescaling factor and window origin in the rescaled image.
        size: side of the (square, padded) tile.
        valid_width, valid_height: extent of real image inside the tile.
        pixels: ``(size, size, 3)`` uint8 BGR (a read-only view of the image where the window lies inside
            it, a padded copy where it runs past the border).
        object_indices: ``(K,)`` indices into the image's annotation arrays.
        polygons: ``(K, 8)`` tile pixels; boxes: ``(K, 5)`` le90 tile pixels.
        difficult: ``(K,)`` int8 (2 for cut objects); iof: ``(K,)`` float.
    """

    tile_id: str
    rate: float
    x: int
    y: int
    size: int
    valid_width: int
    valid_height: int
    pixels: np.ndarray
    object_indices: np.ndarray
    polygons: np.ndarray
    boxes: np.ndarray
    difficult: np.ndarray
    iof: np.ndarray


def tile_name(image_id: str, rate: float, x: int, y: int) -> str:
    return f"{image_id}__{float(rate)}__{int(x)}___{int(y)}"


def _starts(length: int, size: int, step: int) -> list[int]:
    count = 1 if length <= size else math.ceil((length - size) / step + 1)
    starts = [step * i for i in range(count)]
    if len(starts) > 1 and starts[-1] + size > length:
        starts[-1] = length - size
    return starts


def sliding_windows(width: int, height: int, size: int, gap: int, img_rate_threshold: float = 0.6) -> np.ndarray:
    """Windows ``(W, 4)`` int64 ``x0, y0, x1, y1`` over a ``width x height`` image (x1 - x0 == size)."""
    if gap >= size:
        raise ValueError(f"gap ({gap}) must be smaller than size ({size})")
    step = size - gap
    xs, ys = _starts(width, size, step), _starts(height, size, step)
    starts = np.array([(x, y) for x in xs for y in ys], dtype=np.int64)
    windows = np.concatenate([starts, starts + size], axis=1)
    inside = windows.copy()
    inside[:, 0::2] = np.clip(inside[:, 0::2], 0, width)
    inside[:, 1::2] = np.clip(inside[:, 1::2], 0, height)
    rates = ((inside[:, 2] - inside[:, 0]) * (inside[:, 3] - inside[:, 1])) / float(size * size)
    if not (rates > img_rate_threshold).any():
        rates[np.abs(rates - rates.max()) < 0.01] = 1.0
    return windows[rates > img_rate_threshold]


def window_iof(polygons: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """IoF of each object in each window: ``(N, 8)`` polygons x ``(W, 4)`` windows -> ``(N, W)``.

    Only pairs whose axis-aligned extents overlap are intersected (shapely, vectorised).
    """
    n, w = len(polygons), len(windows)
    iof = np.zeros((n, w), dtype=np.float64)
    if n == 0 or w == 0:
        return iof
    pts = polygons.reshape(n, 4, 2)
    hulls = shapely.convex_hull(shapely.polygons(np.concatenate([pts, pts[:, :1]], axis=1)))
    areas = shapely.area(hulls)
    lo, hi = pts.min(axis=1), pts.max(axis=1)  # (N, 2)
    overlap = (
        (lo[:, None, 0] < windows[None, :, 2]) & (hi[:, None, 0] > windows[None, :, 0])
        & (lo[:, None, 1] < windows[None, :, 3]) & (hi[:, None, 1] > windows[None, :, 1])
    )
    i, j = np.nonzero(overlap)
    if len(i):
        boxes = shapely.box(windows[:, 0], windows[:, 1], windows[:, 2], windows[:, 3])
        inter = shapely.area(shapely.intersection(hulls[i], boxes[j]))
        iof[i, j] = inter / np.maximum(areas[i], 1e-12)
    return iof


def iter_tiles(image: np.ndarray, image_id: str, polygons: np.ndarray, difficult: np.ndarray,
               params: TilingParams) -> Iterator[Tile]:
    """Cut one image into tiles, one at a time (only one rescaled copy of the image is held).

    Args:
        image: ``(H, W, 3)`` uint8 BGR.
        polygons: ``(N, 8)`` object polygons in image pixels; difficult: ``(N,)``.
    """
    height, width = image.shape[:2]
    pad_bgr = np.array(params.pad_value[::-1], dtype=np.uint8)
    polygons = np.asarray(polygons, dtype=np.float64).reshape(-1, 8)
    difficult = np.asarray(difficult, dtype=np.int8).reshape(-1)
    for rate in params.rates:
        if rate == 1.0:
            scaled = image
        else:
            new_size = (max(1, round(width * rate)), max(1, round(height * rate)))
            scaled = cv2.resize(image, new_size, interpolation=cv2.INTER_LINEAR)
        sh, sw = scaled.shape[:2]
        scaled_polys = polygons * rate
        if params.enabled:
            size = params.size
            windows = sliding_windows(sw, sh, size, params.gap, params.img_rate_threshold)
        else:
            size = max(params.size, sw, sh)
            windows = np.array([[0, 0, size, size]], dtype=np.int64)
        iof = window_iof(scaled_polys, windows)
        for k, (x0, y0, x1, y1) in enumerate(windows):
            valid_w, valid_h = min(x1, sw) - x0, min(y1, sh) - y0
            if valid_w == size and valid_h == size:  # inside the image: a read-only view, no copy
                pixels = scaled[y0:y0 + size, x0:x0 + size].view()
                pixels.flags.writeable = False
            else:
                pixels = np.empty((size, size, 3), dtype=np.uint8)
                pixels[:] = pad_bgr
                pixels[:valid_h, :valid_w] = scaled[y0:y0 + valid_h, x0:x0 + valid_w]
            keep = np.flatnonzero(iof[:, k] >= params.iof_threshold)
            tile_polys = scaled_polys[keep] - np.tile([x0, y0], 4)
            tile_difficult = np.where(iof[keep, k] < _WHOLE_IOF, 2, difficult[keep]).astype(np.int8)
            yield Tile(
                tile_id=tile_name(image_id, rate, x0, y0), rate=float(rate), x=int(x0), y=int(y0), size=int(size),
                valid_width=int(valid_w), valid_height=int(valid_h), pixels=pixels,
                object_indices=keep, polygons=tile_polys,
                boxes=polygon_to_le90(tile_polys).reshape(-1, 5), difficult=tile_difficult, iof=iof[keep, k],
            )


def tile_boxes_to_image(boxes: np.ndarray, x: np.ndarray, y: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """le90 boxes ``(N, 5)`` in tile pixels -> source-image pixels, given each box's tile origin and rate."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 5).copy()
    rate = np.asarray(rate, dtype=np.float64)
    b[:, 0] = (b[:, 0] + x) / rate
    b[:, 1] = (b[:, 1] + y) / rate
    b[:, 2] /= rate
    b[:, 3] /= rate
    return b


def merge_detections(image_ids: np.ndarray, boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray,
                     iou_threshold: float = 0.1) -> np.ndarray:
    """Indices of the detections that survive per-image, per-class rotated NMS
    (:func:`mutdet.boxes.batched_rotated_nms` rules, all images and classes in one pass).

    Args:
        image_ids: ``(N,)`` source image of each detection (strings or integer codes); boxes: ``(N, 5)``
            le90 in image pixels; scores: ``(N,)``; class_ids: ``(N,)``.
    Returns:
        int64 indices, grouped by image (in order of first appearance), by decreasing score inside (ties:
        lower index first).
    """
    image_ids = np.asarray(image_ids)
    if len(image_ids) == 0:
        return np.zeros(0, dtype=np.int64)
    _, first, image = np.unique(image_ids, return_index=True, return_inverse=True)
    _, cls = np.unique(np.asarray(class_ids), return_inverse=True)
    image, cls = image.reshape(-1).astype(np.int64), cls.reshape(-1).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    keep = batched_rotated_nms(boxes, scores, image * (int(cls.max()) + 1) + cls, iou_threshold)
    appearance = np.argsort(np.argsort(first, kind="stable"), kind="stable")[image[keep]]  # image rank by first row
    return keep[np.lexsort((keep, -scores[keep], appearance))]
