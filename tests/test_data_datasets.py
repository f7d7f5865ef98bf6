"""TileDataset, collate and the oriented transforms (flips, resize, normalisation)."""
from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch

from mutdet.boxes import le90_to_polygon, normalize_le90
from mutdet.data.datasets import TileDataset, collate
from mutdet.data.transforms import IMAGENET_MEAN, IMAGENET_STD, DetectionTransform, build_transforms
from mutdet.io.artefacts import write_artefact

CLASSES = ["plane", "ship", "vehicle"]


def make_tiles_folder(folder: Path, images: dict[str, int] | None = None, size: int = 64, seed: int = 0) -> Path:
    """A tiny tiles folder: per source image ``n`` tiles (``image -> n``), each with 1-3 bright
    oriented rectangles on a dark background; the last tile of every image has no objects."""
    rng = np.random.default_rng(seed)
    images = images or {"img_a": 2, "img_b": 2}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "png").mkdir(exist_ok=True)
    tiles, objects = [], []
    for image_id, count in images.items():
        for k in range(count):
            x = k * size
            tile_id = f"{image_id}__1.0__{x}___0"
            pixels = np.full((size, size, 3), 20, np.uint8)
            n = 0 if k == count - 1 and count > 1 else int(rng.integers(1, 4))
            for j in range(n):
                w, h = rng.uniform(size * 0.2, size * 0.4), rng.uniform(size * 0.1, size * 0.2)
                box = normalize_le90([rng.uniform(size * 0.3, size * 0.7), rng.uniform(size * 0.3, size * 0.7),
                                      w, h, rng.uniform(-1.5, 1.5)])
                poly = le90_to_polygon(box)
                cls = int(rng.integers(0, len(CLASSES)))
                cv2.fillPoly(pixels, [poly.reshape(4, 2).round().astype(np.int32)], (60 + 80 * cls, 200, 255))
                objects.append({"tile_id": tile_id, "object_index": j, **dict(zip(["cx", "cy", "w", "h", "theta"], box)),
                                "polygon": poly.tolist(), "class_id": cls, "class_name": CLASSES[cls],
                                "difficult": 2 if j == 2 else 0, "iof": 1.0})
            cv2.imwrite(str(folder / "png" / f"{tile_id}.png"), pixels)
            tiles.append({"tile_id": tile_id, "image_id": image_id, "source_path": f"{image_id}.png",
                          "tile_path": f"png/{tile_id}.png", "rate": 1.0, "x": x, "y": 0, "size": size,
                          "valid_width": size, "valid_height": size, "image_width": size * count,
                          "image_height": size})
    write_artefact(pa.Table.from_pylist(tiles), folder / "tiles.parquet", "tiles")
    cols = ["tile_id", "object_index", "cx", "cy", "w", "h", "theta", "polygon", "class_id", "class_name",
            "difficult", "iof"]
    table = pa.Table.from_pylist(objects) if objects else pa.table({c: [] for c in cols})
    write_artefact(table, folder / "objects.parquet", "objects")
    return folder


def _same_polygon(a: np.ndarray, b: np.ndarray, atol: float = 1e-3) -> bool:
    """Two quadrilaterals equal up to the starting corner and orientation."""
    a, b = a.reshape(4, 2), b.reshape(4, 2)
    for cand in (b, b[::-1]):
        for shift in range(4):
            if np.allclose(a, np.roll(cand, shift, axis=0), atol=atol):
                return True
    return False


def test_dataset_reads_tiles_targets_and_restricts_to_image_ids(tmp_path):
    folder = make_tiles_folder(tmp_path / "tiles")
    ds = TileDataset(folder)
    assert len(ds) == 4 and ds.tile_ids == sorted(ds.tile_ids)
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert target["boxes"].shape[1] == 5 and target["labels"].dtype == torch.int64
    assert target["difficult"].dtype == torch.int8 and target["tile_id"] == ds.tile_ids[0]
    assert target["size"].tolist() == [64, 64]
    # a box centre lies on a bright pixel (RGB order: the fill is BGR (x, 200, 255) -> R = 255)
    cx, cy = target["boxes"][0, :2].round().long().tolist()
    assert image[0, cy, cx] == 255
    sub = TileDataset(folder, image_ids=["img_b"], skip_empty=True)
    assert len(sub) == 1 and sub.tile_ids[0].startswith("img_b") and len(sub[0][1]["labels"]) > 0
    assert sub.tiles.num_rows == 1
    with pytest.raises(ValueError, match="no tiles"):
        TileDataset(folder, image_ids=["nope"])
    easy = TileDataset(folder, max_difficult=0)
    assert all((easy[i][1]["difficult"] == 0).all() for i in range(len(easy)))


BOX = np.array([30.0, 20.0, 24.0, 8.0, 0.4])  # le90 in a 100 (h) x 200 (w) image


