"""Rotated VOC average precision with the DOTA devkit's semantics (``dota_evaluation_task1.py``).

For each class, detections of all images are ranked by score and matched greedily:

* a detection's candidate is its best-IoU ground truth among **all** objects of that image and class,
  difficult ones included (ties between equal IoUs: the object that comes first in the label file);
* IoU must be strictly greater than the threshold, else the detection is a false positive;
* a candidate that is difficult (``difficult`` 1 *or* 2) makes the detection neither TP nor FP;
* the first detection (in rank order) to claim a non-difficult object is a TP, later ones are FP;
* difficult objects are not counted as positives (``num_gt`` counts non-difficult objects only);
* precision ``tp / max(tp + fp, eps)`` and recall ``tp / num_gt`` along the ranking (ignored
  detections keep their slot, as in the devkit), then VOC07 11-point AP (the DOTA convention,
  default) or all-points AP (VOC2010+).

Differences from the devkit, by design:

* Ground truth is the minimum-area rectangle of each label polygon (:func:`mutdet.boxes.polygon_to_le90`),
  and IoU is torchvision's exact rotated IoU (:func:`mutdet.boxes.rotated_iou`, float32) instead of
  the devkit's polygon IoU. For rectangular labels (and every le90 detection) the two coincide up to
  float32 rounding; for a non-rectangular quadrilateral the devkit intersects the quadrilateral itself.
* Equal scores: the devkit's ``np.argsort(-confidence)`` leaves their order to the sort algorithm.
  Here the ranking is a stable sort by descending score, then by image id (string order), then by
  input order (row of the detections table, or position in the class's arrays).
* Detections on an image that is not in the ground truth raise an error (the devkit crashes with a
  ``KeyError``).

Speed: IoU is computed per (image, class). Within one, detections are cut into small spatial blocks
(recursive median splits of their centres) and each block is compared only with the objects whose
axis-aligned extent meets the block's; objects left out have IoU exactly 0 with every detection of
the block, so the best IoU and its (first) argmax are unchanged for any threshold above 0. The greedy
pass is vectorised: an object is claimed by the first ranked non-difficult hit on it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from mutdet.boxes import polygon_to_le90, rotated_iou

__all__ = ["VOC07_RECALL_POINTS", "evaluate_detections", "voc_ap", "ap_key"]

# The devkit's 11 recall points, as ``np.arange`` produces them (0.30000000000000004, ...): a recall of
# exactly 0.3 does *not* reach the 4th point. Kept bit-identical on purpose.
VOC07_RECALL_POINTS = np.arange(0.0, 1.1, 0.1)

# Largest (detections x candidate objects) IoU matrix computed in one torchvision call before a block
# of detections is split. A call costs ~30 us plus ~0.13 us per pair on one CPU core.
MAX_PAIRS = 2048


def ap_key(threshold: float) -> str:
    """Name of the AP at one IoU threshold: 0.5 -> ``"AP50"``, 0.75 -> ``"AP75"``."""
    return f"AP{round(threshold * 100)}"


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = True) -> float:
    """VOC AP of one precision-recall curve, as the devkit's ``voc_ap``.

    Args:
        recall, precision: ``(D,)`` along the ranked detections.
        use_07_metric: 11-point interpolation (VOC07) if true, else area under the monotone envelope
            at every recall change (VOC2010+).
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        ap = 0.0
        for t in VOC07_RECALL_POINTS:
            reached = recall >= t
            ap += (precision[reached].max() if reached.any() else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope, non-increasing in recall
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _le90_bounds(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned hull ``(lo, hi)``, each ``(N, 2)`` (x, y), of le90 boxes ``(N, 5)``."""
    c, s = np.abs(np.cos(boxes[:, 4])), np.abs(np.sin(boxes[:, 4]))
    hw, hh = boxes[:, 2] / 2, boxes[:, 3] / 2
    ext = np.stack([hw * c + hh * s, hw * s + hh * c], axis=1)
    return boxes[:, :2] - ext, boxes[:, :2] + ext


def _best_matches(det: np.ndarray, det_lo: np.ndarray, det_hi: np.ndarray,
                  gt: np.ndarray, gt_lo: np.ndarray, gt_hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best IoU and its first argmax for every detection of one (image, class).

    Blocks of detections start as the whole set; a block is compared with the objects whose hull
    meets the block's hull (others have IoU 0 with all of it), and is halved at the median of its
    centres along its longer side while that comparison would exceed ``MAX_PAIRS`` pairs.

    Args:
        det: ``(D, 5)`` le90 with hulls ``det_lo``, ``det_hi`` ``(D, 2)``; gt: ``(G, 5)`` likewise.
    Returns:
        ``best`` ``(D,)`` float64 and ``arg`` ``(D,)`` int64 index into ``gt``, -1 (with ``best`` 0)
        where no object's hull meets the detection's block.
    """
    best = np.zeros(len(det))
    arg = np.full(len(det), -1, dtype=np.int64)
    stack = [(np.arange(len(det)), np.arange(len(gt)))]
    while stack:
        idx, cand = stack.pop()
        lo, hi = det_lo[idx].min(axis=0), det_hi[idx].max(axis=0)
        cand = cand[np.all((gt_lo[cand] < hi) & (gt_hi[cand] > lo), axis=1)]  # stays ascending
        if len(cand) == 0:
            continue
        if len(idx) * len(cand) > MAX_PAIRS and len(idx) > 1:
            centres = det[idx, :2]
            axis = int(np.argmax(centres.max(axis=0) - centres.min(axis=0)))
            half = len(idx) // 2
            part = np.argpartition(centres[:, axis], half)
            stack += [(idx[part[:half]], cand), (idx[part[half:]], cand)]
            continue
        # IoU is translation invariant; centring keeps torchvision's float32 precise on large images.
        shift = np.array([*(lo + hi) / 2, 0.0, 0.0, 0.0])
        iou = rotated_iou(det[idx] - shift, gt[cand] - shift)  # (b, c)
        j = iou.argmax(axis=1)  # first maximum: label-file order among equal IoUs
        best[idx] = iou[np.arange(len(idx)), j]
        arg[idx] = cand[j]
    return best, arg


def _check_boxes(boxes: np.ndarray, what: str) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    bad = ~np.isfinite(boxes).all(axis=1) | (boxes[:, 2] < 0) | (boxes[:, 3] < 0)
    if bad.any():
        raise ValueError(f"{what}: box {int(np.argmax(bad))} is not finite or has a negative side: {boxes[bad][0]}")
    return boxes


def _ground_truth(gt: Mapping, image_ids: list[str], num_classes: int):
    """Concatenate the objects of every image: image index, class, le90 box ``(N, 5)``, difficult flag."""
    img, cls, polys, diff = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros((0, 8))], [np.zeros(0, bool)]
    for i, image_id in enumerate(image_ids):
        ann = gt[image_id]
        labels = np.asarray(ann.labels, dtype=np.int64).reshape(-1)
        polygons = np.asarray(ann.polygons, dtype=np.float64).reshape(-1, 8)
        difficult = np.asarray(ann.difficult).reshape(-1)
        if not (len(labels) == len(polygons) == len(difficult)):
            raise ValueError(f"ground truth of {image_id!r}: {len(polygons)} polygons, {len(labels)} labels, "
                             f"{len(difficult)} difficult flags")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"ground truth of {image_id!r}: label out of range [0, {num_classes}): {labels}")
        img.append(np.full(len(labels), i, dtype=np.int64))
        cls.append(labels)
        polys.append(polygons)
        diff.append(difficult != 0)
    polygons = np.concatenate(polys)
    boxes = polygon_to_le90(polygons) if len(polygons) else np.zeros((0, 5))
    return np.concatenate(img), np.concatenate(cls), _check_boxes(boxes, "ground truth"), np.concatenate(diff)


