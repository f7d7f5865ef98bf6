"""Tests for the synthetic DOTA-style dataset generator (mutdet.synthetic)."""
from pathlib import Path

import cv2
import numpy as np
import pytest
from shapely import STRtree
from shapely.geometry import Polygon

from mutdet.synthetic import SYNTHETIC_CLASSES, SyntheticImage, render_image, write_dota_dataset

SIZE = 600
SEEDS = range(8)


@pytest.fixture(scope="module")
def samples() -> list[SyntheticImage]:
    return [render_image(seed, SIZE) for seed in SEEDS]


def corners(sample: SyntheticImage) -> np.ndarray:
    """``(N, 4, 2)`` box corners."""
    return sample.polygons.reshape(-1, 4, 2)


def test_render_is_deterministic_and_seed_dependent():
    a, b, c = render_image(11, 256), render_image(11, 256), render_image(12, 256)
    assert a.image.tobytes() == b.image.tobytes()
    np.testing.assert_array_equal(a.polygons, b.polygons)
    assert a.classes == b.classes
    np.testing.assert_array_equal(a.difficult, b.difficult)
    assert a.image.tobytes() != c.image.tobytes()


def test_output_types_and_shapes(samples):
    for s in samples:
        n = len(s.classes)
        assert s.image.shape == (SIZE, SIZE, 3) and s.image.dtype == np.uint8
        assert s.polygons.shape == (n, 8) and s.polygons.dtype == np.float64
        assert s.difficult.shape == (n,) and s.difficult.dtype == np.int8
        assert set(s.classes) <= set(SYNTHETIC_CLASSES)
        assert set(np.unique(s.difficult).tolist()) <= {0, 1}


def test_size_too_small_is_rejected():
    with pytest.raises(ValueError, match="size"):
        render_image(0, 32)


def test_polygons_are_rectangles_inside_the_image(samples):
    for s in samples:
        c = corners(s)
        assert c.min() >= 0 and c.max() <= SIZE
        edges = np.roll(c, -1, axis=1) - c  # (N, 4, 2): p1->p2, p2->p3, p3->p4, p4->p1
        lengths = np.linalg.norm(edges, axis=2)
        np.testing.assert_allclose(lengths[:, 0], lengths[:, 2], atol=1e-6)
        np.testing.assert_allclose(lengths[:, 1], lengths[:, 3], atol=1e-6)
        dots = (edges * np.roll(edges, -1, axis=1)).sum(axis=2)
        np.testing.assert_allclose(dots / (lengths * np.roll(lengths, -1, axis=1)), 0, atol=1e-6)


def test_corner_order_is_clockwise_on_screen(samples):
    """For angle 0 the corners run top-left, top-right, bottom-right, bottom-left: clockwise with y down."""
    for s in samples:
        c = corners(s)
        e1, e2 = c[:, 1] - c[:, 0], c[:, 2] - c[:, 1]
        assert (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0] > 0).all()


def test_difficult_marks_the_smallest_objects(samples):
    for s in samples:
        c = corners(s)
        short = np.minimum(np.linalg.norm(c[:, 1] - c[:, 0], axis=1), np.linalg.norm(c[:, 2] - c[:, 1], axis=1))
        np.testing.assert_array_equal(s.difficult, (short < 4.5).astype(np.int8))


def test_all_classes_appear_with_plausible_sizes(samples):
    sides = {name: [] for name in SYNTHETIC_CLASSES}
    for s in samples:
        c = corners(s)
        for name, quad in zip(s.classes, c):
            a, b = np.linalg.norm(quad[1] - quad[0]), np.linalg.norm(quad[2] - quad[1])
            sides[name].append((max(a, b), min(a, b)))
    assert all(sides.values()), {k: len(v) for k, v in sides.items()}
    limits = {"plane": (40, 90), "ship": (30, 120), "storage-tank": (15, 50), "small-vehicle": (8, 14),
              "large-vehicle": (20, 35)}
    for name, (lo, hi) in limits.items():
        longest = np.array(sides[name])[:, 0]
        assert lo - 1e-6 <= longest.min() and longest.max() <= hi + 1e-6, name
    tanks = np.array(sides["storage-tank"])
    np.testing.assert_allclose(tanks[:, 0], tanks[:, 1], rtol=1e-9)  # a square around the circle


