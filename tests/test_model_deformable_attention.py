"""Multi-scale deformable attention: the grid_sample op against a direct loop, and the rotated variant."""
import math

import pytest
import torch

from mutdet.models.deformable_attention import (MultiScaleDeformableAttention, deformable_sampling_locations,
                                                ms_deform_attn)

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by `make test`

SHAPES = torch.tensor([[3, 4], [2, 2], [1, 3]])  # (H_l, W_l)


def _start(shapes):
    return torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])


def _bilinear(img, x, y):
    """Zero-padded bilinear sample of ``img`` ``(H, W)`` at pixel coordinates (pixel centres at integers)."""
    h, w = img.shape
    x0, y0 = math.floor(x), math.floor(y)
    total = img.new_zeros(())
    for xi, wx in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
        for yi, wy in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
            if 0 <= xi < w and 0 <= yi < h:
                total = total + wx * wy * img[yi, xi]
    return total


def _loop_reference(value, shapes, locations, weights):
    """Direct definition: sum over levels and points of weight * bilinear(value_l, location)."""
    b_, _, m_, d_ = value.shape
    _, q_, _, l_, p_, _ = locations.shape
    start = _start(shapes)
    out = value.new_zeros(b_, q_, m_, d_)
    for b in range(b_):
        for q in range(q_):
            for m in range(m_):
                for lv in range(l_):
                    h, w = shapes[lv].tolist()
                    level = value[b, start[lv]:start[lv] + h * w, m].reshape(h, w, d_)
                    for p in range(p_):
                        x = float(locations[b, q, m, lv, p, 0]) * w - 0.5  # align_corners=False
                        y = float(locations[b, q, m, lv, p, 1]) * h - 0.5
                        for d in range(d_):
                            out[b, q, m, d] += weights[b, q, m, lv, p] * _bilinear(level[..., d], x, y)
    return out.flatten(2)


def _random_inputs(seed, batch=2, queries=3, heads=2, channels=2, points=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = int(SHAPES.prod(1).sum())
    value = torch.randn(batch, s, heads, channels, generator=g, dtype=dtype)
    locations = torch.rand(batch, queries, heads, len(SHAPES), points, 2, generator=g, dtype=dtype) * 1.3 - 0.15
    weights = torch.rand(batch, queries, heads, len(SHAPES), points, generator=g, dtype=dtype)
    return value, locations, weights


def test_matches_direct_loop_including_out_of_bounds_locations():
    value, locations, weights = _random_inputs(0)
    got = ms_deform_attn(value, SHAPES, _start(SHAPES), locations, weights)
    want = _loop_reference(value, SHAPES, locations, weights)
    assert got.shape == (2, 3, 4)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_gradcheck():
    value, locations, weights = _random_inputs(1, batch=1, queries=2)
    # random locations almost surely avoid the pixel-centre lines where bilinear sampling has kinks
    for inputs in (value, locations, weights):
        inputs.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn(v, SHAPES, _start(SHAPES), loc, w), (value, locations, weights),
        eps=1e-6, atol=1e-6)


def _modules(rotated_first=True, seed=0):
    torch.manual_seed(seed)
    kwargs = dict(embed_dim=8, num_heads=2, num_levels=len(SHAPES), num_points=3)
    rotated = MultiScaleDeformableAttention(rotated=True, **kwargs).double()
    plain = MultiScaleDeformableAttention(rotated=False, **kwargs).double()
    with torch.no_grad():
        for p in rotated.parameters():
            p.normal_(0, 0.5)  # non-trivial offsets and weights
    plain.load_state_dict(rotated.state_dict())
    return rotated, plain


def _attention_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = int(SHAPES.prod(1).sum())
    query = torch.randn(2, 4, 8, generator=g, dtype=torch.float64)
    value = torch.randn(2, s, 8, generator=g, dtype=torch.float64)
    boxes = torch.cat([torch.rand(2, 4, 2, generator=g, dtype=torch.float64) * 0.6 + 0.2,
                       torch.rand(2, 4, 2, generator=g, dtype=torch.float64) * 0.3 + 0.1], -1)
    return query, value, boxes[:, :, None].expand(-1, -1, len(SHAPES), -1)


def test_rotated_with_zero_angle_equals_plain():
    rotated, plain = _modules()
    query, value, reference = _attention_inputs()
    angles = torch.zeros(2, 4, dtype=torch.float64)
    got = rotated(query, reference, value, SHAPES, _start(SHAPES), reference_angles=angles)
    want = plain(query, reference, value, SHAPES, _start(SHAPES))
    torch.testing.assert_close(got, want)


def test_rotated_by_quarter_turn_equals_swapped_box_and_rotated_offsets():
    """theta = pi/2 maps offset (a, b) of a (w, h) box to (-b, a): the same as a plain (h, w) box
    whose offset head predicts (-oy, ox)."""
    rotated, plain = _modules()
    with torch.no_grad():
        for name in ("weight", "bias"):
            weight = getattr(rotated.sampling_offsets, name)
            src = weight.view(-1, 2, *weight.shape[1:])  # (M*L*P, (x, y), ...)
            dst = getattr(plain.sampling_offsets, name).view_as(src)
            dst[:, 0], dst[:, 1] = -src[:, 1], src[:, 0]
    query, value, reference = _attention_inputs(1)
    angles = torch.full((2, 4), math.pi / 2, dtype=torch.float64)
    swapped = reference[..., [0, 1, 3, 2]]
    got = rotated(query, reference, value, SHAPES, _start(SHAPES), reference_angles=angles)
    want = plain(query, swapped, value, SHAPES, _start(SHAPES))
    torch.testing.assert_close(got, want)


def test_sampling_locations_rotate_clockwise_in_image_coordinates():
    """A point along the box's w axis follows le90's u = (cos t, sin t)."""
    reference = torch.tensor([[[[0.5, 0.5, 0.4, 0.1]]]], dtype=torch.float64)  # (B, Q, L, 4)
    offsets = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)  # P = 1, along w
    t = 0.3
    loc = deformable_sampling_locations(reference, offsets, SHAPES[:1], torch.tensor([[t]], dtype=torch.float64))
    torch.testing.assert_close(loc.view(2), torch.tensor([0.5 + 0.2 * math.cos(t), 0.5 + 0.2 * math.sin(t)],
                                                         dtype=torch.float64))


def test_point_references_use_level_pixels():
    reference = torch.full((1, 1, len(SHAPES), 2), 0.5, dtype=torch.float64)
    offsets = torch.ones(1, 1, 1, len(SHAPES), 1, 2, dtype=torch.float64)
    loc = deformable_sampling_locations(reference, offsets, SHAPES)
    want = 0.5 + 1.0 / SHAPES.flip(1).double()  # one pixel of each level, (x, y) = (1/W, 1/H)
    torch.testing.assert_close(loc.view(len(SHAPES), 2), want)


def test_angles_required_exactly_for_rotated_module():
    rotated, plain = _modules()
    query, value, reference = _attention_inputs()
    with pytest.raises(ValueError, match="rotated"):
        rotated(query, reference, value, SHAPES, _start(SHAPES))
    with pytest.raises(ValueError, match="rotated"):
        plain(query, reference, value, SHAPES, _start(SHAPES), reference_angles=torch.zeros(2, 4))
