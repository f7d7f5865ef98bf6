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

**Rotated rectangles** (mmrotate protocol): :func:`rect_pair_iou` gives the IoU of pairs of le90 boxes
in numpy (float64, exact up to rounding), flagging pairs with an edge on a line of the other's edges;
the protocol compares it with the float32 kernel's within a margin (:mod:`mutdet.evaluation.rotated_ap`).

**mmrotate's label boxes** (``poly2obb_np`` with ``version='le90'``, as its DOTA and DIOR dataset
classes call it): the polygon in float32 goes through OpenCV ``minAreaRect``; a rectangle with a side
below 2 pixels makes the conversion return nothing and the loader drops the object; the box is stored
as float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import cv2
import numpy as np
import shapely

from mutdet.io.annotations import CONVEX_SINE, strictly_convex


__all__ = ["QuadPieces", "quad_pieces", "QuadShapes", "quad_shapes", "quad_simple_zero_area", "strictly_convex",
           "convex_pair_iou", "rect_pair_iou", "candidate_pairs", "pair_iou", "devkit_iou", "mmrotate_label_boxes",
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
    """Areas, bounds and convexity of quadrilaterals ``(N, 8)``, the same values :func:`quad_pieces` gives
    (computed on coordinate rows: :func:`_quad_rows`)."""
    polys = np.asarray(polygons, dtype=np.float64).reshape(-1, 8)
    total, convex, x, y = _quad_rows(polys)
    lo = np.stack([np.minimum(np.minimum(x[0], x[1]), np.minimum(x[2], x[3])),
                   np.minimum(np.minimum(y[0], y[1]), np.minimum(y[2], y[3]))], axis=1)
    hi = np.stack([np.maximum(np.maximum(x[0], x[1]), np.maximum(x[2], x[3])),
                   np.maximum(np.maximum(y[0], y[1]), np.maximum(y[2], y[3]))], axis=1)
    return QuadShapes(pts=polys.reshape(-1, 4, 2), area=np.abs(total), lo=lo, hi=hi, zero_area=total == 0,
                      convex=convex)


def _quad_rows(polys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Signed shoelace area and strict convexity ``(N,)`` of quads ``(N, 8)``, and their corners as rows
    ``x``, ``y`` ``(4, N)``: the same float operations, element by element, as :func:`_fan_areas` (summed)
    and :func:`strictly_convex`, on contiguous rows instead of ``(N, 4, 2)`` slices."""
    rows = np.ascontiguousarray(polys.T)  # (8, N)
    x, y = rows[0::2], rows[1::2]  # (4, N)
    rx, ry = x - x[0], y - y[0]
    total = 0.5 * (rx[1] * ry[2] - rx[2] * ry[1]) + 0.5 * (rx[2] * ry[3] - rx[3] * ry[2])
    ex, ey = x[_NEXT_CORNER] - x, y[_NEXT_CORNER] - y  # e_i = p_(i+1) - p_i
    enx, eny = ex[_NEXT_CORNER], ey[_NEXT_CORNER]
    cross = ex * eny - ey * enx
    length = np.hypot(ex, ey)
    tol = CONVEX_SINE * length * length[_NEXT_CORNER]
    convex = np.all(cross > tol, axis=0) | np.all(cross < -tol, axis=0)
    return total, convex, x, y


def quad_simple_zero_area(polygons) -> tuple[np.ndarray, np.ndarray]:
    """``(simple, zero_area)``, each ``(N,)``, of quadrilaterals ``(N, 8)``: the values of
    ``quad_shapes(polygons).simple()`` and ``.zero_area``, computed on coordinate rows (the same float
    operations, element by element, as :func:`_fan_areas` and :func:`strictly_convex`; GEOS asked only
    about the quads that are not strictly convex)."""
    polys = np.asarray(polygons, dtype=np.float64).reshape(-1, 8)
    total, convex, _, _ = _quad_rows(polys)
    zero_area = total == 0
    return _simple_rings_of(polys, zero_area, convex), zero_area


def _simple_rings_of(polys: np.ndarray, zero_area: np.ndarray, convex: np.ndarray) -> np.ndarray:
    """:func:`_simple_rings` for quads ``(N, 8)``, their corners formed only where GEOS is asked."""
    simple = ~zero_area
    ask = np.flatnonzero(simple & ~convex)
    if len(ask):
        rings = shapely.linearrings(polys[ask].reshape(-1, 4, 2))
        ok = shapely.is_simple(rings)
        ok[ok] = shapely.is_valid(shapely.polygons(rings[ok]))
        simple[ask] = ok
    return simple


def convex_pair_iou(a: QuadShapes, b: QuadShapes, ia: np.ndarray, ib: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU of pairs of strictly convex quads ``(a[ia[k]], b[ib[k]])`` in numpy, by Green's theorem.

    Both rings are turned counter-clockwise and taken relative to ``a``'s first corner (float64). The
    boundary of the intersection is made of the pieces of each ring's edges inside the other polygon;
    each edge ``c_i -> c_(i+1)`` is clipped by the other's four half-planes (Liang-Barsky: the parameter
    ``t`` where it crosses each edge's line, an interpolation between corners on either side) and its
    piece ``[t0, t1]`` adds ``(t1 - t0) * cross(c_i, c_(i+1)) / 2`` to the area. The union uses the
    shoelace areas of :class:`QuadShapes`, as :func:`pair_iou`.

    Returns:
        ``iou`` ``(K,)`` and ``margin`` ``(K,)``: a bound, far above the rounding error of this value and
        of GEOS's for the same pair (``1e-10 * (M + L) * L / union`` with ``M`` the largest absolute
        coordinate and ``L`` the extent of the pair), within which the two may disagree; infinite where an
        edge of one quad has both ends within ``1e-9 (M + L)`` of a line of the other's edges (both rings
        could then count the shared piece: the caller leaves such pairs to GEOS).
    """
    ia, ib = np.asarray(ia, np.int64), np.asarray(ib, np.int64)
    k = len(ia)
    if k == 0:
        return np.zeros(0), np.zeros(0)
    pa, pb = a.pts[ia], b.pts[ib]  # (K, 4, 2)
    big = np.maximum(np.abs(pa).max(axis=(1, 2)), np.abs(pb).max(axis=(1, 2)))
    # Rows (4, K) of each ring's corners, counter-clockwise, relative to a's first corner.
    ax, ay = np.ascontiguousarray(pa[..., 0].T), np.ascontiguousarray(pa[..., 1].T)
    bx, by = np.ascontiguousarray(pb[..., 0].T), np.ascontiguousarray(pb[..., 1].T)
    ox, oy = ax[0].copy(), ay[0].copy()
    ax, ay, bx, by = ax - ox, ay - oy, bx - ox, by - oy
    ccw_a = _ring_area(ax, ay) > 0
    ccw_b = _ring_area(bx, by) > 0
    ax, ay = np.where(ccw_a, ax, ax[::-1]), np.where(ccw_a, ay, ay[::-1])
    bx, by = np.where(ccw_b, bx, bx[::-1]), np.where(ccw_b, by, by[::-1])
    extent = np.maximum(np.maximum(np.abs(ax).max(axis=0), np.abs(ay).max(axis=0)),
                        np.maximum(np.abs(bx).max(axis=0), np.abs(by).max(axis=0)))
    tol = 1e-9 * (big + extent)
    part_a, flag_a = _convex_edges_inside(ax, ay, bx, by, tol)
    part_b, flag_b = _convex_edges_inside(bx, by, ax, ay, tol)
    inter = np.clip(part_a + part_b, 0.0, np.minimum(a.area[ia], b.area[ib]))
    union = a.area[ia] + b.area[ib] - inter
    iou = inter / union
    margin = 1e-10 * (big + extent) * extent / np.maximum(union, np.maximum(a.area[ia], b.area[ib]))
    return iou, np.where(flag_a | flag_b | ~np.isfinite(iou), np.inf, margin)


def _ring_area(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed shoelace area ``(K,)`` of rings given as rows ``(4, K)``."""
    return 0.5 * np.sum(x * y[_NEXT_CORNER] - x[_NEXT_CORNER] * y, axis=0)


def _convex_edges_inside(x: np.ndarray, y: np.ndarray, cx: np.ndarray, cy: np.ndarray,
                         tol: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Area contribution ``(K,)`` of the pieces of ring ``(x, y)``'s edges inside the convex ring ``(cx, cy)``
    (both ``(4, K)``, counter-clockwise, about a common origin), and whether an edge has both ends within
    ``tol`` of one of the other ring's edge lines ``(K,)``."""
    ex, ey = cx[_NEXT_CORNER] - cx, cy[_NEXT_CORNER] - cy  # (4 lines, K)
    length = np.hypot(ex, ey)
    # side[i, j]: cross(e_j, p_i - c_j) >= 0 where corner i is inside (left of) line j; (4 corners, 4 lines, K)
    side = ex[None] * (y[:, None] - cy[None]) - ey[None] * (x[:, None] - cx[None])
    side_n = side[_NEXT_CORNER]  # the edge's end corner
    out_a, out_b = side < 0, side_n < 0
    with np.errstate(divide="ignore", invalid="ignore"):
        t = side / (side - side_n)
    t0 = np.max(np.where(out_a & ~out_b, t, 0.0), axis=1)  # (4 edges, K)
    t1 = np.min(np.where(out_b & ~out_a, t, 1.0), axis=1)
    frac = np.where(np.any(out_a & out_b, axis=1), 0.0, np.maximum(t1 - t0, 0.0))
    term = x * y[_NEXT_CORNER] - x[_NEXT_CORNER] * y
    near = tol * length  # distance tol to the line, in units of the cross product
    flagged = np.any((np.abs(side) <= near[None]) & (np.abs(side_n) <= near[None]), axis=(0, 1))
    return 0.5 * np.sum(frac * term, axis=0), flagged


def _bands(lo: np.ndarray, hi: np.ndarray, y0: float, height: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each box's copies, one per horizontal band of ``height`` its y-range meets: box index, band, first band."""
    first = np.floor((lo - y0) / height).astype(np.int64)
    count = np.floor((hi - y0) / height).astype(np.int64) - first + 1
    idx = np.repeat(np.arange(len(lo)), count)
    band = np.repeat(first, count) + (np.arange(len(idx)) - np.repeat(np.cumsum(count) - count, count))
    return idx, band, first


def candidate_pairs(a_lo: np.ndarray, a_hi: np.ndarray, a_group: np.ndarray,
                    b_lo: np.ndarray, b_hi: np.ndarray, b_group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)`` with ``a_group[i] == b_group[j]`` whose axis-aligned bounds meet (touching included).

    A sweep in numpy over horizontal bands: each box is listed in every band (of a height of about four times
    the typical box) that its y-range meets, and its group and band together form the sweep's group. The
    ``b`` copies are sorted by that group, then left edge; for each ``a`` copy, the ``b`` copies of its
    group whose left edge is at most its right edge and whose running maximum of right edges (in that
    order) reaches its left edge (one pixel wider on both sides, so that the rounding of the combined
    sort key loses no pair) are the only ones whose x-ranges can meet it; those are then tested exactly
    in x and y. A pair meeting in several bands is kept in one: the band of the larger of the two lower
    edges (where their y-overlap starts, a band both are listed in).

    Returns:
        ``(ia, ib)`` int64 index arrays, sorted by ``ia`` then ``ib``.
    """
    if len(a_lo) == 0 or len(b_lo) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    a_group, b_group = np.asarray(a_group, np.int64), np.asarray(b_group, np.int64)
    g_min = min(a_group.min(), b_group.min())
    y0 = min(a_lo[:, 1].min(), b_lo[:, 1].min())
    y_span = max(a_hi[:, 1].max(), b_hi[:, 1].max()) - y0
    typical = max(float(np.median(a_hi[:, 1] - a_lo[:, 1])), float(np.median(b_hi[:, 1] - b_lo[:, 1])))
    height = max(4.0 * typical, y_span / 1024.0, 1e-9 * (1.0 + abs(y0) + y_span))  # at most ~1024 bands
    n_bands = int(np.floor(y_span / height)) + 1
    ka, band_a, first_band_a = _bands(a_lo[:, 1], a_hi[:, 1], y0, height)
    kb, band_b, first_band_b = _bands(b_lo[:, 1], b_hi[:, 1], y0, height)
    ga = (a_group[ka] - g_min) * n_bands + band_a  # the sweep's groups
    gb = (b_group[kb] - g_min) * n_bands + band_b
    x0 = min(a_lo[:, 0].min(), b_lo[:, 0].min())
    span = max(a_hi[:, 0].max(), b_hi[:, 0].max()) - x0
    stride = 2.0 * span + 8.0  # groups far apart on one axis: a window never reaches another group
    key_b = gb * stride + (b_lo[kb, 0] - x0)
    order = np.argsort(key_b, kind="stable")
    key_b = key_b[order]
    kb = kb[order]
    gb = gb[order]
    # Running maximum of the right edges in sweep order: non-decreasing, and within a group (earlier groups'
    # keys are smaller by at least the stride) the largest right edge so far.
    reach = np.maximum.accumulate(gb * stride + (b_hi[kb, 0] - x0))
    base = ga * stride - x0
    first = np.searchsorted(reach, base + a_lo[ka, 0] - 1.0, side="left")
    last = np.searchsorted(key_b, base + a_hi[ka, 0] + 1.0, side="right")
    count = np.maximum(last - first, 0)
    ca = np.repeat(np.arange(len(ka)), count)  # a copy
    pos = np.arange(len(ca)) - np.repeat(np.cumsum(count) - count, count) + np.repeat(first, count)
    ia, ib = ka[ca], kb[pos]
    # The exact test, one coordinate at a time on 1-D arrays; then one band per pair.
    meet = ga[ca] == gb[pos]
    for axis in (0, 1):
        meet &= b_lo[ib, axis] <= a_hi[ia, axis]
        meet &= a_lo[ia, axis] <= b_hi[ib, axis]
    meet &= band_a[ca] == np.maximum(first_band_a[ia], first_band_b[ib])
    ia, ib = ia[meet], ib[meet]
    order = np.argsort(ia * len(b_lo) + ib, kind="stable")  # ia ascends already: nearly linear
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
    rects = map(cv2.minAreaRect, polys.astype(np.float32).reshape(-1, 4, 2))  # ((x, y), (w, h), a) each
    raw = np.fromiter(chain.from_iterable(chain(c, s, (a,)) for c, s, a in rects), dtype=np.float64,
                      count=5 * len(polys)).reshape(-1, 5)
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


# Relative distance (of the pair's extent) under which an edge of one rectangle is taken to lie on a
# boundary line of the other (:func:`rect_pair_iou` flags the pair); float64 rounding is ~1e-16 of it.
COINCIDENT_EDGE = 1e-9

_NEXT_CORNER = [1, 2, 3, 0]


def _inside_fraction(p: np.ndarray, q: np.ndarray, half_w: np.ndarray, half_h: np.ndarray) -> np.ndarray:
    """Fraction of each edge of a ring inside an axis-aligned rectangle ``|x| <= half_w, |y| <= half_h``.

    Args:
        p, q: ``(4, K)`` the ring's corners in the rectangle's frame (its centre at 0, its width along x).
        half_w, half_h: ``(K,)``.
    Returns:
        ``(4, K)``: ``t1 - t0`` of the piece ``[t0, t1]`` of edge ``i -> i + 1`` inside (Liang-Barsky, one
        slab per axis), 0 if none; NaN for an edge parallel to an axis exactly on a boundary line.
    """
    pn, qn = p[_NEXT_CORNER], q[_NEXT_CORNER]
    with np.errstate(divide="ignore", invalid="ignore"):
        ip, iq = 1.0 / (pn - p), 1.0 / (qn - q)  # +-inf for an edge parallel to the axis: slab all or nothing
        a1, a2 = (-half_w - p) * ip, (half_w - p) * ip
        b1, b2 = (-half_h - q) * iq, (half_h - q) * iq
    t0 = np.maximum(np.minimum(a1, a2), np.minimum(b1, b2))
    np.maximum(t0, 0.0, out=t0)
    t1 = np.minimum(np.maximum(a1, a2), np.maximum(b1, b2))
    np.minimum(t1, 1.0, out=t1)
    frac = np.subtract(t1, t0, out=t1)
    return np.maximum(frac, 0.0, out=frac)  # NaN stays NaN


def _on_boundary_line(p: np.ndarray, q: np.ndarray, half_w: np.ndarray, half_h: np.ndarray,
                      tol: np.ndarray) -> np.ndarray:
    """``(K,)``: an edge of the ring ``(p, q)`` (``(4, K)``, as :func:`_inside_fraction`) has both ends within
    ``tol`` of a boundary line of the rectangle."""
    dp, dq = np.abs(np.abs(p) - half_w), np.abs(np.abs(q) - half_h)
    near = ((dp <= tol) & (dp[_NEXT_CORNER] <= tol)) | ((dq <= tol) & (dq[_NEXT_CORNER] <= tol))
    return np.any(near, axis=0)


# Pairs per block of rect_pair_iou: its (4, block) float64 temporaries stay in the CPU caches.
_RECT_BLOCK = 4096


def rect_pair_iou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_rect_pair_iou` block by block (``_RECT_BLOCK`` pairs at a time)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 5)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 5)
    if len(a) <= _RECT_BLOCK:
        return _rect_pair_iou(a, b)
    iou, flagged = np.empty(len(a)), np.empty(len(a), dtype=bool)
    for s in range(0, len(a), _RECT_BLOCK):
        iou[s:s + _RECT_BLOCK], flagged[s:s + _RECT_BLOCK] = _rect_pair_iou(a[s:s + _RECT_BLOCK], b[s:s + _RECT_BLOCK])
    return iou, flagged


def _rect_pair_iou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU of pairs of rotated rectangles ``a[k]``, ``b[k]`` (le90 ``(K, 5)``, float64, sides > 0), in numpy.

    The intersection area by Green's theorem: the boundary of ``A & B`` is made of the pieces of ``A``'s
    edges inside ``B`` and of ``B``'s edges inside ``A``, each piece ``[t0, t1]`` of an edge ``c_i -> c_(i+1)``
    contributing ``(t1 - t0) * cross(c_i, c_(i+1)) / 2`` about a common origin (``B``'s centre: each of
    ``B``'s edges then contributes ``(t1 - t0) * w_B * h_B / 4``). Corners are computed in the other
    rectangle's frame from the angle difference and the centres' offset (float64, coordinates of the
    order of the pair's extent), and clipped by its two slabs (:func:`_inside_fraction`). The union uses
    the ``w * h`` areas, as mmcv's kernel. Every step is an exact formula up to float64 rounding (the
    result is within ~1e-14 of the exact IoU for boxes of ordinary proportions), except where an edge of
    one rectangle lies on a boundary line of the other (within ``COINCIDENT_EDGE`` of the pair's extent):
    both rings may then count the shared piece, and the pair is flagged.

    Returns:
        ``iou`` ``(K,)`` and ``flagged`` ``(K,)`` bool (value not to be trusted).
    """
    a = np.ascontiguousarray(np.asarray(a, dtype=np.float64).reshape(-1, 5).T)  # (5, K): rows of one field
    b = np.ascontiguousarray(np.asarray(b, dtype=np.float64).reshape(-1, 5).T)
    ca, sa, cb, sb = np.cos(a[4]), np.sin(a[4]), np.cos(b[4]), np.sin(b[4])
    cd, sd = ca * cb + sa * sb, sa * cb - ca * sb  # cos, sin of theta_a - theta_b
    dx, dy = a[0] - b[0], a[1] - b[1]
    hwa, hha, hwb, hhb = a[2] / 2, a[3] / 2, b[2] / 2, b[3] / 2
    sx, sy = np.array([[-1.0], [1.0], [1.0], [-1.0]]), np.array([[-1.0], [-1.0], [1.0], [1.0]])  # counter-clockwise
    # a's corners in b's frame (relative to b's centre), b's in a's frame (relative to a's centre), (4, K).
    xa, ya = sx * hwa, sy * hha
    pa = (dx * cb + dy * sb) + cd * xa - sd * ya
    qa = (dy * cb - dx * sb) + sd * xa + cd * ya
    xb, yb = sx * hwb, sy * hhb
    pb = (-dx * ca - dy * sa) + cd * xb + sd * yb
    qb = (dx * sa - dy * ca) - sd * xb + cd * yb
    fa = _inside_fraction(pa, qa, hwb, hhb)
    fb = _inside_fraction(pb, qb, hwa, hha)
    term_a = pa * qa[_NEXT_CORNER] - pa[_NEXT_CORNER] * qa  # cross(c_i, c_(i+1)) about b's centre
    inter = 0.5 * np.sum(fa * term_a, axis=0) + np.sum(fb, axis=0) * (hwb * hhb)
    area_a, area_b = a[2] * a[3], b[2] * b[3]
    flagged = np.isnan(inter)  # an edge exactly on a boundary line, parallel to it
    # An edge (half length h) has both ends within tol of a line at an angle phi to it only if
    # h |sin phi| <= tol; the boxes' edges meet each other's lines at angles whose sines are |sd| and |cd|.
    tol = COINCIDENT_EDGE * np.maximum(np.abs(pa).max(axis=0), np.abs(pb).max(axis=0))
    shortest = np.minimum(np.minimum(hwa, hha), np.minimum(hwb, hhb))
    check = np.flatnonzero(np.minimum(np.abs(sd), np.abs(cd)) * shortest <= 2.0 * tol)
    if len(check):
        t = tol[check]
        flagged[check] |= (_on_boundary_line(pa[:, check], qa[:, check], hwb[check], hhb[check], t)
                           | _on_boundary_line(pb[:, check], qb[:, check], hwa[check], hha[check], t))
    inter = np.clip(inter, 0.0, np.minimum(area_a, area_b))
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / (area_a + area_b - inter)
    return iou, flagged
