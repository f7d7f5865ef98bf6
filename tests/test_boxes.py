import math

import cv2
import numpy as np
import pytest
import shapely
import torch
from torchvision.ops import box_convert

from mutdet import boxes as B

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by `make test`


def random_le90(rng, n, lo=2.0, hi=60.0, extent=200.0):
    wh = rng.uniform(lo, hi, size=(n, 2))
    return B.normalize_le90(np.column_stack([
        rng.uniform(0, extent, n), rng.uniform(0, extent, n), wh, rng.uniform(-math.pi, math.pi, n)]))


def same_polygon(p, q, tol=1e-6):
    """Equal as closed rings up to the starting corner."""
    p, q = np.asarray(p).reshape(4, 2), np.asarray(q).reshape(4, 2)
    return any(np.abs(np.roll(p, k, axis=0) - q).max() < tol for k in range(4))


def test_normalize_le90_range_and_order():
    rng = np.random.default_rng(0)
    raw = np.column_stack([rng.uniform(0, 100, (500, 2)), rng.uniform(1, 50, (500, 2)), rng.uniform(-10, 10, 500)])
    out = B.normalize_le90(raw)
    assert (out[:, 2] >= out[:, 3]).all()
    assert (out[:, 4] >= -math.pi / 2).all() and (out[:, 4] < math.pi / 2).all()
    for a, b in zip(raw, out):  # same box: same polygon up to corner order
        assert same_polygon(B.le90_to_polygon(a), B.le90_to_polygon(b), 1e-6) or \
            shapely.Polygon(B.le90_to_polygon(a).reshape(4, 2)).symmetric_difference(
                shapely.Polygon(B.le90_to_polygon(b).reshape(4, 2))).area < 1e-6


@pytest.mark.parametrize("theta", [-math.pi / 2, -math.pi / 2 + 1e-7, -1e-9, 0.0, math.pi / 2 - 1e-7, math.pi / 2, 3.0])
def test_boundary_angles_fold_into_range(theta):
    out = B.normalize_le90([10, 20, 30, 10, theta])
    assert -math.pi / 2 <= out[4] < math.pi / 2
    assert same_polygon(B.le90_to_polygon(out), B.le90_to_polygon([10, 20, 30, 10, theta]), 1e-5)


def test_pi_half_maps_to_minus_pi_half():
    assert B.normalize_le90([0, 0, 4, 2, math.pi / 2])[4] == pytest.approx(-math.pi / 2)


def test_polygon_corner_order_and_clockwise_angle():
    poly = B.le90_to_polygon([10, 10, 8, 4, 0])
    np.testing.assert_allclose(poly, [6, 8, 14, 8, 14, 12, 6, 12])
    # A positive theta turns clockwise on screen (y down): the w-side's right end moves down.
    poly = B.le90_to_polygon([0, 0, 2, 0.0, math.pi / 6])
    assert poly[3] > 0


@pytest.mark.parametrize("theta", [-math.pi / 2, -math.pi / 2 + 1e-6, -0.3, 0.0, 0.7, math.pi / 2 - 1e-6])
@pytest.mark.parametrize("wh", [(30.0, 10.0), (12.0, 12.0)])
def test_polygon_round_trip_at_boundaries(theta, wh):
    box = B.normalize_le90([50.0, 40.0, *wh, theta])
    back = B.polygon_to_le90(B.le90_to_polygon(box))
    # Squares have a 90-degree symmetry: compare the polygons, not the parameters.
    assert same_polygon(B.le90_to_polygon(back), B.le90_to_polygon(box), 1e-6)
    if wh[0] != wh[1]:
        np.testing.assert_allclose(back, box, atol=1e-9)


def test_polygon_round_trip_random():
    boxes = random_le90(np.random.default_rng(1), 300)
    np.testing.assert_allclose(B.polygon_to_le90(B.le90_to_polygon(boxes)), boxes, atol=1e-7)