def test_angles_cover_the_full_circle(samples):
    angles = np.degrees(np.concatenate([
        np.arctan2(c[:, 1, 1] - c[:, 0, 1], c[:, 1, 0] - c[:, 0, 0]) for c in map(corners, samples)]))
    assert angles.min() < -60 and angles.max() > 60
    hist, _ = np.histogram(angles, bins=12, range=(-180, 180))
    assert (hist > 0).all(), hist


def test_objects_do_not_overlap_much(samples):
    for s in samples:
        polys = [Polygon(q) for q in corners(s)]
        tree = STRtree(polys)
        left, right = tree.query(polys, predicate="intersects")
        for i, j in zip(left, right):
            if i < j:
                inter = polys[i].intersection(polys[j]).area
                iou = inter / (polys[i].area + polys[j].area - inter)
                assert iou < 0.2, (s.classes[i], s.classes[j], iou)


def test_objects_stand_out_from_their_surroundings(samples):
    """Mean |interior pixel - mean of a ring around the box| is clearly non-zero for every object."""
    checked = 0
    for s in samples:
        masks = []
        for quad in corners(s):
            m = np.zeros((SIZE, SIZE), np.uint8)
            cv2.fillPoly(m, [np.round(quad).astype(np.int32)], 1)
            masks.append(m)
        others = cv2.dilate(np.bitwise_or.reduce(masks, axis=0), np.ones((3, 3), np.uint8)) > 0
        for name, m in zip(s.classes, masks):
            ring = (cv2.dilate(m, np.ones((9, 9), np.uint8)) > 0) & ~others
            if ring.sum() < 10 or not m.any():
                continue  # packed in a row: no free background around it
            inside = s.image[m > 0].astype(np.float64)
            diff = np.abs(inside - s.image[ring].mean(axis=0)).mean()
            assert diff > 10, (name, diff)
            checked += 1
    assert checked >= 50


