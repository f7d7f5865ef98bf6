"""torchvision's float32 rotated-IoU kernel, replayed in numpy over pairs of boxes.

``torchvision.ops.box_iou(..., fmt="cxcywhr")`` (the CPU kernel ``box_iou_rotated``, Detectron2's
algorithm, the one mmcv also ships) is the rotated IoU that :func:`mutdet.boxes.rotated_iou` returns,
that rotated NMS has always thresholded and that mmrotate's evaluation matches with. It works in
float32 with fixed tolerances, and on some inputs its value is far from the exact IoU (a vertex lying
within float32 noise of the other box's edge leaves near-duplicate points that its angular sort orders
inconsistently: ``benchmarks/evaluation.py`` has an ordinary 41 x 12 px pair at exact IoU 0.771 that
it scores 0.276, and sub-pixel boxes fail often). A decision that must equal the kernel's on every
input therefore needs the kernel's own value, not the exact one.

:func:`kernel_pair_iou` computes that value without torch: the kernel's steps in the same order, each
arithmetic operation in float32 as the compiled C++ does it (one rounding per operation, no fused
multiply-add; the comparisons with its double tolerances in float64; ``cos``/``sin`` of the angle from
the C library, through :mod:`math`), vectorised over the pairs:

1. the pair's centres are shifted by their midpoint (``(x1 + x2) / 2`` rounded as the kernel rounds it);
   a box of area below ``1e-14`` gives IoU 0;
2. corners; the crossings of every edge of box 1 with every edge of box 2 (the parameters ``t`` of both
   accepted within ``1e-5`` of ``[0, 1]``), then box 1's corners inside box 2, then box 2's inside box 1
   (projections within ``1e-5``), in the kernel's order; fewer than 3 points give 0;
3. the kernel's Graham scan: the lowest point (then leftmost) first, an in-place exchange sort by cross
   product with its ``1e-6`` collinearity tolerance, points within ``1e-8`` (squared) of the first
   skipped, the stack pass that drops non-left turns; the area as the sum of ``|cross|`` of the fan;
4. ``inter / (area1 + area2 - inter)``, clamped to ``[0, 1]``.

The replay is checked bit for bit against the compiled kernel on random, crowded and degenerate pairs
(``tests/test_rotated_iou_kernel.py``, marker ``numerics``: ``make test`` runs it again with other CPU
kernels). A torchvision build whose kernel rounds differently (a compiler that fuses multiply-adds, e.g.
on aarch64, or a changed algorithm) fails that test: it is the guard on the claim.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["KernelBoxes", "kernel_pair_iou"]

F32 = np.float32
_EPS = 1e-5  # the kernel's tolerance on line parameters and projections (a double)
_DEG_TO_RAD = 0.01745329251  # the kernel's constant (not math.pi / 180)
_MAX_POINTS = 24  # 16 crossings + 4 + 4 corners
_PAIR_CHUNK = 65536  # pairs replayed at once (temporaries of a few MB each)


def _below(d: float) -> np.float32:
    """The largest float32 ``c <= d``: for a float32 ``t``, ``t > d`` iff ``t > c`` and ``t <= d`` iff ``t <= c``
    (the kernel compares its floats with double constants; this keeps those comparisons in float32)."""
    c = np.float32(d)
    return np.nextafter(c, np.float32(-np.inf)) if float(c) > d else c


def _above(d: float) -> np.float32:
    """The smallest float32 ``c >= d``: for a float32 ``t``, ``t < d`` iff ``t < c``."""
    c = np.float32(d)
    return np.nextafter(c, np.float32(np.inf)) if float(c) < d else c


_T_LO, _T_HI = _below(-_EPS), _above(1.0 + _EPS)  # t > -EPS, t < 1 + EPS
_PARALLEL = _below(1e-14)  # fabs(det) <= 1e-14
_TINY_AREA = _above(1e-14)  # area < 1e-14
_BASE_MIN = _below(1e-14)  # baseS > 1e-14
_CROSS_NEG, _CROSS_ZERO = _above(-1e-6), _above(1e-6)  # cp < -1e-6, fabs(cp) < 1e-6
_DIST_MIN = _below(1e-8)  # dist > 1e-8
_PROJ_LO = _below(-_EPS)  # projection > -EPS


def _half_cos_sin(degrees: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(float)cos(a * c) * 0.5f`` and the same for ``sin``, per box: the C library's functions on doubles."""
    theta = degrees.astype(np.float64) * _DEG_TO_RAD
    cos = np.fromiter(map(math.cos, theta.tolist()), dtype=np.float64, count=len(theta))
    sin = np.fromiter(map(math.sin, theta.tolist()), dtype=np.float64, count=len(theta))
    return cos.astype(F32) * F32(0.5), sin.astype(F32) * F32(0.5)