def test_quadrilateral_goes_to_min_area_rectangle():
    quad = np.array([0, 0, 10, 1, 11, 6, 1, 5.0])  # not a rectangle
    box = B.polygon_to_le90(quad)
    rect = B.le90_to_polygon(box).reshape(4, 2)
    hull = shapely.Polygon(quad.reshape(4, 2))
    assert shapely.Polygon(rect).contains(hull.buffer(-1e-3))
    assert box[2] * box[3] == pytest.approx(cv2.contourArea(cv2.boxPoints(cv2.minAreaRect(quad.reshape(4, 2).astype(np.float32)))), rel=1e-4)


def test_torchvision_cxcywhr_agrees_with_our_polygons():
    boxes = random_le90(np.random.default_rng(2), 200)
    tv = box_convert(torch.from_numpy(B.le90_to_cxcywhr(boxes)), "cxcywhr", "xyxyxyxy").numpy()
    np.testing.assert_allclose(tv, B.le90_to_polygon(boxes), atol=1e-9)
    np.testing.assert_allclose(B.cxcywhr_to_le90(B.le90_to_cxcywhr(boxes)), boxes, atol=1e-12)


def test_rotated_iou_matches_shapely():
    rng = np.random.default_rng(3)
    a, b = random_le90(rng, 60, extent=80), random_le90(rng, 70, extent=80)
    iou = B.rotated_iou(a, b)
    pa = shapely.polygons(B.le90_to_polygon(a).reshape(-1, 4, 2))
    pb = shapely.polygons(B.le90_to_polygon(b).reshape(-1, 4, 2))
    inter = shapely.area(shapely.intersection(pa[:, None], pb[None, :]))
    ref = inter / (shapely.area(pa)[:, None] + shapely.area(pb)[None, :] - inter)
    assert (ref > 0).sum() > 200  # the draw really has overlaps
    np.testing.assert_allclose(iou, ref, atol=2e-5)


def test_rotated_iou_tensor_and_empty():
    a = torch.tensor([[10.0, 10, 8, 4, 0.3]])
    assert isinstance(B.rotated_iou(a, a), torch.Tensor)
    assert B.rotated_iou(a, a).item() == pytest.approx(1.0, abs=1e-5)
    assert B.rotated_iou(np.zeros((0, 5)), np.ones((3, 5))).shape == (0, 3)


