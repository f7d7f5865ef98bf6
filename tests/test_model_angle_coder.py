"""AR-CSL angle coder: closed-form rotation IoU, targets, encode/decode round trip."""
import math

import numpy as np
import pytest
import torch

from mutdet.boxes import rotated_iou
from mutdet.models.angle_coder import ARCSLCoder, aspect_ratio_weight

RATIOS = [1.0, 1.0 + 1e-4, 1.2, 2.0, 4.0, 10.0, 50.0]


@pytest.mark.parametrize("ar", RATIOS)
def test_rotation_iou_matches_polygon_iou(ar):
    coder = ARCSLCoder()
    got = coder.rotation_iou(torch.tensor([ar]))[0].numpy()  # column j: rotation by (j - 90) degrees
    box = np.array([[50.0, 50.0, 10.0 * ar, 10.0, 0.2]])
    rotated = np.repeat(box, 180, axis=0)
    rotated[:, 4] += np.radians(np.arange(180) - 90)
    want = rotated_iou(box, rotated)[0]
    np.testing.assert_allclose(got, want, atol=2e-6)


def _all_angles():
    """Every bin edge and centre, the le90 boundaries and random angles, in [-pi/2, pi/2)."""
    degrees = np.concatenate([np.arange(-90, 90, 0.5), np.arange(-90, 90) + 1e-6, [89.999999]])
    rng = np.random.default_rng(0)
    return torch.tensor(np.concatenate([np.radians(degrees), rng.uniform(-math.pi / 2, math.pi / 2, 200)]))


@pytest.mark.parametrize("ar", RATIOS)
def test_encode_decode_round_trip_over_all_angles(ar):
    coder = ARCSLCoder()
    theta = _all_angles()
    wh = torch.tensor([[10.0 * ar, 10.0]]).expand(len(theta), 2)
    targets = coder.encode(theta, wh)
    decoded = coder.decode(targets)
    error = torch.remainder(decoded - theta + math.pi / 2, math.pi) - math.pi / 2  # circular, period pi
    assert error.abs().max() <= math.radians(0.5) + 1e-9
    assert (decoded >= -math.pi / 2).all() and (decoded < math.pi / 2).all()
    # the decoded angle is the centre of theta's own one-degree bin
    torch.testing.assert_close(decoded, torch.deg2rad(torch.floor(torch.rad2deg(theta) + 90) + 0.5 - 90))


@pytest.mark.parametrize("ar", RATIOS)
def test_target_shape_window_and_normalisation(ar):
    coder = ARCSLCoder(radius=6)
    theta = torch.tensor([math.radians(-89.7), math.radians(0.2), math.radians(45.0)])
    targets = coder.encode(theta, torch.tensor([[10.0 * ar, 10.0]]).expand(3, 2))
    assert targets.shape == (3, 180)
    bins = coder.angle_to_bin(theta)
    for row, b in zip(targets, bins.tolist()):
        assert row[b] == 1.0 and row.max() == 1.0
        distance = (torch.arange(180) - b).abs()
        distance = torch.minimum(distance, 180 - distance)
        assert (row[distance > 6] == 0).all()
        inside = row[distance <= 6]
        assert ((inside > 0) & (inside <= 1)).all()
        # symmetric about the box's bin, decreasing away from it
        for d in range(1, 7):
            torch.testing.assert_close(row[(b + d) % 180], row[(b - d) % 180])
            assert row[(b + d) % 180] <= row[(b + d - 1) % 180]


def test_min_max_normalisation_uses_the_whole_circle():
    coder = ARCSLCoder(radius=89)  # a window as wide as the circle shows the normalised minimum
    targets = coder.encode(torch.tensor([0.0]), torch.tensor([[40.0, 10.0]]))
    assert float(targets.min()) == 0.0 and float(targets.max()) == 1.0


def test_aspect_ratio_weight():
    wh = torch.tensor([[10.0, 10.0], [30.0, 10.0], [10.0, 30.0], [1e4, 1.0]])
    torch.testing.assert_close(aspect_ratio_weight(wh), torch.tensor([1.0, 1.5, 1.5, 2 * 1e4 / (1e4 + 1)]))


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="num_bins"):
        ARCSLCoder(num_bins=7)
    with pytest.raises(ValueError, match="radius"):
        ARCSLCoder(radius=90)