def _corners(x, y, w, h, c2, s2) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's ``get_rotated_vertices``: corners ``(4, K)`` x and y, float32, one rounding per operation."""
    sh, cw, ch, sw = s2 * h, c2 * w, c2 * h, s2 * w
    x0, y0 = (x + sh) + cw, (y + ch) - sw
    x1, y1 = (x - sh) + cw, (y - ch) - sw
    two_x, two_y = F32(2) * x, F32(2) * y
    return np.stack([x0, x1, two_x - x0, two_x - x1]), np.stack([y0, y1, two_y - y0, two_y - y1])


def _cross(ax, ay, bx, by):
    return ax * by - bx * ay


def _inside(px, py, qx, qy):
    """``(4, K)``: corners ``(px, py)`` (``(4, K)``) inside the rectangle of corners ``(qx, qy)`` (the
    kernel's test: both projections within ``[-1e-5, |side|^2 + 1e-5]``)."""
    abx, aby = qx[1] - qx[0], qy[1] - qy[0]
    dax, day = qx[0] - qx[3], qy[0] - qy[3]
    ab_ab = (abx * abx + aby * aby).astype(np.float64) + _EPS
    ad_ad = (dax * dax + day * day).astype(np.float64) + _EPS
    apx, apy = px - qx[0], py - qy[0]
    ap_ab = apx * abx + apy * aby
    ap_ad = -(apx * dax + apy * day)
    return ((ap_ab > _PROJ_LO) & (ap_ad > _PROJ_LO) & (ap_ab.astype(np.float64) < ab_ab)
            & (ap_ad.astype(np.float64) < ad_ad))


# Edge pairs in the kernel's loop order: edge i of box 1 (outer) against edge j of box 2 (inner).
_EDGE_I = np.repeat(np.arange(4), 4)
_EDGE_J = np.tile(np.arange(4), 4)
_NEXT = np.array([1, 2, 3, 0])


def _points(x1, y1, x2, y2):
    """The kernel's ``get_intersection_points`` on corners ``(4, K)``: ``(K, 24)`` x, y with the accepted
    points packed to the front in the kernel's order, and their number ``(K,)``."""
    v1x, v1y = x1[_NEXT] - x1, y1[_NEXT] - y1  # (4, K) edge vectors
    v2x, v2y = x2[_NEXT] - x2, y2[_NEXT] - y2
    ax, ay, bx, by = v2x[_EDGE_J], v2y[_EDGE_J], v1x[_EDGE_I], v1y[_EDGE_I]  # (16, K)
    ox, oy = x1[_EDGE_I], y1[_EDGE_I]
    dx, dy = x2[_EDGE_J] - ox, y2[_EDGE_J] - oy
    det = _cross(ax, ay, bx, by)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = _cross(ax, ay, dx, dy) / det
        t2 = _cross(bx, by, dx, dy) / det
        hit = (~(np.abs(det) <= _PARALLEL) & (t1 > _T_LO) & (t1 < _T_HI) & (t2 > _T_LO) & (t2 < _T_HI))
        cross_x, cross_y = ox + bx * t1, oy + by * t1
    ok = np.concatenate([hit, _inside(x1, y1, x2, y2), _inside(x2, y2, x1, y1)])  # (24, K)
    px = np.concatenate([cross_x, x1, x2])
    py = np.concatenate([cross_y, y1, y2])
    # Pack the accepted points to the front, in order (the kernel's ``intersections[num++]``).
    k = ok.shape[1]
    pair, slot = np.nonzero(ok.T)  # row-major over (K, 24): by pair, then by slot
    num = np.bincount(pair, minlength=k)
    at = np.arange(len(pair)) - np.repeat(np.cumsum(num) - num, num)
    packed_x, packed_y = np.zeros((k, _MAX_POINTS), F32), np.zeros((k, _MAX_POINTS), F32)
    packed_x[pair, at], packed_y[pair, at] = px[slot, pair], py[slot, pair]
    return packed_x, packed_y, num