def greedy_nms_reference(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    polys = [shapely.Polygon(B.le90_to_polygon(b).reshape(4, 2)) for b in boxes]
    keep = []
    for i in order:
        ok = True
        for j in keep:
            inter = polys[i].intersection(polys[j]).area
            if inter / (polys[i].area + polys[j].area - inter) > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


@pytest.mark.parametrize("block", [7, 2048])
def test_rotated_nms_matches_greedy_reference(block):
    rng = np.random.default_rng(4)
    boxes = random_le90(rng, 150, lo=5, hi=40, extent=100)
    scores = rng.uniform(size=150).round(2)  # ties on purpose
    for thr in (0.1, 0.3, 0.5):
        np.testing.assert_array_equal(B.rotated_nms(boxes, scores, thr, block_size=block),
                                      greedy_nms_reference(boxes, scores, thr))


def test_batched_nms_is_per_category():
    rng = np.random.default_rng(5)
    boxes = random_le90(rng, 120, lo=5, hi=40, extent=80)
    scores = rng.uniform(size=120)
    idxs = rng.integers(0, 3, 120)
    keep = B.batched_rotated_nms(boxes, scores, idxs, 0.2)
    expected = []
    for c in range(3):
        m = np.flatnonzero(idxs == c)
        expected += [m[k] for k in greedy_nms_reference(boxes[m], scores[m], 0.2)]
    assert sorted(keep.tolist()) == sorted(expected)
    assert (np.diff(scores[keep]) <= 0).all()
    # identical boxes of different categories never suppress each other
    two = np.array([[5, 5, 4, 2, 0.0]] * 2)
    assert sorted(B.batched_rotated_nms(two, [0.9, 0.8], [0, 1], 0.1).tolist()) == [0, 1]


def test_mask_to_le90_recovers_drawn_rectangle():
    mask = np.zeros((200, 200), np.uint8)
    truth = np.array([100.0, 90.0, 80.0, 30.0, math.radians(25)])
    cv2.fillPoly(mask, [B.le90_to_polygon(truth).reshape(4, 2).round().astype(np.int32)], 1)
    small = np.zeros_like(mask)
    small[5:9, 5:9] = 1  # a second, smaller component is ignored
    box = B.mask_to_le90(mask | small)
    assert abs(box[0] - truth[0]) < 1.0 and abs(box[1] - truth[1]) < 1.0
    # fillPoly includes boundary pixels and pixel squares add up to one pixel: a few pixels of slack
    assert abs(box[2] - truth[2]) < 3 and abs(box[3] - truth[3]) < 3
    assert abs(box[4] - truth[4]) < math.radians(2)
    assert B.mask_to_le90(np.zeros((5, 5), bool)) is None


def test_rotated_nms_over_a_large_sparse_image_matches_the_greedy_reference():
    """The spatial pruning of candidate pairs (grid cells) changes no result: boxes spread over a large
    image, crowded clusters, one box much larger than the rest (many cells), boxes that only touch."""
    rng = np.random.default_rng(11)
    clusters = rng.uniform(0, 3000, (12, 2))
    crowd = np.column_stack([np.repeat(clusters, 15, axis=0) + rng.normal(0, 3, (180, 2)),
                             rng.uniform(10, 40, 180), rng.uniform(4, 10, 180), rng.uniform(-1.5, 1.5, 180)])
    scattered = random_le90(rng, 60, lo=5, hi=30, extent=3000)
    big = np.array([[1500.0, 1500.0, 2500.0, 900.0, 0.3]])
    touching = np.array([[100.0, 3100.0, 20.0, 10.0, 0.0], [120.0, 3100.0, 20.0, 10.0, 0.0]])
    boxes = np.concatenate([crowd, scattered, big, touching])
    scores = rng.permutation(len(boxes)) / len(boxes)  # no ties
    for thr in (0.0, 0.1, 0.5):
        for block in (3, 2048):
            np.testing.assert_array_equal(B.rotated_nms(boxes, scores, thr, block_size=block),
                                          greedy_nms_reference(boxes, scores, thr))
    with pytest.raises(ValueError, match="iou_threshold must be >= 0"):
        B.rotated_nms(boxes, scores, -0.1)


def kernel_greedy_reference(boxes, scores, thr, idxs=None):
    """Straightforward greedy NMS with torchvision's rotated IoU, the rule mutdet's NMS has always applied:
    the dense kernel matrix (``rotated_iou``, float32 values), a pair read with its lower index first;
    boxes by decreasing score (ties: lower index first), each kept unless a kept box of its category
    has IoU > thr with it."""
    n = len(boxes)
    idxs = np.zeros(n, int) if idxs is None else np.asarray(idxs)
    iou = B.rotated_iou(boxes, boxes)
    keep = []
    for i in sorted(range(n), key=lambda k: (-scores[k], k)):
        if not any(idxs[j] == idxs[i] and iou[min(i, j), max(i, j)] > thr for j in keep):
            keep.append(i)
    return keep


def crowded_le90(rng, n):
    """Clusters of jittered copies (duplicate detections) and scattered boxes, with the cases where the
    float32 kernel strays from the exact IoU: exact copies, right-angle turns, integer corners, slivers and
    sub-pixel boxes."""
    centres = rng.uniform(0, 300, (n // 12, 2))
    member = rng.integers(0, len(centres), n)
    w = rng.uniform(4, 40, n)
    boxes = np.column_stack([centres[member] + rng.normal(0, 3, (n, 2)), w, w * rng.uniform(0.2, 1, n),
                             rng.normal(0, 0.4, n) + member])
    boxes[: n // 10] = boxes[n // 10: 2 * (n // 10)]  # exact copies
    turn = rng.uniform(size=n) < 0.1
    boxes[turn, 4] = boxes[np.flatnonzero(turn) - 1, 4] + math.pi / 2  # the previous box turned
    grid = rng.uniform(size=n) < 0.1
    boxes[grid, :4] = np.round(boxes[grid, :4])
    boxes[grid, 4] = 0.0
    tiny = rng.uniform(size=n) < 0.05
    boxes[tiny, 2:4] *= 0.02
    return B.normalize_le90(boxes)


@pytest.mark.parametrize("seed", range(6))
def test_rotated_nms_keeps_exactly_what_the_kernel_greedy_keeps(seed):
    """Property test of the sparse NMS against the dense reference on crowded draws: ties in score, and
    thresholds equal to IoU values that occur (a pair at exactly the threshold is not suppressed: IoU
    must exceed it) or one float32 step below them."""
    rng = np.random.default_rng(100 + seed)
    boxes = crowded_le90(rng, 240)
    scores = rng.integers(0, 6, len(boxes)) / 5  # many ties
    iou = B.rotated_iou(boxes, boxes)
    occurring = iou[np.triu_indices(len(boxes), 1)]
    occurring = occurring[(occurring > 0.05) & (occurring < 0.95)]
    assert len(occurring) > 200  # the draw is crowded
    at = [float(v) for v in rng.choice(occurring, 3, replace=False)]
    below = [float(np.nextafter(np.float32(v), np.float32(0))) for v in at]
    for thr in [0.0, 0.1, 0.5, *at, *below]:
        want = kernel_greedy_reference(boxes, scores, thr)
        np.testing.assert_array_equal(B.rotated_nms(boxes, scores, thr), want, err_msg=f"threshold {thr!r}")
        np.testing.assert_array_equal(B.rotated_nms(boxes, scores, thr, block_size=17), want)


def test_batched_nms_keeps_exactly_what_the_kernel_greedy_keeps_per_category():
    rng = np.random.default_rng(7)
    boxes = crowded_le90(rng, 300)
    scores = rng.integers(0, 4, len(boxes)) / 3
    idxs = rng.integers(0, 4, len(boxes))
    for thr in (0.1, 0.3):
        want = sorted(kernel_greedy_reference(boxes, scores, thr, idxs), key=lambda k: (-scores[k], k))
        for block in (5, 64, 65536):  # categories batched together, or swept in slices
            np.testing.assert_array_equal(B.batched_rotated_nms(boxes, scores, idxs, thr, block_size=block), want)


def test_merge_detections_is_nms_per_image_and_class_in_order_of_appearance():
    rng = np.random.default_rng(8)
    boxes = crowded_le90(rng, 200)
    scores = rng.uniform(size=200).round(1)
    images = np.array(["b", "a", "c"])[rng.integers(0, 3, 200)]
    classes = rng.integers(0, 2, 200)
    from mutdet.tiling import merge_detections

    keep = merge_detections(images, boxes, scores, classes, 0.2)
    want = []
    for image in dict.fromkeys(images):  # first appearance
        members = np.flatnonzero(images == image)
        kept = [members[k] for c in (0, 1) for k in
                kernel_greedy_reference(boxes[members], scores[members], 0.2, classes[members]) if classes[members][k] == c]
        want += sorted(kept, key=lambda k: (-scores[k], k))
    np.testing.assert_array_equal(keep, want)


def test_rotated_nms_rejects_bad_boxes_and_needs_no_torch():
    boxes = np.array([[10.0, 10, 8, 4, 0.1], [11, 10, 8, 4, np.nan]])
    with pytest.raises(ValueError, match=r"rotated_nms: 1 box\(es\) not finite.*row 1"):
        B.rotated_nms(boxes, [0.9, 0.8], 0.1)
    with pytest.raises(ValueError, match="negative side"):
        B.batched_rotated_nms([[0, 0, -1, 1, 0]], [1.0], [0], 0.1)
    assert B.rotated_nms(np.zeros((0, 5)), [], 0.1).shape == (0,)
    import subprocess
    import sys

    code = ("import sys, numpy as np; from mutdet.boxes import rotated_nms; "
            "b = np.array([[10., 10, 8, 4, 0.1], [11, 10, 8, 4, 0.2], [40, 40, 5, 5, 0]]); "
            "print(rotated_nms(b, [0.9, 0.8, 0.7], 0.1).tolist(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("]")
    assert out[0] == "[0, 2" and out[1].strip() == "False"
