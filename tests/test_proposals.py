"""Proposers (mutdet.proposals): mask -> box path, selective search, graph segmentation, SAM loading and
generation with a tiny SAM built from segment-anything's own classes."""
import math

import cv2
import numpy as np
import pytest
import torch
from segment_anything.utils.amg import mask_to_rle_pytorch, rle_to_mask

from mutdet.boxes import le90_to_polygon, polygon_to_le90, rotated_iou
from mutdet.config import from_dict
from mutdet.proposals import ProposalSet, boxes_to_tile, build_proposer, check_image, mask_box
from mutdet.proposals import sam as sam_module
from mutdet.proposals.graph import GraphProposer
from mutdet.proposals.sam import SamCheckpointError, SamProposer, build_sam_tiny, decode_rle, load_sam
from mutdet.proposals.selective_search import SelectiveSearchProposer

from conftest import tiny_sam_checkpoint

# Bright rotated rectangles (le90, tile pixels) drawn on a textured background.
RECTS = np.array([
    [60.0, 60.0, 60.0, 24.0, math.radians(30)],
    [170.0, 80.0, 70.0, 30.0, math.radians(-60)],
    [110.0, 180.0, 80.0, 36.0, math.radians(75)],
])
LOW_THRESHOLDS = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}


def scene(size=256, seed=0):
    """BGR uint8 ``(size, size, 3)``: blurred noise background plus the filled ``RECTS``."""
    rng = np.random.default_rng(seed)
    background = cv2.GaussianBlur(rng.normal(90, 25, (size, size, 3)), (0, 0), 1.5)
    image = np.clip(background, 0, 255).astype(np.uint8)
    colours = [(240, 240, 240), (60, 220, 250), (250, 200, 60)]
    for box, colour in zip(RECTS, colours):
        cv2.fillPoly(image, [le90_to_polygon(box).reshape(4, 2).round().astype(np.int32)], colour)
    return image


def angle_error(a, b):
    """Smallest difference between two box angles (radians, modulo pi), in degrees."""
    d = (a - b) % math.pi
    return math.degrees(min(d, math.pi - d))


def assert_valid(p: ProposalSet, size: int):
    assert p.boxes.dtype == np.float64 and p.boxes.shape == (len(p), 5)
    assert np.isfinite(p.boxes).all()
    assert (p.boxes[:, 2] >= p.boxes[:, 3]).all() and (p.boxes[:, 3] > 0).all()
    assert (p.boxes[:, 4] >= -math.pi / 2).all() and (p.boxes[:, 4] < math.pi / 2).all()
    assert (p.boxes[:, :2] >= -1).all() and (p.boxes[:, :2] <= size).all()
    assert (np.diff(p.score) <= 0).all()
    assert (p.area > 0).all()


# ------------------------------------------------------------------ mask -> box


@pytest.mark.parametrize("degrees", [-89, -45, -10, 0, 20, 60, 89])
def test_mask_box_recovers_rotated_rectangles(degrees):
    box = np.array([100.0, 90.0, 80.0, 30.0, math.radians(degrees)])
    mask = np.zeros((200, 200), np.uint8)
    cv2.fillPoly(mask, [le90_to_polygon(box).reshape(4, 2).round().astype(np.int32)], 1)
    # Cropped as SAM and graph proposals are: the box comes back in the full frame.
    ys, xs = np.nonzero(mask)
    x0, y0 = xs.min(), ys.min()
    out = mask_box(mask[y0:ys.max() + 1, x0:xs.max() + 1], (int(x0), int(y0)))
    assert angle_error(out[4], box[4]) < 2.0
    assert np.allclose(out[:2], box[:2], atol=1.0)
    assert np.allclose(out[2:4], box[2:4], atol=2.5)