def _hull_area(px: np.ndarray, py: np.ndarray, num: int) -> np.ndarray:
    """The kernel's ``convex_hull_graham`` (shifted to the first point) and ``polygon_area`` for pairs that
    all have ``num`` points: ``(K, num)`` float32 in, ``(K,)`` float32 area out."""
    k = len(px)
    rows = np.arange(k)
    # Step 1: the first point of lowest y, then lowest x (strict comparisons, in index order).
    t = np.zeros(k, np.int64)
    for i in range(1, num):
        ty, tx = py[rows, t], px[rows, t]
        better = (py[:, i] < ty) | ((py[:, i] == ty) & (px[:, i] < tx))
        t = np.where(better, i, t)
    sx, sy = px[rows, t][:, None], py[rows, t][:, None]
    qx, qy = px - sx, py - sy  # step 2
    first_x, first_y = qx[:, 0].copy(), qy[:, 0].copy()  # step 2: swap the start to position 0
    qx[:, 0], qy[:, 0] = qx[rows, t], qy[rows, t]
    qx[rows, t], qy[rows, t] = first_x, first_y
    # Step 3: the kernel's exchange sort, with its tolerance on the cross product.
    dist = qx * qx + qy * qy
    for i in range(1, num - 1):
        for j in range(i + 1, num):
            cp = _cross(qx[:, i], qy[:, i], qx[:, j], qy[:, j])
            swap = (cp < _CROSS_NEG) | ((np.abs(cp) < _CROSS_ZERO) & (dist[:, i] > dist[:, j]))
            if swap.any():
                for arr in (qx, qy, dist):
                    a, b = arr[:, i].copy(), arr[:, j].copy()
                    arr[:, i], arr[:, j] = np.where(swap, b, a), np.where(swap, a, b)
    dist = qx * qx + qy * qy
    # Step 4: the first point after the start that is not (almost) on it.
    far = dist[:, 1:] > _DIST_MIN
    has = far.any(axis=1)
    kk = np.where(has, np.argmax(far, axis=1) + 1, num)
    area = np.zeros(k, F32)
    live = np.flatnonzero(has)
    if len(live) == 0:
        return area
    qx, qy, kk, rows = qx[live], qy[live], kk[live], np.arange(len(live))
    qx[:, 1], qy[:, 1] = qx[rows, kk], qy[rows, kk]
    m = np.full(len(live), 2, np.int64)
    # Step 5: the stack pass (the kernel pops while the turn is not strictly left).
    for i in range(2, num):
        active = i > kk
        if not active.any():
            continue
        xi, yi = qx[:, i], qy[:, i]
        popping = active.copy()
        while True:
            popping &= m > 1
            if not popping.any():
                break
            a, b = np.maximum(m - 2, 0), np.maximum(m - 1, 0)
            ax, ay, bx, by = qx[rows, a], qy[rows, a], qx[rows, b], qy[rows, b]
            q1x, q1y, q2x, q2y = xi - ax, yi - ay, bx - ax, by - ay
            pop = popping & (q1x * q2y >= q2x * q1y)
            m = np.where(pop, m - 1, m)
            popping = pop
        at = np.flatnonzero(active)
        qx[at, m[at]], qy[at, m[at]] = xi[at], yi[at]
        m = np.where(active, m + 1, m)
    # polygon_area: the fan from q[0], |cross| summed in order, then halved.
    acc = np.zeros(len(live), F32)
    for i in range(1, num - 1):
        use = i < m - 1
        if not use.any():
            break
        ax, ay = qx[:, i] - qx[:, 0], qy[:, i] - qy[:, 0]
        bx, by = qx[:, i + 1] - qx[:, 0], qy[:, i + 1] - qy[:, 0]
        acc = np.where(use, acc + np.abs(_cross(ax, ay, bx, by)), acc)
    area[live] = np.where(m > 2, acc / F32(2), F32(0))
    return area


