"""Benchmark: rotated AP of ``mutdet.evaluation`` against the DOTA devkit's per-detection loop.

Generates a DOTA-val-sized problem (458 images, ~29k objects, ~80k detections, 15 classes), then
evaluates it with two implementations (VOC07 11-point AP):

* ``mutdet``: :func:`mutdet.evaluation.evaluate_detections`, once for IoU 0.5 alone and once for 0.5 + 0.75;
* ``devkit``: ``voc_eval`` of ``dota_evaluation_task1.py`` written out below, one threshold per run as
  in the devkit: for each class, for each detection in rank order, the devkit's axis-aligned
  pre-filter over the image's objects, then shapely polygon IoU with each remaining object, then the
  greedy TP/FP decision. It ranks equal scores as mutdet does (the devkit leaves their order to
  ``np.argsort``).

The scene: image sides 800-4000 px; per class a DOTA-val-like object count, spread over images with a
heavy tail (a few images hold hundreds of ships or vehicles) in clusters with a shared orientation;
class-typical sizes; 6 % difficult. Detections: 92 % of objects found (jittered box, 5 % with a wrong
class), 15 % of the found ones duplicated, the rest false positives near clusters or anywhere, scores
rounded to 3 decimals (many ties). Objects are exact rectangles, so both sides see the same boxes.

    .venv/bin/python benchmarks/evaluation.py [--seed 0]

Prints the sizes, the seconds of each implementation at IoU 0.5 alone and at 0.5 + 0.75, the speed
ratios and the mAPs; exits non-zero if any class AP differs by more than 1e-9.
"""
from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace

import numpy as np
from shapely.geometry import Polygon

from mutdet.boxes import le90_to_polygon, rotated_iou
from mutdet.evaluation import evaluate_detections

# name: (objects in DOTA-v1.0 val, approximate, typical w x h in pixels)
CLASSES = {
    "plane": (2531, (60, 55)), "baseball-diamond": (214, (120, 110)), "bridge": (464, (150, 30)),
    "ground-track-field": (144, (300, 150)), "small-vehicle": (5438, (22, 10)),
    "large-vehicle": (4387, (50, 14)), "ship": (8960, (45, 14)), "tennis-court": (760, (70, 35)),
    "basketball-court": (132, (60, 35)), "storage-tank": (2888, (35, 33)),
    "soccer-ball-field": (153, (250, 150)), "roundabout": (179, (110, 105)), "harbor": (2090, (120, 30)),
    "swimming-pool": (440, (40, 25)), "helicopter": (73, (45, 40)),
}
NUM_IMAGES = 458
NUM_DETECTIONS = 80_000


def _boxes_around(rng, n, centre, spread, size, angle, size_jitter=0.15):
    """``n`` le90-ish boxes ``(n, 5)`` scattered around ``centre`` with a shared orientation."""
    w = size[0] * np.exp(rng.normal(0, size_jitter, n))
    h = size[1] * np.exp(rng.normal(0, size_jitter, n))
    xy = centre + rng.normal(0, spread, (n, 2))
    theta = angle + rng.normal(0, 0.1, n)
    return np.column_stack([xy, w, h, theta])


