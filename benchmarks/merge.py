"""Merging tile detections into one image: ``mutdet.boxes.rotated_nms`` against the dense blocked NMS it
replaces and against a straightforward greedy loop (the DOTA devkit's ``py_cpu_nms_poly`` structure:
per kept box, the IoU with every remaining box, here with shapely polygons in float64).

Detections are generated as a merge sees them on one large image: ``objects`` oriented objects, each
detected ``per_object`` times with jittered boxes (the overlapping tiles and queries of a detector),
plus as many scattered low-score false positives. All three must keep the same boxes (the loop can
differ only where an IoU sits within float32 rounding of the threshold: the count is printed).

Prints wall time per method, the ratios measured in this run and the peak Python allocation of the
new NMS (tracemalloc). Usage: ``python benchmarks/merge.py [--sizes 5000 15000 50000] [--loop-max 5000]``.
"""
from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from mutdet.boxes import le90_to_polygon, rotated_nms
from scale import pre_pruning_rotated_nms as dense_blocked_nms  # the previous implementation (benchmarks/scale.py)


def greedy_loop_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float):
    """The devkit's structure: take the best remaining box, drop every remaining box overlapping it."""
    import shapely

    polygons = shapely.polygons(le90_to_polygon(boxes).reshape(-1, 4, 2))
    areas = shapely.area(polygons)
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        i, rest = order[0], np.array(order[1:], dtype=np.int64)
        keep.append(i)
        if len(rest) == 0:
            break
        inter = shapely.area(shapely.intersection(polygons[i], polygons[rest]))
        iou = inter / (areas[i] + areas[rest] - inter)
        order = list(rest[iou <= iou_threshold])
    return np.array(keep, dtype=np.int64)


def detections(n: int, seed: int, image_size: float = 20000.0, per_object: int = 10):
    rng = np.random.default_rng(seed)
    objects = n // (2 * per_object)
    centres = rng.uniform(100, image_size - 100, (objects, 2))
    sides = rng.uniform(10, 80, (objects, 2))
    w, h = sides.max(1), sides.min(1)
    theta = rng.uniform(-np.pi / 2, np.pi / 2, objects)
    base = np.column_stack([centres, w, h, theta])
    jitter = rng.normal(0, 1, (objects, per_object, 5)) * np.array([2.0, 2.0, 2.0, 1.0, 0.05])
    true = (base[:, None, :] + jitter).reshape(-1, 5)
    noise = np.column_stack([rng.uniform(0, image_size, (n - len(true), 2)), rng.uniform(8, 60, n - len(true)),
                             rng.uniform(4, 8, n - len(true)), rng.uniform(-np.pi / 2, np.pi / 2, n - len(true))])
    boxes = np.concatenate([true, noise])
    boxes[:, 2:4] = np.maximum(boxes[:, 2:4], 1.0)
    scores = np.concatenate([rng.uniform(0.3, 1.0, len(true)), rng.uniform(0.0, 0.3, len(noise))])
    return boxes, scores  # continuous scores: no ties


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 15000, 50000])
    parser.add_argument("--iou", type=float, default=0.1)
    parser.add_argument("--loop-max", type=int, default=5000, help="largest size the greedy loop runs on")
    args = parser.parse_args()
    warm_boxes, warm_scores = detections(200, seed=0)  # imports and first calls outside the timings
    rotated_nms(warm_boxes, warm_scores, args.iou), dense_blocked_nms(warm_boxes, warm_scores, args.iou)
    print(f"rotated NMS of one image's detections (IoU > {args.iou}), wall seconds on this machine:")
    for n in args.sizes:
        boxes, scores = detections(n, seed=n)
        tracemalloc.start()
        ours, t_ours = timed(rotated_nms, boxes, scores, args.iou)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        dense, t_dense = timed(dense_blocked_nms, boxes, scores, args.iou)
        line = (f"  N={n:>6}: ours {t_ours:7.2f} s (peak {peak / 2**20:6.1f} MiB python allocations), "
                f"dense blocked {t_dense:7.2f} s ({t_dense / t_ours:5.1f}x ours)")
        assert np.array_equal(ours, dense), f"N={n}: ours and the dense NMS keep different boxes"
        if n <= args.loop_max:
            loop, t_loop = timed(greedy_loop_nms, boxes, scores, args.iou)
            differ = len(set(loop.tolist()) ^ set(ours.tolist()))
            line += f", greedy loop {t_loop:7.2f} s ({t_loop / t_ours:5.1f}x ours, {differ} boxes differ)"
        print(line + f"; kept {len(ours)} (identical to the dense NMS)")


if __name__ == "__main__":
    main()