def _detections(detections, classes: Sequence[str]):
    """Flatten either input form into image ids, class indices, scores, le90 boxes and input order."""
    if isinstance(detections, pa.Table):
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
        boxes = np.stack([detections.column(c).to_numpy().astype(np.float64)
                          for c in ("cx", "cy", "w", "h", "theta")], axis=1).reshape(-1, 5)
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
            ids = np.asarray(d["image_ids"], dtype=object).reshape(-1)
            if "boxes" in d:
                boxes = np.asarray(d["boxes"], dtype=np.float64).reshape(-1, 5)
            else:
                polygons = np.asarray(d["polygons"], dtype=np.float64).reshape(-1, 8)
                boxes = polygon_to_le90(polygons) if len(polygons) else np.zeros((0, 5))
            sc = np.asarray(d["scores"], dtype=np.float64).reshape(-1)
            if not (len(ids) == len(sc) == len(boxes)):
                raise ValueError(f"detections of {name!r}: {len(ids)} image ids, {len(sc)} scores, {len(boxes)} boxes")
            parts.append((ids, np.full(len(ids), c, dtype=np.int64), sc, boxes, np.arange(len(ids))))
        if not parts:
            parts = [(np.zeros(0, object), np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 5)), np.zeros(0, np.int64))]
        image_ids, cls, scores, boxes, order = (np.concatenate(p) for p in zip(*parts))
    if not np.isfinite(scores).all():
        raise ValueError(f"detections: non-finite score at position {int(np.argmin(np.isfinite(scores)))}")
    return image_ids, cls, scores, _check_boxes(boxes, "detections"), order