class KernelBoxes:
    """Boxes as the kernel receives them, with each box's ``cos``/``sin`` computed once.

    Args:
        cxcywhr: ``(N, 5)`` torchvision ``CXCYWHR`` (degrees, counter-clockwise), rounded to float32 as
            ``torch.from_numpy(le90_to_cxcywhr(boxes).astype(np.float32))`` gives them.
    """

    def __init__(self, cxcywhr: np.ndarray):
        self.boxes = np.ascontiguousarray(np.asarray(cxcywhr, dtype=np.float32).reshape(-1, 5))
        self.half_cos, self.half_sin = _half_cos_sin(self.boxes[:, 4])
        self.area = self.boxes[:, 2] * self.boxes[:, 3]

    def __len__(self) -> int:
        return len(self.boxes)

    def pair_iou(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """``(K,)`` float32: the kernel's IoU of ``(boxes[i[k]], boxes[j[k]])``, box ``i[k]`` first (the kernel
        is not symmetric in the last bits), ``_PAIR_CHUNK`` pairs at a time."""
        i, j = np.asarray(i, np.int64).reshape(-1), np.asarray(j, np.int64).reshape(-1)
        if len(i) != len(j):
            raise ValueError(f"KernelBoxes.pair_iou: {len(i)} and {len(j)} indices, need pairs")
        out = np.zeros(len(i), F32)
        for s in range(0, len(i), _PAIR_CHUNK):
            out[s:s + _PAIR_CHUNK] = self._pair_iou(i[s:s + _PAIR_CHUNK], j[s:s + _PAIR_CHUNK])
        return out

    def _pair_iou(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        out = np.zeros(len(i), F32)
        a1, a2 = self.area[i], self.area[j]
        live = np.flatnonzero(~((a1 < _TINY_AREA) | (a2 < _TINY_AREA)))  # single_box_iou_rotated's early 0
        if len(live) == 0:
            return out
        i, j, a1, a2 = i[live], j[live], a1[live], a2[live]
        b1, b2 = self.boxes[i], self.boxes[j]
        # The midpoint shift ((float + float) / 2.0, in double), then each centre rounded to float.
        shift_x = (b1[:, 0] + b2[:, 0]).astype(np.float64) / 2.0
        shift_y = (b1[:, 1] + b2[:, 1]).astype(np.float64) / 2.0
        x1, y1 = (b1[:, 0] - shift_x).astype(F32), (b1[:, 1] - shift_y).astype(F32)
        x2, y2 = (b2[:, 0] - shift_x).astype(F32), (b2[:, 1] - shift_y).astype(F32)
        cx1, cy1 = _corners(x1, y1, b1[:, 2], b1[:, 3], self.half_cos[i], self.half_sin[i])
        cx2, cy2 = _corners(x2, y2, b2[:, 2], b2[:, 3], self.half_cos[j], self.half_sin[j])
        px, py, num = _points(cx1, cy1, cx2, cy2)
        inter = np.zeros(len(live), F32)
        for n in np.unique(num[num > 2]):  # pairs with as many points share the loops' bounds
            sel = np.flatnonzero(num == n)
            inter[sel] = _hull_area(px[sel, :n], py[sel, :n], int(n))
        base = (a1 + a2) - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(base > _BASE_MIN, inter / base, F32(0))
        out[live] = np.clip(iou, F32(0), F32(1))
        return out


def kernel_pair_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """torchvision's rotated IoU of the pairs ``(boxes1[k], boxes2[k])``, as its CPU kernel computes it.

    Args:
        boxes1, boxes2: ``(K, 5)`` ``CXCYWHR`` (degrees, counter-clockwise), rounded to float32 as the
            kernel receives them (:func:`mutdet.boxes.le90_to_cxcywhr`, then float32).
    Returns:
        ``(K,)`` float32, equal bit for bit to ``box_iou_rotated(boxes1[k:k+1], boxes2[k:k+1])[0, 0]``.
    """
    b1 = np.asarray(boxes1, dtype=np.float32).reshape(-1, 5)
    b2 = np.asarray(boxes2, dtype=np.float32).reshape(-1, 5)
    if len(b1) != len(b2):
        raise ValueError(f"kernel_pair_iou: {len(b1)} and {len(b2)} boxes, need pairs")
    k = len(b1)
    return KernelBoxes(np.concatenate([b1, b2])).pair_iou(np.arange(k), np.arange(k, 2 * k))