@pytest.mark.parametrize("degrees", [-70, -30, 0, 15, 50, 85])
def test_mask_box_recovers_ellipse_axes(degrees):
    mask = np.zeros((160, 160), np.uint8)
    # cv2.ellipse rotates clockwise on screen (y down) by `angle` degrees, as le90's theta.
    cv2.ellipse(mask, (80, 70), (60, 15), degrees, 0, 360, 1, thickness=-1)
    out = mask_box(mask)
    # The area of a rectangle around an ellipse is flat near its minimum: rasterisation moves it a little.
    assert angle_error(out[4], math.radians(degrees)) < 3.5
    assert np.allclose(out[:2], [80, 70], atol=1.0)
    assert np.allclose(out[2:4], [121, 31], atol=3.0)  # the full axes, pixels included


def test_mask_box_empty_mask_is_none():
    assert mask_box(np.zeros((8, 8), bool)) is None


def test_boxes_to_tile_maps_pixel_extents():
    # A working box covering pixels 2..5 x 1..2 (4 x 2) at scale 4 covers tile pixels 8..23 x 4..11.
    work = np.array([[3.5, 1.5, 4.0, 2.0, 0.0]])
    tile = boxes_to_tile(work, 4.0, 4.0)
    assert np.allclose(tile, [[15.5, 7.5, 16.0, 8.0, 0.0]])
    rotated = np.array([[10.0, 10.0, 6.0, 2.0, 0.4]])
    assert np.allclose(boxes_to_tile(rotated, 1.0, 1.0), rotated)
    assert np.allclose(boxes_to_tile(rotated, 2.0, 2.0)[0, 2:], [12.0, 4.0, 0.4])


def test_proposal_set_ranked_and_nan_sam_scores():
    p = ProposalSet.from_lists(np.arange(15.0).reshape(3, 5), [0.2, 0.9, 0.5], [1, 2, 3])
    r = p.ranked(2)
    assert r.score.tolist() == pytest.approx([0.9, 0.5])
    assert r.area.tolist() == [2, 3]
    assert np.isnan(r.predicted_iou).all() and np.isnan(r.stability_score).all()


def test_check_image_rejects_non_bgr():
    with pytest.raises(ValueError, match="BGR uint8"):
        check_image(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="BGR uint8"):
        check_image(np.zeros((8, 8, 3), np.float32))


# ------------------------------------------------------------------ classical methods


def test_selective_search_boxes_valid_capped_and_reproducible():
    image = scene()
    p = SelectiveSearchProposer(mode="fast", resize=128, max_boxes=30)(image)
    assert 0 < len(p) <= 30
    assert_valid(p, 256)
    theta = p.boxes[:, 4]
    assert np.all(np.isclose(theta, 0) | np.isclose(theta, -math.pi / 2))  # axis-aligned
    assert np.allclose(p.area, p.boxes[:, 2] * p.boxes[:, 3])
    assert np.isnan(p.predicted_iou).all()
    assert p.score[0] == 1.0
    # OpenCV ranks with C rand(): reseeded per tile, the output does not depend on earlier calls.
    again = SelectiveSearchProposer(mode="fast", resize=128, max_boxes=30)(image)
    assert np.array_equal(p.boxes, again.boxes)
    assert len(SelectiveSearchProposer(max_boxes=30, max_per_tile=5)(image)) == 5


def test_graph_recovers_rotated_rectangles():
    image = scene()
    p = GraphProposer(sigma=0.8, k=300, min_size=50, resize=256, min_area=16, max_area_fraction=0.25)(image)
    assert_valid(p, 256)
    assert (p.score <= 1).all() and np.isnan(p.predicted_iou).all()
    iou = rotated_iou(RECTS, p.boxes)  # (3, N)
    for gt, overlaps in zip(RECTS, iou):
        # Each rectangle's interior is a segment that fills its box (score = fill ratio); the thin
        # ring of blurred edge pixels around it is a segment too, with a low fill ratio.
        k = np.flatnonzero(overlaps > 0.8)[0]  # the best-scored proposal on this rectangle
        assert p.score[k] > 0.9
        assert angle_error(p.boxes[k, 4], gt[4]) < 3.0
    # Resizing: the same rectangles found at half resolution, mapped back to tile pixels.
    half = GraphProposer(resize=128, min_size=10)(image)
    assert (rotated_iou(RECTS, half.boxes).max(axis=1) > 0.7).all()
    assert len(GraphProposer(resize=256, max_per_tile=2)(image)) == 2


