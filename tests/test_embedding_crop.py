"""Rotated RoI-align geometry (mutdet.embedding.rotated_crop): exact sample points, drawn boxes, context,
resized images, batching over images."""
import math

import cv2
import numpy as np
import pytest
import torch

from mutdet.boxes import le90_to_polygon
from mutdet.embedding.rotated_crop import rotated_roi_align

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by `make test`

ANGLES = [-math.pi / 2, -math.pi / 2 + 1e-3, -1.2, -0.3, 0.0, 0.7, math.pi / 2 - 1e-3]


def crop(image_hwc: np.ndarray, box, out_hw, context=1.0, frame=None) -> np.ndarray:
    """One crop ``(out_h, out_w, C)`` of one le90 box from a float image ``(H, W, C)``."""
    image = torch.from_numpy(np.ascontiguousarray(image_hwc, dtype=np.float32)).permute(2, 0, 1)
    frame = frame or (image_hwc.shape[1], image_hwc.shape[0])
    out = rotated_roi_align([image], torch.tensor([box], dtype=torch.float64), torch.zeros(1, dtype=torch.int64),
                            [frame], out_hw, context)
    return out[0].permute(1, 2, 0).numpy()


def sample_points(box, out_hw, context):
    """Where crop pixel (i, j) should sample, in image pixels: ctr + a u + b v (pixel centres on the box grid)."""
    cx, cy, w, h, t = box
    out_h, out_w = out_hw
    a = ((2 * np.arange(out_w) + 1) / out_w - 1) * context * w / 2
    b = ((2 * np.arange(out_h) + 1) / out_h - 1) * context * h / 2
    u, v = np.array([math.cos(t), math.sin(t)]), np.array([-math.sin(t), math.cos(t)])
    return np.array([cx, cy]) + a[None, :, None] * u + b[:, None, None] * v  # (out_h, out_w, 2)


