"""Rotated VOC AP, both protocols: hand-computed cases and independent per-detection implementations.

Hand-computed IoUs below were also checked against the DOTA devkit's own ``polyiou`` (compiled from its
source) and the protocols' AP against the devkit's ``voc_eval`` and mmrotate's ``eval_rbbox_map``.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import cv2
import numpy as np
import pyarrow as pa
import pytest
import shapely
from shapely.geometry import Polygon

from mutdet.boxes import le90_to_polygon
from mutdet.evaluation import evaluate_detections, rotated_ap, voc_ap
from mutdet.evaluation.polygons import devkit_iou, mmrotate_label_boxes, quad_pieces

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by `make test`

DEVKIT, MMROTATE = "dota_devkit", "mmrotate"


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


def polys(*rows):
    """rows of (image_id, score, polygon (8,)) -> the per-class input with Task1 polygons."""
    return {"image_ids": [r[0] for r in rows], "scores": [r[1] for r in rows], "polygons": [r[2] for r in rows]}


def ap(result, key="AP50", name="a"):
    return result["classes"][name][key]


# --- protocol-independent rules -------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [DEVKIT, MMROTATE])
def test_basic_tp_duplicate_fp_11_point_and_all_points(protocol):
    gt = {"img": gt_image([rect(0, 0, 10, 10), rect(20, 0, 30, 10)], [0, 0])}
    d = {"a": dets(("img", 0.9, box(0, 0, 10, 10)),    # TP on object 1
                   ("img", 0.8, box(0, 0, 10, 10)),    # duplicate on object 1: FP
                   ("img", 0.7, box(50, 50, 60, 60)),  # no overlap: FP
                   ("img", 0.6, box(20, 0, 30, 10)))}  # TP on object 2
    r07 = evaluate_detections(gt, d, ["a"], use_07_metric=True, protocol=protocol)
    # recall .5 .5 .5 1, precision 1 .5 1/3 .5: recall points 0..0.5 -> 1, 0.6..1.0 -> 0.5
    assert r07["classes"]["a"]["AP50"] == pytest.approx(8.5 / 11, abs=1e-7)
    assert r07["classes"]["a"]["AP75"] == pytest.approx(8.5 / 11, abs=1e-7)
    np.testing.assert_allclose(r07["pr_curves"]["a"]["AP50"]["precision"], [1, 0.5, 1 / 3, 0.5], rtol=1e-7)
    np.testing.assert_allclose(r07["pr_curves"]["a"]["AP50"]["recall"], [0.5, 0.5, 0.5, 1])
    rall = evaluate_detections(gt, d, ["a"], use_07_metric=False, protocol=protocol)
    assert rall["classes"]["a"]["AP50"] == pytest.approx(0.5 * 1 + 0.5 * 0.5, abs=1e-7)
    assert rall["settings"]["ap"] == "all_points" and r07["settings"]["ap"] == "voc07_11_point"
    assert r07["settings"]["protocol"] == protocol
    assert r07["classes"]["a"]["num_gt"] == 2 and r07["classes"]["a"]["num_detections"] == 4


def test_mmrotate_ap_is_float32_as_mmdet_computes_it():
    # TP, FP, TP on 3 objects: precision 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3. mmdet adds the 11 points'
    # float32 precisions in float32 and divides by 11 in float32; the devkit adds p / 11 in float64.
    gt = {"img": gt_image([rect(0, 0, 10, 10), rect(20, 0, 30, 10), rect(40, 0, 50, 10)], [0, 0, 0])}
    d = {"a": dets(("img", 0.9, box(0, 0, 10, 10)), ("img", 0.8, box(80, 0, 90, 10)), ("img", 0.6, box(20, 0, 30, 10)))}
    mm = ap(evaluate_detections(gt, d, ["a"], protocol=MMROTATE))
    dk = ap(evaluate_detections(gt, d, ["a"], protocol=DEVKIT))
    recall, points = np.array([1, 1, 2]) / 3, np.arange(0, 1.1, 0.1)
    expected32 = np.float32(0)
    for t in points:
        reached = recall >= t
        expected32 = np.float32(expected32 + (np.float32([1, 1 / 2, 2 / 3])[reached].max() if reached.any() else 0))
    assert mm == float(np.float32(expected32 / np.float32(11)))
    p64 = np.array([1, 1 / 2, 2 / 3])
    assert dk == sum((p64[recall >= t].max() if (recall >= t).any() else 0) / 11 for t in points)
    assert dk == pytest.approx(6 / 11, abs=1e-7) and mm == pytest.approx(6 / 11, abs=1e-7) and dk != mm


@pytest.mark.parametrize("protocol", [DEVKIT, MMROTATE])
def test_equal_scores_rank_by_image_id_then_input_order(protocol):
    gt = {"b": gt_image([rect(0, 0, 10, 10)], [0]), "a": gt_image([], [])}
    # Same score: image "a" (an FP, it has no object) ranks before image "b" (the TP).
    d = {"a": dets(("b", 0.5, box(0, 0, 10, 10)), ("a", 0.5, box(0, 0, 10, 10)))}
    r = evaluate_detections(gt, d, ["a"], protocol=protocol)
    np.testing.assert_allclose(r["pr_curves"]["a"]["AP50"]["precision"], [0, 0.5])
    assert ap(r) == pytest.approx(0.5)
    # Same score, same image: input order decides, for the ranking and for which duplicate takes the object.
    tp_first = dets(("b", 0.5, box(0, 0, 10, 10)), ("b", 0.5, box(50, 50, 60, 60)))
    fp_first = dets(("b", 0.5, box(50, 50, 60, 60)), ("b", 0.5, box(0, 0, 10, 10)))
    assert ap(evaluate_detections(gt, {"a": tp_first}, ["a"], protocol=protocol)) == pytest.approx(1.0)
    assert ap(evaluate_detections(gt, {"a": fp_first}, ["a"], protocol=protocol)) == pytest.approx(0.5)
    loose_first = dets(("b", 0.5, box(0, 0, 10, 16)), ("b", 0.5, box(0, 0, 10, 10)))  # both hit the one object
    r = evaluate_detections(gt, {"a": loose_first}, ["a"], iou_thresholds=(0.5, 0.75), protocol=protocol)
    assert ap(r, "AP50") == pytest.approx(1.0)  # the first (IoU 0.625) takes it, the exact one is a duplicate
    assert ap(r, "AP75") == pytest.approx(0.5)  # at 0.75 only the second hits
    assert r["settings"]["ties"] == "score desc, then image id, then input order"


@pytest.mark.parametrize("protocol", [DEVKIT, MMROTATE])
def test_table_input_ties_follow_row_order(protocol):
    gt = {"b": gt_image([rect(0, 0, 10, 10)], [0])}
    rows = [box(50, 50, 60, 60), box(0, 0, 10, 10)]  # FP then TP, equal scores
    table = pa.table({"id": ["b", "b"], "class_id": pa.array([0, 0], pa.int16()), "class_name": ["a", "a"],
                      "score": pa.array([0.5, 0.5], pa.float32()),
                      **{k: [r[i] for r in rows] for i, k in enumerate(["cx", "cy", "w", "h", "theta"])}})
    assert ap(evaluate_detections(gt, table, ["a"], protocol=protocol)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="row 0"):
        evaluate_detections(gt, table.set_column(2, "class_name", pa.array(["x", "a"])), ["a"], protocol=protocol)


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
    mm = evaluate_detections(gt, d, ["a", "b", "c"], protocol=MMROTATE)
    assert mm["classes"]["b"] == {"num_gt": 1, "num_difficult": 0, "num_too_small": 0, "num_detections": 0,
                                  "AP50": 0.0, "AP75": 0.0}
    assert mm["mean"]["AP50"] == pytest.approx(0.25)


def test_no_ground_truth_at_all_gives_null_mean():
    for protocol in (DEVKIT, MMROTATE):
        r = evaluate_detections({"x": gt_image([], [])}, {"a": dets(("x", 0.5, box(0, 0, 4, 4)))}, ["a"],
                                protocol=protocol)
        assert r["mean"]["AP50"] is None and r["mean"]["num_classes"] == 0


def test_coco_range_adds_ap50_95_only_with_all_ten_thresholds():
    gt = {"img": gt_image([rect(0, 0, 10, 10)], [0])}
    d = {"a": dets(("img", 0.9, box(0, 0, 10, 13)))}  # IoU 100 / 130 = 0.769
    r = evaluate_detections(gt, d, ["a"], iou_thresholds=np.linspace(0.5, 0.95, 10))
    assert r["classes"]["a"]["AP50:95"] == pytest.approx(0.6)  # 0.50 ... 0.75 hit, 0.80 ... 0.95 miss
    assert r["mean"]["AP50:95"] == pytest.approx(0.6)
    assert "AP50:95" not in evaluate_detections(gt, d, ["a"])["mean"]


@pytest.mark.parametrize("protocol", [DEVKIT, MMROTATE])
def test_rotated_boxes_far_from_origin_match(protocol):
    centre = np.array([12000.0, 9000.0])
    gt_box = np.array([[*centre, 60.0, 12.0, 0.7]])
    gt = {"big": gt_image(le90_to_polygon(gt_box), [0])}
    det = gt_box + np.array([[1.0, -0.5, 2.0, 0.5, 0.02]])
    r = evaluate_detections(gt, {"a": {"image_ids": ["big"], "scores": [0.9], "polygons": le90_to_polygon(det)}},
                            ["a"], protocol=protocol)
    assert ap(r) == pytest.approx(1.0)


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
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate_detections(gt, {}, ["a"], protocol="voc")
    with pytest.raises(ValueError, match="'boxes' \\(le90\\) or 'polygons'"):
        evaluate_detections(gt, {"a": {"image_ids": [], "scores": []}}, ["a"])
    with pytest.raises(ValueError, match="not finite"):
        evaluate_detections(gt, {"a": polys(("img", 0.5, [0, 0, 1, 0, 1, np.inf, 0, 1]))}, ["a"])


def test_voc_ap_uses_the_devkit_recall_points():
    # Recall exactly 0.3 does not reach the devkit's 4th point, np.arange's 0.30000000000000004.
    assert voc_ap(np.array([0.3]), np.array([1.0]), use_07_metric=True) == pytest.approx(3 / 11)
    assert voc_ap(np.array([0.3]), np.array([1.0]), use_07_metric=False) == pytest.approx(0.3)


# --- polygon IoU versus minimum-area rectangle IoU (hand-computed) -------------------------------------------

# Right trapezoid with vertical sides x=0 (length 30) and x=40 (length 10), top edge y = 30 - x/2.
# Area (30 + 10) / 2 * 40 = 800; its minimum-area rectangle is the 40 x 30 box (area 1200).
TRAPEZOID = [0, 0, 40, 0, 40, 10, 0, 30]
# Harbour-like chevron (concave at (60, 4)): hull triangle (0,0) (60,10) (120,0) of area 600 minus the
# notch (0,0) (120,0) (60,4) of area 240 = 360; its minimum-area rectangle is the 120 x 10 box.
CHEVRON = [0, 0, 60, 10, 120, 0, 60, 4]


def test_hand_computed_polygon_ious():
    cases = [
        # trapezoid vs box y in [0, 20]: 20 * 20 + integral_20^40 (30 - x/2) dx = 400 + 300 = 700 -> 700 / 900
        (TRAPEZOID, rect(0, 0, 40, 20), 7 / 9),
        # trapezoid vs box y in [10, 30]: integral_0^40 (20 - x/2) dx = 400 -> 400 / 1200
        (TRAPEZOID, rect(0, 10, 40, 30), 1 / 3),
        (CHEVRON, rect(0, 0, 120, 10), 360 / 1200),  # the chevron lies inside its rectangle
    ]
    for gt_poly, det_poly, expected in cases:
        iou = devkit_iou(np.array([gt_poly], float), np.array([det_poly], float))[0, 0]
        assert iou == pytest.approx(expected, abs=1e-12)
    boxes, keep = mmrotate_label_boxes(np.array([TRAPEZOID, CHEVRON], float))
    np.testing.assert_allclose(boxes, [[20, 15, 40, 30, 0], [60, 5, 120, 10, 0]], atol=1e-5)
    assert keep.all()


@pytest.mark.parametrize("protocol, ap50, ap75", [
    # devkit, polygon IoU: D1 0.778 (TP at 0.5 and 0.75), D2 0.333 (FP), chevron box 0.3 (FP)
    (DEVKIT, {"t1": 1.0, "t2": 0.0, "harbour": 0.0}, {"t1": 1.0, "t2": 0.0, "harbour": 0.0}),
    # mmrotate, minimum-area rectangle IoU: D1 and D2 0.667 (TP at 0.5, FP at 0.75), chevron box 1.0
    (MMROTATE, {"t1": 1.0, "t2": 1.0, "harbour": 1.0}, {"t1": 0.0, "t2": 0.0, "harbour": 1.0}),
])
def test_polygon_and_rectangle_iou_fall_on_different_sides(protocol, ap50, ap75):
    gt = {"t1": gt_image([TRAPEZOID], [0]), "t2": gt_image([TRAPEZOID], [1]), "harbour": gt_image([CHEVRON], [2])}
    d = {"t1": dets(("t1", 0.9, box(0, 0, 40, 20))), "t2": dets(("t2", 0.9, box(0, 10, 40, 30))),
         "harbour": dets(("harbour", 0.9, box(0, 0, 120, 10)))}
    r = evaluate_detections(gt, d, ["t1", "t2", "harbour"], protocol=protocol)
    assert {n: ap(r, "AP50", n) for n in d} == pytest.approx(ap50)
    assert {n: ap(r, "AP75", n) for n in d} == pytest.approx(ap75)


def test_task1_polygon_is_used_as_written_by_the_devkit_protocol():
    # A detection given as a polygon is intersected as that polygon (not its rectangle): the trapezoid
    # detection on the 40 x 30 box label has IoU 800 / 1200 under the devkit.
    gt = {"t": gt_image([rect(0, 0, 40, 30)], [0])}
    r = evaluate_detections(gt, {"a": polys(("t", 0.9, TRAPEZOID))}, ["a"], iou_thresholds=(0.5, 0.75))
    assert (ap(r, "AP50"), ap(r, "AP75")) == (pytest.approx(1.0), 0.0)
    r = evaluate_detections(gt, {"a": polys(("t", 0.9, TRAPEZOID))}, ["a"], iou_thresholds=(0.5, 0.75),
                            protocol=MMROTATE)  # mmrotate: its minimum-area rectangle, the label's box itself
    assert (ap(r, "AP50"), ap(r, "AP75")) == (pytest.approx(1.0), pytest.approx(1.0))


# --- IoU exactly at the threshold ------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol, expected", [(DEVKIT, 0.0), (MMROTATE, 1.0)])
def test_iou_exactly_at_the_threshold(protocol, expected):
    gt = {"img": gt_image([rect(0, 0, 10, 10)], [0])}
    half = {"a": dets(("img", 0.9, box(0, 0, 10, 20)))}  # IoU 100 / 200 = 0.5 exactly
    assert ap(evaluate_detections(gt, half, ["a"], iou_thresholds=(0.5,), protocol=protocol)) == pytest.approx(expected)
    three_quarters = {"a": dets(("img", 0.9, box(0, 0, 10, 7.5)))}  # IoU 75 / 100 = 0.75 exactly
    r = evaluate_detections(gt, three_quarters, ["a"], iou_thresholds=(0.5, 0.75), protocol=protocol)
    assert ap(r, "AP50") == pytest.approx(1.0) and ap(r, "AP75") == pytest.approx(expected)
    above = {"a": dets(("img", 0.9, box(0, 0, 10, 16)))}  # IoU 100 / 160
    r = evaluate_detections(gt, above, ["a"], iou_thresholds=(0.5, 0.75), protocol=protocol)
    assert ap(r, "AP50") == pytest.approx(1.0) and ap(r, "AP75") == 0.0
    assert r["settings"]["iou_rule"] == ("iou > threshold" if protocol == DEVKIT else "iou >= threshold")


# --- difficult objects -----------------------------------------------------------------------------------------

DIFFICULT_GT = {"img": gt_image([rect(0, 0, 10, 10), rect(20, 0, 30, 10), rect(40, 0, 50, 10)], [0, 0, 0], [1, 2, 0])}
DIFFICULT_DETS = {"a": dets(("img", 0.9, box(0, 0, 10, 10)),    # on difficult 1
                            ("img", 0.8, box(40, 0, 50, 10)),   # on the normal object
                            ("img", 0.7, box(20, 0, 30, 10)),   # on difficult 2
                            ("img", 0.6, box(80, 80, 90, 90)),  # on nothing
                            ("img", 0.5, box(0, 0, 10, 10)))}   # second hit on difficult 1


def test_devkit_ignores_difficult_1_and_2():
    r = evaluate_detections(DIFFICULT_GT, DIFFICULT_DETS, ["a"])
    entry = r["classes"]["a"]
    assert (entry["num_gt"], entry["num_difficult"], entry["num_detections"]) == (1, 2, 5)
    assert entry["AP50"] == pytest.approx(1.0)
    # Hits on difficult objects are neither TP nor FP but keep their slot: tp 0 1 1 1 1, fp 0 0 0 1 1.
    np.testing.assert_allclose(r["pr_curves"]["a"]["AP50"]["precision"], [0, 1, 1, 0.5, 0.5])
    assert r["settings"]["difficult"] == "ignored (1 and 2)"


@pytest.mark.parametrize("threshold, num_gt, num_difficult, precision", [
    (100, 3, 0, [1, 1, 1, 0.75, 0.6]),    # default: difficult objects are ordinary positives
    (1, 2, 1, [1, 1, 2 / 3, 0.5, 0.4]),   # difficult 2 dropped: the hit on it is an FP
    (0, 1, 2, [0, 0.5, 1 / 3, 0.25, 0.2]),  # both dropped: hits on them are FPs, not ignored
])
def test_mmrotate_drops_objects_above_the_difficulty_threshold(threshold, num_gt, num_difficult, precision):
    r = evaluate_detections(DIFFICULT_GT, DIFFICULT_DETS, ["a"], protocol=MMROTATE, difficulty_threshold=threshold)
    entry = r["classes"]["a"]
    assert (entry["num_gt"], entry["num_difficult"], entry["num_too_small"]) == (num_gt, num_difficult, 0)
    np.testing.assert_allclose(r["pr_curves"]["a"]["AP50"]["precision"], precision, rtol=1e-7)
    assert r["settings"]["difficulty_threshold"] == threshold


def test_best_match_on_difficult_hides_a_normal_object_in_the_devkit_only():
    # The detection's best IoU is the difficult object (1.0), although the normal one is above 0.5 too.
    gt = {"img": gt_image([rect(0, 0, 10, 10), rect(1, 0, 11, 10)], [0, 0], [1, 0])}
    d = {"a": dets(("img", 0.9, box(0, 0, 10, 10)))}
    r = evaluate_detections(gt, d, ["a"])
    assert ap(r) == 0.0 and r["classes"]["a"]["num_gt"] == 1
    # mmrotate with the difficult object dropped: the detection matches the normal one (IoU 90 / 110).
    assert ap(evaluate_detections(gt, d, ["a"], protocol=MMROTATE, difficulty_threshold=0)) == pytest.approx(1.0)


def test_mmrotate_drops_labels_thinner_than_2_pixels():
    gt = {"img": gt_image([rect(0, 0, 40, 1.5), rect(0, 10, 40, 12)], [0, 0])}  # 1.5 px: dropped; 2 px: kept
    d = {"a": dets(("img", 0.9, box(0, 0, 40, 1.5)), ("img", 0.8, box(0, 10, 40, 12)))}
    mm = evaluate_detections(gt, d, ["a"], protocol=MMROTATE)
    assert (mm["classes"]["a"]["num_gt"], mm["classes"]["a"]["num_too_small"]) == (1, 1)
    np.testing.assert_allclose(mm["pr_curves"]["a"]["AP50"]["precision"], [0, 0.5])  # the sliver's hit is an FP
    assert mm["polygons"]["gt_dropped_too_small"] == 1
    dk = evaluate_detections(gt, d, ["a"])  # the devkit keeps it
    assert dk["classes"]["a"]["num_gt"] == 2 and ap(dk) == pytest.approx(1.0)


# --- degenerate and self-intersecting polygons (devkit formula) ------------------------------------------------

# Bow tie (0,0) (10,0) (0,10) (6,10): the edges x + y = 10 and y = 5x/3 cross at (3.75, 6.25). Lower lobe
# (0,0) (10,0) (3.75,6.25), area 31.25, counter-clockwise; upper lobe (3.75,6.25) (0,10) (6,10), area 11.25,
# clockwise. Signed area 31.25 - 11.25 = 20.
BOW_TIE = [0, 0, 10, 0, 0, 10, 6, 10]


def test_bow_tie_label_follows_the_devkit_formula():
    g = np.array([BOW_TIE], float)
    # The box below y = 6.25 holds the whole lower lobe: inter 31.25, union 20 + 62.5 - 31.25 = 51.25.
    assert devkit_iou(g, np.array([rect(0, 0, 10, 6.25)], float))[0, 0] == pytest.approx(31.25 / 51.25, abs=1e-12)
    # The box 10 x 10 holds both lobes: inter 31.25 - 11.25 = 20, union 20 + 100 - 20 = 100.
    assert devkit_iou(g, np.array([rect(0, 0, 10, 10)], float))[0, 0] == pytest.approx(0.2, abs=1e-12)
    # The box above y = 6.25 holds only the upper lobe: inter -11.25, union 20 + 37.5 + 11.25 = 68.75.
    assert devkit_iou(g, np.array([rect(0, 6.25, 10, 10)], float))[0, 0] == pytest.approx(-11.25 / 68.75, abs=1e-12)
    # Reversing the vertex order changes nothing (the devkit turns a negative polygon around).
    assert devkit_iou(g[:, [6, 7, 4, 5, 2, 3, 0, 1]], np.array([rect(0, 0, 10, 6.25)], float))[0, 0] == \
        pytest.approx(31.25 / 51.25, abs=1e-12)
    # In the evaluation: IoU 0.61 > 0.5 is a TP (shapely's repaired polygon would give 31.25 / 73.75 = 0.42).
    gt = {"img": gt_image([BOW_TIE], [0])}
    r = evaluate_detections(gt, {"a": dets(("img", 0.9, box(0, 0, 10, 6.25)))}, ["a"])
    assert ap(r) == pytest.approx(1.0)
    assert r["polygons"]["gt_non_simple"] == 1 and r["polygons"]["gt_zero_area"] == 0


def test_zero_area_labels_are_positives_that_nothing_matches():
    flat = [0, 0, 10, 0, 20, 0, 5, 0]  # collinear
    balanced = [0, 0, 10, 10, 10, 0, 0, 10]  # bow tie with equal lobes: signed area 0
    gt = {"img": gt_image([flat, balanced, rect(0, 20, 10, 30)], [0, 0, 0])}
    d = {"a": dets(("img", 0.9, box(0, -1, 20, 1)), ("img", 0.8, box(0, 0, 10, 10)), ("img", 0.7, box(0, 20, 10, 30)))}
    r = evaluate_detections(gt, d, ["a"])
    assert r["classes"]["a"]["num_gt"] == 3
    np.testing.assert_allclose(r["pr_curves"]["a"]["AP50"]["recall"], [0, 0, 1 / 3])
    assert r["polygons"]["gt_zero_area"] == 2
    pieces = quad_pieces(np.array([flat, balanced], float))
    assert pieces.zero_area.all() and not pieces.simple.any()
    assert devkit_iou(np.array([flat], float), np.array([flat], float))[0, 0] == 0.0  # 0 / 0: no match


def test_touching_and_repeated_vertices():
    # A repeated vertex is a triangle (simple); a spike (vertex back on its own edge) is not simple but
    # the formula still gives the triangle's IoU.
    triangle = [0, 0, 10, 0, 10, 0, 0, 10]
    spike = [0, 0, 10, 0, 5, 0, 0, 10]  # (5, 0) lies on the edge (0,0)-(10,0)
    box_poly = np.array([rect(0, 0, 10, 10)], float)
    assert devkit_iou(np.array([triangle], float), box_poly)[0, 0] == pytest.approx(0.5, abs=1e-12)
    p = quad_pieces(np.array([spike], float))
    assert not p.simple[0]
    assert devkit_iou(np.array([spike], float), box_poly)[0, 0] == pytest.approx(25 / 100, abs=1e-12)


# --- independent references on random scenes --------------------------------------------------------------------

def _shapely_iou(p, q):
    a, b = Polygon(np.reshape(p, (4, 2))), Polygon(np.reshape(q, (4, 2)))
    inter = a.intersection(b).area
    return inter / (a.area + b.area - inter)


def _reference_ap(gt, per_class, classes, thr, use_07, protocol, difficulty=100):
    """One detection at a time: devkit (polygon IoU > thr, difficult ignored, global greedy) or mmrotate
    (min-area rectangles of the float32 labels as shapely polygons, dropped labels, per-image greedy, >=)."""
    rank_of = {k: r for r, k in enumerate(sorted(gt))}
    labels = {}
    for k, a in gt.items():
        if protocol == DEVKIT:
            labels[k] = (a.polygons, a.labels, a.difficult != 0)
            continue
        kept, shapes = [], []
        for p, dd in zip(a.polygons, a.difficult):
            r = cv2.minAreaRect(np.asarray(p, np.float32).reshape(4, 2))
            kept.append(min(r[1]) >= 2 and dd <= difficulty)
            shapes.append(cv2.boxPoints(r).astype(np.float64).reshape(8))
        kept = np.array(kept, bool)
        labels[k] = (np.array(shapes).reshape(-1, 8)[kept], a.labels[kept], np.zeros(int(kept.sum()), bool))
    out = {}
    for c, name in enumerate(classes):
        d = per_class[name]
        dpolys = (np.asarray(d["polygons"]) if protocol == DEVKIT  # mmrotate: float32 boxes
                  else le90_to_polygon(np.asarray(d["boxes"]).astype(np.float32).astype(np.float64)))
        order = sorted(range(len(d["scores"])), key=lambda i: (-d["scores"][i], rank_of[d["image_ids"][i]], i))
        taken = {k: np.zeros(len(v[1]), bool) for k, v in labels.items()}
        npos = sum(int(np.sum((v[1] == c) & ~v[2])) for v in labels.values())
        tp, fp = [], []
        for i in order:
            shapes, labs, ignored = labels[d["image_ids"][i]]
            best, jbest = -np.inf, -1
            for j in np.flatnonzero(labs == c):
                iou = _shapely_iou(shapes[j], dpolys[i])
                if iou > best:
                    best, jbest = iou, j
            t = f = 0
            if (best > thr) if protocol == DEVKIT else (best >= thr):
                if not ignored[jbest]:
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
            value = sum((prec[rec >= t].max() if np.any(rec >= t) else 0.0) for t in np.arange(0.0, 1.1, 0.1)) / 11
        else:
            mrec, mpre = np.r_[0.0, rec, 1.0], np.r_[0.0, prec, 0.0]
            for k in range(len(mpre) - 2, -1, -1):
                mpre[k] = max(mpre[k], mpre[k + 1])
            value = sum((mrec[k + 1] - mrec[k]) * mpre[k + 1] for k in range(len(mrec) - 1) if mrec[k + 1] != mrec[k])
        out[name] = float(value)
    return out


@functools.lru_cache(maxsize=None)
def _random_scene(seed, thresholds):
    """Integer quadrilateral labels (jittered rotated rectangles, some concave, some thinner than 2 px, random
    first corner and direction), jittered detections, duplicates, false positives, difficult objects, tied
    scores. Every label is a simple polygon (the readers refuse others).

    Detections whose IoU with any label (polygon and min-area rectangle) lies within 1e-3 of a threshold, or
    whose two best IoUs are within 1e-3 of each other, are dropped: the mmrotate protocol rounds boxes to
    float32 (3000 px from the origin) and computes IoU in float32, the reference in float64.
    """
    rng = np.random.default_rng(seed)
    classes = ["a", "b", "c", "d"]  # "d" never has objects
    gt, per_class = {}, {c: {"image_ids": [], "scores": [], "boxes": [], "polygons": []} for c in classes}
    for i in range(12):
        image_id = f"im{i:02d}"
        n = int(rng.integers(0, 25))
        boxes = np.column_stack([rng.uniform(0, 300, (n, 2)) + 3000 * (i % 3), rng.uniform(12, 50, n),
                                 rng.uniform(1, 20, n), rng.uniform(-np.pi / 2, np.pi / 2, n)])
        pts = le90_to_polygon(boxes).reshape(n, 4, 2) + rng.normal(0, 1.0, (n, 4, 2))
        concave = rng.random(n) < 0.15
        pts[concave, 0] = 0.3 * pts[concave, 0] + 0.7 * pts[concave].mean(axis=1)
        pts = np.round(pts)
        flip = rng.random(n) < 0.3
        pts[flip] = pts[flip, ::-1]
        pts = np.roll(pts, int(rng.integers(0, 4)), axis=1)
        ok = shapely.is_valid(shapely.polygons(pts)) if n else np.zeros(0, bool)
        pts, boxes = pts[ok], boxes[ok]
        n = len(pts)
        labels = rng.integers(0, 3, n)
        gt[image_id] = gt_image(pts.reshape(n, 8), labels, (rng.random(n) < 0.15) * rng.integers(1, 3, n))
        mm_rects = [cv2.boxPoints(cv2.minAreaRect(p.astype(np.float32))).reshape(8) for p in pts]
        cand_boxes = [boxes + np.column_stack([rng.normal(0, s, (n, 4)), rng.normal(0, s / 30, n)]) for s in (1.0, 3.0)]
        cand_boxes.append(np.column_stack([rng.uniform(0, 300, (n + 3, 2)) + 3000 * (i % 3), rng.uniform(12, 50, n + 3),
                                           rng.uniform(6, 20, n + 3), rng.uniform(-1.5, 1.5, n + 3)]))
        cand_labels = [labels, labels, rng.integers(0, 4, n + 3)]
        for b, lab in zip(cand_boxes, cand_labels):
            b[:, 2:4] = np.abs(b[:, 2:4]) + 1
            for box_, c in zip(b, lab):
                dpoly = le90_to_polygon(box_)
                same = np.flatnonzero(labels == c)
                near = False
                for shapes in (pts.reshape(-1, 8), mm_rects):
                    ious = sorted((_shapely_iou(shapes[j], dpoly) for j in same), reverse=True)
                    near |= any(abs(v - t) < 1e-3 for v in ious for t in thresholds)
                    near |= len(ious) > 1 and ious[0] - ious[1] < 1e-3 and ious[0] > min(thresholds) - 1e-3
                if near:
                    continue
                per_class[classes[c]]["image_ids"].append(image_id)
                per_class[classes[c]]["scores"].append(float(np.round(rng.random(), 2)))  # many ties
                per_class[classes[c]]["boxes"].append(box_)
                per_class[classes[c]]["polygons"].append(dpoly)
    return gt, per_class, classes


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("use_07", [True, False])
@pytest.mark.parametrize("protocol, difficulty", [(DEVKIT, 100), (MMROTATE, 100), (MMROTATE, 1)])
def test_matches_independent_reference(seed, use_07, protocol, difficulty, monkeypatch):
    # seed 1: every mmrotate detection with a candidate is decided by the rotated-IoU kernel, not in numpy.
    monkeypatch.setattr(rotated_ap, "KERNEL_MARGIN_SCALE", np.inf if seed == 1 else rotated_ap.KERNEL_MARGIN_SCALE)
    thresholds = (0.5, 0.75)
    gt, per_class, classes = _random_scene(seed, thresholds)
    ours = evaluate_detections(gt, per_class, classes, iou_thresholds=thresholds, use_07_metric=use_07,
                               protocol=protocol, difficulty_threshold=difficulty)
    for thr, key in zip(thresholds, ("AP50", "AP75")):
        ref = _reference_ap(gt, per_class, classes, thr, use_07, protocol, difficulty)
        for name in classes:
            if ref[name] is None:
                assert ours["classes"][name][key] is None
            else:  # mmrotate's AP is float32
                tolerance = 1e-12 if protocol == DEVKIT else 1e-6
                assert abs(ours["classes"][name][key] - ref[name]) <= tolerance, (name, key)
    assert ours["classes"]["d"]["AP50"] is None
    assert any(0 < ours["classes"][n]["AP75"] < ours["classes"][n]["AP50"] < 1 for n in ("a", "b", "c"))


def test_random_scene_exercises_the_differences():
    """The scene above is not one where both protocols agree: labels are not rectangles, some are concave
    and some thinner than 2 px."""
    gt, per_class, classes = _random_scene(0, (0.5, 0.75))
    dk = evaluate_detections(gt, per_class, classes, protocol=DEVKIT)
    mm = evaluate_detections(gt, per_class, classes, protocol=MMROTATE)
    assert any(dk["classes"][n]["AP75"] != pytest.approx(mm["classes"][n]["AP75"], abs=1e-3) for n in "abc")
    assert mm["polygons"]["gt_dropped_too_small"] > 0
    assert sum(not quad_pieces(a.polygons).simple.all() for a in gt.values()) == 0
    assert dk["candidate_pairs"]["skipped_by_bound"] > 0 and dk["candidate_pairs"]["computed"] > 0  # the bound prunes


def test_mmrotate_label_box_is_min_area_rects_own_centre_size_and_angle():
    """mmrotate's poly2obb_np_le90 keeps minAreaRect's centre, size and angle (not a box rebuilt from its
    corners, which differs by ~1e-5): here that difference moves the IoU across 0.75 (0.7499991 for
    mmrotate's box, 0.7500007 for the rebuilt one), so the detection is a miss at AP75."""
    label = [541, 1142, 557, 1138, 565, 1180, 550, 1181]
    boxes, keep = mmrotate_label_boxes([label])
    expected = np.array([552.91254, 1160.5405, 42.755116, 16.465866, 1.3825748], np.float32)
    np.testing.assert_array_equal(boxes[0].astype(np.float32), expected)
    assert keep.all()
    detection = [553.8150634765625, 1158.778564453125, 38.13111877441406, 14.36171817779541, 1.338976502418518]
    result = evaluate_detections({"img": gt_image([label], [0])}, {"a": dets(("img", 0.9, detection))}, ["a"],
                                 protocol=MMROTATE)
    assert ap(result, "AP50") == pytest.approx(1.0) and ap(result, "AP75") == 0.0


# --- fast paths: each must decide exactly as the reference computation ------------------------------------------

def _convex_quads(rng, n, scale=50.0, offset=0.0):
    """Random strictly convex quadrilaterals (N, 8): jittered rotated rectangles, either orientation."""
    from mutdet.evaluation.polygons import strictly_convex

    out = []
    while len(out) < n:
        c = rng.uniform(0, scale, 2) + offset
        w, h, t = rng.uniform(1, scale / 2), rng.uniform(1, scale / 2), rng.uniform(-3, 3)
        q = np.array(le90_to_polygon([c[0], c[1], w, h, t])).reshape(4, 2) + rng.normal(0, 0.1 * min(w, h), (4, 2))
        q = np.round(q, int(rng.integers(0, 3)))
        if rng.random() < 0.5:
            q = q[::-1]
        if strictly_convex(q[None])[0]:
            out.append(q.ravel())
    return np.array(out)


@pytest.mark.parametrize("offset", [0.0, 3000.0])
def test_numpy_clip_iou_agrees_with_geos_within_its_margin(offset):
    """convex_pair_iou (Green's theorem over clipped edges, numpy) against GEOS on random convex pairs and on touching,
    identical, nested and edge-sharing ones: the difference is within the margin it reports, and the
    margin is small."""
    from mutdet.evaluation.polygons import convex_pair_iou, quad_shapes

    rng = np.random.default_rng(3)
    a, b = _convex_quads(rng, 400, offset=offset), _convex_quads(rng, 400, offset=offset)
    sq = np.array(rect(0, 0, 10, 10), float) + offset
    special = [(sq, sq), (sq, np.array(rect(10, 0, 20, 10), float) + offset),  # identical; sharing an edge
               (sq, np.array(rect(2, 2, 5, 5), float) + offset),  # nested
               (sq, np.array(rect(0, 0, 10, 5), float) + offset),  # sharing three sides' parts
               (sq, np.array([5, -5, 15, 5, 5, 15, -5, 5], float) + offset),  # diamond through its corners
               (sq, np.array(rect(11, 11, 20, 20), float) + offset)]  # disjoint
    a = np.vstack([a, [p for p, _ in special]])
    b = np.vstack([b, [q for _, q in special]])
    k = np.arange(len(a))
    iou, margin = convex_pair_iou(quad_shapes(a), quad_shapes(b), k, k)
    geos = np.array([devkit_iou(a[i:i + 1], b[i:i + 1])[0, 0] for i in k])
    assert np.all(np.abs(iou - geos) <= margin)
    # Pairs with an edge on a line of the other's edges (identical, sharing an edge, sharing parts of three
    # sides) get an infinite margin: GEOS decides them. The others' margins are small.
    assert np.isinf(margin[-6:]).tolist() == [True, True, False, True, False, False]
    assert np.isfinite(margin[:-6]).all() and margin[np.isfinite(margin)].max() < 1e-6
    assert (iou > 0).sum() > 50  # many random pairs do overlap
    np.testing.assert_allclose(iou[-6:][[2, 4, 5]], [9 / 100, 100 / 200, 0.0], atol=1e-12)


def test_strictly_convex():
    from mutdet.evaluation.polygons import strictly_convex

    quads = np.array([rect(0, 0, 4, 2), rect(0, 0, 4, 2)[6:] + rect(0, 0, 4, 2)[:6],  # a rectangle, shifted start
                      [0, 0, 0, 2, 4, 2, 4, 0],  # clockwise
                      [0, 0, 4, 0, 1, 1, 0, 4],  # concave
                      [0, 0, 4, 4, 4, 0, 0, 4],  # bow tie
                      [0, 0, 2, 0, 4, 0, 2, 3],  # a straight angle
                      [0, 0, 4, 0, 4, 0, 0, 4]], float).reshape(-1, 4, 2)  # a repeated corner
    assert strictly_convex(quads).tolist() == [True, True, True, False, False, False, False]


def test_quad_shapes_rows_match_the_reference_formulas():
    """quad_shapes and quad_simple_zero_area compute on coordinate rows; their areas, bounds, convexity and
    simplicity equal the (N, 4, 2) formulas they stand for (_fan_areas, strictly_convex, GEOS)."""
    from mutdet.evaluation.polygons import _fan_areas, _simple_rings, quad_shapes, quad_simple_zero_area, strictly_convex

    rng = np.random.default_rng(6)
    quads = np.vstack([np.round(rng.uniform(0, 6, (3000, 8))), rng.normal(0, 50, (1000, 8)) + 3000,
                       [[0, 0, 4, 4, 4, 0, 0, 4], [0, 0, 2, 0, 4, 0, 2, 3], [0] * 8, rect(0, 0, 4, 2)]])
    pts = quads.reshape(-1, 4, 2)
    total = _fan_areas(pts).sum(axis=1)
    q = quad_shapes(quads)
    np.testing.assert_array_equal(q.area, np.abs(total))
    np.testing.assert_array_equal(q.convex, strictly_convex(pts))
    np.testing.assert_array_equal(q.lo, pts.min(axis=1))
    np.testing.assert_array_equal(q.hi, pts.max(axis=1))
    simple, zero = quad_simple_zero_area(quads)
    np.testing.assert_array_equal(zero, total == 0)
    np.testing.assert_array_equal(simple, _simple_rings(pts, total == 0, strictly_convex(pts)))
    assert 0 < q.convex.sum() < len(quads) and zero.sum() > 0 and (~simple & ~zero).sum() > 0


def test_ious_near_a_threshold_are_decided_by_geos():
    """A detection whose IoU is at a threshold (here exactly 0.5 and 0.75 in exact arithmetic) is sent to
    GEOS, whose value decides, as it did before the numpy path existed."""
    g = gt_image([rect(0, 0, 10, 10), rect(20, 0, 30, 10), rect(40, 0, 60, 10)], [0, 0, 0])
    d = {"a": polys(("img", 0.9, rect(0, 0, 10, 5)),  # IoU 0.5 exactly
                    ("img", 0.8, rect(20, 0, 30, 7.5)),  # IoU 0.75 exactly
                    ("img", 0.7, rect(40.5, 0.5, 59, 9.5)))}  # IoU 0.8325: decided in numpy
    res = evaluate_detections({"img": g}, d, ["a"], protocol=DEVKIT)
    assert res["candidate_pairs"]["computed"] == 3 and res["candidate_pairs"]["computed_by_geos"] == 2
    geos = [devkit_iou(np.array([p]), np.array([q]))[0, 0]
            for p, q in ((rect(0, 0, 10, 10), rect(0, 0, 10, 5)), (rect(20, 0, 30, 10), rect(20, 0, 30, 7.5)))]
    hits50 = 1 + (geos[0] > 0.5) + (geos[1] > 0.5)
    hits75 = 1 + (geos[0] > 0.75) + (geos[1] > 0.75)
    tp50 = np.cumsum([geos[0] > 0.5, geos[1] > 0.5, True])
    assert hits50 == tp50[-1]
    expected50 = voc_ap(tp50 / 3, tp50 / np.arange(1, 4))
    tp75 = np.cumsum([geos[0] > 0.75, geos[1] > 0.75, True])
    assert hits75 == tp75[-1]
    expected75 = voc_ap(tp75 / 3, tp75 / np.arange(1, 4))
    assert ap(res) == expected50 and ap(res, "AP75") == expected75


def test_near_tie_between_two_objects_is_decided_by_geos():
    """When two objects' IoUs with a detection are within the numpy bound of each other, GEOS picks the
    best (the first in label order among equal values): here a difficult object first, so the match is
    ignored, not a TP."""
    g = gt_image([rect(0, 0, 10, 10), rect(0, 0, 10, 10)], [0, 0], [1, 0])
    res = evaluate_detections({"img": g}, {"a": polys(("img", 0.9, rect(0, 0, 10, 9)))}, ["a"], protocol=DEVKIT)
    assert res["candidate_pairs"]["computed_by_geos"] == 2
    assert ap(res) == 0.0 and res["classes"]["a"]["num_gt"] == 1


def _rect_pair_cases(rng, n, offset=0.0):
    """Random overlapping rotated boxes (n pairs) and special pairs: identical, sharing an edge, nested,
    rotated by 90 degrees onto itself, touching at a corner, 1 px apart, sharing a corner's two edges, turned."""
    a = np.column_stack([rng.uniform(0, 60, (n, 2)) + offset, rng.uniform(2, 60, n), rng.uniform(2, 25, n),
                         rng.uniform(-np.pi / 2, np.pi / 2, n)])
    b = a + np.column_stack([rng.normal(0, 6, (n, 2)), rng.normal(0, 4, (n, 2)), rng.normal(0, 0.4, n)])
    b[:, 2:4] = np.abs(b[:, 2:4]) + 0.5
    o = offset
    special = [(box(0, 0, 10, 10), box(0, 0, 10, 10)), (box(0, 0, 10, 10), box(10, 0, 20, 10)),
               (box(0, 0, 10, 10), box(2, 2, 5, 5)), (box(0, 0, 10, 4), [5, 2, 4, 10, np.pi / 2]),
               (box(0, 0, 10, 10), box(10, 10, 20, 20)), (box(0, 0, 10, 10), box(11, 1, 20, 9)),
               (box(0, 0, 10, 10), box(0, 0, 5, 4)), (box(0, 0, 10, 10), [5, 5, 10, 10, 0.3])]
    sa = np.array([p for p, _ in special], float) + [o, o, 0, 0, 0]
    sb = np.array([q for _, q in special], float) + [o, o, 0, 0, 0]
    return np.vstack([a, sa]), np.vstack([b, sb])


@pytest.mark.parametrize("offset", [0.0, 3000.0])
def test_numpy_rectangle_iou_is_exact_or_flagged(offset):
    """rect_pair_iou (Green's theorem over clipped edges, numpy) against GEOS on the boxes' corners: within
    1e-12 wherever it does not flag the pair; the pairs with an edge on the other's boundary line are
    flagged (their value is left to the rotated-IoU kernel)."""
    from mutdet.evaluation.polygons import rect_pair_iou

    rng = np.random.default_rng(4)
    a, b = _rect_pair_cases(rng, 2000, offset)
    iou, flagged = rect_pair_iou(a, b)
    pa, pb = (shapely.polygons(le90_to_polygon(x).reshape(-1, 4, 2)) for x in (a, b))
    inter = shapely.area(shapely.intersection(pa, pb))
    geos = inter / (shapely.area(pa) + shapely.area(pb) - inter)
    assert np.all(np.abs(iou - geos)[~flagged] <= 1e-12)
    assert (geos > 0.1).sum() > 1000
    # identical, edge-sharing, rotated onto itself, touching at a corner (collinear edges), sharing two edges:
    # flagged; nested, 1 px apart, turned: not
    assert flagged[-8:].tolist() == [True, True, False, True, True, False, True, False]
    np.testing.assert_allclose(iou[-8:][~flagged[-8:]], [9 / 100, 0.0, geos[-1]], atol=1e-12)


@pytest.mark.parametrize("offset", [0.0, 3000.0])
def test_mmrotate_numpy_decisions_are_the_kernels(offset, monkeypatch):
    """The mmrotate path decides detections from numpy IoUs only where the rotated-IoU kernel (torchvision's,
    float32) cannot decide otherwise: hits at each threshold and the matched object equal the kernel's on
    jittered, duplicated and exactly-at-threshold boxes; with an infinite margin every detection goes to
    the kernel and the decisions are the same."""
    from mutdet.boxes import rotated_iou

    rng = np.random.default_rng(5)
    centres = rng.uniform(0, 300, (120, 2)) + offset
    gt_boxes = np.column_stack([centres, rng.uniform(8, 40, 120), rng.uniform(4, 12, 120), rng.uniform(-1.5, 1.5, 120)])
    det_boxes = gt_boxes[rng.integers(0, 120, 200)] + np.column_stack(
        [rng.normal(0, 3, (200, 2)), rng.normal(0, 1, (200, 2)), rng.normal(0, 0.1, 200)])
    det_boxes[:, 2:4] = np.abs(det_boxes[:, 2:4]) + 1
    # Exact copies, and halves / three quarters of axis-aligned objects (IoU 0.5 and 0.75 in exact arithmetic).
    gt_boxes[:4, 4] = 0.0
    halves = gt_boxes[:4].copy()
    halves[:2, 2] /= 2
    halves[2:, 2] *= 0.75
    halves[:, 0] -= (gt_boxes[:4, 2] - halves[:, 2]) / 2
    det_boxes = np.vstack([det_boxes, gt_boxes[10:14], halves])
    det_boxes = det_boxes.astype(np.float32).astype(np.float64)
    gt_boxes = gt_boxes.astype(np.float32).astype(np.float64)
    n = len(det_boxes)
    thresholds = (0.5, 0.75)
    kernel = rotated_iou(det_boxes, gt_boxes)  # float32 values
    kmax, karg = kernel.max(axis=1), kernel.argmax(axis=1)
    assert (kmax > 0).sum() > 150
    for scale in (1.0, np.inf):
        monkeypatch.setattr(rotated_ap, "KERNEL_MARGIN_SCALE", scale)
        best, arg, pairs = rotated_ap._best_mmrotate(gt_boxes, np.zeros(120, np.int64), det_boxes,
                                                     np.zeros(n, np.int64), thresholds)
        for t in thresholds:
            np.testing.assert_array_equal(best >= t, kmax >= t)
        hit = kmax >= min(thresholds)
        np.testing.assert_array_equal(arg[hit], karg[hit])
        assert np.all(best[kmax == 0] == 0)
        if scale == 1.0:
            assert 8 <= pairs["computed_by_kernel"] < pairs["computed"] / 4  # the copies and the halves at least
        else:
            assert pairs["computed_by_kernel"] == pairs["computed"] and pairs["skipped_by_bound"] == 0