def test_write_dota_dataset(tmp_path: Path):
    root = tmp_path / "synthetic"
    summary = write_dota_dataset(root, num_train=2, num_test=1, size=256, seed=3)
    ids = ["synthetic_0000", "synthetic_0001", "synthetic_0002"]
    assert summary["images"] == 3
    assert summary["train"] == ids[:2] and summary["test"] == ids[2:]
    assert (root / "train.txt").read_text() == "synthetic_0000\nsynthetic_0001\n"
    assert (root / "test.txt").read_text() == "synthetic_0002\n"
    assert list(summary["per_class"]) == list(SYNTHETIC_CLASSES)

    per_class = dict.fromkeys(SYNTHETIC_CLASSES, 0)
    for i, image_id in enumerate(ids):
        expected = render_image(3 * 100003 + i, 256)
        image = cv2.imread(str(root / "images" / f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(image, expected.image)  # PNG is lossless
        lines = (root / "labelTxt" / f"{image_id}.txt").read_text().splitlines()
        assert lines[:2] == ["imagesource:mutdet-synthetic", "gsd:0.5"]
        assert len(lines) - 2 == len(expected.classes)
        for line, poly, name, diff in zip(lines[2:], expected.polygons, expected.classes, expected.difficult):
            tokens = line.split()
            assert len(tokens) == 10 and tokens[8] == name and tokens[9] == str(diff)
            assert all(len(t.split(".")[1]) == 1 for t in tokens[:8])
            np.testing.assert_allclose([float(t) for t in tokens[:8]], poly, atol=0.05 + 1e-9)
            per_class[name] += 1
    assert summary["per_class"] == per_class
    assert summary["objects"] == sum(per_class.values())

    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == sorted([f"images/{i}.png" for i in ids] + [f"labelTxt/{i}.txt" for i in ids]
                           + ["train.txt", "test.txt"])  # no temporary files left behind


def test_unlabelled_images_are_written_without_labels_and_read_as_unlabelled(tmp_path: Path):
    from mutdet.io.datasets import load_image
    root = tmp_path / "synthetic"
    summary = write_dota_dataset(root, num_train=1, num_test=1, size=200, seed=3, num_unlabelled=2)
    assert summary["unlabelled"] == ["synthetic_0002", "synthetic_0003"]
    assert summary["images"] == 4 and (root / "unlabelled.txt").read_text() == "synthetic_0002\nsynthetic_0003\n"
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert [f for f in files if "unlabelled" in f] == [
        "unlabelled.txt", "unlabelled/images/synthetic_0002.png", "unlabelled/images/synthetic_0003.png"]
    assert not (root / "labelTxt" / "synthetic_0002.txt").exists()
    for i, image_id in enumerate(summary["unlabelled"], start=2):  # the seeds continue after the labelled ids
        expected = render_image(3 * 100003 + i, 200)
        np.testing.assert_array_equal(cv2.imread(str(root / "unlabelled" / "images" / f"{image_id}.png")), expected.image)
    loaded = load_image("dota", root / "unlabelled" / "images", root / "unlabelled" / "labelTxt", "synthetic_0002",
                        [".png"], {c: i for i, c in enumerate(SYNTHETIC_CLASSES)})
    assert loaded.annotations is None and loaded.pixels.shape == (200, 200, 3)
    # the labelled splits are those written without the pool
    plain = write_dota_dataset(tmp_path / "plain", num_train=1, num_test=1, size=200, seed=3)
    assert plain["per_class"] == summary["per_class"] and plain["unlabelled"] == []


def test_zoom_renders_a_smaller_world_with_larger_objects(tmp_path: Path):
    world = render_image(11, 256)
    zoomed = render_image(11, 512, zoom=2.0)
    assert zoomed.image.shape == (512, 512, 3) and zoomed.classes == world.classes
    # pixel-centre coordinates: x -> (x + 0.5) * 2 - 0.5; sides twice as long
    np.testing.assert_allclose(zoomed.polygons, (world.polygons + 0.5) * 2 - 0.5)
    np.testing.assert_array_equal(zoomed.image, cv2.resize(world.image, (512, 512), interpolation=cv2.INTER_LINEAR))
    with pytest.raises(ValueError, match="zoom must be >= 1"):
        render_image(11, 256, zoom=0.5)
    summary = write_dota_dataset(tmp_path, num_train=1, num_test=1, size=256, seed=2, zoom=2.0)
    assert (tmp_path / "labelTxt" / "synthetic_0000.txt").read_text().splitlines()[1] == "gsd:0.25"
    assert summary["objects"] == len(render_image(2 * 100003, 128).classes) + len(render_image(2 * 100003 + 1, 128).classes)


def test_write_dota_dataset_is_reproducible(tmp_path: Path):
    write_dota_dataset(tmp_path / "a", num_train=1, num_test=1, size=200, seed=5)
    write_dota_dataset(tmp_path / "b", num_train=1, num_test=1, size=200, seed=5)
    for path in (tmp_path / "a").rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()


def test_failed_write_leaves_no_partial_files(tmp_path: Path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_dota_dataset(tmp_path, num_train=1, num_test=0, size=200)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_negative_split_sizes_are_rejected(tmp_path: Path):
    with pytest.raises(ValueError):
        write_dota_dataset(tmp_path, num_train=-1)


def test_full_size_image_is_busy():
    sample = render_image(0)
    assert sample.image.shape == (1500, 1500, 3)
    assert 30 <= len(sample.classes) <= 250
