"""Hungarian matcher: per-image independence, empty targets, permutation equivariance, cost terms."""
import math

import pytest
import torch

from mutdet.losses import angle_cost, build_matcher, prepare_targets
from mutdet.models.angle_coder import ARCSLCoder

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by `make test`

CODER = ARCSLCoder()


def _targets(counts, seed=0, size=(200, 300)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        h, w = size
        wh = torch.rand(n, 2, generator=g) * 40 + 5
        wh = torch.stack([wh.max(1).values, wh.min(1).values], 1)
        boxes = torch.cat([torch.rand(n, 1, generator=g) * w, torch.rand(n, 1, generator=g) * h, wh,
                           (torch.rand(n, 1, generator=g) - 0.5) * math.pi], 1)
        out.append({"labels": torch.randint(0, 4, (n,), generator=g), "boxes": boxes, "size": torch.tensor(size)})
    return out


def _outputs(batch, queries=10, classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"pred_logits": torch.randn(batch, queries, classes, generator=g),
            "pred_boxes": torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.1,
            "pred_angle_logits": torch.randn(batch, queries, 180, generator=g)}


def test_batched_equals_per_image():
    matcher = build_matcher()
    targets = prepare_targets(_targets([3, 0, 5]), CODER)
    outputs = _outputs(3)
    batched = matcher(outputs, targets)
    for b in range(3):
        single = matcher({k: v[b:b + 1] for k, v in outputs.items()}, targets[b:b + 1])[0]
        assert torch.equal(batched[b][0], single[0]) and torch.equal(batched[b][1], single[1])
    assert [len(q) for q, _ in batched] == [3, 0, 5]
    for q, j in batched:  # one-to-one
        assert len(set(q.tolist())) == len(q) and sorted(j.tolist()) == list(range(len(j)))


def test_empty_targets():
    matcher = build_matcher()
    indices = matcher(_outputs(2), prepare_targets(_targets([0, 0]), CODER))
    assert all(len(q) == 0 and len(j) == 0 and q.dtype == torch.int64 for q, j in indices)


def test_permuting_targets_permutes_the_assignment():
    matcher = build_matcher()
    raw = _targets([6], seed=3)
    outputs = _outputs(1, queries=12, seed=4)
    q0, j0 = matcher(outputs, prepare_targets(raw, CODER))[0]
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    permuted = [{"labels": raw[0]["labels"][perm], "boxes": raw[0]["boxes"][perm], "size": raw[0]["size"]}]
    q1, j1 = matcher(outputs, prepare_targets(permuted, CODER))[0]
    assert torch.equal(q0, q1)
    assert torch.equal(j0, perm[j1])  # same query -> same original target


def test_exact_prediction_is_matched_to_its_target():
    matcher = build_matcher()
    raw = _targets([3], seed=5)
    target = prepare_targets(raw, CODER)[0]
    outputs = _outputs(1, queries=8, seed=6)
    for j, q in enumerate([5, 1, 6]):  # plant perfect predictions
        outputs["pred_boxes"][0, q] = target["boxes"][j]
        outputs["pred_logits"][0, q] = -10.0
        outputs["pred_logits"][0, q, target["labels"][j]] = 10.0
        outputs["pred_angle_logits"][0, q] = 20.0 * (2 * target["angle_targets"][j] - 1)
    q, j = matcher(outputs, [target])[0]
    assert dict(zip(j.tolist(), q.tolist())) == {0: 5, 1: 1, 2: 6}


def test_cost_terms_by_hand():
    target = prepare_targets([{"labels": torch.tensor([1]), "boxes": torch.tensor([[40.0, 60.0, 40.0, 20.0, 0.0]]),
                               "size": torch.tensor([100, 200])}], CODER)[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.2, 0.6, 0.2, 0.2]]))  # x by w=200, y by h=100
    logits = torch.tensor([[0.0, 1.0]])
    boxes = torch.tensor([[0.25, 0.6, 0.2, 0.1]])
    angle_logits = torch.zeros(1, 180)

    only = dict(cost_class=0.0, cost_bbox=0.0, cost_giou=0.0, cost_angle=0.0)
    l1 = build_matcher(**{**only, "cost_bbox": 1.0}).cost_matrix(logits, boxes, angle_logits, target)
    torch.testing.assert_close(l1, torch.tensor([[0.15]]))
    giou = build_matcher(**{**only, "cost_giou": 1.0}).cost_matrix(logits, boxes, angle_logits, target)
    torch.testing.assert_close(giou, torch.tensor([[-(1 / 3 - 0.1)]]))  # IoU 1/3, enclosing 0.05, union 0.045
    angle = build_matcher(**{**only, "cost_angle": 1.0}).cost_matrix(logits, boxes, angle_logits, target)
    torch.testing.assert_close(angle, torch.tensor([[math.log(2) * 4 / 3]]))  # BCE(0, t) = log 2; AR 2 -> 4/3
    cls = build_matcher(**{**only, "cost_class": 1.0}).cost_matrix(logits, boxes, angle_logits, target)
    p = 1 / (1 + math.exp(-1.0))
    want = 0.25 * (1 - p) ** 2 * -math.log(p) - 0.75 * p ** 2 * -math.log(1 - p)
    torch.testing.assert_close(cls, torch.tensor([[want]]))


def test_angle_cost_is_weighted_mean_bce():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(3, 180, generator=g), torch.rand(2, 180, generator=g)
    weights = torch.tensor([1.0, 1.7])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    want = torch.stack([torch.stack([bce(logits[i], targets[j]) * weights[j] for j in range(2)]) for i in range(3)])
    torch.testing.assert_close(angle_cost(logits, targets, weights), want)