def ramp(height, width):
    """An image whose channels are its own x and y pixel coordinates (pixel centres at integers)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return np.stack([xs, ys], axis=-1)


@pytest.mark.parametrize("theta", ANGLES)
@pytest.mark.parametrize("context", [1.0, 1.5])
def test_crop_samples_the_box_grid_exactly(theta, context):
    # Bilinear interpolation reproduces a linear image exactly: each crop pixel reads its sample point.
    box = (70.3, 61.7, 40.0, 18.0, theta)
    got = crop(ramp(128, 150), box, (9, 20), context)
    np.testing.assert_allclose(got, sample_points(box, (9, 20), context), atol=2e-3)


@pytest.mark.parametrize("theta", [-math.pi / 2, 0.4])
def test_boxes_in_tile_pixels_crop_a_resized_tile(theta):
    # The tile is resized edge to edge (cv2.resize), the boxes stay in tile pixels: same sample points.
    tile = ramp(96, 120)
    resized = cv2.resize(tile, (150, 120), interpolation=cv2.INTER_LINEAR)  # x 1.25
    box = (60.0, 44.5, 30.0, 12.0, theta)
    got = crop(resized, box, (8, 16), 1.5, frame=(120, 96))
    np.testing.assert_allclose(got, sample_points(box, (8, 16), 1.5), atol=2e-3)


COLOURS = {(-1, -1): (255, 0, 0), (1, -1): (0, 255, 0), (1, 1): (0, 0, 255), (-1, 1): (255, 255, 0)}


def draw_quadrants(box, size=256) -> np.ndarray:
    """Black image with the box drawn as four coloured quarters: quarter (su, sv) lies on the +-u, +-v side."""
    cx, cy, w, h, t = box
    u, v = np.array([math.cos(t), math.sin(t)]), np.array([-math.sin(t), math.cos(t)])
    image = np.zeros((size, size, 3), np.uint8)
    for (su, sv), colour in COLOURS.items():
        centre = np.array([cx, cy]) + su * w / 4 * u + sv * h / 4 * v
        polygon = le90_to_polygon([centre[0], centre[1], w / 2, h / 2, t]).reshape(4, 2)
        cv2.fillPoly(image, [np.round(polygon * 16).astype(np.int32)], colour, shift=4)
    return image


def classify(crop_rgb: np.ndarray) -> np.ndarray:
    """Index of the nearest of black + the four colours, per pixel: 0 black, 1..4 the quarters in COLOURS order."""
    palette = np.array([(0, 0, 0), *COLOURS.values()], np.float32)
    return np.argmin(((crop_rgb[:, :, None, :] - palette) ** 2).sum(-1), axis=-1)


@pytest.mark.parametrize("theta", ANGLES)
def test_crop_of_drawn_box_is_the_box_axis_aligned(theta):
    # Context 1: the crop is the rectangle, its x axis along w (the +u quarters on the right, +v at the bottom).
    box = (128.0, 120.0, 120.0, 56.0, theta)
    size = 64
    labels = classify(crop(draw_quadrants(box), box, (size, size), 1.0))
    expected = np.empty((size, size), int)
    half = size // 2
    for k, (su, sv) in enumerate(COLOURS, start=1):
        expected[(slice(half, None) if sv > 0 else slice(0, half)), (slice(half, None) if su > 0 else slice(0, half))] = k
    # Rasterisation and bilinear blending blur one or two image pixels at every edge (~1.1 crop pixels here).
    keep = np.ones((size, size), bool)
    for line in (0, half, size):
        keep[max(line - 2, 0):line + 2, :] = False
        keep[:, max(line - 2, 0):line + 2] = False
    assert (labels[keep] == expected[keep]).mean() == 1.0


@pytest.mark.parametrize("theta", ANGLES)
def test_context_puts_the_box_in_the_central_fraction(theta):
    box = (128.0, 128.0, 110.0, 50.0, theta)
    size = 90
    labels = classify(crop(draw_quadrants(box), box, (size, size), 1.5))
    coloured = labels > 0
    rows, cols = np.flatnonzero(coloured.any(axis=1)), np.flatnonzero(coloured.any(axis=0))
    # The box spans crop pixels [size/2 - size/3, size/2 + size/3) = [15, 75) in both axes.
    lo, hi = size / 2 - size / 3, size / 2 + size / 3
    for found in (rows, cols):
        assert abs(found[0] - lo) <= 1 and abs(found[-1] + 1 - hi) <= 1
    inner = coloured[int(lo) + 2:int(hi) - 2, int(lo) + 2:int(hi) - 2]
    assert inner.all()


def test_batched_over_images_equals_one_at_a_time():
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.random((3, 40, 50), dtype=np.float32)),
              torch.from_numpy(rng.random((3, 64, 32), dtype=np.float32))]
    frames = [(50, 40), (40, 80)]  # the second image was resized from an 40 x 80 frame
    boxes = torch.tensor([[20, 20, 10, 6, 0.3], [10, 30, 14, 8, -1.0], [25, 15, 20, 5, 1.2], [5, 5, 30, 30, 0.0]],
                         dtype=torch.float64)
    index = torch.tensor([1, 0, 1, 0])
    batched = rotated_roi_align(images, boxes, index, frames, (7, 11), 1.5)
    for n in range(4):
        b = int(index[n])
        single = rotated_roi_align([images[b]], boxes[n:n + 1], torch.zeros(1, dtype=torch.int64), [frames[b]],
                                   (7, 11), 1.5)
        torch.testing.assert_close(batched[n], single[0])


def test_outside_the_image_reads_zero():
    box = (0.0, 0.0, 20.0, 20.0, 0.0)  # centred on the top-left pixel: three quarters lie outside
    got = crop(np.ones((32, 32, 1), np.float32), box, (8, 8), 1.0)
    assert np.all(got[:3, :, 0] == 0) and np.all(got[:, :3, 0] == 0) and np.all(got[5:, 5:, 0] == 1)
