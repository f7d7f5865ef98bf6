"""Benchmark: both AP protocols of ``mutdet.evaluation`` against straightforward loops written from the references.

Generates a DOTA-format problem, DOTA-val-sized by default (458 images, ~29k objects, 80k detections,
15 classes), and evaluates it with each protocol of :func:`mutdet.evaluation.evaluate_detections` and
with an independent per-detection implementation of the same rules written out below:

* ``dota_devkit``: ``voc_eval`` of the DOTA devkit's ``dota_evaluation_task1.py``, one threshold per
  run: detections of a class ranked by score over all images; for each, the devkit's axis-aligned
  pre-filter (``iw * ih > 0`` with its ``+ 1``) over the image's objects, then IoU between the label's
  own quadrilateral (float64, as written) and the detection's Task1 polygon with shapely (float64),
  best IoU first in label order; TP if IoU ``>`` the threshold, the object is not difficult (1 and 2
  both are) and not yet claimed; a hit on a difficult object is neither TP nor FP; difficult objects
  are not positives; VOC07 11-point AP (and all-points) by the devkit's ``voc_ap`` in float64.
* ``mmrotate``: ``eval_rbbox_map`` / ``tpfp_default`` with the ground truth of mmrotate's
  ``DOTADataset``: each label polygon (float32) -> ``cv2.minAreaRect`` -> le90 with ``poly2obb_np_le90``'s
  normalisation, the object **dropped** when the rectangle has a side < 2, and dropped too when its
  difficulty exceeds ``difficulty`` (default 100: nothing dropped, difficult objects count as
  positives; no ignore list). Per image and class: rotated IoU of every detection with every object
  (shapely polygons of the rotated boxes, float64; pairs whose axis-aligned hulls do not overlap have
  IoU 0 and are skipped), best IoU first in label order, detections in descending score, TP if IoU
  ``>=`` the threshold and the object is not yet covered, else FP; then all images' TP/FP sorted by
  descending score, and mmdet's ``average_precision`` with its dtypes (float32 TP/FP and precision,
  float32 AP), ``11points`` (default) or ``area``.

The scene: image sides 800-4000 px; per class a DOTA-val-like object count, spread over images with a
heavy tail in clusters with a shared orientation, class-typical sizes. Labels are **integer
quadrilaterals** as in real DOTA files: each object's rotated rectangle with jittered corners rounded
to integers (harbours jittered more), ~1.5 % made concave (one corner pulled inside), ~0.6 % of the
thin classes slivers whose minimum-area rectangle may be thinner than 2 px (dropped by mmrotate, kept
by the devkit), 30 % listed counter-clockwise, random first corner; 6 % difficult (1 or 2).
Detections: 92 % of objects found (jittered box, 5 % with a wrong class), 15 % of the found ones
duplicated, the rest false positives near clusters or anywhere; le90 boxes whose values are float32
numbers (as a detector's output), their corners printed with 2 (or, for half, 1) decimals as the Task1
polygons (given to ``dota_devkit``; ``mmrotate`` gets the boxes); **scores all distinct** and
exact in float32, so both sides rank identically.

    .venv/bin/python benchmarks/evaluation.py [--scale 1.0 | --quick] [--seed 0] [--protocols dota_devkit,mmrotate]
        [--difficulty 100 0] [--tolerance 0] [--self-test] [--rounds 1]
        [--whole | --whole-only] [--devkit DIR] [--repeats 3] [--workdir DIR]

``--scale`` multiplies images, objects and detections (``--quick`` = ``--scale 0.05``, ~10 s);
``--self-test`` runs the hand cases only. Prints the scene, the hand cases (exact IoU / AP values that
tell the rules apart, for the loops and for ours), and per protocol (mmrotate once per ``--difficulty``,
the first one timed): the largest per-class |AP ours - loop| at AP50 and AP75, VOC07 and all-points,
with the first differing detection of a differing class; the mAPs as each reference forms them (the
devkit sums classes in order, mmrotate takes a float32 mean); wall seconds of ours (best of 3 calls)
and of the loop (one run per threshold, as the references run) at IoU 0.5 alone and at 0.5 + 0.75,
the speed-ups; and peak memory: VmHWM above the phase's start (reset through
``/proc/self/clear_refs``) for both, and tracemalloc (numpy and Python objects, not torch's buffers)
for ours in a separate untimed call. Exits 1 if a hand case fails or a class AP differs by more than
``--tolerance`` (default 0), 2 if ``evaluate_detections`` has no ``protocol`` argument.

``--whole`` (or ``--whole-only``) also writes the scene to disk as a DOTA split (blank PNGs,
``labelTxt``, Task1 files; kept under ``--workdir`` if given) and times whole processes, interleaved
``--repeats`` times: ``mutdet evaluate --protocol dota_devkit`` (AP50 and AP75 in one process) against
the DOTA devkit's ``dota_evaluation_task1.py`` (its ``voc_eval``, unchanged, one process per threshold
as it is run) from ``--devkit DIR``: a checkout of github.com/CAPTAIN-WHU/DOTA_devkit with its
``polyiou`` extension built (``swig -c++ -python polyiou.i && python setup.py build_ext --inplace``).
It prints medians of wall and CPU seconds and of each process's peak RSS (``ru_maxrss`` from
``os.wait4``), the median of the rounds' wall-time ratios, and the largest per-class |AP| difference
between the two; without a built devkit it says why and times ours only.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import shapely
from shapely.geometry import Polygon

from mutdet.evaluation import evaluate_detections
from mutdet.io.annotations import ImageAnnotations

# name: (objects in DOTA-v1.0 val, approximate, typical w x h in pixels)
CLASSES = {
    "plane": (2531, (60, 55)), "baseball-diamond": (214, (120, 110)), "bridge": (464, (150, 30)),
    "ground-track-field": (144, (300, 150)), "small-vehicle": (5438, (22, 10)),
    "large-vehicle": (4387, (50, 14)), "ship": (8960, (45, 14)), "tennis-court": (760, (70, 35)),
    "basketball-court": (132, (60, 35)), "storage-tank": (2888, (35, 33)),
    "soccer-ball-field": (153, (250, 150)), "roundabout": (179, (110, 105)), "harbor": (2090, (120, 30)),
    "swimming-pool": (440, (40, 25)), "helicopter": (73, (45, 40)),
}
THIN_CLASSES = ("bridge", "small-vehicle", "large-vehicle", "ship", "harbor")
NUM_IMAGES = 458
NUM_DETECTIONS = 80_000
THRESHOLDS = (0.5, 0.75)
OURS_REPEATS = 3  # timed calls of ours (best taken); the loops run once
SCORE_QUANTUM = 2.0 ** -22  # scores are distinct multiples of this: exact in float32 and float64


# ----------------------------------------------------------------------------------------------------
# Geometry written for this benchmark (independent of mutdet.boxes)
# ----------------------------------------------------------------------------------------------------

def obb_corners(boxes: np.ndarray) -> np.ndarray:
    """Rotated boxes ``(N, 5)`` ``(cx, cy, w, h, a)`` -> corners ``(N, 4, 2)`` float64 (mmrotate's obb2poly le90)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    c, s = np.cos(b[:, 4]), np.sin(b[:, 4])
    v1 = np.stack([b[:, 2] / 2 * c, b[:, 2] / 2 * s], axis=1)
    v2 = np.stack([-b[:, 3] / 2 * s, b[:, 3] / 2 * c], axis=1)
    ctr = b[:, :2]
    return np.stack([ctr - v1 - v2, ctr + v1 - v2, ctr + v1 + v2, ctr - v1 + v2], axis=1)


def wrap_le90(boxes: np.ndarray) -> np.ndarray:
    """Any ``(cx, cy, w, h, a)`` -> the same rectangle with ``w >= h`` and ``a`` in ``[-pi/2, pi/2)``."""
    b = np.array(boxes, dtype=np.float64).reshape(-1, 5)
    swap = b[:, 2] < b[:, 3]
    b[swap, 2], b[swap, 3] = b[swap, 3].copy(), b[swap, 2].copy()
    b[swap, 4] += math.pi / 2
    b[:, 4] = (b[:, 4] + math.pi / 2) % math.pi - math.pi / 2
    b[b[:, 4] >= math.pi / 2, 4] -= math.pi
    return b


def poly2obb_le90(poly) -> tuple | None:
    """One label quadrilateral -> le90 ``(x, y, w, h, a)`` as mmrotate's ``poly2obb_np_le90``, or None (dropped)."""
    (x, y), (w, h), a = cv2.minAreaRect(np.asarray(poly, dtype=np.float32).reshape(4, 2))
    if w < 2 or h < 2:
        return None
    a = a / 180 * np.pi
    if w < h:
        w, h = h, w
        a += np.pi / 2
    while not np.pi / 2 > a >= -np.pi / 2:
        a = a - np.pi if a >= np.pi / 2 else a + np.pi
    return x, y, w, h, a


def shapely_iou(p: np.ndarray, q: np.ndarray) -> float:
    """IoU of two polygons given as ``(K, 2)`` float64 corner arrays."""
    a, b = Polygon(p), Polygon(q)
    inter = a.intersection(b).area
    return inter / (a.area + b.area - inter)


def rotated_iou_matrix(det: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU ``(D, G)`` of rotated boxes (float64 shapely polygons; ``w * h`` areas as mmcv's box_iou_rotated)."""
    iou = np.zeros((len(det), len(gt)))
    if not len(det) or not len(gt):
        return iou
    dc, gc = obb_corners(det), obb_corners(gt)
    dlo, dhi, glo, ghi = dc.min(1), dc.max(1), gc.min(1), gc.max(1)
    meet = np.all((dlo[:, None] < ghi[None]) & (glo[None] < dhi[:, None]), axis=2)
    i, j = np.nonzero(meet)
    if len(i):
        inter = shapely.area(shapely.intersection(shapely.polygons(dc[i]), shapely.polygons(gc[j])))
        da, ga = det[i, 2].astype(np.float64) * det[i, 3], gt[j, 2].astype(np.float64) * gt[j, 3]
        iou[i, j] = inter / (da + ga - inter)
    return iou


# ----------------------------------------------------------------------------------------------------
# Scene
# ----------------------------------------------------------------------------------------------------

def _boxes_around(rng, n, centre, spread, size, angle, size_jitter=0.15):
    """``n`` boxes ``(n, 5)`` scattered around ``centre`` with a shared orientation."""
    w = size[0] * np.exp(rng.normal(0, size_jitter, n))
    h = size[1] * np.exp(rng.normal(0, size_jitter, n))
    xy = centre + rng.normal(0, spread, (n, 2))
    theta = angle + rng.normal(0, 0.1, n)
    return np.column_stack([xy, w, h, theta])


def _quad_kind(q: np.ndarray) -> str:
    """``rectangle`` / ``quadrilateral`` (convex, not a rectangle) / ``concave``, or ``thin`` if mmrotate drops it."""
    if poly2obb_le90(q) is None:
        return "thin"
    e = np.roll(q, -1, axis=0) - q
    if np.all(np.abs((e * np.roll(e, -1, axis=0)).sum(1)) == 0):
        return "rectangle"
    p = Polygon(q)
    return "concave" if p.convex_hull.area > p.area else "quadrilateral"


def label_quadrilaterals(rng, boxes: np.ndarray, labels: np.ndarray, names: list[str]) -> np.ndarray:
    """Integer DOTA label quadrilaterals ``(N, 8)`` around rotated boxes ``(N, 5)`` (modified in place for slivers)."""
    n = len(boxes)
    thin = np.isin(np.asarray(names, dtype=object)[labels], THIN_CLASSES) & (rng.random(n) < 0.006)
    boxes[thin, 3] = rng.uniform(0.8, 2.6, int(thin.sum()))
    corners = obb_corners(boxes)
    short = np.minimum(boxes[:, 2], boxes[:, 3])
    sd = np.where(np.asarray(names, dtype=object)[labels] == "harbor", 0.12, 0.04) * short + 0.3
    sd[thin] = 0.0
    q = np.rint(corners + rng.normal(0, 1, (n, 4, 2)) * sd[:, None, None])
    concave = (rng.random(n) < 0.015) & ~thin
    for i in np.flatnonzero(concave):
        k = int(rng.integers(4))
        c3 = np.delete(q[i], k, axis=0).mean(0)
        q[i, k] = np.rint(c3 + 0.12 * (q[i, k] - c3))
    ccw = rng.random(n) < 0.3
    q[ccw] = q[ccw, ::-1]
    start = rng.integers(0, 4, n)
    q = np.stack([np.roll(q[i], -start[i], axis=0) for i in range(n)]) if n else q
    polys = shapely.polygons(q) if n else np.zeros(0, object)
    bad = ~shapely.is_valid(polys) | (shapely.area(polys) < 1.0) if n else np.zeros(0, bool)
    for i in np.flatnonzero(bad):  # self-intersecting or degenerate after rounding: plain integer box
        w, h = max(2.0, float(np.rint(boxes[i, 2]))), max(1.0, float(np.rint(min(boxes[i, 3], boxes[i, 2]))))
        x0, y0 = np.rint(boxes[i, :2] - [w / 2, h / 2])
        q[i] = [[x0, y0], [x0 + w, y0], [x0 + w, y0 + h], [x0, y0 + h]]
    return q.reshape(n, 8)


def _distinct_scores(raw: np.ndarray) -> np.ndarray:
    """Scores close to ``raw``, all distinct, each a multiple of SCORE_QUANTUM (exact in float32)."""
    q = np.rint(np.clip(raw, 0, 1) / SCORE_QUANTUM).astype(np.int64)
    order = np.argsort(q, kind="stable")
    steps = np.arange(len(q))
    q[order] = np.maximum.accumulate(q[order] - steps) + steps  # strictly increasing along the order
    return q * SCORE_QUANTUM


def make_scene(seed: int, scale: float = 1.0):
    """Ground truth (image id -> ImageAnnotations), detections (class -> arrays), class names, statistics."""
    rng = np.random.default_rng(seed)
    names = list(CLASSES)
    num_images = max(2, int(round(NUM_IMAGES * scale)))
    image_ids = [f"P{i:04d}" for i in range(num_images)]
    sizes = rng.integers(800, 4001, (num_images, 2))
    objects = {i: [] for i in range(num_images)}  # image -> list of (boxes (n, 5), class)
    for c, (name, (count, size)) in enumerate(CLASSES.items()):
        count = max(1, int(round(count * scale)))
        hosts = rng.choice(num_images, min(num_images, max(3, count // 25)), replace=False)
        counts = rng.multinomial(count, rng.dirichlet(np.full(len(hosts), 0.4)))
        for img, n in zip(hosts, counts):
            while n > 0:  # clusters of up to 60 objects (parking lots, harbours, tank farms)
                k = int(min(n, rng.integers(1, 61)))
                spread = np.sqrt(k) * max(size) * 0.7
                centre = rng.uniform(spread, np.maximum(sizes[img] - spread, spread + 1))
                objects[img].append((_boxes_around(rng, k, centre, spread, size, rng.uniform(-1.5, 1.5)), c))
                n -= k
    gt, found, kinds = {}, [], {}
    for i, image_id in enumerate(image_ids):
        boxes = np.concatenate([b for b, _ in objects[i]]) if objects[i] else np.zeros((0, 5))
        labels = np.concatenate([np.full(len(b), c) for b, c in objects[i]]) if objects[i] else np.zeros(0, int)
        polygons = label_quadrilaterals(rng, boxes, labels, names)
        difficult = np.where(rng.random(len(labels)) < 0.06, rng.integers(1, 3, len(labels)), 0).astype(np.int8)
        gt[image_id] = ImageAnnotations(image_id=image_id, polygons=polygons.astype(np.float64),
                                        labels=labels.astype(np.int64), difficult=difficult)
        for p in polygons:
            kind = _quad_kind(p.reshape(4, 2))
            kinds[kind] = kinds.get(kind, 0) + 1
        found.append((i, boxes, labels))

    det_img, det_cls, det_box, det_score = [], [], [], []

    def add(img, cls, boxes, scores):
        det_img.append(np.full(len(boxes), img))
        det_cls.append(cls)
        det_box.append(boxes)
        det_score.append(scores)

    for i, boxes, labels in found:
        hit = rng.random(len(labels)) < 0.92
        b, lab = boxes[hit], labels[hit].copy()
        wrong = rng.random(len(lab)) < 0.05
        lab[wrong] = rng.integers(0, len(names), int(wrong.sum()))
        jitter = np.column_stack([rng.normal(0, 0.06, (len(b), 2)) * b[:, 3:4],  # centre, relative to h
                                  np.exp(rng.normal(0, 0.06, (len(b), 2))),  # w, h factors
                                  rng.normal(0, 0.03, len(b))])  # angle, radians
        tp_boxes = np.column_stack([b[:, :2] + jitter[:, :2], b[:, 2:4] * jitter[:, 2:4], b[:, 4] + jitter[:, 4]])
        tp_scores = rng.beta(5, 2, len(b))
        add(i, lab, tp_boxes, tp_scores)
        dup = rng.random(len(b)) < 0.15
        d = tp_boxes[dup] + np.column_stack([rng.normal(0, 0.2, (int(dup.sum()), 2)) * b[dup, 3:4],
                                             np.zeros((int(dup.sum()), 2)), rng.normal(0, 0.1, int(dup.sum()))])
        add(i, lab[dup], d, tp_scores[dup] * rng.uniform(0.3, 0.9, int(dup.sum())))
    num_fp = max(0, int(round(NUM_DETECTIONS * scale)) - sum(len(s) for s in det_score))
    weights = np.array([n for n, _ in CLASSES.values()], dtype=float)
    fp_img = rng.integers(0, num_images, num_fp)
    fp_cls = rng.choice(len(names), num_fp, p=weights / weights.sum())
    for i in range(num_images):
        sel = np.flatnonzero(fp_img == i)
        near = rng.random(len(sel)) < 0.5
        boxes_i = found[i][1]
        for j, is_near in zip(sel, near):
            size = CLASSES[names[fp_cls[j]]][1]
            if is_near and len(boxes_i):
                centre = boxes_i[rng.integers(len(boxes_i)), :2] + rng.normal(0, 2.0 * max(size), 2)
            else:
                centre = rng.uniform(0, sizes[i])
            add(i, np.array([fp_cls[j]]), _boxes_around(rng, 1, centre, 0.0, size, rng.uniform(-1.5, 1.5), 0.3),
                rng.beta(1, 6, 1))
    img = np.concatenate(det_img)
    cls = np.concatenate(det_cls)
    box = wrap_le90(np.concatenate(det_box))
    box[:, 2:4] = np.maximum(box[:, 2:4], 0.5)
    box = box.astype(np.float32).astype(np.float64)  # a detector's float32 output
    score = _distinct_scores(np.concatenate(det_score))
    assert len(np.unique(score.astype(np.float32))) == len(score)
    # Task1 polygons as result files carry them: the box corners printed with 2 decimals, or 1 for half of
    # them (no longer exact rectangles).
    polygons = obb_corners(box).reshape(-1, 8)
    coarse = rng.random(len(box)) < 0.5
    polygons[coarse] = np.round(polygons[coarse], 1)
    polygons[~coarse] = np.round(polygons[~coarse], 2)
    detections = {}
    for c, name in enumerate(names):
        m = cls == c
        detections[name] = {"image_ids": np.asarray(image_ids, dtype=object)[img[m]], "scores": score[m],
                            "boxes": box[m], "polygons": polygons[m]}
    return gt, detections, names, kinds


# ----------------------------------------------------------------------------------------------------
# Reference rules, one detection at a time
# ----------------------------------------------------------------------------------------------------

def devkit_voc_ap(rec, prec, use_07_metric):
    """The devkit's ``voc_ap`` (float64)."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def devkit_voc_eval(gt, detections, names, thr):
    """DOTA devkit Task1 rules at one IoU threshold: ``{name: {"voc07", "area", "num_gt", "tp", "fp", "order"}}``."""
    out = {}
    for c, name in enumerate(names):
        recs, npos = {}, 0
        for image_id, ann in gt.items():
            m = np.asarray(ann.labels) == c
            diff = np.asarray(ann.difficult)[m].astype(bool)
            recs[image_id] = {"poly": np.asarray(ann.polygons, dtype=np.float64)[m], "difficult": diff,
                              "det": [False] * int(m.sum())}
            npos += int(np.sum(~diff))
        d = detections.get(name, {"image_ids": [], "scores": np.zeros(0), "polygons": np.zeros((0, 8))})
        ids, conf = d["image_ids"], np.asarray(d["scores"], dtype=np.float64)
        bbs = np.asarray(d["polygons"], dtype=np.float64).reshape(-1, 8)
        order = np.argsort(-conf, kind="stable")
        tp, fp = np.zeros(len(order)), np.zeros(len(order))
        for rank, k in enumerate(order):
            R, bb = recs[ids[k]], bbs[k]
            BBGT = R["poly"]
            ovmax, jmax = -np.inf, -1
            if BBGT.size > 0:
                ixmin = np.maximum(BBGT[:, 0::2].min(1), bb[0::2].min())
                iymin = np.maximum(BBGT[:, 1::2].min(1), bb[1::2].min())
                ixmax = np.minimum(BBGT[:, 0::2].max(1), bb[0::2].max())
                iymax = np.minimum(BBGT[:, 1::2].max(1), bb[1::2].max())
                iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
                ih = np.maximum(iymax - iymin + 1.0, 0.0)
                keep = np.flatnonzero(iw * ih > 0)
                if len(keep):
                    overlaps = [shapely_iou(BBGT[g].reshape(4, 2), bb.reshape(4, 2)) for g in keep]
                    ovmax, jmax = np.max(overlaps), keep[int(np.argmax(overlaps))]
            if ovmax > thr:
                if not R["difficult"][jmax]:
                    if not R["det"][jmax]:
                        tp[rank] = 1.0
                        R["det"][jmax] = True
                    else:
                        fp[rank] = 1.0
            else:
                fp[rank] = 1.0
        entry = {"num_gt": npos, "tp": tp, "fp": fp, "order": order, "voc07": None, "area": None}
        out[name] = entry
        if npos == 0:
            continue
        ctp, cfp = np.cumsum(tp), np.cumsum(fp)
        rec = ctp / float(npos)
        prec = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        entry.update(voc07=devkit_voc_ap(rec, prec, True), area=devkit_voc_ap(rec, prec, False),
                     recall=rec, precision=prec)
    return out


def mmrotate_ground_truth(gt, difficulty=100):
    """mmrotate DOTADataset loading: image id -> (le90 boxes ``(n, 5)`` float32, labels ``(n,)``)."""
    out = {}
    for image_id, ann in gt.items():
        boxes, labels = [], []
        for poly, label, diff in zip(np.asarray(ann.polygons), np.asarray(ann.labels), np.asarray(ann.difficult)):
            obb = poly2obb_le90(np.asarray(poly, dtype=np.float32))
            if obb is None:  # mmrotate: ``except: continue``
                continue
            if int(diff) > difficulty:
                continue
            boxes.append(obb)
            labels.append(int(label))
        out[image_id] = (np.array(boxes, dtype=np.float32).reshape(-1, 5), np.array(labels, dtype=np.int64))
    return out


def mmdet_average_precision(tp: np.ndarray, fp: np.ndarray, num_gts: int, mode: str) -> float:
    """eval_rbbox_map's precision/recall and mmdet's ``average_precision`` for one class, with their dtypes."""
    tp = np.cumsum(tp.astype(np.float32))[None]
    fp = np.cumsum(fp.astype(np.float32))[None]
    eps = np.finfo(np.float32).eps
    recalls = tp / np.maximum(np.array([num_gts], dtype=int)[:, None], eps)
    precisions = tp / np.maximum(tp + fp, eps)
    ap = np.zeros(1, dtype=np.float32)
    if mode == "area":
        mrec = np.hstack((np.zeros((1, 1), recalls.dtype), recalls, np.ones((1, 1), recalls.dtype)))
        mpre = np.hstack((np.zeros((1, 1), recalls.dtype), precisions, np.zeros((1, 1), recalls.dtype)))
        for i in range(mpre.shape[1] - 1, 0, -1):
            mpre[:, i - 1] = np.maximum(mpre[:, i - 1], mpre[:, i])
        ind = np.where(mrec[0, 1:] != mrec[0, :-1])[0]
        ap[0] = np.sum((mrec[0, ind + 1] - mrec[0, ind]) * mpre[0, ind + 1])
    else:
        for thr in np.arange(0, 1 + 1e-3, 0.1):
            precs = precisions[0, recalls[0, :] >= thr]
            ap[0] += precs.max() if precs.size > 0 else 0
        ap /= 11
    return float(ap[0]), recalls[0], precisions[0]


def mmrotate_eval(mm_gt, detections, names, thr):
    """eval_rbbox_map / tpfp_default at one threshold: ``{name: {"voc07", "area", "num_gt", "tp", "fp", "order"}}``."""
    image_ids = list(mm_gt)
    out = {}
    for c, name in enumerate(names):
        d = detections.get(name, {"image_ids": [], "scores": np.zeros(0), "boxes": np.zeros((0, 5))})
        ids = np.asarray(d["image_ids"], dtype=object)
        per_image = {}
        for k, image_id in enumerate(ids):
            per_image.setdefault(image_id, []).append(k)
        tps, fps, scores, index = [], [], [], []
        num_gts = 0
        for image_id in image_ids:
            boxes, labels = mm_gt[image_id]
            gtb = boxes[labels == c]
            num_gts += len(gtb)
            idx = np.asarray(per_image.get(image_id, []), dtype=np.int64)
            det = np.asarray(d["boxes"], dtype=np.float64)[idx].reshape(-1, 5)
            sc = np.asarray(d["scores"], dtype=np.float64)[idx]
            tp, fp = np.zeros(len(idx), np.float32), np.zeros(len(idx), np.float32)
            if len(gtb) == 0:
                fp[:] = 1
            elif len(idx):
                ious = rotated_iou_matrix(det, gtb.astype(np.float64))
                ious_max, ious_argmax = ious.max(axis=1), ious.argmax(axis=1)
                covered = np.zeros(len(gtb), dtype=bool)
                for i in np.argsort(-sc):
                    if ious_max[i] >= thr:
                        m = ious_argmax[i]
                        if not covered[m]:
                            covered[m] = True
                            tp[i] = 1
                        else:
                            fp[i] = 1
                    else:
                        fp[i] = 1
            tps.append(tp)
            fps.append(fp)
            scores.append(sc)
            index.append(idx)
        scores = np.concatenate(scores) if scores else np.zeros(0)
        sort_inds = np.argsort(-scores)
        tp, fp = np.concatenate(tps)[sort_inds], np.concatenate(fps)[sort_inds]
        entry = {"num_gt": num_gts, "tp": tp, "fp": fp, "order": np.concatenate(index)[sort_inds],
                 "voc07": None, "area": None}
        if num_gts > 0:
            entry["voc07"], entry["recall"], entry["precision"] = mmdet_average_precision(tp, fp, num_gts, "11points")
            entry["area"] = mmdet_average_precision(tp, fp, num_gts, "area")[0]
        out[name] = entry
    return out


# ----------------------------------------------------------------------------------------------------
# Ours
# ----------------------------------------------------------------------------------------------------

def has_protocols() -> bool:
    return "protocol" in inspect.signature(evaluate_detections).parameters


def ours(gt, detections, names, protocol, thresholds=THRESHOLDS, use_07_metric=True, difficulty=100):
    """:func:`evaluate_detections` with one protocol; devkit detections as Task1 polygons, mmrotate's as le90 boxes."""
    key = "polygons" if protocol == "dota_devkit" else "boxes"
    dets = {n: {"image_ids": d["image_ids"], "scores": d["scores"], key: d[key]} for n, d in detections.items()}
    kwargs = {"iou_thresholds": thresholds, "use_07_metric": use_07_metric, "protocol": protocol}
    if protocol == "mmrotate":
        kwargs["difficulty_threshold"] = difficulty
    return evaluate_detections(gt, dets, names, **kwargs)


def ap_name(t: float) -> str:
    return f"AP{round(t * 100)}"


def compare(our_result, ref: dict, names, key: str, metric: str, detections, gt, protocol, max_report=3):
    """Largest |AP difference| over classes, and a description of the first differing detections."""
    worst, notes = 0.0, []
    for name in names:
        a, b = our_result["classes"][name].get(key), ref[name][metric]
        if a is None and b is None:
            continue
        if a is None or b is None:
            worst = math.inf
            notes.append(f"{name} {key} {metric}: ours {a} reference {b} (num_gt ref {ref[name]['num_gt']}, "
                         f"ours {our_result['classes'][name].get('num_gt')})")
            continue
        diff = abs(a - b)
        worst = max(worst, diff)
        if diff > 0 and len(notes) < max_report:
            notes.append(f"{name} {key} {metric}: ours {a!r} reference {b!r} (num_gt ours "
                         f"{our_result['classes'][name].get('num_gt')}, reference {ref[name]['num_gt']}); "
                         + first_difference(our_result, ref[name], name, key, detections, gt, protocol))
    return worst, notes


def first_difference(our_result, ref_entry, name, key, detections, gt, protocol) -> str:
    """Where the precision-recall curves part (both rank detections by their distinct scores)."""
    curve = our_result.get("pr_curves", {}).get(name, {}).get(key)
    if curve is None or "recall" not in ref_entry:
        return "no PR curve to compare"
    r1, p1 = np.asarray(curve["recall"], np.float64), np.asarray(curve["precision"], np.float64)
    r2, p2 = np.asarray(ref_entry["recall"], np.float64), np.asarray(ref_entry["precision"], np.float64)
    if len(r1) != len(r2):
        return f"PR curves of different lengths ({len(r1)} vs {len(r2)})"
    bad = np.flatnonzero((np.abs(r1 - r2) > 1e-12) | (np.abs(p1 - p2) > 1e-6))
    if not len(bad):
        return "same TP/FP sequence (difference in AP arithmetic only)"
    r = int(bad[0])
    k = int(ref_entry["order"][r])
    d = detections[name]
    verdict = "TP" if ref_entry["tp"][r] else ("FP" if ref_entry["fp"][r] else "ignored")
    return (f"first at rank {r}: detection #{k} of {name!r} on {d['image_ids'][k]} score {float(d['scores'][k])!r} "
            f"le90 {d['boxes'][k].tolist()} polygon {d['polygons'][k].tolist()}: reference says {verdict} "
            f"(recall {r2[r]:.6f} vs ours {r1[r]:.6f}, precision {p2[r]:.6f} vs ours {p1[r]:.6f})")


# ----------------------------------------------------------------------------------------------------
# Hand cases
# ----------------------------------------------------------------------------------------------------

def _ann(polys, labels, difficult):
    p = np.asarray(polys, dtype=np.float64).reshape(-1, 8)
    return ImageAnnotations(image_id="img", polygons=p, labels=np.asarray(labels, np.int64),
                            difficult=np.asarray(difficult, np.int8))


def _dets(boxes, scores, polygons=None):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    polys = obb_corners(boxes).reshape(-1, 8) if polygons is None else np.asarray(polygons, np.float64).reshape(-1, 8)
    return {"image_ids": np.array(["img"] * len(boxes), dtype=object), "scores": np.asarray(scores, np.float64),
            "boxes": boxes, "polygons": polys}


def hand_cases():
    """(description, gt, detections, expected {(protocol, difficulty, key): AP}) with one class ``a``."""
    sq = [0, 0, 2, 0, 2, 2, 0, 2]
    concave = [0, 0, 4, 0, 1, 1, 0, 4]  # area 4; its minimum-area rectangle has area 16
    rect_of_concave = obb_corners(np.array([poly2obb_le90(concave)])).reshape(8)
    return [
        ("IoU exactly 0.5 (2 x 2 box in a 4 x 2 label, angle 0 exactly on both sides): devkit needs >, mmrotate "
         "takes >=", {"img": _ann([[0, 0, 4, 0, 4, 2, 0, 2]], [0], [0])}, {"a": _dets([[1, 1, 2, 2, 0]], [0.9])},
         {("dota_devkit", 100, "AP50"): 0.0, ("mmrotate", 100, "AP50"): 1.0}),
        ("hit on a difficult object: devkit ignores it; mmrotate counts it (difficulty 100) or drops it (0)",
         {"img": _ann([sq, [10, 0, 12, 0, 12, 2, 10, 2]], [0, 0], [1, 0])},
         {"a": _dets([[1, 1, 2, 2, 0], [11, 1, 2, 2, 0]], [0.9, 0.8])},
         {("dota_devkit", 100, "AP50"): 1.0, ("mmrotate", 100, "AP50"): 1.0, ("mmrotate", 0, "AP50"): 0.5}),
        ("duplicate: the second detection on a claimed object is FP",
         {"img": _ann([sq], [0], [0])}, {"a": _dets([[1, 1, 2, 2, 0], [1.01, 1, 2, 2, 0]], [0.9, 0.8])},
         {("dota_devkit", 100, "AP50"): 1.0, ("mmrotate", 100, "AP50"): 1.0}),
        ("concave label, detection = its minimum-area rectangle: polygon IoU 0.25, rectangle IoU 1",
         {"img": _ann([concave], [0], [0])}, {"a": _dets([poly2obb_le90(concave)], [0.9], [rect_of_concave])},
         {("dota_devkit", 100, "AP50"): 0.0, ("mmrotate", 100, "AP50"): 1.0}),
        # Found by the parity run (seed 5, scale 0.1, ship on P0032): the le90 box must be minAreaRect's own
        # centre, size and angle (poly2obb_np_le90), not one rebuilt from cv2.boxPoints' float32 corners,
        # which moves h and the angle by ~1e-5 and this IoU from 0.7499991 to 0.7500007.
        ("mmrotate label box = minAreaRect's (centre, size, angle): IoU 0.7499991 < 0.75",
         {"img": _ann([[541, 1142, 557, 1138, 565, 1180, 550, 1181]], [0], [0])},
         {"a": _dets([[553.8150634765625, 1158.778564453125, 38.13111877441406, 14.36171817779541,
                       1.338976502418518]], [0.9])},
         {("mmrotate", 100, "AP75"): 0.0, ("mmrotate", 100, "AP50"): 1.0}),
        # Found by the parity run (seed 0, scale 1, ship on P0094): true IoU 0.771; torchvision's float32
        # rotated IoU gives 0.276 on the box rebuilt from boxPoints (0.771 on poly2obb_np_le90's box).
        ("mmrotate: rotated IoU 0.771 (float32 rotated-IoU kernels can return 0.276 on a nearby box)",
         {"img": _ann([[303, 941, 310, 982, 296, 985, 291, 944]], [0], [0])},
         {"a": _dets([[299.76019287109375, 961.8783569335938, 41.259796142578125, 11.564172744750977,
                       1.4475479125976562]], [0.9])},
         {("mmrotate", 100, "AP50"): 1.0, ("dota_devkit", 100, "AP50"): 1.0}),
        ("sliver 10 x 1: mmrotate drops it (no positives), the devkit keeps it",
         {"img": _ann([[0, 0, 10, 0, 10, 1, 0, 1], sq], [0, 0], [0, 0])},
         {"a": _dets([[5, 0.5, 10, 1, 0], [1, 1, 2, 2, 0]], [0.9, 0.8])},
         {("dota_devkit", 100, "AP50"): 1.0, ("mmrotate", 100, "AP50"): 0.5}),
    ]


def run_hand_cases(check_ours: bool) -> list[str]:
    """Failures of the reference loops (and of ours if ``check_ours``) on the hand cases; geometry checks first."""
    failures = []
    # Geometry: shapely IoU of two 2 x 2 squares offset by 1 is 2 / 6.
    a, b = np.array([0, 0, 2, 0, 2, 2, 0, 2.0]).reshape(4, 2), np.array([1, 0, 3, 0, 3, 2, 1, 2.0]).reshape(4, 2)
    if abs(shapely_iou(a, b) - 1 / 3) > 1e-15:
        failures.append("shapely IoU of offset squares")
    # Concave label against the unit square inside it: 1 / 4.
    if abs(shapely_iou(np.array([0, 0, 4, 0, 1, 1, 0, 4.0]).reshape(4, 2),
                       np.array([0, 0, 1, 0, 1, 1, 0, 1.0]).reshape(4, 2)) - 0.25) > 1e-15:
        failures.append("shapely IoU of a concave label")
    # Rectangles (integer, rotated too): the devkit's polygon IoU and mmrotate's rectangle IoU agree.
    rng = np.random.default_rng(1)
    for rect in ([0, 0, 8, 6, 5, 10, -3, 4], [3, 2, 3, 9, 24, 9, 24, 2], [0, 0, 12, -5, 17, 7, 5, 12]):
        obb = np.array([poly2obb_le90(rect)])
        for _ in range(20):
            det = wrap_le90(obb + np.concatenate([rng.normal(0, 1, 2), rng.normal(0, 0.5, 2), rng.normal(0, 0.1, 1)]))
            devkit = shapely_iou(np.reshape(rect, (4, 2)).astype(float), obb_corners(det)[0])
            mm = rotated_iou_matrix(det, obb)[0, 0]
            if abs(devkit - mm) > 1e-5:
                failures.append(f"rectangle {rect}: polygon IoU {devkit} != rotated IoU {mm}")
    # poly2obb: le90 range, w >= h, and the same rectangle as cv2.boxPoints.
    for _ in range(200):
        poly = np.rint(rng.uniform(-50, 50, 8))
        obb = poly2obb_le90(poly)
        if obb is None:
            continue
        x, y, w, h, t = obb
        rect = cv2.boxPoints(cv2.minAreaRect(poly.astype(np.float32).reshape(4, 2))).astype(np.float64)
        if not (w >= h and -np.pi / 2 <= t < np.pi / 2) or \
                shapely_iou(obb_corners(np.array([obb]))[0], rect) < 1 - 1e-5:
            failures.append(f"poly2obb_le90 of {poly.tolist()} gave {obb}")
            break
    if poly2obb_le90([0, 0, 10, 0, 10, 1, 0, 1]) is not None or poly2obb_le90([0, 0, 10, 0, 10, 2, 0, 2]) is None:
        failures.append("poly2obb_le90 drop rule (side < 2)")
    # AP hand cases.
    for desc, gt, dets, expected in hand_cases():
        for (protocol, difficulty, key), want in expected.items():
            thr = 0.5 if key == "AP50" else 0.75
            if protocol == "dota_devkit":
                got = devkit_voc_eval(gt, dets, ["a"], thr)["a"]["voc07"]
            else:
                got = mmrotate_eval(mmrotate_ground_truth(gt, difficulty), dets, ["a"], thr)["a"]["voc07"]
            if got is None or abs(got - want) > 1e-6:
                failures.append(f"reference {protocol} (difficulty {difficulty}) {key}: {desc}: {got} != {want}")
            if check_ours:
                try:
                    res = ours(gt, dets, ["a"], protocol, thresholds=(thr,), difficulty=difficulty)
                    mine = res["classes"]["a"][key]
                except Exception as exc:  # report, do not stop the benchmark
                    mine = f"error {type(exc).__name__}: {exc}"
                if not isinstance(mine, float) or abs(mine - want) > 1e-6:
                    failures.append(f"ours {protocol} (difficulty {difficulty}) {key}: {desc}: {mine} != {want}")
    return failures


# ----------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------

def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


class PeakRSS:
    """Peak resident memory above the start of a phase: VmHWM after resetting it (``/proc/self/clear_refs`` 5)."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        self.start = _status_kb("VmRSS") or 0
        return self

    def __exit__(self, *exc):
        hwm = _status_kb("VmHWM") if self.resettable else None
        if hwm is None:  # ru_maxrss: not resettable, the peak of the whole process so far
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mb = (hwm - self.start) / 1024
        return False


def tracemalloc_peak_mb(fn) -> float:
    """Peak of tracemalloc (numpy arrays and Python objects; not torch's own buffers) while ``fn`` runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2 ** 20
    finally:
        tracemalloc.stop()


def reference_mean(ref: dict, names, protocol) -> float:
    """mAP as the reference tool forms it, over the classes with positives (VOC07 APs).

    The devkit's ``main``: ``map = map + ap`` class by class, then ``/ len(classnames)`` (float64; with a
    class without positives it would average a NaN in). mmrotate: ``np.array(aps).mean().item()`` of the
    float32 APs of the classes with ``num_gts > 0``.
    """
    aps = [ref[n]["voc07"] for n in names if ref[n]["voc07"] is not None]
    if protocol == "dota_devkit":
        total = 0.0
        for ap in aps:
            total = total + ap
        return total / len(aps)
    return np.array([np.float32(ap) for ap in aps]).mean().item()


def bench_protocol(protocol, gt, detections, names, difficulty, timed: bool, tolerance: float, rounds: int = 1):
    """Parity (VOC07 and all-points, AP50 and AP75) and timings of one protocol; returns (worst, lines).

    With ``rounds`` > 1 the timed comparison at 0.5 + 0.75 is repeated that many times, ours (best of
    ``OURS_REPEATS`` calls) and the loop (once per threshold) one after the other in each round, and the
    median of the rounds' ratios is printed beside them (timings move with the machine's load)."""
    label = protocol if protocol == "dota_devkit" else f"mmrotate (difficulty {difficulty})"
    lines = [f"protocol {label}:"]
    timings, mem = {}, {}
    res = {}
    for use_07 in (True, False):
        for thresholds in ((0.5, 0.75), (0.5,)) if use_07 else ((0.5, 0.75),):
            runs = OURS_REPEATS if timed and use_07 else 1
            for _ in range(runs):  # ours takes well under a second: best of a few calls against scheduling noise
                with PeakRSS() as peak:
                    t0 = time.perf_counter()
                    res[(use_07, thresholds)] = ours(gt, detections, names, protocol, thresholds, use_07, difficulty)
                    seconds = time.perf_counter() - t0
                key = ("ours", use_07, thresholds)
                timings[key] = min(timings.get(key, math.inf), seconds)
                mem[key] = max(mem.get(key, 0.0), peak.mb)
    ref = {}
    mm_gt_time = 0.0
    if protocol == "mmrotate":
        t0 = time.perf_counter()
        mm_gt = mmrotate_ground_truth(gt, difficulty)
        mm_gt_time = time.perf_counter() - t0
    for thr in THRESHOLDS:
        with PeakRSS() as peak:
            t0 = time.perf_counter()
            ref[thr] = devkit_voc_eval(gt, detections, names, thr) if protocol == "dota_devkit" \
                else mmrotate_eval(mm_gt, detections, names, thr)
            timings[("loop", thr)] = time.perf_counter() - t0
        mem[("loop", thr)] = peak.mb
    worst, notes = 0.0, []
    parts = []
    for use_07, metric in ((True, "voc07"), (False, "area")):
        for thr in THRESHOLDS:
            w, n = compare(res[(use_07, (0.5, 0.75))], ref[thr], names, ap_name(thr), metric, detections, gt, protocol)
            worst = max(worst, w)
            notes += n
            parts.append(f"{ap_name(thr)} {'VOC07' if use_07 else 'all-points'} {w:.1e}")
    lines.append("  parity: max per-class |AP ours - reference loop|: " + ", ".join(parts)
                 + ("   OK" if worst <= tolerance else "   FAIL"))
    seen = set()
    for n in notes:  # one line per class and first differing detection (all keys / metrics share it)
        head, _, where = n.partition("; ")
        key = (head.split()[0], where)
        if key not in seen:
            seen.add(key)
            lines.append(f"    {n}")
    mean = res[(True, (0.5, 0.75))]["mean"]
    ref_mean = {thr: reference_mean(ref[thr], names, protocol) for thr in THRESHOLDS}
    mean_diff = max(abs(mean[ap_name(t)] - ref_mean[t]) for t in THRESHOLDS)
    lines.append(f"  mAP VOC07: ours AP50 {mean['AP50']:.6f} AP75 {mean['AP75']:.6f}; "
                 f"reference AP50 {ref_mean[0.5]:.6f} AP75 {ref_mean[0.75]:.6f}; |difference| {mean_diff:.1e}"
                 + (" (rounding of the sum over classes only)" if 0 < mean_diff < 1e-12 else "")
                 + f"; positives {sum(ref[0.5][n]['num_gt'] for n in names)}")
    if mean_diff >= 1e-12:  # per-class APs decide; a last-bit difference of the class sum is reported only
        worst = max(worst, mean_diff)
    round_ratios = []
    if timed:
        round_ratios.append((timings[("loop", 0.5)] + timings[("loop", 0.75)]) / timings[("ours", True, (0.5, 0.75))])
        for _ in range(rounds - 1):
            mine = math.inf
            for _ in range(OURS_REPEATS):
                t0 = time.perf_counter()
                ours(gt, detections, names, protocol, THRESHOLDS, True, difficulty)
                mine = min(mine, time.perf_counter() - t0)
            t0 = time.perf_counter()
            for thr in THRESHOLDS:
                if protocol == "dota_devkit":
                    devkit_voc_eval(gt, detections, names, thr)
                else:
                    mmrotate_eval(mm_gt, detections, names, thr)
            round_ratios.append((time.perf_counter() - t0) / mine)
    if timed:
        o50, o_both = timings[("ours", True, (0.5,))], timings[("ours", True, (0.5, 0.75))]
        l50, l75 = timings[("loop", 0.5)], timings[("loop", 0.75)]
        extra = f" + {mm_gt_time:.2f} s poly2obb of the labels (once)" if protocol == "mmrotate" else ""
        lines.append(f"  time (ours: best of {OURS_REPEATS} calls; loop: one run per threshold)")
        lines.append(f"  IoU 0.5 only      ours {o50:7.2f} s   loop {l50:7.2f} s   speed-up x{l50 / o50:.1f}")
        lines.append(f"  IoU 0.5 and 0.75  ours {o_both:7.2f} s   loop {l50 + l75:7.2f} s   speed-up "
                     f"x{(l50 + l75) / o_both:.1f}{extra}   (the loop evaluates one threshold per run; target >= x20)")
        if len(round_ratios) > 1:
            lines.append(f"  IoU 0.5 and 0.75, {len(round_ratios)} interleaved rounds: speed-up median "
                         f"x{statistics.median(round_ratios):.1f} (rounds: {', '.join(f'{r:.1f}' for r in round_ratios)})")
        traced = tracemalloc_peak_mb(lambda: ours(gt, detections, names, protocol, THRESHOLDS, True, difficulty))
        loop_mb = max(mem[("loop", 0.5)], mem[("loop", 0.75)])
        lines.append(f"  peak memory: RSS above the phase's start (VmHWM): ours (0.5 + 0.75) "
                     f"{mem[('ours', True, (0.5, 0.75))]:.0f} MB, loop {loop_mb:.0f} MB; "
                     f"tracemalloc (numpy and Python objects, not torch's buffers; separate untimed call): "
                     f"ours {traced:.0f} MB")
    return worst, lines, res


# ----------------------------------------------------------------------------------------------------
# Whole processes: `mutdet evaluate` against the DOTA devkit's dota_evaluation_task1.py
# ----------------------------------------------------------------------------------------------------

# Driver of the devkit's own ``voc_eval`` (what its ``main`` does, with the paths as arguments): one process
# per IoU threshold, as the devkit is run; nothing of the devkit is changed. (Its ``np.bool`` exists again
# in NumPy >= 2; on NumPy 1.24-1.26 the devkit itself fails.)
DEVKIT_DRIVER = """\
import json, sys
devkit, detpath, annopath, imagesetfile, thr, classes, out = sys.argv[1:8]
sys.path.insert(0, devkit)
import matplotlib
matplotlib.use("Agg")
import dota_evaluation_task1 as dk
aps = {}
for c in classes.split(","):
    rec, prec, ap = dk.voc_eval(detpath, annopath, imagesetfile, c, ovthresh=float(thr), use_07_metric=True)
    aps[c] = float(ap)
open(out, "w").write(json.dumps(aps))
"""


def write_whole_scene(folder: Path, gt, detections, names) -> dict:
    """Write the scene as a DOTA split (PNG images, ``labelTxt``), Task1 files, a list file and a config.

    Each image is just large enough to hold every object and detection (its pixels are blank: neither
    tool decodes them); objects entirely outside it (negative coordinates) are left out of its label
    file, so both tools read the same objects. Label coordinates are the integers of the scene."""
    from mutdet.io.task1 import write_task1

    root = folder / "dota"
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labelTxt").mkdir(parents=True, exist_ok=True)
    det_max = {}
    for d in detections.values():
        for image_id, poly in zip(d["image_ids"], d["polygons"]):
            det_max[image_id] = np.maximum(det_max.get(image_id, 0.0), poly.reshape(4, 2).max(axis=0))
    kept = 0
    for image_id, ann in gt.items():
        pts = np.asarray(ann.polygons, dtype=np.float64).reshape(-1, 4, 2)
        top = np.maximum(pts.max(axis=(0, 1)) if len(pts) else 0.0, det_max.get(image_id, 0.0))
        width, height = (int(v) + 2 for v in np.maximum(top, 16))
        inside = shapely.area(shapely.intersection(shapely.polygons(pts), shapely.box(0, 0, width, height))) > 0 \
            if len(pts) else np.zeros(0, bool)
        kept += int(inside.sum())
        lines = ["imagesource:GoogleEarth", "gsd:0.146"]
        lines += [" ".join(f"{v:.0f}" for v in poly) + f" {names[c]} {int(diff)}"
                  for poly, c, diff, keep in zip(ann.polygons, ann.labels, ann.difficult, inside) if keep]
        (root / "labelTxt" / f"{image_id}.txt").write_text("\n".join(lines) + "\n")
        cv2.imwrite(str(root / "images" / f"{image_id}.png"), np.zeros((height, width), np.uint8),
                    [cv2.IMWRITE_PNG_COMPRESSION, 1])
    (root / "valset.txt").write_text("".join(f"{i}\n" for i in gt))
    ids = np.concatenate([d["image_ids"] for d in detections.values()])
    cls = np.concatenate([np.full(len(d["scores"]), n, dtype=object) for n, d in detections.items()])
    write_task1(folder / "task1", ids, cls, np.concatenate([d["scores"] for d in detections.values()]),
                np.concatenate([d["polygons"] for d in detections.values()]), names)
    config = {"datasets": {"dotaval": {"root": str(root), "format": "dota", "classes": list(names),
                                       "splits": {"val": {}}, "evaluation": {"protocol": "dota_devkit"}}}}
    (folder / "config.json").write_text(json.dumps(config))
    return {"root": root, "task1": folder / "task1", "config": folder / "config.json", "objects": kept}


# Starts one command and reports its wall time and ``os.wait4`` resource usage as JSON on stdout. It runs in
# a small Python process of its own: a child forked straight from this benchmark would report this
# benchmark's peak RSS (``ru_maxrss`` keeps the high-water mark from before ``exec``).
LAUNCHER = """\
import json, os, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = proc.stderr.read()
_, status, ru = os.wait4(proc.pid, 0)
print(json.dumps({"wall": time.perf_counter() - t0, "cpu": ru.ru_utime + ru.ru_stime, "rss_kb": ru.ru_maxrss,
                  "rc": os.waitstatus_to_exitcode(status), "stderr": err.decode(errors="replace")[-3000:]}))
"""


def run_process(cmd: list[str], env: dict | None = None) -> dict:
    """Run one command to its end: wall seconds, CPU seconds (user + system) and peak RSS (MB) of that
    process alone (``os.wait4``'s ``ru_maxrss``, what GNU ``time -v`` reports), through :data:`LAUNCHER`."""
    out = subprocess.run([sys.executable, "-c", LAUNCHER, *map(str, cmd)], env=env, capture_output=True, text=True,
                         check=True)
    res = json.loads(out.stdout)
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {res['rc']}:\n{res['stderr']}")
    return {"wall": res["wall"], "cpu": res["cpu"], "rss_mb": res["rss_kb"] / 1024}


def mutdet_command() -> list[str]:
    """``mutdet`` as installed beside this Python, else ``python -m mutdet.cli``."""
    exe = Path(sys.executable).with_name("mutdet")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "mutdet.cli"]


def bench_whole(gt, detections, names, devkit: Path | None, repeats: int, workdir: Path | None,
                tag: str) -> tuple[float, list]:
    """``mutdet evaluate --protocol dota_devkit`` (AP50 + AP75 in one process) against the devkit's
    ``dota_evaluation_task1.py`` run once per threshold, as whole processes, interleaved ``repeats``
    times (the order alternating); medians and the median of the per-round ratios. The scene is written
    to a temporary folder, or kept in ``workdir/evaluation-whole-<tag>`` and reused from there. Returns
    the largest per-class |AP difference| (0 if the devkit did not run) and the lines to print."""
    lines = ["whole processes (AP50 + AP75, protocol dota_devkit):"]
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mutdet-eval-whole-")
        folder = Path(tmp.name)
    else:
        folder = workdir / f"evaluation-whole-{tag}"
    t0 = time.perf_counter()
    done = folder / "scene.json"
    if done.is_file():
        scene = {k: Path(v) if k != "objects" else v for k, v in json.loads(done.read_text()).items()}
    else:
        scene = write_whole_scene(folder, gt, detections, names)
        done.write_text(json.dumps({k: str(v) if k != "objects" else v for k, v in scene.items()}))
    lines.append(f"  scene in {folder} ({time.perf_counter() - t0:.1f} s to write or find; {len(gt)} images, "
                 f"{scene['objects']} objects in the label files, {sum(len(d['scores']) for d in detections.values())}"
                 " Task1 lines)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MPLBACKEND": "Agg"}
    ours_cmd = mutdet_command() + ["evaluate", "--config", str(scene["config"]), "--dataset", "dotaval",
                                   "--split", "val", "--task1-dir", str(scene["task1"]), "--out",
                                   str(folder / "ours"), "--protocol", "dota_devkit"]
    devkit_ok, why = devkit is not None, "no --devkit folder given"
    if devkit is not None:
        if not (devkit / "dota_evaluation_task1.py").is_file():
            devkit_ok, why = False, f"{devkit} has no dota_evaluation_task1.py"
        elif not any(devkit.glob("_polyiou*")):
            devkit_ok, why = False, f"{devkit} has no built _polyiou extension (swig -c++ -python polyiou.i; " \
                                    "python setup.py build_ext --inplace)"
    driver = folder / "devkit_driver.py"
    driver.write_text(DEVKIT_DRIVER)

    def devkit_cmd(thr):
        return [sys.executable, str(driver), str(devkit), str(scene["task1"] / "Task1_{:s}.txt"),
                str(scene["root"] / "labelTxt" / "{:s}.txt"), str(scene["root"] / "valset.txt"), str(thr),
                ",".join(names), str(folder / f"devkit_{thr}.json")]

    ours_runs, devkit_runs = [], []
    for r in range(repeats):
        order = ("ours", "devkit") if r % 2 == 0 else ("devkit", "ours")
        for who in order:
            if who == "ours":
                ours_runs.append(run_process(ours_cmd, env))
            elif devkit_ok:
                runs = [run_process(devkit_cmd(t), env) for t in THRESHOLDS]
                devkit_runs.append({"wall": sum(x["wall"] for x in runs), "cpu": sum(x["cpu"] for x in runs),
                                    "rss_mb": max(x["rss_mb"] for x in runs)})
    med = {k: statistics.median(x[k] for x in ours_runs) for k in ("wall", "cpu", "rss_mb")}
    lines.append(f"  ours   (mutdet evaluate --task1-dir ... --protocol dota_devkit, one process): median of {repeats}: "
                 f"wall {med['wall']:.2f} s, CPU {med['cpu']:.2f} s, peak RSS {med['rss_mb']:.0f} MB "
                 f"(max {max(x['rss_mb'] for x in ours_runs):.0f} MB; target <= 300)")
    metrics = json.loads((folder / "ours" / "metrics.json").read_text())
    worst = 0.0
    if not devkit_ok:
        lines.append(f"  devkit: not run ({why})")
        return worst, lines
    dmed = {k: statistics.median(x[k] for x in devkit_runs) for k in ("wall", "cpu", "rss_mb")}
    ratios = [d["wall"] / o["wall"] for o, d in zip(ours_runs, devkit_runs)]
    cpu_ratios = [d["cpu"] / o["cpu"] for o, d in zip(ours_runs, devkit_runs)]
    lines.append(f"  devkit (dota_evaluation_task1.py voc_eval, one process per threshold): median of {repeats}: "
                 f"wall {dmed['wall']:.2f} s, CPU {dmed['cpu']:.2f} s, peak RSS {dmed['rss_mb']:.0f} MB")
    lines.append(f"  speed-up (median of the per-round ratios): wall x{statistics.median(ratios):.1f} "
                 f"(rounds: {', '.join(f'{x:.1f}' for x in ratios)}), CPU x{statistics.median(cpu_ratios):.1f}; "
                 "target >= x10")
    parts = []
    for thr in THRESHOLDS:
        ref = json.loads((folder / f"devkit_{thr}.json").read_text())
        diff = max(abs(metrics["classes"][n][ap_name(thr)] - ref[n]) for n in names)
        worst = max(worst, diff)
        parts.append(f"{ap_name(thr)} {diff:.1e}")
    lines.append("  parity with the devkit: max per-class |AP ours - devkit|: " + ", ".join(parts))
    return worst, lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="images, objects and detections relative to DOTA-v1.0 val (default 1.0)")
    parser.add_argument("--quick", action="store_true", help="same as --scale 0.05")
    parser.add_argument("--protocols", default="dota_devkit,mmrotate")
    parser.add_argument("--difficulty", type=int, nargs="+", default=[100, 0],
                        help="mmrotate difficulty thresholds to check (the first is timed; default 100 0)")
    parser.add_argument("--tolerance", type=float, default=0.0, help="largest |AP difference| accepted (default 0)")
    parser.add_argument("--self-test", action="store_true", help="hand cases only")
    parser.add_argument("--whole", action="store_true",
                        help="also time `mutdet evaluate` and the DOTA devkit as whole processes (see --devkit)")
    parser.add_argument("--whole-only", action="store_true", help="only the whole-process comparison")
    parser.add_argument("--devkit", type=Path, help="folder of the DOTA devkit with its _polyiou extension built")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the whole-process runs")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of the timed in-process comparison (ours, then the loop; median ratio)")
    parser.add_argument("--workdir", type=Path, help="where the whole-process scene is written (default: temp)")
    args = parser.parse_args(argv)
    scale = 0.05 if args.quick else args.scale

    new_api = has_protocols()
    failures = run_hand_cases(check_ours=new_api)
    print(f"hand cases (reference loops{' and ours' if new_api else ''}): "
          f"{'all passed' if not failures else f'{len(failures)} FAILED'}")
    for f in failures:
        print(f"  {f}")
    if args.self_test:
        return 1 if failures else 0
    if not new_api:
        print("evaluate_detections has no `protocol` argument yet: nothing to compare", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    gt, detections, names, kinds = make_scene(args.seed, scale)
    num_obj = sum(len(a.labels) for a in gt.values())
    diff = np.concatenate([a.difficult for a in gt.values()])
    num_det = sum(len(d["scores"]) for d in detections.values())
    per_image_class = [int(np.sum(a.labels == c)) for a in gt.values() for c in range(len(names))]
    print(f"scene (scale {scale:g}, seed {args.seed}): {len(gt)} images, {num_obj} integer label quadrilaterals "
          f"({int(np.sum(diff == 1))} difficult 1, {int(np.sum(diff == 2))} difficult 2; "
          + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items()))
          + f"), {num_det} detections with distinct scores, {len(names)} classes; largest (image, class): "
          f"{max(per_image_class)} objects [generated in {time.perf_counter() - t0:.1f} s]")

    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    t0 = time.perf_counter()
    warm_gt, warm_dets, _ = hand_cases()[0][1:]
    for protocol in protocols:
        ours(warm_gt, warm_dets, ["a"], protocol)
    print(f"warm-up of ours on a hand case (first calls): {time.perf_counter() - t0:.2f} s, not counted")

    worst = 0.0
    if args.whole or args.whole_only:
        w, lines = bench_whole(gt, detections, names, args.devkit, args.repeats, args.workdir,
                               f"seed{args.seed}-scale{scale:g}")
        worst = max(worst, w)
        print("\n".join(lines), flush=True)
    for protocol in protocols if not args.whole_only else []:
        for k, difficulty in enumerate(args.difficulty if protocol == "mmrotate" else [100]):
            w, lines, res = bench_protocol(protocol, gt, detections, names, difficulty, timed=k == 0,
                                           tolerance=args.tolerance, rounds=args.rounds)
            worst = max(worst, w)
            print("\n".join(lines), flush=True)
    print(f"process peak RSS (ru_maxrss, everything above included): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if failures or worst > args.tolerance:
        reasons = (["hand cases failed"] if failures else []) + \
            ([f"a class AP differs by up to {worst:.2e}"] if worst > args.tolerance else [])
        print("FAIL: " + "; ".join(reasons), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