def test_graph_drops_background_and_small_segments():
    flat = np.full((64, 64, 3), 128, np.uint8)
    assert len(GraphProposer(resize=64)(flat)) == 0  # one segment covering everything: background
    assert len(GraphProposer(resize=64, max_area_fraction=1.0)(flat)) == 1
    assert len(GraphProposer(resize=64, max_area_fraction=1.0, min_area=64 * 64 + 1)(flat)) == 0


# ------------------------------------------------------------------ SAM


@pytest.fixture
def tiny_sam(monkeypatch, tmp_path):
    """Register the ``tiny`` model type and save a seeded checkpoint of it; returns its path."""
    return tiny_sam_checkpoint(monkeypatch, tmp_path, "tiny")


def test_load_sam_reads_the_checkpoint_weights(tiny_sam):
    model = load_sam("tiny", tiny_sam)
    saved = torch.load(tiny_sam, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert not model.training


def test_sam_proposer_boxes_scores_and_cap(tiny_sam):
    image = scene(96)
    proposer = SamProposer(load_sam("tiny", tiny_sam), generator=LOW_THRESHOLDS, max_per_tile=1000, device="cpu")
    records = proposer.generate(image)
    p = proposer.to_proposals(records)
    assert len(records) > 3 and 0 < len(p) <= len(records)
    assert_valid(p, 96)
    assert np.array_equal(p.score, p.predicted_iou)
    assert np.isfinite(p.stability_score).all()
    assert set(p.area.tolist()) <= {float(r["area"]) for r in records}
    # The cap keeps the highest predicted IoUs.
    capped = SamProposer(load_sam("tiny", tiny_sam), generator=LOW_THRESHOLDS, max_per_tile=3, device="cpu")(image)
    assert len(capped) == 3
    assert np.allclose(capped.predicted_iou, p.predicted_iou[:3])
    # Each box is its mask's minimum-area rectangle (SAM masks are in tile pixels).
    best = max(records, key=lambda r: r["predicted_iou"])
    assert np.allclose(mask_box(rle_to_mask(best["segmentation"])), p.boxes[0])


def test_decode_rle_matches_segment_anything():
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(rng.random((4, 13, 7)) > 0.6)
    masks[1] = True
    masks[2] = False
    for mask, rle in zip(masks, mask_to_rle_pytorch(masks)):
        decoded = decode_rle(rle)
        assert decoded.shape == (13, 7) and decoded.dtype == bool
        assert np.array_equal(decoded, rle_to_mask(rle)) and np.array_equal(decoded, mask.numpy())


def test_sam_proposer_autocast_keeps_float32_outputs(tiny_sam):
    p = SamProposer(load_sam("tiny", tiny_sam), generator=LOW_THRESHOLDS, device="cpu", precision="bf16")(scene(64))
    assert len(p) > 0 and p.score.dtype == np.float32
    assert_valid(p, 64)


def test_build_proposer_sam_through_the_config(tiny_sam, monkeypatch, caplog):
    monkeypatch.setitem(sam_module.SAM_BUILDERS, "vit_b", sam_module.SAM_BUILDERS["tiny"])
    cfg = from_dict({"proposals": {"method": "sam", "max_per_tile": 4, "sam": {
        "model_type": "vit_b", "checkpoint": str(tiny_sam), "device": "auto", "precision": "bf16",
        "generator": LOW_THRESHOLDS}}})
    proposer = build_proposer(cfg.proposals)
    assert isinstance(proposer, SamProposer) and proposer.max_per_tile == 4
    assert proposer.generator.points_per_batch == 64 and proposer.generator.box_nms_thresh == 1.0
    if proposer.device.type == "cpu":
        assert proposer.precision == "fp32" and "ignored on the CPU" in caplog.text
    assert 0 < len(proposer(scene(64))) <= 4


def test_missing_checkpoint_is_a_clear_error(tiny_sam, tmp_path):
    missing = tmp_path / "nope" / "sam_vit_h.pth"
    with pytest.raises(SamCheckpointError, match=r"nope/sam_vit_h\.pth not found.*model_type tiny"):
        load_sam("tiny", missing)
    with pytest.raises(SamCheckpointError, match="proposals.sam.checkpoint is not set.*tiny"):
        load_sam("tiny", None)
    with pytest.raises(ValueError, match="unknown SAM model type 'vit_x'"):
        load_sam("vit_x", tiny_sam)


def test_mismatched_checkpoint_is_a_clear_error(tiny_sam, tmp_path, monkeypatch):
    wide = tmp_path / "sam_wide.pth"
    torch.save(build_sam_tiny(img_size=64, embed_dim=48).state_dict(), wide)
    with pytest.raises(SamCheckpointError, match=r"sam_wide\.pth does not match model_type tiny.*shape mismatches"):
        load_sam("tiny", wide)
    # A checkpoint of another registered type is named; here the tiny file given as vit_b.
    with pytest.raises(SamCheckpointError,
                       match=r"sam_tiny\.pth does not match model_type vit_b; it fits model_type tiny"):
        load_sam("vit_b", tiny_sam)
    partial = tmp_path / "sam_partial.pth"
    state = torch.load(tiny_sam, weights_only=True)
    state.pop("mask_decoder.iou_token.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, partial)
    with pytest.raises(SamCheckpointError,
                       match=r"1 missing keys: mask_decoder\.iou_token\.weight.*1 unexpected keys: extra\.weight"):
        load_sam("tiny", partial)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(SamCheckpointError,
                       match=r"garbage\.pth: not a readable PyTorch state dict \(expected model_type tiny\)"):
        load_sam("tiny", garbage)


# ------------------------------------------------------------------ graph: scales, grouping, filters, NMS


def striped_cars(size=128, seed=0):
    """BGR ``(size, size, 3)``: 6 car-like objects (light body cut by two dark window bands) on grass,
    plus their le90 boxes ``(6, 5)``. Each car is three segments to a graph segmentation."""
    rng = np.random.default_rng(seed)
    image = np.clip(cv2.GaussianBlur(rng.normal((60, 120, 70), 6, (size, size, 3)), (0, 0), 1.0), 0, 255).astype(np.uint8)
    cars = []
    for i in range(6):
        cx, cy = 22 + (i % 3) * 40, 35 + (i // 3) * 55
        theta = math.radians(-60 + 25 * i)
        box = np.array([cx, cy, 26.0, 12.0, theta])
        cv2.fillPoly(image, [le90_to_polygon(box).reshape(4, 2).round().astype(np.int32)], (225, 225, 230))
        for offset in (-5.0, 6.0):  # windscreen and rear window across the body
            band = np.array([cx + offset * math.cos(theta), cy + offset * math.sin(theta), 10.0, 3.0, theta + math.pi / 2])
            cv2.fillPoly(image, [le90_to_polygon(band).reshape(4, 2).round().astype(np.int32)], (40, 40, 45))
        cars.append(box)
    return image, np.array(cars)


def graph_recall(proposer, image, boxes):
    p = proposer(image)
    return (rotated_iou(boxes, p.boxes).max(axis=1) >= 0.5).mean() if len(p) else 0.0


def test_graph_grouping_recovers_objects_made_of_several_segments():
    image, cars = striped_cars()
    settings = {"sigma": 0.5, "k": 50, "min_size": 4, "resize": 128, "min_area": 12, "max_area_fraction": 0.25}
    plain = GraphProposer(**settings)
    grouped = GraphProposer(**settings, grouping=True)
    assert graph_recall(plain, image, cars) < 0.5  # body and windows are separate segments
    assert graph_recall(grouped, image, cars) == 1.0  # merged regions cover whole cars
    p = grouped(image)
    assert_valid(p, 128)
    assert np.array_equal(p.boxes, grouped(image).boxes)  # deterministic


def test_graph_demo_settings_beat_the_old_defaults_on_a_generated_scene():
    from mutdet.synthetic import render_image

    sample = render_image(seed=123, size=512)  # a training-like scene (not a test-split seed)
    boxes = polygon_to_le90(sample.polygons)

    def window(x0, y0):  # objects whose centre lies well inside the 256 px window at (x0, y0)
        return ((boxes[:, 0] > x0 + 8) & (boxes[:, 0] < x0 + 248) & (boxes[:, 1] > y0 + 8) & (boxes[:, 1] < y0 + 248))

    x0, y0 = max(((x, y) for x in (0, 128, 256) for y in (0, 128, 256)), key=lambda o: window(*o).sum())
    tile = np.ascontiguousarray(sample.image[y0:y0 + 256, x0:x0 + 256])
    gt = boxes[window(x0, y0)] - [x0, y0, 0, 0, 0]
    assert len(gt) >= 5
    old = GraphProposer(max_per_tile=100)
    new = GraphProposer(k=[50, 100, 200], min_size=10, resize=512, min_area=12, max_area_fraction=0.1, grouping=True,
                        max_aspect=8, nms_iou=0.7, score="fill_log_area", max_per_tile=100)
    assert graph_recall(new, tile, gt) > graph_recall(old, tile, gt)


def test_graph_scales_pool_regions_and_nms_removes_duplicates():
    image = scene()
    settings = {"min_size": 20, "resize": 256, "min_area": 16}
    one = GraphProposer(k=300, **settings)
    two = GraphProposer(k=[300, 300], **settings)
    assert len(two(image)) == 2 * len(one(image))  # each scale segments once, pooled
    deduplicated = GraphProposer(k=[300, 300], nms_iou=0.7, **settings)(image)
    # every duplicate of the second scale goes (and overlapping segments of one scale, e.g. the ring
    # of edge pixels around a rectangle, as with one scale)
    assert np.allclose(deduplicated.boxes, GraphProposer(k=300, nms_iou=0.7, **settings)(image).boxes)
    assert len(deduplicated) <= len(one(image))
    iou = rotated_iou(deduplicated.boxes, deduplicated.boxes)
    assert (iou[~np.eye(len(iou), dtype=bool)] <= 0.7).all()


def test_graph_aspect_filter_and_log_area_score():
    image = scene()
    p = GraphProposer(resize=256, min_size=20, max_aspect=2.0)(image)
    assert (p.boxes[:, 2] <= 2.0 * p.boxes[:, 3] + 1e-9).all()
    q = GraphProposer(resize=256, min_size=20, score="fill_log_area")(image)
    fill = GraphProposer(resize=256, min_size=20)(image)
    assert np.allclose(np.sort(q.score), np.sort(fill.score * np.log(fill.area)), rtol=1e-5)
    with pytest.raises(ValueError, match="score"):
        GraphProposer(score="iou")


def test_graph_settings_through_the_config():
    cfg = from_dict({"proposals": {"method": "graph", "max_per_tile": 7, "graph": {
        "k": [100, 300], "grouping": True, "max_aspect": 6, "nms_iou": 0.5, "score": "fill_log_area"}}}).proposals
    proposer = build_proposer(cfg)
    assert proposer.ks == (100.0, 300.0) and proposer.grouping and proposer.max_aspect == 6
    assert proposer.nms_iou == 0.5 and proposer.score == "fill_log_area" and proposer.max_per_tile == 7
    params = cfg.method_params()
    assert params["k"] == [100, 300] and params["grouping"] is True
    assert from_dict({"proposals": {"method": "graph"}}).proposals.method_params() != params
