"""Rotated VOC average precision under two protocols, each following its reference tool.

``protocol="dota_devkit"``: the DOTA devkit's ``dota_evaluation_task1.py`` (what the DOTA server scores)
----------------------------------------------------------------------------------------------------

* Ground truth: each label's own quadrilateral, float64, as written (:class:`ImageAnnotations`
  ``polygons``); every object counts, difficult ones included.
* Detections: the Task1 polygon as given (``"polygons"``), or the four corners of the le90 box
  (:func:`mutdet.boxes.le90_to_polygon`, float64).
* IoU: the devkit's ``polyiou`` formula (:mod:`mutdet.evaluation.polygons`): for simple quadrilaterals,
  convex or concave, the exact polygon IoU; for self-intersecting or degenerate ones, the devkit's signed
  winding-number formula (see below). Computed with shapely 2 (GEOS, float64), vectorised over candidate
  pairs (convex pairs far from every threshold are decided in numpy first: "Speed" below).
  Candidates: the image's objects of the detection's class whose axis-aligned bounds meet the
  detection's (a numpy sweep over all objects, :func:`~mutdet.evaluation.polygons.candidate_pairs`).
  The devkit's own pre-filter (axis-aligned overlap with its ``+ 1`` pixel convention) keeps a superset
  of ours; a pair that either leaves out has intersection 0, hence IoU 0, below every threshold, so no
  match changes. Pairs whose IoU cannot exceed the smallest
  threshold (upper bound ``m / (A_d + A_g - m)`` with ``m`` the smallest of both areas and their
  bounds' overlap area, minus a 1e-9 margin) are not computed either, for simple polygons only; this
  cannot change a match (a detection with no IoU above the threshold is a false positive whichever
  object has its best IoU).
* Best match: per detection, the object with the largest IoU, the first in label-file order among
  equal IoUs (``np.argmax``); difficult objects take part.
* Decision, IoU strictly greater than the threshold (``ovmax > ovthresh``): if the best object is
  difficult (``difficult`` 1 *or* 2, any non-zero value), the detection is neither TP nor FP; else the
  first detection in rank order to claim it is a TP, later ones FP. IoU <= threshold: FP.
* Positives: non-difficult objects (``npos``). Ranking: all images' detections of the class by
  descending score. Precision ``tp / max(tp + fp, float64 eps)`` and recall ``tp / npos`` along the
  ranking (ignored detections keep their slot), float64; AP by the devkit's ``voc_ap``: VOC07 11-point
  (default) or all-points.
* Not followed, by design: a class without positives has AP ``None`` and is left out of the mean (the
  devkit divides by zero and averages the result in); detections on an image without ground truth raise
  (the devkit's ``KeyError``).
* Degenerate labels: the label readers (:mod:`mutdet.io.annotations`) already refuse self-intersecting
  and degenerate quadrilaterals (an error, or skipped and listed under ``on_bad_object: skip``), so the
  evaluate stage never gives any here. This function takes them anyway and computes what the devkit
  computes: ``inter`` is the integral of the product of the two rings' winding numbers (orientation made
  positive; a polygon with signed area exactly 0 keeps its order, where the devkit decides by the sign
  of its rounding error), the union uses the absolute shoelace areas. So a bow tie's lobes count with
  opposite signs and its IoU can be negative or above 1; a polygon of area 0 has IoU 0 with everything
  (a never-matched positive, as in the devkit). The result's ``"polygons"`` counts them.

``protocol="mmrotate"``: mmrotate's ``eval_rbbox_map`` (what ARS-DETR and MutDet report for DIOR-R)
----------------------------------------------------------------------------------------------------

* Ground truth as mmrotate's DOTA / DIOR dataset classes build it: each label polygon in float32 ->
  OpenCV ``minAreaRect`` -> le90 box (``poly2obb_np``, float32); an object whose rectangle has a side
  below 2 pixels is **dropped** (``poly2obb_np`` returns nothing, the loader skips the line); an object
  whose ``difficult`` exceeds ``difficulty_threshold`` is **dropped** too (the ``difficulty`` option of
  mmrotate's ``DOTADataset``; default 100: nothing is dropped, difficult objects are ordinary
  positives; its ``DIORDataset`` does not read ``<difficult>`` at all, which is the default). Dropped
  means gone, not ignored: no ignore list is passed (``bboxes_ignore`` is empty), so
  a detection on a dropped object is an ordinary FP unless it matches another object.
* Detections: the le90 box (``"boxes"``), or the minimum-area rectangle of the given polygon.
* IoU: rotated-box IoU as the float32 kernel gives it (torchvision's ``box_iou_rotated``, the same
  algorithm as mmcv's, see :func:`mutdet.boxes.rotated_iou`), on boxes rounded to float32 as mmrotate
  stores them; pairs whose axis-aligned hulls do not overlap have IoU 0 and are skipped. Comparisons
  with a threshold and choices of the best object are the kernel's wherever the kernel is within its
  rounding error of the exact IoU (see "Speed"; a kernel failure far from the exact value, as in the
  benchmark's hand case 0.771 vs 0.276, is decided by the exact value).
* Matching per image and class (``tpfp_default``): detections in descending score; each takes its
  best-IoU object among all of the image's kept objects of the class (the first among equal IoUs); TP if
  IoU **>=** the threshold and the object is not yet covered, FP otherwise. There are no ignored
  detections. Then all images' TP/FP of the class are ranked by descending score.
* Positives: the kept objects. Recall ``tp / max(npos, eps)``; precision ``tp / max(tp + fp, eps)`` in
  float32 (mmrotate's TP/FP arrays are float32), AP by mmdet's ``average_precision`` accumulated in
  float32: ``11points`` (VOC07, default) or ``area`` (all points); the mean over classes with positives,
  in float32 as ``np.mean`` of float32 values gives it.
* Not followed: mmrotate's ``DOTADataset`` leaves out images whose label file is empty (size 0); here
  every image of the ground truth counts. A class without positives has AP ``None`` (mmrotate: 0, left
  out of the mean too), and the mean when no class has positives is ``None`` (mmrotate: 0.0).

Both protocols
--------------

* Equal scores: both references sort with ``np.argsort(-score)``, which is not stable (its order among
  equal scores depends on the array's length and contents). Here the ranking is a stable sort by
  descending score, then image id (string order), then input order (row of the detections table, or
  position in the class's arrays); within an image, mmrotate's matching order is the same.
* ``iou_thresholds`` are each in ``(0, 1)``; each gives ``AP<round(100 t)>``, and all of 0.50:0.05:0.95
  together add ``AP50:95``.

Speed (no rule above depends on it; each shortcut is exact for the decisions it takes):

* The best IoU and its argmax are computed once per detection for all thresholds (candidate pairs by
  spatial pruning), and the greedy pass is vectorised: an object is claimed by the first ranked hit on
  it that is not ignored.
* ``dota_devkit``: pairs of strictly convex quadrilaterals (every turn of the ring the same sign, with
  a margin) get their IoU in numpy (Green's theorem over each ring's edges clipped by the other's
  half-planes), with a bound far above its rounding error and GEOS's
  (:func:`~mutdet.evaluation.polygons.convex_pair_iou`; an infinite bound where an edge lies on a line
  of the other quad's edges). A detection is decided from these values only when its best IoU is
  further than that bound from every threshold and ahead of every other object's by more than both
  bounds (or when all its IoUs are below every threshold); any other detection, and every detection
  with a pair that is not convex, is computed by GEOS (``candidate_pairs["computed_by_geos"]`` counts
  those pairs). So every match and every comparison is the one GEOS's IoU gives. Convexity also stands
  in for GEOS's ``is_simple`` / ``is_valid`` checks.
* ``mmrotate``: the same scheme with the float32 kernel as the judge. Each candidate pair (hulls
  meeting, IoU upper bound not below the smallest threshold by more than the margin) gets its IoU in
  numpy (:func:`~mutdet.evaluation.polygons.rect_pair_iou`, float64, exact up to rounding) and a
  margin ``1e-4 L^2 / max(area) + 1e-6`` (``L`` the pair's extent) far above the kernel's distance
  from the exact IoU (its ``1e-5`` clipping tolerances and float32 rounding; on the DOTA-val-sized
  benchmark it stays under ``3.3e-6 L^2 / max(area)``). A detection is decided in numpy only when no
  threshold lies within the margin of its best IoU and that object leads every other by more than
  both margins (or all its IoUs are below every threshold); the others (and any with a pair whose
  edges lie on one line, or a side of length 0) have their pairs computed by the kernel, each pair
  moved so that the detection's centre is the origin before the float32 rounding, and the kernel's
  values decide (``candidate_pairs["computed_by_kernel"]``). A detection with no object nearby keeps
  ``best`` 0, a false positive at every threshold.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

import numpy as np

from mutdet.boxes import le90_to_cxcywhr, le90_to_polygon, polygon_to_le90
from mutdet.evaluation.polygons import (candidate_pairs, convex_pair_iou, mmrotate_label_boxes, pair_iou, quad_pieces,
                                        quad_shapes, quad_simple_zero_area, rect_pair_iou)
from mutdet.rotated_iou_kernel import kernel_pair_iou

__all__ = ["PROTOCOLS", "VOC07_RECALL_POINTS", "evaluate_detections", "voc_ap", "mmdet_average_precision",
           "ap_key"]

PROTOCOLS = ("dota_devkit", "mmrotate")

# The devkit's 11 recall points, as ``np.arange`` produces them (0.30000000000000004, ...): a recall of
# exactly 0.3 does *not* reach the 4th point. Kept bit-identical on purpose (mmdet's
# ``np.arange(0, 1 + 1e-3, 0.1)`` gives the same 11 values).
VOC07_RECALL_POINTS = np.arange(0.0, 1.1, 0.1)

# Scale of the bound on the rotated-IoU kernel's distance from the exact IoU (mmrotate protocol,
# :func:`_kernel_margin`); ``inf`` sends every detection to the kernel.
KERNEL_MARGIN_SCALE = 1.0

# Margin under which a pair's IoU upper bound lets the dota_devkit protocol skip it (the bound is computed
# in float64 and the IoU by GEOS; both are far more precise than this).
_BOUND_MARGIN = 1e-9

# Pairs clipped in numpy at once by the dota_devkit protocol (bounds the temporary arrays to a few MB each).
_CLIP_CHUNK = 4096


def ap_key(threshold: float) -> str:
    """Name of the AP at one IoU threshold: 0.5 -> ``"AP50"``, 0.75 -> ``"AP75"``."""
    return f"AP{round(threshold * 100)}"


def _point_maxima(recall: np.ndarray, precision: np.ndarray) -> list:
    """``precision[recall >= t].max()`` for each VOC07 recall point ``t`` (None where no recall reaches it).

    For a non-decreasing recall (a ranking's), ``recall >= t`` is a suffix: the value is the suffix
    maximum at its first index (the same element, so the same value); otherwise each mask is formed."""
    if len(recall) and np.all(recall[1:] >= recall[:-1]):
        suffix = np.maximum.accumulate(precision[::-1])[::-1]
        first = np.searchsorted(recall, VOC07_RECALL_POINTS, side="left")
        return [suffix[i] if i < len(recall) else None for i in first]
    out = []
    for t in VOC07_RECALL_POINTS:
        reached = recall >= t
        out.append(precision[reached].max() if reached.any() else None)
    return out


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = True) -> float:
    """VOC AP of one precision-recall curve, as the devkit's ``voc_ap`` (float64).

    Args:
        recall, precision: ``(D,)`` along the ranked detections.
        use_07_metric: 11-point interpolation (VOC07) if true, else area under the monotone envelope
            at every recall change (VOC2010+).
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        ap = 0.0
        for top in _point_maxima(recall, precision):
            ap += (top if top is not None else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope, non-increasing in recall
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def mmdet_average_precision(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = True) -> float:
    """AP as mmdet's ``average_precision`` computes it for mmrotate, with its float32 result.

    Args:
        recall: ``(D,)`` float64; precision: ``(D,)`` float32 (mmrotate's dtypes).
        use_07_metric: ``"11points"`` mode (each point's precision added to a float32 sum, then divided
            by 11 in float32) if true, else ``"area"`` (float64 area under the envelope, rounded to
            float32).
    Returns:
        The float32 value as a Python float.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float32)
    if use_07_metric:
        ap = np.float32(0.0)
        for top in _point_maxima(recall, precision):
            ap = np.float32(ap + (top if top is not None else np.float32(0.0)))
        return float(np.float32(ap / np.float32(11)))
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision.astype(np.float64), [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.float32(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])))


# ---------------------------------------------------------------------------------------------- inputs

def _check_boxes(boxes: np.ndarray, what: str) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    bad = ~np.isfinite(boxes).all(axis=1) | (boxes[:, 2] < 0) | (boxes[:, 3] < 0)
    if bad.any():
        raise ValueError(f"{what}: box {int(np.argmax(bad))} is not finite or has a negative side: {boxes[bad][0]}")
    return boxes


def _check_polygons(polygons: np.ndarray, what: str) -> np.ndarray:
    polygons = np.asarray(polygons, dtype=np.float64).reshape(-1, 8)
    bad = ~np.isfinite(polygons).all(axis=1)
    if bad.any():
        raise ValueError(f"{what}: polygon {int(np.argmax(bad))} is not finite: {polygons[bad][0]}")
    return polygons


def _ground_truth(gt: Mapping, image_ids: list[str], num_classes: int):
    """Concatenate the objects of every image: image index, class, polygon ``(N, 8)``, difficult value."""
    anns = [gt[image_id] for image_id in image_ids]
    labels = [np.asarray(ann.labels, dtype=np.int64).reshape(-1) for ann in anns]
    polygons = [np.asarray(ann.polygons, dtype=np.float64).reshape(-1, 8) for ann in anns]
    difficult = [np.asarray(ann.difficult).reshape(-1) for ann in anns]
    counts = np.array([len(x) for x in labels], dtype=np.int64)
    for image_id, lab, pol, dif in zip(image_ids, labels, polygons, difficult):
        if not (len(lab) == len(pol) == len(dif)):
            raise ValueError(f"ground truth of {image_id!r}: {len(pol)} polygons, {len(lab)} labels, "
                             f"{len(dif)} difficult flags")
    cls = np.concatenate([np.zeros(0, np.int64), *labels])
    bad = (cls < 0) | (cls >= num_classes)
    if bad.any():
        i = int(np.searchsorted(np.cumsum(counts), int(np.argmax(bad)), side="right"))
        raise ValueError(f"ground truth of {image_ids[i]!r}: label out of range [0, {num_classes}): {labels[i]}")
    img = np.repeat(np.arange(len(image_ids), dtype=np.int64), counts)
    diff = np.concatenate([np.zeros(0, np.int64), *(d.astype(np.int64) for d in difficult)])
    return img, cls, _check_polygons(np.concatenate([np.zeros((0, 8)), *polygons]), "ground truth"), diff


class _Detections:
    """Flattened detections: image ids, class indices, scores, input order, and le90 boxes and/or polygons."""

    def __init__(self, image_ids, cls, scores, order, boxes, polygons):
        self.image_ids, self.cls, self.scores, self.order = image_ids, cls, scores, order
        # (D, 5) / (D, 8), NaN rows where not given; None where no detection gives that form
        self._boxes, self._polygons = boxes, polygons

    def polygons(self) -> np.ndarray:
        """Each detection's polygon: as given, else the le90 box's corners."""
        if self._polygons is None:
            return le90_to_polygon(self._boxes)
        out = self._polygons.copy()
        missing = np.isnan(out[:, 0])
        if missing.any():
            out[missing] = le90_to_polygon(self._boxes[missing])
        return out

    def boxes(self) -> np.ndarray:
        """Each detection's le90 box: as given, else the polygon's minimum-area rectangle."""
        if self._boxes is None:
            return polygon_to_le90(self._polygons)
        out = self._boxes.copy()
        missing = np.isnan(out[:, 0])
        if missing.any():
            out[missing] = polygon_to_le90(self._polygons[missing])
        return out

    def given_polygons(self) -> np.ndarray:
        """The polygons given as such ``(P, 8)``."""
        if self._polygons is None:
            return np.zeros((0, 8))
        return self._polygons[~np.isnan(self._polygons[:, 0])]


def _detections(detections, classes: Sequence[str]) -> _Detections:
    """Flatten either input form (see :func:`evaluate_detections`)."""
    pa = sys.modules.get("pyarrow")  # not imported: the input cannot be a pyarrow Table
    if pa is not None and isinstance(detections, pa.Table):
        for name in ("id", "class_id", "score", "cx", "cy", "w", "h", "theta"):
            if name not in detections.column_names:
                raise ValueError(f"detections table: missing column {name!r}")
        image_ids = np.asarray(detections.column("id").to_pylist(), dtype=object)
        cls = detections.column("class_id").to_numpy().astype(np.int64)
        if len(cls) and (cls.min() < 0 or cls.max() >= len(classes)):
            raise ValueError(f"detections table: class_id out of range [0, {len(classes)})")
        if "class_name" in detections.column_names:
            names = np.asarray(detections.column("class_name").to_pylist(), dtype=object)
            wrong = np.flatnonzero(names != np.asarray(classes, dtype=object)[cls])
            if len(wrong):
                r = int(wrong[0])
                raise ValueError(f"detections table row {r}: class_id {cls[r]} is {classes[cls[r]]!r} in the "
                                 f"class list but the row says {names[r]!r}")
        scores = detections.column("score").to_numpy().astype(np.float64)
        boxes = _check_boxes(np.stack([detections.column(c).to_numpy().astype(np.float64)
                                       for c in ("cx", "cy", "w", "h", "theta")], axis=1), "detections")
        polygons = None  # a table has le90 boxes only
        order = np.arange(len(cls))
    else:
        unknown = [c for c in detections if c not in classes]
        if unknown:
            raise ValueError(f"detections for unknown classes {unknown} (classes: {list(classes)})")
        parts = []
        for c, name in enumerate(classes):
            if name not in detections:
                continue
            d = detections[name]
            if "boxes" not in d and "polygons" not in d:
                raise ValueError(f"detections of {name!r}: need 'boxes' (le90) or 'polygons'")
            ids = np.asarray(d["image_ids"], dtype=object).reshape(-1)
            sc = np.asarray(d["scores"], dtype=np.float64).reshape(-1)
            boxes = _check_boxes(d["boxes"], f"detections of {name!r}") if "boxes" in d else None
            polys = _check_polygons(d["polygons"], f"detections of {name!r}") if "polygons" in d else None
            n_boxes = len(ids) if boxes is None else len(boxes)
            n_polys = len(ids) if polys is None else len(polys)
            if not (len(ids) == len(sc) == n_boxes == n_polys):
                raise ValueError(f"detections of {name!r}: {len(ids)} image ids, {len(sc)} scores, "
                                 f"{n_boxes} boxes, {n_polys} polygons")
            parts.append((ids, np.full(len(ids), c, dtype=np.int64), sc, np.arange(len(ids)), boxes, polys))
        if not parts:
            parts = [(np.zeros(0, object), np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64),
                      np.zeros((0, 5)), np.zeros((0, 8)))]
        image_ids, cls, scores, order = (np.concatenate([p[k] for p in parts]) for k in range(4))

        def joined(k: int, width: int):  # one form of every class (NaN rows where a class lacks it), or None
            if all(p[k] is None for p in parts):
                return None
            return np.concatenate([np.full((len(p[0]), width), np.nan) if p[k] is None else p[k] for p in parts])

        boxes, polygons = joined(4, 5), joined(5, 8)
    if not np.isfinite(scores).all():
        raise ValueError(f"detections: non-finite score at position {int(np.argmin(np.isfinite(scores)))}")
    return _Detections(image_ids, cls, scores, order, boxes, polygons)


# --------------------------------------------------------------------------------------------- matching

def _first_per_group(group: np.ndarray, value: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """Index of the largest ``value`` per ``group`` (the smallest ``tie`` among equal values), groups ascending."""
    order = np.lexsort((tie, -value, group))
    return order[np.r_[True, group[order][1:] != group[order][:-1]]]


def _rank_order(cls: np.ndarray, score: np.ndarray, img: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``np.lexsort((order, img, -score, cls))``: by class, then descending score, image index, input order.

    Sorted by score (quicksort), then by class (stable); only the runs of equal (class, score) are then
    sorted by image and input order, in place (the result is the lexsort's, which has no ties left)."""
    by_score = np.argsort(-score)
    out = by_score[np.argsort(cls[by_score], kind="stable")]
    c, v = cls[out], score[out]
    same = (c[1:] == c[:-1]) & (v[1:] == v[:-1])
    if same.any():
        tied = np.flatnonzero(np.r_[same, False] | np.r_[False, same])  # positions in a run of equal keys
        run = np.cumsum(np.r_[True, ~same])[tied]
        rows = out[tied]
        out[tied] = rows[np.lexsort((rows, order[rows], img[rows], run))]  # rows: lexsort is stable
    return out


def _first_max_in_runs(value: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Index of the first largest ``value`` in each run ``value[starts[i]:starts[i + 1]]`` (finite values):
    :func:`_first_per_group` for runs of consecutive rows whose ``tie`` ascends within each run."""
    lengths = np.diff(np.r_[starts, len(value)])
    at_max = np.flatnonzero(value == np.repeat(np.maximum.reduceat(value, starts), lengths))
    run_of = np.searchsorted(starts, at_max, side="right") - 1
    return at_max[np.r_[True, run_of[1:] != run_of[:-1]]]


def _best_devkit(gt_polys, gt_key, det_polys, det_key, thresholds):
    """dota_devkit: best polygon IoU and its first argmax (index into the ground truth) per detection.

    IoU of a pair of strictly convex quads is first computed in numpy (:func:`convex_pair_iou`, with a
    bound on how far it can be from GEOS's value). A detection whose candidate pairs are all such pairs
    is decided from these values when no threshold lies within the bound of its best IoU and its best
    object leads every other by more than both bounds (or all its IoUs are below every threshold): GEOS
    would give the same match and the same comparisons. Every other detection's pairs go to GEOS
    (:func:`pair_iou`), so each decision is GEOS's.

    Returns ``best`` (0 where there is no candidate), ``arg`` (-1 there), the polygon statistics and the
    pair counts.
    """
    min_threshold = min(thresholds)
    g, d = quad_shapes(gt_polys), quad_shapes(det_polys)
    g_simple, d_simple = g.simple(), d.simple()
    idet, igt = candidate_pairs(d.lo, d.hi, det_key, g.lo, g.hi, gt_key)
    # Upper bound of the IoU of simple pairs: the intersection is at most the smaller area and the overlap
    # of the bounds; the IoU grows with the intersection.
    overlap = np.prod(np.clip(np.minimum(d.hi[idet], g.hi[igt]) - np.maximum(d.lo[idet], g.lo[igt]), 0, None), axis=1)
    m = np.minimum(np.minimum(d.area[idet], g.area[igt]), overlap)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = m / (d.area[idet] + g.area[igt] - m)
    skip = d_simple[idet] & g_simple[igt] & (bound < min_threshold - _BOUND_MARGIN)
    idet, igt = idet[~skip], igt[~skip]
    n_det = len(det_polys)
    best = np.zeros(n_det)
    arg = np.full(n_det, -1, dtype=np.int64)

    # numpy IoU for detections whose pairs are all convex-convex.
    not_convex = np.bincount(idet[~(d.convex[idet] & g.convex[igt])], minlength=n_det) > 0
    fast = ~not_convex[idet]
    fi, fg = idet[fast], igt[fast]
    iou = np.empty(len(fi))
    margin = np.empty(len(fi))
    for s in range(0, len(fi), _CLIP_CHUNK):
        iou[s:s + _CLIP_CHUNK], margin[s:s + _CLIP_CHUNK] = convex_pair_iou(d, g, fi[s:s + _CLIP_CHUNK],
                                                                            fg[s:s + _CLIP_CHUNK])
    geos_det = not_convex.copy()
    if len(fi):
        starts = np.flatnonzero(np.r_[True, fi[1:] != fi[:-1]])  # fi is sorted (candidate_pairs order)
        # best pair of each detection with pairs, detections ascending (fg ascends within a detection)
        top = _first_max_in_runs(iou, starts) if np.isfinite(iou).all() else _first_per_group(fi, iou, fg)
        dets_f = fi[top]
        hi = iou + margin
        max_hi = np.maximum.reduceat(hi, starts)
        hi_others = hi.copy()
        hi_others[top] = -np.inf
        others = np.maximum.reduceat(hi_others, starts)
        lo_b, hi_b = iou[top] - margin[top], iou[top] + margin[top]
        clear = np.ones(len(top), dtype=bool)
        for t in thresholds:
            clear &= (lo_b > t) | (hi_b < t)
        decided = (max_hi < min_threshold) | (clear & (others < lo_b))
        best[dets_f[decided]] = iou[top[decided]]
        arg[dets_f[decided]] = fg[top[decided]]
        geos_det[dets_f[~decided]] = True

    # GEOS for the rest, on pieces of only the polygons involved.
    slow = geos_det[idet]
    si, sg = idet[slow], igt[slow]
    if len(si):
        ud, di = np.unique(si, return_inverse=True)
        ug, gi = np.unique(sg, return_inverse=True)
        giou = pair_iou(quad_pieces(det_polys[ud]), quad_pieces(gt_polys[ug]), di, gi)
        first = _first_per_group(si, giou, sg)
        best[si[first]] = giou[first]
        arg[si[first]] = sg[first]
    stats = {"gt_non_simple": int(np.sum(~g_simple & ~g.zero_area)), "gt_zero_area": int(np.sum(g.zero_area)),
             "detections_non_simple": int(np.sum(~d_simple & ~d.zero_area)),
             "detections_zero_area": int(np.sum(d.zero_area))}
    pairs = {"computed": int(len(idet)), "skipped_by_bound": int(skip.sum()), "computed_by_geos": int(len(si))}
    return best, arg, stats, pairs


def _le90_bounds(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned hull ``(lo, hi)``, each ``(N, 2)`` (x, y), of le90 boxes ``(N, 5)``."""
    c, s = np.abs(np.cos(boxes[:, 4])), np.abs(np.sin(boxes[:, 4]))
    hw, hh = boxes[:, 2] / 2, boxes[:, 3] / 2
    ext = np.stack([hw * c + hh * s, hw * s + hh * c], axis=1)
    return boxes[:, :2] - ext, boxes[:, :2] + ext


def _kernel_pair_iou(det_box: np.ndarray, gt_box: np.ndarray, idet: np.ndarray, igt: np.ndarray) -> np.ndarray:
    """The rotated-IoU kernel's float32 IoU ``(K,)`` of the pairs ``(det_box[idet[k]], gt_box[igt[k]])`` (le90).

    Each pair is moved so that its detection's centre is the origin, then rounded to float32 (the
    difference of two float32 centres of ordinary magnitudes is exact in float64; its float32 rounding is
    ~6e-8 of the pair's extent: float32 stays precise on large images, as the kernel itself centres a
    pair on its midpoint). The value is the kernel's bit for bit, computed by its numpy replay
    (:func:`mutdet.rotated_iou_kernel.kernel_pair_iou`, checked against the compiled kernel in
    ``tests/test_rotated_iou_kernel.py``) over the pairs only: evaluation loads neither torch nor
    torchvision.
    """
    if len(idet) == 0:
        return np.zeros(0)
    det_cx, gt_cx = le90_to_cxcywhr(det_box[idet]), le90_to_cxcywhr(gt_box[igt])
    gt_cx[:, :2] -= det_cx[:, :2]  # the angle is left alone; the detection's own centre becomes exactly 0
    det_cx[:, :2] = 0.0
    return kernel_pair_iou(det_cx.astype(np.float32), gt_cx.astype(np.float32)).astype(np.float64)


def _kernel_margin(extent: np.ndarray, da: np.ndarray, ga: np.ndarray) -> np.ndarray:
    """Bound ``(K,)`` on how far the rotated-IoU kernel's float32 value of each pair (as :func:`_kernel_pair_iou`
    computes it) can be from the exact IoU of the (float32-valued) boxes, times ``KERNEL_MARGIN_SCALE``.

    With ``L`` (``extent``) the extent of the pair's hulls and ``u`` the larger box area (``da``, ``ga``;
    at most the union): ``1e-4 L^2 / u + 1e-6``. The kernel's own tolerances (``1e-5`` on its clipping
    parameters) move the intersection by at most about ``1e-5 L^2``; float32 rounding of the relative
    centres, sizes and angles (in degrees), and of the kernel's arithmetic on coordinates of size ``L``,
    by a few ``1e-7 L^2``; on the DOTA-val-sized benchmark the kernel stays within ``3.3e-6 L^2 / u`` of
    the exact IoU. A box with a side of length 0 gets an infinite margin (the kernel decides).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        margin = 1e-4 * extent * extent / np.maximum(da, ga) + 1e-6
    return KERNEL_MARGIN_SCALE * np.where((da > 0) & (ga > 0), margin, np.inf)


def _best_mmrotate(gt_box, gt_key, det_box, det_key, thresholds):
    """Best rotated IoU and its first argmax (index into ``gt_box``) per detection, with the decisions of
    the rotated-IoU kernel (:func:`_kernel_pair_iou`).

    Candidate pairs: the detection's and the object's axis-aligned hulls meet (same image and class:
    :func:`~mutdet.evaluation.polygons.candidate_pairs`; further apart the IoU is 0); a pair whose IoU
    upper bound (from the areas and the hulls' overlap, as in the dota_devkit protocol) is below the
    smallest threshold by more than its kernel margin is left out. The others get their IoU in numpy
    (:func:`~mutdet.evaluation.polygons.rect_pair_iou`, float64, within ~1e-14 of the exact value) and
    a bound :func:`_kernel_margin` on the kernel's distance from it. A detection is decided here when no
    threshold lies within the margin of its best IoU and that object leads every other by more than both
    margins (or when all its IoUs are below the smallest threshold by more than their margins): the
    kernel would give the same match and the same comparisons. Every other detection (also any with a
    flagged pair: an edge on the other box's boundary line, or a side of length 0) has its kept pairs
    computed by the kernel, whose float32 values decide, the first object in label order among equal
    values taking the match.

    Returns ``best`` (0 where there is no candidate), ``arg`` (-1 there) and the pair counts
    (``computed``, ``skipped_by_bound``, ``computed_by_kernel``).
    """
    n_det = len(det_box)
    best = np.zeros(n_det)
    arg = np.full(n_det, -1, dtype=np.int64)
    if n_det == 0 or len(gt_box) == 0:
        return best, arg, {"computed": 0, "skipped_by_bound": 0, "computed_by_kernel": 0}
    min_threshold = min(thresholds)
    det_lo, det_hi = _le90_bounds(det_box)
    gt_lo, gt_hi = _le90_bounds(gt_box)
    idet, igt = candidate_pairs(det_lo, det_hi, det_key, gt_lo, gt_hi, gt_key)
    # Per pair, on 1-D arrays: the hulls' overlap and union extents, the areas.
    span, overlap = np.zeros(len(idet)), np.ones(len(idet))
    for axis in (0, 1):
        d_lo, d_hi, g_lo, g_hi = det_lo[idet, axis], det_hi[idet, axis], gt_lo[igt, axis], gt_hi[igt, axis]
        overlap *= np.maximum(np.minimum(d_hi, g_hi) - np.maximum(d_lo, g_lo), 0.0)
        span = np.maximum(span, np.maximum(d_hi, g_hi) - np.minimum(d_lo, g_lo))
    da, ga = (det_box[:, 2] * det_box[:, 3])[idet], (gt_box[:, 2] * gt_box[:, 3])[igt]
    margin = _kernel_margin(span, da, ga)
    m = np.minimum(np.minimum(da, ga), overlap)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = m / (da + ga - m)
    skip = bound < min_threshold - margin  # False where the margin is inf (a side of length 0)
    idet, igt, margin = idet[~skip], igt[~skip], margin[~skip]
    iou, flagged = rect_pair_iou(det_box[idet], gt_box[igt])
    margin[flagged | ~np.isfinite(iou)] = np.inf
    iou = np.where(np.isfinite(iou), iou, 0.0)
    kernel_det = np.zeros(n_det, dtype=bool)
    if len(idet):
        starts = np.flatnonzero(np.r_[True, idet[1:] != idet[:-1]])  # idet is sorted (candidate_pairs order)
        top = _first_max_in_runs(iou, starts)  # best pair of each detection with pairs (igt ascends within one)
        dets = idet[top]
        hi = iou + margin
        max_hi = np.maximum.reduceat(hi, starts)
        hi_others = hi.copy()
        hi_others[top] = -np.inf
        others = np.maximum.reduceat(hi_others, starts)
        lo_b, hi_b = iou[top] - margin[top], iou[top] + margin[top]
        clear = np.ones(len(top), dtype=bool)
        for t in thresholds:
            clear &= (lo_b > t) | (hi_b < t)
        decided = (max_hi < min_threshold) | (clear & (others < lo_b))
        best[dets[decided]] = iou[top[decided]]
        arg[dets[decided]] = igt[top[decided]]
        kernel_det[dets[~decided]] = True
    # The kernel for the others, on their pairs that the bound kept (a pair left out has a kernel IoU
    # below every threshold: it can be neither a hit nor the best of a hit).
    by_kernel = kernel_det[idet]
    ki, kg = idet[by_kernel], igt[by_kernel]
    if len(ki):
        kiou = _kernel_pair_iou(det_box, gt_box, ki, kg)
        first = _first_per_group(ki, kiou, kg)  # first maximum: label-file order among equal IoUs
        best[ki[first]] = kiou[first]
        arg[ki[first]] = kg[first]
    return best, arg, {"computed": int(len(idet)), "skipped_by_bound": int(skip.sum()),
                       "computed_by_kernel": int(len(ki))}


# ------------------------------------------------------------------------------------------------- main

def evaluate_detections(gt: Mapping, detections, classes: Sequence[str], *,
                        iou_thresholds: Sequence[float] = (0.5, 0.75), use_07_metric: bool = True,
                        protocol: str = "dota_devkit", difficulty_threshold: int = 100) -> dict:
    """Rotated VOC AP per class at each IoU threshold, under one protocol (rules: module docstring).

    Args:
        gt: image id -> ground truth of every evaluated image (images without objects included), each
            with ``polygons`` ``(N, 8)`` (the label quadrilaterals as written, full-image pixels),
            ``labels`` ``(N,)`` indices into ``classes`` and ``difficult`` ``(N,)`` integers (0 normal;
            DOTA 1 difficult, 2 cut by tiling), e.g. :class:`mutdet.io.annotations.ImageAnnotations`.
        detections: either a ``detections`` artefact table (columns ``id`` = image id, ``class_id``,
            ``score``, le90 ``cx cy w h theta`` in full-image pixels; ``class_name``, if present, must
            agree with ``classes``), or a mapping class name -> ``{"image_ids": (D,), "scores": (D,),
            "boxes": (D, 5) le90}`` and/or ``"polygons": (D, 8)`` (Task1 quadrilaterals, ``x1 y1 ... x4
            y4``); missing classes have no detections. With both keys, ``dota_devkit`` uses the polygons
            and ``mmrotate`` the boxes; with one, the other is derived (le90 corners; minimum-area
            rectangle).
        classes: class names; label / ``class_id`` ``k`` is ``classes[k]``.
        iou_thresholds: each in ``(0, 1)``; ``dota_devkit`` needs IoU ``>`` it, ``mmrotate`` ``>=``.
        use_07_metric: VOC07 11-point AP (default of both references) if true, else all-points AP.
        protocol: ``"dota_devkit"`` or ``"mmrotate"``.
        difficulty_threshold: ``mmrotate`` only: objects whose ``difficult`` exceeds it are dropped
            (mmrotate's ``difficulty``; the default 100 drops none). ``dota_devkit`` always ignores
            difficult 1 and 2.
    Returns:
        ``{"settings": {...}, "classes": {name: {"AP50": .., "AP75": .., "num_gt": .., "num_difficult": ..,
        "num_detections": ..}}, "mean": {"AP50": .., "AP75": .., "num_classes": .., "num_gt": ..,
        "num_detections": ..}, "polygons": {...}, "candidate_pairs": {...}, "pr_curves": {name: {"AP50":
        {"recall": (D,), "precision": (D,)}}}}``.

        ``num_gt`` counts the positives; ``num_difficult`` the difficult objects (``dota_devkit``:
        ignored; ``mmrotate``: dropped by ``difficulty_threshold``); ``mmrotate`` adds ``num_too_small``
        (dropped, side < 2). ``"polygons"`` counts label and detection polygons that are not simple
        (``*_non_simple``) or have area 0 (``*_zero_area``), and for ``mmrotate`` the labels dropped as
        too small (``gt_dropped_too_small``); ``"candidate_pairs"`` (``dota_devkit``: ``computed``,
        ``skipped_by_bound``, ``computed_by_geos``) how many polygon pairs had their IoU computed, how
        many the IoU bound skipped, and how many of the computed ones went to GEOS; ``mmrotate``:
        ``computed``, ``skipped_by_bound``, ``computed_by_kernel``, the pairs the float32 kernel decided).
        ``settings`` holds ``protocol``, ``iou_thresholds``, ``use_07_metric``, ``ap``, ``iou``,
        ``iou_rule``, ``difficult``, ``ties`` and, for ``mmrotate``, ``difficulty_threshold``.

        A class without positives has AP ``None`` (undefined), no PR curve, and is left out of the mean;
        ``mean["num_classes"]`` counts the classes averaged, and the mean is ``None`` when there are
        none. If the thresholds include all of 0.50:0.05:0.95, ``"AP50:95"`` (their mean, the
        COCO-style figure) is added per class and to the mean. AP at different thresholds is never
        averaged otherwise.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    devkit = protocol == "dota_devkit"
    classes = list(classes)
    thresholds = [float(t) for t in iou_thresholds]
    if not thresholds or any(not 0.0 < t < 1.0 for t in thresholds):
        raise ValueError(f"iou_thresholds must be non-empty and each in (0, 1), got {thresholds}")
    keys = [ap_key(t) for t in thresholds]
    if len(set(keys)) != len(keys):
        raise ValueError(f"iou_thresholds {thresholds} give duplicate names {keys}")
    image_ids = sorted(gt)
    n_img = len(image_ids)

    gt_img, gt_cls, gt_poly, gt_diff = _ground_truth(gt, image_ids, len(classes))
    gt_order = np.argsort(gt_cls * n_img + gt_img, kind="stable")  # by (class, image), file order kept
    gt_img, gt_cls, gt_poly, gt_diff = gt_img[gt_order], gt_cls[gt_order], gt_poly[gt_order], gt_diff[gt_order]

    dets = _detections(detections, classes)
    index = {image_id: i for i, image_id in enumerate(image_ids)}
    try:
        det_img = np.fromiter(map(index.__getitem__, dets.image_ids), dtype=np.int64, count=len(dets.image_ids))
    except (KeyError, TypeError):  # report them all below
        det_img = np.array([index.get(i, -1) for i in dets.image_ids], dtype=np.int64).reshape(-1)
    unknown = det_img < 0
    if unknown.any():
        raise ValueError(f"detections on images without ground truth: {sorted(set(dets.image_ids[unknown]))[:5]}")
    det_cls, det_score, det_input = dets.cls, dets.scores, dets.order
    det_key = det_cls * n_img + det_img

    if devkit:
        gt_ignored = gt_diff != 0  # difficult 1 and 2 (any non-zero value): neither positive nor FP
        gt_dropped = np.zeros(len(gt_cls), dtype=bool)
        gt_key = gt_cls * n_img + gt_img
        best, arg, polygon_stats, pairs = _best_devkit(gt_poly, gt_key, dets.polygons(), det_key, thresholds)
    else:
        gt_box, kept = mmrotate_label_boxes(gt_poly)
        too_small = ~kept
        too_difficult = gt_diff > int(difficulty_threshold)
        gt_dropped = too_small | too_difficult
        polygon_stats = _polygon_counts(gt_poly, dets)
        polygon_stats["gt_dropped_too_small"] = int(too_small.sum())
        keep = ~gt_dropped
        gt_ignored = np.zeros(int(keep.sum()), dtype=bool)
        gt_key = (gt_cls * n_img + gt_img)[keep]
        det_box = dets.boxes().astype(np.float32).astype(np.float64)  # mmrotate's float32 detections
        best, arg, pairs = _best_mmrotate(gt_box[keep], gt_key, det_box, det_key, thresholds)
    ignored_of_arg = np.append(gt_ignored, False)[arg]  # arg -1 -> the appended False

    # Positives: devkit: the non-difficult objects; mmrotate: the objects not dropped.
    positive = ~gt_ignored if devkit else ~gt_dropped
    n_cls = len(classes)
    num_gt_of = np.bincount(gt_cls[positive], minlength=n_cls)
    if devkit:
        num_difficult_of = np.bincount(gt_cls[gt_ignored], minlength=n_cls)
    else:
        num_difficult_of = np.bincount(gt_cls[too_difficult & ~too_small], minlength=n_cls)
        num_too_small_of = np.bincount(gt_cls[too_small], minlength=n_cls)
    # Rank order of every class at once: class, then descending score, image id (string order), input order.
    order = _rank_order(det_cls, det_score, det_img, det_input)
    bounds = np.searchsorted(det_cls[order], np.arange(n_cls + 1))
    best_o, arg_o, ignored_o = best[order], arg[order], ignored_of_arg[order]
    hits = {}
    for t, k in zip(thresholds, keys):
        hit = best_o > t if devkit else best_o >= t
        claim = hit & ~ignored_o
        claims = np.flatnonzero(claim)
        # First ranked claim per object (an object belongs to one class: the first in the all-class order is
        # the first in its class's ranking).
        objects = arg_o[claims] + 1  # arg -1 (no candidate) never hits; + 1 keeps indices non-negative
        first_at = np.full(len(gt_ignored) + 1, len(claims), dtype=np.int64)
        np.minimum.at(first_at, objects, np.arange(len(claims)))
        tp = np.zeros(len(order), dtype=bool)
        tp[claims[first_at[objects] == np.arange(len(claims))]] = True
        fp = ~hit | (claim & ~tp)  # a hit on an ignored (devkit: difficult) object is neither
        hits[k] = (tp, fp)
    per_class, curves = {}, {}
    for c, name in enumerate(classes):
        num_gt = int(num_gt_of[c])
        lo, hi = int(bounds[c]), int(bounds[c + 1])
        entry = {"num_gt": num_gt, "num_difficult": int(num_difficult_of[c])}
        if not devkit:
            entry["num_too_small"] = int(num_too_small_of[c])
        entry["num_detections"] = hi - lo
        per_class[name] = entry
        if num_gt == 0:
            entry.update({k: None for k in keys})
            continue
        curves[name] = {}
        for k in keys:
            tp, fp = hits[k]
            ctp, cfp = np.cumsum(tp[lo:hi]), np.cumsum(fp[lo:hi])
            recall = ctp / float(num_gt)
            if devkit:
                precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
                entry[k] = voc_ap(recall, precision, use_07_metric)
            else:
                ctp32, cfp32 = ctp.astype(np.float32), cfp.astype(np.float32)
                precision = ctp32 / np.maximum(ctp32 + cfp32, np.finfo(np.float32).eps)
                entry[k] = mmdet_average_precision(recall, precision, use_07_metric)
            curves[name][k] = {"recall": recall, "precision": precision.astype(np.float64)}

    averaged = [n for n in classes if per_class[n]["num_gt"] > 0]
    mean = {"num_classes": len(averaged), "num_gt": sum(per_class[n]["num_gt"] for n in classes),
            "num_detections": int(len(det_score))}
    for k in keys:
        values = [per_class[n][k] for n in averaged]
        if not values:
            mean[k] = None
        elif devkit:
            mean[k] = float(np.mean(values))
        else:
            mean[k] = float(np.mean(np.asarray(values, dtype=np.float32)))  # mmrotate: float32 mean
    coco_keys = [ap_key(t) for t in np.linspace(0.5, 0.95, 10)]
    if all(k in keys for k in coco_keys):
        for entry in [*per_class.values(), mean]:
            values = [entry[k] for k in coco_keys]
            entry["AP50:95"] = None if values[0] is None else float(np.mean(values))
    settings = {"protocol": protocol, "iou_thresholds": thresholds, "use_07_metric": bool(use_07_metric),
                "ap": "voc07_11_point" if use_07_metric else "all_points",
                "ties": "score desc, then image id, then input order"}
    if devkit:
        settings.update({"iou": "label polygon vs detection polygon (devkit polyiou formula, float64)",
                         "iou_rule": "iou > threshold", "difficult": "ignored (1 and 2)"})
    else:
        settings.update({"iou": "label min-area rectangle vs detection box (rotated IoU, float32)",
                         "iou_rule": "iou >= threshold", "difficulty_threshold": int(difficulty_threshold),
                         "difficult": f"dropped above {int(difficulty_threshold)}",
                         "small_labels": "dropped (min-area rectangle side < 2 px)"})
    return {"settings": settings, "classes": per_class, "mean": mean, "polygons": polygon_stats,
            "candidate_pairs": pairs, "pr_curves": curves}


def _polygon_counts(gt_poly: np.ndarray, dets: _Detections) -> dict:
    """Non-simple and zero-area label and detection polygons (detection polygons: given ones only)."""
    g_simple, g_zero = quad_simple_zero_area(gt_poly)
    d_simple, d_zero = quad_simple_zero_area(dets.given_polygons())
    return {"gt_non_simple": int(np.sum(~g_simple & ~g_zero)), "gt_zero_area": int(np.sum(g_zero)),
            "detections_non_simple": int(np.sum(~d_simple & ~d_zero)), "detections_zero_area": int(np.sum(d_zero))}