def evaluate_detections(gt: Mapping, detections, classes: Sequence[str],
                        iou_thresholds: Sequence[float] = (0.5, 0.75), use_07_metric: bool = True) -> dict:
    """Rotated VOC AP per class at each IoU threshold (see the module docstring for the rules).

    Args:
        gt: image id -> ground truth of every evaluated image (images without objects included), each
            with ``polygons`` ``(N, 8)`` (full-image pixels), ``labels`` ``(N,)`` indices into
            ``classes`` and ``difficult`` ``(N,)`` (0 normal, 1 or 2 ignored), e.g.
            :class:`mutdet.io.annotations.ImageAnnotations`.
        detections: either a ``detections`` artefact table (columns ``id`` = image id, ``class_id``,
            ``score``, le90 ``cx cy w h theta`` in full-image pixels; ``class_name``, if present, must
            agree with ``classes``), or a mapping class name -> ``{"image_ids": (D,), "scores": (D,),
            "boxes": (D, 5) le90}`` (or ``"polygons": (D, 8)`` instead of ``"boxes"``); missing classes
            have no detections.
        classes: class names; label / ``class_id`` ``k`` is ``classes[k]``.
        iou_thresholds: each in ``(0, 1)``; a match needs IoU strictly greater.
        use_07_metric: VOC07 11-point AP (DOTA convention) if true, else all-points AP.
    Returns:
        ``{"settings": {...}, "classes": {name: {"AP50": .., "AP75": .., "num_gt": .., "num_difficult": ..,
        "num_detections": ..}}, "mean": {"AP50": .., "AP75": .., "num_classes": .., "num_gt": ..,
        "num_detections": ..}, "pr_curves": {name: {"AP50": {"recall": (D,), "precision": (D,)}}}}``.
        A class without non-difficult ground truth has AP ``None`` (undefined), no PR curve, and is left
        out of the mean; ``mean["num_classes"]`` counts the classes averaged, and the mean is ``None``
        when there are none. If the thresholds include all of 0.50:0.05:0.95, ``"AP50:95"`` (their
        mean, the COCO-style figure) is added per class and to the mean. AP at different thresholds is
        never averaged otherwise.
    """
    classes = list(classes)
    thresholds = [float(t) for t in iou_thresholds]
    if not thresholds or any(not 0.0 < t < 1.0 for t in thresholds):
        raise ValueError(f"iou_thresholds must be non-empty and each in (0, 1), got {thresholds}")
    keys = [ap_key(t) for t in thresholds]
    if len(set(keys)) != len(keys):
        raise ValueError(f"iou_thresholds {thresholds} give duplicate names {keys}")
    image_ids = sorted(gt)
    n_img = len(image_ids)

    gt_img, gt_cls, gt_box, gt_diff = _ground_truth(gt, image_ids, len(classes))
    gt_order = np.argsort(gt_cls * n_img + gt_img, kind="stable")  # by (class, image), file order kept
    gt_img, gt_cls, gt_box, gt_diff = gt_img[gt_order], gt_cls[gt_order], gt_box[gt_order], gt_diff[gt_order]
    gt_key = gt_cls * n_img + gt_img
    gt_lo, gt_hi = _le90_bounds(gt_box)

    det_ids, det_cls, det_score, det_box, det_input = _detections(detections, classes)
    index = {image_id: i for i, image_id in enumerate(image_ids)}
    det_img = np.fromiter((index.get(i, -1) for i in det_ids), dtype=np.int64, count=len(det_ids))
    unknown = det_img < 0
    if unknown.any():
        raise ValueError(f"detections on images without ground truth: {sorted(set(det_ids[unknown]))[:5]}")
    det_lo, det_hi = _le90_bounds(det_box)

    # Best IoU and argmax (index into the sorted ground truth) per detection, one (image, class) at a time.
    best = np.zeros(len(det_box))
    arg = np.full(len(det_box), -1, dtype=np.int64)
    det_key = det_cls * n_img + det_img
    by_key = np.argsort(det_key, kind="stable")
    keys_present, starts = np.unique(det_key[by_key], return_index=True)
    gt_starts, gt_stops = np.searchsorted(gt_key, keys_present, "left"), np.searchsorted(gt_key, keys_present, "right")
    for rows, g0, g1 in zip(np.split(by_key, starts[1:]), gt_starts, gt_stops):
        if g1 > g0:  # else every detection of the group is a false positive
            b, a = _best_matches(det_box[rows], det_lo[rows], det_hi[rows], gt_box[g0:g1], gt_lo[g0:g1], gt_hi[g0:g1])
            best[rows] = b
            arg[rows] = np.where(a >= 0, a + g0, -1)
    diff_of_arg = np.append(gt_diff, False)[arg]  # arg -1 -> the appended False

    per_class, curves = {}, {}
    for c, name in enumerate(classes):
        num_gt = int(np.sum((gt_cls == c) & ~gt_diff))
        rows = np.flatnonzero(det_cls == c)
        rows = rows[np.lexsort((det_input[rows], det_img[rows], -det_score[rows]))]  # rank order
        entry = {"num_gt": num_gt, "num_difficult": int(np.sum((gt_cls == c) & gt_diff)), "num_detections": len(rows)}
        per_class[name] = entry
        if num_gt == 0:
            entry.update({k: None for k in keys})
            continue
        curves[name] = {}
        for t, k in zip(thresholds, keys):
            hit = best[rows] > t
            claim = hit & ~diff_of_arg[rows]
            claims = np.flatnonzero(claim)
            _, first = np.unique(arg[rows][claims], return_index=True)  # first ranked claim per object
            tp = np.zeros(len(rows), dtype=bool)
            tp[claims[first]] = True
            fp = ~hit | (claim & ~tp)  # a hit on a difficult object is neither
            ctp, cfp = np.cumsum(tp), np.cumsum(fp)
            recall = ctp / float(num_gt)
            precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
            entry[k] = voc_ap(recall, precision, use_07_metric)
            curves[name][k] = {"recall": recall, "precision": precision}

    averaged = [n for n in classes if per_class[n]["num_gt"] > 0]
    mean = {"num_classes": len(averaged), "num_gt": sum(per_class[n]["num_gt"] for n in classes),
            "num_detections": int(len(det_box))}
    for k in keys:
        mean[k] = float(np.mean([per_class[n][k] for n in averaged])) if averaged else None
    coco_keys = [ap_key(t) for t in np.linspace(0.5, 0.95, 10)]
    if all(k in keys for k in coco_keys):
        for entry in [*per_class.values(), mean]:
            values = [entry[k] for k in coco_keys]
            entry["AP50:95"] = None if values[0] is None else float(np.mean(values))
    settings = {"iou_thresholds": thresholds, "use_07_metric": bool(use_07_metric),
                "ap": "voc07_11_point" if use_07_metric else "all_points", "iou_rule": "iou > threshold",
                "difficult": "ignored (1 and 2)", "ties": "score desc, then image id, then input order"}
    return {"settings": settings, "classes": per_class, "mean": mean, "pr_curves": curves}
