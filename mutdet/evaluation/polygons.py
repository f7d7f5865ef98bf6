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

from mutdet.io.annotations import strictly_convex


__all__ = ["QuadPieces", "quad_pieces", "QuadShapes", "quad_shapes", "strictly_convex", "convex_pair_iou",
           "candidate_pairs", "pair_iou", "devkit_iou", "mmrotate_label_boxes",
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


def _fan_areas(pts: np.ndarray) -> np.ndarray:
    """Signed areas ``(N, 2)`` of the fan triangles ``(p0, p1, p2)`` and ``(p0, p2, p3)`` of quads ``(N, 4, 2)``."""
    rel = pts - pts[:, :1]
    return 0.5 * np.stack([rel[:, 1, 0] * rel[:, 2, 1] - rel[:, 2, 0] * rel[:, 1, 1],
                           rel[:, 2, 0] * rel[:, 3, 1] - rel[:, 3, 0] * rel[:, 2, 1]], axis=1)


def _simple_rings(pts: np.ndarray, zero_area: np.ndarray, convex: np.ndarray) -> np.ndarray:
    """``(N,)``: the closed ring is simple, its polygon valid, and its area not 0.

    Strictly convex quads (:func:`strictly_convex`) are simple without asking; the others go to GEOS
    (``is_simple`` of the ring, then ``is_valid`` of the polygon), which decides the same for all."""
    simple = ~zero_area
    ask = np.flatnonzero(simple & ~convex)
    if len(ask):
        rings = shapely.linearrings(pts[ask])
        ok = shapely.is_simple(rings)
        ok[ok] = shapely.is_valid(shapely.polygons(rings[ok]))
        simple[ask] = ok
    return simple


def quad_pieces(polygons) -> QuadPieces:
    """Split quadrilaterals ``(N, 8)`` (``x1 y1 ... x4 y4``, float64) into weighted simple pieces."""
    polys = np.asarray(polygons, dtype=np.float64).reshape(-1, 8)
    n = len(polys)
    pts = polys.reshape(n, 4, 2)
    # Signed areas of the fan triangles (p0, p1, p2) and (p0, p2, p3); their sum is the shoelace area.
    fan = _fan_areas(pts)
    total = fan.sum(axis=1)
    area = np.abs(total)
    zero_area = total == 0
    simple = _simple_rings(pts, zero_area, strictly_convex(pts))
    whole = np.empty(n, dtype=object)
    if simple.any():
        whole[simple] = shapely.polygons(shapely.linearrings(pts[simple]))
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


@dataclass(frozen=True)
class QuadShapes:
    """Per-quadrilateral numbers computed without GEOS (:func:`quad_shapes`).

    Attributes:
        pts: ``(N, 4, 2)`` corners; area: ``(N,)`` absolute shoelace area (as :class:`QuadPieces`);
        lo, hi: ``(N, 2)`` bounds; zero_area: ``(N,)`` shoelace area exactly 0;
        convex: ``(N,)`` strictly convex (:func:`strictly_convex`), hence simple.
    """

    pts: np.ndarray
    area: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    zero_area: np.ndarray
    convex: np.ndarray

    def __len__(self) -> int:
        return len(self.area)

    def simple(self) -> np.ndarray:
        """``(N,)``: as :attr:`QuadPieces.simple` (GEOS asked only about the quads that are not convex)."""
        return _simple_rings(self.pts, self.zero_area, self.convex)


def quad_shapes(polygons) -> QuadShapes:
    """Areas, bounds and convexity of quadrilaterals ``(N, 8)``, the same values :func:`quad_pieces` gives."""
    pts = np.asarray(polygons, dtype=np.float64).reshape(-1, 4, 2)
    total = _fan_areas(pts).sum(axis=1)
    return QuadShapes(pts=pts, area=np.abs(total), lo=pts.min(axis=1), hi=pts.max(axis=1), zero_area=total == 0,
                      convex=strictly_convex(pts))


def convex_pair_iou(a: QuadShapes, b: QuadShapes, ia: np.ndarray, ib: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU of pairs of strictly convex quads ``(a[ia[k]], b[ib[k]])`` by Sutherland-Hodgman clipping in numpy.

    ``a``'s quad is clipped by each edge of ``b``'s (turned counter-clockwise) in float64, in coordinates
    relative to ``a``'s first corner; each new corner is an interpolation with parameter in ``[0, 1]``
    between two corners on either side of the edge's line, so the area is off by at most a small
    multiple of float64 rounding of the coordinates. The union uses the shoelace areas of
    :class:`QuadShapes`, as :func:`pair_iou`.

    Returns:
        ``iou`` ``(K,)`` and ``margin`` ``(K,)``: a bound, far above the rounding error of this value and
        of GEOS's for the same pair (``1e-10 * (M + L) * L / union`` with ``M`` the largest absolute
        coordinate and ``L`` the extent of the pair), within which the two may disagree.
    """
    ia, ib = np.asarray(ia, np.int64), np.asarray(ib, np.int64)
    k = len(ia)
    if k == 0:
        return np.zeros(0), np.zeros(0)
    origin = a.pts[ia, :1]
    subject = a.pts[ia] - origin  # (K, 4, 2)
    clip = b.pts[ib] - origin
    ccw = (_fan_areas(b.pts[ib]).sum(axis=1) > 0)[:, None, None]
    clip = np.where(ccw, clip, clip[:, ::-1])
    big = np.maximum(np.abs(a.pts[ia]).max(axis=(1, 2)), np.abs(b.pts[ib]).max(axis=(1, 2)))
    extent = np.maximum(np.abs(subject).max(axis=(1, 2)), np.abs(clip).max(axis=(1, 2)))
    count = np.full(k, 4, dtype=np.int64)
    rows = np.arange(k)[:, None]
    for e in range(4):
        p0, p1 = clip[:, e], clip[:, (e + 1) % 4]
        edge = p1 - p0
        width = subject.shape[1]
        slots = np.arange(width)[None, :]
        valid = slots < count[:, None]
        nxt = np.where(slots + 1 < count[:, None], slots + 1, 0)
        rel = subject - p0[:, None]
        side = edge[:, None, 0] * rel[..., 1] - edge[:, None, 1] * rel[..., 0]  # >= 0: inside (left of the edge)
        side_next = side[rows, nxt]
        inside, inside_next = side >= 0, side_next >= 0
        cross = valid & (inside != inside_next)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(cross, side / (side - side_next), 0.0)
        point = subject + t[..., None] * (subject[rows, nxt] - subject)
        emit = np.stack([valid & inside, cross], axis=2).reshape(k, 2 * width)
        cand = np.stack([subject, point], axis=2).reshape(k, 2 * width, 2)
        count = emit.sum(axis=1)
        new_width = max(int(count.max()), 1)
        out = np.zeros((k, new_width, 2))
        r, c = np.nonzero(emit)
        out[r, (np.cumsum(emit, axis=1) - 1)[r, c]] = cand[r, c]
        subject = out
    # Shoelace of the clipped polygon; padding slots repeat the first corner and add nothing.
    slots = np.arange(subject.shape[1])[None, :]
    subject = np.where((slots < count[:, None])[..., None], subject, subject[:, :1])
    nxt = np.roll(subject, -1, axis=1)
    inter = 0.5 * np.abs(np.sum(subject[..., 0] * nxt[..., 1] - nxt[..., 0] * subject[..., 1], axis=1))
    inter = np.where(count >= 3, inter, 0.0)
    union = a.area[ia] + b.area[ib] - inter
    iou = inter / union
    margin = 1e-10 * (big + extent) * extent / np.maximum(union, np.maximum(a.area[ia], b.area[ib]))
    return iou, margin


def candidate_pairs(a_lo: np.ndarray, a_hi: np.ndarray, a_group: np.ndarray,
                    b_lo: np.ndarray, b_hi: np.ndarray, b_group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)`` with ``a_group[i] == b_group[j]`` whose axis-aligned bounds meet (touching included).

    A sweep in numpy: the ``b`` boxes sorted by group, then left edge; for each ``a`` box, the ``b`` boxes
    of its group whose left edge lies between its own left edge minus the group's widest ``b`` box and
    its right edge (one pixel wider on both sides, so that the rounding of the combined sort key loses no
    pair) are the only ones whose x-ranges can meet it; those are then tested exactly in x and y.

    Returns:
        ``(ia, ib)`` int64 index arrays, sorted by ``ia`` then ``ib``.
    """
    if len(a_lo) == 0 or len(b_lo) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    groups, inverse = np.unique(np.concatenate([a_group, b_group]), return_inverse=True)
    ga, gb = inverse[: len(a_lo)], inverse[len(a_lo):]
    x0 = min(a_lo[:, 0].min(), b_lo[:, 0].min())
    span = max(a_hi[:, 0].max(), b_hi[:, 0].max()) - x0
    stride = 2.0 * span + 8.0  # groups far apart on one axis: a window never reaches another group
    width = np.zeros(len(groups))
    np.maximum.at(width, gb, b_hi[:, 0] - b_lo[:, 0])
    key_b = gb * stride + (b_lo[:, 0] - x0)
    order = np.argsort(key_b, kind="stable")
    key_b = key_b[order]
    base = ga * stride - x0
    first = np.searchsorted(key_b, base + a_lo[:, 0] - width[ga] - 1.0, side="left")
    last = np.searchsorted(key_b, base + a_hi[:, 0] + 1.0, side="right")
    count = np.maximum(last - first, 0)
    ia = np.repeat(np.arange(len(a_lo)), count)
    pos = np.arange(len(ia)) - np.repeat(np.cumsum(count) - count, count) + np.repeat(first, count)
    ib = order[pos]
    meet = (ga[ia] == gb[ib]) & np.all((b_lo[ib] <= a_hi[ia]) & (a_lo[ia] <= b_hi[ib]), axis=1)
    ia, ib = ia[meet].astype(np.int64), ib[meet].astype(np.int64)
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
    rects = [cv2.minAreaRect(p) for p in polys.astype(np.float32).reshape(-1, 4, 2)]
    raw = np.array([(x, y, w, h, a) for (x, y), (w, h), a in rects], dtype=np.float64).reshape(-1, 5)
    x, y, w, h, a = raw.T
    keep = ~((w < MMROTATE_MIN_SIDE) | (h < MMROTATE_MIN_SIDE))
    a = a / 180 * np.pi
    swap = w < h
    w, h = np.where(swap, h, w), np.where(swap, w, h)
    a = np.where(swap, a + np.pi / 2, a)
    # poly2obb_np_le90's loop, one step at a time until every angle is in [-pi/2, pi/2).
    while True:
        out = ~((np.pi / 2 > a) & (a >= -np.pi / 2))
        if not out.any():
            break
        a = np.where(out, a + np.where(a >= np.pi / 2, -np.pi, np.pi), a)
    boxes = np.stack([x, y, w, h, a], axis=1)
    return boxes.astype(np.float32).astype(np.float64), keep
