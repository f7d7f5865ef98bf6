"""AR-CSL angle coder: closed-form rotation IoU, targets over the whole angle range (as ARS-DETR's
aspect-ratio window), encode/decode round trip."""
import math

import numpy as np
import pytest
import torch

from mutdet.boxes import rotated_iou
from mutdet.models.angle_coder import ARCSLCoder, aspect_ratio_weight
from numerics import rounding_tolerance

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


# --- an independent AR-CSL label: polygon clipping in float64, the reference's normalisation and window --

def _rectangle(ar: float, angle: float) -> list[tuple[float, float]]:
    """Corners (counter-clockwise) of the rectangle with half sides ``ar`` x 1 turned by ``angle``."""
    c, s = math.cos(angle), math.sin(angle)
    return [(x * c - y * s, x * s + y * c) for x, y in ((-ar, -1.0), (ar, -1.0), (ar, 1.0), (-ar, 1.0))]


def _area(polygon) -> float:
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(polygon, polygon[1:] + polygon[:1])))


def _clip(subject, clipper):
    """Sutherland-Hodgman: the part of convex ``subject`` inside convex counter-clockwise ``clipper``."""
    out = list(subject)
    for (ax, ay), (bx, by) in zip(clipper, clipper[1:] + clipper[:1]):
        side = [(bx - ax) * (py - ay) - (by - ay) * (px - ax) for px, py in out]
        kept = []
        for i in range(len(out)):
            (px, py), (qx, qy), sp, sq = out[i - 1], out[i], side[i - 1], side[i]
            if (sp >= 0) != (sq >= 0):  # the edge p -> q crosses the clipping line
                t = sp / (sp - sq)
                kept.append((px + t * (qx - px), py + t * (qy - py)))
            if sq >= 0:
                kept.append((qx, qy))
        out = kept
        if not out:
            break
    return out


def _reference_label(ar: float, theta: float) -> np.ndarray:
    """ARS-DETR's aspect-ratio CSL label, from its definition: IoU of the box and itself turned by each
    offset in [-90, 90) degrees, min-max normalised over all of them, every offset kept, placed
    circularly around the box's bin floor(deg(theta) + 90)."""
    offsets = np.arange(-90, 90)
    base = _rectangle(ar, 0.0)
    iou = np.array([(lambda inter: inter / (8.0 * ar - inter))(_area(_clip(_rectangle(ar, math.radians(d)), base)))
                    for d in offsets])
    smooth = (iou - iou.min()) / (1.0 - iou.min())
    own = math.floor(math.degrees(theta) + 90.0) % 180
    label = np.zeros(180)
    label[(own + offsets) % 180] = smooth
    return label


CASES = [(1.0, -90.0), (1.0, 44.2), (1.3, 89.9), (2.0, -89.5), (2.0, 0.3), (4.0, 88.1), (4.0, -87.0),
         (10.0, -90.0), (10.0, 30.7), (50.0, 89.5)]


@pytest.mark.parametrize("ar, degrees", CASES)
def test_targets_match_the_reference_label(ar, degrees):
    theta = torch.tensor([math.radians(degrees)], dtype=torch.float64)
    got = ARCSLCoder().encode(theta, torch.tensor([[10.0 * ar, 10.0]], dtype=torch.float64))[0].numpy()
    want = _reference_label(ar, float(theta))
    # closed form vs clipped polygons, both float64: a few rounded operations per IoU, then a division
    # by 1 - min IoU >= 0.29; bounded by the rounding of a 180-term row, twice
    tol = rounding_tolerance(torch.float64, reduction=180, depth=2)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)


def test_reference_values_by_hand_and_wrap_around():
    """AR 4 turned by 60 degrees overlaps in a rhombus: IoU 4 / (8 AR sin 60 - 4); the least IoU, at 90
    degrees, is 4 / (8 AR - 4) = 1/7. A box in bin 0 (-89.5 deg) reaches bins 60 and 120 (60 degrees on
    either side, across the end of the range) with the same value, and bin 90 with 0."""
    coder = ARCSLCoder()
    row = coder.encode(torch.tensor([math.radians(-89.5)], dtype=torch.float64),
                       torch.tensor([[40.0, 10.0]], dtype=torch.float64))[0]
    low = 1.0 / 7.0
    want = (4.0 / (32.0 * math.sin(math.radians(60.0)) - 4.0) - low) / (1.0 - low)
    eps = rounding_tolerance(torch.float64, reduction=16)
    assert abs(float(row[60]) - want) <= eps and abs(float(row[120]) - want) <= eps
    assert float(row[0]) == 1.0 and float(row[90]) == 0.0
    torch.testing.assert_close(row[1:90], row[91:].flip(0), rtol=0, atol=eps)  # bin 0 +- d, wrapping at 180
    assert (row[1:90] > 0).all()


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
    # a square turned by 90 degrees is the same box, and its label has that second peak of 1
    period = math.pi / 2 if ar == 1.0 else math.pi
    error = torch.remainder(decoded - theta + period / 2, period) - period / 2
    assert error.abs().max() <= math.radians(0.5) + 1e-9
    assert (decoded >= -math.pi / 2).all() and (decoded < math.pi / 2).all()
    # the decoded angle is the centre of theta's own one-degree bin (modulo 90 degrees for a square)
    own = torch.deg2rad(torch.floor(torch.rad2deg(theta) + 90) + 0.5 - 90)
    turned = torch.remainder(decoded - own + period / 2, period) - period / 2
    torch.testing.assert_close(turned, torch.zeros_like(turned))


