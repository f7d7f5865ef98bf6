"""Rotated VOC AP: hand-computed cases and an independent devkit-style implementation."""
from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from shapely.geometry import Polygon

from mutdet.boxes import le90_to_polygon
from mutdet.evaluation import evaluate_detections, rotated_ap, voc_ap

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by `make test`


def rect(x0, y0, x1, y1):
    """Axis-aligned rectangle as a polygon (8,)."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def box(x0, y0, x1, y1):
    """Axis-aligned rectangle as an le90 box (5,)."""
    return [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0, 0.0]


def gt_image(polygons, labels, difficult=None):
    n = len(labels)
    return SimpleNamespace(polygons=np.asarray(polygons, float).reshape(-1, 8), labels=np.asarray(labels, np.int64),
                           difficult=np.zeros(n, np.int8) if difficult is None else np.asarray(difficult, np.int8))


def dets(*rows):
    """rows of (image_id, score, le90 box) -> the per-class input."""
    return {"image_ids": [r[0] for r in rows], "scores": [r[1] for r in rows], "boxes": [r[2] for r in rows]}


def test_basic_tp_duplicate_fp_11_point_and_all_points():
    gt = {"img": gt_image([rect(0, 0, 10, 10), rect(20, 0, 30, 10)], [0, 0])}
    d = {"a": dets(("img", 0.9, box(0, 0, 10, 10)),    # TP on object 1
                   ("img", 0.8, box(0, 0, 10, 10)),    # duplicate on object 1: FP
                   ("img", 0.7, box(50, 50, 60, 60)),  # no overlap: FP
                   ("img", 0.6, box(20, 0, 30, 10)))}  # TP on object 2
    r07 = evaluate_detections(gt, d, ["a"], use_07_metric=True)
    # recall .5 .5 .5 1, precision 1 .5 1/3 .5: recall points 0..0.5 -> 1, 0.6..1.0 -> 0.5
    assert r07["classes"]["a"]["AP50"] == pytest.approx(8.5 / 11, abs=1e-12)
    assert r07["classes"]["a"]["AP75"] == pytest.approx(8.5 / 11, abs=1e-12)
    np.testing.assert_allclose(r07["pr_curves"]["a"]["AP50"]["precision"], [1, 0.5, 1 / 3, 0.5])
    np.testing.assert_allclose(r07["pr_curves"]["a"]["AP50"]["recall"], [0.5, 0.5, 0.5, 1])
    rall = evaluate_detections(gt, d, ["a"], use_07_metric=False)
    assert rall["classes"]["a"]["AP50"] == pytest.approx(0.5 * 1 + 0.5 * 0.5, abs=1e-12)
    assert rall["settings"]["ap"] == "all_points" and r07["settings"]["ap"] == "voc07_11_point"
    assert r07["classes"]["a"]["num_gt"] == 2 and r07["classes"]["a"]["num_detections"] == 4


def test_iou_must_exceed_threshold_strictly():
    gt = {"img": gt_image([rect(0, 0, 10, 10)], [0])}
    exactly_half = {"a": dets(("img", 0.9, box(0, 0, 10, 20)))}  # IoU 100 / 200
    r = evaluate_detections(gt, exactly_half, ["a"], iou_thresholds=(0.5,))
    assert r["classes"]["a"]["AP50"] == 0.0
    above = {"a": dets(("img", 0.9, box(0, 0, 10, 16)))}  # IoU 100 / 160
    r = evaluate_detections(gt, above, ["a"], iou_thresholds=(0.5, 0.75))
    assert r["classes"]["a"]["AP50"] == pytest.approx(1.0) and r["classes"]["a"]["AP75"] == 0.0


def test_difficult_objects_are_ignored_not_counted():
    gt = {"img": gt_image([rect(0, 0, 10, 10), rect(20, 0, 30, 10), rect(40, 0, 50, 10)], [0, 0, 0], [1, 2, 0])}
    d = {"a": dets(("img", 0.9, box(0, 0, 10, 10)),    # on difficult 1: neither TP nor FP
                   ("img", 0.8, box(40, 0, 50, 10)),   # TP
                   ("img", 0.7, box(20, 0, 30, 10)),   # on difficult 2: ignored
                   ("img", 0.6, box(80, 80, 90, 90)),  # FP
                   ("img", 0.5, box(0, 0, 10, 10)))}   # second hit on a difficult object: still ignored
    r = evaluate_detections(gt, d, ["a"])
    entry = r["classes"]["a"]
    assert (entry["num_gt"], entry["num_difficult"], entry["num_detections"]) == (1, 2, 5)
    assert entry["AP50"] == pytest.approx(1.0)
    # Ignored detections keep their slot: tp 0 1 1 1 1, fp 0 0 0 1 1.
    np.testing.assert_allclose(r["pr_curves"]["a"]["AP50"]["precision"], [0, 1, 1, 0.5, 0.5])


def test_best_match_on_difficult_hides_a_normal_object():
    # The detection's best IoU is the difficult object (1.0), although the normal one is above 0.5 too.
    gt = {"img": gt_image([rect(0, 0, 10, 10), rect(1, 0, 11, 10)], [0, 0], [1, 0])}
    r = evaluate_detections(gt, {"a": dets(("img", 0.9, box(0, 0, 10, 10)))}, ["a"])
    assert r["classes"]["a"]["AP50"] == 0.0 and r["classes"]["a"]["num_gt"] == 1


def test_equal_scores_rank_by_image_id_then_input_order():
    gt = {"b": gt_image([rect(0, 0, 10, 10)], [0]), "a": gt_image([], [])}
    # Same score: image "a" (an FP, it has no object) ranks before image "b" (the TP).
    r = evaluate_detections(gt, {"a": dets(("b", 0.5, box(0, 0, 10, 10)), ("a", 0.5, box(0, 0, 10, 10)))}, ["a"])
    np.testing.assert_allclose(r["pr_curves"]["a"]["AP50"]["precision"], [0, 0.5])
    assert r["classes"]["a"]["AP50"] == pytest.approx(0.5)
    # Same score, same image: input order decides.
    tp_first = dets(("b", 0.5, box(0, 0, 10, 10)), ("b", 0.5, box(50, 50, 60, 60)))
    fp_first = dets(("b", 0.5, box(50, 50, 60, 60)), ("b", 0.5, box(0, 0, 10, 10)))
    assert evaluate_detections(gt, {"a": tp_first}, ["a"])["classes"]["a"]["AP50"] == pytest.approx(1.0)
    assert evaluate_detections(gt, {"a": fp_first}, ["a"])["classes"]["a"]["AP50"] == pytest.approx(0.5)


def test_table_input_ties_follow_row_order():
    gt = {"b": gt_image([rect(0, 0, 10, 10)], [0])}
    rows = [box(50, 50, 60, 60), box(0, 0, 10, 10)]  # FP then TP, equal scores
    table = pa.table({"id": ["b", "b"], "class_id": pa.array([0, 0], pa.int16()), "class_name": ["a", "a"],
                      "score": pa.array([0.5, 0.5], pa.float32()),
                      **{k: [r[i] for r in rows] for i, k in enumerate(["cx", "cy", "w", "h", "theta"])}})
    assert evaluate_detections(gt, table, ["a"])["classes"]["a"]["AP50"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="row 0"):
        evaluate_detections(gt, table.set_column(2, "class_name", pa.array(["x", "a"])), ["a"])


def test_class_without_detections_class_without_gt_and_image_without_gt():
    gt = {"one": gt_image([rect(0, 0, 10, 10)], [0]), "empty": gt_image([], [])}
    d = {"a": dets(("one", 0.9, box(0, 0, 10, 10)), ("empty", 0.95, box(0, 0, 10, 10))),  # FP first
         "c": dets(("one", 0.3, box(0, 0, 10, 10)))}  # no object of class c anywhere
    r = evaluate_detections(gt, d, ["a", "b", "c"])
    assert r["classes"]["a"]["AP50"] == pytest.approx(0.5)  # precision 0 then 0.5 at recall 1
    assert r["classes"]["b"] == {"num_gt": 0, "num_difficult": 0, "num_detections": 0, "AP50": None, "AP75": None}
    assert r["classes"]["c"]["AP50"] is None and r["classes"]["c"]["num_detections"] == 1
    assert "c" not in r["pr_curves"]
    assert r["mean"]["AP50"] == pytest.approx(0.5) and r["mean"]["num_classes"] == 1
    gt["two"] = gt_image([rect(0, 0, 10, 10)], [1])  # class b gets an object but no detection: AP 0
    r = evaluate_detections(gt, d, ["a", "b", "c"])
    assert r["classes"]["b"]["AP50"] == 0.0
    assert r["mean"]["AP50"] == pytest.approx(0.25) and r["mean"]["num_classes"] == 2
    assert r["mean"]["num_gt"] == 2 and r["mean"]["num_detections"] == 3


def test_no_ground_truth_at_all_gives_null_mean():
    r = evaluate_detections({"x": gt_image([], [])}, {"a": dets(("x", 0.5, box(0, 0, 4, 4)))}, ["a"])
    assert r["mean"]["AP50"] is None and r["mean"]["num_classes"] == 0


def test_coco_range_adds_ap50_95_only_with_all_ten_thresholds():
    gt = {"img": gt_image([rect(0, 0, 10, 10)], [0])}
    d = {"a": dets(("img", 0.9, box(0, 0, 10, 13)))}  # IoU 100 / 130 = 0.769
    r = evaluate_detections(gt, d, ["a"], iou_thresholds=np.linspace(0.5, 0.95, 10))
    assert r["classes"]["a"]["AP50:95"] == pytest.approx(0.6)  # 0.50 ... 0.75 hit, 0.80 ... 0.95 miss
    assert r["mean"]["AP50:95"] == pytest.approx(0.6)
    assert "AP50:95" not in evaluate_detections(gt, d, ["a"])["mean"]


def test_rotated_boxes_far_from_origin_match():
    centre = np.array([12000.0, 9000.0])
    gt_box = np.array([[*centre, 60.0, 12.0, 0.7]])
    gt = {"big": gt_image(le90_to_polygon(gt_box), [0])}
    det = gt_box + np.array([[1.0, -0.5, 2.0, 0.5, 0.02]])
    r = evaluate_detections(gt, {"a": {"image_ids": ["big"], "scores": [0.9], "polygons": le90_to_polygon(det)}}, ["a"])
    assert r["classes"]["a"]["AP50"] == pytest.approx(1.0)


def test_input_errors_name_the_problem():
    gt = {"img": gt_image([rect(0, 0, 10, 10)], [0])}
    with pytest.raises(ValueError, match="without ground truth"):
        evaluate_detections(gt, {"a": dets(("other", 0.5, box(0, 0, 10, 10)))}, ["a"])
    with pytest.raises(ValueError, match="unknown classes"):
        evaluate_detections(gt, {"zzz": dets()}, ["a"])
    with pytest.raises(ValueError, match="iou_thresholds"):
        evaluate_detections(gt, {}, ["a"], iou_thresholds=(0.0,))
    with pytest.raises(ValueError, match="duplicate names"):
        evaluate_detections(gt, {}, ["a"], iou_thresholds=(0.5, 0.501))
    with pytest.raises(ValueError, match="non-finite score"):
        evaluate_detections(gt, {"a": dets(("img", float("nan"), box(0, 0, 10, 10)))}, ["a"])


def test_voc_ap_uses_the_devkit_recall_points():
    # Recall exactly 0.3 does not reach the devkit's 4th point, np.arange's 0.30000000000000004.
    assert voc_ap(np.array([0.3]), np.array([1.0]), use_07_metric=True) == pytest.approx(3 / 11)
    assert voc_ap(np.array([0.3]), np.array([1.0]), use_07_metric=False) == pytest.approx(0.3)


# --- independent reference: per-detection loop over shapely polygons, devkit logic -------------------------

def _shapely_iou(p, q):
    a, b = Polygon(np.reshape(p, (4, 2))), Polygon(np.reshape(q, (4, 2)))
    inter = a.intersection(b).area
    return inter / (a.area + b.area - inter)


def _reference_ap(gt, per_class, classes, thr, use_07):
    rank_of = {k: r for r, k in enumerate(sorted(gt))}
    out = {}
    for c, name in enumerate(classes):
        d = per_class[name]
        polys = le90_to_polygon(np.asarray(d["boxes"]))
        order = sorted(range(len(d["scores"])), key=lambda i: (-d["scores"][i], rank_of[d["image_ids"][i]], i))
        taken = {k: np.zeros(len(a.labels), bool) for k, a in gt.items()}
        npos = sum(int(np.sum((a.labels == c) & (a.difficult == 0))) for a in gt.values())
        tp, fp = [], []
        for i in order:
            ann = gt[d["image_ids"][i]]
            best, jbest = -np.inf, -1
            for j in np.flatnonzero(ann.labels == c):
                iou = _shapely_iou(ann.polygons[j], polys[i])
                if iou > best:
                    best, jbest = iou, j
            t = f = 0
            if best > thr:
                if ann.difficult[jbest] == 0:
                    if not taken[d["image_ids"][i]][jbest]:
                        t, taken[d["image_ids"][i]][jbest] = 1, True
                    else:
                        f = 1
            else:
                f = 1
            tp.append(t)
            fp.append(f)
        if npos == 0:
            out[name] = None
            continue
        ctp, cfp = np.cumsum(tp, dtype=float), np.cumsum(fp, dtype=float)
        rec, prec = ctp / npos, ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        if use_07:
            ap = sum((prec[rec >= t].max() if np.any(rec >= t) else 0.0) for t in np.arange(0.0, 1.1, 0.1)) / 11
        else:
            mrec, mpre = np.r_[0.0, rec, 1.0], np.r_[0.0, prec, 0.0]
            for k in range(len(mpre) - 2, -1, -1):
                mpre[k] = max(mpre[k], mpre[k + 1])
            ap = sum((mrec[k + 1] - mrec[k]) * mpre[k + 1] for k in range(len(mrec) - 1) if mrec[k + 1] != mrec[k])
        out[name] = float(ap)
    return out


@functools.lru_cache(maxsize=None)
def _random_scene(seed, thresholds):
    """Rotated rectangles, jittered detections, duplicates, false positives, difficult objects, tied scores.

    Detections whose IoU with any object lies within 1e-5 of a threshold, or whose two best IoUs
    are within 1e-5 of each other, are dropped: torchvision computes IoU in float32.
    """
    rng = np.random.default_rng(seed)
    classes = ["a", "b", "c", "d"]  # "d" never has objects
    gt, per_class = {}, {c: {"image_ids": [], "scores": [], "boxes": []} for c in classes}
    for i in range(12):
        image_id = f"im{i:02d}"
        n = int(rng.integers(0, 25))
        boxes = np.column_stack([rng.uniform(0, 300, (n, 2)) + 3000 * (i % 3), rng.uniform(12, 50, n),
                                 rng.uniform(6, 20, n), rng.uniform(-np.pi / 2, np.pi / 2, n)])
        labels = rng.integers(0, 3, n)
        gt[image_id] = gt_image(le90_to_polygon(boxes), labels, (rng.random(n) < 0.15) * rng.integers(1, 3, n))
        cand_boxes = [boxes + np.column_stack([rng.normal(0, s, (n, 4)), rng.normal(0, s / 30, n)]) for s in (1.0, 3.0)]
        cand_boxes.append(np.column_stack([rng.uniform(0, 300, (n + 3, 2)) + 3000 * (i % 3), rng.uniform(12, 50, n + 3),
                                           rng.uniform(6, 20, n + 3), rng.uniform(-1.5, 1.5, n + 3)]))
        cand_labels = [labels, labels, rng.integers(0, 4, n + 3)]
        for b, lab in zip(cand_boxes, cand_labels):
            b[:, 2:4] = np.abs(b[:, 2:4]) + 1
            for box_, c in zip(b, lab):
                same = gt[image_id].polygons[gt[image_id].labels == c]
                ious = sorted((_shapely_iou(p, le90_to_polygon(box_)) for p in same), reverse=True)
                near_thr = any(abs(v - t) < 1e-5 for v in ious for t in thresholds)
                near_tie = len(ious) > 1 and ious[0] - ious[1] < 1e-5 and ious[0] > min(thresholds) - 1e-5
                if near_thr or near_tie:
                    continue
                per_class[classes[c]]["image_ids"].append(image_id)
                per_class[classes[c]]["scores"].append(float(np.round(rng.random(), 2)))  # many ties
                per_class[classes[c]]["boxes"].append(box_)
    return gt, per_class, classes


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("use_07", [True, False])
@pytest.mark.parametrize("max_pairs", [rotated_ap.MAX_PAIRS, 8])  # 8: many small spatial blocks
def test_matches_independent_shapely_reference(seed, use_07, max_pairs, monkeypatch):
    monkeypatch.setattr(rotated_ap, "MAX_PAIRS", max_pairs)
    thresholds = (0.5, 0.75)
    gt, per_class, classes = _random_scene(seed, thresholds)
    ours = evaluate_detections(gt, per_class, classes, iou_thresholds=thresholds, use_07_metric=use_07)
    for thr, key in zip(thresholds, ("AP50", "AP75")):
        ref = _reference_ap(gt, per_class, classes, thr, use_07)
        for name in classes:
            if ref[name] is None:
                assert ours["classes"][name][key] is None
            else:
                assert abs(ours["classes"][name][key] - ref[name]) <= 1e-9, (name, key)
    assert ours["classes"]["d"]["AP50"] is None
    assert any(0 < ours["classes"][n]["AP75"] < ours["classes"][n]["AP50"] < 1 for n in ("a", "b", "c"))
