"""The numpy replay of torchvision's float32 rotated-IoU kernel (``mutdet.rotated_iou_kernel``) equals the
compiled kernel bit for bit: random, crowded and degenerate pairs, both argument orders, and the known
case where the kernel is far from the exact IoU."""
import math

import numpy as np
import pytest
import torch

from mutdet.boxes import le90_to_cxcywhr, rotated_iou
from mutdet.rotated_iou_kernel import KernelBoxes, kernel_pair_iou

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by `make test`


def compiled(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The compiled kernel's value of each pair ``(a[k], b[k])`` (float32 CXCYWHR), one 1 x 1 call each
    for small sets, else the diagonal of 16 x 16 blocks (the kernel computes every pair independently)."""
    from torchvision.ops import box_iou

    ta, tb = torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(np.ascontiguousarray(b))
    out = [np.diagonal(box_iou(ta[s:s + 16], tb[s:s + 16], fmt="cxcywhr").numpy()) for s in range(0, len(a), 16)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def pairs(rng, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` le90 pairs over 5 decades of size and 4 of position: near-copies, jittered and far pairs,
    right-angle and equal angles, identical boxes, integer corners, slivers and sub-pixel boxes."""
    scale = 10 ** rng.uniform(-1.5, 2.7, k)
    aspect = 10 ** rng.uniform(0, 1.5, k)
    pos = rng.uniform(0, 1, (k, 2)) * 10 ** rng.uniform(1, 4.5, (k, 1))
    a = np.column_stack([pos, scale, scale / aspect, rng.uniform(-math.pi / 2, math.pi / 2, k)])
    jitter = np.array([3e-4, 0.02, 0.3, 1.0])[rng.integers(0, 4, k)]
    b = a.copy()
    b[:, :2] += rng.normal(0, 1, (k, 2)) * (jitter * scale)[:, None]
    b[:, 2:4] *= np.exp(rng.normal(0, 0.5, (k, 2)) * jitter[:, None])
    b[:, 4] += rng.normal(0, 1, k) * jitter
    right = rng.uniform(size=k) < 0.15
    b[right, 4] = a[right, 4] + rng.integers(-1, 2, right.sum()) * math.pi / 2
    same = rng.uniform(size=k) < 0.05
    b[same] = a[same]
    upright = rng.uniform(size=k) < 0.1
    a[upright, 4], b[upright, 4] = 0.0, rng.choice([0.0, math.pi / 2, -math.pi / 2], upright.sum())
    grid = rng.uniform(size=k) < 0.1
    a[grid, :4], b[grid, :4] = np.round(a[grid, :4]), np.round(b[grid, :4])
    return le90_to_cxcywhr(a).astype(np.float32), le90_to_cxcywhr(b).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replay_equals_the_compiled_kernel_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    a, b = pairs(rng, 6000)
    for first, second in ((a, b), (b, a)):  # the kernel is not symmetric in the last bits
        replay, kernel = kernel_pair_iou(first, second), compiled(first, second)
        differ = np.flatnonzero(replay.view(np.int32) != kernel.view(np.int32))
        assert len(differ) == 0, (f"{len(differ)} pairs differ, e.g. {first[differ[0]].tolist()} "
                                  f"{second[differ[0]].tolist()}: {replay[differ[0]]} vs {kernel[differ[0]]}")
    assert ((replay > 0) & (replay < 1)).mean() > 0.3  # the pairs do overlap partly, not only 0 or 1


def test_replay_follows_the_kernel_where_it_is_far_from_the_exact_iou():
    """A 42 x 14 px label box and a detection at exact IoU 0.771 (benchmarks/evaluation.py's hand case): a
    corner of one lies within float32 noise of the other's edge and the kernel returns 0.28."""
    label = np.array([[299.5, 963.0, 42.194366455078125, 14.305171012878418, -80.31137084960938]], np.float32)
    det = np.array([[299.76019287109375, 961.8783569335938, 41.259796142578125, 11.564172744750977,
                     -82.93838500976562]], np.float32)
    for a, b in ((label, det), (det, label)):
        value = kernel_pair_iou(a, b)
        assert value.view(np.int32)[0] == compiled(a, b).view(np.int32)[0]
        assert 0.25 < value[0] < 0.3  # not the exact 0.771


def test_kernel_boxes_index_pairs_and_degenerate_boxes():
    rng = np.random.default_rng(3)
    le90 = np.column_stack([rng.uniform(0, 50, (40, 2)), rng.uniform(5, 20, 40), rng.uniform(2, 5, 40),
                            rng.uniform(-1.5, 1.5, 40)])
    le90[0, 2:4] = 0.0  # area 0: IoU 0 with everything (the kernel's early return)
    le90[1, 3] = 1e-16  # area below 1e-14
    boxes = KernelBoxes(le90_to_cxcywhr(le90).astype(np.float32))
    i, j = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
    got = boxes.pair_iou(i.ravel(), j.ravel()).reshape(40, 40)
    want = rotated_iou(le90, le90).astype(np.float32)  # mutdet's kernel call: the whole matrix at once
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
    assert (got[:2] == 0).all() and (got[:, :2] == 0).all() and got[5, 5] == 1.0
    assert len(boxes.pair_iou([], [])) == 0
    with pytest.raises(ValueError, match="need pairs"):
        boxes.pair_iou([0, 1], [2])