@pytest.mark.parametrize("ar", RATIOS)
def test_target_shape_window_and_normalisation(ar):
    coder = ARCSLCoder()
    theta = torch.tensor([math.radians(-89.7), math.radians(0.2), math.radians(45.0), math.radians(89.3)])
    targets = coder.encode(theta, torch.tensor([[10.0 * ar, 10.0]]).expand(len(theta), 2))
    assert targets.shape == (4, 180)
    bins = coder.angle_to_bin(theta)
    for row, b in zip(targets, bins.tolist()):
        assert row[b] == 1.0 and row.max() == 1.0 and row.min() == 0.0
        # symmetric about the box's bin all around the circle, decreasing down to the least overlap
        for d in range(1, 90):
            assert abs(float(row[(b + d) % 180] - row[(b - d) % 180])) <= 8 * torch.finfo(row.dtype).eps
        least = int(torch.argmin(torch.stack([row[(b + d) % 180] for d in range(91)])))
        assert 45 <= least <= 90  # 90 degrees, or near 45 for near-squares
        assert all(row[(b + d) % 180] <= row[(b + d - 1) % 180] for d in range(1, least + 1))
        assert (row[(b + torch.arange(1, least)) % 180] > 0).all()  # no cut anywhere


def test_optional_radius_cuts_and_none_keeps_everything():
    theta, wh = torch.tensor([math.radians(1.5)]), torch.tensor([[30.0, 10.0]])
    full = ARCSLCoder().encode(theta, wh)[0]
    torch.testing.assert_close(ARCSLCoder(radius=90).encode(theta, wh)[0], full, rtol=0, atol=0)
    cut = ARCSLCoder(radius=6).encode(theta, wh)[0]
    distance = (torch.arange(180) - 91).abs()
    distance = torch.minimum(distance, 180 - distance)
    assert torch.equal(cut[distance <= 6], full[distance <= 6]) and (cut[distance > 6] == 0).all()
    assert (full[distance > 6] > 0).sum() == 180 - 13 - 1  # only the 90-degree bin is 0


def test_aspect_ratio_weight():
    wh = torch.tensor([[10.0, 10.0], [30.0, 10.0], [10.0, 30.0], [1e4, 1.0]])
    torch.testing.assert_close(aspect_ratio_weight(wh), torch.tensor([1.0, 1.5, 1.5, 2 * 1e4 / (1e4 + 1)]))


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="num_bins"):
        ARCSLCoder(num_bins=7)
    with pytest.raises(ValueError, match="radius"):
        ARCSLCoder(radius=91)
    with pytest.raises(ValueError, match="radius"):
        ARCSLCoder(radius=-1)


def test_criterion_angle_loss_uses_the_whole_label():
    """The fine-tuning / pre-training criterion (default settings) trains the angle on the reference's
    label: ARS-DETR's sigmoid cross-entropy, per-bin weight 2 AR / (AR + 1), averaged over boxes x bins."""
    from mutdet.losses import build_criterion

    ar, degrees = 3.0, -88.6  # wraps: bins on both ends of the range carry the label
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[50.0, 40.0, 30.0, 10.0, math.radians(degrees)]]),
                "size": torch.tensor([100, 100])}]
    logits = torch.randn(1, 1, 180, generator=torch.Generator().manual_seed(0))
    outputs = {"pred_logits": torch.zeros(1, 1, 1), "pred_boxes": torch.tensor([[[0.5, 0.4, 0.3, 0.1]]]),
               "pred_angle_logits": logits}
    got = build_criterion(num_classes=1, num_decoder_layers=1)(outputs, targets)["loss_angle"]
    label = torch.from_numpy(_reference_label(ar, math.radians(degrees)))
    x = logits[0, 0].double()
    bce = (torch.clamp(x, min=0) - x * label + torch.log1p(torch.exp(-x.abs()))).sum()  # stable BCE with logits
    want = (2 * ar / (ar + 1)) * bce / 180
    # float32 loss of a 180-bin sum against a float64 one
    assert abs(float(got) - float(want)) <= rounding_tolerance(torch.float32, reduction=180) * float(want)