def make_scene(seed: int):
    """Ground truth (image id -> record), detections (class -> arrays) and class names."""
    rng = np.random.default_rng(seed)
    names = list(CLASSES)
    image_ids = [f"P{i:04d}" for i in range(NUM_IMAGES)]
    sizes = rng.integers(800, 4001, (NUM_IMAGES, 2))
    objects = {i: [] for i in range(NUM_IMAGES)}  # image -> list of (boxes (n, 5), class)
    for c, (name, (count, size)) in enumerate(CLASSES.items()):
        hosts = rng.choice(NUM_IMAGES, min(NUM_IMAGES, max(3, count // 25)), replace=False)
        counts = rng.multinomial(count, rng.dirichlet(np.full(len(hosts), 0.4)))
        for img, n in zip(hosts, counts):
            while n > 0:  # clusters of up to 60 objects (parking lots, harbours, tank farms)
                k = int(min(n, rng.integers(1, 61)))
                spread = np.sqrt(k) * max(size) * 0.7
                centre = rng.uniform(spread, np.maximum(sizes[img] - spread, spread + 1))
                objects[img].append((_boxes_around(rng, k, centre, spread, size, rng.uniform(-1.5, 1.5)), c))
                n -= k
    gt, found = {}, []
    for i, image_id in enumerate(image_ids):
        boxes = np.concatenate([b for b, _ in objects[i]]) if objects[i] else np.zeros((0, 5))
        labels = np.concatenate([np.full(len(b), c) for b, c in objects[i]]) if objects[i] else np.zeros(0, int)
        difficult = (rng.random(len(labels)) < 0.06).astype(np.int8)
        gt[image_id] = SimpleNamespace(polygons=le90_to_polygon(boxes), labels=labels.astype(np.int64),
                                       difficult=difficult)
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
    num_fp = NUM_DETECTIONS - sum(len(s) for s in det_score)
    weights = np.array([n for n, _ in CLASSES.values()], dtype=float)
    fp_img = rng.integers(0, NUM_IMAGES, num_fp)
    fp_cls = rng.choice(len(names), num_fp, p=weights / weights.sum())
    for i in range(NUM_IMAGES):
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
    box = np.concatenate(det_box)
    score = np.round(np.concatenate(det_score), 3)
    detections = {}
    for c, name in enumerate(names):
        m = cls == c
        detections[name] = {"image_ids": np.asarray(image_ids, dtype=object)[img[m]], "scores": score[m],
                            "boxes": box[m], "polygons": le90_to_polygon(box[m])}
    return gt, detections, names


def _voc_ap(rec, prec, use_07_metric):
    """The devkit's ``voc_ap``."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def devkit_voc_eval(gt, detections, names, thr, use_07_metric=True):
    """Per-class AP ``{name: ap}`` at one IoU threshold by the devkit's per-detection loop (shapely IoU)."""
    image_rank = {k: r for r, k in enumerate(sorted(gt))}
    out = {}
    for c, name in enumerate(names):
        recs, npos = {}, 0
        for image_id, ann in gt.items():
            m = ann.labels == c
            recs[image_id] = {"poly": ann.polygons[m], "difficult": ann.difficult[m] != 0,
                              "det": np.zeros(int(m.sum()), dtype=bool)}
            npos += int(np.sum(ann.difficult[m] == 0))
        d = detections[name]
        ids, conf, bbs = d["image_ids"], d["scores"], d["polygons"]
        order = np.lexsort((np.arange(len(ids)), [image_rank[i] for i in ids], -conf))
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
                    det_poly = Polygon(bb.reshape(4, 2))
                    overlaps = []
                    for g in keep:
                        gp = Polygon(BBGT[g].reshape(4, 2))
                        inter = gp.intersection(det_poly).area
                        overlaps.append(inter / (gp.area + det_poly.area - inter))
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
        if npos == 0:
            out[name] = None
            continue
        fp, tp = np.cumsum(fp), np.cumsum(tp)
        rec = tp / float(npos)
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        out[name] = float(_voc_ap(rec, prec, use_07_metric))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    gt, detections, names = make_scene(args.seed)
    num_obj = sum(len(a.labels) for a in gt.values())
    num_diff = sum(int(np.sum(a.difficult != 0)) for a in gt.values())
    num_det = sum(len(d["scores"]) for d in detections.values())
    per_image_class = [int(np.sum(a.labels == c)) for a in gt.values() for c in range(len(names))]
    print(f"scene: {len(gt)} images, {num_obj} objects ({num_diff} difficult), {num_det} detections, "
          f"{len(names)} classes; largest (image, class): {max(per_image_class)} objects "
          f"[generated in {time.perf_counter() - t0:.1f} s]")

    boxes_only = {n: {k: d[k] for k in ("image_ids", "scores", "boxes")} for n, d in detections.items()}
    t0 = time.perf_counter()
    rotated_iou(np.ones((1, 5)), np.ones((1, 5)))
    print(f"first torchvision rotated-IoU call of the process (loads the op): {time.perf_counter() - t0:.2f} s, "
          "not counted below")

    timings, worst = {}, 0.0
    ours = {}
    for thresholds in ((0.5, 0.75), (0.5,)):
        t0 = time.perf_counter()
        ours[thresholds] = evaluate_detections(gt, boxes_only, names, iou_thresholds=thresholds, use_07_metric=True)
        timings[("mutdet", thresholds)] = time.perf_counter() - t0
    for thr, key in ((0.5, "AP50"), (0.75, "AP75")):
        t0 = time.perf_counter()
        ref = devkit_voc_eval(gt, detections, names, thr, use_07_metric=True)
        timings[("devkit", thr)] = time.perf_counter() - t0
        for name in names:
            a, b = ours[(0.5, 0.75)]["classes"][name][key], ref[name]
            worst = max(worst, 0.0 if a is None and b is None else abs(a - b))

    ours_both, ours_50 = timings[("mutdet", (0.5, 0.75))], timings[("mutdet", (0.5,))]
    dev_50, dev_75 = timings[("devkit", 0.5)], timings[("devkit", 0.75)]
    print(f"IoU 0.5 only      mutdet {ours_50:6.2f} s   devkit loop {dev_50:6.2f} s   speed-up x{dev_50 / ours_50:.1f}")
    print(f"IoU 0.5 and 0.75  mutdet {ours_both:6.2f} s   devkit loop {dev_50 + dev_75:6.2f} s   "
          f"speed-up x{(dev_50 + dev_75) / ours_both:.1f}   (the devkit evaluates one threshold per run)")
    mean = ours[(0.5, 0.75)]["mean"]
    print(f"mAP (VOC07): AP50 {mean['AP50']:.4f}   AP75 {mean['AP75']:.4f}   "
          f"largest |AP difference| over classes and thresholds {worst:.2e}")
    if worst > 1e-9:
        print("FAIL: the two implementations disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
