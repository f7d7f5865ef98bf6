"""Quadrilateral IoU as the DOTA devkit defines it, through shapely 2 (GEOS), and mmrotate's label boxes.

**The devkit's polygon IoU** (``polyiou.iou_poly``, used by ``dota_evaluation_task1.py``) sums the
signed intersection areas of the two polygons' triangle fans. For two polygons ``P`` and ``Q`` whose
vertex order is first turned positive (a polygon with negative shoelace area is reversed) this is

    inter(P, Q) = integral of w_P(x) * w_Q(x) dx,     IoU = inter / (|A_P| + |A_Q| - inter)

with ``w`` the winding number of the ring around ``x`` and ``A`` the signed shoelace area. For a
*simple* polygon (convex or concave) ``w`` is 1 inside and 0 outside, so ``inter`` is the ordinary
intersection area and the IoU the ordinary polygon IoU. We compute exactly that formula:

* a simple quadrilateral (its closed ring is simple and its area is not 0) is one piece, the polygon
  itself, with weight 1;
* any other quadrilateral (self-intersecting "bow tie", a vertex on another edge, repeated or collinear
  points) is split into its fan triangles from the first vertex, ``(p0, p1, p2)`` and
  ``(p0, p2, p3)``, each weighted by its orientation (+1 or -1, after the devkit's reversal of a
  negative polygon; a triangle of area 0 is dropped). Their signed sum is the winding number, so the
  result is what the devkit computes for such a polygon: e.g. a bow tie's lobes count with opposite
  signs, its "area" is the difference of the lobes, and its IoU with a detection can be negative or
  even above 1;
* ``inter`` is the weighted sum of the pieces' pairwise intersection areas (``shapely.intersection``
  and ``shapely.area``, vectorised over all piece pairs of all candidate pairs at once);
* ``|A|`` is the absolute shoelace area (float64, relative to the first vertex);
* a pair whose union is 0 (both polygons of area 0) has IoU 0 (the devkit gets NaN, which matches
  nothing either).

Equal to the devkit up to floating-point rounding (GEOS's overlay versus the devkit's fan clipping).

**mmrotate's label boxes** (``poly2obb_np`` with ``version='le90'``, as its DOTA and DIOR dataset
classes call it): the polygon in float32 goes through OpenCV ``minAreaRect``; a rectangle with a side
below 2 pixels makes the conversion return nothing and the loader drops the object; the box is stored
as float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import shapely


__all__ = ["QuadPieces", "quad_pieces", "candidate_pairs", "pair_iou", "devkit_iou", "mmrotate_label_boxes",
           "MMROTATE_MIN_SIDE"]

# mmrotate's poly2obb_np drops a label whose minimum-area rectangle has a side below this (pixels).
MMROTATE_MIN_SIDE = 2.0


@dataclass(frozen=True)
class QuadPieces:
    """Quadrilaterals as weighted simple pieces (module docstring).

    Attributes:
        start, count: ``(N,)`` the pieces of polygon ``i`` are ``geoms[start[i]:start[i] + count[i]]``.
        geoms: ``(P,)`` shapely polygons (valid, simple); weights: ``(P,)`` +1 or -1.
        area: ``(N,)`` absolute shoelace area of each polygon.
        lo, hi: ``(N, 2)`` axis-aligned bounds (x, y).
        simple: ``(N,)`` the closed ring is simple and has non-zero area (one piece of weight 1).
        zero_area: ``(N,)`` shoelace area exactly 0 (collinear or coincident points, or a balanced bow tie).
    """

    start: np.ndarray
    count: np.ndarray
    geoms: np.ndarray
    weights: np.ndarray
    area: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    simple: np.ndarray
    zero_area: np.ndarray

    def __len__(self) -> int:
        return len(self.area)


def quad_pieces(polygons) -> QuadPieces:
    """Split quadrilaterals ``(N, 8)`` (``x1 y1 ... x4 y4``, float64) into weighted simple pieces."""
    polys = np.asarray(polygons, dtype=np.float64).reshape(-1, 8)
    n = len(polys)
    pts = polys.reshape(n, 4, 2)
    rel = pts - pts[:, :1]
    # Signed areas of the fan triangles (p0, p1, p2) and (p0, p2, p3); their sum is the shoelace area.
    fan = 0.5 * np.stack([rel[:, 1, 0] * rel[:, 2, 1] - rel[:, 2, 0] * rel[:, 1, 1],
                          rel[:, 2, 0] * rel[:, 3, 1] - rel[:, 3, 0] * rel[:, 2, 1]], axis=1)
    total = fan.sum(axis=1)
    area = np.abs(total)
    zero_area = total == 0
    simple = ~zero_area
    whole = np.empty(n, dtype=object)
    if n:
        rings = shapely.linearrings(pts)
        simple &= shapely.is_simple(rings)
        whole[simple] = shapely.polygons(rings[simple])
        simple[simple] = shapely.is_valid(whole[simple])
    # Non-simple polygons: fan triangles with orientation weights (the devkit reverses a negative polygon).
    flip = np.where(total < 0, -1.0, 1.0)
    tri_w = np.sign(fan) * flip[:, None]  # (N, 2); 0 drops a flat triangle
    tri_keep = (tri_w != 0) & ~simple[:, None]
    count = np.where(simple, 1, tri_keep.sum(axis=1)).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    geoms = np.empty(int(count.sum()), dtype=object)
    weights = np.ones(len(geoms))
    geoms[start[simple]] = whole[simple]
    owner, which = np.nonzero(tri_keep)  # row-major: a polygon's first triangle before its second
    if len(owner):
        slot = start[owner] + (which == 1) * tri_keep[owner, 0]
        corners = np.stack([pts[owner, 0], pts[owner, 1 + which], pts[owner, 2 + which]], axis=1)
        geoms[slot] = shapely.polygons(corners)
        weights[slot] = tri_w[owner, which]
    return QuadPieces(start=start, count=count, geoms=geoms, weights=weights, area=area,
                      lo=pts.min(axis=1), hi=pts.max(axis=1), simple=simple, zero_area=zero_area)


def candidate_pairs(a_lo: np.ndarray, a_hi: np.ndarray, a_group: np.ndarray,
                    b_lo: np.ndarray, b_hi: np.ndarray, b_group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)`` with ``a_group[i] == b_group[j]`` whose axis-aligned bounds meet (touching included).

    One ``shapely.STRtree`` over all of ``b``: each group is moved to its own cell of a grid far enough
    apart that no box can reach another group's cell, and every box is padded by one pixel so that the
    rounding of that move loses no pair (extra pairs are harmless: their IoU is computed exactly).

    Returns:
        ``(ia, ib)`` int64 index arrays, sorted by ``ia`` then ``ib``.
    """
    if len(a_lo) == 0 or len(b_lo) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pad = 1.0
    lo_all = np.minimum(a_lo.min(axis=0), b_lo.min(axis=0)) - pad
    hi_all = np.maximum(a_hi.max(axis=0), b_hi.max(axis=0)) + pad
    stride = 2.0 * (hi_all - lo_all).max() + 4.0 * pad
    groups, inverse = np.unique(np.concatenate([a_group, b_group]), return_inverse=True)
    side = max(1, int(np.ceil(np.sqrt(len(groups)))))
    cell = np.stack([inverse % side, inverse // side], axis=1) * stride  # (A + B, 2)
    shift = cell - lo_all
    sa, sb = shift[: len(a_lo)], shift[len(a_lo):]
    tree = shapely.STRtree(shapely.box(*(b_lo + sb - pad).T, *(b_hi + sb + pad).T))
    ia, ib = tree.query(shapely.box(*(a_lo + sa - pad).T, *(a_hi + sa + pad).T))
    same = a_group[ia] == b_group[ib]
    ia, ib = ia[same].astype(np.int64), ib[same].astype(np.int64)
    order = np.lexsort((ib, ia))
    return ia[order], ib[order]


def pair_iou(a: QuadPieces, b: QuadPieces, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """The devkit's IoU (module docstring) of polygon pairs ``(a[ia[k]], b[ib[k]])``, float64 ``(K,)``."""
    ia, ib = np.asarray(ia, np.int64), np.asarray(ib, np.int64)
    k = len(ia)
    if k == 0:
        return np.zeros(0)
    ca, cb = a.count[ia], b.count[ib]
    n_pp = ca * cb
    pair = np.repeat(np.arange(k), n_pp)
    local = np.arange(len(pair)) - np.repeat(np.cumsum(n_pp) - n_pp, n_pp)
    pa_ = a.start[ia][pair] + local // np.maximum(cb[pair], 1)
    pb_ = b.start[ib][pair] + local % np.maximum(cb[pair], 1)
    pieces = shapely.area(shapely.intersection(a.geoms[pa_], b.geoms[pb_])) * a.weights[pa_] * b.weights[pb_]
    inter = np.bincount(pair, weights=pieces, minlength=k)
    union = a.area[ia] + b.area[ib] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where(np.isnan(iou), 0.0, iou)


def devkit_iou(polygons_a, polygons_b) -> np.ndarray:
    """Dense ``(N, M)`` devkit IoU matrix between two sets of quadrilaterals (for small sets and tests)."""
    a, b = quad_pieces(polygons_a), quad_pieces(polygons_b)
    ia, ib = np.meshgrid(np.arange(len(a)), np.arange(len(b)), indexing="ij")
    return pair_iou(a, b, ia.ravel(), ib.ravel()).reshape(len(a), len(b))


def mmrotate_label_boxes(polygons) -> tuple[np.ndarray, np.ndarray]:
    """Label polygons ``(N, 8)`` -> mmrotate's le90 boxes and which labels it keeps.

    As mmrotate's ``poly2obb_np_le90``: each polygon is cast to float32 and given to OpenCV
    ``minAreaRect``; a rectangle with a side below :data:`MMROTATE_MIN_SIDE` is dropped (the dataset
    skips the line). The box is the rectangle's own centre, size and angle (``a / 180 * pi``; sides
    swapped and ``pi / 2`` added when ``w < h``; the angle wrapped into ``[-pi/2, pi/2)``), rounded
    to float32, the type mmrotate stores it in. (Rebuilding the box from ``boxPoints`` corners instead
    differs by about 1e-5, enough to move an IoU across 0.75 and to meet the float32 rotated-IoU
    kernel's failures on other values: ``benchmarks/evaluation.py`` has both cases.)

    Returns:
        ``boxes`` ``(N, 5)`` float64 holding float32 values (rows of dropped labels are still filled) and
        ``keep`` ``(N,)`` bool.
    """
    polys = np.asarray(polygons, dtype=np.float64).reshape(-1, 8)
    boxes = np.empty((len(polys), 5))
    keep = np.empty(len(polys), dtype=bool)
    for i, p in enumerate(polys.astype(np.float32).reshape(-1, 4, 2)):
        (x, y), (w, h), a = cv2.minAreaRect(p)
        keep[i] = not (w < MMROTATE_MIN_SIDE or h < MMROTATE_MIN_SIDE)
        a = a / 180 * np.pi
        if w < h:
            w, h = h, w
            a += np.pi / 2
        while not np.pi / 2 > a >= -np.pi / 2:
            a += -np.pi if a >= np.pi / 2 else np.pi
        boxes[i] = (x, y, w, h, a)
    return boxes.astype(np.float32).astype(np.float64), keep