@pytest.mark.parametrize("direction, mapping", [
    ("horizontal", lambda p: np.stack([200 - p[:, 0], p[:, 1]], 1)),
    ("vertical", lambda p: np.stack([p[:, 0], 100 - p[:, 1]], 1)),
    ("diagonal", lambda p: np.stack([200 - p[:, 0], 100 - p[:, 1]], 1)),
])
def test_flip_maps_polygon_corners(direction, mapping):
    t = DetectionTransform(flip_probabilities={direction: 1.0}, input_size=None)
    image = torch.zeros(3, 100, 200, dtype=torch.uint8)
    image[:, 10, 20] = 255
    out, target = t(image, {"boxes": torch.tensor(BOX[None], dtype=torch.float32)})
    got = target["boxes"].double().numpy()[0]
    assert -np.pi / 2 <= got[4] < np.pi / 2 and got[2] >= got[3]
    expected_poly = mapping(le90_to_polygon(BOX).reshape(4, 2))
    assert _same_polygon(le90_to_polygon(got), expected_poly)
    # the image moves the same way: the marked pixel (20, 10) goes to its mirror
    x, y = {"horizontal": (179, 10), "vertical": (20, 89), "diagonal": (179, 89)}[direction]
    bright = (out[0] > out[0].min()).nonzero().tolist()
    assert bright == [[y, x]]


def test_random_flip_frequencies_and_eval_has_no_flip():
    t = build_transforms(train=True, input_size=None, generator=random.Random(0))
    flip_step = t.pipeline.transforms[0]
    counts = {}
    for _ in range(4000):
        d = flip_step.choose()
        counts[d] = counts.get(d, 0) + 1
    assert set(counts) == {None, "horizontal", "vertical", "diagonal"}
    assert all(abs(c / 4000 - 0.25) < 0.03 for c in counts.values())
    e = build_transforms(train=False, input_size=None)
    out, target = e(torch.zeros(3, 100, 200, dtype=torch.uint8), {"boxes": torch.tensor(BOX[None]).float()})
    np.testing.assert_allclose(target["boxes"].numpy()[0], BOX, atol=1e-4)


def test_resize_scales_boxes_and_normalises():
    t = build_transforms(train=False, input_size=100)
    image = torch.full((3, 100, 200), 255, dtype=torch.uint8)
    out, target = t(image, {"boxes": torch.tensor(BOX[None]).float()})
    assert out.shape == (3, 50, 100) and target["size"].tolist() == [50, 100]
    assert target["scale"].tolist() == [0.5, 0.5]
    np.testing.assert_allclose(target["boxes"].numpy()[0], [15, 10, 12, 4, 0.4], atol=1e-4)
    expected = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out[:, 0, 0].numpy(), expected, atol=1e-5)


def test_collate_pads_and_masks():
    a = (torch.ones(3, 40, 60), {"boxes": torch.zeros(0, 5)})
    b = (torch.ones(3, 50, 30), {"boxes": torch.zeros(0, 5)})
    images, mask, targets = collate([a, b])
    assert images.shape == (2, 3, 50, 60) and mask.shape == (2, 50, 60) and len(targets) == 2
    assert not mask[0, :40, :60].any() and mask[0, 40:].all()
    assert not mask[1, :50, :30].any() and mask[1, :, 30:].all()
    assert images[0, :, 40:].abs().sum() == 0 and images[1, :, :, 30:].abs().sum() == 0


def test_dataset_with_training_transform_and_collate(tmp_path):
    folder = make_tiles_folder(tmp_path / "tiles")
    ds = TileDataset(folder, transform=build_transforms(train=True, input_size=96), skip_empty=True)
    images, mask, targets = collate([ds[0], ds[1]])
    assert images.shape == (2, 3, 96, 96) and images.dtype == torch.float32 and not mask.any()
    for t in targets:
        assert t["size"].tolist() == [96, 96]
        assert (t["boxes"][:, :2] >= 0).all() and (t["boxes"][:, :2] <= 96).all()


@pytest.mark.parametrize("direction", ["horizontal", "vertical", "diagonal"])
def test_flipped_boxes_stay_on_the_drawn_objects(direction):
    """A filled rotated rectangle drawn in the image stays under its box after the flip (and resize)."""
    box = normalize_le90(np.array([70.0, 40.0, 50.0, 18.0, 0.5]))
    canvas = np.zeros((100, 160), np.uint8)
    cv2.fillPoly(canvas, [le90_to_polygon(box).reshape(4, 2).round().astype(np.int32)], 255)
    image = torch.from_numpy(np.repeat(canvas[None], 3, axis=0))
    t = DetectionTransform(flip_probabilities={direction: 1.0}, input_size=120)
    out, target = t(image, {"boxes": torch.tensor(box[None], dtype=torch.float32)})
    drawn = (out[0] > out[0].mean()).numpy()
    expected = np.zeros_like(drawn, dtype=np.uint8)
    poly = le90_to_polygon(target["boxes"].double().numpy()[0]).reshape(4, 2)
    cv2.fillPoly(expected, [poly.round().astype(np.int32)], 1)
    inter, union = (drawn & (expected > 0)).sum(), (drawn | (expected > 0)).sum()
    assert inter / union > 0.85
